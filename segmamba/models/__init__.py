"""SegMamba and the baseline models, built by name through the registry."""

from .mamba import MambaLayer, TriOrientedMamba
from .public_weights import PublicWeightsError, load_public_state_dict, public_model_config, read_public_checkpoint
from .registry import MODEL_NAMES, build_model, min_multiple, model_config, roi_size_error
from .segmamba import SegMamba

__all__ = ["MODEL_NAMES", "MambaLayer", "PublicWeightsError", "SegMamba", "TriOrientedMamba", "build_model",
           "load_public_state_dict", "min_multiple", "model_config", "public_model_config", "read_public_checkpoint",
           "roi_size_error"]
