"""What model a command runs: preset -> config (+ the checkpoint's inference settings) -> model -> device/precision.

`ebseg segment`, `ebseg label` and `ebseg evaluate` build one :class:`ModelSpec` on the driver from their
flags (:meth:`ModelSpec.from_options` checks them and resolves the checkpoint once, before any worker
starts), ship it to their workers, and each worker calls :meth:`ModelSpec.build`. Writers get
:meth:`ModelSpec.describe` (what the output files record about the model) as an argument.

Importing this module does not import torch (the CLI's ``--help`` and the read tasks stay light); so the
resize rule of the model's input lives here too (:func:`resized_shape`, :meth:`ModelSpec.padded_size`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from .checkpoint import ResolvedCheckpoint
    from .config import EBSegConfig
    from .model import EBSeg
    from .vocabulary import Vocabulary

DEFAULT_PRESET = "ebseg-b"


class ModelSpecError(UserError):
    """The model flags do not make a usable model (no weights named, weights that do not fit, bad sizes)."""


def resized_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """Shortest side -> `short`, longest capped at `max_size` (detectron2 ResizeShortestEdge rounding)."""
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    return int(nh + 0.5), int(nw + 0.5)


def padded_size(h: int, w: int, short: int, max_size: int, divisibility: int) -> tuple[int, int]:
    """The padded model input of an h x w image, in units of ``divisibility``: images with equal padded
    sizes share a model call without changing any result (``EBSeg.segment`` batches only those)."""
    nh, nw = resized_shape(h, w, short, max_size)
    return -(-nh // divisibility), -(-nw // divisibility)


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to build the same model as every other worker; small and picklable."""

    preset: str
    checkpoint: ResolvedCheckpoint | None  # None: random weights (seeded: the same model in every process)
    inference_size: int | None = None  # shorter side the model sees; None: the checkpoint's, else the preset's
    inference_max_size: int | None = None
    # Balancing weights of the CLIP branches; None: the checkpoint's, else the preset's (with_inference_settings).
    inference_alpha: float | None = None
    inference_beta: float | None = None
    inference_gamma: float | None = None
    precision: str = "auto"  # ebseg_core.model.autocast_dtype_for
    batch_size: int = 4  # images per model call
    torch_threads: int = 0  # pipeline.resources.actor_torch_threads; 0 leaves torch alone

    @classmethod
    def from_options(cls, *, checkpoint: str | None, random_weights: bool = False, preset: str | None = None,
                     best_checkpoint: bool = False, inference_size: int | None = None,
                     inference_max_size: int | None = None, precision: str = "auto",
                     batch_size: int = 4) -> ModelSpec:
        """The spec of the model flags, checked: exactly one of a checkpoint and random weights, a
        checkpoint that fits its preset (read from its metadata or shapes, not loaded), sizes the preset takes."""
        if checkpoint is None and not random_weights:
            raise ModelSpecError("no --checkpoint given. Pass --checkpoint PATH_OR_URL (an official EBSeg .pth, or a "
                                 "run/checkpoint directory or model.safetensors of `ebseg train`), or --random-weights "
                                 "to try the tool with an untrained model.")
        if checkpoint is not None and random_weights:
            raise ModelSpecError("--checkpoint and --random-weights exclude each other")
        if batch_size < 1:
            raise ModelSpecError("--batch-size must be positive")
        resolved = _resolve(checkpoint, preset, best_checkpoint) if checkpoint is not None else None
        spec = cls(preset=resolved.preset if resolved else (preset or DEFAULT_PRESET), checkpoint=resolved,
                   inference_size=inference_size, inference_max_size=inference_max_size, precision=precision,
                   batch_size=batch_size)
        try:
            spec.config()
        except UserError as exc:
            raise ModelSpecError(str(exc)) from None
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelSpecError(f"bad model settings: {exc}") from None
        return spec

    def with_threads(self, torch_threads: int) -> ModelSpec:
        return dataclasses.replace(self, torch_threads=torch_threads)

    def config(self) -> EBSegConfig:
        """The preset's config (with the checkpoint's inference settings) and the inference overrides."""
        from .config import preset_config, with_inference_settings

        if self.checkpoint is not None:
            cfg = self.checkpoint.model_config(self.inference_size, self.inference_max_size)
        else:
            cfg = with_inference_settings(preset_config(self.preset), self.inference_size, self.inference_max_size)
        return with_inference_settings(cfg, alpha=self.inference_alpha, beta=self.inference_beta,
                                       gamma=self.inference_gamma)

    def input_sizing(self) -> tuple[int, int, int]:
        """(shorter side, longer-side cap, size divisibility) of the model input: :func:`padded_size`'s numbers."""
        cfg = self.config()
        return cfg.test_min_size, cfg.test_max_size, cfg.size_divisibility

    @property
    def model_id(self) -> str:
        """The model's identity as rows and run histories record it (``EBSeg.model_id`` of the built model)."""
        name = self.config().name
        return self.checkpoint.model_id(name) if self.checkpoint is not None else f"{name}:random"

    @property
    def random_weights(self) -> bool:
        return self.checkpoint is None

    def vocabulary_for(self, vocab: Vocabulary) -> Vocabulary:
        """``vocab`` with its seen/unseen flags fixed against the checkpoint's training classes."""
        return self.checkpoint.vocabulary_for(vocab) if self.checkpoint is not None else vocab

    def describe(self) -> dict[str, Any]:
        """What an output records about the model (label Parquet metadata ``ebseg.model``)."""
        return {"model_id": self.model_id, "preset": self.preset,
                "checkpoint": self.checkpoint.weights_url if self.checkpoint else None,
                "config": dataclasses.asdict(self.config())}

    def build(self, device: str | None = None) -> EBSeg:
        """The model in eval mode on ``device`` (default: cuda when there is one, else cpu), torch threads set."""
        import torch

        from .checkpoint import build_model

        if self.torch_threads:
            import os

            torch.set_num_threads(self.torch_threads if self.torch_threads > 0 else os.cpu_count() or 1)
        if self.checkpoint is None:  # random weights: the same in every process, so labels agree across actors
            torch.manual_seed(0)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return build_model(self.config(), checkpoint=self.checkpoint, device=device).eval()


def _resolve(checkpoint: str, preset: str | None, best: bool) -> ResolvedCheckpoint:
    from .checkpoint import CheckpointError, resolve_checkpoint

    try:
        return resolve_checkpoint(checkpoint, preset=preset, best=best)
    except (CheckpointError, FileNotFoundError) as exc:
        raise ModelSpecError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - storage unreachable, no permission
        raise ModelSpecError(f"cannot reach checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from None
