"""SegMamba for 3D medical image segmentation, on the segmamba_kernels ops."""

__version__ = "0.1.0"
