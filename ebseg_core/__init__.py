"""EBSeg (CVPR 2024) in plain PyTorch: open-vocabulary semantic segmentation with image-embedding
balancing. No Ray and no detectron2 here; see `pipeline/` for the Ray side."""

from .checkpoint import (CheckpointError, build_model, load_ebseg_state_dict, load_open_clip_weights,
                         load_sam_weights, read_state_dict)
from .config import EBSegConfig, config_from_fixture, preset_config, with_inference_settings
from .model import EBSeg, Segmentation
from .vocabulary import Vocabulary, VocabularyError

__all__ = [
    "EBSeg", "EBSegConfig", "Segmentation", "Vocabulary", "VocabularyError", "CheckpointError",
    "build_model", "preset_config", "with_inference_settings", "config_from_fixture", "load_ebseg_state_dict",
    "load_open_clip_weights", "load_sam_weights", "read_state_dict",
]
