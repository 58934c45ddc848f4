// lowrank_ops._C: multi-adapter LoRA kernels (segment_matmul, segment_outer).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "registry.h"
#include "lowrank_ops/lora_multi.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {
namespace {

SegmentRouting routing(std::uintptr_t offsets, std::uintptr_t ids, std::uintptr_t ranks, std::uintptr_t scales,
                       int64_t n_rows, int64_t n_segments, int64_t n_adapters, int64_t r_max) {
  SegmentRouting r;
  r.offsets = reinterpret_cast<const int64_t*>(offsets);
  r.ids = reinterpret_cast<const int64_t*>(ids);
  r.ranks = reinterpret_cast<const int64_t*>(ranks);
  r.scales = reinterpret_cast<const double*>(scales);
  r.n_rows = n_rows;
  r.n_segments = n_segments;
  r.n_adapters = n_adapters;
  r.r_max = r_max;
  return r;
}

SegmentMatmulParams matmul_params(const SegmentRouting& rt, std::uintptr_t in, std::uintptr_t w, std::uintptr_t out,
                                  int64_t J, int64_t C, int64_t in_stride_n, int64_t out_stride_n, int64_t w_stride_a,
                                  int64_t w_stride_j, int64_t w_stride_c, bool rank_on_c, bool accumulate, int dtype) {
  SegmentMatmulParams p;
  p.routing = rt;
  p.in = reinterpret_cast<const void*>(in);
  p.w = reinterpret_cast<const void*>(w);
  p.out = reinterpret_cast<void*>(out);
  p.J = J;
  p.C = C;
  p.in_stride_n = in_stride_n;
  p.out_stride_n = out_stride_n;
  p.w_stride_a = w_stride_a;
  p.w_stride_j = w_stride_j;
  p.w_stride_c = w_stride_c;
  p.rank_on_c = rank_on_c;
  p.accumulate = accumulate;
  p.dtype = static_cast<DType>(dtype);
  return p;
}

SegmentOuterParams outer_params(const SegmentRouting& rt, std::uintptr_t left, std::uintptr_t right, std::uintptr_t out,
                                int64_t J, int64_t left_stride_n, int64_t right_stride_n, int64_t out_stride_a,
                                int64_t out_stride_k, int64_t out_stride_j, int dtype) {
  SegmentOuterParams p;
  p.routing = rt;
  p.left = reinterpret_cast<const void*>(left);
  p.right = reinterpret_cast<const void*>(right);
  p.out = reinterpret_cast<void*>(out);
  p.J = J;
  p.left_stride_n = left_stride_n;
  p.right_stride_n = right_stride_n;
  p.out_stride_a = out_stride_a;
  p.out_stride_k = out_stride_k;
  p.out_stride_j = out_stride_j;
  p.dtype = static_cast<DType>(dtype);
  return p;
}

}  // namespace

