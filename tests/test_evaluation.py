"""The mIoU evaluator: hand-computed cases, detectron2 semantics, merging, an independent loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ebseg_core.evaluation import EvaluationError, SemSegEvaluator, confusion_matrix, detectron2_style


def _reference_metrics(preds, gts, c, ignore):
    """Independent per-pixel loop (no bincount) of the detectron2 definitions."""
    tp = [0] * c
    gt_n = [0] * c
    pred_n = [0] * c
    for p, g in zip(preds, gts):
        for pv, gv in zip(np.asarray(p).ravel().tolist(), np.asarray(g).ravel().tolist()):
            if gv == ignore:
                continue
            gt_n[gv] += 1
            pred_n[pv] += 1
            if pv == gv:
                tp[gv] += 1
    ious, accs = [], []
    for k in range(c):
        if gt_n[k] > 0:
            accs.append(tp[k] / gt_n[k])
            ious.append(tp[k] / (gt_n[k] + pred_n[k] - tp[k]))
    total = sum(gt_n)
    fw = sum(tp[k] / (gt_n[k] + pred_n[k] - tp[k]) * gt_n[k] / total for k in range(c) if gt_n[k] > 0)
    return {"mIoU": 100 * sum(ious) / len(ious), "mACC": 100 * sum(accs) / len(accs),
            "pACC": 100 * sum(tp) / total, "fwIoU": 100 * fw}


def test_hand_computed_case():
    # 3 classes; gt row-major 2x4 with one ignored pixel
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 0]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    ev = SemSegEvaluator(3, class_names=["a", "b", "c"])
    ev.process(pred, gt)
    r = ev.compute()
    # class 0: gt 3 px (0,0),(0,1),(1,3); pred 0 at (0,0),(1,1),(1,3) -> tp 2, union 3+3-2=4
    # class 1: gt 2, pred 3 (incl (0,1)), tp 2 -> union 3 ; class 2: gt 2, pred 1 (the ignored px does
    # not count), tp 1 -> union 2
    assert r["IoU"] == pytest.approx([50.0, 200 / 3, 50.0])
    assert r["ACC"] == pytest.approx([200 / 3, 100.0, 50.0])
    assert r["mIoU"] == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert r["pACC"] == pytest.approx(100 * 5 / 7)
    assert r["fwIoU"] == pytest.approx(50 * 3 / 7 + 200 / 3 * 2 / 7 + 50 * 2 / 7)
    assert r["num_pixels"] == 7 and r["num_images"] == 1
    d2 = detectron2_style(r)
    assert d2["IoU-b"] == pytest.approx(200 / 3) and list(d2)[:2] == ["mIoU", "fwIoU"]


def test_class_without_ground_truth_is_excluded_but_its_false_positives_count():
    gt = np.array([[0, 0], [0, 0]])
    pred = np.array([[0, 0], [0, 1]])  # class 1 predicted, never in gt
    ev = SemSegEvaluator(3)
    ev.process(pred, gt)
    r = ev.compute()
    assert math.isnan(r["IoU"][1]) and math.isnan(r["IoU"][2]) and math.isnan(r["ACC"][1])
    assert r["mIoU"] == pytest.approx(75.0)  # only class 0: 3 / (4 + 3 - 3)
    assert r["mACC"] == pytest.approx(75.0)
    assert r["num_classes_present"] == 1


def test_perfect_predictor_gives_100_and_ignore_is_ignored():
    rng = np.random.default_rng(0)
    ev = SemSegEvaluator(5)
    for _ in range(3):
        gt = rng.integers(0, 5, (7, 9))
        gt[0, :] = 255
        pred = np.where(gt == 255, rng.integers(0, 5, gt.shape), gt)  # anything on ignored pixels
        ev.process(torch.from_numpy(pred), gt.astype(np.uint8))
    r = ev.compute()
    assert r["mIoU"] == 100 and r["pACC"] == 100 and r["mACC"] == 100 and r["fwIoU"] == pytest.approx(100)


def test_random_cases_match_independent_loop_and_merge_is_addition():
    rng = np.random.default_rng(1)
    c = 6
    preds = [rng.integers(0, c, (5, 8)) for _ in range(6)]
    gts = []
    for p in preds:
        g = rng.integers(0, c - 1, p.shape)  # class 5 never in gt
        g[rng.random(p.shape) < 0.2] = 255
        gts.append(g)
    whole = SemSegEvaluator(c)
    a, b = SemSegEvaluator(c), SemSegEvaluator(c)
    for i, (p, g) in enumerate(zip(preds, gts)):
        whole.process(p, g)
        (a if i % 2 else b).process(p, g)
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.matrix, whole.matrix)
    assert merged.num_images == 6
    r = whole.compute()
    ref = _reference_metrics(preds, gts, c, 255)
    for k in ("mIoU", "mACC", "pACC", "fwIoU"):
        assert r[k] == pytest.approx(ref[k]), k


def test_sixteen_bit_ignore_label():
    gt = np.array([[0, 65535], [458, 1]], np.uint16)
    pred = np.array([[0, 3], [458, 2]])
    ev = SemSegEvaluator(459, ignore_label=65535)
    ev.process(pred, gt)
    r = ev.compute()
    assert r["IoU"][0] == 100 and r["IoU"][458] == 100 and r["IoU"][1] == 0
    assert r["mIoU"] == pytest.approx(200 / 3)


def test_errors_are_clear():
    ev = SemSegEvaluator(3)
    with pytest.raises(EvaluationError, match="label's resolution"):
        ev.process(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(EvaluationError, match="0..2"):
        ev.process(np.full((2, 2), 3), np.zeros((2, 2), int))
    with pytest.raises(EvaluationError, match="wrong class list"):
        ev.process(np.zeros((2, 2), int), np.full((2, 2), 7))
    with pytest.raises(EvaluationError, match="different"):
        ev.merge(SemSegEvaluator(4))


def test_empty_evaluator_is_nan_not_crash():
    r = SemSegEvaluator(2).compute()
    assert math.isnan(r["mIoU"]) and math.isnan(r["pACC"])


def test_confusion_matrix_layout_is_pred_by_gt():
    m = confusion_matrix(np.array([1]), np.array([0]), 2)
    assert m[1, 0] == 1 and m.sum() == 1
    m = confusion_matrix(np.array([1]), np.array([255]), 2)
    assert m[1, 2] == 1


# -- Boundary IoU (detectron2's SemSegEvaluator definition) ------------------------------------------
def _iterated_erosion_boundary(label: np.ndarray, ratio: float = 0.02) -> np.ndarray:
    """detectron2's procedure written out literally: one ring of zeros, then d erosions with a 3x3
    kernel (outside the padded map counts as +inf), then label - eroded."""
    h, w = label.shape
    d = max(1, round(ratio * math.sqrt(h * h + w * w)))
    x = np.pad(label.astype(np.int64), 1, constant_values=0)
    for _ in range(d):
        big = np.pad(x, 1, constant_values=np.iinfo(np.int64).max)
        x = np.min([big[1 + dy: 1 + dy + x.shape[0], 1 + dx: 1 + dx + x.shape[1]]
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    return label.astype(np.int64) - x[1:-1, 1:-1]


def test_boundary_map_equals_iterated_3x3_erosion():
    from ebseg_core.evaluation import mask_to_boundary

    rng = np.random.default_rng(0)
    for h, w in ((10, 10), (37, 61), (150, 190), (3, 200)):
        blocks = rng.integers(0, 6, (h // 3 + 1, w // 5 + 1))
        label = np.kron(blocks, np.ones((3, 5), np.int64))[:h, :w]
        label[rng.random((h, w)) < 0.05] = 6  # scattered noise pixels
        assert np.array_equal(mask_to_boundary(label).astype(np.int64), _iterated_erosion_boundary(label)), (h, w)
    # 150x190: diagonal 242.07 -> d = round(4.84) = 5, so a constant map keeps a 5-pixel ring
    ring = mask_to_boundary(np.full((150, 190), 4, np.uint8))
    assert int((ring == 4).sum()) == 150 * 190 - 140 * 180 and set(np.unique(ring)) == {0, 4}


def test_boundary_iou_by_hand_two_halves():
    """10x10 (d = 1): gt columns 0-4 class 1, 5-9 class 2; prediction moves the edge one column right.
    Boundary maps (label - 3x3 erosion with a zero border): the outer ring keeps its label; inside, only
    the class-2 pixels next to class 1 are non-zero (2 - 1 = 1). gt: 56 zeros, 26 ones, 18 twos; pred:
    col 6 is the inner edge. Pixel pairs [pred, gt]: (0,0) 48, (1,1) 18, (2,2) 16, (1,2) 2 (ring at
    col 5), (0,1) 8 (gt edge col 5), (1,0) 8 (pred edge col 6)."""
    gt = np.full((10, 10), 2)
    gt[:, :5] = 1
    pred = np.full((10, 10), 2)
    pred[:, :6] = 1
    ev = SemSegEvaluator(3, class_names=["z", "a", "b"])
    ev.process(pred, gt)
    r = ev.compute()
    assert ev.boundary_matrix[:3, :3].tolist() == [[48, 8, 0], [8, 18, 2], [0, 0, 16]]
    # class 0: 48 / (56 + 56 - 48); class 1: 18 / (26 + 28 - 18); class 2: 16 / (18 + 16 - 16)
    assert r["BoundaryIoU"] == pytest.approx([75.0, 50.0, 1600 / 18])
    assert math.isnan(r["IoU"][0]) and r["IoU"][1:] == pytest.approx([500 / 6, 80.0])
    mins = r["min(IoU, B-Iou)"]
    assert math.isnan(mins[0]) and mins[1:] == pytest.approx([50.0, 80.0])  # NaN IoU first -> NaN
    d2 = detectron2_style(r)
    assert list(d2)[:8] == ["mIoU", "fwIoU", "IoU-z", "BoundaryIoU-z", "min(IoU, B-Iou)-z", "IoU-a",
                            "BoundaryIoU-a", "min(IoU, B-Iou)-a"]
    assert d2["BoundaryIoU-b"] == pytest.approx(1600 / 18) and d2["min(IoU, B-Iou)-a"] == pytest.approx(50.0)


def test_boundary_iou_by_hand_ignore_and_wider_ring():
    """60x80 (diagonal 100, d = 2), all class 1 with a 10x10 ignore block: ignore becomes class 2 before
    the boundary, so the block's outer 64 pixels get 2 - 1 = 1 (detectron2 counts them as class 1);
    the 2-pixel outer ring (544 px) keeps 1. The all-class-1 prediction has only the ring."""
    gt = np.ones((60, 80), np.uint8)
    gt[20:30, 30:40] = 255
    pred = np.ones((60, 80), np.int64)
    ev = SemSegEvaluator(2)
    ev.process(pred, gt)
    r = ev.compute()
    assert r["IoU"][1] == pytest.approx(100.0)
    # class 0: 4192 / (4192 + 4256 - 4192); class 1: 544 / (608 + 544 - 544)
    assert r["BoundaryIoU"] == pytest.approx([100 * 4192 / 4256, 100 * 544 / 608])
    assert math.isnan(r["min(IoU, B-Iou)"][0]) and r["min(IoU, B-Iou)"][1] == pytest.approx(100 * 544 / 608)
    # Boundary IoU NaN second: Python's min keeps the IoU. A class-1 block inside class 3 (20x20, d = 1):
    # the boundary values are 3 (outer ring) and 3 - 1 = 2 (class-3 pixels touching the block), never 1.
    label = np.full((20, 20), 3)
    label[8:12, 8:12] = 1
    ev2 = SemSegEvaluator(4)
    ev2.process(label, label)
    r2 = ev2.compute()
    assert r2["IoU"][1] == 100.0 and math.isnan(r2["BoundaryIoU"][1]) and r2["min(IoU, B-Iou)"][1] == 100.0
    assert r2["BoundaryIoU"][2] == 100.0 and math.isnan(r2["IoU"][2]) and math.isnan(r2["min(IoU, B-Iou)"][2])


def test_boundary_matrices_merge_like_the_confusion_matrix():
    from ebseg_core.evaluation import boundary_confusion_matrix

    rng = np.random.default_rng(1)
    images = [(rng.integers(0, 4, (30, 40)), np.where(rng.random((30, 40)) < 0.1, 255, rng.integers(0, 4, (30, 40))))
              for _ in range(4)]
    one = SemSegEvaluator(4)
    for p, g in images:
        one.process(p, g)
    a, b = SemSegEvaluator(4), SemSegEvaluator(4)
    for p, g in images[:1]:
        a.process(p, g)
    for p, g in images[1:]:
        b.add_matrix(confusion_matrix(p, g, 4), 1, boundary_confusion_matrix(p, g, 4))
    merged = a.merge(b)
    assert np.array_equal(merged.boundary_matrix, one.boundary_matrix) and merged.has_boundary
    assert merged.compute()["BoundaryIoU"] == pytest.approx(one.compute()["BoundaryIoU"], nan_ok=True)
    # a worker that sent no boundary matrix: no Boundary IoU rather than a wrong one
    c = SemSegEvaluator(4)
    c.add_matrix(confusion_matrix(*images[0], 4))
    assert not c.has_boundary and "BoundaryIoU" not in c.compute()
    # detectron2 skips Boundary IoU from 255 classes on (uint8 maps)
    big = SemSegEvaluator(300, ignore_label=65535)
    big.process(np.zeros((4, 4), np.int64), np.full((4, 4), 299))
    assert big.boundary_matrix is None and "BoundaryIoU" not in big.compute()
    assert "BoundaryIoU-0" not in detectron2_style(big.compute())
