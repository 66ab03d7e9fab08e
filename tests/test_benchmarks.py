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
    load_class_list,
    load_class_names,
    parse_class_list,
    parse_class_names,
)
from ebseg_core.vocabulary import Vocabulary

EXPECTED_COUNTS = {"coco171": 171, "ade150": 150, "ade847": 847, "pc59": 59, "pc459": 459, "voc20": 20}


@pytest.mark.parametrize("key", CLASS_LIST_KEYS)
def test_class_lists_have_dataset_counts_and_clean_names(key):
    classes = load_class_list(key)
    assert len(classes) == EXPECTED_COUNTS[key]
    for prompt, syns in classes:
        assert prompt == prompt.strip() and prompt and "|" not in prompt
        assert syns and all(s == s.strip() and s and ";" not in s for s in syns)
    prompts = [p for p, _ in classes]
    assert len(set(prompts)) == len(prompts)


# Seen classes per benchmark in the official model (its overlap of each class's synonyms with the
# COCO-Stuff-171 training synonyms, computed in its EBSeg.__init__), and the unseen PC-59 classes.
OFFICIAL_SEEN = {"coco171": 171, "voc20": 20, "pc59": 51, "pc459": 94, "ade150": 67, "ade847": 115}
OFFICIAL_PC59_UNSEEN = [1, 3, 18, 32, 40, 44, 45, 58]


@pytest.mark.parametrize("key", CLASS_LIST_KEYS)
def test_presets_reproduce_the_official_seen_unseen_split(key):
    flags = Vocabulary.preset(key).seen_flags()
    assert sum(flags) == OFFICIAL_SEEN[key]
    if key == "pc59":
        assert [i for i, f in enumerate(flags) if not f] == OFFICIAL_PC59_UNSEEN


def test_prompts_are_the_official_registered_names():
    # The official evaluation formats its dataset registration's names into the templates, commas and
    # all ("road, route"); the synonym lists only decide seen/unseen. A prompt that is not among the
    # synonyms must not count for the overlap: PC-59 "light" (synonyms lamp, bulb) is unseen although
    # COCO has a "light" class, and so is ADE-150 "house" (synonym "house exterior").
    ade = Vocabulary.preset("ade150")
    assert ade.names[:8] == ["wall", "building", "sky", "floor", "tree", "ceiling", "road, route", "bed"]
    assert ade.names[-1] == "flag" and ade.names[8] == "window"
    assert ade.seen_flags()[0] and not ade.seen_flags()[ade.names.index("house")]
    pc59 = Vocabulary.preset("pc59")
    assert pc59.names[32] == "light" and not pc59.seen_flags()[32]
    voc = Vocabulary.preset("voc20")
    assert voc.names[-1] == "tv" and voc.synonyms[-1][0] == "tvmonitor"
    ade847 = Vocabulary.preset("ade847")
    assert ade847.names[1] == "building, edifice"
    coco = Vocabulary.preset("coco171")
    assert coco.names[0] == "person" and coco.names[-1] == "wood" and "wall" in coco.synonyms[coco.names.index("wall-other")]


def test_parse_both_formats(tmp_path):
    ours = parse_class_names("# comment\nwall;walls\n\nsky\nroad, route|road;route\n")
    assert ours == [["wall", "walls"], ["sky"], ["road, route", "road", "route"]]
    assert parse_class_list("road, route|road;route\n") == [("road, route", ["road", "route"])]
    official = parse_class_names("1:wall,walls,brick wall\n2:sky,clouds\n")
    assert official == [["wall", "walls", "brick wall"], ["sky", "clouds"]]
    assert len(parse_class_names("1:person\n2:bicycle\n13:stop sign\n")) == 3  # COCO ids skip numbers
    p = tmp_path / "mine.txt"
    p.write_text("cat;kitty\ndog\n")
    assert load_class_names(str(p)) == [["cat", "kitty"], ["dog"]]


def test_parse_errors_are_clear():
    with pytest.raises(BenchmarkError, match="no 'id:' prefix"):
        parse_class_names("1:wall\nsky\n")
    with pytest.raises(BenchmarkError, match="must increase"):
        parse_class_names("1:wall\n3:sky\n2:tree\n")
    with pytest.raises(BenchmarkError, match="no synonyms after"):
        parse_class_names("road|\n")
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


def test_list_pairs_relative_root(tmp_path, monkeypatch):
    """`--root ./datasets`, as the help shows: the same pairs as the absolute path."""
    _write_layout(tmp_path / "datasets", "ade150", ["ADE_val_00000002", "ADE_val_00000001"])
    monkeypatch.chdir(tmp_path)
    rel = list_pairs("ade150", "./datasets")
    assert [p.key for p in rel] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert rel == list_pairs("ade150", str(tmp_path / "datasets"))


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
