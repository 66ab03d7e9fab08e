"""The Ray evaluation pipeline, pseudo-label scoring and TTA on generated benchmark layouts."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ebseg_core.data import get_benchmark, load_class_names
from pipeline.evaluate import EvalConfig, EvaluateError, evaluate_labels, run_evaluation


def make_benchmark(root, name, n=4, h=12, w=16, seed=0):
    """A prepared layout with random labels (some ignored pixels) and noise images."""
    b = get_benchmark(name)
    rng = np.random.default_rng(seed)
    img_dir = root.joinpath(*b.image_dir.split("/"))
    lab_dir = root.joinpath(*b.label_dir.split("/"))
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if b.ignore_label == 255 else np.uint16
    labels = {}
    for i in range(n):
        lab = rng.integers(0, min(b.num_classes, 6), (h, w)).astype(dtype)
        lab[0, :] = b.ignore_label
        Image.fromarray(lab).save(lab_dir / f"im{i:03d}{b.label_ext}")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / f"im{i:03d}{b.image_ext}")
        labels[f"im{i:03d}"] = lab
    return labels


def upload(s3, local_root, prefix):
    for f in sorted(local_root.rglob("*")):
        if f.is_file():
            s3.fs.put_file(str(f), prefix.rstrip("/") + "/" + f.relative_to(local_root).as_posix())


def test_ground_truth_predictor_gives_100_from_s3(ray_local, s3, s3_prefix, tmp_path):
    make_benchmark(tmp_path / "d", "voc20")
    make_benchmark(tmp_path / "d", "pc459", n=3)
    upload(s3, tmp_path / "d", s3_prefix + "data/")
    cfg = EvalConfig(["voc20", "pcontext_full_sem_seg_val"], s3_prefix + "data", predictor="ground-truth",
                     num_actors=2, batch_size=2, out=s3_prefix + "out/")
    lines: list[str] = []
    report = run_evaluation(cfg, log=lines.append)
    assert report.ok
    assert [r.name for r in report.results] == ["voc20", "pc459"]
    assert [r.num_images for r in report.results] == [4, 3]
    for r in report.results:
        assert r.metrics["mIoU"] == 100 and r.metrics["pACC"] == 100
    assert "| ground-truth | 100.0 | 100.0 |" in lines
    doc = json.loads(s3.fs.cat(s3_prefix + "out/results.json"))
    assert doc["datasets"]["voc20"]["mIoU"] == 100 and doc["datasets"]["voc20"]["IoU"][19] is None
    summary = s3.fs.cat(s3_prefix + "out/summary.csv").decode().splitlines()
    assert summary[0].startswith("dataset,mIoU") and summary[1].startswith("voc20,100.0000")
    per_class = s3.fs.cat(s3_prefix + "out/per_class_pc459.csv").decode().splitlines()
    assert len(per_class) == 1 + 459 and per_class[1] == "0,accordion,100.0000,100.0000"
    # Boundary IoU: the actors' per-image boundary matrices summed on the driver equal one evaluator fed
    # the same images; pc459 has too many classes for it (as in detectron2)
    from ebseg_core.data import list_pairs
    from ebseg_core.evaluation import SemSegEvaluator
    from pipeline.evaluate import read_label

    direct = SemSegEvaluator(20)
    for pair in list_pairs(get_benchmark("voc20"), str(tmp_path / "d")):
        lab = read_label(pair.label_uri)
        direct.process(np.where(lab == 255, 0, lab), lab)
    voc = report.results[0].metrics
    assert voc["BoundaryIoU"] == pytest.approx(direct.compute()["BoundaryIoU"], nan_ok=True)
    assert "BoundaryIoU" not in report.results[1].metrics
    assert any(line.startswith("voc20: mIoU 100.0") and "mean BoundaryIoU" in line for line in lines)
    d2 = doc["datasets"]["voc20"]["detectron2"]
    name = load_class_names("voc20")[0][0]
    assert d2[f"BoundaryIoU-{name}"] == pytest.approx(voc["BoundaryIoU"][0])
    assert f"min(IoU, B-Iou)-{name}" in d2 and "BoundaryIoU-accordion" not in doc["datasets"]["pc459"]["detectron2"]
    per_class_voc = s3.fs.cat(s3_prefix + "out/per_class_voc20.csv").decode().splitlines()
    assert per_class_voc[0] == 'class_id,class_name,IoU,ACC,BoundaryIoU,"min(IoU, B-Iou)"'


def test_broken_image_is_reported_not_hidden(ray_local, tmp_path):
    make_benchmark(tmp_path, "ade150", n=3)
    b = get_benchmark("ade150")
    (tmp_path.joinpath(*b.image_dir.split("/")) / "im001.jpg").write_bytes(b"not an image")
    report = run_evaluation(EvalConfig(["ade150"], str(tmp_path), predictor="ground-truth"), log=lambda s: None)
    assert not report.ok
    r = report.results[0]
    assert r.num_images == 2 and len(r.errors) == 1 and "im001.jpg" in r.errors[0]


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(EvaluateError, match="--checkpoint"):
        EvalConfig(["ade150"], str(tmp_path))
    with pytest.raises(EvaluateError, match="unknown benchmark"):
        EvalConfig(["ade151"], str(tmp_path), predictor="ground-truth")
    with pytest.raises(EvaluateError, match="annotations_detectron2/validation"):
        run_evaluation(EvalConfig(["ade150"], str(tmp_path), predictor="ground-truth"), log=lambda s: None)


def _label_parquet(path, labels, root, bench, corrupt=None):
    from pipeline.schema import label_schema, make_ok_row, rows_to_table

    b = get_benchmark(bench)
    names = [c[0] for c in load_class_names(b.classes)]
    rows = []
    for key, lab in labels.items():
        pred = np.where(lab == b.ignore_label, 0, lab).astype(np.int64)
        if corrupt == key:
            pred[:] = 1
        uri = f"s3://somewhere/photos/{key}.jpg"
        rows.append(make_ok_row(uri, pred, np.ones(pred.shape, np.float32), names))
    pq.write_table(rows_to_table(rows, label_schema(names)), path)


def test_evaluate_pseudo_labels(tmp_path):
    labels = make_benchmark(tmp_path / "d", "voc20", n=3)
    _label_parquet(tmp_path / "labels.parquet", labels, tmp_path / "d", "voc20")
    rep = evaluate_labels(str(tmp_path / "labels.parquet"), "voc20", str(tmp_path / "d"), log=lambda s: None)
    assert rep.ok and rep.results[0].metrics["mIoU"] == 100 and rep.results[0].num_images == 3
    # one image predicted entirely as class 1: compare with the evaluator fed directly
    from ebseg_core.evaluation import SemSegEvaluator

    _label_parquet(tmp_path / "bad.parquet", labels, tmp_path / "d", "voc20", corrupt="im001")
    rep = evaluate_labels(str(tmp_path / "bad.parquet"), "voc20", str(tmp_path / "d"), out=str(tmp_path / "o"),
                          log=lambda s: None)
    ev = SemSegEvaluator(20)
    for k, lab in labels.items():
        ev.process(np.ones(lab.shape, int) if k == "im001" else np.where(lab == 255, 0, lab), lab)
    assert rep.results[0].metrics["mIoU"] == pytest.approx(ev.compute()["mIoU"])
    assert rep.results[0].metrics["mIoU"] < 100
    assert (tmp_path / "o/results.json").is_file()
    # wrong vocabulary
    with pytest.raises(EvaluateError, match="vocabulary-preset ade150"):
        make_benchmark(tmp_path / "d", "ade150", n=1)
        evaluate_labels(str(tmp_path / "labels.parquet"), "ade150", str(tmp_path / "d"), log=lambda s: None)


def test_missing_label_rows_count_as_failures(tmp_path):
    labels = make_benchmark(tmp_path / "d", "voc20", n=3)
    _label_parquet(tmp_path / "l.parquet", {k: v for k, v in labels.items() if k != "im002"}, tmp_path / "d", "voc20")
    rep = evaluate_labels(str(tmp_path / "l.parquet"), "voc20", str(tmp_path / "d"), log=lambda s: None)
    assert not rep.ok and rep.results[0].num_images == 2
    assert any("im002.jpg: no label row" in e for e in rep.results[0].errors)


def _truth_folder(root, names):
    """An empty folder in the training layout (images/, labels/, class_names.txt)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "class_names.txt").write_text("\n".join(names) + "\n")
    return root


