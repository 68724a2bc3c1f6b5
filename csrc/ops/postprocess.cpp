// Front of postprocess_masks: validate -> empty fast path -> contiguous -> dispatch.
#include "ops/postprocess.h"

#include <cmath>

#include "front.h"

namespace samantic {
namespace postprocess {

namespace py = pybind11;

py::dict postprocess_masks(const py::array& logits_in, int64_t img_size, int64_t input_h, int64_t input_w,
                           int64_t out_h, int64_t out_w, double mask_threshold, double stability_offset,
                           int64_t canvas_h, int64_t canvas_w, int64_t offset_x, int64_t offset_y,
                           const std::string& device) {
  // step: validate
  auto logits = front::require<float>(logits_in, "logits", 3);
  const int64_t n = logits.shape(0), h_lr = logits.shape(1), w_lr = logits.shape(2);
  SAMANTIC_CHECK(h_lr > 0 && w_lr > 0, "logits must have non-empty spatial dimensions, got shape ",
                 front::shape_str(logits_in));
  SAMANTIC_CHECK(img_size >= h_lr && img_size >= w_lr, "img_size must be at least the low-res mask size ", h_lr, "x",
                 w_lr, ", got ", img_size);
  SAMANTIC_CHECK(input_h > 0 && input_h <= img_size && input_w > 0 && input_w <= img_size,
                 "input_size must lie in [1, img_size=", img_size, "], got (", input_h, ", ", input_w, ")");
  SAMANTIC_CHECK(out_h > 0 && out_w > 0, "original_size must be positive, got (", out_h, ", ", out_w, ")");
  SAMANTIC_CHECK(out_h < (int64_t{1} << 31) && out_w < (int64_t{1} << 31), "original_size too large: (", out_h, ", ",
                 out_w, ")");
  SAMANTIC_CHECK(std::isfinite(mask_threshold), "mask_threshold must be finite, got ", mask_threshold);
  SAMANTIC_CHECK(std::isfinite(stability_offset) && stability_offset >= 0, "stability_offset must be >= 0, got ",
                 stability_offset);
  // out_w <= canvas_w first: then canvas_w - out_w cannot overflow (offset + out_w could: 2^63 - 1 + 1)
  SAMANTIC_CHECK(offset_x >= 0 && offset_y >= 0 && out_w <= canvas_w && out_h <= canvas_h &&
                     offset_x <= canvas_w - out_w && offset_y <= canvas_h - out_h,
                 "the mask (", out_h, "x", out_w, " at x=", offset_x, ", y=", offset_y,
                 ") must lie inside the canvas ", canvas_h, "x", canvas_w);
  SAMANTIC_CHECK(static_cast<uint64_t>(canvas_h) * static_cast<uint64_t>(canvas_w) < (uint64_t{1} << 32),
                 "canvas ", canvas_h, "x", canvas_w, " has more pixels than a COCO RLE can count (2^32)");
  const int dev = front::parse_device(device);
  if (dev >= 0) front::require_cuda_compiled(device);
  const float* data = logits.data();
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < n * h_lr * w_lr; ++i) {
      if (!std::isfinite(data[i])) {
        py::gil_scoped_acquire acquire;
        SAMANTIC_CHECK(false, "logits contain a non-finite value (", data[i], ") in mask ", i / (h_lr * w_lr));
      }
    }
  }

  // step: plan (cheap, host) and dispatch; the empty case falls through with n == 0
  const Plan plan = make_plan(n, h_lr, w_lr, img_size, input_h, input_w, out_h, out_w,
                              static_cast<float>(mask_threshold), static_cast<float>(stability_offset),
                              Placement{canvas_h, canvas_w, offset_x, offset_y});
  Output out;
  if (n == 0) {
    out.offsets.assign(1, 0);
  } else {
    py::gil_scoped_release release;
#ifdef SAMANTIC_WITH_CUDA
    out = dev >= 0 ? run_cuda(data, plan, dev) : run_cpu(data, plan);
#else
    out = run_cpu(data, plan);
#endif
  }

  py::dict result;
  result["stability_score"] = front::to_numpy(std::move(out.stability));
  result["area"] = front::to_numpy(std::move(out.area));
  result["boxes"] = front::to_numpy(std::move(out.boxes)).reshape({n, int64_t{4}});
  result["counts"] = front::to_numpy(std::move(out.counts));
  result["offsets"] = front::to_numpy(std::move(out.offsets));
  return result;
}

void register_ops(py::module_& m) {
  m.def("postprocess_masks", &postprocess_masks, py::arg("logits"), py::arg("img_size"), py::arg("input_h"),
        py::arg("input_w"), py::arg("out_h"), py::arg("out_w"), py::arg("mask_threshold"),
        py::arg("stability_offset"), py::arg("canvas_h"), py::arg("canvas_w"), py::arg("offset_x"),
        py::arg("offset_y"), py::arg("device") = "cpu",
        "Fused two-stage bilinear upscale + threshold + stability + area + box + RLE (see samantic.ops).");
}

}  // namespace postprocess
}  // namespace samantic
