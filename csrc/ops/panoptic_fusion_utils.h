// Panoptic fusion, shared by the CPU loop (cpu/panoptic_fusion.cpp) and the
// CUDA kernels (cuda/panoptic_fusion.cu).
//
// Candidates are COCO RLEs of one size (column-major, zeros first, see
// ops/rle.h). In order of descending score (stable), each candidate counts its
// still-free pixels, is kept or dropped by `keeps`, and a kept one paints its
// free pixels with its label (index + 1). A dropped candidate paints nothing and
// the later ones see the map as it was, which is why one pass equals the
// restart-after-each-drop loop of samantic.pipeline.panoptic.panoptic_fusion.
//
// Both backends count on a column-major "taken" byte map (the RLE's pixel
// order: runs are contiguous there, so counting is a byte sum) and paint the
// [H, W] row-major label map directly; the host plan lists every candidate's
// runs of ones, so no per-candidate dense mask exists anywhere.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common.h"

namespace samantic {
namespace panoptic_fusion {

// The reference's drop rule for a candidate of `area` pixels of which `free`
// are still unpainted (min_area >= 0, validated by the front). The product is
// in double like numpy's `overlap_thresh * areas[i]`.
HOST_DEVICE_INLINE bool keeps(int64_t free, int64_t area, double overlap_thresh, int64_t min_area) {
  if (area <= min_area || free <= min_area) return false;
  return !(static_cast<double>(free) < overlap_thresh * static_cast<double>(area));
}

// Row-major index in an h x w map of the pixel at column-major (RLE order)
// index q.
HOST_DEVICE_INLINE int64_t row_major_index(int64_t q, int64_t h, int64_t w) {
  const int64_t x = q / h, y = q - x * h;
  return y * w + x;
}

// Pixel (column-major index) of a candidate's j-th foreground pixel, 0 <= j <
// area: the last run whose cumulative count of ones before it is <= j. `cum`
// is strictly increasing (runs are non-empty) and starts at 0.
HOST_DEVICE_INLINE int64_t foreground_pixel(const int64_t* begin, const int64_t* cum, int64_t n_runs, int64_t j) {
  int64_t lo = 0, hi = n_runs;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cum[mid] <= j) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return begin[lo] + (j - cum[lo]);
}

// Validated inputs, host memory: a CSR batch of n RLEs of masks h x w, one
// float64 score each.
struct Input {
  const uint32_t* counts;
  const int64_t* offsets;
  int64_t n;
  const double* scores;
  double overlap_thresh;
  int64_t min_area;
  int64_t h, w;
};

// What both backends need, made once on the host: the visiting order and
// every candidate's non-empty runs of ones (CSR over candidates).
struct Plan {
  int64_t n = 0, h = 0, w = 0;
  double overlap_thresh = 0.0;
  int64_t min_area = 0;
  std::vector<int64_t> order;        // candidates by descending score, ties by index
  std::vector<int64_t> area;         // [n] foreground pixels
  std::vector<int64_t> run_offsets;  // [n + 1] candidate k's runs are run_offsets[k] .. run_offsets[k + 1]
  std::vector<int64_t> run_begin;    // first pixel of each run (column-major index)
  std::vector<int64_t> run_end;      // one past its last pixel
  std::vector<int64_t> run_cum;      // the candidate's pixels in its earlier runs

  int64_t total() const { return h * w; }
  int64_t n_runs(int64_t k) const { return run_offsets[k + 1] - run_offsets[k]; }
};

inline Plan make_plan(const Input& in) {
  Plan p;
  p.n = in.n;
  p.h = in.h;
  p.w = in.w;
  p.overlap_thresh = in.overlap_thresh;
  p.min_area = in.min_area;
  // step: order as numpy's argsort(-scores, kind="stable") (scores are not NaN)
  p.order.resize(in.n);
  std::iota(p.order.begin(), p.order.end(), int64_t{0});
  std::stable_sort(p.order.begin(), p.order.end(),
                   [&](int64_t a, int64_t b) { return in.scores[a] > in.scores[b]; });
  // step: runs of ones; empty runs of a non-canonical RLE are skipped (the
  // counts sum to h * w, validated, so every run lies inside the map)
  p.area.assign(in.n, 0);
  p.run_offsets.assign(in.n + 1, 0);
  const int64_t half = in.offsets[in.n] / 2;
  p.run_begin.reserve(half);
  p.run_end.reserve(half);
  p.run_cum.reserve(half);
  for (int64_t k = 0; k < in.n; ++k) {
    int64_t pos = 0, area = 0;
    for (int64_t j = in.offsets[k]; j < in.offsets[k + 1]; ++j) {
      const int64_t len = in.counts[j];
      if ((j - in.offsets[k]) % 2 == 1 && len > 0) {
        p.run_begin.push_back(pos);
        p.run_end.push_back(pos + len);
        p.run_cum.push_back(area);
        area += len;
      }
      pos += len;
    }
    p.area[k] = area;
    p.run_offsets[k + 1] = static_cast<int64_t>(p.run_begin.size());
  }
  return p;
}

// Labels per pixel and kept flags.
struct Output {
  std::vector<int32_t> map;   // h x w, row-major: candidate index + 1, 0 where none
  std::vector<uint8_t> kept;  // [n] 0/1
};

}  // namespace panoptic_fusion
}  // namespace samantic
