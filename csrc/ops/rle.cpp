// Fronts of the RLE utilities (CSR counts/offsets in, numpy out). Also hosts
// mask NMS's front, which needs the same RLE validation.
#include "ops/rle.h"

#include <cmath>

#include "front.h"
#include "ops/nms.h"
#include "ops/rle_front.h"

namespace samantic {
namespace rle {

namespace py = pybind11;

namespace {

py::tuple batch_to_numpy(Batch&& b) {
  return py::make_tuple(front::to_numpy(std::move(b.counts)), front::to_numpy(std::move(b.offsets)));
}

py::tuple encode_py(const py::array& masks_in) {
  SAMANTIC_CHECK(masks_in.dtype().is(py::dtype::of<bool>()) || masks_in.dtype().is(py::dtype::of<uint8_t>()),
                 "masks must have dtype bool or uint8, got ", front::dtype_str(masks_in));
  SAMANTIC_CHECK(masks_in.ndim() == 3, "masks must have shape (N, H, W), got ", front::shape_str(masks_in));
  auto masks = py::array_t<uint8_t, py::array::c_style>::ensure(
      masks_in.dtype().is(py::dtype::of<bool>()) ? masks_in.attr("view")("uint8").cast<py::array>() : masks_in);
  const int64_t n = masks.shape(0), h = masks.shape(1), w = masks.shape(2);
  Batch b;
  {
    py::gil_scoped_release release;
    b = encode(masks.data(), n, h, w);
  }
  return batch_to_numpy(std::move(b));
}

py::array_t<uint8_t> decode_py(const py::array& counts_in, const py::array& offsets_in, int64_t h, int64_t w) {
  auto counts = counts_arg(counts_in, "counts");
  auto offsets = offsets_arg(offsets_in, "offsets");
  auto vs = views(counts, offsets, h, w, "rles");
  const int64_t n = static_cast<int64_t>(vs.size());
  py::array_t<uint8_t> out({n, h, w});
  {
    py::gil_scoped_release release;
    decode(counts.data(), offsets.data(), n, h, w, out.mutable_data());
  }
  return out;
}

py::array_t<int64_t> area_py(const py::array& counts_in, const py::array& offsets_in, int64_t h, int64_t w) {
  auto counts = counts_arg(counts_in, "counts");
  auto offsets = offsets_arg(offsets_in, "offsets");
  auto vs = views(counts, offsets, h, w, "rles");
  std::vector<int64_t> out(vs.size());
  for (size_t i = 0; i < vs.size(); ++i) out[i] = static_cast<int64_t>(area(vs[i]));
  return front::to_numpy(std::move(out));
}

py::array_t<double> bbox_py(const py::array& counts_in, const py::array& offsets_in, int64_t h, int64_t w) {
  auto counts = counts_arg(counts_in, "counts");
  auto offsets = offsets_arg(offsets_in, "offsets");
  auto vs = views(counts, offsets, h, w, "rles");
  const int64_t n = static_cast<int64_t>(vs.size());
  py::array_t<double> out({n, int64_t{4}});
  double* o = out.mutable_data();
  for (int64_t i = 0; i < n; ++i) bbox(vs[i], h, o + 4 * i);
  return out;
}

py::array_t<double> iou_py(const py::array& dt_counts, const py::array& dt_offsets, const py::array& gt_counts,
                           const py::array& gt_offsets, int64_t h, int64_t w, const py::array& iscrowd_in) {
  auto dc = counts_arg(dt_counts, "dt counts");
  auto dof = offsets_arg(dt_offsets, "dt offsets");
  auto gc = counts_arg(gt_counts, "gt counts");
  auto gof = offsets_arg(gt_offsets, "gt offsets");
  auto dv = views(dc, dof, h, w, "dt");
  auto gv = views(gc, gof, h, w, "gt");
  auto crowd = front::require<uint8_t>(iscrowd_in, "iscrowd", 1);
  SAMANTIC_CHECK(crowd.shape(0) == static_cast<py::ssize_t>(gv.size()), "iscrowd must have one entry per gt (",
                 gv.size(), "), got shape ", front::shape_str(iscrowd_in));
  const int64_t nd = static_cast<int64_t>(dv.size()), ng = static_cast<int64_t>(gv.size());
  py::array_t<double> out({nd, ng});
  double* o = out.mutable_data();
  const uint8_t* cr = crowd.data();
  {
    py::gil_scoped_release release;
    std::vector<uint64_t> da(nd), ga(ng);
    for (int64_t i = 0; i < nd; ++i) da[i] = area(dv[i]);
    for (int64_t j = 0; j < ng; ++j) ga[j] = area(gv[j]);
    parallel_for(nd, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        for (int64_t j = 0; j < ng; ++j) {
          const uint64_t inter = intersection(dv[i], gv[j]);
          const uint64_t uni = cr[j] ? da[i] : da[i] + ga[j] - inter;
          o[i * ng + j] = uni > 0 ? static_cast<double>(inter) / static_cast<double>(uni) : 0.0;
        }
      }
    });
  }
  return out;
}

py::array_t<uint32_t> merge_py(const py::array& counts_in, const py::array& offsets_in, int64_t h, int64_t w,
                               bool intersect) {
  auto counts = counts_arg(counts_in, "counts");
  auto offsets = offsets_arg(offsets_in, "offsets");
  auto vs = views(counts, offsets, h, w, "rles");
  SAMANTIC_CHECK(!vs.empty(), "merge needs at least one RLE, got none");
  return front::to_numpy(merge(vs, intersect));
}

py::list to_strings_py(const py::array& counts_in, const py::array& offsets_in) {
  auto counts = counts_arg(counts_in, "counts");
  auto offsets = offsets_arg(offsets_in, "offsets");
  const int64_t n = offsets.shape(0) - 1;
  const int64_t* off = offsets.data();
  SAMANTIC_CHECK(n >= 0 && off[0] == 0 && off[n] == counts.shape(0),
                 "offsets must start at 0 and end at len(counts)=", counts.shape(0));
  // all offsets first (as views() does): with a later decrease, an early one can point past the counts
  for (int64_t i = 0; i < n; ++i)
    SAMANTIC_CHECK(off[i + 1] >= off[i], "offsets must be non-decreasing, got ", off[i], " then ", off[i + 1]);
  py::list out;
  for (int64_t i = 0; i < n; ++i) out.append(py::bytes(to_string(View{counts.data() + off[i], off[i + 1] - off[i]})));
  return out;
}

py::array_t<uint32_t> from_string_py(const py::bytes& s) { return front::to_numpy(from_string(std::string(s))); }

}  // namespace

