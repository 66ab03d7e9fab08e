"""Builder of a small label dataset for curation and report tests (no tests here; imported by them).

Images are ebseg_core.data.synthetic blob images in the bucket; labels are their blob label maps (boundary pixels
become class 5 "edge") with a random confidence map per image. A few error rows are mixed in. The
rows go into several Parquet files with tiny row groups, so pushdown and multi-file reads are used.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from ebseg_core.data.synthetic import DEFAULT_SIZES, blob_image, write_blob_images
from pipeline import schema as S

NAMES = ["sky", "grass", "tree", "road", "car", "edge"]
SYNONYMS = [["sky"], ["grass", "lawn", "turf"], ["tree"], ["road", "street"], ["car", "automobile"], ["edge"]]
VOCAB_ID = "vocab-test"
MODEL = {"preset": "ebseg-tiny", "checkpoint": None}


@dataclass
class LabelFixture:
    url: str  # label dataset prefix
    lake: str  # image prefix
    rows: list[dict]  # every row as written (python dicts, ground truth for brute force)
    labels: dict[str, np.ndarray]  # image_id -> label map (int64)
    confidences: dict[str, np.ndarray]  # image_id -> float confidence map as stored (quantised)


def build_label_dataset(s3, prefix: str, n_images: int = 18, n_files: int = 3, seed: int = 0) -> LabelFixture:
    """Write images and a label dataset under ``prefix`` (an s3:// URL ending in '/')."""
    lake = prefix + "lake"
    uris = write_blob_images(lake, n_images, num_classes=5, seed=seed, with_labels=False)
    rng = np.random.default_rng(seed)
    at = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    rows, labels, confs = [], {}, {}
    for i, uri in enumerate(uris):
        h, w = DEFAULT_SIZES[i % len(DEFAULT_SIZES)]
        _, lab = blob_image(h, w, seed + i, num_classes=5)
        lab = lab.astype(np.int64)
        lab[lab == 255] = 5
        conf = rng.uniform(0.2, 1.0, size=(h, w)).astype(np.float32) ** (1 + (i % 3))
        row = S.make_ok_row(uri, lab, conf, NAMES, "ebseg-tiny", VOCAB_ID, labeled_at=at, source_bytes=1000 + i)
        rows.append(row)
        labels[row["image_id"]] = lab
        confs[row["image_id"]] = S.decode_confidence_png(row["confidence_png"])
    for j, kind in enumerate(["not_image", "truncated", "not_image", "read"]):
        rows.append(S.make_error_row(f"{lake}/broken_{j}.jpg", kind, f"synthetic {kind} error", "ebseg-tiny",
                                     VOCAB_ID, labeled_at=at))
    order = np.random.default_rng(seed + 1).permutation(len(rows))
    rows = [rows[k] for k in order]
    schema = S.label_schema(NAMES, SYNONYMS, VOCAB_ID, MODEL)
    url = prefix + "labels/"
    per = -(-len(rows) // n_files)
    for f in range(n_files):
        part = rows[f * per:(f + 1) * per]
        path = (url + f"part-{f:05d}.parquet")[len("s3://"):]
        with s3.pa_fs.open_output_stream(path) as out:
            pq.write_table(S.rows_to_table(part, schema), out, row_group_size=3)
    return LabelFixture(url, lake, rows, labels, confs)
