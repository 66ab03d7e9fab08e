"""Label Parquet schema: mask round trips, class statistics, rows, file metadata, clear errors."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S


def _blocks(h: int, w: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(h, w))


def test_label_png_8bit_round_trip():
    lab = _blocks(31, 47, 256)
    lab[0, 0] = 255
    data = S.encode_label_png(lab, num_classes=256)
    out = S.decode_label_png(data)
    assert out.dtype == np.uint8
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(out, lab)


def test_label_png_16bit_round_trip_more_than_256_classes():
    lab = _blocks(29, 41, 847, seed=1)
    lab[3, 4] = 846
    out = S.decode_label_png(S.encode_label_png(lab, num_classes=847))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, lab)
    # Bit depth follows the vocabulary size, not the values present: small ids in a 300-class set.
    small = np.zeros((5, 6), dtype=np.int64)
    small[1, 1] = 3
    assert S.decode_label_png(S.encode_label_png(small, num_classes=300)).dtype == np.uint16
    assert S.decode_label_png(S.encode_label_png(small, num_classes=4)).dtype == np.uint8


def test_label_png_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        S.encode_label_png(np.zeros((2, 3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="num_classes"):
        S.encode_label_png(np.full((2, 2), 5), num_classes=5)
    with pytest.raises(ValueError, match="negative"):
        S.encode_label_png(np.full((2, 2), -1))


def test_confidence_png_quantises_to_1_over_255():
    rng = np.random.default_rng(2)
    conf = rng.random((20, 30)).astype(np.float32)
    conf[0, 0], conf[0, 1] = 0.0, 1.0
    q = S.decode_confidence_png(S.encode_confidence_png(conf), as_float=False)
    np.testing.assert_array_equal(q, np.rint(conf * 255).astype(np.uint8))
    f = S.decode_confidence_png(S.encode_confidence_png(conf))
    assert f.dtype == np.float32 and np.abs(f - conf).max() <= 0.5 / 255 + 1e-6
    assert f[0, 0] == 0.0 and f[0, 1] == 1.0


def test_class_stats_matches_brute_force():
    rng = np.random.default_rng(3)
    h, w = 23, 37
    lab = np.zeros((h, w), dtype=np.int64)
    lab[2:9, 5:20] = 2
    lab[15:, 30:] = 4
    lab[0, 36] = 4
    conf = rng.random((h, w)).astype(np.float32)
    names = ["sky", "cat", "dog", "tree", "road"]
    stats = S.class_stats(lab, conf, names)
    assert [s["id"] for s in stats] == [0, 2, 4]
    for s in stats:
        m = lab == s["id"]
        ys, xs = np.nonzero(m)
        assert s["name"] == names[s["id"]]
        assert s["pixel_fraction"] == pytest.approx(m.sum() / (h * w))
        assert s["pixels"] == m.sum()
        assert s["mean_confidence"] == pytest.approx(float(conf[m].mean()), rel=1e-6)
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert stats[2]["bbox"] == [30, 0, 37, 23]
    assert sum(s["pixel_fraction"] for s in stats) == pytest.approx(1.0)


def test_class_stats_rejects_id_outside_vocabulary():
    with pytest.raises(ValueError, match="vocabulary has 2 names"):
        S.class_stats(np.full((3, 3), 2), None, ["a", "b"])


def test_image_id_is_sha1_of_uri():
    uri = "s3://lake/a/b.jpg"
    assert S.image_id_for(uri) == hashlib.sha1(uri.encode()).hexdigest()
    assert S.image_id_for(uri) != S.image_id_for(uri + " ")


def _rows(n_classes: int = 5):
    names = [f"class{i}" for i in range(n_classes)]
    lab = _blocks(16, 24, n_classes, seed=5)
    conf = np.full(lab.shape, 0.5, dtype=np.float32)
    at = dt.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=dt.UTC)
    ok = S.make_ok_row("mem://x/1.png", lab, conf, names, "ebseg-b", "vocab1", labeled_at=at, source_bytes=99)
    err = S.make_error_row("mem://x/2.png", "decode", "cannot identify image file", "ebseg-b", "vocab1", labeled_at=at)
    return names, lab, conf, ok, err


def test_rows_write_and_read_back_through_parquet(tmp_path):
    names, lab, conf, ok, err = _rows(300)
    schema = S.label_schema(names, [[n, n.upper()] for n in names], "vocab1", {"preset": "ebseg-b", "size": 640})
    table = S.rows_to_table([ok, err], schema)
    path = tmp_path / "part-0.parquet"
    pq.write_table(table, path)

    back = pq.read_table(path)
    S.validate(back, where=str(path))
    rows = back.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert rows[0]["width"] == 24 and rows[0]["height"] == 16
    np.testing.assert_array_equal(S.decode_label_png(rows[0]["label_png"]), lab)
    assert S.decode_label_png(rows[0]["label_png"]).dtype == np.uint16
    assert rows[0]["labeled_at"] == dt.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=dt.UTC)
    assert rows[0]["source_bytes"] == 99
    assert rows[1]["error_kind"] == "decode" and rows[1]["label_png"] is None and rows[1]["classes"] == []
    assert rows[0]["image_id"] == S.image_id_for("mem://x/1.png")

    meta = S.read_metadata(str(tmp_path))
    assert meta.schema_version == S.SCHEMA_VERSION
    assert meta.names == names and meta.num_classes == 300
    assert meta.synonyms[3] == ["class3", "CLASS3"]
    assert meta.vocabulary_id == "vocab1"
    assert meta.model == {"preset": "ebseg-b", "size": 640}
    assert back.schema.field("labeled_at").type == pa.timestamp("ms", tz="UTC")


def test_vocabulary_json_puts_prompt_name_first():
    v = json.loads(S.vocabulary_json(["dog"], [["puppy", "dog"]]))
    assert v["synonyms"] == [["dog", "puppy"]]
    with pytest.raises(ValueError, match="synonym lists"):
        S.vocabulary_json(["a", "b"], [["a"]])


def test_validate_rejects_non_label_parquet(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), path)
    with pytest.raises(S.LabelSchemaError, match="not an EBSeg label Parquet.*missing columns: image_id"):
        S.read_metadata(str(path))


def test_validate_rejects_unknown_schema_version(tmp_path):
    names, _, _, ok, _ = _rows()
    schema = S.label_schema(names)
    future = schema.with_metadata({**schema.metadata, S.META_SCHEMA_VERSION: b"7"})
    path = tmp_path / "future.parquet"
    pq.write_table(S.rows_to_table([ok], future), path)
    with pytest.raises(S.LabelSchemaError, match="version 7.*reads version 1.*newer"):
        S.read_metadata(str(path))


def test_read_metadata_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.read_metadata(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.parquet"):
        S.read_metadata(str(tmp_path / "empty"))
