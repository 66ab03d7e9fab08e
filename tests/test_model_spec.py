"""ebseg_core.model_spec: the one way segment, label and evaluate turn model flags into a model."""

from __future__ import annotations

import pytest

from ebseg_core.model_spec import ModelSpec, ModelSpecError, padded_size, resized_shape


def test_flags_are_checked_before_anything_is_built():
    with pytest.raises(ModelSpecError, match="--random-weights"):
        ModelSpec.from_options(checkpoint=None)
    with pytest.raises(ModelSpecError, match="exclude each other"):
        ModelSpec.from_options(checkpoint="x.pth", random_weights=True)
    with pytest.raises(ModelSpecError, match="unknown preset"):
        ModelSpec.from_options(checkpoint=None, random_weights=True, preset="ebseg-xl")
    with pytest.raises(ModelSpecError, match="batch-size"):
        ModelSpec.from_options(checkpoint=None, random_weights=True, batch_size=0)
    spec = ModelSpec.from_options(checkpoint=None, random_weights=True)
    assert spec.preset == "ebseg-b" and spec.random_weights


def test_the_built_model_is_the_one_the_spec_describes():
    spec = ModelSpec.from_options(checkpoint=None, random_weights=True, preset="ebseg-tiny", inference_size=48)
    model = spec.build(device="cpu")
    assert model.model_id == spec.model_id == "ebseg-tiny:random"
    assert not model.training and model.config.test_min_size == 48
    desc = spec.describe()
    assert desc["model_id"] == spec.model_id and desc["config"]["test_min_size"] == 48
    again = spec.build(device="cpu")  # random weights are seeded: every actor builds the same model
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_padded_size_is_what_the_model_batches_by():
    spec = ModelSpec.from_options(checkpoint=None, random_weights=True, preset="ebseg-tiny", inference_size=32,
                                  inference_max_size=64)
    short, max_size, d = spec.input_sizing()
    assert resized_shape(60, 40, short, max_size) == (48, 32)
    assert padded_size(60, 40, short, max_size, d) == (2, 1)
    assert padded_size(40, 40, short, max_size, d) == padded_size(32, 32, short, max_size, d) == (1, 1)


def test_inference_weights_override_the_preset_and_are_checked():
    spec = ModelSpec("ebseg-tiny", None, inference_size=64, inference_alpha=0.0, inference_beta=0.0, inference_gamma=0.0)
    cfg = spec.config()
    assert (cfg.test_min_size, cfg.alpha, cfg.beta, cfg.gamma) == (64, 0.0, 0.0, 0.0)
    assert ModelSpec("ebseg-tiny", None).config().alpha == ModelSpec("ebseg-tiny", None, inference_beta=0.1).config().alpha
    with pytest.raises(ValueError, match="alpha must be in"):
        ModelSpec("ebseg-tiny", None, inference_alpha=2.0).config()
