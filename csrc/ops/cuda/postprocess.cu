// CUDA backend of the fused mask post-processing. Same per-element math as the
// CPU loop (ops/postprocess_utils.h), organised as three grid-stride kernels:
// classify blocks, count runs per column, write runs per column. The host
// turns the runs into RLE counts (variable-length output).
#include <numeric>
#include <vector>

#include "cuda_helpers.cuh"
#include "ops/postprocess.h"

namespace samantic {
namespace postprocess {
namespace {

struct CountSink {
  int32_t runs = 0;
  __host__ __device__ void on_run(int32_t, int32_t) { ++runs; }
};

struct WriteSink {
  int64_t* begins;
  int64_t* ends;
  int64_t base;
  int64_t k = 0;
  __host__ __device__ void on_run(int32_t b, int32_t e) {
    begins[k] = base + b;
    ends[k] = base + e;
    ++k;
  }
};

// One thread per (mask, column group): segments of that column group.
__global__ void classify_kernel(const float* logits, int64_t n, int64_t h_lr, int64_t w_lr, const Group* row_groups,
                                int64_t n_rg, const Group* col_groups, int64_t n_cg, Thresholds thr, Segment* segs,
                                int32_t* n_seg) {
  CUDA_1D_KERNEL_LOOP(i, n * n_cg) {
    const int64_t cg = i % n_cg;
    const int64_t m = i / n_cg;
    n_seg[i] = classify_column_group(logits + m * h_lr * w_lr, w_lr, row_groups, static_cast<int32_t>(n_rg),
                                     col_groups[cg], thr, segs + i * n_rg);
  }
}

__global__ void count_kernel(const float* logits, int64_t n, int64_t h_lr, int64_t w_lr, int64_t out_w,
                             const AxisTap* row_taps, const Group* row_groups, int64_t n_rg, const AxisTap* col_taps,
                             const int32_t* col_group_of, int64_t n_cg, Thresholds thr, const Segment* segs,
                             const int32_t* n_seg,
                             int32_t* run_counts, ColumnStats* stats) {
  CUDA_1D_KERNEL_LOOP(i, n * out_w) {
    const int64_t x = i % out_w;
    const int64_t m = i / out_w;
    CountSink sink;
    const int64_t mc = m * n_cg + col_group_of[x];
    stats[i] = scan_column(logits + m * h_lr * w_lr, w_lr, row_taps, row_groups, segs + mc * n_rg, n_seg[mc],
                           col_taps[x], thr, sink);
    run_counts[i] = sink.runs;
  }
}

__global__ void write_kernel(const float* logits, int64_t n, int64_t h_lr, int64_t w_lr, int64_t out_w,
                             const AxisTap* row_taps, const Group* row_groups, int64_t n_rg, const AxisTap* col_taps,
                             const int32_t* col_group_of, int64_t n_cg, Thresholds thr, const Segment* segs,
                             const int32_t* n_seg,
                             const int64_t* run_offsets, Placement place, int64_t* begins, int64_t* ends) {
  CUDA_1D_KERNEL_LOOP(i, n * out_w) {
    const int64_t x = i % out_w;
    const int64_t m = i / out_w;
    WriteSink sink{begins + run_offsets[i], ends + run_offsets[i], (place.offset_x + x) * place.canvas_h + place.offset_y};
    const int64_t mc = m * n_cg + col_group_of[x];
    scan_column(logits + m * h_lr * w_lr, w_lr, row_taps, row_groups, segs + mc * n_rg, n_seg[mc], col_taps[x], thr,
                sink);
  }
}

template <typename T>
void upload_vector(cuda::DeviceBuffer<T>& buf, const std::vector<T>& v, cudaStream_t s) {
  buf.upload(v.data(), v.size(), s);
}

}  // namespace

Output run_cuda(const float* logits, const Plan& p, int device) {
  using cuda::DeviceBuffer;
  cuda::check(cudaSetDevice(device), "cudaSetDevice");
  cuda::Stream stream;
  const int64_t n_rg = static_cast<int64_t>(p.row_groups.size());
  const int64_t n_cg = static_cast<int64_t>(p.col_groups.size());
  const int64_t n_cols = p.n * p.out_w;

  // step: upload logits and the plan
  DeviceBuffer<float> d_logits(p.n * p.h_lr * p.w_lr);
  d_logits.upload(logits, d_logits.count, stream.s);
  DeviceBuffer<AxisTap> d_row_taps(p.row_taps.size()), d_col_taps(p.col_taps.size());
  DeviceBuffer<Group> d_row_groups(p.row_groups.size()), d_col_groups(p.col_groups.size());
  DeviceBuffer<int32_t> d_col_group_of(p.col_group_of.size());
  upload_vector(d_row_taps, p.row_taps, stream.s);
  upload_vector(d_col_taps, p.col_taps, stream.s);
  upload_vector(d_row_groups, p.row_groups, stream.s);
  upload_vector(d_col_groups, p.col_groups, stream.s);
  upload_vector(d_col_group_of, p.col_group_of, stream.s);

  // step: classify blocks
  DeviceBuffer<Segment> d_segs(p.n * n_cg * n_rg);
  DeviceBuffer<int32_t> d_n_seg(p.n * n_cg);
  classify_kernel<<<cuda::blocks_for(d_n_seg.count), cuda::kThreadsPerBlock, 0, stream.s>>>(
      d_logits.ptr, p.n, p.h_lr, p.w_lr, d_row_groups.ptr, n_rg, d_col_groups.ptr, n_cg, p.thr, d_segs.ptr,
      d_n_seg.ptr);
  cuda::check_last_launch("classify_kernel");

  // step: count runs per column
  DeviceBuffer<int32_t> d_run_counts(n_cols);
  DeviceBuffer<ColumnStats> d_stats(n_cols);
  count_kernel<<<cuda::blocks_for(n_cols), cuda::kThreadsPerBlock, 0, stream.s>>>(
      d_logits.ptr, p.n, p.h_lr, p.w_lr, p.out_w, d_row_taps.ptr, d_row_groups.ptr, n_rg, d_col_taps.ptr,
      d_col_group_of.ptr, n_cg, p.thr, d_segs.ptr, d_n_seg.ptr, d_run_counts.ptr, d_stats.ptr);
  cuda::check_last_launch("count_kernel");
  std::vector<int32_t> run_counts(n_cols);
  std::vector<ColumnStats> stats(n_cols);
  d_run_counts.download(run_counts.data(), n_cols, stream.s);
  d_stats.download(stats.data(), n_cols, stream.s);
  stream.sync();

  // step: offsets of each column's runs, then write them
  std::vector<int64_t> run_offsets(n_cols + 1, 0);
  for (int64_t i = 0; i < n_cols; ++i) run_offsets[i + 1] = run_offsets[i] + run_counts[i];
  const int64_t n_runs = run_offsets[n_cols];
  DeviceBuffer<int64_t> d_run_offsets(n_cols + 1), d_begins(n_runs), d_ends(n_runs);
  upload_vector(d_run_offsets, run_offsets, stream.s);
  write_kernel<<<cuda::blocks_for(n_cols), cuda::kThreadsPerBlock, 0, stream.s>>>(
      d_logits.ptr, p.n, p.h_lr, p.w_lr, p.out_w, d_row_taps.ptr, d_row_groups.ptr, n_rg, d_col_taps.ptr,
      d_col_group_of.ptr, n_cg, p.thr, d_segs.ptr, d_n_seg.ptr, d_run_offsets.ptr, p.place, d_begins.ptr, d_ends.ptr);
  cuda::check_last_launch("write_kernel");
  std::vector<int64_t> begins(n_runs), ends(n_runs);
  d_begins.download(begins.data(), n_runs, stream.s);
  d_ends.download(ends.data(), n_runs, stream.s);
  stream.sync();

  // step: per-mask results and RLE counts (host, same code as the CPU path)
  const uint64_t total = static_cast<uint64_t>(p.place.canvas_h) * static_cast<uint64_t>(p.place.canvas_w);
  Output out;
  out.stability.resize(p.n);
  out.area.resize(p.n);
  out.boxes.resize(p.n * 4);
  out.offsets.assign(p.n + 1, 0);
  for (int64_t m = 0; m < p.n; ++m) {
    MaskStats ms;
    for (int64_t x = 0; x < p.out_w; ++x) ms.add_column(stats[m * p.out_w + x], x);
    out.stability[m] = ms.stability();
    out.area[m] = ms.n_mid;
    ms.box(out.boxes.data() + m * 4);
    const int64_t r0 = run_offsets[m * p.out_w], r1 = run_offsets[(m + 1) * p.out_w];
    runs_to_counts(begins.data() + r0, ends.data() + r0, r1 - r0, total, out.counts);
    out.offsets[m + 1] = static_cast<int64_t>(out.counts.size());
  }
  return out;
}

}  // namespace postprocess
}  // namespace samantic
