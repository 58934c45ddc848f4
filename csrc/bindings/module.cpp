// lowrank_ops._C: the pybind11 module.  Build and runtime information here; each op
// family binds its kernels in csrc/bindings/<family>_bindings.cpp (see registry.h).
// Pointers, sizes, strides, dtype codes, a device index and a stream come in as plain
// integers; no torch, no Python objects past the bindings.  The GIL is released around
// every kernel call.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "lowrank_ops/cpu_features.h"
#include "lowrank_ops/parallel.h"
#include "registry.h"
#ifdef LOWRANK_OPS_WITH_CUDA
#include "lowrank_ops/cuda_runtime_info.h"
#endif

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {
namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = LOWRANK_OPS_VERSION;
#ifdef LOWRANK_OPS_WITH_CUDA
  info["cuda_compiled"] = true;
  info["cuda_archs"] = std::string(LOWRANK_OPS_CUDA_ARCHS);
  info["cuda_compiler_version"] = std::string(LOWRANK_OPS_CUDA_VERSION);
#else
  info["cuda_compiled"] = false;
  info["cuda_archs"] = std::string();
  info["cuda_compiler_version"] = std::string();
#endif
  return info;
}

}  // namespace
}  // namespace lowrank_ops

PYBIND11_MODULE(_C, m) {
  using namespace lowrank_ops;
  m.doc() = "lowrank_ops compiled kernels (torch-free: raw pointers, sizes, strides, streams)";

  m.def("build_info", &build_info, "Version, whether CUDA kernels were compiled, and for which architectures.");
  m.def(
      "cpu_features",
      []() {
        const CpuFeatures f = detect_cpu_features();
        py::dict d;
        d["avx2"] = f.avx2;
        d["avx512f"] = f.avx512f;
        d["avx512_bf16"] = f.avx512_bf16;
        d["amx_bf16"] = f.amx_bf16;
        d["genuine_intel"] = f.genuine_intel;
        return d;
      },
      "Instruction sets this CPU has and the OS enabled (all False off x86), and whether its vendor is Intel.");
  m.def(
      "cpu_threading", []() { return std::string(parallel_uses_openmp() ? "openmp" : "pool"); },
      "Where the CPU kernels' parallel regions run: 'openmp' (the OpenMP team torch uses) or 'pool' (our own).");
  m.def(
      "cuda_device_count",
      []() {
#ifdef LOWRANK_OPS_WITH_CUDA
        return cuda_device_count();
#else
        return 0;
#endif
      },
      "Number of usable CUDA devices (0 without a CUDA build, driver or GPU).");
  m.def(
      "cuda_device_name",
      [](int device) {
#ifdef LOWRANK_OPS_WITH_CUDA
        return cuda_device_name(device);
#else
        return std::string();
#endif
      },
      "device"_a);
  m.def("cuda_versions", []() {
#ifdef LOWRANK_OPS_WITH_CUDA
    return py::make_tuple(cuda_runtime_version(), cuda_driver_version());
#else
    return py::make_tuple(0, 0);
#endif
  }, "(runtime, driver) CUDA versions as integers, e.g. (13000, 13000); zeros when absent.");

  bindings::register_all(m);
}
