// CPU instruction-set facts that choose algorithms at run time (not kernels: those are
// cloned per ISA by the compiler).  Torch-free, cheap: cpuid + xgetbv once per call.
#pragma once

namespace lowrank_ops {

struct CpuFeatures {
  bool avx2 = false;
  bool avx512f = false;      // AVX-512 Foundation, enabled by the OS (XCR0 opmask/ZMM state)
  bool avx512_bf16 = false;  // VDPBF16PS: bf16 dot products at twice the fp32 rate
  bool amx_bf16 = false;     // AMX tiles with bf16 (the OS must enable tile state)
  // cpuid's vendor is "GenuineIntel".  Not an instruction set, but it decides where our
  // kernels beat MKL: MKL's small GEMMs take their fast paths on Intel CPUs only (on an
  // AMD EPYC its 4 x 4096 x 4096 sgemm ran 3.1x slower than our small-batch kernel,
  // against 1.6-2.2x on a Xeon: python/lowrank_ops/ops/base_linear.py).
  bool genuine_intel = false;
};

// What this CPU supports and the OS has enabled; all false on non-x86 machines.
// LOWRANK_OPS_DISABLE_AVX512 (set and not "0") reports no AVX-512, so every choice made
// from these facts takes its AVX2 / generic path: how the tests reach those paths on an
// AVX-512 machine.  Kernels cloned per ISA by the compiler (target_clones) are not affected.
CpuFeatures detect_cpu_features();

}  // namespace lowrank_ops
