"""Curation of pseudo-labels: query a label dataset, sample it, summarise it, export selections.

Why pyarrow.dataset: a label dataset can be millions of rows on object storage. Queries read only
the small columns (status, classes summaries) with filters pushed down to row groups; the heavy
mask columns are read only for the rows a user selected for export.

Why queries use the ``classes`` summaries rather than decoding masks: "images with >5% grass at
confidence >= 0.6" is answered from a few bytes per row.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ebseg_core.errors import UserError
from ebseg_core.storage import exists, filesystem_for, join, read_bytes, write_bytes_atomic
from pipeline import schema as S

LIGHT_COLUMNS = [
    "image_id", "uri", "status", "error_kind", "error", "width", "height", "classes",
    "model_id", "vocabulary_id", "content_sha1",
]
HEAVY_COLUMNS = ["image_id", "uri", "width", "height", "label_png", "confidence_png", "classes"]


class CurationError(UserError):
    """A user mistake in a curation request (unknown class, bad bound, ...); message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# Opening a label dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class LabelDataset:
    """A directory/prefix of label Parquet files, opened lazily (nothing but footers read yet)."""

    url: str
    files: list[str]
    filesystem: Any
    dataset: pads.Dataset
    meta: S.LabelMetadata

    @property
    def names(self) -> list[str]:
        return self.meta.names

    def class_id(self, name: str) -> int:
        """Class id of a name or any synonym (case-insensitive); clear error with suggestions if unknown."""
        key = name.strip().lower()
        for i, syns in enumerate(self.meta.synonyms or [[n] for n in self.meta.names]):
            if any(key == s.strip().lower() for s in syns):
                return i
        if key.isdigit() and int(key) < len(self.names):
            return int(key)
        all_names = sorted({s for syns in self.meta.synonyms for s in syns} | set(self.names))
        close = difflib.get_close_matches(name, all_names, n=5, cutoff=0.5)
        if not close:
            close = [n for n in all_names if key in n.lower() or n.lower() in key][:5]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise CurationError(
            f"class {name!r} is not in the vocabulary of {self.url} ({len(self.names)} classes).{hint} "
            "List the classes with `ebseg curate classes LABELS`."
        )

    def class_ids(self, names: Iterable[str]) -> list[int]:
        return [self.class_id(n) for n in names]

    def scan(self, columns: Sequence[str], filter: pc.Expression | None = None, batch_size: int = 4096):
        """Record batches of ``columns`` for rows matching ``filter`` (pushed down to row groups)."""
        cols = [c for c in columns if c in self.dataset.schema.names]
        return self.dataset.to_batches(columns=cols, filter=filter, batch_size=batch_size)

    def fetch(self, image_ids: Sequence[str], columns: Sequence[str] = HEAVY_COLUMNS) -> pa.Table:
        """Rows (by image_id) with heavy columns, in the order of ``image_ids``."""
        ids = list(dict.fromkeys(image_ids))
        if not ids:
            return pa.Table.from_pylist([], schema=pa.schema([self.dataset.schema.field(c) for c in columns]))
        cols = [c for c in columns if c in self.dataset.schema.names]
        t = self.dataset.to_table(columns=cols, filter=pc.field("image_id").isin(ids))
        # Duplicate rows for one image (a re-labelled input) -> keep the last written.
        pos = {v: i for i, v in enumerate(t.column("image_id").to_pylist())}
        order = [pos[i] for i in ids if i in pos]
        return t.take(order)


def open_labels(url: str) -> LabelDataset:
    """Open a label dataset (one Parquet file, or a directory/prefix of them; local or s3://).

    Raises FileNotFoundError / LabelSchemaError / CurationError with a message for the user.
    """
    import pyarrow.parquet as pq

    files, fs = S.list_parquet_files(url)
    with fs.open_input_file(files[0]) as f:
        schema = pq.read_schema(f)
    meta = S.metadata_from_schema(schema, where=files[0])
    dataset = pads.dataset(files, filesystem=fs, format="parquet", schema=schema)
    ds = LabelDataset(url, files, fs, dataset, meta)
    if meta.vocabulary_id:
        vids = pc.unique(dataset.to_table(columns=["vocabulary_id"],
                                          filter=pc.field("status") == S.STATUS_OK).column("vocabulary_id"))
        other = [v for v in vids.to_pylist() if v and v != meta.vocabulary_id]
        if other:
            raise CurationError(
                f"{url} mixes label rows of different vocabularies ({meta.vocabulary_id} and "
                f"{', '.join(other[:3])}); class ids would mean different things. Query each output separately."
            )
    return ds


