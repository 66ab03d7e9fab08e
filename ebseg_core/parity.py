"""Check this implementation against a numerical fixture of the official EBSeg.

    python -m ebseg_core.parity FIXTURE_DIR [--atol 1e-4] [--rtol 1e-4] [--flip-margin 1e-5]

A fixture directory holds config.json, weights.safetensors (official key names), inputs.safetensors,
vocab.json, eval_outputs.safetensors and optionally train_outputs.safetensors (see the fixture README).
Everything is read from the fixture: the eval images (``eval.image{i}``), their output sizes
(config.json ``inputs.eval_output_hw...``) and which reference tensors exist; only those are compared.
The model is built from config.json, loaded strictly from the weights and run on the inputs.

Hard thresholds (decoder mask pooling ``pred_mask > 0``, decoder cross-attention masks
``sigmoid(mask) < 0.5``, eval mask pooling ``sigmoid(mask) > 0.5``) are discontinuous: a correct
implementation may take the other branch where the reference value lies within float noise of the
threshold. Each such decision is compared with the one the fixture's own tensors give; where they differ
only on elements within ``--flip-margin`` of the threshold, the tensors downstream of it may differ on the
affected images/queries and are reported as "threshold flip" instead of failing. Any other difference
fails. Exit code 0 only if every comparison passes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .checkpoint import load_ebseg_state_dict
from .config import config_from_fixture
from .errors import UserError
from .model import EBSeg
from .vocabulary import Vocabulary

REQUIRED = ("config.json", "weights.safetensors", "inputs.safetensors", "vocab.json", "eval_outputs.safetensors")
OUTPUT_SIZE_KEY = "eval_output_hw"  # config.json inputs key prefix; the shipped fixture's key has a suffix


class FixtureError(UserError):
    pass


@dataclass
class Fixture:
    """What a fixture directory holds, checked for what the checker needs."""

    path: Path
    config: dict
    inputs: dict[str, torch.Tensor]
    vocab: Vocabulary
    images: list[torch.Tensor]
    output_sizes: list[tuple[int, int] | None]
    eval_ref: dict[str, torch.Tensor]
    train_ref: dict[str, torch.Tensor] | None


def _output_sizes(config: dict, n_images: int) -> list[tuple[int, int] | None]:
    inputs = config.get("inputs")
    if not isinstance(inputs, dict):
        raise FixtureError("config.json has no 'inputs' section (it holds the eval output sizes)")
    keys = [k for k in inputs if k.split(" ")[0] == OUTPUT_SIZE_KEY]
    if len(keys) != 1:
        raise FixtureError(f"config.json inputs must hold exactly one '{OUTPUT_SIZE_KEY}...' entry (the output "
                           f"size of each eval image, null = its own size), found {keys or 'none'}")
    sizes = inputs[keys[0]]
    if not isinstance(sizes, list) or len(sizes) != n_images:
        raise FixtureError(f"config.json inputs[{keys[0]!r}] must list one output size per eval image "
                           f"({n_images}), got {sizes!r}")
    out: list[tuple[int, int] | None] = []
    for s in sizes:
        if s is not None and not (isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)):
            raise FixtureError(f"config.json inputs[{keys[0]!r}]: {s!r} is not [height, width] or null")
        out.append(None if s is None else (s[0], s[1]))
    return out


def load_fixture(path: Path) -> Fixture:
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise FixtureError(f"{path} is not a parity fixture: missing {', '.join(missing)}")
    config = json.loads((path / "config.json").read_text())
    inputs = load_file(str(path / "inputs.safetensors"))
    n = 0
    while f"eval.image{n}" in inputs:
        n += 1
    if n == 0:
        raise FixtureError("inputs.safetensors has no eval.image0 (the eval images are eval.image0, eval.image1, ...)")
    stray = sorted(k for k in inputs if re.fullmatch(r"eval\.image\d+", k) and int(k[len("eval.image"):]) >= n)
    if stray:
        raise FixtureError(f"inputs.safetensors eval images must be numbered from 0 without gaps; found {stray}")
    if "vocab.overlap_map" not in inputs:
        raise FixtureError("inputs.safetensors has no vocab.overlap_map (the seen/unseen flag of each class)")
    v = json.loads((path / "vocab.json").read_text())
    if not {"prompt_names", "synonyms"} <= set(v):
        raise FixtureError("vocab.json needs 'prompt_names' and 'synonyms'")
    seen = [bool(x) for x in inputs["vocab.overlap_map"].tolist()]
    if not (len(v["prompt_names"]) == len(v["synonyms"]) == len(seen)):
        raise FixtureError(f"vocab.json lists {len(v['prompt_names'])} prompt names and {len(v['synonyms'])} "
                           f"synonym lists, vocab.overlap_map {len(seen)} classes")
    # Prompt names go into the templates; synonyms only decide seen/unseen. Use the fixture's seen map
    # (computed by the official code against its COCO-Stuff list) so the comparison is exact.
    synonyms = [tuple([name] + [s for s in syns if s != name]) for name, syns in zip(v["prompt_names"], v["synonyms"])]
    vocab = Vocabulary(tuple(synonyms), seen=tuple(seen), source="fixture")
    train_file = path / "train_outputs.safetensors"
    return Fixture(path, config, inputs, vocab, [inputs[f"eval.image{i}"] for i in range(n)],
                   _output_sizes(config, n), load_file(str(path / "eval_outputs.safetensors")),
                   load_file(str(train_file)) if train_file.is_file() else None)


def build_fixture_model(fixture: Fixture) -> EBSeg:
    try:
        cfg = config_from_fixture(fixture.config)
    except (KeyError, TypeError) as e:
        raise FixtureError(f"config.json lacks a model setting the checker needs: {e}") from None
    model = EBSeg(cfg)
    load_ebseg_state_dict(model, load_file(str(fixture.path / "weights.safetensors")))
    model.eval()
    return model


@dataclass
class ModelRun:
    """Everything this implementation computed on a fixture's inputs (fixture tensor names)."""

    last: int  # index of the final decoder prediction
    batch: dict[str, torch.Tensor]  # the batch run's intermediates and final.sem_seg.{b}
    single: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # image b alone
    tokens: torch.Tensor | None = None
    scoremap: torch.Tensor | None = None
    train_losses: dict[str, torch.Tensor] | None = None
    rng_total_loss: float | None = None


