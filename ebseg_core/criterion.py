"""Training losses of EBSeg: Hungarian matcher, set criterion with point-sampled mask losses,
deep supervision and the Semantic Structure Consistency (SSC) loss.

Numerically this follows the official EBSeg training code (Mask2Former-style criterion with a
second class branch and the SSC term), including the order in which ``torch.rand`` is consumed,
so that with the same seed the same points are sampled. The parity fixture
(``reference/parity_tiny_b``) pins the behaviour; see ``tests/test_criterion_parity.py``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .config import CriterionConfig

if TYPE_CHECKING:
    from .model import EBSeg
    from .vocabulary import Vocabulary

__all__ = [
    "CriterionConfig",
    "EBSegCriterion",
    "QueryTargetMatcher",
    "PointCoordsProvider",
    "RandomPointCoords",
    "FixedPointCoords",
    "point_sample",
    "pad_target_masks",
    "TrainingLoss",
]

log = logging.getLogger(__name__)

Indices = list[tuple[Tensor, Tensor]]


def point_sample(features: Tensor, coords: Tensor, mode: str = "bilinear") -> Tensor:
    """Samples (bilinear by default) of ``features`` [N,C,H,W] at ``coords`` [N,P,2] in [0,1]^2 (x, y) -> [N,C,P].

    Same convention as PointRend: grid_sample on 2*coords-1, align_corners=False, zero padding.
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2)
    return F.grid_sample(features, grid, mode=mode, align_corners=False).squeeze(3)


class PointCoordsProvider(Protocol):
    """Where the matcher and the mask losses sample their points (a seam for exact-parity tests).

    ``layer`` is the prediction index: 0..L-2 for auxiliary predictions, L-1 for the final one.
    """

    def matcher_points(self, layer: int, image: int, num_points: int, device: torch.device) -> Tensor:
        """[1, P, 2] coordinates shared by all masks of one image."""
        ...

    def loss_points(
        self, layer: int, mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
    ) -> Tensor:
        """[N, P, 2] coordinates for the N matched mask logits [N, 1, H, W]."""
        ...


class RandomPointCoords:
    """The official sampling: uniform points for matching, uncertainty-weighted points for the losses.

    Consumes ``torch.rand`` on the default generator in the official order and shapes.
    """

    def matcher_points(self, layer: int, image: int, num_points: int, device: torch.device) -> Tensor:
        return torch.rand(1, num_points, 2, device=device)

    def loss_points(
        self, layer: int, mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
    ) -> Tensor:
        n = mask_logits.shape[0]
        num_sampled = int(num_points * oversample_ratio)
        candidates = torch.rand(n, num_sampled, 2, device=mask_logits.device)
        # Uncertainty = -|logit|: points near the decision boundary are the most informative.
        uncertainty = -point_sample(mask_logits, candidates).abs()
        num_uncertain = int(importance_sample_ratio * num_points)
        num_random = num_points - num_uncertain
        top = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1)[1]
        top = top + num_sampled * torch.arange(n, dtype=torch.long, device=mask_logits.device)[:, None]
        coords = candidates.view(-1, 2)[top.view(-1), :].view(n, num_uncertain, 2)
        if num_random > 0:
            coords = torch.cat([coords, torch.rand(n, num_random, 2, device=mask_logits.device)], dim=1)
        return coords


class FixedPointCoords:
    """Fixed coordinates for every layer and image (the parity fixture's ``fixed`` mode)."""

    def __init__(self, matcher_coords: Tensor, loss_coords: Tensor):
        if matcher_coords.dim() == 2:
            matcher_coords = matcher_coords[None]
        self.matcher_coords = matcher_coords  # [1, P, 2]
        self.loss_coords = loss_coords  # [P, 2]

    def matcher_points(self, layer: int, image: int, num_points: int, device: torch.device) -> Tensor:
        return self.matcher_coords.to(device)

    def loss_points(
        self, layer: int, mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
    ) -> Tensor:
        n = mask_logits.shape[0]
        return self.loss_coords.to(mask_logits.device)[None].expand(n, -1, -1)


def _pairwise_sigmoid_ce(logits: Tensor, targets: Tensor, known: Tensor | None = None) -> Tensor:
    """Mean binary cross-entropy of every prediction [Q,P] against every target [K,P] -> [Q,K].

    ``known`` [P] (0/1): only those points count (the mean is over them); None = every point (official).
    """
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    if known is None:
        cost = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, 1 - targets)
        return cost / logits.shape[1]
    cost = torch.einsum("nc,mc->nm", pos * known, targets) + torch.einsum("nc,mc->nm", neg * known, 1 - targets)
    return cost / known.sum().clamp_min(1)


