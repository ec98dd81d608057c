// The CPU kernels built for the avx512 ISA level (flags and -DSEGMAMBA_ISA_AVX512 come from setup.py).
#include "bindings.h"
