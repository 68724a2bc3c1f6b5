// merge_patches: backend entry points (called by the validated front in
// ops/merge_patches.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "ops/merge_patches_utils.h"

namespace samantic {
namespace merge_patches {

// Validated inputs, host memory. Patches: a CSR batch of RLEs of masks h x w
// (n_patches + 1 offsets into counts). Queries: CSR groups, query q is the
// union of patches indices[indptr[q]:indptr[q + 1]].
struct Input {
  const uint32_t* counts;
  int64_t n_counts;
  const int64_t* offsets;
  int64_t n_patches;
  const int64_t* indptr;
  const int64_t* indices;
  int64_t n_queries;
  int64_t h, w;

  int64_t nnz() const { return indptr[n_queries]; }
  uint64_t total() const { return static_cast<uint64_t>(h) * static_cast<uint64_t>(w); }
};

// Per query: the union's RLE (CSR), area and XYXY box.
struct Output {
  std::vector<uint32_t> counts;
  std::vector<int64_t> offsets;
  std::vector<int64_t> area;
  std::vector<int64_t> boxes;  // n_queries x 4
};

Output run_cpu(const Input& in);
#ifdef SAMANTIC_WITH_CUDA
Output run_cuda(const Input& in, int device);
#endif

}  // namespace merge_patches
}  // namespace samantic
