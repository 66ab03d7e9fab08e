"""Test-time augmentation with the real tiny model at small sizes: merge rule and flip handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebseg_core.tta import OFFICIAL_MIN_SIZES, TTAConfig, segment_tta


@pytest.fixture(scope="module")
def tiny():
    from ebseg_core import Vocabulary, build_model

    torch.manual_seed(0)
    model = build_model("ebseg-tiny", checkpoint=None)
    return model, Vocabulary.parse("cat,dog,grass,sky")


def test_official_defaults():
    c = TTAConfig()
    assert c.min_sizes == OFFICIAL_MIN_SIZES == (320, 480, 640, 800, 960, 1120)
    assert c.max_size == 4480 and c.flip and c.num_views == 12
    with pytest.raises(ValueError):
        TTAConfig(min_sizes=(64,), max_size=32)


def test_single_view_equals_segment_at_that_size(tiny):
    model, vocab = tiny
    img = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    out = segment_tta(model, [img], vocab, config=TTAConfig(min_sizes=(32,), max_size=64, flip=False),
                      return_scores=True)[0]
    old = model.config
    import dataclasses

    model.config = dataclasses.replace(old, test_min_size=32, test_max_size=64)
    try:
        ref = model.segment([img], vocab, return_scores=True)[0]
    finally:
        model.config = old
    assert model.config is old  # TTA restored the model's size
    torch.testing.assert_close(out.scores, ref.scores)
    assert torch.equal(out.label_map, ref.scores.argmax(0))
    assert out.label_map.shape == (40, 56) and out.confidence.shape == (40, 56)


def test_flip_is_undone_and_scales_are_averaged(tiny):
    model, vocab = tiny
    img = np.random.default_rng(1).integers(0, 255, (36, 48, 3), dtype=np.uint8)
    cfg = TTAConfig(min_sizes=(32, 48), max_size=96, flip=True)
    a = segment_tta(model, [img], vocab, config=cfg, return_scores=True)[0]
    b = segment_tta(model, [np.ascontiguousarray(img[:, ::-1])], vocab, config=cfg, return_scores=True)[0]
    # averaging x and flip(x) views makes the result flip-equivariant
    torch.testing.assert_close(a.scores, b.scores.flip(dims=[2]), rtol=1e-5, atol=1e-6)
    # and it is the mean of the separate views
    views = []
    for s in (32, 48):
        for flip in (False, True):
            one = segment_tta(model, [np.ascontiguousarray(img[:, ::-1]) if flip else img], vocab,
                              config=TTAConfig(min_sizes=(s,), max_size=96, flip=False), return_scores=True)[0]
            views.append(one.scores.flip(dims=[2]) if flip else one.scores)
    torch.testing.assert_close(a.scores, torch.stack(views).mean(0), rtol=1e-5, atol=1e-6)
