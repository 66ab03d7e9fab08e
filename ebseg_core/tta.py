"""Test-time augmentation as the official evaluation offers it (off by default).

The official recipe (Mask2Former's ``SemanticSegmentorWithTTA`` with detectron2's ``DatasetMapperTTA``,
config ``TEST.AUG``): run the model with the image's short side resized to each of
``320, 480, 640, 800, 960, 1120`` (long side capped at 4480), each also horizontally flipped, bring every
per-class score map back to the original size (flipped ones flipped back), average them, then take the
arg-max. It costs ~12 forward passes per image, most at sizes above the default 640.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

OFFICIAL_MIN_SIZES = (320, 480, 640, 800, 960, 1120)
OFFICIAL_MAX_SIZE = 4480


@dataclass(frozen=True)
class TTAConfig:
    """Scales (short side in pixels) and flip; the defaults are the official ones."""

    min_sizes: tuple[int, ...] = OFFICIAL_MIN_SIZES
    max_size: int = OFFICIAL_MAX_SIZE
    flip: bool = True

    def __post_init__(self):
        if not self.min_sizes or any(int(s) <= 0 for s in self.min_sizes):
            raise ValueError(f"TTA sizes must be positive integers, got {self.min_sizes}")
        if self.max_size < max(self.min_sizes):
            raise ValueError(f"TTA max size {self.max_size} is below the largest scale {max(self.min_sizes)}")

    @property
    def num_views(self) -> int:
        return len(self.min_sizes) * (2 if self.flip else 1)


@contextlib.contextmanager
def _test_size(model, min_size: int, max_size: int):
    """Temporarily run ``model.segment`` at another input size (it reads ``model.config`` per call)."""
    old = model.config
    model.config = dataclasses.replace(old, test_min_size=int(min_size), test_max_size=int(max_size))
    try:
        yield
    finally:
        model.config = old


@dataclass
class TTAResult:
    """Same fields as the model's ``Segmentation``: label map, confidence, optionally the mean scores."""

    label_map: torch.Tensor
    confidence: torch.Tensor
    scores: torch.Tensor | None = None


@torch.no_grad()
def segment_tta(model, images: Sequence[np.ndarray], vocab, batch_size: int = 4,
                config: TTAConfig = TTAConfig(), return_scores: bool = False,
                autocast_dtype: torch.dtype | None = None) -> list[TTAResult]:
    """Segment images averaging the class scores over scales and flips (official merge rule)."""
    images = [np.ascontiguousarray(im) for im in images]
    sums: list[torch.Tensor | None] = [None] * len(images)
    views = [(s, False) for s in config.min_sizes] + ([(s, True) for s in config.min_sizes] if config.flip else [])
    for size, flip in views:
        batch = [np.ascontiguousarray(im[:, ::-1]) if flip else im for im in images]
        with _test_size(model, size, config.max_size):
            outs = model.segment(batch, vocab, batch_size=batch_size, return_scores=True,
                                 autocast_dtype=autocast_dtype)
        for k, out in enumerate(outs):
            s = out.scores.float()
            if flip:
                s = s.flip(dims=[2])
            sums[k] = s if sums[k] is None else sums[k] + s
    results = []
    for s in sums:
        assert s is not None
        mean = s / len(views)
        conf, label = mean.max(dim=0)
        total = mean.sum(dim=0).clamp_min(1e-12)
        results.append(TTAResult(label.to(torch.int64), (conf / total).float(), mean if return_scores else None))
    return results
