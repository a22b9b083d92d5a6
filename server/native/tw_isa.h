/* Which instruction set the kernels run with, chosen once per process. */
#ifndef TW_ISA_H
#define TW_ISA_H

typedef enum { TW_ISA_NONE = 0, TW_ISA_AVX2 = 1, TW_ISA_AVX512 = 2 } TwIsa;

/* AVX-512 (F/BW/VL/DQ/VNNI) where the CPU has it, else AVX2 (+FMA, F16C), else none.
   TOKENWIRE_NATIVE_ISA=avx2 forces the AVX2 kernels (how the tests cover them on any machine). */
TwIsa tw_isa(void);
#endif
