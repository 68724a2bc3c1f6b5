// Per-pair math of box NMS, shared by the CPU loop and the CUDA kernel (built
// without FMA contraction on both, see CMakeLists.txt).
#pragma once

#include "common.h"

namespace samantic {
namespace nms {

// IoU of two XYXY boxes, torchvision's formula (area = (x2 - x1) * (y2 - y1),
// no +1); 0 / 0 gives NaN, which never suppresses.
HOST_DEVICE_INLINE float box_iou(const float* a, const float* b) {
  const float xx1 = a[0] > b[0] ? a[0] : b[0];
  const float yy1 = a[1] > b[1] ? a[1] : b[1];
  const float xx2 = a[2] < b[2] ? a[2] : b[2];
  const float yy2 = a[3] < b[3] ? a[3] : b[3];
  const float w = xx2 - xx1 > 0.f ? xx2 - xx1 : 0.f;
  const float h = yy2 - yy1 > 0.f ? yy2 - yy1 : 0.f;
  const float inter = w * h;
  const float area_a = (a[2] - a[0]) * (a[3] - a[1]);
  const float area_b = (b[2] - b[0]) * (b[3] - b[1]);
  return inter / (area_a + area_b - inter);
}

// Whether box j (lower score) is suppressed by box i: same category and IoU
// above the threshold. Like torchvision, the float IoU is compared with the
// threshold as a double (0.3 as a float would wrongly suppress an IoU of exactly 0.3).
HOST_DEVICE_INLINE bool suppresses(const float* boxes, const int64_t* idxs, int64_t i, int64_t j, double threshold) {
  if (idxs != nullptr && idxs[i] != idxs[j]) return false;
  return static_cast<double>(box_iou(boxes + 4 * i, boxes + 4 * j)) > threshold;
}

}  // namespace nms
}  // namespace samantic