# ---------------------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------------------


@dataclass
class ClassFilter:
    """A class that must be present, optionally with bounds on its area share and mean confidence."""

    name: str
    min_fraction: float | None = None
    max_fraction: float | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None

    def check(self) -> None:
        for label, lo, hi in (("fraction", self.min_fraction, self.max_fraction),
                              ("confidence", self.min_confidence, self.max_confidence)):
            for v in (lo, hi):
                if v is not None and not 0.0 <= v <= 1.0:
                    raise CurationError(f"{label} bounds must be in [0, 1], got {v}")
            if lo is not None and hi is not None and lo > hi:
                raise CurationError(f"min {label} {lo} is above max {label} {hi}: nothing can match")


@dataclass
class Query:
    """Which rows to select. All conditions combine with AND.

    ``status``: "ok", "error" or None (any). Rows that must contain or lack a class are "ok" rows.
    """

    classes: list[ClassFilter] = field(default_factory=list)
    without: list[str] = field(default_factory=list)
    status: str | None = None
    error_kinds: list[str] = field(default_factory=list)
    limit: int | None = None

    def effective_status(self) -> str | None:
        if self.status not in (None, "ok", "error", "all"):
            raise CurationError(f"status must be ok, error or all, got {self.status!r}")
        status = None if self.status == "all" else self.status
        if (self.classes or self.without) and status is None:
            return S.STATUS_OK
        if (self.classes or self.without) and status == S.STATUS_ERROR:
            raise CurationError("error rows have no classes: drop --status error or the class filters")
        if self.error_kinds and status is None:
            return S.STATUS_ERROR
        return status


def _flat_classes(classes: pa.Array | pa.ChunkedArray):
    """(parent row index, id, pixel_fraction, mean_confidence) numpy arrays over all class entries."""
    if isinstance(classes, pa.ChunkedArray):
        classes = classes.combine_chunks()
    flat = pc.list_flatten(classes)
    parents = pc.list_parent_indices(classes).to_numpy(zero_copy_only=False)
    ids = pc.struct_field(flat, "id").to_numpy(zero_copy_only=False)
    frac = pc.struct_field(flat, "pixel_fraction").to_numpy(zero_copy_only=False).astype(np.float64)
    conf = pc.struct_field(flat, "mean_confidence").to_numpy(zero_copy_only=False).astype(np.float64)
    return parents, ids, frac, conf


def _row_mask_for(classes, n_rows: int, cid: int, f: ClassFilter | None) -> np.ndarray:
    parents, ids, frac, conf = _flat_classes(classes)
    m = ids == cid
    if f is not None:
        if f.min_fraction is not None:
            m &= frac >= f.min_fraction
        if f.max_fraction is not None:
            m &= frac <= f.max_fraction
        if f.min_confidence is not None:
            m &= conf >= f.min_confidence
        if f.max_confidence is not None:
            m &= conf <= f.max_confidence
    out = np.zeros(n_rows, dtype=bool)
    out[parents[m]] = True
    return out


def _pushdown(q: Query) -> pc.Expression | None:
    expr = None
    status = q.effective_status()
    if status is not None:
        expr = pc.field("status") == status
    if q.error_kinds:
        e = pc.field("error_kind").isin(list(q.error_kinds))
        expr = e if expr is None else expr & e
    return expr


