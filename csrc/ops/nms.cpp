// Fronts of box NMS and RLE-mask NMS: validate -> empty fast path -> contiguous -> dispatch.
#include "ops/nms.h"

#include <cmath>

#include "front.h"

namespace samantic {
namespace nms {

namespace py = pybind11;

py::array_t<int64_t> nms_boxes(const py::array& boxes_in, const py::array& scores_in, double iou_threshold,
                               const py::object& idxs_obj, const std::string& device) {
  auto boxes = front::require<float>(boxes_in, "boxes", 2);
  auto scores = front::require<float>(scores_in, "scores", 1);
  const int64_t n = boxes.shape(0);
  SAMANTIC_CHECK(boxes.shape(1) == 4, "boxes must have shape (N, 4), got ", front::shape_str(boxes_in));
  SAMANTIC_CHECK(scores.shape(0) == n, "scores must have one entry per box (", n, "), got shape ",
                 front::shape_str(scores_in));
  SAMANTIC_CHECK(!std::isnan(iou_threshold), "iou_threshold must be a number, got nan");
  py::array_t<int64_t, py::array::c_style> idxs_holder;
  const int64_t* idxs = front::optional_idxs(idxs_obj, n, idxs_holder);
  const int dev = front::parse_device(device);
  if (dev >= 0) front::require_cuda_compiled(device);
  if (n == 0) return front::to_numpy(std::vector<int64_t>{});
  std::vector<int64_t> keep;
  {
    py::gil_scoped_release release;
#ifdef SAMANTIC_WITH_CUDA
    keep = dev >= 0 ? boxes_cuda(boxes.data(), scores.data(), idxs, n, iou_threshold, dev)
                    : boxes_cpu(boxes.data(), scores.data(), idxs, n, iou_threshold);
#else
    keep = boxes_cpu(boxes.data(), scores.data(), idxs, n, iou_threshold);
#endif
  }
  return front::to_numpy(std::move(keep));
}

// RLEs as CSR (counts, offsets) of masks h x w.
py::array_t<int64_t> nms_masks(const py::array& counts_in, const py::array& offsets_in, int64_t h, int64_t w,
                               const py::array& scores_in, double iou_threshold, const py::object& idxs_obj);

void register_ops(py::module_& m) {
  m.def("nms", &nms_boxes, py::arg("boxes"), py::arg("scores"), py::arg("iou_threshold"),
        py::arg("idxs") = py::none(), py::arg("device") = "cpu",
        "Greedy box NMS (torchvision batched_nms semantics); kept indices by descending score.");
  m.def("mask_nms", &nms_masks, py::arg("counts"), py::arg("offsets"), py::arg("h"), py::arg("w"), py::arg("scores"),
        py::arg("iou_threshold"), py::arg("idxs") = py::none(),
        "Greedy NMS by mask IoU on RLEs; kept indices by descending score.");
}

}  // namespace nms
}  // namespace samantic