void register_ops(py::module_& m) {
  m.def("rle_encode", &encode_py, py::arg("masks"), "N x H x W bool/uint8 masks -> (counts, offsets).");
  m.def("rle_decode", &decode_py, py::arg("counts"), py::arg("offsets"), py::arg("h"), py::arg("w"));
  m.def("rle_area", &area_py, py::arg("counts"), py::arg("offsets"), py::arg("h"), py::arg("w"));
  m.def("rle_bbox", &bbox_py, py::arg("counts"), py::arg("offsets"), py::arg("h"), py::arg("w"));
  m.def("rle_iou", &iou_py, py::arg("dt_counts"), py::arg("dt_offsets"), py::arg("gt_counts"),
        py::arg("gt_offsets"), py::arg("h"), py::arg("w"), py::arg("iscrowd"));
  m.def("rle_merge", &merge_py, py::arg("counts"), py::arg("offsets"), py::arg("h"), py::arg("w"),
        py::arg("intersect") = false);
  m.def("rle_to_strings", &to_strings_py, py::arg("counts"), py::arg("offsets"));
  m.def("rle_from_string", &from_string_py, py::arg("s"));
}

}  // namespace rle

namespace nms {

pybind11::array_t<int64_t> nms_masks(const pybind11::array& counts_in, const pybind11::array& offsets_in, int64_t h,
                                     int64_t w, const pybind11::array& scores_in, double iou_threshold,
                                     const pybind11::object& idxs_obj) {
  namespace py = pybind11;
  auto counts = rle::counts_arg(counts_in, "counts");
  auto offsets = rle::offsets_arg(offsets_in, "offsets");
  auto vs = rle::views(counts, offsets, h, w, "rles");
  const int64_t n = static_cast<int64_t>(vs.size());
  auto scores = front::require<float>(scores_in, "scores", 1);
  SAMANTIC_CHECK(scores.shape(0) == n, "scores must have one entry per mask (", n, "), got shape ",
                 front::shape_str(scores_in));
  // as box NMS (ops/nms.cpp): a NaN threshold would silently keep every mask
  SAMANTIC_CHECK(!std::isnan(iou_threshold), "iou_threshold must be a number, got nan");
  py::array_t<int64_t, py::array::c_style> idxs_holder;
  const int64_t* idxs = front::optional_idxs(idxs_obj, n, idxs_holder);
  std::vector<int64_t> keep;
  {
    py::gil_scoped_release release;
    keep = masks_cpu(vs, scores.data(), idxs, iou_threshold);
  }
  return front::to_numpy(std::move(keep));
}

}  // namespace nms
}  // namespace samantic
