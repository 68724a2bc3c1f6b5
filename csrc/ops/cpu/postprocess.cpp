// CPU backend of the fused mask post-processing: masks in parallel, each
// scanned column by column (column-major, the order COCO RLE needs).
#include <vector>

#include "ops/postprocess.h"

namespace samantic {
namespace postprocess {
namespace {

// Collects runs of ones as canvas pixel indices.
struct RunSink {
  std::vector<int64_t>* begins;
  std::vector<int64_t>* ends;
  int64_t base;  // canvas index of this column's first output row
  void on_run(int32_t b, int32_t e) {
    begins->push_back(base + b);
    ends->push_back(base + e);
  }
};

}  // namespace

Output run_cpu(const float* logits, const Plan& p) {
  const int64_t n_rg = static_cast<int64_t>(p.row_groups.size());
  const int64_t n_cg = static_cast<int64_t>(p.col_groups.size());
  const uint64_t total = static_cast<uint64_t>(p.place.canvas_h) * static_cast<uint64_t>(p.place.canvas_w);

  Output out;
  out.stability.resize(p.n);
  out.area.resize(p.n);
  out.boxes.resize(p.n * 4);
  std::vector<std::vector<uint32_t>> per_mask(p.n);

  parallel_for(p.n, 1, [&](int64_t first, int64_t last) {
    std::vector<Segment> segs(static_cast<size_t>(n_rg * n_cg));
    std::vector<int32_t> n_seg(static_cast<size_t>(n_cg));
    std::vector<int64_t> begins, ends;
    for (int64_t m = first; m < last; ++m) {
      const float* L = logits + m * p.h_lr * p.w_lr;
      // step: classify every (column group, row group) block once
      for (int64_t cg = 0; cg < n_cg; ++cg)
        n_seg[cg] = classify_column_group(L, p.w_lr, p.row_groups.data(), static_cast<int32_t>(n_rg),
                                          p.col_groups[cg], p.thr, segs.data() + cg * n_rg);
      // step: scan columns, emitting runs and counting
      begins.clear();
      ends.clear();
      MaskStats stats;
      for (int64_t x = 0; x < p.out_w; ++x) {
        RunSink sink{&begins, &ends, (p.place.offset_x + x) * p.place.canvas_h + p.place.offset_y};
        const int64_t cg = p.col_group_of[x];
        ColumnStats cs = scan_column(L, p.w_lr, p.row_taps.data(), p.row_groups.data(), segs.data() + cg * n_rg,
                                     n_seg[cg], p.col_taps[x], p.thr, sink);
        stats.add_column(cs, x);
      }
      // step: per-mask results
      out.stability[m] = stats.stability();
      out.area[m] = stats.n_mid;
      stats.box(out.boxes.data() + m * 4);
      runs_to_counts(begins.data(), ends.data(), static_cast<int64_t>(begins.size()), total, per_mask[m]);
    }
  });

  out.offsets.resize(p.n + 1);
  out.offsets[0] = 0;
  for (int64_t m = 0; m < p.n; ++m) out.offsets[m + 1] = out.offsets[m] + static_cast<int64_t>(per_mask[m].size());
  out.counts.reserve(out.offsets[p.n]);
  for (auto& c : per_mask) out.counts.insert(out.counts.end(), c.begin(), c.end());
  return out;
}

}  // namespace postprocess
}  // namespace samantic
