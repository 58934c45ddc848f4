// Binding helper for a kernel with a CPU and a CUDA entry point that take the same
// arguments up to their back end's own: one docstring and one keyword list for both.
#pragma once

#include <pybind11/pybind11.h>

#include <string>
#include <utility>

namespace lowrank_ops {
namespace bindings {

// Defines, both with the docstring `doc`,
//   <name>_cpu(*, <keywords>..., num_threads)      bound to cpu(<values>..., int num_threads)
//   <name>_cuda(*, <keywords>..., device, stream)  bound to cuda(<values>..., int device, std::uintptr_t stream)
// pybind11 copies the names and the docstring, so the temporary names are safe.
template <class Cpu, class Cuda, class... Keywords>
void def_cpu_cuda(pybind11::module_& m, const std::string& name, const char* doc, Cpu&& cpu, Cuda&& cuda,
                  const Keywords&... keywords) {
  m.def((name + "_cpu").c_str(), std::forward<Cpu>(cpu), doc, pybind11::kw_only(), keywords...,
        pybind11::arg("num_threads"));
  m.def((name + "_cuda").c_str(), std::forward<Cuda>(cuda), doc, pybind11::kw_only(), keywords...,
        pybind11::arg("device"), pybind11::arg("stream"));
}

}  // namespace bindings
}  // namespace lowrank_ops