LOWRANK_OPS_BINDINGS(lora_multi) {
  const char* matmul_doc =
      "out[n, c] (+)= scale[a] * sum_j in[n, j] * W(a, j, c) with a the adapter of row n's segment.\n"
      "See csrc/include/lowrank_ops/lora_multi.h for the layout contract.";
  const char* outer_doc =
      "out(a, k, j) = scale[a] * sum over the rows n of adapter a's segments of left[n, k] * right[n, j].\n"
      "See csrc/include/lowrank_ops/lora_multi.h for the layout contract.";

  auto matmul = [](bool cuda) {
    return [cuda](std::uintptr_t offsets, std::uintptr_t ids, std::uintptr_t ranks, std::uintptr_t scales,
                  std::uintptr_t in, std::uintptr_t w, std::uintptr_t out, int64_t n_rows, int64_t n_segments,
                  int64_t n_adapters, int64_t r_max, int64_t J, int64_t C, int64_t in_stride_n, int64_t out_stride_n,
                  int64_t w_stride_a, int64_t w_stride_j, int64_t w_stride_c, bool rank_on_c, bool accumulate,
                  int dtype, int num_threads, int device, std::uintptr_t stream) {
      const SegmentMatmulParams p =
          matmul_params(routing(offsets, ids, ranks, scales, n_rows, n_segments, n_adapters, r_max), in, w, out, J, C,
                        in_stride_n, out_stride_n, w_stride_a, w_stride_j, w_stride_c, rank_on_c, accumulate, dtype);
      if (!cuda) {
        py::gil_scoped_release release;
        segment_matmul_cpu(p, num_threads);
        return;
      }
#ifdef LOWRANK_OPS_WITH_CUDA
      py::gil_scoped_release release;
      segment_matmul_cuda(p, device, stream);
#else
      bindings::no_cuda("segment_matmul");
#endif
    };
  };
  auto outer = [](bool cuda) {
    return [cuda](std::uintptr_t offsets, std::uintptr_t ids, std::uintptr_t ranks, std::uintptr_t scales,
                  std::uintptr_t left, std::uintptr_t right, std::uintptr_t out, int64_t n_rows, int64_t n_segments,
                  int64_t n_adapters, int64_t r_max, int64_t J, int64_t left_stride_n, int64_t right_stride_n,
                  int64_t out_stride_a, int64_t out_stride_k, int64_t out_stride_j, int dtype, int num_threads,
                  int device, std::uintptr_t stream) {
      const SegmentOuterParams p =
          outer_params(routing(offsets, ids, ranks, scales, n_rows, n_segments, n_adapters, r_max), left, right, out,
                       J, left_stride_n, right_stride_n, out_stride_a, out_stride_k, out_stride_j, dtype);
      if (!cuda) {
        py::gil_scoped_release release;
        segment_outer_cpu(p, num_threads);
        return;
      }
#ifdef LOWRANK_OPS_WITH_CUDA
      py::gil_scoped_release release;
      segment_outer_cuda(p, device, stream);
#else
      bindings::no_cuda("segment_outer");
#endif
    };
  };

  m.def(
      "check_segment_routing_cpu",
      [](std::uintptr_t offsets, std::uintptr_t ids, std::uintptr_t ranks, std::uintptr_t scales, int64_t n_rows,
         int64_t n_segments, int64_t n_adapters, int64_t r_max, const std::string& op) {
        check_segment_routing(routing(offsets, ids, ranks, scales, n_rows, n_segments, n_adapters, r_max), op.c_str());
      },
      "Checks the routing contents (host memory); raises ValueError naming the argument.", py::kw_only(),
      "offsets"_a, "ids"_a, "ranks"_a, "scales"_a, "n_rows"_a, "n_segments"_a, "n_adapters"_a, "r_max"_a, "op"_a);

  for (const bool cuda : {false, true}) {
    m.def(cuda ? "segment_matmul_cuda" : "segment_matmul_cpu", matmul(cuda), matmul_doc, py::kw_only(), "offsets"_a,
          "ids"_a, "ranks"_a, "scales"_a, "in_"_a, "w"_a, "out"_a, "n_rows"_a, "n_segments"_a, "n_adapters"_a,
          "r_max"_a, "J"_a, "C"_a, "in_stride_n"_a, "out_stride_n"_a, "w_stride_a"_a, "w_stride_j"_a, "w_stride_c"_a,
          "rank_on_c"_a, "accumulate"_a, "dtype"_a, "num_threads"_a = 1, "device"_a = 0, "stream"_a = 0);
    m.def(cuda ? "segment_outer_cuda" : "segment_outer_cpu", outer(cuda), outer_doc, py::kw_only(), "offsets"_a,
          "ids"_a, "ranks"_a, "scales"_a, "left"_a, "right"_a, "out"_a, "n_rows"_a, "n_segments"_a, "n_adapters"_a,
          "r_max"_a, "J"_a, "left_stride_n"_a, "right_stride_n"_a, "out_stride_a"_a, "out_stride_k"_a,
          "out_stride_j"_a, "dtype"_a, "num_threads"_a = 1, "device"_a = 0, "stream"_a = 0);
  }
}

}  // namespace lowrank_ops
