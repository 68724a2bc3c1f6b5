// What the compiled module can do here: backends compiled, devices visible.
#pragma once

#include <string>
#include <vector>

namespace samantic {

struct CudaStatus {
  int device_count = 0;
  int runtime_version = 0;  // CUDA runtime linked in (static)
  int driver_version = 0;   // 0 when no driver is installed
  std::string error;        // why no device is usable, if none is
};

// One visible device and whether this build's kernels load on it.
struct CudaDeviceProbe {
  int index = 0;
  std::string name;
  int major = 0, minor = 0;   // compute capability
  bool kernels_load = false;  // a kernel image (SASS or JIT-compiled PTX) of this build runs here
  int binary_version = 0;     // cudaFuncAttributes of a probe kernel: arch of the code that loaded
  int ptx_version = 0;        // and the PTX version it came from (0 without PTX)
  std::string error;          // why the kernels do not load, if they do not
};

#ifdef SAMANTIC_WITH_CUDA
CudaStatus cuda_status();
// Creates a context on every visible device (slow, uses device memory): only on request.
std::vector<CudaDeviceProbe> cuda_probe();
#endif

}  // namespace samantic
