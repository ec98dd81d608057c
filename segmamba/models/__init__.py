"""SegMamba and the baseline models, built by name through the registry."""

from .mamba import MambaLayer, TriOrientedMamba
from .registry import MODEL_NAMES, build_model, min_multiple, model_config, roi_size_error
from .segmamba import SegMamba

__all__ = ["MODEL_NAMES", "MambaLayer", "SegMamba", "TriOrientedMamba", "build_model", "min_multiple",
           "model_config", "roi_size_error"]
