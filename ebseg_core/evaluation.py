"""Semantic segmentation metrics with the semantics of detectron2's ``SemSegEvaluator``.

A (C+1)x(C+1) confusion matrix indexed ``[prediction, ground truth]`` is accumulated; the extra last
column collects ignored ground-truth pixels (the dataset's ignore label), so that predictions on them
count nowhere. From it, as detectron2 does (all in percent):

* ``pACC``  = correctly predicted pixels / labeled pixels
* ``ACC-c`` = tp_c / gt_c, defined where the class has ground-truth pixels (``acc_valid``)
* ``IoU-c`` = tp_c / (gt_c + pred_c - tp_c), defined where the class has ground truth and the union
  is non-empty (``iou_valid = acc_valid & union > 0``)
* ``mACC`` / ``mIoU`` = mean over the valid classes only; a class absent from the ground truth does not
  count, even if it was predicted (its false positives still lower the IoU of the true classes)
* ``fwIoU`` = sum over valid classes of IoU_c * gt_c / sum(gt)

Matrices are plain int64 arrays, so evaluators from many workers merge by addition (:meth:`merge`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class EvaluationError(ValueError):
    """Inputs that cannot be scored: shape mismatch, class ids out of range."""


def confusion_matrix(pred, gt, num_classes: int, ignore_label: int = 255) -> np.ndarray:
    """The (C+1)x(C+1) int64 matrix ``[pred, gt]`` of one image (last column: ignored gt pixels).

    ``pred``/``gt``: integer arrays (numpy or torch) of the same HxW shape; ``gt`` values are class ids
    ``0..C-1`` or ``ignore_label``; any other gt value is an error (a wrong dataset or class list), as is
    a prediction outside ``0..C-1``.
    """
    pred = _to_numpy(pred).astype(np.int64, copy=False).reshape(-1)
    gt = _to_numpy(gt).astype(np.int64, copy=False)
    if gt.size != pred.size:
        raise EvaluationError(
            f"prediction has {pred.size} pixels but the ground truth {gt.size} (shape {tuple(gt.shape)}); "
            "predictions must be at the label's resolution"
        )
    gt = gt.reshape(-1)
    n = num_classes
    if pred.size:
        if pred.min() < 0 or pred.max() >= n:
            raise EvaluationError(f"predicted class ids must lie in 0..{n - 1}; got {pred.min()}..{pred.max()}")
        gt = np.where(gt == ignore_label, n, gt)
        if gt.min() < 0 or gt.max() > n:
            bad = np.unique(gt[(gt < 0) | (gt > n)])[:5].tolist()
            raise EvaluationError(
                f"ground-truth values {bad} are neither class ids 0..{n - 1} nor the ignore label "
                f"{ignore_label}: wrong class list or an unprepared label file?"
            )
    return np.bincount((n + 1) * pred + gt, minlength=(n + 1) ** 2).reshape(n + 1, n + 1)


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        return a.detach().cpu().numpy()
    return np.asarray(a)


@dataclass
class SemSegEvaluator:
    """Accumulates the confusion matrix of a benchmark and computes detectron2's metrics."""

    num_classes: int
    ignore_label: int = 255
    class_names: list[str] | None = None
    matrix: np.ndarray = field(default=None)  # type: ignore[assignment]
    num_images: int = 0

    def __post_init__(self):
        if self.num_classes < 1:
            raise EvaluationError("num_classes must be at least 1")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise EvaluationError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.matrix is None:
            self.matrix = np.zeros((self.num_classes + 1, self.num_classes + 1), dtype=np.int64)
        else:
            self.matrix = np.asarray(self.matrix, dtype=np.int64)
            if self.matrix.shape != (self.num_classes + 1,) * 2:
                raise EvaluationError(f"matrix shape {self.matrix.shape} does not fit {self.num_classes} classes")

    def reset(self) -> None:
        self.matrix[:] = 0
        self.num_images = 0

    def process(self, pred, gt) -> None:
        """Add one image: predicted class ids and ground-truth label map, same HxW."""
        self.matrix += confusion_matrix(pred, gt, self.num_classes, self.ignore_label)
        self.num_images += 1

    def add_matrix(self, matrix: np.ndarray, num_images: int = 1) -> None:
        """Add a matrix computed elsewhere (e.g. by a worker with :func:`confusion_matrix`)."""
        matrix = np.asarray(matrix, dtype=np.int64)
        if matrix.shape != self.matrix.shape:
            raise EvaluationError(f"matrix shape {matrix.shape} != {self.matrix.shape}")
        self.matrix += matrix
        self.num_images += num_images

    def merge(self, other: "SemSegEvaluator") -> "SemSegEvaluator":
        """Add another evaluator's counts into this one (distributed accumulation); returns self."""
        if other.num_classes != self.num_classes or other.ignore_label != self.ignore_label:
            raise EvaluationError("cannot merge evaluators of different class counts or ignore labels")
        self.add_matrix(other.matrix, other.num_images)
        return self

    def compute(self) -> dict:
        """mIoU, fwIoU, mACC, pACC (percent) and per-class ``IoU``/``ACC`` lists (NaN when undefined)."""
        m = self.matrix.astype(np.float64)
        tp = m.diagonal()[:-1]
        pos_gt = m[:-1, :-1].sum(axis=0)
        pos_pred = m[:-1, :-1].sum(axis=1)
        total = pos_gt.sum()
        acc = np.full(self.num_classes, np.nan)
        iou = np.full(self.num_classes, np.nan)
        acc_valid = pos_gt > 0
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        union = pos_gt + pos_pred - tp
        iou_valid = acc_valid & (union > 0)
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        weights = pos_gt / total if total > 0 else np.zeros_like(pos_gt)
        nan = float("nan")
        res = {
            "mIoU": 100 * float(iou[iou_valid].mean()) if iou_valid.any() else nan,
            "fwIoU": 100 * float((iou[iou_valid] * weights[iou_valid]).sum()) if iou_valid.any() else nan,
            "mACC": 100 * float(acc[acc_valid].mean()) if acc_valid.any() else nan,
            "pACC": 100 * float(tp.sum() / total) if total > 0 else nan,
            "IoU": [100 * float(x) for x in iou],
            "ACC": [100 * float(x) for x in acc],
            "num_images": int(self.num_images),
            "num_pixels": int(total),
            "num_classes_present": int(acc_valid.sum()),
        }
        if self.class_names is not None:
            res["class_names"] = list(self.class_names)
        return res


def detectron2_style(result: dict) -> dict:
    """Flatten :meth:`SemSegEvaluator.compute` into detectron2's keys (``IoU-<name>``, ``ACC-<name>``)."""
    names = result.get("class_names") or [str(i) for i in range(len(result["IoU"]))]
    out = {"mIoU": result["mIoU"], "fwIoU": result["fwIoU"]}
    out.update({f"IoU-{n}": v for n, v in zip(names, result["IoU"])})
    out["mACC"], out["pACC"] = result["mACC"], result["pACC"]
    out.update({f"ACC-{n}": v for n, v in zip(names, result["ACC"])})
    return out


def is_nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)
