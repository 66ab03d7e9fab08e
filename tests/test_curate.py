"""Curation API: every query equals a brute-force scan of all rows; exports round-trip; clear errors."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import curate as C
from pipeline import schema as S
from tests.test_curate_data import NAMES, SYNONYMS, build_label_dataset


@pytest.fixture(scope="module")
def fx(s3):
    return build_label_dataset(s3, s3.url(f"curate-module-{os.getpid()}/"))


@pytest.fixture(scope="module")
def ds(fx):
    return C.open_labels(fx.url)


def _ids(table: pa.Table) -> set[str]:
    return set(table.column("image_id").to_pylist())


def _brute(rows, want=(), without=(), status="ok", kinds=()):
    """Reference: plain Python over every row as written."""
    out = set()
    for r in rows:
        if status is not None and r["status"] != status:
            continue
        if kinds and r["error_kind"] not in kinds:
            continue
        by_id = {c["id"]: c for c in r["classes"]}
        good = True
        for cid, fmin, fmax, cmin, cmax in want:
            c = by_id.get(cid)
            if c is None:
                good = False
                break
            # Values as stored (float32), compared in double precision like the query does.
            pf = float(np.float32(c["pixel_fraction"]))
            mc = float(np.float32(c["mean_confidence"]))
            if (fmin is not None and pf < fmin) or (fmax is not None and pf > fmax) \
                    or (cmin is not None and mc < cmin) or (cmax is not None and mc > cmax):
                good = False
                break
        if good and any(cid in by_id for cid in without):
            good = False
        if good:
            out.add(r["image_id"])
    return out


def test_open_reads_vocabulary_and_model(ds):
    assert ds.names == NAMES
    assert ds.meta.synonyms == SYNONYMS
    assert ds.meta.model["preset"] == "ebseg-tiny"
    assert len(ds.files) == 3


@pytest.mark.parametrize(
    "name,fmin,fmax,cmin,cmax",
    [
        ("grass", None, None, None, None),
        ("lawn", 0.1, None, None, None),  # synonym
        ("car", 0.05, 0.4, None, None),
        ("tree", None, None, 0.5, None),
        ("sky", 0.2, None, None, 0.45),
        ("automobile", None, 0.01, None, None),
    ],
)
def test_query_class_with_bounds_equals_brute_force(ds, fx, name, fmin, fmax, cmin, cmax):
    q = C.Query(classes=[C.ClassFilter(name, fmin, fmax, cmin, cmax)])
    got = _ids(C.query(ds, q))
    want = _brute(fx.rows, want=[(ds.class_id(name), fmin, fmax, cmin, cmax)])
    assert got == want
    assert 0 < len(want) < 18 or name in ("grass",) or fmax == 0.01  # the data makes the filter bite


def test_query_synonym_same_as_name_and_case_insensitive(ds):
    a = _ids(C.query(ds, C.Query(classes=[C.ClassFilter("grass", 0.05)])))
    b = _ids(C.query(ds, C.Query(classes=[C.ClassFilter("Turf ", 0.05)])))
    assert a == b and a


def test_query_several_classes_and_without(ds, fx):
    q = C.Query(classes=[C.ClassFilter("tree"), C.ClassFilter("car", min_fraction=0.02)], without=["road"])
    got = _ids(C.query(ds, q))
    want = _brute(fx.rows, want=[(2, None, None, None, None), (4, 0.02, None, None, None)], without=[3])
    assert got == want and want
    only_without = _ids(C.query(ds, C.Query(without=["sky"])))
    assert only_without == _brute(fx.rows, without=[0]) and only_without


def test_query_status_and_error_kind(ds, fx):
    assert _ids(C.query(ds, C.Query(status="error"))) == _brute(fx.rows, status="error")
    assert len(_brute(fx.rows, status="error")) == 4
    got = C.query(ds, C.Query(error_kinds=["not_image"]))
    assert _ids(got) == _brute(fx.rows, status="error", kinds=["not_image"])
    assert set(got.column("error_kind").to_pylist()) == {"not_image"} and got.num_rows == 2
    assert _ids(C.query(ds, C.Query(status="ok"))) == _brute(fx.rows, status="ok")
    assert C.query(ds, C.Query()).num_rows == len(fx.rows)
    assert C.query(ds, C.Query(limit=5)).num_rows == 5


def test_random_sample_is_seeded_subset(ds):
    ok = C.query(ds, C.Query(status="ok"))
    a = C.sample(ok, 5, seed=3)
    b = C.sample(ok, 5, seed=3)
    c = C.sample(ok, 5, seed=4)
    assert a.num_rows == 5 and _ids(a) <= _ids(ok)
    assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    assert _ids(a) != _ids(c)
    # Independent of the order rows arrive in.
    rev = ok.take(pa.array(list(range(ok.num_rows - 1, -1, -1))))
    assert _ids(C.sample(rev, 5, seed=3)) == _ids(a)
    assert C.sample(ok, 1000).num_rows == ok.num_rows


def test_stratified_sample_covers_every_class(ds, fx):
    ok = C.query(ds, C.Query(status="ok"))
    k = 2
    picked = C.stratified_sample(ok, k, seed=0)
    rows = {r["image_id"]: r for r in fx.rows}
    for cid in range(len(NAMES)):
        available = sum(1 for r in fx.rows if any(c["id"] == cid for c in r["classes"]))
        have = sum(1 for i in _ids(picked) if any(c["id"] == cid for c in rows[i]["classes"]))
        assert have >= min(k, available)
    assert picked.num_rows <= k * len(NAMES)
    again = C.stratified_sample(ok, k, seed=0)
    assert again.column("image_id").to_pylist() == picked.column("image_id").to_pylist()
    only_road = C.stratified_sample(ok, 3, seed=0, class_ids=[3])
    assert only_road.num_rows == 3
    assert all(any(c["id"] == 3 for c in rows[i]["classes"]) for i in _ids(only_road))


def test_stats_equal_brute_force(ds, fx):
    st = C.stats(ds)
    ok_rows = [r for r in fx.rows if r["status"] == "ok"]
    assert st.rows == len(fx.rows) and st.ok == len(ok_rows) and st.errors == 4
    assert st.errors_by_kind == {"not_image": 2, "truncated": 1, "read": 1}
    assert st.pixels == sum(r["width"] * r["height"] for r in ok_rows)
    for cs in st.classes:
        masks = [(fx.labels[r["image_id"]] == cs.id) for r in ok_rows]
        assert cs.images == sum(1 for m in masks if m.any())
        assert cs.pixels == sum(int(m.sum()) for m in masks)
        hist = [0] * C.CONFIDENCE_BINS
        for r in ok_rows:
            for c in r["classes"]:
                if c["id"] == cs.id:
                    b = min(int(np.float32(c["mean_confidence"]) * C.CONFIDENCE_BINS), C.CONFIDENCE_BINS - 1)
                    hist[b] += c["pixels"]
        assert cs.confidence_hist == hist
        assert sum(hist) == cs.pixels
    assert sum(cs.pixels for cs in st.classes) == st.pixels
    json.dumps(st.to_dict())  # serialisable for --json


def test_unknown_class_suggests_close_names(ds):
    with pytest.raises(C.CurationError, match=r"'gras' is not in the vocabulary.*Did you mean: grass"):
        C.query(ds, C.Query(classes=[C.ClassFilter("gras")]))
    with pytest.raises(C.CurationError, match=r"Did you mean: .*automobile"):
        ds.class_id("automobil")
    with pytest.raises(C.CurationError, match="min fraction 0.5 is above max fraction 0.1"):
        C.query(ds, C.Query(classes=[C.ClassFilter("car", 0.5, 0.1)]))
    with pytest.raises(C.CurationError, match="error rows have no classes"):
        C.query(ds, C.Query(classes=[C.ClassFilter("car")], status="error"))


def test_open_non_label_parquet_and_unknown_version(s3, s3_prefix):
    other = s3_prefix + "other/x.parquet"
    with s3.pa_fs.open_output_stream(other[5:]) as f:
        pq.write_table(pa.table({"a": [1]}), f)
    with pytest.raises(S.LabelSchemaError, match="not an EBSeg label Parquet"):
        C.open_labels(s3_prefix + "other/")
    schema = S.label_schema(NAMES)
    v2 = schema.with_metadata({**schema.metadata, S.META_SCHEMA_VERSION: b"2"})
    with s3.pa_fs.open_output_stream((s3_prefix + "v2/a.parquet")[5:]) as f:
        pq.write_table(S.rows_to_table([S.make_error_row("x", "read", "m")], v2), f)
    with pytest.raises(S.LabelSchemaError, match="version 2"):
        C.open_labels(s3_prefix + "v2")
    with pytest.raises(FileNotFoundError):
        C.open_labels(s3_prefix + "nothing-here/")


# ----------------------------------------------------------------------------------------- exports


def _selection(ds):
    return C.query(ds, C.Query(classes=[C.ClassFilter("car", min_fraction=0.02)]))


def _expected(fx, iid, lf):
    lab = fx.labels[iid]
    out = lf.lut()[lab]
    if lf.min_confidence is not None:
        out[fx.confidences[iid] < lf.min_confidence] = lf.ignore_index
    return out


def test_export_generic_reads_back_with_training_loader(ds, fx, tmp_path):
    sel = _selection(ds)
    lf = C.make_label_filter(ds, keep=["grass", "car", "street"], min_confidence=0.3)
    assert lf.keep_ids == [1, 3, 4]
    res = C.export_generic(ds, sel, str(tmp_path / "gen"), lf)
    assert res.written == sel.num_rows > 0 and not res.skipped
    root = tmp_path / "gen"
    lines = (root / "class_names.txt").read_text().splitlines()
    assert lines == ["grass;lawn;turf", "road;street", "car;automobile"]
    info = json.loads((root / "dataset.json").read_text())
    assert info["ignore_index"] == 255 and info["num_classes"] == 3 and info["images"] == sel.num_rows
    rows = {r["image_id"]: r for r in fx.rows}
    for iid in _ids(sel):
        (img_path,) = list((root / "images").glob(f"{iid}.*"))
        src = s3_bytes(rows[iid]["uri"])
        assert img_path.read_bytes() == src  # original bytes copied (no EXIF rotation here)
        with Image.open(img_path) as im:
            assert im.size == (rows[iid]["width"], rows[iid]["height"])
        lab = np.asarray(Image.open(root / "labels" / f"{iid}.png"))
        np.testing.assert_array_equal(lab, _expected(fx, iid, lf))
        assert set(np.unique(lab)) <= {0, 1, 2, 255}
        assert (lab == 255).any() and (lab != 255).any()

    # The training side's reader accepts the layout as-is.
    from ebseg_core.train_data import DatasetSpec, list_dataset, read_sample

    samples, class_names = list_dataset(DatasetSpec(root=str(root)))
    assert len(samples) == sel.num_rows
    assert class_names[1] == ("road", ["road", "street"])
    image, label = read_sample(samples[0], num_classes=3)
    assert image.shape[:2] == label.shape


def s3_bytes(uri: str) -> bytes:
    from ebseg_core.storage import read_bytes

    return read_bytes(uri)


def test_export_generic_to_s3_and_bakes_exif_orientation(s3, s3_prefix, tmp_path):
    # An image stored with EXIF orientation 6 (rotate 90): labelled at the displayed size.
    from PIL import Image as _I

    raw = np.zeros((20, 30, 3), dtype=np.uint8)
    raw[:, :10] = 255
    im = _I.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    uri = s3_prefix + "lake/rot.jpg"
    s3.fs.pipe(uri, buf.getvalue())
    lab = np.zeros((30, 20), dtype=np.int64)  # displayed: 20 wide, 30 high
    lab[:10] = 1
    row = S.make_ok_row(uri, lab, np.ones(lab.shape, np.float32), ["a", "b"], "m", "v")
    with s3.pa_fs.open_output_stream((s3_prefix + "labels/p.parquet")[5:]) as f:
        pq.write_table(S.rows_to_table([row], S.label_schema(["a", "b"], None, "v")), f)
    d = C.open_labels(s3_prefix + "labels")
    out = s3_prefix + "export"
    res = C.export_generic(d, C.query(d, C.Query()), out, C.make_label_filter(d))
    assert res.written == 1, res.skipped
    iid = row["image_id"]
    img = _I.open(io.BytesIO(s3.fs.cat(f"{out}/images/{iid}.jpg")))
    assert img.size == (20, 30) and img.getexif().get(0x0112, 1) == 1
    label = np.asarray(_I.open(io.BytesIO(s3.fs.cat(f"{out}/labels/{iid}.png"))))
    np.testing.assert_array_equal(label, lab)
    assert s3.fs.cat(f"{out}/class_names.txt").decode() == "a\nb\n"


def test_export_coco_rle_round_trip(ds, fx, tmp_path):
    from pycocotools import mask as mask_utils

    sel = _selection(ds)
    lf = C.make_label_filter(ds, min_confidence=0.4)
    res = C.export_coco(ds, sel, str(tmp_path / "coco.json"), lf)
    doc = json.loads((tmp_path / "coco.json").read_text())
    assert res.written == sel.num_rows == len(doc["images"])
    assert [c["name"] for c in doc["categories"]] == NAMES
    assert doc["categories"][1]["synonyms"] == ["grass", "lawn", "turf"]
    by_num = {im["id"]: im for im in doc["images"]}
    expected_anns = 0
    for im in doc["images"]:
        exp = _expected(fx, im["ebseg_image_id"], lf)
        expected_anns += sum(1 for cid in range(len(NAMES)) if (exp == cid).any())
    assert len(doc["annotations"]) == expected_anns
    for ann in doc["annotations"]:
        im = by_num[ann["image_id"]]
        exp = _expected(fx, im["ebseg_image_id"], lf) == ann["category_id"] - 1
        m = mask_utils.decode(ann["segmentation"])
        assert m.shape == (im["height"], im["width"])
        np.testing.assert_array_equal(m.astype(bool), exp)
        assert ann["area"] == int(exp.sum())
        ys, xs = np.nonzero(exp)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_export_masks_round_trip(ds, fx, tmp_path):
    sel = C.sample(C.query(ds, C.Query(status="ok")), 4, seed=1)
    lf = C.make_label_filter(ds, remap=False)
    res = C.export_masks(ds, sel, str(tmp_path / "m"), lf, per_class=True)
    assert res.written == 4
    index = [json.loads(x) for x in (tmp_path / "m" / "index.jsonl").read_text().splitlines()]
    assert {r["image_id"] for r in index} == _ids(sel)
    for iid in _ids(sel):
        lab = np.asarray(Image.open(tmp_path / "m" / "masks" / f"{iid}.png"))
        np.testing.assert_array_equal(lab, fx.labels[iid])
        conf = np.asarray(Image.open(tmp_path / "m" / "confidence" / f"{iid}.png"))
        np.testing.assert_array_equal(conf.astype(np.float32) / 255, fx.confidences[iid])
        for cid in np.unique(fx.labels[iid]):
            binary = np.asarray(Image.open(tmp_path / "m" / "class_masks" / iid / f"{cid}.png"))
            np.testing.assert_array_equal(binary == 255, fx.labels[iid] == cid)
    assert (tmp_path / "m" / "class_names.txt").read_text().splitlines()[3] == "road;street"


def test_export_overlays_have_legend_and_colour(ds, fx, tmp_path):
    from pipeline.overlay import class_color

    sel = C.sample(C.query(ds, C.Query(status="ok")), 3, seed=2)
    res = C.export_overlays(ds, sel, str(tmp_path / "o"), alpha=0.6)
    assert res.written == 3 and not res.skipped
    rows = {r["image_id"]: r for r in fx.rows}
    for iid in _ids(sel):
        ov = np.asarray(Image.open(tmp_path / "o" / "overlays" / f"{iid}.png").convert("RGB"))
        h, w = rows[iid]["height"], rows[iid]["width"]
        assert ov.shape[0] >= h and ov.shape[1] > w + 40  # legend panel on the right
        legend = ov[:, w:]
        top_class = max(rows[iid]["classes"], key=lambda c: c["pixels"])["id"]
        colour = np.array(class_color(top_class))
        assert (np.abs(legend.astype(int) - colour).sum(-1) == 0).sum() > 20  # its swatch is drawn


def test_missing_source_image_is_skipped_not_fatal(s3, s3_prefix, tmp_path):
    lab = np.zeros((8, 8), dtype=np.int64)
    row = S.make_ok_row(s3_prefix + "lake/gone.jpg", lab, np.ones((8, 8), np.float32), ["a"], "m", "v")
    with s3.pa_fs.open_output_stream((s3_prefix + "labels/p.parquet")[5:]) as f:
        pq.write_table(S.rows_to_table([row], S.label_schema(["a"], None, "v")), f)
    d = C.open_labels(s3_prefix + "labels/")
    res = C.export_generic(d, C.query(d, C.Query()), str(tmp_path / "g"), C.make_label_filter(d))
    assert res.written == 0 and len(res.skipped) == 1 and "gone.jpg" in res.skipped[0][0]


def test_overlay_palette_blend_and_ignore():
    from pipeline.overlay import class_color, overlay, palette

    assert palette(300).shape == (300, 3)
    assert len({tuple(c) for c in palette(300).tolist()}) == 300  # distinct colours
    assert class_color(7) == tuple(palette(8)[7])  # same colour on every call
    img = np.full((10, 12, 3), 100, dtype=np.uint8)
    lab = np.zeros((10, 12), dtype=np.int64)
    lab[:, 6:] = 255  # ignored half
    out = np.asarray(overlay(img, lab, ["a"], alpha=0.5, ignore_index=255, legend=False, draw_boundaries=False))
    np.testing.assert_array_equal(out[:, 6:], img[:, 6:])
    want = np.rint(100 * 0.5 + np.array(class_color(0)) * 0.5)
    np.testing.assert_array_equal(out[0, 0], want)
    with_legend = overlay(img, lab, ["a"], ignore_index=255)
    assert with_legend.size[0] > 12 and with_legend.size[1] >= 10
    with pytest.raises(ValueError, match="differs from label size"):
        overlay(img, lab[:5], ["a"])
