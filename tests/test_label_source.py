"""Training straight from label Parquet: the query selects the same rows as `ebseg curate`, and each
sample reads back exactly what an export to the generic layout and the training loader would give."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest

from ebseg_core.train_data import (
    AugmentConfig,
    DatasetError,
    DatasetSpec,
    augment,
    instances_from_label,
    list_dataset,
    read_sample,
)
from pipeline import curate as C
from pipeline import schema as S
from pipeline.label_source import LabelRowReader, LabelSourceSpec, list_label_samples, parse_label_ref
from tests.test_curate_data import build_label_dataset

OPTIONS = {"classes": [{"name": "car", "min_fraction": 0.02}], "without": ["road"],
           "keep_classes": ["lawn", "car", "edge"], "min_pixel_confidence": 0.4}


@pytest.fixture(scope="module")
def fx(s3):
    # Blob images on S3 labelled with their true label maps (boundaries = class "edge") and random
    # confidence, in 3 Parquet files of 3-row row groups.
    return build_label_dataset(s3, s3.url(f"label-source-{os.getpid()}/"), n_images=14, n_files=3, seed=11)


@pytest.fixture(scope="module")
def listing(fx):
    return list_label_samples(LabelSourceSpec.from_options(fx.url, OPTIONS))


def _selected(fx) -> set[str]:
    """Brute force over the rows as written: contains car >= 2% and no road."""
    out = set()
    for r in fx.rows:
        by_id = {c["id"]: c for c in r["classes"]}
        if r["status"] == "ok" and 4 in by_id and float(np.float32(by_id[4]["pixel_fraction"])) >= 0.02 \
                and 3 not in by_id:
            out.add(r["uri"])
    return out


def test_listing_selects_the_query_rows_in_file_order(fx, listing):
    assert {s.image for s in listing.samples} == _selected(fx) and len(listing.samples) >= 3
    assert listing.matched == len(listing.samples)
    assert listing.class_names == [("grass", ["grass", "lawn", "turf"]), ("car", ["car", "automobile"]),
                                   ("edge", ["edge"])]
    refs = [parse_label_ref(s.label) for s in listing.samples]
    positions = [(url, rg, row) for url, rg, row, _ in refs]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert all(url.startswith("s3://") and url.endswith(".parquet") for url, *_ in refs)
    assert {S.image_id_for(s.image) for s in listing.samples} == {iid for *_, iid in refs}


def test_samples_equal_an_export_read_by_the_training_loader(fx, listing, tmp_path):
    reader = listing.reader
    assert reader.num_classes == 3 and reader.ignore_label == 255
    ds = C.open_labels(fx.url)
    lf = C.make_label_filter(ds, OPTIONS["keep_classes"], OPTIONS["min_pixel_confidence"])
    sel = C.query(ds, C.Query(classes=[C.ClassFilter("car", min_fraction=0.02)], without=["road"]))
    C.export_generic(ds, sel, str(tmp_path / "gen"), lf)
    exported, names = list_dataset(DatasetSpec(root=str(tmp_path / "gen")))
    assert names == listing.class_names
    by_id = {os.path.basename(s.image).split(".")[0]: s for s in exported}
    ignored = kept = 0
    for sample in listing.samples:
        image, label = reader(sample, 3)
        want_image, want_label = read_sample(by_id[S.image_id_for(sample.image)], 3)
        np.testing.assert_array_equal(image, want_image)
        np.testing.assert_array_equal(label, want_label)
        # and the label is the stored truth filtered: lawn->0, car->1, edge->2, rest and low confidence 255
        iid = S.image_id_for(sample.image)
        truth = np.array([255, 0, 255, 255, 1, 2])[fx.labels[iid]]
        truth[fx.confidences[iid] < 0.4] = 255
        np.testing.assert_array_equal(label, truth)
        assert label.dtype == np.int64 and image.dtype == np.uint8 and image.shape == (*label.shape, 3)
        ignored += int((label == 255).sum())
        kept += int((label != 255).sum())
    assert ignored > 0 and kept > 0
    # Read in listing order, each row group is fetched once (the reader keeps recent row groups).
    groups = {parse_label_ref(s.label)[:2] for s in listing.samples}
    assert reader.row_group_reads == len(groups)


def test_samples_feed_the_training_augmentation(listing):
    image, label = listing.reader(listing.samples[0], 3)
    cfg = AugmentConfig(min_sizes=(64,), max_size=128, crop_size=(64, 64), pad_size=64)
    img, lab = augment(image, label, cfg, np.random.default_rng(0), listing.reader.ignore_label)
    target = instances_from_label(lab, listing.reader.ignore_label)
    assert img.shape == (3, 64, 64) and set(target["labels"].tolist()) <= {0, 1, 2}


def test_reader_pickles_without_its_cache(listing):
    clone = pickle.loads(pickle.dumps(listing.reader))
    assert clone.row_group_reads == 0 and not clone._cache
    image, label = clone(listing.samples[-1], 3)
    assert image.shape[:2] == label.shape and clone.row_group_reads == 1
    from_json = LabelRowReader.from_dict(json.loads(json.dumps(listing.reader.to_dict())))
    np.testing.assert_array_equal(from_json(listing.samples[-1], 3)[1], label)
    with pytest.raises(DatasetError, match="training expects 5"):
        clone(listing.samples[0], 5)
    with pytest.raises(DatasetError, match="not a label-row reference"):
        clone(type(listing.samples[0])(listing.samples[0].image, "labels/x.png"), 3)


def _local_dataset(tmp_path, rows_per_file):
    names = ["a", "b", "c"]
    schema = S.label_schema(names, None, "v")
    (tmp_path / "lake").mkdir(exist_ok=True)
    (tmp_path / "labels").mkdir(exist_ok=True)
    for f, rows in enumerate(rows_per_file):
        pq.write_table(S.rows_to_table(rows, schema), str(tmp_path / "labels" / f"part-{f}.parquet"),
                       row_group_size=2)
    return str(tmp_path / "labels")


def _row(tmp_path, name, value, size=(6, 5)):
    from PIL import Image

    path = tmp_path / "lake" / f"{name}.png"
    Image.fromarray(np.full((*size, 3), 40 * value, np.uint8)).save(path)
    lab = np.full(size, value, np.int64)
    lab[0] = 2
    return S.make_ok_row(str(path), lab, np.full(size, 0.9, np.float32), ["a", "b", "c"], "m", "v")


def test_relabelled_image_reads_the_last_row_and_changes_are_caught(tmp_path):
    (tmp_path / "lake").mkdir()
    first = [_row(tmp_path, f"im{i}", 0) for i in range(3)]
    relabel = _row(tmp_path, "im1", 1)  # same image, written again later with another label
    url = _local_dataset(tmp_path, [first, [relabel]])
    with pytest.raises(DatasetError, match="selects no labelled images"):  # every row contains class c
        list_label_samples(LabelSourceSpec.from_options(url, {"without": ["c"]}))
    listing = list_label_samples(LabelSourceSpec.from_options(url, {"keep_classes": ["a", "b"]}))
    assert len(listing.samples) == 3
    im1 = [s for s in listing.samples if s.image.endswith("im1.png")]
    assert len(im1) == 1 and parse_label_ref(im1[0].label)[0].endswith("part-1.parquet")
    _, label = listing.reader(im1[0], 2)
    assert (label[1:] == 1).all() and (label[0] == 255).all()  # class c is not kept -> ignore
    # Rewrite the first file with its rows reversed: a listed row now holds another image.
    pq.write_table(S.rows_to_table(first[::-1], S.label_schema(["a", "b", "c"], None, "v")),
                   str(tmp_path / "labels" / "part-0.parquet"), row_group_size=2)
    im0 = [s for s in listing.samples if s.image.endswith("im0.png")][0]
    with pytest.raises(DatasetError, match="changed since the samples were listed"):
        type(listing.reader)(listing.reader.label_filter)(im0, 2)


def test_option_mistakes_are_clear(fx):
    with pytest.raises(C.CurationError, match="unknown label-source option.*colour"):
        LabelSourceSpec.from_options(fx.url, {"colour": "red"})
    with pytest.raises(C.CurationError, match="give 'name'.*not min_area"):
        LabelSourceSpec.from_options(fx.url, {"classes": [{"name": "car", "min_area": 3}]})
    with pytest.raises(C.CurationError, match="sample must be a whole number"):
        LabelSourceSpec.from_options(fx.url, {"sample": -1})
    with pytest.raises(C.CurationError, match="Did you mean: automobile"):
        list_label_samples(LabelSourceSpec.from_options(fx.url, {"classes": ["automobil"]}))
    with pytest.raises(C.CurationError, match="either --sample or --per-class"):
        list_label_samples(LabelSourceSpec.from_options(fx.url, {"sample": 2, "per_class": 1}))
    with pytest.raises(DatasetError, match="selects no labelled images"):
        list_label_samples(LabelSourceSpec.from_options(fx.url, {"classes": [{"name": "car", "min_fraction": 1.0}]}))
    sampled = list_label_samples(LabelSourceSpec.from_options(fx.url, {"classes": ["grass"], "sample": 2, "seed": 4}))
    again = list_label_samples(LabelSourceSpec.from_options(fx.url, {"classes": ["grass"], "sample": 2, "seed": 4}))
    assert len(sampled.samples) == 2 and sampled.samples == again.samples
