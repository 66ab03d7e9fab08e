"""Exports for review tools: Label Studio brush pre-annotations (round trip through an independent
decoder of the documented format) and COCO fields as the pycocotools, FiftyOne and CVAT (Datumaro)
importers read them."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import curate as cli
from jobs.cli import module_main
from pipeline import curate as C
from pipeline import schema as S
from pipeline.label_studio import encode_brush_rle
from tests.test_curate_data import NAMES, build_label_dataset


def decode_brush_rle(rle: list[int]) -> np.ndarray:
    """Label Studio's brush decoder, written from the format's description (rle-pack): bit by bit."""
    bits = "".join(f"{b:08b}" for b in rle)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        v = int(bits[pos:pos + n], 2)
        pos += n
        return v

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word)
            i = j
        else:
            while i < j:
                out[i] = read(word)
                i += 1
    return out


def _alpha(rle: list[int], h: int, w: int) -> np.ndarray:
    rgba = decode_brush_rle(rle).reshape(h, w, 4)
    assert (rgba == rgba[..., :1]).all()  # the four channels agree
    return rgba[..., 3]


def test_brush_rle_bytes_follow_the_format():
    # 1x2 mask [off, on]: 8 words. Header: 8 (32 bits), word size 8 -> 7 (5 bits), field sizes 3,4,8,16
    # -> 2,3,7,15 (4 bits each); then two repeat chunks of 4 words (size index 0, length-1 = 3 in 3 bits).
    bits = (f"{8:032b}" + "00111" + "0010" + "0011" + "0111" + "1111"
            + "1" + "00" + "011" + "00000000" + "1" + "00" + "011" + "11111111")
    bits += "0" * (-len(bits) % 8)
    assert encode_brush_rle(np.array([[0, 1]])) == [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


@pytest.mark.parametrize("shape,kind", [((7, 9), "random"), ((40, 33), "blobs"), ((210, 200), "full"),
                                        ((3, 5), "empty"), ((1, 64), "alternating"), ((300, 300), "one_pixel")])
def test_brush_rle_round_trip(shape, kind):
    rng = np.random.default_rng(len(kind))
    h, w = shape
    if kind == "random":
        m = rng.random(shape) > 0.5
    elif kind == "blobs":
        yy, xx = np.mgrid[:h, :w]
        m = ((yy - 12) ** 2 + (xx - 20) ** 2 < 90) | ((yy > 30) & (xx < 10))
    elif kind == "full":  # 168000 words in one run: longer than the 16-bit field, split in chunks
        m = np.ones(shape, bool)
    elif kind == "empty":
        m = np.zeros(shape, bool)
    elif kind == "alternating":
        m = (np.arange(w) % 2 == 0)[None]
    else:
        m = np.zeros(shape, bool)
        m[150, 299] = True
    rle = encode_brush_rle(m.astype(np.uint8) * 7)  # any nonzero value paints
    np.testing.assert_array_equal(_alpha(rle, h, w), m.astype(np.uint8) * 255)


@pytest.fixture(scope="module")
def fx(s3):
    return build_label_dataset(s3, s3.url(f"curate-review-{os.getpid()}/"), n_images=10, n_files=2, seed=3)


@pytest.fixture(scope="module")
def ds(fx):
    return C.open_labels(fx.url)


def _expected(fx, iid, lf):
    out = lf.lut()[fx.labels[iid]]
    if lf.min_confidence is not None:
        out[fx.confidences[iid] < lf.min_confidence] = lf.ignore_index
    return out


def test_label_studio_export_round_trip(ds, fx, tmp_path):
    sel = C.query(ds, C.Query(classes=[C.ClassFilter("grass")]))
    lf = C.make_label_filter(ds, keep=["grass", "car", "road"], min_confidence=0.3)
    res = C.export_label_studio(ds, sel, str(tmp_path / "ls"), lf, image_url_prefix="/data/local-files/?d=lake/")
    tasks = _strict_json((tmp_path / "ls" / "tasks.json").read_text())
    assert res.written == len(tasks) == sel.num_rows > 0
    config = ET.fromstring((tmp_path / "ls" / "labeling_config.xml").read_text())
    image_tag, brush_tag = config.find("Image"), config.find("BrushLabels")
    assert image_tag.get("value") == "$image" and brush_tag.get("toName") == image_tag.get("name")
    assert [lab.get("value") for lab in brush_tag.findall("Label")] == ["grass", "road", "car"]
    rows = {r["image_id"]: r for r in fx.rows}
    painted = 0
    for task in tasks:
        iid = task["data"]["ebseg_image_id"]
        row = rows[iid]
        assert task["data"]["image"] == "/data/local-files/?d=lake/" + row["uri"].rsplit("/", 1)[1]
        exp = _expected(fx, iid, lf)
        (pred,) = task["predictions"]
        want_names = [["grass", "road", "car"][k] for k in range(3) if (exp == k).any()]
        assert [r["value"]["brushlabels"][0] for r in pred["result"]] == want_names
        for r in pred["result"]:
            assert r["from_name"] == brush_tag.get("name") and r["to_name"] == image_tag.get("name")
            assert r["type"] == "brushlabels" and r["value"]["format"] == "rle"
            assert (r["original_width"], r["original_height"]) == (row["width"], row["height"])
            k = ["grass", "road", "car"].index(r["value"]["brushlabels"][0])
            mask = _alpha(r["value"]["rle"], row["height"], row["width"]) == 255
            np.testing.assert_array_equal(mask, exp == k)
            painted += int(mask.sum())
        assert 0.3 <= pred["score"] <= 1.0
    assert painted > 0


def test_label_studio_export_via_cli_uses_the_query(fx, capsys, tmp_path):
    dest = tmp_path / "review"
    rc = module_main(cli, ["export", fx.url, "--to", str(dest), "--format", "label-studio", "--class", "car",
                           "--min-fraction", "0.05", "--without", "road"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    want = {r["uri"] for r in fx.rows if r["status"] == "ok"
            and any(c["id"] == 4 and float(np.float32(c["pixel_fraction"])) >= 0.05 for c in r["classes"])
            and not any(c["id"] == 3 for c in r["classes"])}
    tasks = json.loads((dest / "tasks.json").read_text())
    assert {t["data"]["image"] for t in tasks} == want and want
    labels = [lab.get("value") for lab in ET.parse(dest / "labeling_config.xml").getroot().iter("Label")]
    assert labels == NAMES
    rc = module_main(cli, ["export", fx.url, "--to", str(dest), "--format", "masks", "--image-url-prefix", "x/"])
    assert rc == 2 and "label-studio only" in capsys.readouterr().err


def _strict_json(text: str):
    def no_constants(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


def test_coco_fields_match_the_importers(tmp_path):
    """Two images with the same base name in different folders, and a class without a confidence."""
    from pycocotools.coco import COCO

    lake = tmp_path / "lake"
    rows = []
    for sub in ("a", "b"):
        (lake / sub).mkdir(parents=True)
        (lake / sub / "img.png").write_bytes(b"not read by the coco export")
        lab = np.zeros((6, 8), dtype=np.int64)
        lab[1:4, 2:7] = 1 if sub == "a" else 2
        row = S.make_ok_row(str(lake / sub / "img.png"), lab, np.full(lab.shape, 0.9, np.float32),
                            ["bg", "cat", "dog"], "m", "v")
        rows.append(row)
    rows[1]["classes"][1]["mean_confidence"] = float("nan")  # e.g. written without a confidence map
    labels = tmp_path / "labels.parquet"
    pq.write_table(S.rows_to_table(rows, S.label_schema(["bg", "cat", "dog"], None, "v")), labels)
    d = C.open_labels(str(labels))
    out = tmp_path / "coco" / "annotations.json"
    C.export_coco(d, C.query(d, C.Query()), str(out), C.make_label_filter(d))
    doc = _strict_json(out.read_text())

    assert doc["info"]["image_root"] == str(lake) + "/"
    assert sorted(im["file_name"] for im in doc["images"]) == ["a/img.png", "b/img.png"]
    for im in doc["images"]:
        assert doc["info"]["image_root"] + im["file_name"] == im["coco_url"]
        assert isinstance(im["width"], int) and isinstance(im["height"], int)
    assert [im["id"] for im in doc["images"]] == [1, 2]
    assert [c["id"] for c in doc["categories"]] == [1, 2, 3]
    assert all(isinstance(c["name"], str) and isinstance(c["supercategory"], str) for c in doc["categories"])
    image_ids, cat_ids = {im["id"] for im in doc["images"]}, {c["id"] for c in doc["categories"]}
    assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
    for a in doc["annotations"]:
        assert a["image_id"] in image_ids and a["category_id"] in cat_ids
        assert a["iscrowd"] == 0 and isinstance(a["area"], int) and len(a["bbox"]) == 4
        assert isinstance(a["segmentation"]["counts"], str) and a["segmentation"]["size"] == [6, 8]
        assert "score" not in a or isinstance(a["score"], float)
    no_score = [a for a in doc["annotations"] if a["image_id"] == 2 and a["category_id"] == 3]
    assert len(no_score) == 1 and "score" not in no_score[0]  # null/NaN would be refused by Datumaro

    coco = COCO(str(out))  # pycocotools' own reader
    for a in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(a["image_id"])[0]
        m = coco.annToMask(a)
        assert m.shape == (img["height"], img["width"]) and int(m.sum()) == a["area"]

    with pytest.raises(C.CurationError, match="does not contain"):
        C.export_coco(d, C.query(d, C.Query()), str(out), C.make_label_filter(d), image_root=str(lake / "a"))
