// Validation helpers for the pybind11 fronts: every check prints the bad value.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common.h"

namespace samantic {
namespace front {

namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  if (a.ndim() == 1) s += ",";
  return s + ")";
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// Checks dtype (exactly T) and rank, returns a C-contiguous array of T.
template <typename T>
py::array_t<T, py::array::c_style> require(const py::array& a, const char* name, int ndim) {
  SAMANTIC_CHECK(a.dtype().is(py::dtype::of<T>()), name, " must have dtype ", py::str(py::dtype::of<T>()).cast<std::string>(),
                 ", got ", dtype_str(a));
  SAMANTIC_CHECK(ndim < 0 || a.ndim() == ndim, name, " must have ", ndim, " dimensions, got shape ", shape_str(a));
  return py::array_t<T, py::array::c_style>::ensure(a);
}

// Device strings: "cpu", "cuda", "cuda:N". Returns -1 for the CPU.
inline int parse_device(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "cuda") return 0;
  if (device.rfind("cuda:", 0) == 0) {
    const std::string idx = device.substr(5);
    SAMANTIC_CHECK(!idx.empty() && idx.find_first_not_of("0123456789") == std::string::npos,
                   "device must be 'cpu', 'cuda' or 'cuda:N', got '", device, "'");
    // std::stoi throws std::out_of_range past INT_MAX, which pybind11 turns into IndexError('stoi')
    SAMANTIC_CHECK(idx.size() <= 9, "device index out of range: '", device, "'");
    return std::stoi(idx);
  }
  SAMANTIC_CHECK(false, "device must be 'cpu', 'cuda' or 'cuda:N', got '", device, "'");
  return -1;
}

inline void require_cuda_compiled(const std::string& device) {
#ifndef SAMANTIC_WITH_CUDA
  SAMANTIC_CHECK(false, "device '", device,
                 "' requested but samantic._C was built without CUDA (no nvcc at build time); run `samantic doctor`");
#else
  (void)device;
#endif
}

// An optional int64 [n] category array (None -> nullptr); `holder` keeps it alive.
inline const int64_t* optional_idxs(const py::object& idxs_obj, int64_t n,
                                    py::array_t<int64_t, py::array::c_style>& holder) {
  if (idxs_obj.is_none()) return nullptr;
  holder = require<int64_t>(idxs_obj.cast<py::array>(), "idxs", 1);
  SAMANTIC_CHECK(holder.shape(0) == n, "idxs must have one entry per item (", n, "), got shape ", shape_str(holder));
  return holder.data();
}

template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(heap->size())}, {sizeof(T)}, heap->data(), owner);
}

}  // namespace front
}  // namespace samantic