def query(ds: LabelDataset, q: Query, columns: Sequence[str] = LIGHT_COLUMNS) -> pa.Table:
    """Rows matching ``q`` (``columns`` only), in dataset order, at most ``q.limit`` rows."""
    for f in q.classes:
        f.check()
    want = [(ds.class_id(f.name), f) for f in q.classes]
    without = ds.class_ids(q.without)
    expr = _pushdown(q)
    need = list(dict.fromkeys(list(columns) + (["classes"] if want or without else [])))
    parts = []
    got = 0
    for batch in ds.scan(need, expr):
        n = batch.num_rows
        if n == 0:
            continue
        keep = np.ones(n, dtype=bool)
        if want or without:
            cls = batch.column("classes")
            for cid, f in want:
                keep &= _row_mask_for(cls, n, cid, f)
            for cid in without:
                keep &= ~_row_mask_for(cls, n, cid, None)
        sel = batch.filter(pa.array(keep))
        if sel.num_rows:
            parts.append(sel)
            got += sel.num_rows
        if q.limit is not None and got >= q.limit:
            break
    schema = pa.schema([ds.dataset.schema.field(c) for c in need if c in ds.dataset.schema.names])
    table = pa.Table.from_batches(parts, schema=schema) if parts else schema.empty_table()
    table = table.select([c for c in columns if c in table.column_names])
    if q.limit is not None:
        table = table.slice(0, q.limit)
    return table


def sample(table: pa.Table, n: int, seed: int = 0) -> pa.Table:
    """``n`` rows drawn without replacement, reproducible for a seed whatever the file order."""
    if n < 0:
        raise CurationError(f"sample size must be >= 0, got {n}")
    table = table.take(pc.sort_indices(table, [("image_id", "ascending")]))
    if n >= table.num_rows:
        return table
    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=n, replace=False))
    return table.take(pa.array(idx))


def stratified_sample(
    table: pa.Table, per_class: int, seed: int = 0, class_ids: Sequence[int] | None = None
) -> pa.Table:
    """Up to ``per_class`` rows containing each class (each class drawn with its own seeded RNG).

    An image picked for several classes appears once. ``class_ids`` limits the strata.
    """
    if per_class < 0:
        raise CurationError(f"--per-class must be >= 0, got {per_class}")
    table = table.take(pc.sort_indices(table, [("image_id", "ascending")]))
    if table.num_rows == 0:
        return table
    parents, ids, _, _ = _flat_classes(table.column("classes"))
    strata = sorted(set(ids.tolist())) if class_ids is None else list(class_ids)
    chosen: set[int] = set()
    for cid in strata:
        rows = np.unique(parents[ids == cid])
        if len(rows) == 0:
            continue
        k = min(per_class, len(rows))
        pick = np.random.default_rng([seed, int(cid)]).choice(rows, size=k, replace=False)
        chosen.update(int(r) for r in pick)
    return table.take(pa.array(sorted(chosen), type=pa.int64()))


def select(ds: LabelDataset, q: Query, sample_size: int | None = None, per_class: int | None = None,
           seed: int = 0, columns: Sequence[str] = LIGHT_COLUMNS) -> pa.Table:
    """Rows matching ``q``, then an optional seeded random sample or per-class (stratified) sample.

    The one selection of ``ebseg curate query|export`` and of training from label Parquet;
    ``per_class`` draws per ``q.classes`` class when the query names classes, else per class present.
    """
    if sample_size is not None and per_class is not None:
        raise CurationError("use either --sample or --per-class, not both")
    table = query(ds, q, columns=columns)
    if sample_size is not None:
        return sample(table, sample_size, seed)
    if per_class is not None:
        ids = ds.class_ids([f.name for f in q.classes]) if q.classes else None
        return stratified_sample(table, per_class, seed, ids)
    return table


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

CONFIDENCE_BINS = 10


@dataclass
class ClassStats:
    """Per-class totals over ok rows. ``confidence_hist[i]`` = pixels whose image-level mean
    confidence for this class lies in bin i of [0, 1] (10 bins; last bin includes 1.0)."""

    id: int
    name: str
    images: int = 0
    pixels: int = 0
    confidence_sum: float = 0.0
    confidence_hist: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)

    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / self.pixels if self.pixels else float("nan")


