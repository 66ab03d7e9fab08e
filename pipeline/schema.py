"""The label Parquet schema: one row per input file, with masks stored as PNG bytes.

Why PNG inside Parquet: a label map compresses 10-50x as PNG, any tool (Pillow, browsers, OpenCV) can
decode it, and a row stays self-contained, so a Parquet file can be queried with pyarrow, pandas,
DuckDB or Polars without any EBSeg code. Why one row per input even on failure: no input ever
vanishes silently; errors are rows with ``status == "error"`` and a machine-readable ``error_kind``.

The file-level metadata carries the vocabulary (names + synonyms) and the model config, so a label
dataset can be interpreted years later without the job that produced it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from ebseg_core.errors import UserError
from ebseg_core.storage import pyarrow_filesystem_for

SCHEMA_VERSION = 1

META_SCHEMA_VERSION = b"ebseg.schema_version"
META_VOCABULARY = b"ebseg.vocabulary"
META_MODEL = b"ebseg.model"

STATUS_OK = "ok"
STATUS_ERROR = "error"

# Short machine keys for ``error_kind``; producers may add more, these are the documented ones
# (the decode kinds are those of pipeline.images.DecodeError).
ERROR_KINDS = {
    "read": "the file could not be read from storage",
    "empty": "the file has 0 bytes",
    "not_image": "the bytes are not a recognised image format",
    "truncated": "the image data is incomplete or corrupt",
    "too_large": "the image exceeds the configured pixel limit",
    "unsupported": "a real image this build cannot decode (format or mode)",
    "decode": "the image could not be decoded (other reasons)",
    "model": "the model failed on this image",
    "encode": "the label could not be encoded into the row",
}

BBOX_TYPE = pa.list_(pa.int32())
CLASS_STRUCT = pa.struct(
    [
        pa.field("id", pa.int32()),
        pa.field("name", pa.string()),
        pa.field("pixel_fraction", pa.float32()),
        pa.field("pixels", pa.int64()),  # exact pixel count (pixel_fraction * width * height, unrounded)
        pa.field("mean_confidence", pa.float32()),
        # [x0, y0, x1, y1], x1/y1 exclusive (so width = x1 - x0), in original-image pixels.
        pa.field("bbox", BBOX_TYPE),
    ]
)

_FIELDS = [
    pa.field("image_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("error_kind", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("label_png", pa.binary()),
    pa.field("confidence_png", pa.binary()),
    pa.field("classes", pa.list_(pa.field("item", CLASS_STRUCT))),
    pa.field("model_id", pa.string()),
    pa.field("vocabulary_id", pa.string()),
    pa.field("labeled_at", pa.timestamp("ms", tz="UTC")),
    # Extras: size and content hash of the source bytes (dedup, change detection), inference time.
    pa.field("source_bytes", pa.int64()),
    pa.field("content_sha1", pa.string()),
    pa.field("duration_ms", pa.float32()),
]

COLUMNS = [f.name for f in _FIELDS]
REQUIRED_COLUMNS = ["image_id", "uri", "status", "width", "height", "label_png", "classes"]


class LabelSchemaError(UserError):
    """A file or table is not a label Parquet this code can read (message says why and what to do)."""


# ---------------------------------------------------------------------------------------------
# Schema and file metadata
# ---------------------------------------------------------------------------------------------


@dataclass
class LabelMetadata:
    """What the file-level metadata says: how to interpret class ids and which model made them."""

    schema_version: int
    names: list[str]
    synonyms: list[list[str]]
    vocabulary_id: str = ""
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.names)


def vocabulary_json(
    names: Sequence[str], synonyms: Sequence[Sequence[str]] | None = None, vocabulary_id: str = ""
) -> str:
    """JSON for ``ebseg.vocabulary``; synonyms[i] lists every name of class i, the prompt name first."""
    names = [str(n) for n in names]
    if synonyms is None:
        synonyms = [[n] for n in names]
    if len(synonyms) != len(names):
        raise ValueError(f"{len(names)} class names but {len(synonyms)} synonym lists")
    syn = []
    for n, s in zip(names, synonyms):
        s = [str(x) for x in s]
        syn.append(s if s and s[0] == n else [n] + [x for x in s if x != n])
    return json.dumps({"id": vocabulary_id, "names": names, "synonyms": syn}, ensure_ascii=False)


def label_schema(
    names: Sequence[str] | None = None,
    synonyms: Sequence[Sequence[str]] | None = None,
    vocabulary_id: str = "",
    model: Mapping[str, Any] | None = None,
) -> pa.Schema:
    """The Arrow schema of a label row, with the file metadata attached when a vocabulary is given.

    Writers should pass this schema to ``pq.write_table``/``ParquetWriter`` (or Ray's
    ``write_parquet(..., schema=...)``) so readers can map class ids back to names.
    """
    schema = pa.schema(_FIELDS)
    meta = {META_SCHEMA_VERSION: str(SCHEMA_VERSION).encode()}
    if names is not None:
        meta[META_VOCABULARY] = vocabulary_json(names, synonyms, vocabulary_id).encode()
    if model is not None:
        meta[META_MODEL] = json.dumps(dict(model), default=str, ensure_ascii=False).encode()
    return schema.with_metadata(meta)


def metadata_from_schema(schema: pa.Schema, where: str = "table") -> LabelMetadata:
    """Parse the ``ebseg.*`` keys of a schema (after :func:`validate`)."""
    validate(schema, where=where)
    meta = schema.metadata or {}
    version = int(meta[META_SCHEMA_VERSION])
    names: list[str] = []
    synonyms: list[list[str]] = []
    vocab_id = ""
    if META_VOCABULARY in meta:
        try:
            v = json.loads(meta[META_VOCABULARY])
        except json.JSONDecodeError as e:
            raise LabelSchemaError(f"{where}: metadata 'ebseg.vocabulary' is not valid JSON ({e})") from None
        names = list(v.get("names", []))
        synonyms = [list(s) for s in v.get("synonyms", [[n] for n in names])]
        vocab_id = v.get("id", "")
    model: dict[str, Any] = {}
    if META_MODEL in meta:
        try:
            model = json.loads(meta[META_MODEL])
        except json.JSONDecodeError:
            model = {"raw": meta[META_MODEL].decode(errors="replace")}
    return LabelMetadata(version, names, synonyms, vocab_id, model)


def validate(table_or_schema: pa.Table | pa.Schema, where: str = "table") -> pa.Schema:
    """Check that this is a label table of a schema version we understand; raise LabelSchemaError if not.

    ``where`` names the file in the message so the user knows which input is wrong.
    """
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    meta = schema.metadata or {}
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if META_SCHEMA_VERSION not in meta:
        hint = f" (missing columns: {', '.join(missing)})" if missing else ""
        raise LabelSchemaError(
            f"{where} is not an EBSeg label Parquet: it has no 'ebseg.schema_version' file metadata{hint}. "
            "Point at the output directory of `ebseg label`."
        )
    raw = meta[META_SCHEMA_VERSION].decode(errors="replace")
    try:
        version = int(raw)
    except ValueError:
        raise LabelSchemaError(f"{where}: schema version {raw!r} is not a number") from None
    if version != SCHEMA_VERSION:
        newer = "newer" if version > SCHEMA_VERSION else "older"
        raise LabelSchemaError(
            f"{where} has label schema version {version}, this code reads version {SCHEMA_VERSION} "
            f"(the file is {newer}); use a matching ebseg release to read it."
        )
    if missing:
        raise LabelSchemaError(f"{where} declares label schema {version} but lacks columns: {', '.join(missing)}")
    return schema


def read_metadata(url: str) -> LabelMetadata:
    """Read the label metadata of one Parquet file, or of the first Parquet file under a directory/prefix."""
    import pyarrow.parquet as pq

    files, fs = list_parquet_files(url)
    first = files[0]
    with fs.open_input_file(first) as f:
        schema = pq.read_schema(f)
    return metadata_from_schema(schema, where=first)


def list_parquet_files(url: str):
    """Sorted Parquet files of a label dataset (one file, or every *.parquet under a directory/prefix).

    Returns (files, pyarrow filesystem). Raises FileNotFoundError with the URL when nothing is there.
    """
    import pyarrow.fs as pafs

    fs, path = pyarrow_filesystem_for(url)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path], fs
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no label Parquet at {url}: the path does not exist")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and not any(part.startswith((".", "_")) for part in i.path[len(path):].split("/") if part)
    )
    if not files:
        raise FileNotFoundError(f"no *.parquet files under {url}")
    return files, fs


# ---------------------------------------------------------------------------------------------
# Mask encoding
# ---------------------------------------------------------------------------------------------


def encode_label_png(label: np.ndarray, num_classes: int | None = None) -> bytes:
    """PNG of class indices: 8-bit when the vocabulary has <= 256 classes, else 16-bit.

    ``num_classes`` decides the bit depth (so all rows of a dataset agree); without it the
    maximum value present decides.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {label.shape}")
    if label.size and label.min() < 0:
        raise ValueError("label map has negative class ids")
    top = int(label.max()) if label.size else 0
    n = num_classes if num_classes is not None else top + 1
    if top >= max(n, 1):
        raise ValueError(f"label map has class id {top} but num_classes is {n}")
    if n <= 256:
        img = Image.fromarray(label.astype(np.uint8))
    elif n <= 65536:
        img = Image.fromarray(label.astype(np.uint16))
    else:
        raise ValueError(f"{n} classes do not fit a 16-bit PNG")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """Class-index map from :func:`encode_label_png` bytes: uint8 or uint16 array of shape (H, W)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode == "L" or img.mode == "P":
            return np.asarray(img, dtype=np.uint8).copy()
        if img.mode in ("I;16", "I;16B", "I", "I;16L"):
            return np.asarray(img).astype(np.uint16)
        raise ValueError(f"label PNG has unexpected mode {img.mode!r}")


def encode_confidence_png(confidence: np.ndarray) -> bytes:
    """8-bit PNG of round(confidence * 255), confidence in [0, 1] (values outside are clipped)."""
    c = np.asarray(confidence, dtype=np.float32)
    if c.ndim != 2:
        raise ValueError(f"confidence map must be 2-D (H, W), got shape {c.shape}")
    q = np.rint(np.clip(c, 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(q).save(buf, format="PNG")
    return buf.getvalue()


def decode_confidence_png(data: bytes, as_float: bool = True) -> np.ndarray:
    """Confidence map from PNG bytes: float32 in [0, 1] (quantised to 1/255), or raw uint8."""
    with Image.open(io.BytesIO(data)) as img:
        q = np.asarray(img.convert("L"), dtype=np.uint8)
    return q.astype(np.float32) / 255.0 if as_float else q.copy()


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def image_id_for(uri: str) -> str:
    """Stable id of an input: sha1 hex of its URI (same file -> same id across runs and machines)."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()


