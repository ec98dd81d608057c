// The CPU kernels built for the avx2 ISA level (flags and -DSEGMAMBA_ISA_AVX2 come from setup.py).
#include "bindings.h"