def test_evaluate_labels_against_a_generic_folder(tmp_path):
    """`--dataset generic`: the truth is a folder in the training layout (images/, labels/, class_names.txt)."""
    from ebseg_core.evaluation import SemSegEvaluator
    from pipeline.schema import label_schema, make_ok_row, rows_to_table

    rng = np.random.default_rng(3)
    names = ["wall", "sky", "tree"]
    root = _truth_folder(tmp_path / "truth", names)
    rows, ev = [], SemSegEvaluator(3)
    for i in range(3):
        truth = rng.integers(0, 3, (10, 14)).astype(np.uint8)
        truth[0] = 255
        Image.fromarray(truth).save(root / "labels" / f"p{i}.png")
        Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(root / "images" / f"p{i}.jpg")
        pred = np.where(rng.random(truth.shape) < 0.3, 2, np.where(truth == 255, 0, truth)).astype(np.int64)
        rows.append(make_ok_row(f"s3://lake/x/p{i}.jpg", pred, np.ones(pred.shape, np.float32), names))
        ev.process(pred, truth)
    pq.write_table(rows_to_table(rows, label_schema(names)), tmp_path / "labels.parquet")
    rep = evaluate_labels(str(tmp_path / "labels.parquet"), "generic", str(root), log=lambda s: None)
    assert rep.ok and rep.results[0].name == "generic" and rep.results[0].num_images == 3
    assert rep.results[0].metrics["mIoU"] == pytest.approx(ev.compute()["mIoU"]) and rep.results[0].metrics["mIoU"] < 100
    # labels of another vocabulary are refused with the classes named
    (root / "class_names.txt").write_text("road\nsky\ntree\n")
    with pytest.raises(EvaluateError, match="not .*class list"):
        evaluate_labels(str(tmp_path / "labels.parquet"), "generic", str(root), log=lambda s: None)


