// COCO run-length encoding, pycocotools-compatible.
//
// A mask of height h and width w is read in column-major (Fortran) order; its
// RLE is the list of alternating run lengths starting with a run of zeros
// (which may be 0). Many RLEs are passed as one flat uint32 `counts` array plus
// int64 `offsets` (N + 1 entries, CSR style).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace samantic {
namespace rle {

struct Batch {
  std::vector<uint32_t> counts;
  std::vector<int64_t> offsets{0};

  int64_t size() const { return static_cast<int64_t>(offsets.size()) - 1; }
  void push(const std::vector<uint32_t>& c) {
    counts.insert(counts.end(), c.begin(), c.end());
    offsets.push_back(static_cast<int64_t>(counts.size()));
  }
};

// A read-only view of one RLE.
struct View {
  const uint32_t* cnts;
  int64_t m;
};

// masks: N x h x w uint8 (C order, nonzero = foreground).
Batch encode(const uint8_t* masks, int64_t n, int64_t h, int64_t w);
// out: N x h x w uint8.
void decode(const uint32_t* counts, const int64_t* offsets, int64_t n, int64_t h, int64_t w, uint8_t* out);
uint64_t area(View r);
// XYWH, pycocotools' toBbox convention (width = xmax - xmin + 1; empty -> zeros).
void bbox(View r, int64_t h, double* out4);
uint64_t intersection(View a, View b);
// Union (intersect=false) or intersection of several RLEs of the same size.
std::vector<uint32_t> merge(const std::vector<View>& rles, bool intersect);
// COCO compressed string (LEB128-like, deltas for i > 2) and back.
std::string to_string(View r);
std::vector<uint32_t> from_string(const std::string& s);
// Total number of pixels an RLE describes.
uint64_t total(View r);

}  // namespace rle
}  // namespace samantic