@dataclass
class DatasetStats:
    """Totals of a label dataset: rows, ok/errors (by kind), pixels, and per-class statistics."""

    url: str
    rows: int = 0
    ok: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    pixels: int = 0
    classes: list[ClassStats] = field(default_factory=list)
    num_classes: int = 0
    runs: list[dict] = field(default_factory=list)  # the labeling runs of the output (its _runs.json), oldest first

    def to_dict(self) -> dict:
        d = asdict(self)
        for c, cs in zip(d["classes"], self.classes):
            c["mean_confidence"] = None if cs.pixels == 0 else cs.mean_confidence
        return d


def _pixels_of(parents, frac, pix, widths, heights):
    if pix is not None:
        return pix
    return np.rint(frac * widths[parents] * heights[parents]).astype(np.int64)


def stats(ds: LabelDataset, q: Query | None = None) -> DatasetStats:
    """Dataset-wide (or query-restricted) statistics from the summary columns only (no mask decoding)."""
    out = DatasetStats(url=ds.url, num_classes=len(ds.names))
    per = [ClassStats(i, n) for i, n in enumerate(ds.names)]
    cols = ["image_id", "status", "error_kind", "width", "height", "classes"]
    table_iter: Iterable
    if q is None:
        table_iter = ds.scan(cols)
    else:
        table_iter = query(ds, q, columns=cols).to_batches()
    for batch in table_iter:
        n = batch.num_rows
        if n == 0:
            continue
        status = batch.column("status").to_numpy(zero_copy_only=False)
        ok = status == S.STATUS_OK
        out.rows += n
        out.ok += int(ok.sum())
        out.errors += int((~ok).sum())
        for kind in batch.column("error_kind").filter(pa.array(~ok)).to_pylist():
            key = kind or "unknown"
            out.errors_by_kind[key] = out.errors_by_kind.get(key, 0) + 1
        w = batch.column("width").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        h = batch.column("height").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        out.pixels += int((w * h)[ok].sum())
        cls = batch.column("classes")
        parents, ids, frac, conf = _flat_classes(cls)
        if len(ids) == 0:
            continue
        flat = pc.list_flatten(cls)
        pix = None
        if "pixels" in [f.name for f in flat.type]:
            p = pc.struct_field(flat, "pixels")
            if p.null_count == 0:
                pix = p.to_numpy(zero_copy_only=False).astype(np.int64)
        pix = _pixels_of(parents, frac, pix, w, h)
        if ids.max() >= len(per):
            raise CurationError(f"{ds.url}: class id {int(ids.max())} outside the vocabulary of {len(per)} classes")
        n_cls = len(per)
        images = np.bincount(ids, minlength=n_cls)
        pixels = np.bincount(ids, weights=pix, minlength=n_cls)
        csum = np.bincount(ids, weights=pix * np.nan_to_num(conf), minlength=n_cls)
        b = np.clip((np.nan_to_num(conf) * CONFIDENCE_BINS).astype(np.int64), 0, CONFIDENCE_BINS - 1)
        hist = np.zeros((n_cls, CONFIDENCE_BINS), dtype=np.int64)
        np.add.at(hist, (ids, b), pix)
        for c in np.flatnonzero(images):
            cs = per[c]
            cs.images += int(images[c])
            cs.pixels += int(round(pixels[c]))
            cs.confidence_sum += float(csum[c])
            cs.confidence_hist = [a + int(x) for a, x in zip(cs.confidence_hist, hist[c])]
    out.classes = per
    out.runs = run_history(ds.url)
    return out


def run_history(url: str) -> list[dict]:
    """The run history ``ebseg label`` keeps under an output directory (``_runs.json``); [] when none."""
    from pipeline.label_output import RUNS_LOG

    history = join(url, RUNS_LOG)
    try:
        if not exists(history):
            return []
        return json.loads(read_bytes(history))
    except (OSError, ValueError):  # a single Parquet file given as url, or no history to read
        return []


# ---------------------------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------------------------


