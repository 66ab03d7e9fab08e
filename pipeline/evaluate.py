"""Benchmark evaluation on Ray: mIoU of EBSeg (or of pseudo-labels) on the prepared benchmark layouts.

Flow: list the (image, label) pairs of every requested benchmark (``ebseg_core.data``) -> Ray Data
dataset of pairs -> an actor pool where each actor builds the model once and keeps one vocabulary per
benchmark -> per image a sparse confusion matrix -> summed on the driver into one
``SemSegEvaluator`` per benchmark (a sum, so the result does not depend on how the work was split)
-> table printed and written as JSON/CSV.

``evaluate_labels`` scores a label Parquet (``pipeline/schema.py``) against a benchmark instead, and
says how right its pixels are at each stored confidence (``ConfidenceTally``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ebseg_core.data import Benchmark, BenchmarkError, Pair, get_benchmark, list_pairs
from ebseg_core.errors import UserError
from ebseg_core.evaluation import SemSegEvaluator, detectron2_style, mean_defined
from ebseg_core.model_spec import ModelSpec
from ebseg_core.storage import join, read_bytes, write_bytes_atomic
from ebseg_core.vocabulary import Vocabulary, VocabularyError
from pipeline.resources import cluster_actor_pool, ensure_ray

#: Column titles of the printed table (the README's order: A-847, PC-459, A-150, PC-59, VOC).
DISPLAY = {"ade847": "A-847", "pc459": "PC-459", "ade150": "A-150", "pc59": "PC-59", "voc20": "VOC",
           "coco171": "COCO-171", "coco171-train": "COCO-171-train"}
PREDICTORS = ("model", "ground-truth")


class EvaluateError(UserError):
    """A user-facing failure of an evaluation run (printed without a traceback by the CLI)."""


@dataclass
class EvalConfig:
    """What to evaluate and how (see ``ebseg evaluate --help``)."""

    datasets: list[str]
    root: str
    preset: str | None = None  # None: from the checkpoint (ebseg-b with random weights)
    checkpoint: str | None = None  # weights file, checkpoint directory or training run directory
    random_weights: bool = False
    best_checkpoint: bool = False  # a run directory's best-validated checkpoint instead of its latest
    num_actors: int | None = None
    num_gpus_per_actor: float | None = None
    num_cpus_per_actor: float | None = None
    batch_size: int = 4
    tta: bool = False
    out: str | None = None
    limit: int | None = None
    inference_size: int | None = None
    inference_max_size: int | None = None
    precision: str = "auto"  # ebseg_core.model.autocast_dtype_for
    class_names_file: str | None = None  # replace the benchmark's class list (one dataset only)
    predictor: str = "model"  # "ground-truth": predicts the label itself (checks data + evaluator = 100)
    torch_threads: int = 0
    # The model of the "model" predictor: built from the fields above on the driver (checkpoint resolved and
    # checked, not read); None for the ground-truth predictor.
    model: ModelSpec | None = field(default=None, init=False)

    def __post_init__(self):
        if not self.datasets:
            raise EvaluateError("give at least one dataset (--dataset ade150,voc20)")
        try:
            self.benchmarks = [get_benchmark(d) for d in self.datasets]
        except BenchmarkError as e:
            raise EvaluateError(str(e)) from None
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise EvaluateError(f"a dataset is listed twice: {self.datasets}")
        if self.predictor not in PREDICTORS:
            raise EvaluateError(f"unknown predictor {self.predictor!r}; choose one of {PREDICTORS}")
        if self.predictor == "model" and not self.checkpoint and not self.random_weights:
            raise EvaluateError("give --checkpoint PATH_OR_URL (EBSeg weights), or --random-weights to time an "
                                "untrained model (its mIoU is meaningless)")
        if self.class_names_file and len(self.benchmarks) != 1:
            raise EvaluateError("--class-names replaces one benchmark's class list: evaluate one dataset")
        if self.batch_size < 1:
            raise EvaluateError("--batch-size must be at least 1")
        if self.predictor == "model":
            try:
                self.model = ModelSpec.from_options(
                    checkpoint=self.checkpoint, random_weights=self.random_weights, preset=self.preset,
                    best_checkpoint=self.best_checkpoint, inference_size=self.inference_size,
                    inference_max_size=self.inference_max_size, precision=self.precision,
                    batch_size=self.batch_size)
            except UserError as e:
                raise EvaluateError(str(e)) from None
        self.preset = self.model.preset if self.model else (self.preset or "ebseg-b")


@dataclass
class DatasetResult:
    name: str
    metrics: dict
    num_images: int
    seconds: float
    errors: list[str] = field(default_factory=list)
    # label Parquet only: ConfidenceTally.table(), how right the pixels are at or above each confidence
    confidence: list[dict] | None = None


@dataclass
class EvalReport:
    results: list[DatasetResult]
    model: dict
    seconds: float
    images_per_second: float

    @property
    def ok(self) -> bool:
        return all(not r.errors for r in self.results)


# ------------------------------------------------------------------------------------------------
# per-image work (runs in Ray actors; also callable directly)
# ------------------------------------------------------------------------------------------------
def read_label(uri: str) -> np.ndarray:
    """A prepared label file (PNG 8-bit or TIFF 16-bit) as an integer array."""
    from PIL import Image

    with Image.open(io.BytesIO(read_bytes(uri))) as im:
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"{uri}: label must be a single-channel image, got shape {arr.shape}")
    return arr


def sparse_confusion(pred, gt, num_classes: int, ignore_label: int) -> tuple[np.ndarray, ...]:
    """Non-zero cells of one image's confusion matrix and of its Boundary IoU matrix (empty when the
    benchmark has too many classes for it): flat indices (int32) and counts (int64) of each."""
    from ebseg_core.evaluation import boundary_confusion_matrix, boundary_supported, confusion_matrix

    def sparse(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = m.reshape(-1)
        idx = np.flatnonzero(m)
        return idx.astype(np.int32), m[idx].astype(np.int64)

    cm = sparse(confusion_matrix(pred, gt, num_classes, ignore_label))
    if not boundary_supported(num_classes):
        return cm + (np.zeros(0, np.int32), np.zeros(0, np.int64))
    return cm + sparse(boundary_confusion_matrix(pred, gt, num_classes, ignore_label))


def _dense(size: int, idx, cnt) -> np.ndarray:
    flat = np.zeros(size, np.int64)
    np.add.at(flat, np.asarray(idx, np.int64), np.asarray(cnt, np.int64))
    return flat


@dataclass(frozen=True)
class DatasetSpec:
    """What an actor needs per benchmark: its class list and label semantics."""

    name: str
    vocabulary: Vocabulary  # the benchmark's prompts and synonyms
    ignore_label: int


class Scorer:
    """Ray Data callable class: one model per actor, one vocabulary per benchmark; scores batches."""

    def __init__(self, cfg: EvalConfig, specs: dict[str, DatasetSpec], torch_threads: int = 0):
        import torch

        self.cfg = cfg
        self.specs = specs
        self.torch = torch
        self.model = None
        # seen/unseen classes against the checkpoint's training classes
        self.vocabs = {k: cfg.model.vocabulary_for(s.vocabulary) if cfg.model else s.vocabulary
                       for k, s in specs.items()}
        if cfg.model is not None:
            self.model = cfg.model.with_threads(torch_threads).build()

    def _predict(self, images: list[np.ndarray], labels: list[np.ndarray], dataset: str) -> list[np.ndarray]:
        if self.model is None:  # ground-truth predictor: the label itself, ignored pixels -> class 0
            ign = self.specs[dataset].ignore_label
            return [np.where(lab == ign, 0, lab).astype(np.int64) for lab in labels]
        vocab, bs, precision = self.vocabs[dataset], self.cfg.batch_size, self.cfg.precision
        with self.torch.inference_mode():
            if self.cfg.tta:
                from ebseg_core.tta import segment_tta

                maps = [o.label_map for o in segment_tta(self.model, images, vocab, batch_size=bs, precision=precision)]
            else:
                maps = [o.label_map for o in self.model.segment(images, vocab, batch_size=bs, precision=precision)]
        return [m.cpu().numpy() for m in maps]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from pipeline.images import decode_image

        n = len(batch["key"])
        out: dict[str, list] = {"dataset": [], "key": [], "cm_index": [], "cm_count": [], "bm_index": [],
                                "bm_count": [], "error": [], "seconds": []}
        loaded: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        errors: dict[int, str] = {}
        for i in range(n):
            try:
                label = read_label(str(batch["label_uri"][i]))
                image = decode_image(read_bytes(str(batch["image_uri"][i])))
                if image.shape[:2] != label.shape:
                    raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but its label "
                                     f"{label.shape[1]}x{label.shape[0]}")
                loaded.setdefault(str(batch["dataset"][i]), []).append((i, image, label))
            except Exception as e:  # recorded per image; the run reports them and fails
                errors[i] = f"{batch['image_uri'][i]}: {type(e).__name__}: {e}"
        results: dict[int, tuple[np.ndarray, ...]] = {}
        seconds: dict[int, float] = {}
        for ds, items in loaded.items():
            t0 = time.perf_counter()
            preds = self._predict([x[1] for x in items], [x[2] for x in items], ds)
            dt = (time.perf_counter() - t0) / max(1, len(items))
            spec = self.specs[ds]
            for (i, _, label), pred in zip(items, preds):
                try:
                    results[i] = sparse_confusion(pred, label, len(spec.vocabulary), spec.ignore_label)
                    seconds[i] = dt
                except Exception as e:
                    errors[i] = f"{batch['label_uri'][i]}: {type(e).__name__}: {e}"
        empty = (np.zeros(0, np.int32), np.zeros(0, np.int64)) * 2
        for i in range(n):
            idx, cnt, b_idx, b_cnt = results.get(i, empty) if i not in errors else empty
            out["dataset"].append(str(batch["dataset"][i]))
            out["key"].append(str(batch["key"][i]))
            out["cm_index"].append(idx)
            out["cm_count"].append(cnt)
            out["bm_index"].append(b_idx)
            out["bm_count"].append(b_cnt)
            out["error"].append(errors.get(i, ""))
            out["seconds"].append(seconds.get(i, 0.0))
        return out


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def benchmark_vocabulary(b: Benchmark, class_names_file: str | None = None) -> Vocabulary:
    """The benchmark's class list (its preset, or a user's file in its place), checked against its class count."""
    try:
        vocab = Vocabulary.from_options(file=class_names_file, preset=None if class_names_file else b.classes)
    except VocabularyError as e:
        raise EvaluateError(str(e)) from None
    if len(vocab) != b.num_classes:
        raise EvaluateError(f"{b.name} has {b.num_classes} classes but the class list has {len(vocab)}")
    return vocab


def dataset_specs(cfg: EvalConfig) -> dict[str, DatasetSpec]:
    return {b.name: DatasetSpec(b.name, benchmark_vocabulary(b, cfg.class_names_file), b.ignore_label)
            for b in cfg.benchmarks}


def run_evaluation(cfg: EvalConfig, log: Callable[[str], None] = print) -> EvalReport:
    """Evaluate every requested benchmark; print, save and return the results."""
    import ray
    from ray.data import ActorPoolStrategy

    specs = dataset_specs(cfg)
    rows = []
    for b in cfg.benchmarks:
        try:
            pairs = list_pairs(b, cfg.root, limit=cfg.limit)
        except BenchmarkError as e:
            raise EvaluateError(str(e)) from None
        log(f"{b.name}: {len(pairs)} images under {cfg.root}")
        rows += [{"dataset": b.name, "key": p.key, "image_uri": p.image_uri, "label_uri": p.label_uri}
                 for p in pairs]
    ensure_ray()
    try:
        pool = cluster_actor_pool(num_actors=cfg.num_actors, gpus_per_actor=cfg.num_gpus_per_actor,
                                  cpus_per_actor=cfg.num_cpus_per_actor, max_actors=len(rows),
                                  use_gpus=cfg.predictor == "model")
    except UserError as e:
        raise EvaluateError(str(e)) from None
    n, g, c = pool.num_actors, pool.gpus, pool.cpus
    log(f"{n} actor(s), {g:g} GPU and {c:g} CPU each; predictor: {cfg.predictor}"
        + (f", model {cfg.preset}" if cfg.predictor == "model" else "") + (", TTA" if cfg.tta else ""))
    t0 = time.perf_counter()
    ds: ray.data.Dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * n)))
    threads = cfg.torch_threads or pool.torch_threads
    ds = ds.map_batches(Scorer, fn_constructor_kwargs={"cfg": cfg, "specs": specs, "torch_threads": threads},
                        batch_size=cfg.batch_size,
                        batch_format="numpy", compute=ActorPoolStrategy(size=n), num_gpus=g, num_cpus=c)
    evaluators = {b.name: SemSegEvaluator(b.num_classes, b.ignore_label, specs[b.name].vocabulary.names)
                  for b in cfg.benchmarks}
    errors: dict[str, list[str]] = {b.name: [] for b in cfg.benchmarks}
    seconds: dict[str, float] = {b.name: 0.0 for b in cfg.benchmarks}
    first_done = None
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        first_done = first_done or time.perf_counter()
        for d, idx, cnt, b_idx, b_cnt, err, sec in zip(batch["dataset"], batch["cm_index"], batch["cm_count"],
                                                       batch["bm_index"], batch["bm_count"], batch["error"],
                                                       batch["seconds"]):
            ev = evaluators[str(d)]
            if err:
                errors[str(d)].append(str(err))
                continue
            boundary = (_dense(ev.matrix.size, b_idx, b_cnt).reshape(ev.matrix.shape)
                        if ev.boundary_matrix is not None else None)
            ev.add_matrix(_dense(ev.matrix.size, idx, cnt).reshape(ev.matrix.shape), 1, boundary)
            seconds[str(d)] += float(sec)
    wall = time.perf_counter() - t0
    results = [DatasetResult(b.name, evaluators[b.name].compute(), evaluators[b.name].num_images,
                             seconds[b.name], errors[b.name]) for b in cfg.benchmarks]
    total = sum(r.num_images for r in results)
    report = EvalReport(results, _model_info(cfg), wall, total / wall if wall > 0 else 0.0)
    for line in format_table(report):
        log(line)
    if cfg.out:
        for url in save_report(report, cfg.out):
            log(f"wrote {url}")
    for r in results:
        for msg in r.errors[:5]:
            log(f"error: {msg}")
    return report


def _model_info(cfg: EvalConfig) -> dict:
    info = {"predictor": cfg.predictor, "tta": cfg.tta}
    if cfg.predictor == "model":
        resolved = cfg.model.checkpoint if cfg.model else None
        info.update({"preset": cfg.preset, "checkpoint": cfg.checkpoint, "random_weights": cfg.random_weights,
                     "weights": resolved.weights_url if resolved else None,
                     "weights_sha256": resolved.digest if resolved else None,
                     "inference_size": cfg.inference_size, "inference_max_size": cfg.inference_max_size})
    return info


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def format_table(report: EvalReport) -> list[str]:
    """The README-style table: one mIoU column per benchmark, then a detail line per benchmark."""
    m = report.model
    label = m.get("preset", m["predictor"]) + (" +TTA" if m.get("tta") else "")
    heads = [DISPLAY.get(r.name, r.name) for r in report.results]
    lines = ["| Model | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads),
             f"| {label} | " + " | ".join(_fmt(r.metrics["mIoU"]) for r in report.results) + " |", ""]
    for r in report.results:
        mt = r.metrics
        lines.append(f"{r.name}: mIoU {_fmt(mt['mIoU'])}  fwIoU {_fmt(mt['fwIoU'])}  mACC {_fmt(mt['mACC'])}  "
                     f"pACC {_fmt(mt['pACC'])}"
                     + (f"  mean BoundaryIoU {_fmt(mean_defined(mt['BoundaryIoU']))}" if "BoundaryIoU" in mt else "")
                     + f"  images {r.num_images}"
                     + (f"  FAILED {len(r.errors)}" if r.errors else ""))
    lines.append(f"{sum(r.num_images for r in report.results)} images in {report.seconds:.1f} s "
                 f"({report.images_per_second:.2f} images/s)")
    return lines


def format_confidence(r: DatasetResult) -> list[str]:
    """The pixels a ``min_pixel_confidence`` keeps (share of the pixels with truth) and how right they are."""
    lines = [f"{r.name}: label pixels by confidence (what a min_pixel_confidence keeps)",
             "  confidence >=   pixels    right"]
    for row in r.confidence or []:
        share, right = _fmt(row["pixel_share"]), _fmt(row["pixel_accuracy"])
        lines.append(f"  {row['min_confidence']:13.2f}   {share:>5}%   {right:>5}%")
    return lines


def _nan_to_none(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def save_report(report: EvalReport, out: str) -> list[str]:
    """Write ``results.json``, ``summary.csv`` and ``per_class_<dataset>.csv`` under ``out``."""
    written = []
    datasets: dict[str, dict[str, Any]] = {}
    doc = {"model": report.model, "seconds": report.seconds, "images_per_second": report.images_per_second,
           "datasets": datasets}
    for r in report.results:
        mt = {k: ([_nan_to_none(v) for v in val] if isinstance(val, list) and k != "class_names" else
                  _nan_to_none(val)) for k, val in r.metrics.items()}
        datasets[r.name] = {**mt, "errors": r.errors, "model_seconds": r.seconds,
                            "detectron2": {k: _nan_to_none(v) for k, v in detectron2_style(r.metrics).items()}}
        if r.confidence is not None:
            datasets[r.name]["confidence"] = [{k: _nan_to_none(v) for k, v in row.items()} for row in r.confidence]
    written.append(write_bytes_atomic(join(out, "results.json"), json.dumps(doc, indent=1).encode()))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "mIoU", "fwIoU", "mACC", "pACC", "images", "failed"])
    for r in report.results:
        mt = r.metrics
        w.writerow([r.name] + [_fmt_csv(mt[k]) for k in ("mIoU", "fwIoU", "mACC", "pACC")]
                   + [r.num_images, len(r.errors)])
    written.append(write_bytes_atomic(join(out, "summary.csv"), buf.getvalue().encode()))
    for r in report.results:
        buf = io.StringIO()
        w = csv.writer(buf)
        boundary = "BoundaryIoU" in r.metrics
        w.writerow(["class_id", "class_name", "IoU", "ACC"] + (["BoundaryIoU", "min(IoU, B-Iou)"] if boundary else []))
        names = r.metrics.get("class_names") or [str(i) for i in range(len(r.metrics["IoU"]))]
        for i, (nm, iou, acc) in enumerate(zip(names, r.metrics["IoU"], r.metrics["ACC"])):
            w.writerow([i, nm, _fmt_csv(iou), _fmt_csv(acc)]
                       + ([_fmt_csv(r.metrics["BoundaryIoU"][i]), _fmt_csv(r.metrics["min(IoU, B-Iou)"][i])]
                          if boundary else []))
        written.append(write_bytes_atomic(join(out, f"per_class_{r.name}.csv"), buf.getvalue().encode()))
    return written


def _fmt_csv(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


# ------------------------------------------------------------------------------------------------
# pseudo-label evaluation
# ------------------------------------------------------------------------------------------------
def _stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(str(uri).replace("\\", "/")))[0]


GENERIC = "generic"  # --labels against a folder in the training layout: images/, labels/, class_names.txt
CONFIDENCE_FLOORS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)


class ConfidenceTally:
    """Pixels with truth counted by their stored confidence level (``confidence_png``'s 8 bits) and by
    whether their label is right. Why: choosing ``min_pixel_confidence`` for a fine-tune needs to know what
    each threshold keeps and how right that is, on images someone checked; a threshold can only help
    where the confident pixels are the right ones."""

    def __init__(self, ignore_label: int):
        self.ignore_label = ignore_label
        self.pixels = np.zeros(256, np.int64)
        self.right = np.zeros(256, np.int64)

    def add(self, pred: np.ndarray, levels: np.ndarray, truth: np.ndarray) -> None:
        """``levels``: uint8 confidence levels (confidence x 255), the shape of ``pred`` and ``truth``."""
        valid = truth != self.ignore_label
        lv = levels[valid]
        self.pixels += np.bincount(lv, minlength=256)
        self.right += np.bincount(lv[pred[valid] == truth[valid]], minlength=256)

    def table(self, floors: tuple[float, ...] = CONFIDENCE_FLOORS) -> list[dict]:
        """Per floor: the share (%) of pixels whose stored confidence is at or above it, and the share of
        those that are right (%, nan where none is)."""
        total = int(self.pixels.sum())
        rows = []
        for floor in floors:
            first = int(math.ceil(floor * 255 - 1e-6))  # the lowest level whose level / 255 reaches the floor
            n, right = int(self.pixels[first:].sum()), int(self.right[first:].sum())
            rows.append({"min_confidence": floor, "pixel_share": 100.0 * n / total if total else math.nan,
                         "pixel_accuracy": 100.0 * right / n if n else math.nan})
        return rows


def _generic_truth(root: str, class_names_file: str | None, label_names: list[str]) -> tuple[list[Pair], list[str]]:
    """Pairs of a generic-layout folder and its classes: --class-names, else its class_names.txt, else the
    labels' own vocabulary (the truth's ids then must be the vocabulary's)."""
    from ebseg_core.train_data import DatasetError, DatasetSpec, list_dataset

    try:
        samples, folder_names = list_dataset(DatasetSpec(root=root, layout=GENERIC))
    except DatasetError as e:
        raise EvaluateError(str(e)) from None
    pairs = [Pair(key=_stem(s.image), image_uri=s.image, label_uri=s.label) for s in samples]
    if class_names_file:
        return pairs, Vocabulary.from_options(file=class_names_file).names
    if folder_names:
        return pairs, Vocabulary.from_class_list(folder_names).names
    if not label_names:
        raise EvaluateError(f"{root} has no class_names.txt and the labels name no classes: give --class-names")
    return pairs, label_names


def evaluate_labels(labels_url: str, dataset: str, root: str, out: str | None = None,
                    class_names_file: str | None = None, log: Callable[[str], None] = print) -> EvalReport:
    """Score a label Parquet (rows matched to ground truth by image file name stem) on a benchmark, or
    (``dataset="generic"``) on a folder in the training layout, e.g. the labeled part of a lake.

    The Parquet's class ids must index the truth's class list: label with the same preset
    (``--vocabulary-preset ade150``) or vocabulary. Ground-truth images without a label row count as failures.
    """
    import pyarrow.dataset as pads

    from pipeline.schema import decode_confidence_png, decode_label_png, list_parquet_files, read_metadata

    try:
        files, fs = list_parquet_files(labels_url)
        meta = read_metadata(labels_url)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise EvaluateError(f"cannot read label Parquet at {labels_url}: {e}") from None
    if dataset == GENERIC:
        pairs, names = _generic_truth(root, class_names_file, list(meta.names or []))
        name, title, ignore_label, hint = GENERIC, root, 255, "the vocabulary of the truth's class_names.txt"
    else:
        try:
            b: Benchmark = get_benchmark(dataset)
            pairs = list_pairs(b, root)
        except BenchmarkError as e:
            raise EvaluateError(str(e)) from None
        names = benchmark_vocabulary(b, class_names_file).names
        name, title, ignore_label, hint = b.name, b.name, b.ignore_label, f"--vocabulary-preset {b.classes}"
    if meta.names and [n.lower() for n in meta.names] != [n.lower() for n in names]:
        raise EvaluateError(
            f"the labels' vocabulary ({meta.num_classes} classes, first {meta.names[:3]}) is not {title}'s "
            f"class list ({len(names)} classes, first {names[:3]}); label with {hint}")
    by_stem = {_stem(p.image_uri): p for p in pairs}
    ev = SemSegEvaluator(len(names), ignore_label, names)
    tally = ConfidenceTally(ignore_label)
    errors: list[str] = []
    seen: set[str] = set()
    t0 = time.perf_counter()
    dset = pads.dataset(files, format="parquet", filesystem=fs)
    for rb in dset.to_batches(columns=["uri", "status", "label_png", "confidence_png"], batch_size=64):
        d = rb.to_pydict()
        for uri, status, png, conf_png in zip(d["uri"], d["status"], d["label_png"], d["confidence_png"]):
            pair = by_stem.get(_stem(uri))
            if pair is None or pair.key in seen:
                continue
            seen.add(pair.key)
            if status != "ok" or png is None:
                errors.append(f"{uri}: label row has status {status!r}")
                continue
            try:
                pred = decode_label_png(png).astype(np.int64)
                gt = read_label(pair.label_uri)
                ev.process(pred, gt)
                if conf_png is not None:
                    tally.add(pred, decode_confidence_png(conf_png, as_float=False), gt)
            except Exception as e:
                errors.append(f"{uri}: {type(e).__name__}: {e}")
    missing = [p.image_uri for p in pairs if p.key not in seen]
    errors += [f"{u}: no label row for this image" for u in missing]
    wall = time.perf_counter() - t0
    res = DatasetResult(name, ev.compute(), ev.num_images, wall, errors,
                        confidence=tally.table() if tally.pixels.any() else None)
    report = EvalReport([res], {"predictor": "labels", "labels": labels_url, "tta": False}, wall,
                        ev.num_images / wall if wall > 0 else 0.0)
    for line in format_table(report) + (format_confidence(res) if res.confidence else []):
        log(line)
    if out:
        for url in save_report(report, out):
            log(f"wrote {url}")
    for msg in errors[:5]:
        log(f"error: {msg}")
    return report

