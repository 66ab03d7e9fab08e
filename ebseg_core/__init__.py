"""EBSeg (CVPR 2024) in plain PyTorch: open-vocabulary semantic segmentation with image-embedding
balancing. No Ray and no detectron2 here; see `pipeline/` for the Ray side.

The names below are imported on first use, so that light modules (``ebseg_core.errors``,
``ebseg_core.vocabulary``) load without torch and ``ebseg --help`` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "checkpoint", "build_model": "checkpoint", "load_ebseg_state_dict": "checkpoint",
    "load_open_clip_weights": "checkpoint", "load_sam_weights": "checkpoint", "read_state_dict": "checkpoint",
    "resolve_checkpoint": "checkpoint",
    "EBSegConfig": "config", "config_from_fixture": "config", "preset_config": "config",
    "with_inference_settings": "config",
    "EBSeg": "model", "Segmentation": "model",
    "Vocabulary": "vocabulary", "VocabularyError": "vocabulary",
    "UserError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ebseg_core' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
