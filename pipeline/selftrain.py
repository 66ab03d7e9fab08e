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
    """One self-training round; ``seed`` changes the world's images and the runs' seeds.

    The defaults are the last recipe measured (docs/training.md, "Self-training, measured"): the most
    confident half of the rows (``most_confident``), pixels below 0.8 confidence unknown, the labelled
    images' truth mixed in, a fine-tune at half the base run's learning rate. On the blob world its
    effect stays within the fine-tune's own noise; ``control`` shows what the same fine-tune on the
    labelled images alone gives.
    """

    workdir: str
    seed: int = 0
    labelled: int = 8  # images with truth the base model trains on
    lake: int = 48  # unlabelled images it pseudo-labels
    held_out: int = 16  # images scored before and after
    base_iters: int = 150
    finetune_iters: int = 60
    finetune_lr: float = 1e-3  # the base run's is configs/tiny_blobs.yaml's solver.base_lr (2e-3)
    most_confident: float | None = 0.5  # keep this fraction of the fine-tune rows, the most confident images
    min_pixel_confidence: float | None = 0.8  # pseudo-label pixels below it are unknown in the fine-tune
    mix_labelled: bool = True  # the labelled images' truth joins the fine-tune's rows (confidence 1)
    control: bool = False  # also fine-tune on the labelled images alone (same iterations and rate) and score it
    query: dict = field(default_factory=dict)  # more label-source options (class/area/confidence filters)
    overrides: tuple[str, ...] = field(default_factory=tuple)  # more `--set` values for both runs


@dataclass
class SelfTrainResult:
    miou_before: float  # held-out mIoU (%) of the base model's labels
    miou_after: float  # held-out mIoU (%) of the fine-tuned model's labels
    lake_miou_before: float  # the pseudo-labels' own mIoU against the lake's hidden truth
    selected: int  # fine-tune rows the query kept (the labelled images' truth rows among them)
    miou_control: float | None  # held-out mIoU after the control fine-tune (labelled images only), if run
    seconds: float
    base_run: str
    tuned_run: str

    @property
    def gain(self) -> float:
        return self.miou_after - self.miou_before

    @property
    def gain_over_control(self) -> float | None:
        """What the pseudo-labels add beyond spending the same fine-tune on the labelled images."""
        return None if self.miou_control is None else self.miou_after - self.miou_control


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


def score_labels(labels_url: str, truth_root: str) -> float:
    """mIoU (%) of label Parquet rows against a generic-layout truth, as `ebseg evaluate --labels URL
    --dataset generic --root TRUTH` scores them; a truth image without a label row is an error."""
    from pipeline.evaluate import evaluate_labels

    report = evaluate_labels(labels_url, "generic", truth_root, log=lambda line: None)
    result = report.results[0]
    if result.errors:
        raise RuntimeError(f"{len(result.errors)} truth images are not scored: {result.errors[0]}")
    return float(result.metrics["mIoU"])


def write_truth_labels(truth_root: str, like_labels: str, out: str) -> str:
    """The generic-layout truth under ``truth_root`` as label Parquet rows (confidence 1) in ``out``, with the
    schema (vocabulary, model) of the label dataset ``like_labels``, so one fine-tune reads both.

    The truth's ignore band along class boundaries takes the nearest class: a label row has no ignore value.
    """
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline import schema as S

    files, fs = S.list_parquet_files(like_labels)
    with fs.open_input_file(files[0]) as f:
        schema = pq.read_schema(f)
    meta = S.metadata_from_schema(schema, where=files[0])
    rows = []
    for png in sorted(Path(truth_root, "labels").glob("*.png")):
        label = np.array(Image.open(png))
        while (label == 255).any():  # grow the classes into the band, one pixel a step
            for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
                moved = np.roll(label, shift, axis=axis)
                hole = (label == 255) & (moved != 255)
                label[hole] = moved[hole]
        image = next(Path(truth_root, "images").glob(png.stem + ".*"))
        rows.append(S.make_ok_row(str(image), label, np.ones(label.shape, np.float32), meta.names,
                                  model_id="truth", vocabulary_id=meta.vocabulary_id))
    os.makedirs(out, exist_ok=True)
    pq.write_table(S.rows_to_table(rows, schema), os.path.join(out, "part-0.parquet"))
    return out


def run_selftrain(cfg: SelfTrainConfig, log: Callable[[str], None] = print) -> SelfTrainResult:
    """One round on a fresh world under ``cfg.workdir``; needs a Ray cluster (or starts a local one)."""
    from pipeline.label import LabelConfig, run_label
    from pipeline.label_source import LabelSourceSpec, list_label_samples
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

    def finetune(name: str, data: list[str]) -> str:
        return train(load_config(BLOB_CONFIG, [*common, *data, f"model.checkpoint={base}", f"run.name={name}",
                                               f"solver.max_iter={cfg.finetune_iters}",
                                               f"solver.base_lr={cfg.finetune_lr}",
                                               f"run.checkpoint_period={cfg.finetune_iters}"]))["run_dir"]

    log(f"[selftrain] seed {cfg.seed}: base run on {cfg.labelled} labelled images, {cfg.base_iters} iterations")
    base = train(load_config(BLOB_CONFIG, [*common, f"data.train={world['labelled']}", "run.name=base",
                                           f"solver.max_iter={cfg.base_iters}",
                                           f"run.checkpoint_period={cfg.base_iters}"]))["run_dir"]
    log(f"[selftrain] labelling the lake ({cfg.lake} images) and the held-out set with the base model")
    rows = os.path.join(work, "labels", "finetune")  # the fine-tune's label dataset: the lake (+ the truth)
    lake_labels = label(base, world["lake"], os.path.join(rows, "lake"))
    before = score_labels(label(base, world["held_out"], os.path.join(work, "labels", "held_base")),
                          world["held_out"])
    lake_before = score_labels(lake_labels, world["lake"])
    if cfg.mix_labelled:
        write_truth_labels(world["labelled"], lake_labels, os.path.join(rows, "labelled"))

    query = {**cfg.query, **{key: v for key, v in (("min_pixel_confidence", cfg.min_pixel_confidence),
                                                    ("most_confident", cfg.most_confident)) if v is not None}}
    selected = len(list_label_samples(LabelSourceSpec.from_options(rows, query)).samples)
    log(f"[selftrain] fine-tuning from the base weights on {selected} label rows ({json.dumps(query)}"
        f"{', the labelled truth mixed in' if cfg.mix_labelled else ''}), {cfg.finetune_iters} iterations, "
        f"lr {cfg.finetune_lr:g}")
    tuned = finetune("tuned", ["data.layout=labels", f"data.train={rows}", f"data.labels={json.dumps(query)}"])
    log("[selftrain] relabelling the held-out set with the fine-tuned model")
    after = score_labels(label(tuned, world["held_out"], os.path.join(work, "labels", "held_tuned")),
                         world["held_out"])
    control = None
    if cfg.control:
        log("[selftrain] control: the same fine-tune on the labelled images alone")
        ctrl = finetune("control", [f"data.train={world['labelled']}"])
        control = score_labels(label(ctrl, world["held_out"], os.path.join(work, "labels", "held_control")),
                               world["held_out"])
    result = SelfTrainResult(before, after, lake_before, selected, control, time.perf_counter() - t0, base, tuned)
    log(f"[selftrain] seed {cfg.seed}: held-out mIoU {before:.1f} -> {after:.1f} ({result.gain:+.1f})"
        + (f", control {control:.1f}" if control is not None else "")
        + f"; pseudo-labels' own mIoU {lake_before:.1f}; {result.seconds:.0f} s")
    return result
