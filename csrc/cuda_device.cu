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

}  // namespace samantic
