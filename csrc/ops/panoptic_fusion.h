// Panoptic fusion: backend entry points (called by the validated front in
// ops/panoptic_fusion.cpp).
#pragma once

#include "ops/panoptic_fusion_utils.h"

namespace samantic {
namespace panoptic_fusion {

// plan: from make_plan on validated inputs with n >= 1 and h * w >= 1.
Output run_cpu(const Plan& plan);
#ifdef SAMANTIC_WITH_CUDA
Output run_cuda(const Plan& plan, int device);
#endif

}  // namespace panoptic_fusion
}  // namespace samantic
