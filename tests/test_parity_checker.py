"""The parity checker on fixture variants: threshold flips, real corruptions, and a second fixture
(batch of one, other output size, other vocabulary order) derived from the shipped one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ebseg_core import parity
from tests.test_model import FIXTURE, _require

ATOL = RTOL = 1e-4
MARGIN = 1e-5


def _write_variant(dst: Path, eval_ref: dict, config: dict | None = None, inputs: dict | None = None,
                   vocab: dict | None = None) -> Path:
    """A fixture directory in the shipped format (weights shared by a link, no train outputs)."""
    src = _require(FIXTURE)
    dst.mkdir(parents=True)
    (dst / "weights.safetensors").symlink_to(src / "weights.safetensors")
    (dst / "config.json").write_text(json.dumps(config or json.loads((src / "config.json").read_text())))
    (dst / "vocab.json").write_text(json.dumps(vocab or json.loads((src / "vocab.json").read_text())))
    if inputs is None:
        shutil.copy(src / "inputs.safetensors", dst / "inputs.safetensors")
    else:
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(dst / "inputs.safetensors"))
    save_file({k: v.clone().contiguous() for k, v in eval_ref.items()}, str(dst / "eval_outputs.safetensors"))
    return dst


@pytest.fixture(scope="module")
def shipped():
    """The shipped fixture's eval references and this implementation's outputs on its inputs (run once)."""
    fx = parity.load_fixture(_require(FIXTURE))
    fx.train_ref = None  # the variants below are eval-only
    return fx.eval_ref, parity.run_model(fx)


def _nearest_to_threshold(ref: dict, last: int) -> tuple[str, tuple[int, ...]]:
    """The decoder-pooling logit closest to 0 among the predictions (the README lists ~1e-6 ones)."""
    best = None
    for l in range(last + 1):
        t = ref[f"dec.pred_masks.{l}"]
        i = int(t.abs().flatten().argmin())
        if best is None or t.flatten()[i].abs() < best[0]:
            best = (float(t.flatten()[i].abs()), f"dec.pred_masks.{l}", tuple(torch.unravel_index(torch.tensor(i), t.shape)))
    assert best is not None and best[0] < MARGIN / 2
    return best[1], tuple(int(v) for v in best[2])


def _verdict(tmp_path: Path, name: str, run, eval_ref: dict, **kw) -> parity.Report:
    fx = parity.load_fixture(_write_variant(tmp_path / name, eval_ref))
    return parity.compare(fx, run, kw.get("atol", ATOL), kw.get("rtol", RTOL), kw.get("margin", MARGIN))


def _row(report: parity.Report, prefix: str) -> tuple[str, bool]:
    (hit,) = [(n, ok) for n, _, ok in report.rows if n.startswith(prefix)]
    return hit


def test_reference_mask_nudged_across_the_threshold_is_a_flip_not_a_failure(shipped, tmp_path):
    ref, run = shipped
    key, (b, q, y, x) = _nearest_to_threshold(ref, run.last)
    layer = int(key.rsplit(".", 1)[1])
    nudged = dict(ref)
    nudged[key] = ref[key].clone()
    nudged[key][b, q, y, x] = -ref[key][b, q, y, x]  # same distance from 0, other side
    # the embedding pooled with the other decision moves by ~1/area (here: a visible 1e-3) on that query only
    nudged[f"dec.mask_embeds.{layer}"] = ref[f"dec.mask_embeds.{layer}"].clone()
    nudged[f"dec.mask_embeds.{layer}"][b, q] += 1e-3
    report = _verdict(tmp_path, "nudged", run, nudged)
    out = _printed(report)
    assert report.passed, out
    name, ok = _row(report, f"decision: {key} > 0")
    assert ok and report.flip_notes[name] == "threshold flip: 1 element within 1e-05 of the threshold"
    assert report.flip_notes[f"dec.mask_embeds.{layer}"].startswith("threshold flip: 1 element")
    assert f"{report.flips} explained by threshold flips" in out and report.flips >= 2

    # the same difference on a query whose decision did not flip is a failure
    other = dict(nudged)
    other[f"dec.mask_embeds.{layer}"] = ref[f"dec.mask_embeds.{layer}"].clone()
    other[f"dec.mask_embeds.{layer}"][b, (q + 1) % ref[key].shape[1]] += 1e-3
    report = _verdict(tmp_path, "other_query", run, other)
    assert not report.passed and not _row(report, f"dec.mask_embeds.{layer}")[1]


def test_real_corruptions_still_fail(shipped, tmp_path):
    ref, run = shipped
    t = ref["dec.pred_masks.5"]
    i = int((t.abs() > 1e-2).flatten().nonzero()[0])
    flipped = dict(ref)
    flipped["dec.pred_masks.5"] = t.clone()
    flipped["dec.pred_masks.5"].view(-1)[i] = -t.flatten()[i]  # a decision flip far from the threshold
    report = _verdict(tmp_path, "far_flip", run, flipped)
    assert not report.passed
    assert not _row(report, "decision: dec.pred_masks.5 > 0")[1]
    assert "farther than 1e-05" in _row(report, "decision: dec.pred_masks.5 > 0")[0]

    sem = dict(ref)
    sem["final.sem_seg.1"] = ref["final.sem_seg.1"].clone()
    sem["final.sem_seg.1"][3, 10, 10] += 1e-3
    report = _verdict(tmp_path, "sem_seg", run, sem)
    assert [n for n, _, ok in report.rows if not ok] == ["final.sem_seg.1"]

    extra = dict(ref)
    extra["bs1.img5.sem_seg"] = ref["bs1.img1.sem_seg"]  # a recorded tensor the checker cannot produce
    extra["dec.attn_biases.3"] = ref["dec.attn_biases.9"]
    report = _verdict(tmp_path, "extra", run, extra)
    assert [n for n, _, ok in report.rows if not ok] == [
        "dec.attn_biases.3 (in the fixture, not produced by this implementation)",
        "bs1.img5.sem_seg (the fixture has no eval.image5)"]


def test_eval_pooling_flip_uses_the_flag_margin(shipped, tmp_path):
    """The eval pooling logits of this fixture stay >= 1.8e-3 from the threshold, so a flip there is
    exercised with a wider margin and tolerance given by the flags."""
    ref, run = shipped
    t = ref["final.mask_for_pooling"]
    i = int(t.abs().flatten().argmin())
    b, q = (int(v) for v in torch.unravel_index(torch.tensor(i), t.shape)[:2])
    nudged = dict(ref)
    nudged["final.mask_for_pooling"] = t.clone()
    nudged["final.mask_for_pooling"].view(-1)[i] = -t.flatten()[i]
    nudged["final.pooled_clip_feature"] = ref["final.pooled_clip_feature"].clone()
    nudged["final.pooled_clip_feature"][b, q] += 0.05
    wide = {"atol": 5e-3, "rtol": 1e-4, "margin": 5e-3}
    report = _verdict(tmp_path, "pool", run, nudged, **wide)
    assert report.passed, _printed(report)
    assert "threshold flip: 1 element within 0.005" in report.flip_notes["final.pooled_clip_feature"]
    report = _verdict(tmp_path, "pool_strict", run, nudged, atol=5e-3, rtol=1e-4, margin=1e-3)
    assert not report.passed


def _printed(report: parity.Report) -> str:
    import io

    buf = io.StringIO()
    report.print(buf)
    return buf.getvalue()


def _semantic_scores(pred_masks: torch.Tensor, mask_cls: torch.Tensor, image_hw: tuple[int, int],
                     out_hw: tuple[int, int], divisibility: int) -> torch.Tensor:
    """The README's output rule from reference intermediates: final mask logits upsampled to the padded
    size, cropped to the image, resized to the output size; scores = softmax(log(cls+1e-8)) x sigmoid."""
    h, w = image_hw
    padded = (math.ceil(h / divisibility) * divisibility, math.ceil(w / divisibility) * divisibility)
    m = F.interpolate(pred_masks, size=padded, mode="bilinear", align_corners=False)[:, :, :h, :w]
    m = F.interpolate(m, size=out_hw, mode="bilinear", align_corners=False)[0]
    cls = F.softmax(torch.log(mask_cls[0] + 1e-8), dim=-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", cls, m.sigmoid())


def test_second_fixture_batch_of_one_other_size_other_vocabulary_order(tmp_path, capsys):
    """Image 1 alone, resized to another output size, with the classes in another order. Every expected
    tensor is derived from the shipped references without the official code: the batch of one is the
    fixture's own `bs1.img1.*` run; another output size follows the documented resize rule; permuting
    the vocabulary permutes the class rows/columns (the background column stays last)."""
    src = _require(FIXTURE)
    ref = load_file(str(src / "eval_outputs.safetensors"))
    inputs = load_file(str(src / "inputs.safetensors"))
    config = json.loads((src / "config.json").read_text())
    vocab = json.loads((src / "vocab.json").read_text())
    n_cls = len(vocab["prompt_names"])
    perm = torch.tensor([5, 0, 11, 3, 9, 1, 7, 2, 10, 4, 8, 6])
    assert sorted(perm.tolist()) == list(range(n_cls))
    with_bg = torch.cat([perm, torch.tensor([n_cls])])
    out_hw = (108, 150)

    new_inputs = {k: v for k, v in inputs.items() if not k.startswith("eval.image")}
    new_inputs["eval.image0"] = inputs["eval.image1"]
    new_inputs["vocab.tokens"] = inputs["vocab.tokens"][:, perm]
    new_inputs["vocab.overlap_map"] = inputs["vocab.overlap_map"][perm]
    key = next(k for k in config["inputs"] if k.startswith("eval_output_hw"))
    config["inputs"][key] = [list(out_hw)]
    config["inputs"]["eval_image_hw"] = [list(inputs["eval.image1"].shape[-2:])]
    for field in ("prompt_names", "synonyms", "sources", "overlap_map_seen_in_coco_stuff_train"):
        vocab[field] = [vocab[field][i] for i in perm.tolist()]

    last = max(int(k.rsplit(".", 1)[1]) for k in ref if k.startswith("dec.pred_masks."))
    pred = ref[f"bs1.img1.pred_masks.{last}"]
    cls = ref["bs1.img1.mask_cls_results"][..., with_bg]
    sem = _semantic_scores(pred, cls, tuple(inputs["eval.image1"].shape[-2:]), out_hw, 32)
    derived = {
        f"dec.pred_masks.{last}": pred, "final.mask_cls_results": cls, "final.mask_cls_log": torch.log(cls + 1e-8),
        "final.sem_seg.0": sem, f"bs1.img0.pred_masks.{last}": pred, "bs1.img0.mask_cls_results": cls,
        "bs1.img0.sem_seg": sem, "ov.logit_scale_exp": ref["ov.logit_scale_exp"],
        "ov.text_embed_normed": ref["ov.text_embed_normed"][with_bg],
        "ov.classifier_weight": ref["ov.classifier_weight"][with_bg],
        "train.coco_text_embedding_scoremap": ref["train.coco_text_embedding_scoremap"][perm][:, perm],
    }
    second = _write_variant(tmp_path / "second", derived, config, new_inputs, vocab)

    from jobs.cli import main as ebseg

    assert ebseg(["parity", str(second)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for name in derived:
        assert any(line.startswith(name + " ") and line.rstrip().endswith("ok") for line in out.splitlines()), name
    assert "decision: sigmoid(final.mask_for_pooling) > 0.5" in out  # derived from the final masks
    assert "0 failed" in out


@pytest.mark.parametrize("edit,message", [
    (lambda c, i: c["inputs"].pop(next(k for k in c["inputs"] if k.startswith("eval_output_hw"))),
     "exactly one 'eval_output_hw...' entry"),
    (lambda c, i: c["inputs"].__setitem__("eval_output_hw (height/width given)", [[150, 190]]),
     "one output size per eval image (2)"),
    (lambda c, i: [i.pop(k) for k in list(i) if k.startswith("eval.image")], "no eval.image0"),
    (lambda c, i: i.pop("vocab.overlap_map"), "no vocab.overlap_map"),
])
def test_fixture_lacking_what_the_checker_needs_is_named(tmp_path, capsys, edit, message):
    src = _require(FIXTURE)
    config = json.loads((src / "config.json").read_text())
    inputs = load_file(str(src / "inputs.safetensors"))
    edit(config, inputs)
    bad = _write_variant(tmp_path / "bad", {"ov.logit_scale_exp": torch.ones(1)}, config, inputs)
    assert parity.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("parity: error:") and message in err, err
