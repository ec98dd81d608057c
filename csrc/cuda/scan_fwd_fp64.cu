// Explicit instantiation for one I/O dtype: one file per dtype so the build parallelises.
#include "selective_scan_fwd.cuh"

SEGMAMBA_INSTANTIATE_SCAN_FWD(double)
