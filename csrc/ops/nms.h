// NMS backends (called by the validated front in ops/nms.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "ops/rle.h"

namespace samantic {
namespace nms {

// Indices (into the caller's arrays) sorted by score, descending, stable.
std::vector<int64_t> order_by_score(const float* scores, int64_t n);

// boxes: n x 4 XYXY, scores: n, idxs: n categories or null. Returns kept
// indices in descending score order (torchvision batched_nms semantics).
std::vector<int64_t> boxes_cpu(const float* boxes, const float* scores, const int64_t* idxs, int64_t n,
                               double threshold);
#ifdef SAMANTIC_WITH_CUDA
std::vector<int64_t> boxes_cuda(const float* boxes, const float* scores, const int64_t* idxs, int64_t n,
                                double threshold, int device);
#endif

// Greedy NMS by mask IoU on RLEs of one size.
std::vector<int64_t> masks_cpu(const std::vector<rle::View>& rles, const float* scores, const int64_t* idxs,
                               double threshold);

}  // namespace nms
}  // namespace samantic
