// CUDA backend of merge_patches: the per-query body of
// ops/merge_patches_utils.h, one thread per query, in two grid-stride passes
// (count the RLE lengths with area and box, then write the counts at their
// prefix-sum offsets). Each query's heap lives in a scratch buffer at its own
// CSR slice, so the body allocates nothing on the device.
#include <vector>

#include "cuda_helpers.cuh"
#include "ops/merge_patches.h"

namespace samantic {
namespace merge_patches {
namespace {

__global__ void count_kernel(const uint32_t* counts, const int64_t* offsets, const int64_t* indptr,
                             const int64_t* indices, int64_t n_queries, int64_t h, uint64_t total, RunCursor* scratch,
                             int64_t* n_counts, int64_t* area, int64_t* boxes) {
  CUDA_1D_KERNEL_LOOP(q, n_queries) {
    CountWriter writer;
    const int64_t a = indptr[q];
    const QueryStats s = merge_query(counts, offsets, indices + a, indptr[q + 1] - a, h, total, scratch + a, writer);
    n_counts[q] = s.n_counts;
    area[q] = s.area;
    for (int c = 0; c < 4; ++c) boxes[q * 4 + c] = s.box[c];
  }
}

__global__ void write_kernel(const uint32_t* counts, const int64_t* offsets, const int64_t* indptr,
                             const int64_t* indices, int64_t n_queries, int64_t h, uint64_t total, RunCursor* scratch,
                             const int64_t* out_offsets, uint32_t* out_counts) {
  CUDA_1D_KERNEL_LOOP(q, n_queries) {
    ArrayWriter writer{out_counts + out_offsets[q], 0};
    const int64_t a = indptr[q];
    merge_query(counts, offsets, indices + a, indptr[q + 1] - a, h, total, scratch + a, writer);
  }
}

}  // namespace

Output run_cuda(const Input& in, int device) {
  using cuda::DeviceBuffer;
  cuda::check(cudaSetDevice(device), "cudaSetDevice");
  cuda::Stream stream;
  const int64_t q_n = in.n_queries;
  const int64_t nnz = in.nnz();

  // step: upload the patches and the groups
  DeviceBuffer<uint32_t> d_counts(in.n_counts);
  DeviceBuffer<int64_t> d_offsets(in.n_patches + 1), d_indptr(q_n + 1), d_indices(nnz);
  d_counts.upload(in.counts, in.n_counts, stream.s);
  d_offsets.upload(in.offsets, in.n_patches + 1, stream.s);
  d_indptr.upload(in.indptr, q_n + 1, stream.s);
  d_indices.upload(in.indices, nnz, stream.s);
  DeviceBuffer<RunCursor> d_scratch(nnz);

  // step: RLE length, area and box per query
  DeviceBuffer<int64_t> d_n_counts(q_n), d_area(q_n), d_boxes(q_n * 4);
  count_kernel<<<cuda::blocks_for(q_n), cuda::kThreadsPerBlock, 0, stream.s>>>(
      d_counts.ptr, d_offsets.ptr, d_indptr.ptr, d_indices.ptr, q_n, in.h, in.total(), d_scratch.ptr, d_n_counts.ptr,
      d_area.ptr, d_boxes.ptr);
  cuda::check_last_launch("merge_patches count_kernel");
  Output out;
  std::vector<int64_t> n_counts(q_n);
  out.area.resize(q_n);
  out.boxes.resize(q_n * 4);
  d_n_counts.download(n_counts.data(), q_n, stream.s);
  d_area.download(out.area.data(), q_n, stream.s);
  d_boxes.download(out.boxes.data(), q_n * 4, stream.s);
  stream.sync();

  // step: offsets of each query's counts, then write them
  out.offsets.assign(q_n + 1, 0);
  for (int64_t q = 0; q < q_n; ++q) out.offsets[q + 1] = out.offsets[q] + n_counts[q];
  const int64_t m = out.offsets[q_n];
  DeviceBuffer<int64_t> d_out_offsets(q_n + 1);
  DeviceBuffer<uint32_t> d_out_counts(m);
  d_out_offsets.upload(out.offsets.data(), q_n + 1, stream.s);
  write_kernel<<<cuda::blocks_for(q_n), cuda::kThreadsPerBlock, 0, stream.s>>>(
      d_counts.ptr, d_offsets.ptr, d_indptr.ptr, d_indices.ptr, q_n, in.h, in.total(), d_scratch.ptr,
      d_out_offsets.ptr, d_out_counts.ptr);
  cuda::check_last_launch("merge_patches write_kernel");
  out.counts.resize(m);
  d_out_counts.download(out.counts.data(), m, stream.s);
  stream.sync();
  return out;
}

}  // namespace merge_patches
}  // namespace samantic