def _pairwise_dice(logits: Tensor, targets: Tensor, known: Tensor | None = None) -> Tensor:
    """Dice loss (with +1 smoothing) of every prediction [Q,P] against every target [K,P] -> [Q,K]."""
    probs = logits.sigmoid().flatten(1)
    if known is not None:
        probs, targets = probs * known, targets * known
    numerator = 2 * torch.einsum("nc,mc->nm", probs, targets)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def _sigmoid_ce_loss(logits: Tensor, targets: Tensor, num_masks: float, known: Tensor | None = None) -> Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if known is None:
        return loss.mean(1).sum() / num_masks
    return ((loss * known).sum(1) / known.sum(1).clamp_min(1)).sum() / num_masks


def _dice_loss(logits: Tensor, targets: Tensor, num_masks: float, known: Tensor | None = None) -> Tensor:
    probs = logits.sigmoid().flatten(1)
    if known is not None:
        probs, targets = probs * known, targets * known
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


class QueryTargetMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth masks (scipy ``linear_sum_assignment``).

    Cost = class_weight * (-softmax prob of the target class) + mask_weight * BCE + dice_weight * dice,
    the mask terms evaluated on ``num_points`` random points shared by all masks of an image (only on its
    ``known`` pixels when the target has that map; see ``instances_from_label``).
    """

    def __init__(self, class_weight: float, mask_weight: float, dice_weight: float, num_points: int):
        super().__init__()
        if class_weight == 0 and mask_weight == 0 and dice_weight == 0:
            raise ValueError("all matcher costs are 0")
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def forward(
        self, outputs: dict, targets: list[dict], layer: int = 0, points: PointCoordsProvider | None = None
    ) -> Indices:
        points = points or RandomPointCoords()
        logits = outputs["pred_logits"]
        masks = outputs["pred_masks"]
        num_queries = logits.shape[1]
        indices = []
        for b in range(logits.shape[0]):
            prob = logits[b].softmax(-1)
            tgt_ids = targets[b]["labels"]
            cost_class = -prob[:, tgt_ids]
            out_mask = masks[b][:, None]
            tgt_mask = targets[b]["masks"].to(out_mask)[:, None]
            coords = points.matcher_points(layer, b, self.num_points, out_mask.device)
            tgt_pts = point_sample(tgt_mask, coords.repeat(tgt_mask.shape[0], 1, 1)).squeeze(1)
            out_pts = point_sample(out_mask, coords.repeat(out_mask.shape[0], 1, 1)).squeeze(1)
            known = None
            if "known" in targets[b]:  # nearest: a point is known or not, never half
                known = point_sample(targets[b]["known"].to(out_mask)[None, None], coords, mode="nearest")[0, 0]
            with torch.autocast(device_type=out_pts.device.type, enabled=False):
                out_pts = out_pts.float()
                tgt_pts = tgt_pts.float()
                known = None if known is None else known.float()
                cost_mask = _pairwise_sigmoid_ce(out_pts, tgt_pts, known)
                cost_dice = _pairwise_dice(out_pts, tgt_pts, known)
            cost = self.mask_weight * cost_mask + self.class_weight * cost_class + self.dice_weight * cost_dice
            cost = cost.reshape(num_queries, -1).cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    "non-finite matching cost (the model produced NaN/Inf logits or masks); "
                    "lower the learning rate or check the inputs"
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(np.asarray(rows), dtype=torch.int64),
                            torch.as_tensor(np.asarray(cols), dtype=torch.int64)))
        return indices


def _src_permutation(indices: Indices) -> tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src = torch.cat([src for src, _ in indices])
    return batch, src


def _tgt_permutation(indices: Indices) -> tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
    tgt = torch.cat([tgt for _, tgt in indices])
    return batch, tgt


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def official_weight_dict(config: CriterionConfig, num_aux: int, num_ssc: int = 1) -> dict[str, float]:
    """The loss weights of the official recipe (class weight x0.75 for both class branches)."""
    base = {
        "loss_ce": config.class_weight * config.class_loss_factor,
        "1_loss_ce": config.class_weight * config.class_loss_factor,
        "loss_mask": config.mask_weight,
        "loss_dice": config.dice_weight,
    }
    weights = dict(base)
    for i in range(num_aux):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    for i in range(num_ssc):
        weights[f"mse_ssc_loss_{i + 1}"] = config.ssc_weight
    return weights


class EBSegCriterion(nn.Module):
    """Set criterion of EBSeg: matching + CE (two class branches) + point-sampled BCE/dice + SSC.

    ``forward`` returns the WEIGHTED loss terms under the official keys; sum them for the total.
    """

    empty_weight: Tensor  # buffer: CE weight of each class, the last one (no object) down-weighted

    def __init__(self, num_classes: int, config: CriterionConfig | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.config = config or CriterionConfig()
        c = self.config
        self.matcher = QueryTargetMatcher(c.class_weight, c.mask_weight, c.dice_weight, c.matcher_num_points)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = c.no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # -- individual terms -------------------------------------------------------------------------
    def _class_losses(self, outputs: dict, targets: list[dict], indices: Indices) -> dict[str, Tensor]:
        idx = _src_permutation(indices)
        target_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        losses = {}
        for key, name in (("pred_logits", "loss_ce"), ("pred_logits_1", "1_loss_ce")):
            if key not in outputs:
                continue
            logits = outputs[key].float()
            target = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
            target[idx] = target_o.to(logits.device)
            losses[name] = F.cross_entropy(logits.transpose(1, 2), target, self.empty_weight.to(logits.device))
        return losses

    def _mask_losses(
        self, outputs: dict, targets: list[dict], indices: Indices, num_masks: float, layer: int,
        points: PointCoordsProvider,
    ) -> dict[str, Tensor]:
        src_masks = outputs["pred_masks"][_src_permutation(indices)]
        tb, tt = _tgt_permutation(indices)
        target_masks = torch.cat([t["masks"][tt[tb == b]] for b, t in enumerate(targets)]).to(src_masks)
        src_masks = src_masks[:, None]
        target_masks = target_masks[:, None]
        c = self.config
        known = None
        with torch.no_grad():
            coords = points.loss_points(layer, src_masks, c.num_points, c.oversample_ratio, c.importance_sample_ratio)
            labels = point_sample(target_masks, coords).squeeze(1)
            if "known" in targets[0]:
                known_maps = torch.stack([t["known"] for t in targets]).to(src_masks)[tb][:, None]
                known = point_sample(known_maps, coords, mode="nearest").squeeze(1)
        logits = point_sample(src_masks, coords).squeeze(1)
        return {
            "loss_mask": _sigmoid_ce_loss(logits, labels, num_masks, known),
            "loss_dice": _dice_loss(logits, labels, num_masks, known),
        }

    def ssc_loss(self, mask_embeds: Tensor, targets: list[dict], indices: Indices, text_scoremap: Tensor) -> Tensor:
        """MSE between the affinity of matched mask embeddings and the text affinity of their labels.

        Averaged over images; a NaN result (e.g. an image without any ground truth) zeroes the whole
        batch's term, as the official code does.
        """
        per_image = []
        for b, (q_idx, t_idx) in enumerate(indices):
            q_idx = q_idx.to(mask_embeds.device)
            emb = mask_embeds[b].index_select(0, q_idx)
            labels = targets[b]["labels"].to(mask_embeds.device).gather(0, t_idx.to(mask_embeds.device))
            affinity = emb @ emb.t()
            text = text_scoremap.index_select(0, labels).index_select(1, labels)
            per_image.append(F.mse_loss(affinity, text.to(affinity.dtype)))
        loss = sum(per_image[1:], per_image[0]) / len(per_image)  # one per image: never empty
        if torch.isnan(loss).any():
            log.info("NaN SSC loss in this batch (an image without matched targets?); using 0")
            return torch.zeros((), dtype=torch.float32, device=mask_embeds.device, requires_grad=True)
        return loss

    # -- full criterion ---------------------------------------------------------------------------
    def num_masks(self, targets: list[dict], device: torch.device) -> float:
        """Average number of target masks per process (all-reduced under torch.distributed), >= 1."""
        n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device)
        world = _world_size()
        if world > 1:
            torch.distributed.all_reduce(n)
        return torch.clamp(n / world, min=1).item()

    def unweighted(
        self, outputs: dict, targets: list[dict], point_coords_provider: PointCoordsProvider | None = None
    ) -> tuple[dict[str, Tensor], list[Indices]]:
        """Unweighted terms and the matcher indices per prediction (aux 0..L-2, then the final one)."""
        self._check(outputs, targets)
        points = point_coords_provider or RandomPointCoords()
        aux = outputs.get("aux_outputs", []) if self.config.deep_supervision else []
        final_layer = len(aux)
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices_final = self.matcher(main, targets, layer=final_layer, points=points)
        num_masks = self.num_masks(targets, outputs["pred_logits"].device)
        losses = self._class_losses(main, targets, indices_final)
        losses.update(self._mask_losses(main, targets, indices_final, num_masks, final_layer, points))
        all_indices = []
        for i, aux_out in enumerate(aux):
            ind = self.matcher(aux_out, targets, layer=i, points=points)
            all_indices.append(ind)
            terms = self._class_losses(aux_out, targets, ind)
            terms.update(self._mask_losses(aux_out, targets, ind, num_masks, i, points))
            losses.update({f"{k}_{i}": v for k, v in terms.items()})
        all_indices.append(indices_final)
        if self.config.ssc_loss:
            if "mask_embeds" not in outputs or "text_scoremap" not in outputs:
                raise KeyError("SSC loss needs outputs['mask_embeds'] and outputs['text_scoremap']")
            losses["mse_ssc_loss_1"] = self.ssc_loss(
                outputs["mask_embeds"], targets, indices_final, outputs["text_scoremap"])
        return losses, all_indices

    def weight_dict(self, num_aux: int) -> dict[str, float]:
        return official_weight_dict(self.config, num_aux if self.config.deep_supervision else 0)

    def forward(
        self, outputs: dict, targets: list[dict], point_coords_provider: PointCoordsProvider | None = None
    ) -> dict[str, Tensor]:
        losses, _ = self.unweighted(outputs, targets, point_coords_provider)
        weights = self.weight_dict(len(outputs.get("aux_outputs", [])))
        return {k: v * weights[k] for k, v in losses.items() if k in weights}

    def _check(self, outputs: dict, targets: list[dict]) -> None:
        b, _, c1 = outputs["pred_logits"].shape
        if c1 != self.num_classes + 1:
            raise ValueError(
                f"pred_logits has {c1 - 1} classes (+ no-object) but the criterion was built for {self.num_classes}"
            )
        if len(targets) != b:
            raise ValueError(f"{len(targets)} targets for a batch of {b} images")
        if len({"known" in t for t in targets}) > 1:
            raise ValueError("either every target of a batch has a 'known' map or none has")
        hw = None
        for t in targets:
            if t["labels"].numel() and (int(t["labels"].max()) >= self.num_classes or int(t["labels"].min()) < 0):
                raise ValueError(
                    f"target label {int(t['labels'].max())} out of range for {self.num_classes} classes"
                )
            if t["masks"].shape[0] != t["labels"].shape[0]:
                raise ValueError("each target needs one mask per label")
            if hw is not None and tuple(t["masks"].shape[-2:]) != hw:
                raise ValueError("target masks of one batch must share the padded size (see pad_target_masks)")
            hw = tuple(t["masks"].shape[-2:])


def pad_target_masks(targets: list[dict], size: tuple[int, int]) -> list[dict]:
    """Zero-pad every target's masks to the padded image size (bottom/right), as the official code does.

    A ``known`` map is padded with False: the padding is not known to be anything.
    """
    out = []
    h, w = size
    for t in targets:
        m = t["masks"]
        if m.shape[-2] > h or m.shape[-1] > w:
            raise ValueError(f"target masks {tuple(m.shape[-2:])} are larger than the image batch {size}")
        padded = m.new_zeros((m.shape[0], h, w))
        padded[:, : m.shape[-2], : m.shape[-1]] = m
        out.append({"labels": t["labels"], "masks": padded})
        if "known" in t:
            known = t["known"].new_zeros((h, w))
            known[: m.shape[-2], : m.shape[-1]] = t["known"]
            out[-1]["known"] = known
    return out


class TrainingLoss(nn.Module):
    """The one training entry point: model + criterion in one ``forward`` that returns the weighted losses.

    One module, so DistributedDataParallel wraps the whole graph (training outputs, matching, losses);
    the Ray Train job, the parity check and the benchmarks all call it. ``targets`` may be smaller than
    the image batch: their masks are zero-padded bottom/right as the official code does.
    """

    def __init__(self, model: EBSeg, vocab: Vocabulary, config: CriterionConfig | None = None):
        super().__init__()
        self.model = model
        self.vocab = vocab
        self.criterion = EBSegCriterion(len(vocab), config or model.config.criterion)

    def forward(self, images: Tensor, targets: list[dict],
                point_coords_provider: PointCoordsProvider | None = None) -> dict[str, Tensor]:
        """Weighted loss terms (official keys; sum them for the total) of uint8 images [B,3,H,W]."""
        outputs = self.model.training_outputs(images, self.vocab)
        targets = pad_target_masks(targets, (images.shape[-2], images.shape[-1]))
        targets = [{k: v.to(images.device) for k, v in t.items()} for t in targets]
        return self.criterion(outputs, targets, point_coords_provider)