def run_model(fixture: Fixture, model: EBSeg | None = None) -> ModelRun:
    """Run the model on the fixture's inputs: the eval batch, each image alone where the fixture has
    its ``bs1.img{b}.*`` tensors, and the training losses where it has train outputs."""
    model = model or build_fixture_model(fixture)
    torch.manual_seed(0)
    run = ModelRun(last=model.config.decoder.num_layers, batch={})
    run.tokens = model.tokenize(fixture.vocab)
    sem = model.forward_eval(fixture.images, fixture.vocab, output_sizes=fixture.output_sizes, capture=run.batch)
    for b, s in enumerate(sem):
        run.batch[f"final.sem_seg.{b}"] = s
    run.scoremap = model.ov_classifier.text_scoremap
    for b, img in enumerate(fixture.images):
        if not any(k.startswith(f"bs1.img{b}.") for k in fixture.eval_ref):
            continue
        cap: dict = {}
        cap["sem_seg"] = model.forward_eval([img], fixture.vocab, output_sizes=[fixture.output_sizes[b]],
                                            capture=cap)[0]
        fast_cls, _, _ = model.predict_masks([img], fixture.vocab)
        cap["fast_path.mask_cls_results"] = fast_cls.exp() - 1e-8
        run.single[b] = cap
    if fixture.train_ref is not None:
        _run_train(model, fixture, run)
    return run


