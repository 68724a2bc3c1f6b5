// Fused mask post-processing: backend entry points (called by the validated
// front in ops/postprocess.cpp).
#pragma once

#include "ops/postprocess_utils.h"

namespace samantic {
namespace postprocess {

// logits: plan.n x plan.h_lr x plan.w_lr float32, C order, host memory.
Output run_cpu(const float* logits, const Plan& plan);
#ifdef SAMANTIC_WITH_CUDA
Output run_cuda(const float* logits, const Plan& plan, int device);
#endif

}  // namespace postprocess
}  // namespace samantic
