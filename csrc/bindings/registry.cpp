#include "registry.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lowrank_ops {
namespace bindings {
namespace {

// A function-local static: safe to use from other translation units' static initializers.
std::vector<std::pair<std::string, Registrar>>& registry() {
  static std::vector<std::pair<std::string, Registrar>> entries;
  return entries;
}

}  // namespace

int add_registrar(const char* family, Registrar registrar) {
  registry().emplace_back(family, registrar);
  return 0;
}

void register_all(pybind11::module_& m) {
  auto entries = registry();
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& [family, registrar] : entries) registrar(m);
}

void no_cuda(const char* op) {
  throw std::runtime_error(std::string(op) +
                           ": lowrank_ops was built without CUDA kernels; reinstall with nvcc on PATH "
                           "(LOWRANK_OPS_CUDA=ON pip install --no-build-isolation .) to use CUDA tensors");
}

}  // namespace bindings
}  // namespace lowrank_ops
