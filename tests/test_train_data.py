"""Training data: layouts, the official augmentation, bad-data errors, the resumable sample stream."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ebseg_core.data.synthetic import write_blob_images
from ebseg_core.train_data import (
    AugmentConfig,
    DatasetError,
    DatasetSpec,
    Sample,
    ShardedSamples,
    TrainSampleDataset,
    _hsv_cv_to_rgb,
    _rgb_to_hsv_cv,
    augment,
    collate_train,
    instances_from_label,
    list_dataset,
    read_class_names,
    read_sample,
    shard_positions,
    write_sample_shards,
)


def _generic(tmp_path, n=6, num_classes=4, names=None):
    write_blob_images(tmp_path, n, sizes=((48, 64), (64, 48)), num_classes=num_classes)
    names = names if names is not None else [f"class{i};syn{i}" for i in range(num_classes)]
    (tmp_path / "class_names.txt").write_text("\n".join(names) + "\n")
    return DatasetSpec(root=str(tmp_path))


def test_generic_layout_lists_pairs_and_class_names(tmp_path):
    samples, names = list_dataset(_generic(tmp_path))
    assert len(samples) == 6 and names[1] == ("class1", ["class1", "syn1"])
    assert all(s.image.split("/")[-1].split(".")[0] == s.label.split("/")[-1].split(".")[0] for s in samples)
    image, label = read_sample(samples[0], num_classes=4)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8 and label.shape == (48, 64)
    assert set(np.unique(label)) <= {0, 1, 2, 3, 255}


def test_coco171_layout(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    (tmp_path / "coco" / "stuffthingmaps_detectron2" / "train2017").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / "coco" / "train2017" / f"{i:012d}.jpg")
        Image.fromarray(np.full((20, 30), 170 - i, np.uint8)).save(
            tmp_path / "coco" / "stuffthingmaps_detectron2" / "train2017" / f"{i:012d}.png"
        )
    samples, names = list_dataset(DatasetSpec(root=str(tmp_path), layout="coco171"))
    assert names is None and len(samples) == 3
    assert read_sample(samples[2], 171)[1].max() == 168


def test_augmentation_matches_the_official_recipe(tmp_path):
    rng_img = np.random.default_rng(0)
    image = rng_img.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    label = np.zeros((300, 400), np.int64)
    label[:, 200:] = 3
    cfg = AugmentConfig()
    assert cfg.min_sizes == (320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960)
    img, lab = augment(image, label, cfg, np.random.default_rng(1))
    assert img.shape == (3, 640, 640) and img.dtype == torch.uint8 and lab.shape == (640, 640)
    # Padding: image 128 and label 255 on whatever lies outside the (resized, cropped) content.
    pad_rows = (lab == 255).all(1)
    if pad_rows.any():
        assert (img[:, pad_rows] == 128).all()
    assert set(torch.unique(lab).tolist()) <= {0, 3, 255}
    # Shortest edge resized to one of min_sizes, crop at most 640.
    valid = lab != 255
    h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
    assert h <= 640 and w <= 640 and (min(h, w) in cfg.min_sizes or max(h, w) == 640)
    # Deterministic in the generator; flips happen for some seeds.
    img2, lab2 = augment(image, label, cfg, np.random.default_rng(1))
    assert torch.equal(img, img2) and torch.equal(lab, lab2)
    small = AugmentConfig(min_sizes=(64,), crop_size=(64, 64), pad_size=64, color_aug=False)
    firsts = {int(augment(image, label, small, np.random.default_rng(s))[1][0, 0]) for s in range(12)}
    assert firsts == {0, 3}  # left column is class 0 unflipped, class 3 flipped


def test_hsv_round_trip_is_close():
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    back = _hsv_cv_to_rgb(_rgb_to_hsv_cv(rgb))
    assert np.abs(back.astype(int) - rgb).max() <= 6  # 8-bit HSV quantisation (hue steps of 2 degrees)


def test_instances_from_label():
    lab = torch.tensor([[3, 3, 255], [1, 3, 1]])
    inst = instances_from_label(lab)
    assert inst["labels"].tolist() == [1, 3]
    assert inst["masks"].dtype == torch.bool and inst["masks"][1].sum() == 3
    empty = instances_from_label(torch.full((2, 2), 255))
    assert empty["labels"].numel() == 0 and empty["masks"].shape == (0, 2, 2)



def test_ignore_is_unknown_marks_the_known_pixels_for_the_losses():
    lab = torch.tensor([[0, 255], [2, 2]])
    assert "known" not in instances_from_label(lab)  # the official rule: ignore lies outside every mask
    inst = instances_from_label(lab, ignore_is_unknown=True)
    assert inst["known"].tolist() == [[True, False], [True, True]]
    assert inst["labels"].tolist() == [0, 2]

def test_stream_is_a_pure_function_of_position_and_splits_ranks():
    n, world = 10, 2
    for epoch in range(2):
        seen = [shard_positions(n, r, world, epoch * 5 + k, seed=3) for r in range(world) for k in range(5)]
        assert sorted(seen) == list(range(n))
    assert shard_positions(n, 1, 2, 7, 3) == shard_positions(n, 1, 2, 7, 3)
    with pytest.raises(DatasetError, match="cannot be split"):
        shard_positions(1, 0, 2, 0, 0)


def test_train_dataset_and_collate(tmp_path):
    samples, names = list_dataset(_generic(tmp_path))
    cfg = AugmentConfig(min_sizes=(64, 96), crop_size=(64, 64), pad_size=64)
    ds = TrainSampleDataset(samples, len(names), cfg, rank=1, world_size=2, seed=0)
    batch = [ds[0], ds[1]]
    images, targets, bad = collate_train(batch)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8 and bad == 0
    for t, b in zip(targets, batch):
        assert torch.equal(t["masks"].any(0), b["label"] != 255)
    assert torch.equal(ds[5]["image"], ds[5]["image"])


def test_images_without_labels_are_skipped_and_counted(tmp_path, caplog):
    spec = _generic(tmp_path)
    (tmp_path / "labels" / "blob_00003.png").unlink()
    with caplog.at_level(logging.WARNING, logger="ebseg_core.train_data"):
        samples, _ = list_dataset(spec)
    assert len(samples) == 5 and not any("blob_00003" in s.image for s in samples)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "skipping 1 of 6 image(s) without a label file" in msg and "images/blob_00003.png" in msg
    for lab in (tmp_path / "labels").glob("*.png"):
        lab.unlink()
    with pytest.raises(DatasetError, match="no .image, label. pairs.*none of the 6 image.s. has a label file"):
        list_dataset(spec)


def test_label_out_of_range_names_file(tmp_path):
    spec = _generic(tmp_path, num_classes=4, names=["a", "b", "c"])  # labels use 4 classes, names list 3
    samples, names = list_dataset(spec)
    with pytest.raises(DatasetError, match=r"blob_0000\d\.png has value 3 but the dataset has 3 classes"):
        for s in samples:
            read_sample(s, len(names))


def test_unreadable_image_is_named_or_skipped(tmp_path):
    spec = _generic(tmp_path)
    (tmp_path / "images" / "blob_00000.jpg").write_bytes(b"not an image")
    samples, names = list_dataset(spec)
    with pytest.raises(DatasetError, match="unreadable image .*blob_00000.jpg"):
        read_sample(samples[0], 4)
    cfg = AugmentConfig(min_sizes=(64,), crop_size=(64, 64), pad_size=64)
    ds = TrainSampleDataset(samples, 4, cfg, skip_bad=True)
    items = [ds[k] for k in range(6)]  # one epoch covers the bad file
    assert ds.bad_samples == 1 and sum(i["bad"] for i in items) == 1
    strict = TrainSampleDataset(samples, 4, cfg)
    with pytest.raises(DatasetError):
        [strict[k] for k in range(6)]


def test_class_name_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="class-name file not found"):
        read_class_names(str(tmp_path / "nope.txt"))
    (tmp_path / "c.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="no class names"):
        read_class_names(str(tmp_path / "c.txt"))
    with pytest.raises(DatasetError, match="no images"):
        (tmp_path / "class_names.txt").write_text("a\n")
        list_dataset(DatasetSpec(root=str(tmp_path)))


def test_class_name_file_takes_every_vocabulary_format(tmp_path):
    """Training reads class files with the vocabulary's one parser: prompts before '|', the official
    numbered form, synonyms."""
    (tmp_path / "ours.txt").write_text("road, route|road;route;street\nsky;clouds\n")
    assert read_class_names(str(tmp_path / "ours.txt")) == [
        ("road, route", ["road", "route", "street"]), ("sky", ["sky", "clouds"])]
    (tmp_path / "official.txt").write_text("1:person,child\n3:bicycle\n")
    assert read_class_names(str(tmp_path / "official.txt")) == [
        ("person", ["person", "child"]), ("bicycle", ["bicycle"])]


def test_more_than_255_classes_use_16bit_labels_with_65535_ignore(tmp_path):
    """Labels of a 300-class dataset (e.g. a curation export of a large vocabulary): 255 is a class,
    65535 is ignore, the same convention `ebseg curate export` writes."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image = np.zeros((64, 64, 3), np.uint8)
    label = np.full((64, 64), 65535, np.uint16)
    label[:32] = 255
    label[32:, :32] = 299
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    Image.fromarray(label).save(tmp_path / "labels" / "a.png")
    (tmp_path / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(300)) + "\n")
    samples, names = list_dataset(DatasetSpec(root=str(tmp_path)))
    _, read = read_sample(samples[0], num_classes=len(names))
    assert read.max() == 65535
    cfg = AugmentConfig(min_sizes=(64,), crop_size=(64, 64), pad_size=64, color_aug=False, flip=False)
    ds = TrainSampleDataset(samples, len(names), cfg)
    _, targets, _ = collate_train([ds[0]])
    assert targets[0]["labels"].tolist() == [255, 299]
    assert int(targets[0]["masks"].sum()) == 32 * 64 + 32 * 32
    # A 4-class dataset keeps the 8-bit convention: 255 is ignore, anything else above 3 is an error.
    with pytest.raises(DatasetError, match="255 = ignore"):
        read_sample(samples[0], num_classes=4)


