// Validation of CSR RLE batches for the pybind11 fronts (rle.cpp,
// merge_patches.cpp): every check prints the bad value.
#pragma once

#include <limits>
#include <vector>

#include "front.h"
#include "ops/rle.h"

namespace samantic {
namespace rle {

namespace py = pybind11;

using Counts = py::array_t<uint32_t, py::array::c_style>;
using Offsets = py::array_t<int64_t, py::array::c_style>;

// Validates a CSR batch of RLEs of size h x w and returns views into it.
inline std::vector<View> views(const Counts& counts, const Offsets& offsets, int64_t h, int64_t w, const char* name) {
  SAMANTIC_CHECK(h >= 0 && w >= 0, name, ": mask size must be non-negative, got (", h, ", ", w, ")");
  // h * w must not wrap: 2^32 x 2^32 would otherwise be a mask of 0 pixels
  SAMANTIC_CHECK(w == 0 || h <= std::numeric_limits<int64_t>::max() / w, name, ": mask size ", h, "x", w,
                 " has more pixels than fit in 64 bits");
  SAMANTIC_CHECK(offsets.shape(0) >= 1, name, ": offsets must have N + 1 entries, got shape ",
                 front::shape_str(offsets));
  const int64_t n = offsets.shape(0) - 1;
  const int64_t* off = offsets.data();
  const int64_t m = counts.shape(0);
  SAMANTIC_CHECK(off[0] == 0 && off[n] == m, name, ": offsets must start at 0 and end at len(counts)=", m, ", got ",
                 off[0], " .. ", off[n]);
  // all offsets first: with a later decrease, an early one can point past the counts
  for (int64_t i = 0; i < n; ++i)
    SAMANTIC_CHECK(off[i + 1] >= off[i], name, ": offsets must be non-decreasing, got ", off[i], " then ", off[i + 1]);
  const uint64_t hw = static_cast<uint64_t>(h) * static_cast<uint64_t>(w);
  std::vector<View> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    View v{counts.data() + off[i], off[i + 1] - off[i]};
    const uint64_t t = total(v);
    SAMANTIC_CHECK(t == hw, name, "[", i, "]: run lengths sum to ", t, " but the mask size ", h, "x", w, " has ", hw,
                   " pixels");
    out.push_back(v);
  }
  return out;
}

inline Counts counts_arg(const py::array& a, const char* name) { return front::require<uint32_t>(a, name, 1); }
inline Offsets offsets_arg(const py::array& a, const char* name) { return front::require<int64_t>(a, name, 1); }

}  // namespace rle
}  // namespace samantic