@dataclass
class LabelFilter:
    """How stored labels become exported labels: which classes to keep, which pixels to trust.

    Kept classes are renumbered 0..K-1 in vocabulary order (``remap``); every other pixel, and every
    pixel with confidence below ``min_confidence``, becomes ``ignore_index``.
    """

    keep_ids: list[int]
    min_confidence: float | None = None
    remap: bool = True
    num_classes: int = 0

    @property
    def ignore_index(self) -> int:
        from ebseg_core.train_data import ignore_label_for

        return ignore_label_for(len(self.keep_ids) if self.remap else self.num_classes)

    def lut(self) -> np.ndarray:
        """Lookup table old id -> exported id (ignore_index for dropped classes)."""
        table = np.full(max(self.num_classes, 1), self.ignore_index, dtype=np.int64)
        for new, old in enumerate(self.keep_ids):
            table[old] = new if self.remap else old
        return table

    def apply(self, label: np.ndarray, confidence: np.ndarray | None) -> np.ndarray:
        """Exported label map (int64) from a stored label map and its stored confidence."""
        lab = np.asarray(label).astype(np.int64)
        out = self.lut()[np.clip(lab, 0, self.num_classes - 1)]
        out[lab >= self.num_classes] = self.ignore_index
        if self.min_confidence is not None and confidence is not None:
            out[np.asarray(confidence) < self.min_confidence] = self.ignore_index
        return out


def make_label_filter(
    ds: LabelDataset, keep: Sequence[str] | None = None, min_confidence: float | None = None, remap: bool = True
) -> LabelFilter:
    """A LabelFilter from class names (None = all classes) and a confidence threshold in [0, 1]."""
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise CurationError(f"--min-confidence must be in [0, 1], got {min_confidence}")
    ids = list(range(len(ds.names))) if not keep else sorted(set(ds.class_ids(keep)))
    return LabelFilter(ids, min_confidence, remap, len(ds.names))


@dataclass
class ExportResult:
    """What an export wrote and what it had to skip (with why), for the user and for tests."""

    out: str
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def _decoded(row: dict) -> tuple[np.ndarray, np.ndarray | None]:
    label = S.decode_label_png(row["label_png"])
    conf = S.decode_confidence_png(row["confidence_png"]) if row.get("confidence_png") else None
    return label, conf