def _run_train(model: EBSeg, fixture: Fixture, run: ModelRun) -> None:
    from .criterion import FixedPointCoords, TrainingLoss

    inputs = fixture.inputs
    n = sum(1 for k in inputs if re.fullmatch(r"train\.image\d+", k))
    need = ["train.fixed_matcher_point_coords", "train.fixed_criterion_point_coords"]
    need += [f"train.{t}{b}" for b in range(n) for t in ("image", "gt_classes", "gt_masks")]
    lacking = [k for k in need if k not in inputs]
    if n == 0 or lacking:
        raise FixtureError("train_outputs.safetensors is present but inputs.safetensors lacks "
                           + (", ".join(lacking) if lacking else "the train batch (train.image0, ...)"))
    images = torch.stack([inputs[f"train.image{b}"] for b in range(n)])
    targets = [{"labels": inputs[f"train.gt_classes{b}"], "masks": inputs[f"train.gt_masks{b}"]} for b in range(n)]
    model.train()
    try:
        losses = TrainingLoss(model, fixture.vocab)
        fixed = FixedPointCoords(inputs["train.fixed_matcher_point_coords"],
                                 inputs["train.fixed_criterion_point_coords"])
        run.train_losses = {k: v.detach() for k, v in
                            losses(images, targets, point_coords_provider=fixed).items()}
        # Official random point sampling replayed with the fixture's seed: informational, because it
        # also depends on the order of every torch.rand call (the fixed-points run above is the check).
        torch.manual_seed(1234)
        run.rng_total_loss = float(sum(v.detach() for v in losses(images, targets).values()))
    finally:
        model.eval()


# -- threshold decisions --------------------------------------------------------------------------
@dataclass
class Flip:
    """Where our decision at one hard threshold differs from the reference's (all near the threshold)."""

    source: str
    count: int
    images: set[int]  # images whose downstream tensors may differ everywhere (cross-attention masks)
    rows: set[tuple[int, int]]  # (image, query) rows whose downstream rows may differ (pooling)


def compare_decisions(ours: torch.Tensor, ref: torch.Tensor, decide: Callable[[torch.Tensor], torch.Tensor],
                      margin: float) -> tuple[torch.Tensor, bool]:
    """Elements where ``decide`` differs on our vs the reference's pre-threshold logits, and whether
    every one of them lies within ``margin`` of the threshold (logit 0) in the reference."""
    differ = decide(ours.float()) != decide(ref.float())
    return differ, bool(torch.all(ref.float().abs()[differ] <= margin))


def _pool_decision(x: torch.Tensor) -> torch.Tensor:
    return x > 0  # decoder MaskPooling


def _eval_pool_decision(x: torch.Tensor) -> torch.Tensor:
    return x.sigmoid() > 0.5  # eval mask pooling


