// Queries the CUDA runtime for usable devices without ever failing: on a
// machine with no GPU or no driver the answer is a count of 0 and the reason.
#include <cuda_runtime.h>

#include "device.h"

namespace samantic {

CudaStatus cuda_status() {
  CudaStatus s;
  cudaRuntimeGetVersion(&s.runtime_version);
  if (cudaDriverGetVersion(&s.driver_version) != cudaSuccess) s.driver_version = 0;
  const cudaError_t err = cudaGetDeviceCount(&s.device_count);
  if (err != cudaSuccess) {
    s.device_count = 0;
    s.error = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error
  }
  return s;
}

namespace {
__global__ void probe_kernel(int* out) {
  if (out) *out = 1;
}
}  // namespace

std::vector<CudaDeviceProbe> cuda_probe() {
  std::vector<CudaDeviceProbe> out;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return out;
  }
  int previous = 0;
  const bool restore = cudaGetDevice(&previous) == cudaSuccess;
  for (int i = 0; i < count; ++i) {
    CudaDeviceProbe p;
    p.index = i;
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) == cudaSuccess) {
      p.name = prop.name;
      p.major = prop.major;
      p.minor = prop.minor;
    }
    cudaError_t err = cudaSetDevice(i);
    cudaFuncAttributes attr;
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, probe_kernel);
    if (err == cudaSuccess) {
      p.kernels_load = true;
      p.binary_version = attr.binaryVersion;
      p.ptx_version = attr.ptxVersion;
    } else {
      p.error = cudaGetErrorString(err);
      cudaGetLastError();
    }
    out.push_back(p);
  }
  if (restore) cudaSetDevice(previous);
  return out;
}

}  // namespace samantic
