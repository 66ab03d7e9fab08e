"""Parity of the criterion with the official EBSeg losses (reference/parity_tiny_b fixture)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ebseg_core.criterion import CriterionConfig, EBSegCriterion, FixedPointCoords, RandomPointCoords

FIXTURE = Path("/work/shared/reference/parity_tiny_b")
if not FIXTURE.exists():
    FIXTURE = Path(__file__).resolve().parents[1] / "reference" / "parity_tiny_b"


@pytest.fixture(scope="module")
def ref():
    if not (FIXTURE / "train_outputs.safetensors").exists():
        pytest.fail(f"parity fixture missing at {FIXTURE}")
    return {
        "out": load_file(FIXTURE / "train_outputs.safetensors"),
        "inp": load_file(FIXTURE / "inputs.safetensors"),
        "json": json.loads((FIXTURE / "train_losses.json").read_text()),
    }


def _targets(inp):
    return [{"labels": inp[f"train.gt_classes{b}"], "masks": inp[f"train.gt_masks{b}"]} for b in range(2)]


def _criterion(**kw):
    return EBSegCriterion(12, CriterionConfig(matcher_num_points=1024, num_points=1024, **kw))


class _Recorder(RandomPointCoords):
    def __init__(self):
        self.matcher, self.loss = [], []

    def matcher_points(self, *a):
        c = super().matcher_points(*a)
        self.matcher.append(c)
        return c

    def loss_points(self, *a):
        c = super().loss_points(*a)
        self.loss.append(c)
        return c


def test_final_prediction_replays_official_rng_run(ref):
    """Seed 1234, final prediction first: same random points, matching and losses, bit for bit."""
    o = ref["out"]
    outputs = {k: o[f"rng.outputs.{k}.pred9"] for k in ("pred_logits", "pred_logits_1", "pred_masks")}
    crit = _criterion(ssc_loss=False)
    rec = _Recorder()
    torch.manual_seed(1234)
    losses, indices = crit.unweighted(outputs, _targets(ref["inp"]), rec)
    for b in range(2):
        assert torch.equal(rec.matcher[b], o[f"rng.matcher_point_coords.pred9.img{b}"])
        assert torch.equal(indices[-1][b][0], o[f"rng.indices.pred9.img{b}.query"])
        assert torch.equal(indices[-1][b][1], o[f"rng.indices.pred9.img{b}.target"])
    assert torch.equal(rec.loss[0], o["rng.criterion_point_coords.pred9"])
    for k in ("loss_ce", "1_loss_ce", "loss_mask", "loss_dice"):
        assert abs(losses[k].item() - o[f"rng.loss_unweighted.{k}"].item()) < 1e-6, k
    # The call shapes of the official run, in order, for this prediction.
    calls = ref["json"]["rng_run"]["torch_rand_calls_in_order"][:4]
    shapes = [list(c.shape) for c in rec.matcher] + [[9, 3072, 2], [9, 256, 2]]
    assert [c["shape"] for c in calls] == shapes


@pytest.mark.parametrize("tag", ["fixed", "rng"])
def test_class_losses_of_every_prediction(ref, tag):
    """Both CE branches of all 10 predictions, given the official matching, to 1e-5.

    The model forward has no randomness, so both runs share the logits (saved once, under `rng`).
    """
    o = ref["out"]
    crit = _criterion()
    targets = _targets(ref["inp"])
    for p in range(10):
        outputs = {k: o[f"rng.outputs.{k}.pred{p}"] for k in ("pred_logits", "pred_logits_1")}
        indices = [(o[f"{tag}.indices.pred{p}.img{b}.query"], o[f"{tag}.indices.pred{p}.img{b}.target"]) for b in range(2)]
        losses = crit._class_losses(outputs, targets, indices)
        suffix = "" if p == 9 else f"_{p}"
        for k in ("loss_ce", "1_loss_ce"):
            assert abs(losses[k].item() - o[f"{tag}.loss_unweighted.{k}{suffix}"].item()) < 1e-5, (k, p)


def test_fixed_coordinates_final_prediction(ref):
    """With the fixture's fixed coordinates the final prediction matches the official `fixed` run."""
    o, inp = ref["out"], ref["inp"]
    assert torch.equal(o["fixed.outputs.pred_logits.pred9"], o["rng.outputs.pred_logits.pred9"])
    outputs = {
        "pred_logits": o["fixed.outputs.pred_logits.pred9"],
        "pred_logits_1": o["fixed.outputs.pred_logits_1.pred9"],
        "pred_masks": o["rng.outputs.pred_masks.pred9"],  # same forward pass (no RNG in the model)
    }
    fixed = FixedPointCoords(inp["train.fixed_matcher_point_coords"], inp["train.fixed_criterion_point_coords"])
    losses, indices = _criterion(ssc_loss=False).unweighted(outputs, _targets(inp), fixed)
    for b in range(2):
        assert torch.equal(indices[-1][b][0], o[f"fixed.indices.pred9.img{b}.query"])
        assert torch.equal(indices[-1][b][1], o[f"fixed.indices.pred9.img{b}.target"])
    for k in ("loss_ce", "1_loss_ce", "loss_mask", "loss_dice"):
        assert abs(losses[k].item() - o[f"fixed.loss_unweighted.{k}"].item()) < 1e-5, k


@pytest.fixture(scope="module")
def tiny_outputs(ref):
    """The tiny model (fixture weights) in train mode on the fixture's train batch."""
    from ebseg_core.config import config_from_fixture
    from ebseg_core.model import EBSeg
    from ebseg_core.vocabulary import Vocabulary

    model = EBSeg(config_from_fixture(json.loads((FIXTURE / "config.json").read_text())))
    weights = load_file(FIXTURE / "weights.safetensors")
    # criterion.empty_weight is the reference criterion's buffer; ours lives in EBSegCriterion.
    missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("criterion.")})
    assert not missing and not unexpected
    model.weights_changed()
    model.train()
    vocab = Vocabulary.from_names(json.loads((FIXTURE / "vocab.json").read_text())["prompt_names"])
    images = torch.stack([ref["inp"]["train.image0"], ref["inp"]["train.image1"]])
    return model, images, vocab


@pytest.mark.parametrize("tag", ["fixed", "rng"])
def test_full_model_losses_match_official(ref, tiny_outputs, tag):
    """All 41 weighted terms and the matching of all 10 predictions, with the real tiny model."""
    model, images, vocab = tiny_outputs
    inp, o = ref["inp"], ref["out"]
    crit = _criterion()
    provider = None
    if tag == "fixed":
        provider = FixedPointCoords(inp["train.fixed_matcher_point_coords"], inp["train.fixed_criterion_point_coords"])
    torch.manual_seed(1234)
    outputs = model.training_outputs(images, vocab)
    losses, indices = crit.unweighted(outputs, _targets(inp), provider)
    weights = crit.weight_dict(len(outputs["aux_outputs"]))
    assert len(losses) == 41
    for k, v in losses.items():
        assert abs(v.item() * weights[k] - o[f"{tag}.loss_weighted.{k}"].item()) < 1e-4, k
    total = sum(v.item() * weights[k] for k, v in losses.items())
    assert abs(total - ref["json"][f"{tag}_run" if tag == "rng" else "fixed_coords_run"]["total_weighted_loss"]) < 1e-3
    for p in range(10):
        for b in range(2):
            assert torch.equal(indices[p][b][0], o[f"{tag}.indices.pred{p}.img{b}.query"]), (p, b)
            assert torch.equal(indices[p][b][1], o[f"{tag}.indices.pred{p}.img{b}.target"]), (p, b)