def test_evaluate_labels_says_how_right_the_pixels_are_at_each_confidence(tmp_path):
    """`ebseg evaluate --labels` tells what a min_pixel_confidence keeps and how right that is: right pixels
    stored at 0.9, wrong ones at 0.6, ignored truth pixels counted nowhere."""
    from pipeline.schema import label_schema, make_ok_row, rows_to_table

    rng = np.random.default_rng(5)
    names = ["wall", "sky", "tree"]
    root = _truth_folder(tmp_path / "truth", names)
    rows, right, valid = [], 0, 0
    for i in range(2):
        truth = rng.integers(0, 3, (12, 16)).astype(np.uint8)
        truth[:2] = 255
        Image.fromarray(truth).save(root / "labels" / f"p{i}.png")
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / "images" / f"p{i}.jpg")
        wrong = rng.random(truth.shape) < 0.25
        pred = np.where(wrong, (truth.astype(np.int64) + 1) % 3, truth).astype(np.int64)
        pred[truth == 255] = 0
        conf = np.where(wrong, 0.6, 0.9).astype(np.float32)
        rows.append(make_ok_row(f"s3://lake/x/p{i}.jpg", pred, conf, names))
        ok = (pred == truth) & (truth != 255)
        right, valid = right + int(ok.sum()), valid + int((truth != 255).sum())
    pq.write_table(rows_to_table(rows, label_schema(names)), tmp_path / "labels.parquet")
    printed: list[str] = []
    rep = evaluate_labels(str(tmp_path / "labels.parquet"), "generic", str(root), out=str(tmp_path / "o"),
                          log=printed.append)
    table = {row["min_confidence"]: row for row in rep.results[0].confidence}
    assert table[0.0]["pixel_share"] == 100 and table[0.0]["pixel_accuracy"] == pytest.approx(100 * right / valid)
    assert {**table[0.5], "min_confidence": 0.0} == table[0.0]  # every pixel is at 0.6 or above
    assert table[0.8]["pixel_share"] == pytest.approx(100 * right / valid) and table[0.8]["pixel_accuracy"] == 100
    assert table[0.9]["pixel_share"] == pytest.approx(100 * right / valid)  # 0.9 stored as level 230 reaches 0.9
    assert table[0.95]["pixel_share"] == 0 and math.isnan(table[0.95]["pixel_accuracy"])
    assert any(line.split() == ["0.80", f"{100 * right / valid:.1f}%", "100.0%"] for line in printed), printed
    saved = json.loads((tmp_path / "o/results.json").read_text())["datasets"]["generic"]["confidence"]
    assert saved[-1] == {"min_confidence": 0.99, "pixel_share": 0.0, "pixel_accuracy": None}