def class_stats(label: np.ndarray, confidence: np.ndarray | None, names: Sequence[str]) -> list[dict]:
    """One dict per class present in ``label``: id, name, pixel_fraction, pixels, mean_confidence, bbox.

    Sorted by class id. These summaries let queries ("images with >5% grass") run on the Parquet
    column without decoding any mask.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label.shape}")
    h, w = label.shape
    total = h * w
    if total == 0:
        return []
    lab = label.reshape(-1).astype(np.int64)
    n = max(len(names), int(lab.max()) + 1)
    counts = np.bincount(lab, minlength=n)
    if confidence is not None:
        conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
        if conf.shape[0] != total:
            raise ValueError(f"confidence shape {np.shape(confidence)} differs from label shape {label.shape}")
        conf_sum = np.bincount(lab, weights=conf, minlength=n)
    else:
        conf_sum = np.zeros(n, dtype=np.float64)
    present = np.flatnonzero(counts)
    ys, xs = np.divmod(np.arange(total, dtype=np.int64), w)
    big = np.iinfo(np.int64).max
    x0 = np.full(n, big)
    y0 = np.full(n, big)
    x1 = np.full(n, -1)
    y1 = np.full(n, -1)
    np.minimum.at(x0, lab, xs)
    np.minimum.at(y0, lab, ys)
    np.maximum.at(x1, lab, xs)
    np.maximum.at(y1, lab, ys)
    out = []
    for c in present:
        if c >= len(names):
            raise ValueError(f"label map has class id {c} but the vocabulary has {len(names)} names")
        out.append(
            {
                "id": int(c),
                "name": str(names[int(c)]),
                "pixel_fraction": float(counts[c] / total),
                "pixels": int(counts[c]),
                "mean_confidence": float(conf_sum[c] / counts[c]) if confidence is not None else float("nan"),
                "bbox": [int(x0[c]), int(y0[c]), int(x1[c]) + 1, int(y1[c]) + 1],
            }
        )
    return out


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def make_ok_row(
    uri: str,
    label: np.ndarray,
    confidence: np.ndarray,
    names: Sequence[str],
    model_id: str = "",
    vocabulary_id: str = "",
    labeled_at: _dt.datetime | None = None,
    source_bytes: int | None = None,
    content_sha1: str | None = None,
    duration_ms: float | None = None,
) -> dict:
    """A successful label row as a dict matching :func:`label_schema` (label at original size)."""
    label = np.asarray(label)
    confidence = np.asarray(confidence)
    if label.shape != confidence.shape:
        raise ValueError(f"label shape {label.shape} differs from confidence shape {confidence.shape}")
    h, w = label.shape
    return {
        "image_id": image_id_for(uri),
        "uri": uri,
        "status": STATUS_OK,
        "error": None,
        "error_kind": None,
        "width": int(w),
        "height": int(h),
        "label_png": encode_label_png(label, num_classes=len(names)),
        "confidence_png": encode_confidence_png(confidence),
        "classes": class_stats(label, confidence, names),
        "model_id": model_id,
        "vocabulary_id": vocabulary_id,
        "labeled_at": labeled_at or _now(),
        "source_bytes": source_bytes,
        "content_sha1": content_sha1,
        "duration_ms": duration_ms,
    }


def make_error_row(
    uri: str,
    kind: str,
    message: str,
    model_id: str = "",
    vocabulary_id: str = "",
    labeled_at: _dt.datetime | None = None,
    width: int | None = None,
    height: int | None = None,
    source_bytes: int | None = None,
    content_sha1: str | None = None,
) -> dict:
    """An error row: the input is kept with ``status="error"``, a short ``error_kind`` and the message."""
    if not kind or not isinstance(kind, str):
        raise ValueError("error kind must be a short non-empty string such as 'decode'")
    return {
        "image_id": image_id_for(uri),
        "uri": uri,
        "status": STATUS_ERROR,
        "error": str(message)[:2000],
        "error_kind": kind,
        "width": width,
        "height": height,
        "label_png": None,
        "confidence_png": None,
        "classes": [],
        "model_id": model_id,
        "vocabulary_id": vocabulary_id,
        "labeled_at": labeled_at or _now(),
        "source_bytes": source_bytes,
        "content_sha1": content_sha1,
        "duration_ms": None,
    }


def table_to_parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    """A whole Parquet file (zstd) in memory: plan shards and label fragments are written in one atomic put."""
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    return buf.getvalue().to_pybytes()


def rows_to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """Arrow table of label rows (missing optional keys become null), carrying ``schema``'s metadata."""
    schema = schema if schema is not None else label_schema()
    rows = list(rows)
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.table(cols, schema=schema)
