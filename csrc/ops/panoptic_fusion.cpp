// Front of panoptic_fusion: validate -> empty fast path -> contiguous -> dispatch.
#include "ops/panoptic_fusion.h"

#include <cmath>
#include <limits>

#include "front.h"
#include "ops/rle_front.h"

namespace samantic {
namespace panoptic_fusion {

namespace py = pybind11;

namespace {

py::tuple panoptic_fusion_py(const py::array& counts_in, const py::array& offsets_in, int64_t h, int64_t w,
                             const py::array& scores_in, double overlap_thresh, int64_t min_area,
                             const std::string& device) {
  // step: validate the candidates (every RLE sums to h * w), scores and thresholds
  auto counts = rle::counts_arg(counts_in, "counts");
  auto offsets = rle::offsets_arg(offsets_in, "offsets");
  const int64_t n = static_cast<int64_t>(rle::views(counts, offsets, h, w, "rles").size());
  SAMANTIC_CHECK(static_cast<uint64_t>(h) * static_cast<uint64_t>(w) < (uint64_t{1} << 32), "mask size ", h, "x", w,
                 " has more pixels than a COCO RLE can count (2^32)");
  SAMANTIC_CHECK(n < std::numeric_limits<int32_t>::max(), "at most 2^31 - 2 candidates fit the int32 map, got ", n);
  auto scores = front::require<double>(scores_in, "scores", 1);
  SAMANTIC_CHECK(scores.shape(0) == n, "scores must have one entry per RLE (", n, "), got shape ",
                 front::shape_str(scores_in));
  const double* s = scores.data();
  for (int64_t i = 0; i < n; ++i) SAMANTIC_CHECK(!std::isnan(s[i]), "scores must not be NaN, got scores[", i, "]=nan");
  SAMANTIC_CHECK(overlap_thresh >= 0.0 && overlap_thresh <= 1.0, "overlap_thresh must be in [0, 1], got ",
                 overlap_thresh);
  SAMANTIC_CHECK(min_area >= 0, "min_area must be >= 0, got ", min_area);
  const int dev = front::parse_device(device);
  if (dev >= 0) front::require_cuda_compiled(device);

  // step: dispatch; no candidates or no pixels: an empty map, nothing kept
  const Input in{counts.data(), offsets.data(), n, s, overlap_thresh, min_area, h, w};
  Output out;
  if (n == 0 || h * w == 0) {
    out.map.assign(h * w, 0);
    out.kept.assign(n, 0);
  } else {
    py::gil_scoped_release release;
    const Plan plan = make_plan(in);
#ifdef SAMANTIC_WITH_CUDA
    out = dev >= 0 ? run_cuda(plan, dev) : run_cpu(plan);
#else
    out = run_cpu(plan);
#endif
  }

  py::array map = front::to_numpy(std::move(out.map)).reshape({h, w});
  py::array kept = front::to_numpy(std::move(out.kept)).attr("view")("bool");
  return py::make_tuple(map, kept);
}

}  // namespace

void register_ops(py::module_& m) {
  m.def("panoptic_fusion", &panoptic_fusion_py, py::arg("counts"), py::arg("offsets"), py::arg("h"), py::arg("w"),
        py::arg("scores"), py::arg("overlap_thresh"), py::arg("min_area"), py::arg("device") = "cpu",
        "Panoptic fusion of a CSR batch of candidate RLEs (masks h x w) by float64 scores: candidates by "
        "descending score (stable) paint their free pixels, unless fewer than overlap_thresh of their area or "
        "at most min_area pixels are free (or the area is at most min_area). Returns (map int32[h, w] of "
        "index + 1, 0 where none; kept bool[N]).");
}

}  // namespace panoptic_fusion
}  // namespace samantic
