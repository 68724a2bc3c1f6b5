// CPU implementation of ops/regions.h: one raster pass of union-find labelling
// (8-connectivity), then per-region sizes and the region's first 2x2 block in
// block-raster order (OpenCV's label order), then one pass writing the result.
#include "ops/regions.h"

#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace samantic {
namespace regions {

namespace {

int32_t find(std::vector<int32_t>& parent, int32_t a) {
  while (parent[a] != a) {
    parent[a] = parent[parent[a]];
    a = parent[a];
  }
  return a;
}

void unite(std::vector<int32_t>& parent, int32_t a, int32_t b) {
  a = find(parent, a);
  b = find(parent, b);
  if (a == b) return;
  if (a < b) parent[b] = a;
  else parent[a] = b;
}

}  // namespace

bool remove_small(const uint8_t* mask, int64_t h, int64_t w, double area_thresh, bool holes, uint8_t* out) {
  const int64_t n = h * w;
  SAMANTIC_CHECK(n < std::numeric_limits<int32_t>::max(), "mask of ", h, "x", w, " pixels is too large");
  std::vector<int32_t> label(n, -1);
  std::vector<int32_t> parent;
  auto in_set = [&](int64_t i) { return (mask[i] != 0) != holes; };
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x = 0; x < w; ++x) {
      const int64_t i = y * w + x;
      if (!in_set(i)) continue;
      int32_t l = -1;
      // already-visited 8-neighbours: left, up-left, up, up-right
      const int64_t nb[4] = {x > 0 ? i - 1 : -1, (y > 0 && x > 0) ? i - w - 1 : -1, y > 0 ? i - w : -1,
                             (y > 0 && x + 1 < w) ? i - w + 1 : -1};
      for (int64_t j : nb) {
        if (j < 0 || label[j] < 0) continue;
        if (l < 0) l = label[j];
        else unite(parent, l, label[j]);
      }
      if (l < 0) {
        l = static_cast<int32_t>(parent.size());
        parent.push_back(l);
      }
      label[i] = l;
    }
  }
  const int64_t m = static_cast<int64_t>(parent.size());
  std::vector<int64_t> size(m, 0);
  std::vector<int64_t> first_block(m, std::numeric_limits<int64_t>::max());
  const int64_t blocks_per_row = (w + 1) / 2;
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x = 0; x < w; ++x) {
      const int64_t i = y * w + x;
      if (label[i] < 0) continue;
      const int32_t r = find(parent, label[i]);
      label[i] = r;
      ++size[r];
      const int64_t b = (y / 2) * blocks_per_row + x / 2;
      if (b < first_block[r]) first_block[r] = b;
    }
  }
  // keep[r]: 1 if root r's pixels end up foreground
  std::vector<uint8_t> keep(m, 0);
  bool any_small = false, any_large = false;
  int32_t largest = -1;
  for (int32_t r = 0; r < m; ++r) {
    if (parent[r] != r) continue;
    const bool small = static_cast<double>(size[r]) < area_thresh;
    any_small |= small;
    any_large |= !small;
    // holes: small background regions become foreground; islands: large foreground regions stay
    keep[r] = holes ? small : !small;
    if (largest < 0 || size[r] > size[largest] ||
        (size[r] == size[largest] && first_block[r] < first_block[largest]))
      largest = r;
  }
  if (!any_small) {
    for (int64_t i = 0; i < n; ++i) out[i] = mask[i] != 0;
    return false;
  }
  if (!holes && !any_large) keep[largest] = 1;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t r = label[i];
    out[i] = holes ? (r < 0 || keep[r]) : (r >= 0 && keep[r]);
  }
  return true;
}

}  // namespace regions
}  // namespace samantic
