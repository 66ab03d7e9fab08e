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
