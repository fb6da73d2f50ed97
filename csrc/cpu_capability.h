// Which build of the vectorized CPU loops runs: the best one this processor supports, or the one
// named by the environment variable EPA_EXT_CPU_CAPABILITY ("default" or "avx2"), which the tests
// use to exercise both. Read at the first call; a bad value raises ValueError (c10::ValueError)
// there, and again at every later call, since a static whose initializer throws stays unset.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace epa_ext::cpu {

enum class CpuCapability { Default, Avx2 };

inline bool processor_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

inline CpuCapability detect_cpu_capability() {
  const char* forced = std::getenv("EPA_EXT_CPU_CAPABILITY");
  if (forced != nullptr && *forced != '\0') {
    const std::string name(forced);
    if (name == "default") return CpuCapability::Default;
    TORCH_CHECK_VALUE(name == "avx2", "the environment variable EPA_EXT_CPU_CAPABILITY must be 'default' or ",
                      "'avx2' (or unset, to choose from the processor); got '", name, "'");
    TORCH_CHECK_VALUE(processor_has_avx2(), "the environment variable EPA_EXT_CPU_CAPABILITY is 'avx2', but this ",
                      "processor lacks AVX2/FMA/F16C: set it to 'default' or unset it");
    return CpuCapability::Avx2;
  }
  return processor_has_avx2() ? CpuCapability::Avx2 : CpuCapability::Default;
}

inline CpuCapability cpu_capability() {
  static const CpuCapability capability = detect_cpu_capability();
  return capability;
}

inline const char* cpu_capability_name() {
  return cpu_capability() == CpuCapability::Avx2 ? "avx2" : "default";
}

}  // namespace epa_ext::cpu
