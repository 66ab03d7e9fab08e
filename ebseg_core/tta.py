"""Test-time augmentation as the official evaluation offers it (off by default).

The official recipe (Mask2Former's ``SemanticSegmentorWithTTA`` with detectron2's ``DatasetMapperTTA``,
config ``TEST.AUG``): the test mapper resizes the image to the test size (short side 640), and from that
image each view is resized to a short side of ``320, 480, 640, 800, 960, 1120`` (long side capped at
4480) and also horizontally flipped; every view's per-class score map is brought back to the original size
(flipped ones flipped back), averaged, then the arg-max is taken. It costs ~12 forward passes per image,
most at sizes above the default 640.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .model import resized_shape

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
            raise UserError(f"TTA sizes must be positive integers, got {self.min_sizes}")
        if self.max_size < max(self.min_sizes):
            raise UserError(f"TTA max size {self.max_size} is below the largest scale {max(self.min_sizes)}")

    @property
    def num_views(self) -> int:
        return len(self.min_sizes) * (2 if self.flip else 1)


def _resize_bilinear(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """PIL bilinear resize of a uint8 HxWx3 image (detectron2's ResizeTransform for uint8 images)."""
    if tuple(image.shape[:2]) == tuple(hw):
        return image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def tta_views(model, image: np.ndarray, config: TTAConfig = TTAConfig()) -> Iterator[tuple[np.ndarray, bool]]:
    """The model inputs of one image, as (HxWx3 uint8 view, flipped) in the official order (made lazily).

    Official chain: the test mapper first resizes the image to the test size (``model.prepare_image``),
    and each TTA scale is then resized from *that* image (original -> test size -> scale), then flipped.
    """
    base = model.prepare_image(image).to(torch.uint8).permute(1, 2, 0).numpy()
    for size in config.min_sizes:
        scaled = _resize_bilinear(base, resized_shape(base.shape[0], base.shape[1], size, config.max_size))
        yield scaled, False
        if config.flip:
            yield np.ascontiguousarray(scaled[:, ::-1]), True


@dataclass
class TTAResult:
    """Same fields as the model's ``Segmentation``: label map, confidence, optionally the mean scores."""

    label_map: torch.Tensor
    confidence: torch.Tensor
    scores: torch.Tensor | None = None


@torch.no_grad()
def segment_tta(model, images: Sequence[np.ndarray], vocab, batch_size: int = 4,
                config: TTAConfig = TTAConfig(), return_scores: bool = False,
                precision: str | None = None) -> list[TTAResult]:
    """Segment images averaging the class scores over scales and flips (official merge rule)."""
    images = [np.ascontiguousarray(im) for im in images]
    sums: list[torch.Tensor | None] = [None] * len(images)
    sizes = [tuple(im.shape[:2]) for im in images]
    for same_view in zip(*(tta_views(model, im, config) for im in images)):
        flips = [flip for _, flip in same_view]
        # Every view's scores come back at the original size (the official sem_seg_postprocess).
        outs = model.segment([view for view, _ in same_view], vocab, batch_size=batch_size,
                             return_scores=True, precision=precision, output_sizes=sizes)
        for k, out in enumerate(outs):
            s = out.scores.float()
            if flips[k]:
                s = s.flip(dims=[2])
            sums[k] = s if sums[k] is None else sums[k] + s
    results = []
    for s in sums:
        assert s is not None
        mean = s / config.num_views
        conf, label = mean.max(dim=0)
        total = mean.sum(dim=0).clamp_min(1e-12)
        results.append(TTAResult(label.to(torch.int64), (conf / total).float(), mean if return_scores else None))
    return results
