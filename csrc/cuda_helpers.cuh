// CUDA-only helpers shared by every .cu file: grid sizing, the grid-stride
// loop, launch checks. Kept apart from common.h so host-only code never sees
// CUDA headers.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>

#include "common.h"

namespace samantic {
namespace cuda {

constexpr int kThreadsPerBlock = 256;
constexpr int kMaxBlocks = 4096;

HOST_DEVICE_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreadsPerBlock), kMaxBlocks)));
}

// Device failures are runtime errors, not input errors. The error is also
// cleared from the runtime's per-thread "last error", or a recoverable one
// (e.g. a bad device index) would be reported again by the next call's
// check_last_launch.
inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(str_cat(what, ": ", cudaGetErrorString(err)));
  }
}

inline void check_last_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// RAII device buffer.
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n) : count(n) {
    if (n > 0) check(cudaMalloc(&ptr, n * sizeof(T)), "cudaMalloc");
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void upload(const T* host, size_t n, cudaStream_t stream) {
    if (n) check(cudaMemcpyAsync(ptr, host, n * sizeof(T), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync H2D");
  }
  void zero(cudaStream_t stream) {
    if (count) check(cudaMemsetAsync(ptr, 0, count * sizeof(T), stream), "cudaMemsetAsync");
  }
  void download(T* host, size_t n, cudaStream_t stream) const {
    if (n) check(cudaMemcpyAsync(host, ptr, n * sizeof(T), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync D2H");
  }
};

// A stream owned for one op call.
struct Stream {
  cudaStream_t s = nullptr;
  Stream() { check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
  ~Stream() {
    if (s) cudaStreamDestroy(s);
  }
  void sync() { check(cudaStreamSynchronize(s), "cudaStreamSynchronize"); }
};

}  // namespace cuda
}  // namespace samantic

// Grid-stride loop over [0, n).
#define CUDA_1D_KERNEL_LOOP(i, n)                                                          \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
