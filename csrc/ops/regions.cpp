// Front of remove_small_regions: validate -> kernel (GIL released) -> numpy.
#include "ops/regions.h"

#include <cmath>
#include <vector>

#include "front.h"

namespace samantic {
namespace regions {

namespace py = pybind11;

namespace {

py::tuple remove_small_regions_py(const py::array& mask_in, double area_thresh, const std::string& mode) {
  SAMANTIC_CHECK(mode == "holes" || mode == "islands", "mode must be 'holes' or 'islands', got '", mode, "'");
  SAMANTIC_CHECK(std::isfinite(area_thresh), "area_thresh must be finite, got ", area_thresh);
  const bool is_bool = mask_in.dtype().is(py::dtype::of<bool>());
  SAMANTIC_CHECK(is_bool || mask_in.dtype().is(py::dtype::of<uint8_t>()), "mask must have dtype bool or uint8, got ",
                 front::dtype_str(mask_in));
  SAMANTIC_CHECK(mask_in.ndim() == 2, "mask must have 2 dimensions (H, W), got shape ", front::shape_str(mask_in));
  py::object as_u8 = is_bool ? mask_in.attr("view")("uint8") : py::object(mask_in);
  auto mask = py::array_t<uint8_t, py::array::c_style>::ensure(as_u8);
  const int64_t h = mask.shape(0), w = mask.shape(1);
  py::array_t<bool> out(std::vector<py::ssize_t>{h, w});
  bool changed;
  {
    py::gil_scoped_release release;
    changed = remove_small(mask.data(), h, w, area_thresh, mode == "holes",
                           reinterpret_cast<uint8_t*>(out.mutable_data()));
  }
  return py::make_tuple(out, changed);
}

}  // namespace

void register_ops(py::module_& m) {
  m.def("remove_small_regions", &remove_small_regions_py, py::arg("mask"), py::arg("area_thresh"), py::arg("mode"),
        "H x W bool/uint8 mask -> (bool mask, changed): segment-anything's remove_small_regions "
        "(8-connected regions of the holes or islands smaller than area_thresh pixels are flipped).");
}

}  // namespace regions
}  // namespace samantic
