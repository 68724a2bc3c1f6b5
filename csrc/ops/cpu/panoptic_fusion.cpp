// CPU backend of panoptic fusion: candidates in score order, each counting its
// taken pixels run by run (a byte sum over the column-major taken map, which
// vectorises) and, if kept, painting its free pixels column segment by column
// segment into the row-major label map.
#include <algorithm>
#include <vector>

#include "ops/panoptic_fusion.h"

namespace samantic {
namespace panoptic_fusion {

Output run_cpu(const Plan& p) {
  std::vector<uint8_t> taken(p.total(), 0);
  Output out;
  out.map.assign(p.total(), 0);
  out.kept.assign(p.n, 0);

  // step: candidates in sequence (each one's decision depends on the earlier ones)
  for (const int64_t k : p.order) {
    const int64_t area = p.area[k];
    if (area <= p.min_area) continue;
    const int64_t r0 = p.run_offsets[k], r1 = p.run_offsets[k + 1];
    int64_t n_taken = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* run = taken.data() + p.run_begin[r];
      const int64_t len = p.run_end[r] - p.run_begin[r];
      uint32_t c = 0;  // a run has fewer than 2^32 pixels; 32-bit lanes vectorise wider
      for (int64_t i = 0; i < len; ++i) c += run[i];
      n_taken += c;
    }
    if (!keeps(area - n_taken, area, p.overlap_thresh, p.min_area)) continue;
    out.kept[k] = 1;
    const int32_t label = static_cast<int32_t>(k + 1);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t q = p.run_begin[r];
      const int64_t e = p.run_end[r];
      while (q < e) {  // one column of the run at a time: rows are w apart in the map
        const int64_t column_end = std::min(e, (q / p.h + 1) * p.h);
        for (int64_t m = row_major_index(q, p.h, p.w); q < column_end; ++q, m += p.w) {
          if (!taken[q]) {
            taken[q] = 1;
            out.map[m] = label;
          }
        }
      }
    }
  }
  return out;
}

}  // namespace panoptic_fusion
}  // namespace samantic
