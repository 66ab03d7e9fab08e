"""Class-name presets and prepared benchmark layouts: counts, formats, pairing and errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ebseg_core.data import (
    BENCHMARKS,
    CLASS_LIST_KEYS,
    BenchmarkError,
    get_benchmark,
    list_pairs,
    load_class_names,
    parse_class_names,
)

EXPECTED_COUNTS = {"coco171": 171, "ade150": 150, "ade847": 847, "pc59": 59, "pc459": 459, "voc20": 20}


@pytest.mark.parametrize("key", CLASS_LIST_KEYS)
def test_class_lists_have_dataset_counts_and_clean_names(key):
    classes = load_class_names(key)
    assert len(classes) == EXPECTED_COUNTS[key]
    for syns in classes:
        assert syns and all(s == s.strip() and s and ";" not in s for s in syns)
    # prompt names are unique within a benchmark (the first synonym identifies the class)
    firsts = [c[0] for c in classes]
    assert len(set(firsts)) == len(firsts)


def test_ade847_repeated_head_words_keep_them_as_synonyms():
    # ADE20K's WordNet names repeat a head word for different senses; the later class is prompted by
    # its next synonym and keeps the head word as a synonym.
    c = load_class_names("ade847")
    assert c[153] == ["silver screen", "screen", "projection screen"]
    assert c[147][0] == "screen"
    assert sum("bag" in s for s in c) == 3


def test_known_positions_of_public_definitions():
    coco = load_class_names("coco171")
    assert coco[0] == ["person"] and coco[79] == ["toothbrush"] and coco[80] == ["banner"]
    assert coco[-1] == ["wood"]
    ade = load_class_names("ade150")
    assert ade[0] == ["wall"] and ade[12][0] == "person" and ade[-1] == ["flag"]
    assert "double door" in ade[14]
    ade847 = load_class_names("ade847")
    assert ade847[0][0] == "wall" and ade847[2][0] == "sky"
    voc = load_class_names("voc20")
    assert voc[0][0] == "aeroplane" and voc[-1][0] == "tvmonitor"
    pc59 = load_class_names("pc59")
    pc459 = load_class_names("pc459")
    # every PC-59 class is a PC-459 class (diningtable is 'table' in the full list)
    full = {c[0] for c in pc459}
    assert all((c[0] if c[0] != "diningtable" else "table") in full for c in pc59)


def test_ade150_synonyms_mostly_agree_with_ade847():
    # Both lists come from ADE20K's WordNet names; all but the merged/150-only classes appear verbatim.
    full = {frozenset(c) for c in load_class_names("ade847")}
    ade = load_class_names("ade150")
    missing = [c for c in ade if frozenset(c) not in full]
    assert [m[0] for m in missing] == ["door", "crt screen"]


def test_parse_both_formats(tmp_path):
    ours = parse_class_names("# comment\nwall;walls\n\nsky\n")
    assert ours == [["wall", "walls"], ["sky"]]
    official = parse_class_names("1:wall,walls,brick wall\n2:sky,clouds\n")
    assert official == [["wall", "walls", "brick wall"], ["sky", "clouds"]]
    p = tmp_path / "mine.txt"
    p.write_text("cat;kitty\ndog\n")
    assert load_class_names(str(p)) == [["cat", "kitty"], ["dog"]]


def test_parse_errors_are_clear():
    with pytest.raises(BenchmarkError, match="no 'id:' prefix"):
        parse_class_names("1:wall\nsky\n")
    with pytest.raises(BenchmarkError, match="consecutive"):
        parse_class_names("1:wall\n3:sky\n")
    with pytest.raises(BenchmarkError, match="no class names"):
        parse_class_names("\n# nothing\n")
    with pytest.raises(BenchmarkError, match="known: coco171"):
        load_class_names("cityscapes")
    with pytest.raises(BenchmarkError, match="not found"):
        load_class_names("/nonexistent/classes.txt")


def test_benchmark_aliases():
    assert get_benchmark("ade20k_sem_seg_val") is BENCHMARKS["ade150"]
    assert get_benchmark("ADE150").label_dir == "ADEChallengeData2016/annotations_detectron2/validation"
    assert load_class_names("ade20k_full_sem_seg_val") == load_class_names("ade847")
    with pytest.raises(BenchmarkError, match="unknown benchmark"):
        get_benchmark("kitti")


def _write_layout(root, bench, stems, extra_images=()):
    b = get_benchmark(bench)
    img_dir = root.joinpath(*b.image_dir.split("/"))
    lab_dir = root.joinpath(*b.label_dir.split("/"))
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    for s in list(stems) + list(extra_images):
        Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(img_dir / f"{s}{b.image_ext}")
    for s in stems:
        Image.fromarray(np.zeros((4, 5), np.uint8)).save(lab_dir / f"{s}{b.label_ext}")


def test_list_pairs_local_sorted_and_voc_intersection(tmp_path):
    _write_layout(tmp_path, "voc20", ["2007_000033", "2007_000042", "2007_000001"],
                  extra_images=["2008_000999"])
    pairs = list_pairs("voc20", str(tmp_path))
    assert [p.key for p in pairs] == ["2007_000001", "2007_000033", "2007_000042"]
    assert pairs[0].image_uri.endswith("JPEGImages/2007_000001.jpg")
    assert pairs[0].label_uri.endswith("annotations_detectron2/val/2007_000001.png")
    assert len(list_pairs("voc20", str(tmp_path), limit=2)) == 2


def test_list_pairs_wrong_root_names_expected_dir(tmp_path):
    with pytest.raises(BenchmarkError, match="ADEChallengeData2016/annotations_detectron2/validation"):
        list_pairs("ade150", str(tmp_path))
    # labels but no images
    b = get_benchmark("ade150")
    lab = tmp_path.joinpath(*b.label_dir.split("/"))
    lab.mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(lab / "x.png")
    with pytest.raises(BenchmarkError, match="no '.jpg' images"):
        list_pairs("ade150", str(tmp_path))


def test_list_pairs_missing_image_warns(tmp_path):
    _write_layout(tmp_path, "ade150", ["ADE_val_00000001"])
    b = get_benchmark("ade150")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(
        tmp_path.joinpath(*b.label_dir.split("/")) / "ADE_val_00000002.png")
    with pytest.warns(UserWarning, match="1 of 2 labels have no image"):
        pairs = list_pairs("ade150", str(tmp_path))
    assert [p.key for p in pairs] == ["ADE_val_00000001"]


def test_list_pairs_s3(s3, s3_prefix, tmp_path):
    _write_layout(tmp_path, "pc59", ["2008_000002", "2008_000001"])
    for f in sorted(tmp_path.rglob("*")):
        if f.is_file():
            s3.fs.put_file(str(f), s3_prefix.rstrip("/") + "/" + f.relative_to(tmp_path).as_posix())
    pairs = list_pairs("pc59", s3_prefix)
    assert [p.key for p in pairs] == ["2008_000001", "2008_000002"]
    assert pairs[0].image_uri.startswith("s3://") and pairs[0].image_uri.endswith("pcontext/val/image/2008_000001.jpg")
    with pytest.raises(BenchmarkError, match="pcontext_full/val/label"):
        list_pairs("pc459", s3_prefix)
