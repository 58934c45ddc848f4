// Each op family binds its kernels in its own csrc/bindings/<family>_bindings.cpp:
//
//   LOWRANK_OPS_BINDINGS(sparse) { m.def("csr_spmm_cpu", ...); }
//
// The macro registers the function at load time; module.cpp calls every registered
// family (in name order) when Python imports lowrank_ops._C.  Adding a family therefore
// touches no shared file.  Binding files are compiled straight into _C (not a static
// library), so the linker keeps their registrations.
#pragma once

#include <pybind11/pybind11.h>

namespace lowrank_ops {
namespace bindings {

using Registrar = void (*)(pybind11::module_&);

// Returns a dummy value so registration can initialize a namespace-scope constant.
int add_registrar(const char* family, Registrar registrar);

// Calls every registered family's binding function on the module, sorted by family.
void register_all(pybind11::module_& m);

// Raised by a *_cuda binding in a build without CUDA kernels.
[[noreturn]] void no_cuda(const char* op);

}  // namespace bindings
}  // namespace lowrank_ops

#define LOWRANK_OPS_BINDINGS(family)                                                                 \
  static void lowrank_ops_bind_##family(pybind11::module_& m);                                     \
  [[maybe_unused]] static const int lowrank_ops_registered_##family =                              \
      ::lowrank_ops::bindings::add_registrar(#family, &lowrank_ops_bind_##family);                \
  static void lowrank_ops_bind_##family([[maybe_unused]] pybind11::module_& m)
