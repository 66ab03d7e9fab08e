"""Training from label Parquet vs from an export: cost of one training sample read.

Why: `data.layout: labels` (pipeline.label_source) reads a sample's label from its label Parquet row
group instead of a label PNG. Parquet reads whole column chunks, so an uncached read costs its row
group's label (and, with a pixel-confidence threshold, confidence) column; training draws samples in
a random order, so the row-group cache rarely helps. This prints what that costs against the generic
export read by ebseg_core.train_data.read_sample, on local disk.

Printed: ms per sample (random order, as training reads), MB read per sample from the label Parquet,
and the ratio of the two read paths; with and without a confidence threshold.

Usage:  python -m bench.bench_label_source --images 512 --size 384 --row-group 256
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
from PIL import Image


def _smooth(rng: np.random.Generator, h: int, w: int, cells: int = 6) -> np.ndarray:
    """A smooth random field in [0, 1] (bilinear upsampling of a coarse grid)."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


def write_dataset(root: str, n: int, size: int, row_group: int, num_classes: int = 12) -> str:
    from pipeline import schema as S

    names = [f"class{i}" for i in range(num_classes)]
    os.makedirs(f"{root}/lake", exist_ok=True)
    rng = np.random.default_rng(0)
    h, w = size, size * 4 // 3
    rows = []
    for i in range(n):
        fields = np.stack([_smooth(rng, h, w) for _ in range(4)])
        classes = rng.choice(num_classes, size=4, replace=False)
        label = classes[fields.argmax(0)]
        confidence = np.clip(0.35 + 0.6 * _smooth(rng, h, w, 9), 0, 1)
        rgb = (np.stack([_smooth(rng, h, w) for _ in range(3)], -1) * 255).astype(np.uint8)
        path = f"{root}/lake/img_{i:05d}.jpg"
        Image.fromarray(rgb).save(path, quality=90)
        rows.append(S.make_ok_row(path, label, confidence, names, "bench", "v"))
    os.makedirs(f"{root}/labels", exist_ok=True)
    pq.write_table(S.rows_to_table(rows, S.label_schema(names, None, "v")), f"{root}/labels/part-0.parquet",
                   row_group_size=row_group)
    return f"{root}/labels"


def column_mb_per_group(url: str, columns: list[str]) -> float:
    meta = pq.ParquetFile(f"{url}/part-0.parquet").metadata
    names = [meta.schema.column(j).path for j in range(meta.num_columns)]
    total = sum(meta.row_group(g).column(names.index(c)).total_compressed_size
                for g in range(meta.num_row_groups) for c in columns)
    return total / meta.num_row_groups / 1e6


def time_reads(read, samples, order, repeats: int = 3) -> float:
    """Best of ``repeats`` passes, ms per sample (the machine is shared: the minimum is the cost)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in order:
            read(samples[i])
        best = min(best, (time.perf_counter() - t0) / len(order) * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=384, help="image height (width = 4/3 of it)")
    ap.add_argument("--row-group", type=int, default=256, help="rows per Parquet row group (ebseg label: 256)")
    ap.add_argument("--reads", type=int, default=200, help="samples read per measurement")
    ap.add_argument("--cache", type=int, default=0,
                    help="row groups the reader keeps (default 0: at millions of rows a random order "
                         "almost never hits a small cache, so this is the cost at scale)")
    args = ap.parse_args()

    from ebseg_core.train_data import DatasetSpec, list_dataset, read_sample
    from pipeline import curate as C
    from pipeline.label_source import LabelSourceSpec, list_label_samples

    with tempfile.TemporaryDirectory() as tmp:
        url = write_dataset(tmp, args.images, args.size, args.row_group)
        ds = C.open_labels(url)
        C.export_generic(ds, C.query(ds, C.Query()), f"{tmp}/export", C.make_label_filter(ds))
        exported, _ = list_dataset(DatasetSpec(root=f"{tmp}/export"))
        order = np.random.default_rng(1).choice(args.images, size=min(args.reads, args.images), replace=False)
        ms_export = time_reads(lambda s: read_sample(s, 12), exported, order)
        print(f"{args.images} images {args.size * 4 // 3}x{args.size}, {args.row_group} rows per row group")
        print(f"export + read_sample:            {ms_export:7.1f} ms/sample")
        for threshold in (None, 0.5):
            t0 = time.perf_counter()
            listing = list_label_samples(LabelSourceSpec.from_options(url, {"min_pixel_confidence": threshold}))
            list_s = time.perf_counter() - t0
            reader = listing.reader
            reader.cache_row_groups = args.cache
            ms = time_reads(lambda s, read=reader: read(s, 12), listing.samples, order)
            cols = ["label_png"] + (["confidence_png"] if threshold is not None else [])
            mb = column_mb_per_group(url, ["image_id"] + cols) * reader.row_group_reads / (3 * len(order))
            print(f"label Parquet, threshold {threshold!s:>4}:   {ms:7.1f} ms/sample  {mb:6.2f} MB read/sample  "
                  f"{ms / ms_export:5.1f}x the export  (listing {list_s:.2f} s, "
                  f"{reader.row_group_reads // 3} row-group reads for {len(order)} samples)")


if __name__ == "__main__":
    main()
