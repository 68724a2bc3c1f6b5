// CUDA backend of panoptic fusion: candidates in sequence, pixels in parallel.
// Per candidate (score order) two grid-stride kernels over its foreground
// pixels, j -> pixel by a binary search in its runs (foreground_pixel): one
// counts the taken ones into the candidate's slot, the next reads that count,
// decides with the same `keeps` as the CPU and, if kept, paints its free pixels
// into the row-major map. Both are only queued: the stream orders them, and the
// host waits once, for the map.
#include <vector>

#include "cuda_helpers.cuh"
#include "ops/panoptic_fusion.h"

namespace samantic {
namespace panoptic_fusion {
namespace {

__global__ void count_kernel(const uint8_t* taken, const int64_t* begin, const int64_t* cum, int64_t n_runs,
                             int64_t area, unsigned long long* n_taken) {
  unsigned long long c = 0;
  CUDA_1D_KERNEL_LOOP(j, area) c += taken[foreground_pixel(begin, cum, n_runs, j)];
  // every thread of a warp reaches this (blockDim is a multiple of 32): one atomic per warp
  for (int offset = 16; offset > 0; offset >>= 1) c += __shfl_down_sync(0xffffffffu, c, offset);
  if ((threadIdx.x & 31) == 0 && c > 0) atomicAdd(n_taken, c);
}

__global__ void paint_kernel(uint8_t* taken, int32_t* map, int64_t h, int64_t w, const int64_t* begin,
                             const int64_t* cum, int64_t n_runs, int64_t area, const unsigned long long* n_taken,
                             double overlap_thresh, int64_t min_area, int32_t label, uint8_t* kept) {
  if (!keeps(area - static_cast<int64_t>(*n_taken), area, overlap_thresh, min_area)) return;
  if (blockIdx.x == 0 && threadIdx.x == 0) *kept = 1;
  CUDA_1D_KERNEL_LOOP(j, area) {
    const int64_t q = foreground_pixel(begin, cum, n_runs, j);
    if (!taken[q]) {  // a candidate's pixels are distinct: no race
      taken[q] = 1;
      map[row_major_index(q, h, w)] = label;
    }
  }
}

}  // namespace

Output run_cuda(const Plan& p, int device) {
  using cuda::DeviceBuffer;
  cuda::check(cudaSetDevice(device), "cudaSetDevice");
  cuda::Stream stream;
  const int64_t n = p.n, total = p.total();
  const int64_t n_runs = p.run_offsets[n];

  // step: upload the runs; zero the taken and label maps, the taken counts and the kept flags
  DeviceBuffer<int64_t> d_begin(n_runs), d_cum(n_runs);
  d_begin.upload(p.run_begin.data(), n_runs, stream.s);
  d_cum.upload(p.run_cum.data(), n_runs, stream.s);
  DeviceBuffer<uint8_t> d_taken(total), d_kept(n);
  DeviceBuffer<int32_t> d_map(total);
  DeviceBuffer<unsigned long long> d_n_taken(n);
  d_taken.zero(stream.s);
  d_map.zero(stream.s);
  d_n_taken.zero(stream.s);
  d_kept.zero(stream.s);

  // step: candidates in score order (too small ones are dropped here, as in `keeps`)
  for (const int64_t k : p.order) {
    const int64_t area = p.area[k];
    if (area <= p.min_area) continue;
    const int64_t* begin = d_begin.ptr + p.run_offsets[k];
    const int64_t* cum = d_cum.ptr + p.run_offsets[k];
    const int blocks = cuda::blocks_for(area);
    count_kernel<<<blocks, cuda::kThreadsPerBlock, 0, stream.s>>>(d_taken.ptr, begin, cum, p.n_runs(k), area,
                                                                  d_n_taken.ptr + k);
    cuda::check_last_launch("panoptic_fusion count_kernel");
    paint_kernel<<<blocks, cuda::kThreadsPerBlock, 0, stream.s>>>(
        d_taken.ptr, d_map.ptr, p.h, p.w, begin, cum, p.n_runs(k), area, d_n_taken.ptr + k, p.overlap_thresh,
        p.min_area, static_cast<int32_t>(k + 1), d_kept.ptr + k);
    cuda::check_last_launch("panoptic_fusion paint_kernel");
  }

  // step: download
  Output out;
  out.map.resize(total);
  out.kept.resize(n);
  d_map.download(out.map.data(), total, stream.s);
  d_kept.download(out.kept.data(), n, stream.s);
  stream.sync();
  return out;
}

}  // namespace panoptic_fusion
}  // namespace samantic
