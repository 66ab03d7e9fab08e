"""EBSeg training on Ray Train: DDP workers, the official solver, checkpoints in object storage, resume.

One call, :func:`train`, runs the whole job from the driver:

* the driver lists the dataset once (local path or any fsspec URL) and checks it (structure, class
  names, the first samples), so data mistakes surface as one clear message before any worker starts;
  it writes the sample list as Parquet shards under ``<run dir>/samples/`` and sends the workers only
  their URLs and row counts (the payload does not grow with the dataset);
* each Ray Train worker is a :class:`Trainer` (build, resume, step, validate, save): it builds the model,
  wraps the loss module in DDP (gloo on CPU, nccl on GPU), and reads its shard of an epoch-shuffled
  sample stream straight from storage (no local copy; the stream is a pure function of the iteration,
  so a resumed run reads exactly what an uninterrupted one would);
* solver = the official recipe: AdamW, poly LR (power 0.9, optional linear warmup), full-model
  gradient-norm clipping, AMP (fp16 + GradScaler) on GPU, per-parameter weight decay groups;
* every ``checkpoint_period`` iterations rank 0 writes a checkpoint through ``ray.train.report`` to
  ``storage_path`` (local or s3://...): ``train_state.pt`` (trainable weights, optimizer, scheduler,
  grad scaler, iteration, every rank's RNG state as tensors, the config; plain tensors and values, read
  back with ``weights_only=True`` so a planted file cannot run code) and the deliverable inference
  weights ``model.safetensors`` (the whole model; preset, inference settings and training vocabulary
  in its header, see ebseg_core.checkpoint) + ``meta.json``; a restarted run (FailureConfig, or the
  same ``name`` run again) resumes from the latest one;
* every ``val_period`` iterations all workers evaluate a shard of the validation set and the
  confusion matrices are summed: mIoU is reported as a metric.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ebseg_core.checkpoint import META_FILE, TRAIN_STATE_FILE, WEIGHTS_FILE, CheckpointError, save_weights
from ebseg_core.config import CriterionConfig
from ebseg_core.errors import UserError
from ebseg_core.model_spec import ModelSpec
from ebseg_core.solver import PolyLR, SolverConfig, build_optimizer
from ebseg_core.train_data import AugmentConfig, DatasetError, DatasetSpec, Sample, list_dataset, read_sample

if TYPE_CHECKING:
    from ebseg_core.model import EBSeg

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    preset: str = "ebseg-b"  # ebseg-b | ebseg-l | ebseg-tiny
    checkpoint: str | None = None  # EBSeg weights to start from (fine-tuning); None = fresh model
    clip_pretrained: str | None = None  # open_clip pretrained tag or file for both CLIP towers ("openai")
    sam_checkpoint: str | None = None  # official SAM checkpoint (path or URL) for the SAM backbone
    text_cache_dir: str | None = None
    # Validation inference: shortest side (None: the preset's 640, as the official evaluation). Models
    # trained on small crops are validated near their training scale (tiny_generic.yaml: 128).
    inference_size: int | None = None
    # Balancing weights of the CLIP branches at validation (None: the preset's official values).
    inference_alpha: float | None = None
    inference_beta: float | None = None
    inference_gamma: float | None = None

    def spec(self) -> ModelSpec:
        """This run's model config as ModelSpec makes it: the preset with the run's validation-inference settings.

        Without ``checkpoint``: the weights training starts from never set the run's inference settings.
        """
        return ModelSpec(preset=self.preset, checkpoint=None, inference_size=self.inference_size,
                         inference_alpha=self.inference_alpha, inference_beta=self.inference_beta,
                         inference_gamma=self.inference_gamma)


@dataclass
class DataConfig:
    train: str = ""  # dataset root (local path or URL)
    layout: str = "generic"  # generic | coco171 | labels (label Parquet at `train`, rows chosen by `labels`)
    labels: dict = field(default_factory=dict)  # layout 'labels': the query, see pipeline.label_source
    split: str = "train2017"  # coco171: the split folder
    val: str | None = None  # validation dataset root (same layout; generic for 'labels'); None = no validation
    val_split: str = "val2017"
    val_max_images: int = 0  # 0 = all
    vocabulary: str | None = None  # None: class_names.txt (generic) / preset coco171; else a Vocabulary spec
    skip_bad: bool = False  # skip unreadable / invalid samples (counted) instead of failing
    loader_workers: int = 0  # DataLoader worker processes per training worker
    preflight_samples: int = 4  # samples the driver decodes and checks before starting


@dataclass
class RunConfig:
    name: str = "ebseg-train"
    storage_path: str = "./runs"  # local dir or s3://bucket/prefix
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # SPREAD to put workers on different nodes
    checkpoint_period: int = 5000
    num_to_keep: int = 2
    val_period: int = 10000
    log_period: int = 20
    max_failures: int = 0
    seed: int = 0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(UserError):
    """A training config a user wrote is wrong; the message says which key and why."""


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {where + key!r}; known: {', '.join(sorted(fields))}")
        f = fields[key]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            kwargs[key] = _from_dict(f.default_factory, value, f"{where}{key}.")
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {where.rstrip('.') or 'config'}: {e}") from None


def config_from_dict(data: dict) -> TrainConfig:
    """Build a TrainConfig from nested dicts (a parsed YAML file), rejecting unknown keys."""
    return _from_dict(TrainConfig, data or {}, "")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested config dict."""
    import yaml

    data = copy.deepcopy(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. solver.max_iter=1000), got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config (``_base_: other.yaml`` merges a base file first) plus overrides."""
    import yaml

    def read(p: str) -> dict:
        if not os.path.isfile(p):
            raise ConfigError(f"config file not found: {p}")
        with open(p, encoding="utf-8") as f:
            try:
                d = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p} is not valid YAML: {e}") from None
        base = d.pop("_base_", None)
        if base:
            merged = read(os.path.join(os.path.dirname(p), base))
            _deep_update(merged, d)
            return merged
        return d

    data = read(path) if path else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


# --------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------
def _vocabulary(cfg: TrainConfig, class_names: list[tuple[str, list[str]]] | None):
    from ebseg_core.vocabulary import Vocabulary

    if cfg.data.vocabulary:
        vocab = Vocabulary.from_spec(cfg.data.vocabulary)
    elif class_names is not None:
        source = cfg.data.train if cfg.data.layout == "labels" else f"{cfg.data.train}/class_names.txt"
        vocab = Vocabulary.from_class_list(class_names, source=source)
    elif cfg.data.layout == "coco171":
        vocab = Vocabulary.preset("coco171")
    else:
        raise ConfigError("no vocabulary: set data.vocabulary")
    if class_names is not None and len(class_names) != len(vocab):
        raise DatasetError(
            f"class_names.txt of {cfg.data.train} lists {len(class_names)} classes but the vocabulary "
            f"{cfg.data.vocabulary!r} has {len(vocab)}"
        )
    return vocab


def prepare(cfg: TrainConfig) -> dict:
    """Driver-side checks and listings: the config, the sample lists, the vocabulary, the label reader.

    The lists stay on the driver: :func:`worker_payload` writes them as shards that workers read.
    """
    if not cfg.data.train:
        raise ConfigError("data.train is not set: give the training dataset root (local path or s3://...)")
    try:
        cfg.model.spec().config()
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.solver.ims_per_batch % cfg.run.num_workers:
        raise ConfigError(
            f"solver.ims_per_batch={cfg.solver.ims_per_batch} is not divisible by run.num_workers={cfg.run.num_workers}"
        )
    checkpoint = _resolve_base_checkpoint(cfg.model)
    reader = None
    class_names: list[tuple[str, list[str]]] | None
    if cfg.data.layout == "labels":
        from pipeline.curate import CurationError
        from pipeline.label_source import LabelSourceSpec, list_label_samples

        try:
            listing = list_label_samples(LabelSourceSpec.from_options(cfg.data.train, cfg.data.labels))
        except CurationError as e:
            raise ConfigError(f"data.labels: {e}") from None
        samples, class_names, reader = listing.samples, listing.class_names, listing.reader
    else:
        if cfg.data.labels:
            raise ConfigError(f"data.labels is for data.layout 'labels', not {cfg.data.layout!r}")
        spec = DatasetSpec(cfg.data.train, cfg.data.layout, cfg.data.split, cfg.data.skip_bad)
        samples, class_names = list_dataset(spec)
    vocab = _vocabulary(cfg, class_names)
    for s in samples[: cfg.data.preflight_samples]:
        (reader or read_sample)(s, len(vocab))
    val: list[Sample] = []
    if cfg.data.val:
        val_layout = "generic" if cfg.data.layout == "labels" else cfg.data.layout
        vspec = DatasetSpec(cfg.data.val, val_layout, cfg.data.val_split, cfg.data.skip_bad)
        val, val_names = list_dataset(vspec)
        if val_names is not None and [prompt for prompt, _ in val_names] != vocab.names:
            raise DatasetError(f"class_names.txt of {cfg.data.val} differs from the training classes")
        if cfg.data.val_max_images:
            val = val[: cfg.data.val_max_images]
    if len(samples) < cfg.run.num_workers:
        raise DatasetError(f"{len(samples)} training samples for {cfg.run.num_workers} workers")
    config = cfg.to_dict()
    config["model"]["checkpoint"] = checkpoint  # every worker loads the same file, whatever the run dir gains
    return {
        "config": config,
        "samples": [(s.image, s.label) for s in samples],
        "val_samples": [(s.image, s.label) for s in val],
        "vocabulary": vocab.to_json(),
        "label_reader": reader.to_dict() if reader is not None else None,
    }


def worker_payload(cfg: TrainConfig, listing: dict) -> dict:
    """What every worker gets: ``listing`` with its sample lists replaced by Parquet shards written once
    under ``<run dir>/samples/`` (local or object storage), so its size does not grow with the dataset."""
    from ebseg_core.train_data import write_sample_shards

    def shards(pairs: list) -> dict | None:
        if not pairs:
            return None
        return write_sample_shards([Sample(*p) for p in pairs], f"{run_dir(cfg)}/samples").to_dict()

    payload = {k: v for k, v in listing.items() if k not in ("samples", "val_samples")}
    return {**payload, "train_shards": shards(listing["samples"]), "val_shards": shards(listing["val_samples"])}


def _resolve_base_checkpoint(mcfg: ModelConfig) -> str | None:
    """The weights file that ``model.checkpoint`` names (a run dir, checkpoint dir or file; local or URL).

    A run directory means its latest checkpoint; the file must fit ``model.preset``.
    """
    if not mcfg.checkpoint:
        return None
    from ebseg_core.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(mcfg.checkpoint, preset=mcfg.preset).weights_url
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"model.checkpoint: {e}") from None


def _storage(cfg: TrainConfig):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
    path = cfg.run.storage_path
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
        return os.path.abspath(path), None
    import pyarrow.fs as pafs

    from ebseg_core.storage import filesystem_for

    fs, p = filesystem_for(path)
    return p.rstrip("/"), pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def train(cfg: TrainConfig, address: str | None = None, trainer: Callable[[dict], Trainer] | None = None) -> dict:
    """Run (or resume) a training job on a Ray cluster; returns the last reported metrics.

    ``trainer`` builds each worker's :class:`Trainer` from the payload (default: :class:`Trainer`; a
    subclass changes one part).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    listing = prepare(cfg)
    payload = worker_payload(cfg, listing)
    if not ray.is_initialized():
        # No credentials in the runtime env: Ray writes runtime envs in plain text to its logs. Cluster
        # nodes hold their own (instance roles, their environment); a local cluster started here inherits
        # this process's environment. See docs/training.md, "Credentials".
        ray.init(address=address, log_to_driver=True)
    storage_path, storage_fs = _storage(cfg)
    run = cfg.run
    torch_trainer = TorchTrainer(
        train_loop_per_worker=functools.partial(_run_worker, trainer or Trainer),
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if run.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})},
            placement_strategy=run.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.num_to_keep),
            # Ray Train's own INFO lines (worker group starts, checkpoint uploads): warnings and errors only.
            # Ray's stub types V1's RunConfig, which lacks logging_config; the runtime one has it.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]
        ),
    )
    result = torch_trainer.fit()
    if result.error:
        raise result.error
    out = dict(result.metrics or {})
    out["run_dir"] = run_dir(cfg)
    out["label_command"] = label_command(cfg, payload["vocabulary"])
    if result.checkpoint is not None:
        out["checkpoint_path"] = result.checkpoint.path
    return out


