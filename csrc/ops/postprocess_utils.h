// Per-element math of the fused mask post-processing, shared by the CPU loop
// (cpu/postprocess.cpp) and the CUDA kernels (cuda/postprocess.cu).
//
// segment-anything upsamples low-res logits L (h x w) twice with bilinear
// interpolation (align_corners=False): to img_size x img_size, crop to the
// resized input (input_h x input_w), then to the original H x W. Both stages
// are separable, so each output row y (column x) is a fixed convex combination
// of at most 4 consecutive low-res rows (columns): an AxisTap. The output value
// is sum_i sum_j ty.w[i] * tx.w[j] * L[ty.start + i, tx.start + j], computed on
// the fly (scan_column); no full-resolution float mask exists anywhere.
//
// Output rows with the same tap footprint form a row group (same for columns).
// For one (row group, column group) block, the min/max of the low-res cells in
// the footprint bound every output value in the block, so a block entirely
// above or below all three thresholds (t - offset, t, t + offset) is emitted
// as one run without evaluating a single pixel.
//
// Both backends must round every a * b + c twice (product, then sum): a fused
// multiply-add moves values at a threshold to its other side (exact ties,
// stability counts). CMakeLists.txt turns contraction off for both compilers
// (-ffp-contract=off, nvcc --fmad=false).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace samantic {
namespace postprocess {

constexpr int kMaxTaps = 4;  // a power of two: the row ring indexes with & (kMaxTaps - 1)
constexpr uint8_t kUnknown = 0xFF;
// Safety margin for block decisions: a convex combination computed in float32
// can differ from its exact value by a few ulps of the inputs.
constexpr float kBlockMargin = 1e-3f;

// min/max without libm's NaN handling (inputs are validated finite).
HOST_DEVICE_INLINE float min_f(float a, float b) { return a < b ? a : b; }
HOST_DEVICE_INLINE float max_f(float a, float b) { return a > b ? a : b; }

struct AxisTap {
  int32_t start;
  int32_t len;
  float w[kMaxTaps];
};

// A run of consecutive output indices sharing one tap footprint.
struct Group {
  int32_t begin;  // first output index
  int32_t end;    // one past the last
  int32_t start;  // first low-res index of the footprint
  int32_t len;    // footprint length
};

struct Thresholds {
  float lo;   // t - offset (stability union)
  float mid;  // t (the mask)
  float hi;   // t + offset (stability intersection)
  // The same three with the block-decision margin added (on) or subtracted
  // (off); ascending because offset >= 0.
  float on[3];
  float off[4];  // off[3] = +inf: nothing left to stay below once all three are cleared
};

inline Thresholds make_thresholds(float t, float offset) {
  Thresholds th{t - offset, t, t + offset, {0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, INFINITY}};
  const float ts[3] = {th.lo, th.mid, th.hi};
  for (int k = 0; k < 3; ++k) {
    const float m = kBlockMargin * (1.f + (ts[k] < 0.f ? -ts[k] : ts[k]));
    th.on[k] = ts[k] + m;
    th.off[k] = ts[k] - m;
  }
  return th;
}

// PyTorch's source index for bilinear, align_corners=False, computed in float
// like its CPU kernel: src = scale * (dst + 0.5) - 0.5, clamped at 0.
HOST_DEVICE_INLINE void linear_source(float scale, int64_t dst, int64_t in_size, int64_t* i0, int64_t* i1,
                                      float* l0, float* l1) {
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int64_t i = static_cast<int64_t>(floorf(src));
  if (i > in_size - 1) i = in_size - 1;
  float lambda = src - static_cast<float>(i);
  lambda = lambda < 0.f ? 0.f : (lambda > 1.f ? 1.f : lambda);
  *i0 = i;
  *i1 = i + ((i < in_size - 1) ? 1 : 0);
  *l1 = lambda;
  *l0 = 1.f - lambda;
}

// Classifies a block whose values lie in [lo, hi] against the three
// thresholds: returns how many thresholds every value exceeds (0..3), or
// kUnknown when some threshold may be crossed inside the block.
HOST_DEVICE_INLINE uint8_t classify_range(float lo, float hi, const Thresholds& t) {
  // thresholds ascend, so the ones `lo` clears form a prefix; the next one
  // must then lie above `hi`
  const int above = (lo > t.on[0]) + (lo > t.on[1]) + (lo > t.on[2]);
  return (hi <= t.off[above]) ? static_cast<uint8_t>(above) : kUnknown;
}

// A run of consecutive row groups with one block class within a column group.
struct Segment {
  int32_t rg_begin;
  int32_t rg_end;
  uint8_t code;  // 0..3 thresholds exceeded everywhere, or kUnknown
};

// Classifies every row group of one column group of one mask and merges
// consecutive row groups of equal class into segments. Row footprints move
// monotonically downwards and span at most kMaxTaps rows, so per-row min/max
// over the column footprint live in a ring of kMaxTaps entries. Returns the
// number of segments written to `segs` (at most n_rg).
HOST_DEVICE_INLINE int32_t classify_column_group(const float* logits, int64_t w_lr, const Group* row_groups,
                                                 int32_t n_rg, Group cg, Thresholds t, Segment* segs) {
  float ring_lo[kMaxTaps], ring_hi[kMaxTaps];
  int32_t next_row = 0;  // first row not yet in the ring
  int32_t n_seg = 0;
  for (int32_t g = 0; g < n_rg; ++g) {
    const Group rg = row_groups[g];
    if (next_row < rg.start) next_row = rg.start;
    for (; next_row < rg.start + rg.len; ++next_row) {
      const float* row = logits + static_cast<int64_t>(next_row) * w_lr + cg.start;
      float lo = row[0], hi = row[0];
      for (int32_t b = 1; b < cg.len; ++b) {
        lo = min_f(lo, row[b]);
        hi = max_f(hi, row[b]);
      }
      ring_lo[next_row & (kMaxTaps - 1)] = lo;
      ring_hi[next_row & (kMaxTaps - 1)] = hi;
    }
    float lo = ring_lo[rg.start & (kMaxTaps - 1)], hi = ring_hi[rg.start & (kMaxTaps - 1)];
    for (int32_t a = rg.start + 1; a < rg.start + rg.len; ++a) {
      lo = min_f(lo, ring_lo[a & (kMaxTaps - 1)]);
      hi = max_f(hi, ring_hi[a & (kMaxTaps - 1)]);
    }
    const uint8_t code = classify_range(lo, hi, t);
    if (n_seg > 0 && segs[n_seg - 1].code == code) {
      segs[n_seg - 1].rg_end = g + 1;
    } else {
      segs[n_seg++] = Segment{g, g + 1, code};
    }
  }
  return n_seg;
}

// Per-column statistics; reduced over columns to per-mask results.
struct ColumnStats {
  int64_t n_lo = 0;   // pixels > t - offset
  int64_t n_mid = 0;  // pixels > t (area)
  int64_t n_hi = 0;   // pixels > t + offset
  int32_t y_min = 0x7fffffff;
  int32_t y_max = -1;
};

// Accounts rows [y0, y1) of a column that lie on one side of every threshold
// (`code` thresholds exceeded), extending or closing the current run.
template <typename Sink>
HOST_DEVICE_INLINE void emit_uniform(int32_t y0, int32_t y1, uint8_t code, ColumnStats& s, int32_t& run_begin,
                                     Sink& sink) {
  const int64_t len = y1 - y0;
  if (code >= 1) s.n_lo += len;
  if (code >= 3) s.n_hi += len;
  if (code >= 2) {
    s.n_mid += len;
    if (run_begin < 0) run_begin = y0;
    if (y0 < s.y_min) s.y_min = y0;
    s.y_max = y1 - 1;
  } else if (run_begin >= 0) {
    sink.on_run(run_begin, y0);
    run_begin = -1;
  }
}

// Scans one output column top to bottom over the segments of its column
// group. Calls sink.on_run(y_begin, y_end) for every maximal run of mask
// pixels (> t) in the column, in order.
template <typename Sink>
HOST_DEVICE_INLINE ColumnStats scan_column(const float* logits, int64_t w_lr, const AxisTap* row_taps,
                                           const Group* row_groups, const Segment* segs, int32_t n_seg,
                                           const AxisTap& tx, Thresholds t, Sink& sink) {
  ColumnStats s;
  int32_t run_begin = -1;
  for (int32_t k = 0; k < n_seg; ++k) {
    const Segment seg = segs[k];
    if (seg.code != kUnknown) {
      // step: a whole segment on one side of every threshold
      emit_uniform(row_groups[seg.rg_begin].begin, row_groups[seg.rg_end - 1].end, seg.code, s, run_begin, sink);
      continue;
    }
    for (int32_t g = seg.rg_begin; g < seg.rg_end; ++g) {
      // step: rows of one group share their footprint: combine its columns once;
      // every row of the group is a convex combination of these values
      const Group rg = row_groups[g];
      float c[kMaxTaps];
      float c_lo = 0.f, c_hi = 0.f;
      for (int32_t i = 0; i < rg.len; ++i) {
        const float* row = logits + static_cast<int64_t>(rg.start + i) * w_lr + tx.start;
        float r = 0.f, lo = row[0], hi = row[0];
        for (int32_t j = 0; j < tx.len; ++j) {
          r += tx.w[j] * row[j];
          lo = min_f(lo, row[j]);
          hi = max_f(hi, row[j]);
        }
        // a convex combination lies between its inputs; rounding must not push
        // it out (a plateau at a threshold must stay exactly at it)
        c[i] = min_f(max_f(r, lo), hi);
        c_lo = i ? min_f(c_lo, c[i]) : c[i];
        c_hi = i ? max_f(c_hi, c[i]) : c[i];
      }
      // short groups are cheaper to evaluate than to classify first
      if (rg.end - rg.begin > kMaxTaps) {
        const uint8_t code = classify_range(c_lo, c_hi, t);
        if (code != kUnknown) {
          emit_uniform(rg.begin, rg.end, code, s, run_begin, sink);
          continue;
        }
      }
      // step: rows that may cross a threshold, one by one
      for (int32_t y = rg.begin; y < rg.end; ++y) {
        const AxisTap& ty = row_taps[y];
        float v = 0.f;
        for (int32_t i = 0; i < rg.len; ++i) v += ty.w[i] * c[i];
        v = min_f(max_f(v, c_lo), c_hi);
        // branch-free counting; only a change of the mask value branches
        s.n_lo += (v > t.lo);
        s.n_hi += (v > t.hi);
        const bool on = v > t.mid;
        s.n_mid += on;
        s.y_max = on ? y : s.y_max;
        if (on != (run_begin >= 0)) {
          if (on) {
            run_begin = y;
            if (y < s.y_min) s.y_min = y;
          } else {
            sink.on_run(run_begin, y);
            run_begin = -1;
          }
        }
      }
    }
  }
  if (run_begin >= 0) sink.on_run(run_begin, row_groups[segs[n_seg - 1].rg_end - 1].end);
  return s;
}

// ---- host-side planning and assembly, shared by both backends ----

// The taps of one axis of the two-stage resize: low-res (lr) -> padded model
// input (img) -> crop to `valid` -> output (out).
inline std::vector<AxisTap> plan_axis(int64_t lr, int64_t img, int64_t valid, int64_t out) {
  std::vector<AxisTap> taps(out);
  const float scale2 = static_cast<float>(valid) / static_cast<float>(out);
  const float scale1 = static_cast<float>(lr) / static_cast<float>(img);
  for (int64_t o = 0; o < out; ++o) {
    int64_t m0, m1;
    float u0, u1;
    linear_source(scale2, o, valid, &m0, &m1, &u0, &u1);
    const int64_t mids[2] = {m0, m1};
    const float mw[2] = {u0, u1};
    int64_t idx[4];
    float wts[4];
    for (int k = 0; k < 2; ++k) {
      int64_t a0, a1;
      float v0, v1;
      linear_source(scale1, mids[k], lr, &a0, &a1, &v0, &v1);
      idx[2 * k] = a0;
      wts[2 * k] = mw[k] * v0;
      idx[2 * k + 1] = a1;
      wts[2 * k + 1] = mw[k] * v1;
    }
    // footprint of the taps with non-zero weight (an exact stage-2 copy has a 0 weight)
    int64_t lo = -1, hi = -1;
    for (int k = 0; k < 4; ++k) {
      if (wts[k] == 0.f) continue;
      lo = (lo < 0) ? idx[k] : std::min(lo, idx[k]);
      hi = (hi < 0) ? idx[k] : std::max(hi, idx[k]);
    }
    SAMANTIC_CHECK(hi - lo < kMaxTaps, "internal: resize footprint wider than ", kMaxTaps, " taps");
    AxisTap tap{};
    tap.start = static_cast<int32_t>(lo);
    tap.len = static_cast<int32_t>(hi - lo + 1);
    for (int k = 0; k < 4; ++k)
      if (wts[k] != 0.f) tap.w[idx[k] - lo] += wts[k];
    taps[o] = tap;
  }
  return taps;
}

inline std::vector<Group> group_axis(const std::vector<AxisTap>& taps) {
  std::vector<Group> groups;
  for (int32_t o = 0; o < static_cast<int32_t>(taps.size()); ++o) {
    if (!groups.empty() && groups.back().start == taps[o].start && groups.back().len == taps[o].len) {
      groups.back().end = o + 1;
    } else {
      groups.push_back(Group{o, o + 1, taps[o].start, taps[o].len});
    }
  }
  return groups;
}

// Where one (possibly cropped) mask lands in the canvas its RLE describes.
struct Placement {
  int64_t canvas_h, canvas_w;
  int64_t offset_x, offset_y;
};

// Appends the RLE counts (column-major, zeros first) of a mask given as its
// sorted, non-overlapping runs of ones [begin, end) in canvas pixel order.
inline void runs_to_counts(const int64_t* begins, const int64_t* ends, int64_t n_runs, uint64_t total,
                           std::vector<uint32_t>& counts) {
  uint64_t prev = 0;
  int64_t i = 0;
  while (i < n_runs) {
    const uint64_t b = static_cast<uint64_t>(begins[i]);
    uint64_t e = static_cast<uint64_t>(ends[i]);
    // runs that touch (end of one column meets the start of the next) merge
    while (i + 1 < n_runs && static_cast<uint64_t>(begins[i + 1]) == e) e = static_cast<uint64_t>(ends[++i]);
    counts.push_back(static_cast<uint32_t>(b - prev));
    counts.push_back(static_cast<uint32_t>(e - b));
    prev = e;
    ++i;
  }
  if (prev < total || counts.empty()) counts.push_back(static_cast<uint32_t>(total - prev));
}

struct MaskStats {
  int64_t n_lo = 0, n_mid = 0, n_hi = 0;
  int64_t x_min = -1, x_max = -1, y_min = -1, y_max = -1;

