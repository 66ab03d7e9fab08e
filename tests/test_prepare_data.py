"""Raw -> prepared conversions on small generated fakes of the raw formats, then listed as benchmarks."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.io import savemat

from ebseg_core.data import get_benchmark, list_pairs, load_class_names
from ebseg_core.data.ade847_ids import ADE847_ADE20K_IDS
from jobs import prepare_data as prepare_job
from jobs.cli import module_main
from pipeline.evaluate import read_label
from pipeline.prepare_data import (
    COCO171_IDS,
    PC59_DETAIL_IDS,
    PrepareError,
    convert_ade150,
    convert_ade847,
    convert_coco171,
    convert_pc59,
    convert_pc459,
    convert_voc20,
    detail_class_mask,
    prepare_dataset,
    resize_linear_u8,
    resize_nearest,
    short_side_size,
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
    assert module_main(prepare_job, ["ade150", "--raw", str(raw), "--out", str(out)]) == 0
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
    assert module_main(prepare_job, ["coco171", "--raw", str(raw), "--out", s3_prefix]) == 0
    pairs = list_pairs("coco171", s3_prefix)
    assert len(pairs) == 1 and pairs[0].label_uri.endswith("coco/stuffthingmaps_detectron2/val2017/000000000139.png")
    with s3.fs.open(pairs[0].label_uri, "rb") as f:
        lab = np.array(Image.open(f))
    # 92 -> id 93 (stuff 'blanket', class 81); 61 -> id 62 'chair' (class 56)
    assert lab.tolist() == [[0, 170, 255], [81, 255, 56]]
    assert load_class_names("coco171")[81][0] == "blanket" and load_class_names("coco171")[56][0] == "chair"


def test_clear_errors(tmp_path, capsys):
    assert module_main(prepare_job, ["ade150", "--raw", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "ADEChallengeData2016 folder" in capsys.readouterr().err
    assert module_main(prepare_job, ["kitti", "--raw", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    (tmp_path / "VOC2012/JPEGImages").mkdir(parents=True)
    (tmp_path / "VOC2012/SegmentationClass").mkdir()
    assert module_main(prepare_job, ["voc20", "--raw", str(tmp_path / "VOC2012"), "--out", str(tmp_path / "o")]) == 2
    assert "split list" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# PASCAL Context (59 / 459) and ADE20K-full (847)
# ---------------------------------------------------------------------------------------------------
def _rle(mask):
    """A compressed RLE as stored in trainval_merged.json (counts as a string)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _ade_seg(ids):
    """RGB *_seg.png pixels for ADE20K object ids: R // 10 = id // 256, G = id % 256, B = instance."""
    seg = np.zeros(ids.shape + (3,), np.uint8)
    seg[..., 0] = (ids // 256) * 10 + 3  # the ones digit of R is not part of the class
    seg[..., 1] = ids % 256
    seg[..., 2] = 9
    return seg


def _detail_json(path, images, annotations):
    path.write_text(json.dumps({"images": images, "annos_segmentation": annotations, "categories": []}))


def _detail_image(stem, phase, h=3, w=4):
    return {"image_id": int(stem.replace("_", "")), "file_name": f"{stem}.jpg", "height": h, "width": w,
            "phase": phase}


def test_pc_and_ade847_conversions_by_hand():
    # Detail category ids: 2 aeroplane -> 0, 397 table -> 49, 458 wood -> 58; background 0 -> 255
    assert convert_pc59(np.array([[0, 2, 397, 458]])).tolist() == [[255, 0, 49, 58]]
    names59 = load_class_names("pc59")
    assert (names59[0][0], names59[49][0], names59[58][0]) == ("aeroplane", "diningtable", "wood")
    lab = convert_pc459(np.array([[0, 1, 2, 459]], np.uint16))
    assert lab.dtype == np.uint16 and lab.tolist() == [[65535, 0, 1, 458]]
    # ADE20K object ids: 2978 wall -> 0, 312 building -> 1, 3148 adding machine -> 846; 0 and 7 are no class
    out = convert_ade847(_ade_seg(np.array([[2978, 312, 3148, 0, 7]])))
    assert out.dtype == np.uint16 and out.tolist() == [[0, 1, 846, 65535, 65535]]
    names847 = load_class_names("ade847")
    assert (names847[0][0], names847[1][0], names847[846][0]) == ("wall", "building, edifice",
                                                                  "adding machine, totalizer, totaliser")


def test_class_tables_agree_with_the_class_lists():
    names59, names459 = load_class_names("pc59"), load_class_names("pc459")
    assert len(PC59_DETAIL_IDS) == 59 == len(names59) and list(PC59_DETAIL_IDS) == sorted(PC59_DETAIL_IDS)
    for i, cid in enumerate(PC59_DETAIL_IDS):  # a Detail id is the class's line in labels.txt
        assert names459[cid - 1][0] == ("table" if names59[i][0] == "diningtable" else names59[i][0])
    assert len(ADE847_ADE20K_IDS) == len(set(ADE847_ADE20K_IDS)) == len(load_class_names("ade847")) == 847


def test_detail_class_mask_paints_annotations_in_file_order():
    left = np.zeros((3, 4), bool)
    left[:, :2] = True
    block = np.zeros((3, 4), bool)
    block[1:, 1:3] = True
    img = {"height": 3, "width": 4}
    anns = [{"id": 5, "category_id": 2, "segmentation": _rle(left)},
            {"id": 6, "category_id": 9, "segmentation": _rle(block)}]
    assert detail_class_mask(img, anns).tolist() == [[2, 2, 0, 0], [2, 9, 9, 0], [2, 9, 9, 0]]
    assert detail_class_mask(img, anns[::-1]).tolist() == [[2, 2, 0, 0], [2, 2, 9, 0], [2, 2, 9, 0]]
    with pytest.raises(PrepareError, match="compressed RLE"):
        detail_class_mask(img, [{"id": 7, "category_id": 2, "segmentation": [[0, 0, 1, 1, 0, 1]]}])
    with pytest.raises(PrepareError, match="is 3x4, the image 2x4"):
        detail_class_mask({"height": 2, "width": 4}, anns)


def test_pc_and_ade847_conversions_reject_wrong_inputs():
    with pytest.raises(PrepareError, match="not PASCAL Context-59"):
        convert_pc59(np.array([[0, 3]]))
    with pytest.raises(PrepareError, match="outside 0..459"):
        convert_pc459(np.array([[460]], np.uint16))
    with pytest.raises(PrepareError, match="2-D integer"):
        convert_pc459(np.zeros((2, 2), np.float64))
    with pytest.raises(PrepareError, match="RGB object mask"):
        convert_ade847(np.zeros((2, 2), np.uint8))


def test_shrinking_matches_opencv():
    """Reference outputs of cv2.resize (opencv-python 4.8.1, the version EBSeg pins, and 5.0.0)."""
    y, x = np.mgrid[0:7, 0:9]
    small = ((x * 37 + y * 23) % 256).astype(np.uint8)
    assert resize_linear_u8(small, 4, 5).tolist() == [
        [23, 90, 157, 223, 34], [63, 130, 197, 59, 74], [104, 170, 237, 54, 114], [144, 211, 21, 88, 155]]
    assert resize_nearest((y * 10 + x).astype(np.uint16), 4, 5).tolist() == [
        [0, 1, 3, 5, 7], [10, 11, 13, 15, 17], [30, 31, 33, 35, 37], [50, 51, 53, 55, 57]]
    assert short_side_size(777, 1000) == (512, 659) and short_side_size(1000, 777) == (659, 512)
    assert short_side_size(512, 900) == (512, 900) and short_side_size(6, 8) == (6, 8)
    # 659 * 3 values per row: not a multiple of OpenCV's SIMD width, so the row tails are covered too
    y, x, c = np.mgrid[0:777, 0:1000, 0:3]
    big = ((x * 7 + y * 13 + c * 29) ** 2 % 251).astype(np.uint8)
    out = resize_linear_u8(big, 512, 659)
    assert hashlib.sha256(out.tobytes()).hexdigest() == \
        "2e504c3e461c0161760faf6300786f2d749f4f3ef2c4f2a14154bffe85df2e40"
    out = resize_linear_u8(np.ascontiguousarray(big[..., 1]), 512, 659)
    assert hashlib.sha256(out.tobytes()).hexdigest() == \
        "7f30753b5f45a7926c19e03e284c0f82fef0daa3fbc7c503bbecae01e4266b49"


def test_pc59_end_to_end_then_listed(tmp_path):
    raw = tmp_path / "VOCdevkit/VOC2010"
    for stem in ["2008_000002", "2008_000003", "2008_000007"]:
        _jpg(raw / "JPEGImages" / f"{stem}.jpg", 3, 4)
    left = np.zeros((3, 4), bool)
    left[:, :2] = True
    top = np.zeros((3, 4), bool)
    top[0] = True
    _detail_json(raw / "trainval_merged.json",
                 [_detail_image("2008_000002", "val"), _detail_image("2008_000003", "val"),
                  _detail_image("2008_000007", "train")],
                 # person, then sky painted over it
                 [{"id": 1, "image_id": 2008000002, "category_id": 284, "segmentation": _rle(left)},
                  {"id": 2, "image_id": 2008000002, "category_id": 360, "segmentation": _rle(top)},
                  {"id": 3, "image_id": 2008000007, "category_id": 2, "segmentation": _rle(top)}])
    out = tmp_path / "datasets"
    assert module_main(prepare_job, ["pc59", "--raw", str(raw), "--out", str(out)]) == 0
    pairs = list_pairs("pc59", str(out))
    assert [p.key for p in pairs] == ["2008_000002", "2008_000003"]  # val phase only; all-background kept
    assert pairs[0].label_uri.endswith("pcontext/val/label/2008_000002.png")
    assert pairs[0].image_uri.endswith("pcontext/val/image/2008_000002.jpg")
    assert open(pairs[0].image_uri, "rb").read() == (raw / "JPEGImages/2008_000002.jpg").read_bytes()
    names = load_class_names("pc59")
    assert names[36][0] == "person" and names[46][0] == "sky"
    lab = read_label(pairs[0].label_uri)
    assert lab.dtype == np.uint8
    assert lab.tolist() == [[46, 46, 46, 46], [36, 36, 255, 255], [36, 36, 255, 255]]
    assert read_label(pairs[1].label_uri).tolist() == [[255] * 4] * 3
    s = prepare_dataset("pc59", str(raw), str(out), split="train")
    assert s.written == 1 and s.out_label_dir.endswith("pcontext/train/label")
    assert read_label(f"{s.out_label_dir}/2008_000007.png").tolist() == [[0] * 4, [255] * 4, [255] * 4]


def test_pc459_end_to_end_writes_16bit_tiff(tmp_path):
    raw = tmp_path / "VOC2010"
    _jpg(raw / "JPEGImages/2008_000002.jpg", 3, 4)
    _detail_json(raw / "trainval_merged.json", [_detail_image("2008_000002", "val")], [])
    (raw / "trainval").mkdir()
    label_map = np.array([[0, 1, 2, 459], [284, 0, 0, 0], [1, 1, 1, 1]], np.uint16)
    savemat(raw / "trainval/2008_000002.mat", {"LabelMap": label_map})
    out = tmp_path / "datasets"
    assert module_main(prepare_job, ["pc459", "--raw", str(raw), "--out", str(out)]) == 0
    pairs = list_pairs("pc459", str(out))
    assert len(pairs) == 1 and pairs[0].label_uri.endswith("pcontext_full/val/label/2008_000002.tif")
    assert pairs[0].image_uri.endswith("pcontext_full/val/image/2008_000002.jpg")
    with Image.open(pairs[0].label_uri) as im:
        assert (im.format, im.mode) == ("TIFF", "I;16")
    lab = read_label(pairs[0].label_uri)
    assert lab.dtype == np.uint16 and get_benchmark("pc459").ignore_label == 65535
    assert lab.tolist() == [[65535, 0, 1, 458], [283, 65535, 65535, 65535], [0, 0, 0, 0]]
    assert load_class_names("pc459")[283][0] == "person"


def test_ade847_end_to_end_shrinks_like_maskformer(tmp_path):
    raw = tmp_path / "ADE20K_2021_17_01"
    val = "ADE20K_2021_17_01/images/ADE/validation/urban/street"
    train = "ADE20K_2021_17_01/images/ADE/training/urban/street"
    big = np.full((520, 600), 2978)  # wall
    big[:, 300:] = 312  # building
    big[400:, :] = 7  # no class
    y, x = np.mgrid[0:520, 0:600]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(
        _mkdir(raw / "images/ADE/validation/urban/street") / "ADE_val_00000001.jpg", quality=95)
    Image.fromarray(_ade_seg(big)).save(raw / "images/ADE/validation/urban/street/ADE_val_00000001_seg.png")
    _jpg(raw / "images/ADE/validation/urban/street/ADE_val_00000002.jpg", 6, 8)
    Image.fromarray(_ade_seg(np.full((6, 8), 3148))).save(
        raw / "images/ADE/validation/urban/street/ADE_val_00000002_seg.png")
    _jpg(raw / "images/ADE/training/urban/street/ADE_train_00000001.jpg", 6, 8)
    Image.fromarray(_ade_seg(np.full((6, 8), 312))).save(
        raw / "images/ADE/training/urban/street/ADE_train_00000001_seg.png")
    index = {"folder": [val, train, val], "filename": ["ADE_val_00000001.jpg", "ADE_train_00000001.jpg",
                                                        "ADE_val_00000002.jpg"], "objectnames": ["-"]}
    (raw / "index_ade20k.pkl").write_bytes(pickle.dumps(index))
    out = tmp_path / "datasets"
    assert module_main(prepare_job, ["ade847", "--raw", str(raw), "--out", str(out)]) == 0
    pairs = list_pairs("ade847", str(out))
    assert [p.key for p in pairs] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert pairs[0].label_uri.endswith("annotations_detectron2/validation/ADE_val_00000001.tif")
    lab = read_label(pairs[0].label_uri)
    # short side 520 -> 512, long side round(600 / 520 * 512) = 591; nearest source index floor(i * src / dst)
    assert lab.dtype == np.uint16 and lab.shape == (512, 591)
    assert (lab[0, 295], lab[0, 296], lab[393, 0], lab[394, 0]) == (0, 1, 0, 65535)
    assert np.array_equal(lab, resize_nearest(convert_ade847(_ade_seg(big)), 512, 591))
    assert sorted(np.unique(lab).tolist()) == [0, 1, 65535]
    with Image.open(pairs[0].image_uri) as im:
        assert (im.format, im.size) == ("JPEG", (591, 512))
    # below 512: size kept, the image still re-encoded (as the upstream script does)
    assert read_label(pairs[1].label_uri).tolist() == [[846] * 8] * 6
    with Image.open(pairs[1].image_uri) as im:
        assert (im.format, im.size) == ("JPEG", (8, 6))
    s = prepare_dataset("ade847", str(raw), str(out), split="train")
    assert s.written == 1 and s.out_label_dir.endswith("ADE20K_2021_17_01/annotations_detectron2/training")
    assert read_label(f"{s.out_label_dir}/ADE_train_00000001.tif").tolist() == [[1] * 8] * 6


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_pc_and_ade847_clear_errors(tmp_path, capsys):
    def fails(name, raw, *expected):
        assert module_main(prepare_job, [name, "--raw", str(raw), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        for text in expected:
            assert text in err

    voc = _mkdir(tmp_path / "VOC2010")
    fails("pc59", voc, "VOC2010 images", "JPEGImages/ and trainval_merged.json")
    _jpg(voc / "JPEGImages/2008_000002.jpg", 3, 4)
    fails("pc59", voc, "PASCAL Context annotations not found", "trainval_merged.json")
    (voc / "trainval_merged.json").write_text("{not json")
    fails("pc59", voc, "not a JSON file")
    (voc / "trainval_merged.json").write_text(json.dumps({"images": [{"file_name": "a.jpg"}]}))
    fails("pc59", voc, "not the PASCAL in Detail format")
    one = np.ones((3, 4), bool)
    _detail_json(voc / "trainval_merged.json", [_detail_image("2008_000002", "val")],
                 [{"id": 1, "image_id": 2008000002, "category_id": 3, "segmentation": _rle(one)}])
    fails("pc59", voc, "category ids [3] are not PASCAL Context-59 classes")
    fails("pc459", voc, "trainval.tar.gz")
    _mkdir(voc / "trainval")
    fails("pc459", voc, "PASCAL Context annotation missing", "2008_000002.mat")
    savemat(voc / "trainval/2008_000002.mat", {"Other": np.zeros((3, 4), np.uint16)})
    fails("pc459", voc, "no 'LabelMap'")
    (voc / "trainval/2008_000002.mat").write_text("not a mat file")
    fails("pc459", voc, "not a readable .mat file")

    ade = _mkdir(tmp_path / "ADE20K_2021_17_01")
    fails("ade847", ade, "index_ade20k.pkl", "ADE20K_2021_17_01 folder")
    (ade / "index_ade20k.pkl").write_bytes(b"garbage")
    fails("ade847", ade, "not a readable pickle")
    (ade / "index_ade20k.pkl").write_bytes(pickle.dumps(["ADE_val_00000001.jpg"]))
    fails("ade847", ade, "expected the ADE20K index")
    (ade / "index_ade20k.pkl").write_bytes(pickle.dumps({"folder": ["x/ADE/validation"],
                                                         "filename": ["ADE_val_00000001.jpg"]}))
    fails("ade847", ade, "has no images/ part")
    folder = "ADE20K_2021_17_01/images/ADE/validation/a"
    index = {"folder": [folder], "filename": ["ADE_val_00000001.jpg"]}
    (ade / "index_ade20k.pkl").write_bytes(pickle.dumps(index))
    fails("ade847", ade, "image missing for ADE_val_00000001")
    _jpg(ade / "images/ADE/validation/a/ADE_val_00000001.jpg")
    fails("ade847", ade, "ADE20K object mask missing", "ADE_val_00000001_seg.png")


def test_official_recipe_starts_on_prepared_coco_with_dropped_labels(tmp_path, caplog, capsys):
    """`prepare-data coco171 --split train` written next to the raw images (the detectron2 layout) drops the
    all-ignore label maps, so some images have no label: the recipe skips and counts them, like the official
    loader, and refuses only a dataset with no labelled image."""
    import logging

    from jobs import train as train_job
    from pipeline.train import load_config, prepare
    from tests.helpers import REPO_ROOT

    root = tmp_path / "datasets"
    raw = root / "coco"
    rng = np.random.default_rng(0)
    for split, n in (("train", 9), ("val", 2)):
        for k in range(n):
            stem = f"{k:012d}"
            _jpg(raw / f"{split}2017/{stem}.jpg", 8, 10)
            label = rng.integers(0, 182, (8, 10)) if k != 1 else np.full((8, 10), 255)  # image 1: all ignore
            _png(raw / f"stuffthingmaps/{split}2017/{stem}.png", label)
        assert prepare_dataset("coco171", str(raw), str(root), split=split, log=lambda _: None).skipped_empty == 1
    recipe = str(REPO_ROOT / "configs" / "ebseg_b_coco171.yaml")
    cfg = load_config(recipe, [f"data.train={root}", f"data.val={root}"])
    assert not cfg.data.skip_bad  # the recipe as shipped
    with caplog.at_level(logging.WARNING, logger="ebseg_core.train_data"):
        payload = prepare(cfg)
    assert len(payload["samples"]) == 8 and len(payload["val_samples"]) == 1
    assert not any(s[0].endswith("000000000001.jpg") for s in payload["samples"])
    warned = [r.getMessage() for r in caplog.records if "without a label file" in r.getMessage()]
    assert len(warned) == 2 and "skipping 1 of 9 image(s)" in warned[0] and "000000000001.jpg" in warned[0]

    for lab in (root / "coco/stuffthingmaps_detectron2/train2017").glob("*.png"):
        lab.unlink()
    capsys.readouterr()
    assert module_main(train_job, ["--config", recipe, "--set", f"data.train={root}"]) == 2
    err = capsys.readouterr().err
    assert "no (image, label) pairs" in err and "none of the 9 image(s) has a label file" in err
