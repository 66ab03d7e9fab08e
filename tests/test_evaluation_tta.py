"""Test-time augmentation with the real tiny model at small sizes: merge rule and flip handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ebseg_core.tta import OFFICIAL_MIN_SIZES, TTAConfig, segment_tta, tta_views


@pytest.fixture(scope="module")
def tiny_small():
    """The tiny model with a small test size, so the test-size resize is part of every view."""
    import dataclasses

    from ebseg_core import Vocabulary, build_model, preset_config

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(preset_config("ebseg-tiny"), test_min_size=48, test_max_size=96),
                        checkpoint=None)
    return model, Vocabulary.parse("cat,dog,grass,sky")


def test_official_defaults():
    c = TTAConfig()
    assert c.min_sizes == OFFICIAL_MIN_SIZES == (320, 480, 640, 800, 960, 1120)
    assert c.max_size == 4480 and c.flip and c.num_views == 12
    with pytest.raises(ValueError):
        TTAConfig(min_sizes=(64,), max_size=32)


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """Gradients plus noise: resampling it once or twice gives visibly different pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 37 * 6], axis=-1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _pil_resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def test_views_are_resized_from_the_test_size_image(tiny_small):
    model, _ = tiny_small  # test size: short side 48 (long side <= 96)
    img = _smooth_image(50, 70, seed=0)
    views = list(tta_views(model, img, TTAConfig(min_sizes=(32, 80), max_size=96, flip=True)))
    assert [flip for _, flip in views] == [False, True, False, True]
    test_size = _pil_resize(img, 48, 67)  # the test mapper's input: 50x70 -> 48x67
    assert np.array_equal(views[0][0], _pil_resize(test_size, 32, 45))  # original -> 48x67 -> 32x45
    assert np.array_equal(views[1][0], views[0][0][:, ::-1])  # resize, then flip
    assert np.array_equal(views[2][0], _pil_resize(test_size, 69, 96))  # 80 would make the long side 112 > 96
    # the chain matters: resizing the original straight to the scale gives other pixels
    assert not np.array_equal(views[0][0], _pil_resize(img, 32, 45))


def test_scores_are_the_mean_of_official_forwards_on_the_chained_views(tiny_small):
    model, vocab = tiny_small
    img = _smooth_image(50, 70, seed=1)
    cfg = TTAConfig(min_sizes=(32, 64), max_size=96, flip=True)
    out = segment_tta(model, [img], vocab, config=cfg, return_scores=True)[0]
    assert out.label_map.shape == (50, 70) and out.confidence.shape == (50, 70)
    assert torch.equal(out.label_map, out.scores.argmax(0))

    def official_mean(views):
        # the official evaluation forward of each view alone, output at the original size, flips undone
        acc = []
        for view, flip in views:
            s = model.forward_eval([torch.from_numpy(np.array(view)).permute(2, 0, 1).float()], vocab,
                                   output_sizes=[(50, 70)])[0]
            acc.append(s.flip(dims=[2]) if flip else s)
        return torch.stack(acc).mean(0)

    torch.testing.assert_close(out.scores, official_mean(tta_views(model, img, cfg)), rtol=1e-5, atol=1e-6)
    once = [(_pil_resize(img, h, w), False) for h, w in ((32, 45), (64, 90))]
    once += [(np.ascontiguousarray(v[:, ::-1]), True) for v, _ in once]
    assert not torch.allclose(out.scores, official_mean(once), rtol=1e-5, atol=1e-6)


def test_batched_images_equal_one_at_a_time(tiny_small):
    model, vocab = tiny_small
    images = [_smooth_image(50, 70, seed=2), _smooth_image(60, 44, seed=3)]
    cfg = TTAConfig(min_sizes=(32,), max_size=96, flip=False)  # flips are covered above
    both = segment_tta(model, images, vocab, config=cfg, return_scores=True)
    for img, res in zip(images, both):
        alone = segment_tta(model, [img], vocab, config=cfg, return_scores=True)[0]
        torch.testing.assert_close(res.scores, alone.scores, rtol=1e-5, atol=1e-6)
