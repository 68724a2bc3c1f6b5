// The compiled module samantic._C: kernels plus build/device information.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.h"
#include "device.h"

namespace py = pybind11;

namespace samantic {
namespace postprocess {
void register_ops(py::module_& m);
}
namespace nms {
void register_ops(py::module_& m);
}
namespace rle {
void register_ops(py::module_& m);
}
namespace regions {
void register_ops(py::module_& m);
}
namespace merge_patches {
void register_ops(py::module_& m);
}
namespace panoptic_fusion {
void register_ops(py::module_& m);
}
}  // namespace samantic

#ifndef SAMANTIC_CUDA_ARCHITECTURES
#define SAMANTIC_CUDA_ARCHITECTURES ""
#endif
#ifndef SAMANTIC_CUDA_COMPILER_VERSION
#define SAMANTIC_CUDA_COMPILER_VERSION ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "samantic compiled kernels (CPU always; CUDA when built with nvcc)";
  samantic::postprocess::register_ops(m);
  samantic::nms::register_ops(m);
  samantic::rle::register_ops(m);
  samantic::regions::register_ops(m);
  samantic::merge_patches::register_ops(m);
  samantic::panoptic_fusion::register_ops(m);

  m.def("build_info", []() {
    py::dict d;
    py::list backends;
    backends.append("cpu");
#ifdef SAMANTIC_WITH_CUDA
    backends.append("cuda");
    d["cuda_compiler_version"] = std::string(SAMANTIC_CUDA_COMPILER_VERSION);
    d["cuda_architectures"] = std::string(SAMANTIC_CUDA_ARCHITECTURES);
#endif
    d["compiled_backends"] = backends;
    d["cpu_threads"] = samantic::num_threads();
#if defined(__clang__)
    d["cxx_compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["cxx_compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["cxx_compiler"] = std::string("unknown");
#endif
    return d;
  }, "Which kernel backends this build contains and how it was built.");

  m.def("cuda_status", []() {
    py::dict d;
#ifdef SAMANTIC_WITH_CUDA
    samantic::CudaStatus s = samantic::cuda_status();
    d["compiled"] = true;
    d["device_count"] = s.device_count;
    d["runtime_version"] = s.runtime_version;
    d["driver_version"] = s.driver_version;
    d["error"] = s.error;
#else
    d["compiled"] = false;
    d["device_count"] = 0;
    d["error"] = std::string("built without CUDA");
#endif
    return d;
  }, "Whether CUDA kernels are compiled in and how many devices are usable now.");

  m.def("cuda_probe", []() {
    py::list devices;
#ifdef SAMANTIC_WITH_CUDA
    std::vector<samantic::CudaDeviceProbe> probes;
    {
      py::gil_scoped_release release;
      probes = samantic::cuda_probe();
    }
    for (const auto& p : probes) {
      py::dict d;
      d["index"] = p.index;
      d["name"] = p.name;
      d["capability"] = py::make_tuple(p.major, p.minor);
      d["kernels_load"] = p.kernels_load;
      d["binary_version"] = p.binary_version;
      d["ptx_version"] = p.ptx_version;
      d["error"] = p.error;
      devices.append(d);
    }
#endif
    return devices;
  }, "Per visible CUDA device: name, compute capability and whether this build's kernels load there "
     "(creates a CUDA context on each device; empty without CUDA or devices).");
}
