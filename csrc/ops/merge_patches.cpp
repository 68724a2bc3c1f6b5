// Front of merge_patches: validate -> empty fast path -> contiguous -> dispatch.
#include "ops/merge_patches.h"

#include "front.h"
#include "ops/rle_front.h"

namespace samantic {
namespace merge_patches {

namespace py = pybind11;

namespace {

py::dict merge_patches_py(const py::array& counts_in, const py::array& offsets_in, int64_t h, int64_t w,
                          const py::array& indptr_in, const py::array& indices_in, const std::string& device) {
  // step: validate the patches (every RLE sums to h * w) and the groups
  auto counts = rle::counts_arg(counts_in, "counts");
  auto offsets = rle::offsets_arg(offsets_in, "offsets");
  const int64_t n_patches = static_cast<int64_t>(rle::views(counts, offsets, h, w, "patches").size());
  SAMANTIC_CHECK(static_cast<uint64_t>(h) * static_cast<uint64_t>(w) < (uint64_t{1} << 32), "mask size ", h, "x", w,
                 " has more pixels than a COCO RLE can count (2^32)");
  auto indptr = front::require<int64_t>(indptr_in, "indptr", 1);
  auto indices = front::require<int64_t>(indices_in, "indices", 1);
  SAMANTIC_CHECK(indptr.shape(0) >= 1, "indptr must have Q + 1 entries for Q queries, got shape ",
                 front::shape_str(indptr_in));
  const int64_t n_queries = indptr.shape(0) - 1;
  const int64_t nnz = indices.shape(0);
  const int64_t* ip = indptr.data();
  const int64_t* idx = indices.data();
  SAMANTIC_CHECK(ip[0] == 0, "indptr must start at 0, got indptr[0]=", ip[0]);
  for (int64_t q = 0; q < n_queries; ++q)
    SAMANTIC_CHECK(ip[q + 1] >= ip[q], "indptr must be non-decreasing, got indptr[", q, "]=", ip[q], " then indptr[",
                   q + 1, "]=", ip[q + 1]);
  SAMANTIC_CHECK(ip[n_queries] == nnz, "indptr must end at len(indices)=", nnz, ", got indptr[", n_queries,
                 "]=", ip[n_queries]);
  for (int64_t q = 0; q < n_queries; ++q)
    for (int64_t i = ip[q]; i < ip[q + 1]; ++i)
      SAMANTIC_CHECK(idx[i] >= 0 && idx[i] < n_patches, "indices[", i, "]=", idx[i], " (query ", q,
                     ") is out of range for ", n_patches, " patches");
  const int dev = front::parse_device(device);
  if (dev >= 0) front::require_cuda_compiled(device);

  // step: dispatch; the empty case (no queries) falls through
  const Input in{counts.data(), counts.shape(0), offsets.data(), n_patches, ip, idx, n_queries, h, w};
  Output out;
  if (n_queries == 0) {
    out.offsets.assign(1, 0);
  } else {
    py::gil_scoped_release release;
#ifdef SAMANTIC_WITH_CUDA
    out = dev >= 0 ? run_cuda(in, dev) : run_cpu(in);
#else
    out = run_cpu(in);
#endif
  }

  py::dict result;
  result["counts"] = front::to_numpy(std::move(out.counts));
  result["offsets"] = front::to_numpy(std::move(out.offsets));
  result["area"] = front::to_numpy(std::move(out.area));
  result["boxes"] = front::to_numpy(std::move(out.boxes)).reshape({n_queries, int64_t{4}});
  return result;
}

}  // namespace

void register_ops(py::module_& m) {
  m.def("merge_patches", &merge_patches_py, py::arg("counts"), py::arg("offsets"), py::arg("h"), py::arg("w"),
        py::arg("indptr"), py::arg("indices"), py::arg("device") = "cpu",
        "Per query q, the union of the patch RLEs indices[indptr[q]:indptr[q + 1]] (a CSR batch of masks h x w), "
        "computed run by run: dict of counts, offsets (the unions' RLEs), area int64[Q] and boxes int64[Q, 4] "
        "(XYXY, inclusive max, zeros for an empty union).");
}

}  // namespace merge_patches
}  // namespace samantic
