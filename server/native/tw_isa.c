#include "tw_isa.h"

#include <stdlib.h>
#include <string.h>

static int has_avx512(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

static int has_avx2(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

TwIsa tw_isa(void) {
    static int chosen = -1;
    if (chosen < 0) {
        __builtin_cpu_init();
        const char *forced = getenv("TOKENWIRE_NATIVE_ISA");
        if (forced != NULL && strcmp(forced, "avx2") == 0)
            chosen = has_avx2() ? TW_ISA_AVX2 : TW_ISA_NONE;
        else
            chosen = has_avx512() ? TW_ISA_AVX512 : has_avx2() ? TW_ISA_AVX2 : TW_ISA_NONE;
    }
    return (TwIsa)chosen;
}