def _attn_decision(size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Decoder cross-attention mask of a prediction at the next level's size: masked where
    sigmoid < 0.5, with fully-masked query rows un-masked (the decoder's rule)."""

    def decide(x: torch.Tensor) -> torch.Tensor:
        m = F.interpolate(x, size=size, mode="bilinear", align_corners=False).sigmoid() < 0.5
        full = m.flatten(2).all(-1)
        return m & ~full[..., None, None]

    return decide


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of mask logits (the model's rule for the attention masks and the eval pooling)."""
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)


class Report:
    def __init__(self, atol: float, rtol: float, flip_margin: float = 1e-5):
        self.atol, self.rtol, self.flip_margin = atol, rtol, flip_margin
        self.rows: list[tuple[str, float, bool]] = []
        self.flip_notes: dict[str, str] = {}  # row name -> why a difference is explained
        self.notes: list[tuple[str, float]] = []

    def compare(self, name: str, ours: torch.Tensor, ref: torch.Tensor, flips: list[Flip] | None = None,
                layout: str = "") -> None:
        """Compare within tolerance; differences confined to what ``flips`` explain pass with a note.
        ``layout``: "bq" (dims 0, 1 = image, query), "b" (dim 0 = image) or "" (one image: all of it)."""
        ours = ours.detach().float().cpu()
        ref = ref.float()
        if ours.shape != ref.shape:
            self.rows.append((f"{name} (shape {tuple(ours.shape)} vs {tuple(ref.shape)})", float("inf"), False))
            return
        err = (ours - ref).abs()
        max_err = float(err.max()) if err.numel() else 0.0
        bad = ~(err <= self.atol + self.rtol * ref.abs())
        if not bool(bad.any()):
            self.rows.append((name, max_err, True))
            return
        explained = torch.zeros_like(bad)
        for f in flips or []:
            if not layout:
                explained[...] = True
                continue
            for b in f.images:
                explained[b] = True
            if layout == "bq":
                for b, q in f.rows:
                    explained[b, q] = True
        ok = bool(flips) and not bool((bad & ~explained).any())
        if ok:
            self.flip_notes[name] = "; ".join(
                f"threshold flip: {f.count} element{'s' if f.count != 1 else ''} within {self.flip_margin:g} of the "
                f"threshold ({f.source})" for f in flips or [])
        self.rows.append((name, max_err, ok))

    def decision(self, name: str, ours: torch.Tensor, ref: torch.Tensor, decide, source: str,
                 by_image_only: bool) -> Flip | None:
        """Compare one hard-threshold decision; a flip within the margin is returned (and noted)."""
        if ours.shape != ref.shape:
            return None  # the tensor's own comparison reports the shape mismatch
        differ, near = compare_decisions(ours, ref, decide, self.flip_margin)
        count = int(differ.sum())
        if count == 0:
            self.rows.append((name, 0.0, True))
            return None
        if not near:
            detail = f"(differs on {count} element(s), some farther than {self.flip_margin:g} from the threshold)"
            self.rows.append((f"{name} {detail}", float("inf"), False))
            return None
        idx = differ.nonzero().tolist()
        flip = Flip(source, count, {i[0] for i in idx} if by_image_only else set(),
                    set() if by_image_only else {(i[0], i[1]) for i in idx})
        self.rows.append((name, 0.0, True))
        self.flip_notes[name] = (f"threshold flip: {count} element{'s' if count != 1 else ''} within "
                                 f"{self.flip_margin:g} of the threshold")
        return flip

    def info(self, name: str, err: float) -> None:
        self.notes.append((name, err))

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.rows.append((f"{name} {detail}".strip(), 0.0 if ok else float("inf"), ok))

    @property
    def passed(self) -> bool:
        return all(ok for _, _, ok in self.rows)

    @property
    def flips(self) -> int:
        return len(self.flip_notes)

    def print(self, out=None) -> None:
        out = out or sys.stdout
        width = max(len(n) for n, _, _ in self.rows)
        for name, err, ok in self.rows:
            note = self.flip_notes.get(name)
            print(f"{name:<{width}}  max_abs_err={err:.3e}  {'ok' if ok else 'FAIL'}" + (f"  ({note})" if note else ""),
                  file=out)
        for name, err in self.notes:
            print(f"{name:<{width}}  max_abs_err={err:.3e}  (informational)", file=out)
        bad = sum(not ok for _, _, ok in self.rows)
        print(f"{len(self.rows) - bad} passed, {bad} failed, {self.flips} explained by threshold flips "
              f"(atol={self.atol}, rtol={self.rtol}, flip margin={self.flip_margin})", file=out)


# -- comparisons ----------------------------------------------------------------------------------
_LAYER = re.compile(r"^(dec\.pred_masks|dec\.mask_embeds|logits\.mask_logits|dec\.attn_biases|rec\.attn_bias_pooled|"
                    r"rec\.mask_embeds_clip|logits\.mask_logits_clip)\.(\d+)$")
_POOLED = ("final.pooled_clip_feature", "final.pooled_logits", "final.pooled_probs")
_ENSEMBLED = ("final.ensembled_log_scores", "final.mask_cls_results", "final.mask_cls_log")


def _upstream(name: str, last: int, attn: dict[int, Flip], pool: dict[int, Flip], eval_pool: Flip | None
              ) -> tuple[list[Flip], str]:
    """The flips a batch-run tensor depends on, and its layout for scoping them."""

    def attn_before(m: int) -> list[Flip]:
        return [f for l, f in attn.items() if l < m]

    final_pool = [pool[last]] if last in pool else []
    ev = [eval_pool] if eval_pool else []
    m = _LAYER.match(name)
    if m:
        kind, layer = m.group(1), int(m.group(2))
        extra = [pool[layer]] if kind in ("dec.mask_embeds", "logits.mask_logits") and layer in pool else []
        return attn_before(layer) + extra, ("b" if kind in ("dec.attn_biases", "rec.attn_bias_pooled") else "bq")
    if name == "final.mask_for_pooling" or name == "final.mask_clip_probs":
        return attn_before(last), "bq"
    if name in _POOLED:
        return attn_before(last) + ev, "bq"
    if name == "final.mask_probs":
        return attn_before(last) + final_pool, "bq"
    if name in _ENSEMBLED:
        return attn_before(last) + final_pool + ev, "bq"
    sem = re.fullmatch(r"final\.sem_seg\.(\d+)", name)
    if sem:
        b = int(sem.group(1))
        return [f for f in attn_before(last) + final_pool + ev if b in f.images or any(r[0] == b for r in f.rows)], ""
    return [], ""


def _mask_for_pooling(ref: dict, prefix: str, pred_key: str, grid: tuple[int, int]) -> torch.Tensor | None:
    """The reference's eval-pooling logits: saved, or derived from its final masks (the README's rule:
    bilinear resize of the final mask logits to the CLIP grid)."""
    if prefix + "final.mask_for_pooling" in ref:
        return ref[prefix + "final.mask_for_pooling"]
    if pred_key in ref:
        return _resize(ref[pred_key], grid)
    return None


def _hw(t: torch.Tensor) -> tuple[int, int]:
    return int(t.shape[-2]), int(t.shape[-1])


def check_eval(fixture: Fixture, run: ModelRun, report: Report) -> None:
    ref, ours, last = fixture.eval_ref, run.batch, run.last
    if "vocab.tokens" in fixture.inputs:
        same = run.tokens is not None and torch.equal(run.tokens, fixture.inputs["vocab.tokens"])
        report.check("vocab.tokens", same, "(tokenizer equal)")
    levels = [_hw(ours[k]) for k in sorted(ours) if k.startswith("pixdec.multi_scale.")]
    attn: dict[int, Flip] = {}
    pool: dict[int, Flip] = {}
    for l in range(last + 1):
        key = f"dec.pred_masks.{l}"
        if key not in ref:
            continue
        f = report.decision(f"decision: {key} > 0 (decoder mask pooling)", ours[key], ref[key], _pool_decision,
                            f"{key} > 0", by_image_only=False)
        if f:
            pool[l] = f
        if l < last and levels:
            size = levels[l % len(levels)]
            f = report.decision(f"decision: sigmoid({key}) < 0.5 (cross-attention mask)",
                                _resize(ours[key], size), _resize(ref[key], size), _attn_decision(size),
                                f"cross-attention mask of {key}", by_image_only=True)
            if f:
                attn[l] = f
    eval_pool = None
    grid = _hw(ours["final.mask_for_pooling"])
    ref_pool = _mask_for_pooling(ref, "", f"dec.pred_masks.{last}", grid)
    if ref_pool is not None:
        eval_pool = report.decision("decision: sigmoid(final.mask_for_pooling) > 0.5 (eval mask pooling)",
                                    ours["final.mask_for_pooling"], ref_pool, _eval_pool_decision,
                                    "final.mask_for_pooling eval pooling", by_image_only=False)
    for name in sorted(ref):
        if name.startswith(("bs1.", "train.")):
            continue
        if name not in ours:
            report.check(name, False, "(in the fixture, not produced by this implementation)")
            continue
        flips, layout = _upstream(name, last, attn, pool, eval_pool)
        report.compare(name, ours[name], ref[name], flips, layout)
    if "train.coco_text_embedding_scoremap" in ref:
        if run.scoremap is None:
            report.check("train.coco_text_embedding_scoremap", False, "(not produced)")
        else:
            report.compare("train.coco_text_embedding_scoremap", run.scoremap,
                           ref["train.coco_text_embedding_scoremap"])
    for b, cap in sorted(run.single.items()):
        _check_single(b, cap, ref, last, report)
    for name in sorted(ref):
        m = re.match(r"bs1\.img(\d+)\.", name)
        if m and int(m.group(1)) not in run.single:
            report.check(name, False, f"(the fixture has no eval.image{m.group(1)})")


def _check_single(b: int, cap: dict, ref: dict, last: int, report: Report) -> None:
    """Image b alone (batch of one), and the public segment-style fast path on it."""
    p = f"bs1.img{b}."
    pool_flips: list[Flip] = []
    pred = f"{p}pred_masks.{last}"
    if pred in ref:
        f = report.decision(f"decision: {pred} > 0 (decoder mask pooling)", cap[f"dec.pred_masks.{last}"], ref[pred],
                            _pool_decision, f"{pred} > 0", by_image_only=False)
        pool_flips += [f] if f else []
        ref_pool = _resize(ref[pred], tuple(cap["final.mask_for_pooling"].shape[-2:]))
        f = report.decision(f"decision: sigmoid({p}mask_for_pooling) > 0.5 (eval mask pooling)",
                            cap["final.mask_for_pooling"], ref_pool, _eval_pool_decision,
                            f"{p}mask_for_pooling eval pooling", by_image_only=False)
        pool_flips += [f] if f else []
    produced = {f"{p}sem_seg": (cap["sem_seg"], ""), f"{p}mask_cls_results": (cap["final.mask_cls_results"], "bq"),
                pred: (cap[f"dec.pred_masks.{last}"], "bq")}
    for name in sorted(k for k in ref if k.startswith(p)):
        if name not in produced:
            report.check(name, False, "(in the fixture, not produced by this implementation)")
            continue
        t, layout = produced[name]
        report.compare(name, t, ref[name], pool_flips if name != pred else [], layout)
    if f"{p}mask_cls_results" in ref:
        report.compare(f"fast_path.img{b}.mask_cls_results", cap["fast_path.mask_cls_results"],
                       ref[f"{p}mask_cls_results"], pool_flips, "bq")


def check_train(fixture: Fixture, run: ModelRun, report: Report) -> None:
    ref = fixture.train_ref
    assert ref is not None and run.train_losses is not None
    losses = run.train_losses
    for key, value in sorted(losses.items()):
        ref_key = f"fixed.loss_weighted.{key}"
        if ref_key in ref:
            report.compare(ref_key, value, ref[ref_key].reshape(value.shape))
        else:
            report.check(ref_key, False, "(not in fixture)")
    expected = {k[len("fixed.loss_weighted."):] for k in ref if k.startswith("fixed.loss_weighted.")}
    for key in sorted(expected - set(losses)):
        report.check(f"fixed.loss_weighted.{key}", False, "(not produced)")
    rng = [f"rng.loss_weighted.{k}" for k in expected]
    if run.rng_total_loss is not None and all(k in ref for k in rng):
        report.info("rng.total_weighted_loss", abs(run.rng_total_loss - sum(float(ref[k]) for k in rng)))


def compare(fixture: Fixture, run: ModelRun, atol: float, rtol: float, flip_margin: float) -> Report:
    report = Report(atol, rtol, flip_margin)
    check_eval(fixture, run, report)
    if fixture.train_ref is not None:
        check_train(fixture, run, report)
    return report


def run(fixture: Path, atol: float, rtol: float, flip_margin: float = 1e-5) -> Report:
    fx = load_fixture(Path(fixture))
    return compare(fx, run_model(fx), atol, rtol, flip_margin)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("fixture", type=Path, help="fixture directory (e.g. shared/reference/parity_tiny_b)")
    parser.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default: %(default)s)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default: %(default)s)")
    parser.add_argument("--flip-margin", type=float, default=1e-5,
                        help="a hard-threshold decision that differs from the reference only where the reference "
                             "logit is within this distance of the threshold is a threshold flip, not a failure "
                             "(default: %(default)s)")


def run_args(args: argparse.Namespace, prog: str = "parity") -> int:
    """Run the check for parsed ``args``: 0 all within tolerance, 1 a mismatch, 2 not a usable fixture."""
    try:
        report = run(args.fixture, args.atol, args.rtol, args.flip_margin)
    except (FixtureError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    report.print()
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ebseg_core.parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
