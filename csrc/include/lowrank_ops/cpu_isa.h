// Function attributes of the CPU kernels, defined once: the ISAs their hot loops are
// compiled for (GCC/Clang target_clones, one resolver per function picks the clone at
// load time) and forced inlining of the helpers called from a clone, so that each clone
// inlines its own ISA's copy and no vector value crosses a call (-Wpsabi).
//
// Feature levels, not CPU models: "arch=haswell" would dispatch on the exact CPU model
// and fall back to the baseline (SSE2) on newer ones.
#pragma once

// Baseline (SSE2), x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512): the default.
#define LOWRANK_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
// Baseline and x86-64-v3 only: for kernels whose AVX-512 variant is a separate function
// (LOWRANK_AVX512) chosen at run time (lora_multi_cpu.cpp).
#define LOWRANK_CPU_CLONES_DEFAULT_V3 __attribute__((target_clones("default", "arch=x86-64-v3")))
// Baseline and x86-64-v4 only: for kernels the Python op selects only on AVX-512 CPUs,
// the baseline keeping them correct everywhere (base_linear_cpu.cpp).
#define LOWRANK_CPU_CLONES_DEFAULT_V4 __attribute__((target_clones("default", "arch=x86-64-v4")))
// One function compiled for x86-64-v4 only; the caller checks the CPU first (cpu_features.h).
#define LOWRANK_AVX512 __attribute__((target("arch=x86-64-v4")))

#define LOWRANK_INLINE inline __attribute__((always_inline))
