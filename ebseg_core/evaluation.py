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

Boundary IoU, as detectron2's evaluator computes it (only for fewer than 255 classes, since it works on
uint8 maps): the prediction and the ground truth (ignore -> C) are each turned into a "boundary map"
``label - erode(label)``, where ``erode`` is a grayscale erosion (minimum) over a square of half-size
``d = max(1, round(0.02 * image diagonal))`` with the image surrounded by zeros (so pixels closer than ``d``
to the border erode to 0). The boundary maps' values (differences of class ids, 0 in the interior) fill a
second (C+1)x(C+1) matrix ``[pred, gt]``; ``BoundaryIoU-c`` = tp / union of that matrix's class c, defined
where the union is non-empty, and ``min(IoU, B-Iou)-c`` is Python's ``min(IoU_c, BoundaryIoU_c)``.

Matrices are plain int64 arrays, so evaluators from many workers merge by addition (:meth:`merge`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError

BOUNDARY_DILATION_RATIO = 0.02

class EvaluationError(UserError):
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


def boundary_supported(num_classes: int) -> bool:
    """detectron2 computes Boundary IoU only when every value (classes and ignore) fits below 255."""
    return num_classes < 255


def mask_to_boundary(label: np.ndarray, dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> np.ndarray:
    """detectron2's boundary map of a uint8 label map: ``label - erosion(label)``.

    The erosion is the minimum over a (2d+1)x(2d+1) square, d = max(1, round(ratio * diagonal)), of the
    label map surrounded by zeros (detectron2 pads one ring of zeros and erodes d times with a 3x3 kernel,
    which is the same square minimum; pixels closer than d to the border therefore erode to 0).
    """
    from scipy.ndimage import minimum_filter

    label = np.asarray(label, dtype=np.uint8)
    if label.ndim != 2:
        raise EvaluationError(f"a label map must be 2-D, got shape {label.shape}")
    h, w = label.shape
    d = max(1, round(dilation_ratio * math.sqrt(h * h + w * w)))  # round half to even, as detectron2
    eroded = minimum_filter(label, size=2 * d + 1, mode="constant", cval=0)
    return label - eroded  # never negative: the window holds the pixel itself


def boundary_confusion_matrix(pred, gt, num_classes: int, ignore_label: int = 255) -> np.ndarray:
    """The (C+1)x(C+1) int64 matrix ``[boundary(pred), boundary(gt)]`` of one image (gt ignore -> C).

    Inputs are validated as in :func:`confusion_matrix` (call that first); needs ``num_classes < 255``.
    """
    if not boundary_supported(num_classes):
        raise EvaluationError(f"Boundary IoU needs fewer than 255 classes (uint8 maps), got {num_classes}")
    n = num_classes
    gt = _to_numpy(gt).astype(np.int64, copy=False)
    gt = np.where(gt == ignore_label, n, gt)
    b_pred = mask_to_boundary(_to_numpy(pred).reshape(gt.shape))
    b_gt = mask_to_boundary(gt)
    # Most pixels are interior (0 in both maps): count only the others, the rest is cell [0, 0].
    edge = np.flatnonzero(b_pred | b_gt)
    m = np.bincount((n + 1) * b_pred.reshape(-1)[edge].astype(np.int32) + b_gt.reshape(-1)[edge],
                    minlength=(n + 1) ** 2)
    m[0] += b_gt.size - edge.size
    return m.astype(np.int64).reshape(n + 1, n + 1)


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
    matrix: np.ndarray = field(default=None)  # type: ignore[arg-type]  # sized in __post_init__
    num_images: int = 0
    boundary_matrix: np.ndarray | None = None  # Boundary IoU matrix (None above 254 classes)
    boundary_images: int = 0  # images whose boundary matrix was added (B-IoU is reported when all were)

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
        if self.boundary_matrix is None and boundary_supported(self.num_classes):
            self.boundary_matrix = np.zeros_like(self.matrix)

    def reset(self) -> None:
        self.matrix[:] = 0
        self.num_images = 0
        if self.boundary_matrix is not None:
            self.boundary_matrix[:] = 0
        self.boundary_images = 0

    def process(self, pred, gt) -> None:
        """Add one image: predicted class ids and ground-truth label map, same HxW."""
        matrix = confusion_matrix(pred, gt, self.num_classes, self.ignore_label)
        boundary = (boundary_confusion_matrix(pred, gt, self.num_classes, self.ignore_label)
                    if self.boundary_matrix is not None else None)
        self.add_matrix(matrix, 1, boundary)

    def add_matrix(self, matrix: np.ndarray, num_images: int = 1, boundary_matrix: np.ndarray | None = None) -> None:
        """Add matrices computed elsewhere (e.g. by a worker with :func:`confusion_matrix` and
        :func:`boundary_confusion_matrix`); without the boundary matrix no Boundary IoU is reported."""
        matrix = np.asarray(matrix, dtype=np.int64)
        if matrix.shape != self.matrix.shape:
            raise EvaluationError(f"matrix shape {matrix.shape} != {self.matrix.shape}")
        if boundary_matrix is not None:
            boundary_matrix = np.asarray(boundary_matrix, dtype=np.int64)
            if self.boundary_matrix is None or boundary_matrix.shape != self.boundary_matrix.shape:
                raise EvaluationError(f"boundary matrix shape {boundary_matrix.shape} does not fit this evaluator")
            self.boundary_matrix += boundary_matrix
            self.boundary_images += num_images
        self.matrix += matrix
        self.num_images += num_images

    def merge(self, other: SemSegEvaluator) -> SemSegEvaluator:
        """Add another evaluator's counts into this one (distributed accumulation); returns self."""
        if other.num_classes != self.num_classes or other.ignore_label != self.ignore_label:
            raise EvaluationError("cannot merge evaluators of different class counts or ignore labels")
        self.add_matrix(other.matrix, other.num_images)
        if other.boundary_matrix is not None and self.boundary_matrix is not None:
            self.boundary_matrix += other.boundary_matrix
            self.boundary_images += other.boundary_images
        return self

    @property
    def has_boundary(self) -> bool:
        """Boundary IoU is reported: supported, and every image's boundary matrix was added."""
        return self.boundary_matrix is not None and self.num_images > 0 and self.boundary_images == self.num_images

    def compute(self) -> dict:
        """mIoU, fwIoU, mACC, pACC (percent) and per-class ``IoU``/``ACC`` lists (NaN when undefined);
        with :attr:`has_boundary` also per-class ``BoundaryIoU`` and ``min(IoU, B-Iou)`` lists."""
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
        if self.has_boundary and self.boundary_matrix is not None:
            b = self.boundary_matrix.astype(np.float64)
            b_tp = b.diagonal()[:-1]
            b_union = b[:-1, :-1].sum(axis=0) + b[:-1, :-1].sum(axis=1) - b_tp
            b_iou = np.full(self.num_classes, np.nan)
            b_valid = b_union > 0
            b_iou[b_valid] = b_tp[b_valid] / b_union[b_valid]
            res["BoundaryIoU"] = [100 * float(x) for x in b_iou]
            # Python's min as detectron2 applies it: NaN first -> NaN, NaN second -> the first value.
            res["min(IoU, B-Iou)"] = [100 * float(min(i, bi)) for i, bi in zip(iou, b_iou)]
        if self.class_names is not None:
            res["class_names"] = list(self.class_names)
        return res


def detectron2_style(result: dict) -> dict:
    """Flatten :meth:`SemSegEvaluator.compute` into detectron2's keys and order (``IoU-<name>``, with
    ``BoundaryIoU-<name>`` and ``min(IoU, B-Iou)-<name>`` after each when computed, ``ACC-<name>``)."""
    names = result.get("class_names") or [str(i) for i in range(len(result["IoU"]))]
    out = {"mIoU": result["mIoU"], "fwIoU": result["fwIoU"]}
    boundary = "BoundaryIoU" in result
    for k, n in enumerate(names):
        out[f"IoU-{n}"] = result["IoU"][k]
        if boundary:
            out[f"BoundaryIoU-{n}"] = result["BoundaryIoU"][k]
            out[f"min(IoU, B-Iou)-{n}"] = result["min(IoU, B-Iou)"][k]
    out["mACC"], out["pACC"] = result["mACC"], result["pACC"]
    out.update({f"ACC-{n}": v for n, v in zip(names, result["ACC"])})
    return out


def mean_defined(values: list[float]) -> float:
    """Mean of the defined (non-NaN) values, NaN if none (a summary of per-class lists)."""
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else float("nan")
