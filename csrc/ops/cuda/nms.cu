// CUDA backend of box NMS: a grid-stride kernel fills the suppression bitmask
// (pair math from ops/nms_utils.h), the host walks it greedily.
#include <vector>

#include "cuda_helpers.cuh"
#include "ops/nms.h"
#include "ops/nms_utils.h"

namespace samantic {
namespace nms {
namespace {

constexpr int64_t kBits = 64;

// boxes/idxs are already sorted by score; mask[i * words + w] has bit k set
// when box i suppresses box w * 64 + k (only for later boxes).
__global__ void suppression_kernel(const float* boxes, const int64_t* idxs, int64_t n, int64_t words, double threshold,
                                   unsigned long long* mask) {
  CUDA_1D_KERNEL_LOOP(t, n * words) {
    const int64_t i = t / words;
    const int64_t w = t % words;
    unsigned long long bits = 0;
    const int64_t j_end = (w + 1) * kBits < n ? (w + 1) * kBits : n;
    for (int64_t j = w * kBits; j < j_end; ++j) {
      if (j > i && suppresses(boxes, idxs, i, j, threshold)) bits |= 1ULL << (j - w * kBits);
    }
    mask[t] = bits;
  }
}

}  // namespace

std::vector<int64_t> boxes_cuda(const float* boxes, const float* scores, const int64_t* idxs, int64_t n,
                                double threshold, int device) {
  cuda::check(cudaSetDevice(device), "cudaSetDevice");
  cuda::Stream stream;
  const std::vector<int64_t> order = order_by_score(scores, n);
  std::vector<float> sorted_boxes(n * 4);
  std::vector<int64_t> sorted_idxs(idxs ? n : 0);
  for (int64_t a = 0; a < n; ++a) {
    for (int k = 0; k < 4; ++k) sorted_boxes[a * 4 + k] = boxes[order[a] * 4 + k];
    if (idxs) sorted_idxs[a] = idxs[order[a]];
  }
  const int64_t words = cuda::ceil_div(n, kBits);
  cuda::DeviceBuffer<float> d_boxes(sorted_boxes.size());
  cuda::DeviceBuffer<int64_t> d_idxs(sorted_idxs.size());
  cuda::DeviceBuffer<unsigned long long> d_mask(n * words);
  d_boxes.upload(sorted_boxes.data(), sorted_boxes.size(), stream.s);
  d_idxs.upload(sorted_idxs.data(), sorted_idxs.size(), stream.s);
  suppression_kernel<<<cuda::blocks_for(n * words), cuda::kThreadsPerBlock, 0, stream.s>>>(
      d_boxes.ptr, idxs ? d_idxs.ptr : nullptr, n, words, threshold, d_mask.ptr);
  cuda::check_last_launch("suppression_kernel");
  std::vector<unsigned long long> mask(n * words);
  d_mask.download(mask.data(), mask.size(), stream.s);
  stream.sync();

  std::vector<unsigned long long> removed(words, 0);
  std::vector<int64_t> keep;
  for (int64_t a = 0; a < n; ++a) {
    if (removed[a / kBits] & (1ULL << (a % kBits))) continue;
    keep.push_back(order[a]);
    for (int64_t w = 0; w < words; ++w) removed[w] |= mask[a * words + w];
  }
  return keep;
}

}  // namespace nms
}  // namespace samantic
