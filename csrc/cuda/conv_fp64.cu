// Explicit instantiation for one I/O dtype: one file per dtype so the build parallelises.
#include "causal_conv1d.cuh"

SEGMAMBA_INSTANTIATE_CONV(double)