def _encode_png(arr: np.ndarray, ignore_index: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    dtype = np.uint8 if ignore_index <= 255 else np.uint16
    Image.fromarray(arr.astype(dtype)).save(buf, format="PNG")
    return buf.getvalue()


def _ok_rows(ds: LabelDataset, selection: pa.Table, columns=HEAVY_COLUMNS) -> Iterable[dict]:
    """Rows of the selection with heavy columns, fetched in chunks (bounded memory)."""
    ids = [i for i, s in zip(selection.column("image_id").to_pylist(),
                             selection.column("status").to_pylist() if "status" in selection.column_names
                             else ["ok"] * selection.num_rows) if s == S.STATUS_OK]
    for start in range(0, len(ids), 256):
        for row in ds.fetch(ids[start:start + 256], columns).to_pylist():
            if row.get("label_png"):
                yield row


_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def _training_image(data: bytes, width: int, height: int) -> tuple[bytes, str]:
    """Image bytes whose pixel grid matches the label (EXIF orientation baked in when needed)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format or "PNG"
        orientation = im.getexif().get(0x0112, 1)
        if orientation in (None, 1) and fmt in _FORMAT_EXT and im.size == (width, height):
            return data, _FORMAT_EXT[fmt]
        upright = ImageOps.exif_transpose(im)
        if upright.size != (width, height):
            raise ValueError(f"image is {upright.size[0]}x{upright.size[1]} but was labelled at {width}x{height} "
                             "(changed since labelling?)")
        buf = io.BytesIO()
        if fmt == "JPEG":
            upright.convert("RGB").save(buf, format="JPEG", quality=95)
            return buf.getvalue(), "jpg"
        upright.save(buf, format="PNG")
        return buf.getvalue(), "png"


def class_names_lines(ds: LabelDataset, ids: Sequence[int]) -> list[str]:
    """Lines of class_names.txt: all names of a class joined by ';', prompt name first."""
    syns = ds.meta.synonyms or [[n] for n in ds.names]
    return [";".join(syns[i]) for i in ids]


def export_generic(ds: LabelDataset, selection: pa.Table, out: str, lf: LabelFilter) -> ExportResult:
    """Training layout: images/<id>.<ext>, labels/<id>.png, class_names.txt, dataset.json.

    labels hold exported class ids (see LabelFilter); ``ignore_index`` (255, or 65535 for more than
    255 kept classes with 16-bit PNGs) marks dropped classes and low-confidence pixels.
    """
    fs, root = filesystem_for(out)
    root = root.rstrip("/")
    fs.makedirs(f"{root}/images", exist_ok=True)
    fs.makedirs(f"{root}/labels", exist_ok=True)
    res = ExportResult(out)
    for row in _ok_rows(ds, selection):
        iid = row["image_id"]
        try:
            data, ext = _training_image(read_bytes(row["uri"]), row["width"], row["height"])
        except Exception as e:  # noqa: BLE001 - one missing/changed source image must not stop an export
            res.skipped.append((row["uri"], f"{type(e).__name__}: {e}"))
            continue
        label, conf = _decoded(row)
        write_bytes_atomic(join(out, f"images/{iid}.{ext}"), data)
        write_bytes_atomic(join(out, f"labels/{iid}.png"), _encode_png(lf.apply(label, conf), lf.ignore_index))
        res.files.append(f"images/{iid}.{ext}")
        res.written += 1
    kept = lf.keep_ids if lf.remap else list(range(len(ds.names)))
    write_bytes_atomic(join(out, "class_names.txt"), ("\n".join(class_names_lines(ds, kept)) + "\n").encode())
    info = {
        "format": "ebseg-generic-v1",
        "source": ds.url,
        "num_classes": len(kept),
        "ignore_index": lf.ignore_index,
        "min_confidence": lf.min_confidence,
        "source_class_ids": kept,
        "vocabulary_id": ds.meta.vocabulary_id,
        "model": ds.meta.model,
        "images": res.written,
        "skipped": [{"uri": u, "reason": r} for u, r in res.skipped],
    }
    write_bytes_atomic(join(out, "dataset.json"), json.dumps(info, indent=2).encode())
    return res


def image_root_of(uris: Sequence[str], root: str | None = None) -> str:
    """The folder/prefix that exported file names are relative to (ends with '/').

    ``root`` given: every uri must lie under it. Otherwise the deepest folder common to all ``uris``,
    so names stay unique (two ``img.jpg`` in different folders keep their folder).
    """
    if root is not None:
        root = root if root.endswith("/") else root + "/"
        outside = [u for u in uris if not u.startswith(root)]
        if outside:
            raise CurationError(f"--image-root {root} does not contain {outside[0]} "
                                f"({len(outside)} selected images lie outside it)")
        return root
    if not uris:
        return ""
    parts = [u.split("/")[:-1] for u in uris]
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return "/".join(common) + "/" if common else ""


def _selected_uris(selection: pa.Table) -> list[str]:
    status = selection.column("status").to_pylist() if "status" in selection.column_names else None
    uris = selection.column("uri").to_pylist()
    return [u for i, u in enumerate(uris) if status is None or status[i] == S.STATUS_OK]


def _finite(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def export_coco(ds: LabelDataset, selection: pa.Table, out: str, lf: LabelFilter,
                image_root: str | None = None) -> ExportResult:
    """COCO JSON (one file): an annotation with a compressed-RLE mask per (image, kept class).

    Written for the COCO importers of pycocotools, FiftyOne and CVAT (Datumaro): ids start at 1;
    ``images[].file_name`` is relative to ``image_root`` (default: the folder common to the selected
    images; ``coco_url`` keeps the full URI); every category has a ``supercategory``; ``score`` is
    present only where it is a number (those importers reject null).
    """
    from pycocotools import mask as mask_utils

    dest = out if out.endswith(".json") else join(out, "annotations.json")
    root = image_root_of(_selected_uris(selection), image_root)
    syns = ds.meta.synonyms or [[n] for n in ds.names]
    cat_ids = lf.keep_ids
    categories = [
        {"id": (new if lf.remap else old) + 1, "name": ds.names[old], "supercategory": "",
         "synonyms": syns[old], "ebseg_class_id": old}
        for new, old in enumerate(cat_ids)
    ]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    res = ExportResult(out)
    for row in _ok_rows(ds, selection):
        label, conf = _decoded(row)
        exported = lf.apply(label, conf)
        img_num = len(images) + 1
        images.append({"id": img_num, "file_name": row["uri"][len(root):], "width": row["width"],
                       "height": row["height"], "coco_url": row["uri"], "ebseg_image_id": row["image_id"]})
        conf_by_id = {c["id"]: c["mean_confidence"] for c in (row["classes"] or [])}
        for new, old in enumerate(cat_ids):
            cid = new if lf.remap else old
            m = exported == cid
            if not m.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            # iscrowd 0 with RLE, as COCO-Stuff: one region per class; pycocotools, FiftyOne and
            # Datumaro read RLE whatever iscrowd says.
            ann = {
                "id": len(annotations) + 1,
                "image_id": img_num,
                "category_id": cid + 1,
                "segmentation": rle,
                "area": int(m.sum()),
                "bbox": [float(x) for x in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
            score = _finite(conf_by_id.get(old))
            if score is not None:
                ann["score"] = score
            annotations.append(ann)
        res.written += 1
    doc = {
        "info": {"description": f"EBSeg pseudo-labels from {ds.url}", "version": "1",
                 "date_created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                 "image_root": root, "vocabulary_id": ds.meta.vocabulary_id, "min_confidence": lf.min_confidence},
        "licenses": [],
        "images": images, "annotations": annotations, "categories": categories,
    }
    res.files.append(write_bytes_atomic(dest, json.dumps(doc, allow_nan=False).encode()))
    return res


def export_label_studio(ds: LabelDataset, selection: pa.Table, out: str, lf: LabelFilter,
                        image_root: str | None = None, image_url_prefix: str | None = None) -> ExportResult:
    """Label Studio pre-annotations: DEST/tasks.json (one task per image, its prediction one brush
    region per kept class) and DEST/labeling_config.xml (the kept classes as brush labels).

    ``data.image`` is the source URI, or ``image_url_prefix`` + the path relative to ``image_root``
    (e.g. ``/data/local-files/?d=lake/`` for Label Studio's local-files storage). Filtered pixels
    (dropped classes, low confidence) are left unpainted for the reviewer.
    """
    from pipeline import label_studio as LS

    uri_root = image_root_of(_selected_uris(selection), image_root)
    cat_ids = lf.keep_ids
    tasks = []
    res = ExportResult(out)
    for row in _ok_rows(ds, selection):
        label, conf = _decoded(row)
        exported = lf.apply(label, conf)
        conf_by_id = {c["id"]: c["mean_confidence"] for c in (row["classes"] or [])}
        results = []
        for new, old in enumerate(cat_ids):
            m = exported == (new if lf.remap else old)
            if m.any():
                results.append(LS.brush_result(m, ds.names[old], f"c{old}", _finite(conf_by_id.get(old))))
        kept = exported != lf.ignore_index
        prediction: dict[str, Any] = {"model_version": str(ds.meta.model.get("preset") or "ebseg"), "result": results}
        if conf is not None and kept.any():
            prediction["score"] = float(conf[kept].mean())
        url = row["uri"] if image_url_prefix is None else image_url_prefix + row["uri"][len(uri_root):]
        tasks.append({"data": {"image": url, "uri": row["uri"], "ebseg_image_id": row["image_id"]},
                      "predictions": [prediction]})
        res.written += 1
    write_bytes_atomic(join(out, "tasks.json"), json.dumps(tasks, allow_nan=False).encode())
    names = [ds.names[i] for i in cat_ids]
    write_bytes_atomic(join(out, "labeling_config.xml"), LS.labeling_config_xml(names, cat_ids).encode())
    res.files += ["tasks.json", "labeling_config.xml"]
    return res


def export_masks(
    ds: LabelDataset, selection: pa.Table, out: str, lf: LabelFilter, per_class: bool = False
) -> ExportResult:
    """PNG masks: masks/<id>.png (exported class ids, ignore_index elsewhere), confidence/<id>.png,
    optional class_masks/<id>/<class_id>.png binary (0/255) masks, and index.jsonl (id -> uri, size)."""
    fs, root = filesystem_for(out)
    root = root.rstrip("/")
    fs.makedirs(f"{root}/masks", exist_ok=True)
    fs.makedirs(f"{root}/confidence", exist_ok=True)
    res = ExportResult(out)
    index = []
    for row in _ok_rows(ds, selection):
        iid = row["image_id"]
        label, conf = _decoded(row)
        exported = lf.apply(label, conf)
        write_bytes_atomic(join(out, f"masks/{iid}.png"), _encode_png(exported, lf.ignore_index))
        if row.get("confidence_png"):
            write_bytes_atomic(join(out, f"confidence/{iid}.png"), row["confidence_png"])
        if per_class:
            for cid in np.unique(exported):
                if cid == lf.ignore_index:
                    continue
                write_bytes_atomic(join(out, f"class_masks/{iid}/{int(cid)}.png"),
                                   _encode_png((exported == cid) * 255, 255))
        index.append({"image_id": iid, "uri": row["uri"], "width": row["width"], "height": row["height"]})
        res.written += 1
    kept = lf.keep_ids if lf.remap else list(range(len(ds.names)))
    write_bytes_atomic(join(out, "class_names.txt"), ("\n".join(class_names_lines(ds, kept)) + "\n").encode())
    write_bytes_atomic(join(out, "index.jsonl"), "".join(json.dumps(r) + "\n" for r in index).encode())
    return res


def overlay_for_row(ds: LabelDataset, row: dict, lf: LabelFilter | None = None, alpha: float = 0.5,
                    max_side: int | None = None, min_side: int | None = None):
    """Overlay (PIL image with legend) of one labelled row over its source image.

    ``max_side``/``min_side`` bound the longest side of the image part (thumbnails; tiny images are
    enlarged so the legend does not dwarf them).
    """
    from PIL import Image

    from pipeline.images import decode_image
    from pipeline.overlay import overlay

    rgb = decode_image(read_bytes(row["uri"]))
    label, conf = _decoded(row)
    if rgb.shape[:2] != label.shape:
        raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but was labelled at "
                         f"{label.shape[1]}x{label.shape[0]} (changed since labelling?)")
    ignore = None
    if lf is not None:  # original ids, so a class keeps its colour whatever the filter
        keep = LabelFilter(lf.keep_ids, lf.min_confidence, remap=False, num_classes=lf.num_classes)
        label = keep.apply(label, conf)
        ignore = keep.ignore_index
    longest = max(label.shape)
    scale = None
    if max_side and longest > max_side:
        scale = max_side / longest
    elif min_side and longest < min_side:
        scale = min_side / longest
    if scale is not None:
        s = scale
        size = (max(1, round(label.shape[1] * s)), max(1, round(label.shape[0] * s)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        lab = Image.fromarray(label.astype(np.int32)).resize(size, Image.Resampling.NEAREST)
        label = np.asarray(lab).astype(np.int64)
    return overlay(rgb, label, ds.names, alpha=alpha, ignore_index=ignore)


def export_overlays(ds: LabelDataset, selection: pa.Table, out: str, lf: LabelFilter | None = None,
                    alpha: float = 0.5) -> ExportResult:
    """overlays/<id>.png: class colours blended over the source image, with a legend."""
    fs, root = filesystem_for(out)
    root = root.rstrip("/")
    fs.makedirs(f"{root}/overlays", exist_ok=True)
    res = ExportResult(out)
    for row in _ok_rows(ds, selection):
        try:
            img = overlay_for_row(ds, row, lf, alpha)
        except Exception as e:  # noqa: BLE001 - missing source image: skip, report
            res.skipped.append((row["uri"], f"{type(e).__name__}: {e}"))
            continue
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        write_bytes_atomic(join(out, f"overlays/{row['image_id']}.png"), buf.getvalue())
        res.files.append(f"overlays/{row['image_id']}.png")
        res.written += 1
    return res

