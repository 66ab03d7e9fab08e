"""Raw -> prepared conversions on small generated fakes of the raw formats, then listed as benchmarks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ebseg_core.data import list_pairs, load_class_names
from jobs.prepare_data import main as prepare_main
from pipeline.prepare_data import (
    COCO171_IDS,
    PrepareError,
    convert_ade150,
    convert_coco171,
    convert_voc20,
    prepare_dataset,
)


def _jpg(path, h=6, w=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


def _png(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8))
    if palette:
        im = im.convert("P")
        im.putpalette([i % 256 for i in range(768)])
    im.save(path)


def test_label_conversions_by_hand():
    ade = np.array([[0, 1, 150]], np.uint8)
    assert convert_ade150(ade).tolist() == [[255, 0, 149]]
    voc = np.array([[0, 1, 20, 255]], np.uint8)
    assert convert_voc20(voc).tolist() == [[255, 0, 19, 255]]
    # stuffthingmaps: 0-based category ids; person=0, toothbrush id 90 -> 89, banner id 92 -> 91,
    # wood id 182 -> 181; removed thing ids (12 -> value 11) map to ignore
    coco = np.array([[0, 89, 91, 181, 11, 255]], np.uint8)
    assert convert_coco171(coco).tolist() == [[0, 79, 80, 170, 255, 255]]
    assert len(COCO171_IDS) == 171 == len(load_class_names("coco171"))


def test_conversions_reject_wrong_inputs():
    with pytest.raises(PrepareError, match="outside 0..150"):
        convert_ade150(np.array([[151]], np.uint8))
    with pytest.raises(PrepareError, match="single-channel"):
        convert_voc20(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(PrepareError, match="outside 0..20"):
        convert_voc20(np.array([[21]], np.uint8))


def test_ade150_end_to_end_then_listed(tmp_path):
    raw = tmp_path / "ADEChallengeData2016"
    for i in range(3):
        _jpg(raw / "images/validation" / f"ADE_val_{i:08d}.jpg")
        lab = np.zeros((6, 8), np.uint8)
        lab[:, 4:] = i + 1
        _png(raw / "annotations/validation" / f"ADE_val_{i:08d}.png", lab)
    out = tmp_path / "datasets"
    assert prepare_main(["ade150", "--raw", str(raw), "--out", str(out)]) == 0
    pairs = list_pairs("ade150", str(out))
    assert [p.key for p in pairs] == [f"ADE_val_{i:08d}" for i in range(3)]
    lab = np.array(Image.open(pairs[2].label_uri))
    assert lab[0, 0] == 255 and lab[0, 5] == 2


def test_voc20_end_to_end_skips_empty_and_uses_split_list(tmp_path):
    raw = tmp_path / "VOC2012"
    for i in ["2007_000001", "2007_000002", "2007_000003"]:
        _jpg(raw / "JPEGImages" / f"{i}.jpg")
    _png(raw / "SegmentationClass/2007_000001.png", np.array([[0, 15], [255, 20]]), palette=True)
    _png(raw / "SegmentationClass/2007_000002.png", np.array([[0, 0], [255, 0]]), palette=True)  # all ignored
    (raw / "ImageSets/Segmentation").mkdir(parents=True)
    (raw / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000002\n")
    out = tmp_path / "datasets"
    s = prepare_dataset("voc20", str(raw), str(out))
    assert (s.written, s.skipped_empty) == (1, 1)
    pairs = list_pairs("voc20", str(out))
    assert [p.key for p in pairs] == ["2007_000001"]
    assert np.array(Image.open(pairs[0].label_uri)).tolist() == [[255, 14], [255, 19]]


def test_coco171_end_to_end_to_s3(tmp_path, s3, s3_prefix):
    raw = tmp_path / "coco"
    _jpg(raw / "val2017/000000000139.jpg", 2, 3)
    _png(raw / "stuffthingmaps/val2017/000000000139.png", np.array([[0, 181, 255], [92, 11, 61]]))
    assert prepare_main(["coco171", "--raw", str(raw), "--out", s3_prefix]) == 0
    pairs = list_pairs("coco171", s3_prefix)
    assert len(pairs) == 1 and pairs[0].label_uri.endswith("coco/stuffthingmaps_detectron2/val2017/000000000139.png")
    with s3.fs.open(pairs[0].label_uri, "rb") as f:
        lab = np.array(Image.open(f))
    # 92 -> id 93 (stuff 'blanket', class 81); 61 -> id 62 'chair' (class 56)
    assert lab.tolist() == [[0, 170, 255], [81, 255, 56]]
    assert load_class_names("coco171")[81] == ["blanket"] and load_class_names("coco171")[56] == ["chair"]


def test_clear_errors(tmp_path, capsys):
    assert prepare_main(["ade150", "--raw", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "ADEChallengeData2016 folder" in capsys.readouterr().err
    assert prepare_main(["pc59", "--raw", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not supported yet" in capsys.readouterr().err
    assert prepare_main(["kitti", "--raw", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    (tmp_path / "VOC2012/JPEGImages").mkdir(parents=True)
    (tmp_path / "VOC2012/SegmentationClass").mkdir()
    assert prepare_main(["voc20", "--raw", str(tmp_path / "VOC2012"), "--out", str(tmp_path / "o")]) == 2
    assert "split list" in capsys.readouterr().err
