"""Self-training, measured on a world whose truth is known: label -> keep confident labels -> fine-tune
from the same weights -> relabel -> compare.

Every step is the project's own job, called in-process on one Ray cluster: ``pipeline.train.train``
(a base run on a few labelled images, then the fine-tune with ``data.layout: labels``, so the
confident labels are chosen by a curation query and a pixel-confidence threshold without exporting
anything), ``pipeline.label.run_label`` (the lake and the held-out images), and the scoring of
``ebseg evaluate --labels`` (detectron2's SemSegEvaluator) against the held-out truth.

The world: ``ebseg_core.data.synthetic`` blob images (each class a fixed colour, soft edges, noise) at the tiny
preset's scale: a small labelled set, a larger unlabelled lake, and held-out labelled images whose
labels are only used for scoring.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLASS_NAMES = ("wall", "sky", "tree", "grass")
BLOB_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_blobs.yaml")  # the world's scale
WORLD_SIZES = ((64, 64), (64, 80), (80, 64))


@dataclass
class SelfTrainConfig:
    """One self-training round; ``seed`` changes the world's images and the runs' seeds."""

    workdir: str
    seed: int = 0
    labelled: int = 8  # images with truth the base model trains on
    lake: int = 48  # unlabelled images it pseudo-labels
    held_out: int = 16  # images scored before and after
    base_iters: int = 150
    finetune_iters: int = 60
    min_pixel_confidence: float = 0.3  # pseudo-label pixels below it are ignored in the fine-tune
    query: dict = field(default_factory=dict)  # more label-source options (class/area/confidence filters)
    overrides: tuple[str, ...] = field(default_factory=tuple)  # more `--set` values for both runs


@dataclass
class SelfTrainResult:
    miou_before: float  # held-out mIoU (%) of the base model's labels
    miou_after: float  # held-out mIoU (%) of the fine-tuned model's labels
    lake_miou_before: float  # the pseudo-labels' own mIoU against the lake's hidden truth
    selected: int  # lake images the query kept
    seconds: float
    base_run: str
    tuned_run: str

    @property
    def gain(self) -> float:
        return self.miou_after - self.miou_before


def write_world(root: str, cfg: SelfTrainConfig) -> dict[str, str]:
    """Generic-layout folders ``labelled``, ``lake`` (images; truth kept aside) and ``held_out``."""
    from ebseg_core.data.synthetic import write_blob_images

    out = {}
    base = cfg.seed * 100_000
    for offset, (name, n) in enumerate((("labelled", cfg.labelled), ("lake", cfg.lake), ("held_out", cfg.held_out))):
        path = os.path.join(root, name)
        write_blob_images(path, n, sizes=WORLD_SIZES, num_classes=len(CLASS_NAMES), seed=base + offset * 10_000)
        with open(os.path.join(path, "class_names.txt"), "w") as f:
            f.write("\n".join(CLASS_NAMES) + "\n")
        out[name] = path
    return out


def score_labels(labels_url: str, truth_root: str, num_classes: int) -> float:
    """mIoU (%) of label Parquet rows against a generic-layout truth (pairs by file-name stem)."""
    import pyarrow.dataset as pads

    from ebseg_core.evaluation import SemSegEvaluator
    from pipeline.evaluate import read_label
    from pipeline.schema import decode_label_png, list_parquet_files

    files, fs = list_parquet_files(labels_url)
    ev = SemSegEvaluator(num_classes, 255)
    truth = {p.stem: p for p in Path(truth_root, "labels").glob("*.png")}
    seen = set()
    for rb in pads.dataset(files, format="parquet", filesystem=fs).to_batches(columns=["uri", "status", "label_png"]):
        d = rb.to_pydict()
        for uri, status, png in zip(d["uri"], d["status"], d["label_png"]):
            stem = Path(uri).stem
            if stem in truth and status == "ok" and stem not in seen:
                seen.add(stem)
                ev.process(decode_label_png(png).astype(np.int64), read_label(str(truth[stem])))
    if seen != set(truth):
        raise RuntimeError(f"{len(set(truth) - seen)} truth images have no label row in {labels_url}")
    return float(ev.compute()["mIoU"])


def run_selftrain(cfg: SelfTrainConfig, log: Callable[[str], None] = print) -> SelfTrainResult:
    """One round on a fresh world under ``cfg.workdir``; needs a Ray cluster (or starts a local one)."""
    from pipeline.label import LabelConfig, run_label
    from pipeline.train import load_config, train

    t0 = time.perf_counter()
    work = os.path.abspath(cfg.workdir)
    if os.path.exists(work) and os.listdir(work):
        raise ValueError(f"{work} is not empty: a round starts from a fresh world and fresh runs")
    world = write_world(os.path.join(work, "world"), cfg)
    runs = os.path.join(work, "runs")
    common = [f"run.storage_path={runs}", f"run.seed={cfg.seed}", *cfg.overrides]
    vocabulary = ",".join(CLASS_NAMES)

    def label(checkpoint: str, images: str, out: str) -> str:
        run_label(LabelConfig(output=out, input=os.path.join(images, "images"), vocabulary=vocabulary,
                              checkpoint=checkpoint, batch_size=8), log=lambda _: None)
        return out

    log(f"[selftrain] seed {cfg.seed}: base run on {cfg.labelled} labelled images, {cfg.base_iters} iterations")
    base = train(load_config(BLOB_CONFIG, [*common, f"data.train={world['labelled']}", "run.name=base",
                                           f"solver.max_iter={cfg.base_iters}",
                                           f"run.checkpoint_period={cfg.base_iters}"]))["run_dir"]
    log(f"[selftrain] labelling the lake ({cfg.lake} images) and the held-out set with the base model")
    lake_labels = label(base, world["lake"], os.path.join(work, "labels", "lake_base"))
    before = score_labels(label(base, world["held_out"], os.path.join(work, "labels", "held_base")),
                          world["held_out"], len(CLASS_NAMES))
    lake_before = score_labels(lake_labels, world["lake"], len(CLASS_NAMES))

    query = {**cfg.query, "min_pixel_confidence": cfg.min_pixel_confidence}
    from pipeline.label_source import LabelSourceSpec, list_label_samples

    selected = len(list_label_samples(LabelSourceSpec.from_options(lake_labels, query)).samples)
    log(f"[selftrain] fine-tuning from the base weights on {selected} lake images' confident labels "
        f"(pixel confidence >= {cfg.min_pixel_confidence}), {cfg.finetune_iters} iterations")
    tuned = train(load_config(BLOB_CONFIG, [*common, "data.layout=labels", f"data.train={lake_labels}",
                                            f"data.labels={json.dumps(query)}", f"model.checkpoint={base}",
                                            "run.name=tuned", f"solver.max_iter={cfg.finetune_iters}",
                                            f"run.checkpoint_period={cfg.finetune_iters}"]))["run_dir"]
    log("[selftrain] relabelling the held-out set with the fine-tuned model")
    after = score_labels(label(tuned, world["held_out"], os.path.join(work, "labels", "held_tuned")),
                         world["held_out"], len(CLASS_NAMES))
    result = SelfTrainResult(before, after, lake_before, selected, time.perf_counter() - t0, base, tuned)
    log(f"[selftrain] seed {cfg.seed}: held-out mIoU {before:.1f} -> {after:.1f} ({result.gain:+.1f}); "
        f"pseudo-labels' own mIoU {lake_before:.1f}; {result.seconds:.0f} s")
    return result
