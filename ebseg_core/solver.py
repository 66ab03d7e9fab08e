"""The official EBSeg solver in plain PyTorch: AdamW over per-parameter groups and warmup x poly LR.

Kept next to the model (no Ray here) so a notebook or a benchmark trains with the same recipe as the
Ray Train job (``pipeline.train``), which builds its optimizer and scheduler from these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError

__all__ = ["SolverConfig", "SolverError", "param_groups", "build_optimizer", "poly_lr_factor", "PolyLR"]


@dataclass
class SolverConfig:
    ims_per_batch: int = 16  # global batch size (split evenly over workers)
    base_lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    weight_decay_embed_names: tuple[str, ...] = (
        "absolute_pos_embed",
        "positional_embedding",
        "pos_embed",
        "query_embed",
        "relative_position_bias_table",
    )
    backbone_multiplier: float = 1.0  # the official code scales every group's lr by this (see docs)
    clip_multiplier: float = 1.0  # lr factor for parameters under a module whose name contains "clip"
    max_iter: int = 120000
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 1.0
    clip_grad_norm: float = 0.01  # full-model L2 norm clipping; <= 0 disables
    amp: bool = True  # used on GPU only


class SolverError(UserError):
    """The solver cannot be built for this model and config."""


def _is_normalisation(module: nn.Module) -> bool:
    """Batch/instance/group/layer/local-response norms: their affine parameters get ``weight_decay_norm``.

    ``_NormBase`` is the common base of every BatchNorm, SyncBatchNorm and InstanceNorm variant.
    """
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm))


def param_groups(model: nn.Module, solver: SolverConfig) -> list[dict]:
    """One group per trainable parameter with the official lr / weight-decay rules.

    Norm layers and embedding-like parameters get their own decay; parameters of modules named
    "*clip*" get ``clip_multiplier``; the official code applies ``backbone_multiplier`` to every
    parameter (its condition is always true), kept here so the released recipes reproduce.
    """
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lr = solver.base_lr * solver.backbone_multiplier
            if "clip" in module_name:
                lr *= solver.clip_multiplier
            if _is_normalisation(module):
                wd = solver.weight_decay_norm
            elif isinstance(module, nn.Embedding) or any(x in pname for x in solver.weight_decay_embed_names):
                wd = solver.weight_decay_embed
            else:
                wd = solver.weight_decay
            groups.append({"params": [p], "lr": lr, "weight_decay": wd, "name": f"{module_name}.{pname}".lstrip(".")})
    return groups


def build_optimizer(model: nn.Module, solver: SolverConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (SolverError if nothing is trainable)."""
    groups = param_groups(model, solver)
    if not groups:
        raise SolverError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=solver.base_lr)


def poly_lr_factor(iteration: int, solver: SolverConfig) -> float:
    """Warmup (linear) x poly decay (1 - it/max_iter)^power, the official WarmupPolyLR."""
    warm = 1.0
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        warm = solver.warmup_factor * (1 - alpha) + alpha
    return warm * math.pow(max(0.0, 1.0 - iteration / solver.max_iter), solver.poly_power)


class PolyLR(torch.optim.lr_scheduler.LambdaLR):
    """:func:`poly_lr_factor` as a scheduler whose state dict holds plain values only (weights_only loads)."""

    def __init__(self, optimizer: torch.optim.Optimizer, solver: SolverConfig):
        self._solver = solver
        super().__init__(optimizer, lambda it: poly_lr_factor(it, solver))

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.pop("_solver", None)
        return sd
