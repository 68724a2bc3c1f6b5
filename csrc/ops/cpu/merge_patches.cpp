// CPU backend of merge_patches: queries in parallel, one pass each (the
// counts go to a per-query vector, concatenated at the end).
#include <vector>

#include "ops/merge_patches.h"

namespace samantic {
namespace merge_patches {
namespace {

struct VectorWriter {
  std::vector<uint32_t>* dst;
  void push(uint32_t v) { dst->push_back(v); }
};

}  // namespace

Output run_cpu(const Input& in) {
  const int64_t q_n = in.n_queries;
  Output out;
  out.area.resize(q_n);
  out.boxes.resize(q_n * 4);
  std::vector<std::vector<uint32_t>> per_query(q_n);

  parallel_for(q_n, 1, [&](int64_t first, int64_t last) {
    std::vector<RunCursor> heap;
    for (int64_t q = first; q < last; ++q) {
      const int64_t k = in.indptr[q + 1] - in.indptr[q];
      if (static_cast<int64_t>(heap.size()) < k) heap.resize(k);
      VectorWriter writer{&per_query[q]};
      const QueryStats s = merge_query(in.counts, in.offsets, in.indices + in.indptr[q], k, in.h, in.total(),
                                       heap.data(), writer);
      out.area[q] = s.area;
      for (int c = 0; c < 4; ++c) out.boxes[q * 4 + c] = s.box[c];
    }
  });

  out.offsets.resize(q_n + 1);
  out.offsets[0] = 0;
  for (int64_t q = 0; q < q_n; ++q) out.offsets[q + 1] = out.offsets[q] + static_cast<int64_t>(per_query[q].size());
  out.counts.reserve(out.offsets[q_n]);
  for (auto& c : per_query) out.counts.insert(out.counts.end(), c.begin(), c.end());
  return out;
}

}  // namespace merge_patches
}  // namespace samantic