def run_dir(cfg: TrainConfig) -> str:
    """Where the run's checkpoints go, as a user names it (``--checkpoint`` of label/segment/evaluate)."""
    path = cfg.run.storage_path.rstrip("/")
    return f"{path if '://' in path else os.path.abspath(path)}/{cfg.run.name}"


def label_command(cfg: TrainConfig, vocabulary_json: str) -> str:
    """The `ebseg label` command that labels with this run's result and its training classes."""
    import shlex

    from ebseg_core.vocabulary import Vocabulary

    vocab = Vocabulary.from_json(vocabulary_json)
    inline = ",".join(";".join(s) for s in vocab.synonyms)
    if vocab.source.startswith("preset:"):
        classes = f"--vocabulary-preset {vocab.source.split(':', 1)[1]}"
    elif vocab.prompts is None and Vocabulary.parse(inline).synonyms == vocab.synonyms and len(inline) <= 300:
        classes = f"--vocabulary {shlex.quote(inline)}"
    elif cfg.data.layout == "generic" and not cfg.data.vocabulary:
        classes = f"--vocabulary-file {shlex.quote(cfg.data.train.rstrip('/') + '/class_names.txt')}"
    else:
        classes = f"--vocabulary-file {shlex.quote(cfg.data.vocabulary or 'CLASSES.txt')}"
    return (f"ebseg label --input IMAGES_DIR_OR_URL --output LABELS_DIR_OR_URL {classes} "
            f"--checkpoint {shlex.quote(run_dir(cfg))}")


