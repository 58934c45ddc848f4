// Error reporting shared by every layer of the extension.
//
// Kernels never print, exit or abort: they throw.  pybind11 turns
// std::invalid_argument into ValueError and std::runtime_error into RuntimeError,
// so a message built here reaches the Python user unchanged.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace lowrank_ops {
namespace detail {

template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream stream;
  (stream << ... << args);
  return stream.str();
}

}  // namespace detail
}  // namespace lowrank_ops

// Bad user input: throws std::invalid_argument (ValueError in Python).  The message
// should name the argument, the expected value and the actual value.
#define LOWRANK_CHECK(cond, ...)                                                     \
  do {                                                                               \
    if (!(cond)) throw std::invalid_argument(::lowrank_ops::detail::concat(__VA_ARGS__)); \
  } while (0)