def test_training_job_takes_the_prompt_of_a_prompt_bar_synonyms_class_file(tmp_path):
    """`ebseg train`'s driver builds the vocabulary from class_names.txt with its prompts: the name
    before '|' goes into the templates, the synonyms after it only decide seen/unseen."""
    from ebseg_core.vocabulary import Vocabulary
    from pipeline.train import load_config, prepare

    spec = _generic(tmp_path, names=["road, route|road;route", "sky;clouds", "tree", "grass"])
    cfg = load_config(str(Path(__file__).resolve().parent.parent / "configs" / "tiny_generic.yaml"),
                      [f"data.train={spec.root}"])
    vocab = Vocabulary.from_json(prepare(cfg)["vocabulary"])
    assert vocab.names == ["road, route", "sky", "tree", "grass"]
    assert vocab.synonyms[0] == ("road", "route") and vocab.synonyms[1] == ("sky", "clouds")


def test_sample_shards_give_back_the_list_in_order_and_are_written_once(tmp_path):
    samples = [Sample(f"s3://b/images/{i:05d}.jpg", f"s3://b/labels/{i:05d}.png") for i in range(1000)]
    shards = write_sample_shards(samples, str(tmp_path / "samples"), rows_per_shard=300)
    assert shards.counts == (300, 300, 300, 100) and len(shards) == 1000
    view = ShardedSamples(shards, cache_shards=2)
    assert [view[i] for i in range(1000)] == samples
    assert view[999] == samples[999] and view.shard_reads == 4
    with pytest.raises(IndexError):
        view[1000]
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")}
    assert write_sample_shards(samples, str(tmp_path / "samples"), rows_per_shard=300) == shards  # reused
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")} == mtimes
    other = write_sample_shards(samples[::-1], str(tmp_path / "samples"), rows_per_shard=300)
    assert other.urls[0] != shards.urls[0] and ShardedSamples(other)[0] == samples[-1]  # another list, other files


def test_sharded_samples_feed_the_same_stream_as_the_list(tmp_path):
    write_blob_images(tmp_path / "d", 7, sizes=((48, 64),), num_classes=3)
    (tmp_path / "d" / "class_names.txt").write_text("a\nb\nc\n")
    samples, _ = list_dataset(DatasetSpec(str(tmp_path / "d")))
    view = ShardedSamples(write_sample_shards(samples, str(tmp_path / "samples"), rows_per_shard=3))
    cfg = AugmentConfig(min_sizes=(48,), crop_size=(32, 32), pad_size=64)
    for rank in (0, 1):
        a = TrainSampleDataset(samples, 3, cfg, rank=rank, world_size=2, seed=5)
        b = TrainSampleDataset(view, 3, cfg, rank=rank, world_size=2, seed=5)
        for position in (0, 2, 3, 11):
            assert torch.equal(a[position]["image"], b[position]["image"])
            assert torch.equal(a[position]["label"], b[position]["label"])
