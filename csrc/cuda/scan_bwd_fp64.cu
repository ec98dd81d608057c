// Explicit instantiation for one I/O dtype: one file per dtype so the build parallelises.
#include "selective_scan_bwd.cuh"

SEGMAMBA_INSTANTIATE_SCAN_BWD(double)
