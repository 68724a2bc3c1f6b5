// What the compiled module can do here: backends compiled, devices visible.
#pragma once

#include <string>

namespace samantic {

struct CudaStatus {
  int device_count = 0;
  int runtime_version = 0;  // CUDA runtime linked in (static)
  int driver_version = 0;   // 0 when no driver is installed
  std::string error;        // why no device is usable, if none is
};

#ifdef SAMANTIC_WITH_CUDA
CudaStatus cuda_status();
#endif

}  // namespace samantic