  void add_column(const ColumnStats& c, int64_t x) {
    n_lo += c.n_lo;
    n_mid += c.n_mid;
    n_hi += c.n_hi;
    if (c.y_max >= 0) {
      if (x_min < 0) x_min = x;
      x_max = x;
      y_min = (y_min < 0) ? c.y_min : std::min<int64_t>(y_min, c.y_min);
      y_max = std::max<int64_t>(y_max, c.y_max);
    }
  }
  // segment-anything's calculate_stability_score: an int32 ratio in float32;
  // 0 / 0 gives NaN like torch does.
  float stability() const { return static_cast<float>(n_hi) / static_cast<float>(n_lo); }
  // XYXY with inclusive max, zeros for an empty mask (batched_mask_to_box).
  void box(int64_t* out4) const {
    if (x_max < 0) {
      out4[0] = out4[1] = out4[2] = out4[3] = 0;
      return;
    }
    out4[0] = x_min;
    out4[1] = y_min;
    out4[2] = x_max;
    out4[3] = y_max;
  }
};

// Everything one call needs, planned once on the host.
struct Plan {
  int64_t n, h_lr, w_lr, out_h, out_w;
  Thresholds thr;
  Placement place;
  std::vector<AxisTap> row_taps, col_taps;
  std::vector<Group> row_groups, col_groups;
  std::vector<int32_t> col_group_of;  // column -> its group
};

inline Plan make_plan(int64_t n, int64_t h_lr, int64_t w_lr, int64_t img_size, int64_t input_h, int64_t input_w,
                      int64_t out_h, int64_t out_w, float mask_threshold, float stability_offset, Placement place) {
  Plan p;
  p.n = n;
  p.h_lr = h_lr;
  p.w_lr = w_lr;
  p.out_h = out_h;
  p.out_w = out_w;
  p.thr = make_thresholds(mask_threshold, stability_offset);
  p.place = place;
  p.row_taps = plan_axis(h_lr, img_size, input_h, out_h);
  p.col_taps = plan_axis(w_lr, img_size, input_w, out_w);
  p.row_groups = group_axis(p.row_taps);
  p.col_groups = group_axis(p.col_taps);
  p.col_group_of.resize(out_w);
  for (int32_t g = 0; g < static_cast<int32_t>(p.col_groups.size()); ++g)
    for (int32_t x = p.col_groups[g].begin; x < p.col_groups[g].end; ++x) p.col_group_of[x] = g;
  return p;
}

// Results of one call: per mask stability, area, box; RLEs as CSR.
struct Output {
  std::vector<float> stability;
  std::vector<int64_t> area;
  std::vector<int64_t> boxes;  // N x 4
  std::vector<uint32_t> counts;
  std::vector<int64_t> offsets;
};

}  // namespace postprocess
}  // namespace samantic
