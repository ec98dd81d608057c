// The CPU kernels built for the baseline ISA level (flags and -DSEGMAMBA_ISA_BASELINE come from setup.py).
#include "bindings.h"
