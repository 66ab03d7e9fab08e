"""Self-training recipes side by side in one process: which fine-tune helps, and by how much more than
spending the same iterations on the labelled images alone (the control).

Why: a Ray round of ``pipeline/selftrain.py`` costs two training jobs and three labelling jobs; comparing
recipes that way on 2 shared cores is hours. Here every variant fine-tunes from the same base weights
in this process, with the pieces the training job uses (``pipeline.train.build_training_model``,
``build_optimizer``, ``PolyLR``, ``TrainingLoss``, ``TrainSampleDataset`` augmentation, gradient
clipping; one worker, no Ray), and the held-out images are scored as ``ebseg evaluate --labels`` scores
(``SemSegEvaluator``). The pseudo-labels are ``model.segment``'s label maps; image-level confidence is
the mean of its confidence map, as ``most_confident`` ranks label rows.

Variants (each ``--finetune-iters`` iterations at ``--finetune-lr`` from the base; with
``--min-pixel-confidence`` the lake's pixels below it are unknown, skipped by the mask losses as the
training job skips them in label Parquet):
  recipe   the most confident half of the lake's pseudo-labels + the labelled images' truth
  control  the labelled images alone
  all_lake every lake image's pseudo-labels + the labelled truth (what image selection adds)
  class_balanced  every lake image, each predicted class's most confident ``--most-confident`` fraction
           of pixels (the rest unknown) + the labelled truth
  oracle   every lake image with its hidden truth + the labelled truth: what the lake's images are worth
           with perfect labels, the ceiling of any pseudo-labelling

Usage:  python -m bench.bench_selftrain --seeds 0 1 2      (one process per seed runs them in parallel)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ebseg_core.criterion import TrainingLoss  # noqa: E402
from ebseg_core.data.synthetic import blob_image  # noqa: E402
from ebseg_core.evaluation import SemSegEvaluator  # noqa: E402
from ebseg_core.solver import PolyLR, build_optimizer  # noqa: E402
from ebseg_core.train_data import Sample, TrainSampleDataset, collate_train  # noqa: E402
from ebseg_core.tta import TTAConfig, segment_tta  # noqa: E402
from ebseg_core.vocabulary import Vocabulary  # noqa: E402
from pipeline.selftrain import BLOB_CONFIG, CLASS_NAMES, WORLD_SIZES, SelfTrainConfig  # noqa: E402
from pipeline.train import build_training_model, load_config  # noqa: E402

K = len(CLASS_NAMES)
VARIANTS = ("recipe", "control", "all_lake", "class_balanced", "oracle")
VOCAB = Vocabulary.parse(",".join(CLASS_NAMES))


LOOKS = ("same", "dark", "hue-shift")
HUE_JITTER = {"labelled": 0.02, "lake": 0.1}  # --look hue-shift: fraction of the hue circle each blob turns


def world(seed: int, n: int, offset: int, look: str = "same") -> list[tuple[np.ndarray, np.ndarray]]:
    """The images ``pipeline.selftrain.write_world`` writes for this seed and set (0 labelled, 1 lake, 2 held
    out), in the lake's ``look`` (the labelled set's is always near "same"):
    ``dark``: another camera at dusk (x0.55 and noise of sd 12 levels);
    ``hue-shift``: each blob's hue turns by up to ±0.1 of the circle, where the labelled images' turn by up to
    ±0.02: the lake shows looks of each class the labelled images barely do."""
    base = seed * 100_000 + offset * 10_000
    jitter = HUE_JITTER["labelled" if offset == 0 else "lake"] if look == "hue-shift" else 0.0
    items = [blob_image(*WORLD_SIZES[i % len(WORLD_SIZES)], base + i, num_classes=K, hue_jitter=jitter)
             for i in range(n)]
    if look == "dark" and offset != 0:
        rng = np.random.default_rng(base)
        items = [(np.clip(im * 0.55 + rng.normal(0, 12, im.shape), 0, 255).astype(np.uint8), lab) for im, lab in items]
    return items


def train(items, iters: int, lr: float, seed: int, init: dict | None = None,
          ignore_is_unknown: bool = False, overrides: tuple[str, ...] = ()) -> torch.nn.Module:
    """The training job's loop on one worker over in-memory (image, label) pairs."""
    cfg = load_config(BLOB_CONFIG, [*overrides, f"solver.max_iter={iters}", f"solver.base_lr={lr}"])
    torch.manual_seed(seed)
    model = build_training_model(cfg.model)
    if init is not None:
        model.load_state_dict(init)
        model.weights_changed()
    model.train()
    module = TrainingLoss(model, VOCAB, cfg.criterion)
    opt = build_optimizer(model, cfg.solver)
    sched = PolyLR(opt, cfg.solver)

    def read(sample, num_classes=None, storage_options=None):
        image, label = items[int(sample.image)]
        return image, label.astype(np.int64)

    data = TrainSampleDataset([Sample(str(i), str(i)) for i in range(len(items))], K, cfg.augment, seed=seed,
                              reader=read, ignore_is_unknown=ignore_is_unknown)
    params = [p for p in model.parameters() if p.requires_grad]
    bs = cfg.solver.ims_per_batch
    for it in range(iters):
        images, targets, _ = collate_train([data[it * bs + j] for j in range(bs)])
        total = sum(module(images, targets).values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.solver.clip_grad_norm > 0:  # as the training job: <= 0 disables
            torch.nn.utils.clip_grad_norm_(params, cfg.solver.clip_grad_norm)
        opt.step()
        sched.step()
    return model.eval()


def label(model, items, tta_sizes: tuple[int, ...] = ()) -> list[tuple[np.ndarray, np.ndarray]]:
    """(label map, confidence) per image; the confidence rounded to float16 (label Parquet keeps 1/255
    steps, ``confidence_png``: the two differ only for pixels within 1/255 of a threshold).
    ``tta_sizes``: average the scores over these scales and their flips (``ebseg_core.tta``)."""
    with torch.no_grad():
        if tta_sizes:
            res = segment_tta(model, [img for img, _ in items], VOCAB, batch_size=8,
                              config=TTAConfig(min_sizes=tta_sizes, max_size=4 * max(tta_sizes)))
        else:
            res = model.segment([img for img, _ in items], VOCAB, batch_size=8)
    return [(r.label_map.numpy(), r.confidence.numpy().astype(np.float16).astype(np.float32)) for r in res]


def class_balanced(pseudo, images, keep: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class-balanced selection (CBST, Zou et al. 2018): per predicted class, the most confident ``keep``
    fraction of its pixels stay, the rest are unknown; a class the teacher over-predicts cannot crowd out
    one it under-predicts, as one global threshold lets it."""
    labels = np.concatenate([lab.ravel() for lab, _ in pseudo])
    confs = np.concatenate([conf.ravel() for _, conf in pseudo])
    floor = np.ones(K, dtype=np.float32)
    for c in range(K):
        if (labels == c).any():
            floor[c] = np.quantile(confs[labels == c], 1.0 - keep)
    return [(image, np.where(conf < floor[lab], 255, lab).astype(np.uint8))
            for image, (lab, conf) in zip(images, pseudo)]


def confidence_ranking(pseudo, items) -> dict[str, float]:
    """How right the lake's pseudo-labelled pixels are (%), all of them and the most confident 50% and 30%:
    whether confidence can pick out the pixels worth learning from."""
    truth = np.concatenate([t.ravel() for _, t in items])
    valid = truth != 255
    right = (np.concatenate([lab.ravel() for lab, _ in pseudo]) == truth)[valid]
    order = np.argsort(-np.concatenate([conf.ravel() for _, conf in pseudo])[valid], kind="stable")
    top = {f"lake_acc_top{p}": 100.0 * float(right[order[: max(1, len(order) * p // 100)]].mean()) for p in (50, 30)}
    return {"lake_acc": 100.0 * float(right.mean()), **top}


def miou(preds, items) -> float:
    ev = SemSegEvaluator(K, 255)
    for (lab, _), (_, truth) in zip(preds, items):
        ev.process(lab.astype(np.int64), truth.astype(np.int64))
    return float(ev.compute()["mIoU"])


def run_seed(seed: int, cfg: SelfTrainConfig, log=print, variants=VARIANTS, look: str = "same",
             teacher_tta: tuple[int, ...] = ()) -> dict:
    labelled = world(seed, cfg.labelled, 0, look)
    lake, held = world(seed, cfg.lake, 1, look), world(seed, cfg.held_out, 2, look)
    t0 = time.perf_counter()
    base_lr = load_config(BLOB_CONFIG, list(cfg.overrides)).solver.base_lr
    base = train(labelled, cfg.base_iters, base_lr, seed, overrides=cfg.overrides)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    pseudo = label(base, lake, teacher_tta)
    out = {"seed": seed, "before": miou(label(base, held), held), "lake": miou(pseudo, lake)}
    order = np.argsort([-conf.mean() for _, conf in pseudo], kind="stable")
    top = order[: int(np.ceil(cfg.most_confident * len(order)))]  # most confident first
    out["lake_kept"] = miou([pseudo[i] for i in top], [lake[i] for i in top])
    out.update(confidence_ranking(pseudo, lake))
    rows = []
    for image, (lab, conf) in zip((im for im, _ in lake), pseudo):
        lab = lab.astype(np.uint8)
        if cfg.min_pixel_confidence is not None:  # unknown pixels, skipped by the losses as in the training job
            lab = np.where(conf < cfg.min_pixel_confidence, 255, lab).astype(np.uint8)
        rows.append((image, lab))
    runs = {"recipe": [rows[i] for i in top] + labelled, "control": labelled, "all_lake": rows + labelled,
            "class_balanced": class_balanced(pseudo, [im for im, _ in lake], cfg.most_confident) + labelled,
            "oracle": lake + labelled}
    log(f"seed {seed}: base {out['before']:.1f}, pseudo-labels {out['lake']:.1f} (kept {out['lake_kept']:.1f}); "
        f"pixels right: all {out['lake_acc']:.1f}%, most confident half {out['lake_acc_top50']:.1f}%, "
        f"most confident 30% {out['lake_acc_top30']:.1f}%; {time.perf_counter() - t0:.0f} s")
    for name in variants:
        tuned = train(runs[name], cfg.finetune_iters, cfg.finetune_lr, seed + 1, init=state,
                      ignore_is_unknown=name != "control", overrides=cfg.overrides)
        out[name] = miou(label(tuned, held), held)
        log(f"seed {seed}: {name} {out[name]:.1f}; {time.perf_counter() - t0:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--labelled", type=int, default=SelfTrainConfig.labelled, help="images with truth")
    p.add_argument("--lake", type=int, default=SelfTrainConfig.lake, help="unlabelled images to pseudo-label")
    p.add_argument("--held-out", type=int, default=SelfTrainConfig.held_out,
                   help="images scored before and after (more: less noise from a few blobs, slower)")
    p.add_argument("--base-iters", type=int, default=SelfTrainConfig.base_iters)
    p.add_argument("--finetune-iters", type=int, default=SelfTrainConfig.finetune_iters)
    p.add_argument("--finetune-lr", type=float, default=SelfTrainConfig.finetune_lr)
    p.add_argument("--most-confident", type=float, default=SelfTrainConfig.most_confident)
    p.add_argument("--min-pixel-confidence", type=float, default=SelfTrainConfig.min_pixel_confidence,
                   help="lake pixels below it are unknown in the fine-tune (skipped by the mask losses)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more configs/tiny_blobs.yaml overrides for every run, e.g. augment.color_aug=false")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--look", choices=LOOKS, default="same",
                   help="the lake's and held-out images' look: 'dark' = another camera at dusk; 'hue-shift' = each "
                        "blob's hue turns by up to 0.1 of the circle, the labelled images' by up to 0.02")
    p.add_argument("--teacher-tta", default="", metavar="SIZES",
                   help="pseudo-label the lake with test-time augmentation at these shorter sides, e.g. 48,64,96,128")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = SelfTrainConfig("", labelled=args.labelled, lake=args.lake, held_out=args.held_out,
                          base_iters=args.base_iters,
                          finetune_iters=args.finetune_iters, finetune_lr=args.finetune_lr,
                          most_confident=args.most_confident, min_pixel_confidence=args.min_pixel_confidence,
                          overrides=tuple(args.set))
    tta = tuple(int(x) for x in args.teacher_tta.split(",") if x)
    results = [run_seed(s, cfg, variants=args.variants, look=args.look, teacher_tta=tta) for s in args.seeds]
    print("seed  before  " + "  ".join(VARIANTS) + "  recipe-control")
    for r in results:
        cells = "  ".join(f"{r[v]:.1f}".rjust(len(v)) if v in r else "-".rjust(len(v)) for v in VARIANTS)
        gain = f"{r['recipe'] - r['control']:+14.1f}" if "recipe" in r and "control" in r else ""
        print(f"{r['seed']:>4}  {r['before']:6.1f}  {cells}  {gain}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