# --------------------------------------------------------------------------------------------------
# Checkpoint format (the one place that writes and reads it)
# --------------------------------------------------------------------------------------------------
def write_checkpoint(directory: str, model: EBSeg, train_state: dict, meta: dict, metrics: dict) -> None:
    """One checkpoint directory: ``train_state.pt`` (to resume; plain tensors and values only, loaded with
    ``weights_only=True``), ``model.safetensors`` (the deliverable inference weights, ``meta`` in its
    header) and ``meta.json`` (``meta`` + its sha256 + the metrics at that iteration)."""
    torch.save(train_state, os.path.join(directory, TRAIN_STATE_FILE))
    meta = {**meta, "weights_sha256": save_weights(os.path.join(directory, WEIGHTS_FILE), model, meta)}
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump({**meta, "metrics": metrics}, f)


def load_train_state(path: str) -> dict:
    """A checkpoint's training state; refuses (CheckpointError, one line) anything but tensors and plain values."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        hint = next((line.strip() for line in reason if "Unsupported global" in line), reason[0] if reason else "")
        raise CheckpointError(
            f"refusing to load {os.path.basename(path)}: it holds Python objects, not only tensors and plain "
            f"values, and loading it could run code ({hint}). Was it written by this version? "
            f"Delete that checkpoint directory to resume from an older one.") from None


def weights_metadata(cfg: TrainConfig, vocabulary_json: str, iteration: int) -> dict:
    """What inference needs besides the tensors: the settings validation used, the training classes."""
    m = cfg.model
    inference = {"size": m.inference_size, "alpha": m.inference_alpha, "beta": m.inference_beta,
                 "gamma": m.inference_gamma}
    return {
        "format": 1,
        "inference": {k: v for k, v in inference.items() if v is not None},
        "vocabulary": vocabulary_json,
        "iteration": iteration,
        "run": cfg.run.name,
        "base": {"checkpoint": m.checkpoint, "clip_pretrained": m.clip_pretrained, "sam_checkpoint": m.sam_checkpoint},
    }


def _rng_state() -> dict:
    """This process's RNG states as tensors and plain numbers (loadable with weights_only=True)."""
    legacy = np.random.get_state()
    if not isinstance(legacy, tuple):  # a dict only when the global generator is not MT19937
        raise TypeError(f"numpy's global generator is {legacy.get('bit_generator')}, expected MT19937")
    kind, keys, pos, has_gauss, cached = legacy
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])



# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------
def build_training_model(mcfg: ModelConfig) -> EBSeg:
    """The preset's model: from an EBSeg checkpoint (fine-tuning), or CLIP/SAM pretrained towers + a fresh head."""
    from ebseg_core import build_model, load_open_clip_weights, load_sam_weights

    model = build_model(mcfg.spec().config(), checkpoint=mcfg.checkpoint)
    if not mcfg.checkpoint:
        if mcfg.clip_pretrained:
            load_open_clip_weights(model, pretrained=mcfg.clip_pretrained)
        if mcfg.sam_checkpoint:
            load_sam_weights(model, mcfg.sam_checkpoint)
    return model


@dataclass
class TrainerParts:
    """What a worker trains with, built once by :meth:`Trainer.build`."""

    model: EBSeg  # the deliverable; its trainable part is what train_state.pt holds
    loss: torch.nn.Module  # ebseg_core.criterion.TrainingLoss: model + criterion, the one loss entry point
    forward: torch.nn.Module  # ``loss``, wrapped in DistributedDataParallel when there is more than one worker
    optimizer: torch.optim.Optimizer
    scheduler: PolyLR
    scaler: torch.amp.GradScaler
    trainable: list[torch.nn.Parameter]


class Trainer:
    """One Ray Train worker: :meth:`build` the parts, :meth:`resume` from Ray's checkpoint, then :meth:`run`
    (:meth:`step` per iteration; :meth:`validate`, :meth:`save` and :meth:`report` every period).

    ``train(cfg, trainer=...)`` accepts a subclass (or any callable payload -> Trainer); the tests
    inject failures that way (tests/train_faults.py) instead of through the user's config.
    """

    def __init__(self, payload: dict):
        import ray.train

        from ebseg_core.train_data import SampleShards, ShardedSamples
        from ebseg_core.vocabulary import Vocabulary

        self.payload = payload
        self.cfg = config_from_dict(payload["config"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = torch.device(f"cuda:{ctx.get_local_rank()}" if self.cfg.run.use_gpu else "cpu")
        self.vocab = Vocabulary.from_json(payload["vocabulary"])
        self.samples = ShardedSamples(SampleShards.from_dict(payload["train_shards"]))
        val = ShardedSamples(SampleShards.from_dict(payload["val_shards"])) if payload["val_shards"] else []
        self.val_samples = [val[i] for i in range(self.rank, len(val), self.world)]  # this worker's share
        self.use_amp = self.cfg.solver.amp and self.cfg.run.use_gpu
        self.iteration = 0
        self.resumed_from: int | None = None
        self.history: list[list] = []  # [iteration, mean loss since the previous report]

    def build(self) -> TrainerParts:
        """Model, loss module (DDP-wrapped over several workers), optimizer, scheduler, grad scaler."""
        from ebseg_core.criterion import TrainingLoss

        cfg = self.cfg
        _quiet_ray_train_reports()
        if cfg.run.use_gpu:
            torch.cuda.set_device(self.device)
        if cfg.model.text_cache_dir:
            os.environ["EBSEG_CACHE_DIR"] = cfg.model.text_cache_dir
        torch.manual_seed(cfg.run.seed + self.rank)
        model = build_training_model(cfg.model).to(self.device)
        model.train()
        loss = TrainingLoss(model, self.vocab, cfg.criterion).to(self.device)
        forward: torch.nn.Module = loss
        if self.world > 1:
            forward = torch.nn.parallel.DistributedDataParallel(
                loss, device_ids=[self.device.index] if cfg.run.use_gpu else None, find_unused_parameters=False)
        optimizer = build_optimizer(model, cfg.solver)
        return TrainerParts(model, loss, forward, optimizer, PolyLR(optimizer, cfg.solver),
                            torch.amp.GradScaler("cuda", enabled=self.use_amp),
                            [p for p in model.parameters() if p.requires_grad])

    def resume(self, parts: TrainerParts, state: dict) -> None:
        """Continue exactly where ``state`` (a loaded train_state.pt) stopped: weights, solver, RNG, history."""
        loaded = parts.model.load_state_dict(state["model"], strict=False)
        if loaded.unexpected_keys:
            raise CheckpointError(f"checkpoint has unexpected keys: {loaded.unexpected_keys[:5]}")
        parts.model.weights_changed()
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        parts.scaler.load_state_dict(state["scaler"])
        self.iteration = self.resumed_from = int(state["iteration"])
        self.history = [list(h) for h in state.get("loss_history", [])]
        _set_rng_state(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
        if self.rank == 0:
            log.info("[train] resumed from iteration %d", self.iteration)

    def step(self, parts: TrainerParts, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step on this worker's share of the batch; returns the weighted loss terms."""
        images = images.to(self.device, non_blocking=True)
        targets = [{"labels": t["labels"].to(self.device), "masks": t["masks"].to(self.device)} for t in targets]
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            losses = parts.forward(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss became {total.item()} at iteration {self.iteration}: {_terms(losses)}")
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(total).backward()
        parts.scaler.unscale_(parts.optimizer)
        if self.cfg.solver.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parts.trainable, self.cfg.solver.clip_grad_norm)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.scheduler.step()
        self.iteration += 1
        return losses

    def validate(self, parts: TrainerParts) -> float:
        """mIoU (fraction, detectron2's definition) of the validation set, sharded over the workers."""
        from ebseg_core.evaluation import SemSegEvaluator
        from ebseg_core.train_data import EvalSampleDataset, ignore_label_for

        model = parts.model
        model.eval()
        evaluator = SemSegEvaluator(len(self.vocab), ignore_label_for(len(self.vocab)))
        shard = EvalSampleDataset(self.val_samples, len(self.vocab))
        with torch.no_grad():
            for i in range(len(shard)):
                image, label = shard[i]
                evaluator.process(model.segment([image], self.vocab, batch_size=1)[0].label_map, label)
        model.train()
        matrix = torch.from_numpy(evaluator.matrix).to(self.device)
        if self.world > 1:
            torch.distributed.all_reduce(matrix)
        evaluator.matrix = matrix.cpu().numpy()
        return evaluator.compute()["mIoU"] / 100.0

    def save(self, parts: TrainerParts, metrics: dict) -> str | None:
        """Rank 0 writes a checkpoint directory (see :func:`write_checkpoint`) and returns it; every rank
        contributes its RNG state, so a resume continues each worker's random stream."""
        rng_states: list[dict | None] = [None] * self.world
        if self.world > 1:
            torch.distributed.all_gather_object(rng_states, _rng_state())
        else:
            rng_states = [_rng_state()]
        if self.rank != 0:
            return None
        model = parts.model
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items() if k in trainable},
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "iteration": self.iteration,
            "rng": rng_states,
            "config": self.payload["config"],
            "vocabulary": self.payload["vocabulary"],
            "loss_history": self.history,
        }
        directory = tempfile.mkdtemp(prefix="ebseg_ckpt_")
        meta = weights_metadata(self.cfg, self.payload["vocabulary"], self.iteration)
        write_checkpoint(directory, model, state, {**meta, "preset": self.cfg.model.preset}, metrics)
        return directory

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Hand metrics (and rank 0's checkpoint) to Ray Train, which uploads it to ``run.storage_path``."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        try:
            ray.train.report(metrics, checkpoint=checkpoint)
        finally:
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def _loader(self) -> torch.utils.data.DataLoader:
        """This worker's stream from the current iteration on (a pure function of the position)."""
        from ebseg_core.train_data import TrainSampleDataset, collate_train
        from pipeline.label_source import LabelRowReader

        cfg, per_worker = self.cfg, self.cfg.solver.ims_per_batch // self.world
        reader = self.payload.get("label_reader")
        dataset = TrainSampleDataset(
            self.samples, len(self.vocab), cfg.augment, rank=self.rank, world_size=self.world, seed=cfg.run.seed,
            skip_bad=cfg.data.skip_bad, reader=LabelRowReader.from_dict(reader) if reader else None,
            # pseudo-labels' ignore pixels (below min_pixel_confidence, dropped classes) are unknown, not "no class"
            ignore_is_unknown=cfg.data.layout == "labels")
        return torch.utils.data.DataLoader(
            dataset, batch_size=per_worker, sampler=range(self.iteration * per_worker, 2**62),
            num_workers=cfg.data.loader_workers, collate_fn=collate_train,
            persistent_workers=cfg.data.loader_workers > 0,
            # Its own generator: creating the iterator draws a base seed, which from the global generator
            # would shift the criterion's point sampling after a resume restored the global RNG state.
            generator=torch.Generator().manual_seed(cfg.run.seed * 1000 + self.rank))

    def _num_nodes(self) -> int:
        import ray

        if self.world == 1:
            return 1
        nodes: list[str | None] = [None] * self.world
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        return len(set(nodes))

    def run(self) -> None:
        """Build, resume if Ray Train has a checkpoint, and train to ``solver.max_iter``."""
        import ray.train

        parts = self.build()
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self.resume(parts, load_train_state(os.path.join(d, TRAIN_STATE_FILE)))
        cfg, max_iter = self.cfg, self.cfg.solver.max_iter
        num_nodes = self._num_nodes()
        window, started, steps, bad_total = [], time.time(), 0, 0
        batches = iter(self._loader())
        while self.iteration < max_iter:
            images, targets, bad = next(batches)
            bad_total += bad
            lr = parts.optimizer.param_groups[0]["lr"]
            losses = self.step(parts, images, targets)
            window.append(float(sum(v.detach() for v in losses.values())))
            steps += 1
            it = self.iteration
            is_log = it % cfg.run.log_period == 0 or it == max_iter
            is_ckpt = it % cfg.run.checkpoint_period == 0 or it == max_iter
            is_val = bool(self.payload["val_shards"]) and (it % cfg.run.val_period == 0 or it == max_iter)
            if not (is_log or is_ckpt or is_val):
                continue
            mean = torch.tensor([sum(window) / len(window)], device=self.device, dtype=torch.float64)
            window = []
            if self.world > 1:
                torch.distributed.all_reduce(mean)
            self.history.append([it, float(mean.item() / self.world)])
            speed = steps / max(time.time() - started, 1e-9)
            metrics = {
                "iteration": it, "loss": self.history[-1][1],  # mean over the iterations since the last report
                **_terms(losses), "lr": lr, "it_per_s": speed, "bad_samples": bad_total,
                "resumed_from": -1 if self.resumed_from is None else self.resumed_from,
                "num_nodes": num_nodes, "world_size": self.world, "loss_history": [list(h) for h in self.history],
            }
            if is_val:
                metrics["val_miou"] = self.validate(parts)
            if self.rank == 0 and is_log:
                # Through the logger, not print: Ray Train's print patch would show each line twice.
                log.info("%s", _progress_line(metrics, max_iter))
            self.report(metrics, self.save(parts, metrics) if is_ckpt else None)


def _quiet_ray_train_reports() -> None:
    """Ray Train (2.60) logs every report's whole metrics dict at INFO, the loss history included, so the
    log would grow with the square of the run length; its logger is named by its file path, out of reach
    of ``LoggingConfig``. Our [train] lines say the same once per ``log_period``."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _run_worker(trainer: Callable[[dict], Trainer], payload: dict) -> None:
    """Ray Train's per-worker entry point."""
    trainer(payload).run()


def _progress_line(m: dict, max_iter: int) -> str:
    speed = m["it_per_s"]
    extra = f" val mIoU {m['val_miou']:.4f}" if "val_miou" in m else ""
    return (f"[train] iter {m['iteration']}/{max_iter} loss {m['loss']:.3f} "
            f"(ce {m['loss_ce_all']:.3f} ce_clip {m['loss_ce_clip_all']:.3f} "
            f"mask {m['loss_mask_all']:.3f} dice {m['loss_dice_all']:.3f} ssc {m['loss_ssc']:.3f}) "
            f"lr {m['lr']:.2e} {speed:.2f} it/s ETA {_fmt_eta((max_iter - m['iteration']) / max(speed, 1e-9))}{extra}")


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _terms(losses: dict) -> dict:
    """Loss terms summed over predictions, for progress lines."""
    out = {"loss_ce_all": 0.0, "loss_ce_clip_all": 0.0, "loss_mask_all": 0.0, "loss_dice_all": 0.0, "loss_ssc": 0.0}
    for k, v in losses.items():
        x = float(v.detach().float().item())
        if k.startswith("1_loss_ce"):
            out["loss_ce_clip_all"] += x
        elif k.startswith("loss_ce"):
            out["loss_ce_all"] += x
        elif k.startswith("loss_mask"):
            out["loss_mask_all"] += x
        elif k.startswith("loss_dice"):
            out["loss_dice_all"] += x
        elif k.startswith("mse_ssc"):
            out["loss_ssc"] += x
    return out
