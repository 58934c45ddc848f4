#include "lowrank_ops/cpu_features.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <cstdint>
#endif

namespace lowrank_ops {
namespace {

bool avx512_disabled() {
  const char* value = std::getenv("LOWRANK_OPS_DISABLE_AVX512");
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

}  // namespace

#if defined(__x86_64__) || defined(__i386__)
namespace {

// XCR0: which register states the OS saves on context switch.  An instruction set is
// usable only when its state is enabled, whatever cpuid says.
uint64_t enabled_register_state() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

}  // namespace

CpuFeatures detect_cpu_features() {
  CpuFeatures features;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return features;
  char vendor[13] = {};  // ebx, edx, ecx spell it out
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  features.genuine_intel = std::strcmp(vendor, "GenuineIntel") == 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return features;
  const bool osxsave = (ecx >> 27) & 1;
  if (!osxsave) return features;
  const uint64_t xcr0 = enabled_register_state();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;            // SSE + AVX
  const bool zmm_state = ymm_state && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM_Hi256, Hi16_ZMM
  const bool tile_state = (xcr0 & 0x60000) == 0x60000;    // XTILECFG, XTILEDATA

  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return features;
  features.avx2 = ymm_state && ((ebx >> 5) & 1);
  features.avx512f = zmm_state && ((ebx >> 16) & 1);
  features.amx_bf16 = tile_state && ((edx >> 22) & 1);
  if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) features.avx512_bf16 = features.avx512f && ((eax >> 5) & 1);
  if (avx512_disabled()) features.avx512f = features.avx512_bf16 = false;
  return features;
}
#else
CpuFeatures detect_cpu_features() { return {}; }
#endif

}  // namespace lowrank_ops
