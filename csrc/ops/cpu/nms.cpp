// CPU backends of box NMS and RLE-mask NMS.
#include <algorithm>
#include <numeric>

#include "ops/nms.h"
#include "ops/nms_utils.h"

namespace samantic {
namespace nms {

std::vector<int64_t> order_by_score(const float* scores, int64_t n) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
  return order;
}

std::vector<int64_t> boxes_cpu(const float* boxes, const float* scores, const int64_t* idxs, int64_t n,
                               double threshold) {
  const std::vector<int64_t> order = order_by_score(scores, n);
  std::vector<uint8_t> removed(n, 0);
  std::vector<int64_t> keep;
  for (int64_t a = 0; a < n; ++a) {
    const int64_t i = order[a];
    if (removed[i]) continue;
    keep.push_back(i);
    for (int64_t b = a + 1; b < n; ++b) {
      const int64_t j = order[b];
      if (!removed[j] && suppresses(boxes, idxs, i, j, threshold)) removed[j] = 1;
    }
  }
  return keep;
}

std::vector<int64_t> masks_cpu(const std::vector<rle::View>& rles, const float* scores, const int64_t* idxs,
                               double threshold) {
  const int64_t n = static_cast<int64_t>(rles.size());
  const std::vector<int64_t> order = order_by_score(scores, n);
  std::vector<uint64_t> areas(n);
  for (int64_t i = 0; i < n; ++i) areas[i] = rle::area(rles[i]);
  std::vector<uint8_t> removed(n, 0);
  std::vector<int64_t> keep;
  for (int64_t a = 0; a < n; ++a) {
    const int64_t i = order[a];
    if (removed[i]) continue;
    keep.push_back(i);
    std::vector<int64_t> rest;
    for (int64_t b = a + 1; b < n; ++b) {
      const int64_t j = order[b];
      if (!removed[j] && (idxs == nullptr || idxs[i] == idxs[j])) rest.push_back(j);
    }
    parallel_for(static_cast<int64_t>(rest.size()), 64, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t j = rest[k];
        const uint64_t inter = rle::intersection(rles[i], rles[j]);
        const uint64_t uni = areas[i] + areas[j] - inter;
        const double iou = uni > 0 ? static_cast<double>(inter) / static_cast<double>(uni) : 0.0;
        if (iou > threshold) removed[j] = 1;
      }
    });
  }
  return keep;
}

}  // namespace nms
}  // namespace samantic
