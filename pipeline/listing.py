"""Input listing and the deterministic shard plan of a labeling job.

Why a plan on storage instead of ``ray.data.read_images(prefix)``: Ray resolves every path and its
metadata on the driver before the first image is read (Ray issue 40686: hours at 100M objects), and a
resumable job needs a fixed, replayable assignment of inputs to output files. So the listing is
*streamed* (one page of keys at a time) into plan shard files of ``shard_size`` URIs each, written
under ``<output>/_plan/``; the driver never holds more than one shard of paths. ``_plan/plan.json``
is written last and marks the plan complete. Labeling reads the plan shards inside Ray tasks.

The plan is deterministic: the same listing gives the same shards (object stores list keys in
lexicographic order; local directories are walked in sorted order), and a complete plan is reused,
never rebuilt, when the job is rerun, so shard ``i`` always means the same inputs.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import posixpath
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")

import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
PLAN_DIR = "_plan"
PLAN_MARKER = "plan.json"
PLAN_VERSION = 1


class InputError(ValueError):
    """A user mistake about the input (nothing there, unreachable, unreadable manifest): message says what to do."""


# ---------------------------------------------------------------------------------------------
# Small storage helpers (fsspec; pipeline.storage resolves credentials/endpoints when present)
# ---------------------------------------------------------------------------------------------


_TRANSIENT_MARKERS = (
    "slowdown", "slow down", "503", "service unavailable", "throttl", "requesttimeout", "request timeout",
    "timed out", "timeout", "connection reset", "connection aborted", "connectionerror", "broken pipe",
    "500", "internalerror", "internal error", "too many requests", "429", "temporarily", "remotedisconnected",
    "endpointconnectionerror", "could not connect",
)


def is_transient(exc: BaseException) -> bool:
    """Storage errors worth retrying: throttling, 5xx, timeouts, dropped connections (not 404/403)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(m in text for m in _TRANSIENT_MARKERS)


def backoff_delay(attempt: int, base: float = 0.2, cap: float = 10.0) -> float:
    """Exponential backoff with jitter: ~base * 2^attempt, at most cap seconds."""
    return min(base * (2 ** attempt), cap) * (0.5 + random.random())


def retry_io(fn: Callable[..., T], *args, retries: int = 6, **kwargs) -> T:
    """Call a storage operation, retrying transient errors with backoff (plan/fragment/final files)."""
    for attempt in range(retries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unless transient
            if attempt == retries or not is_transient(exc):
                raise
            time.sleep(backoff_delay(attempt))
    raise AssertionError("unreachable")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def fs_and_path(url: str):
    """(fsspec filesystem, path inside it) for any fsspec URL or local path (pipeline.storage)."""
    from pipeline.storage import filesystem_for

    return filesystem_for(url)


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with '/'."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a whole object so that readers see all of it or nothing (transient errors retried)."""
    retry_io(_write_bytes_atomic, url, data)


def _write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a whole object so that readers see all of it or nothing.

    Local files: written to a hidden temp name in the same directory, fsynced, then renamed.
    Object stores (S3, GCS, ...): a single PUT is atomic, so the object appears only when complete.
    """
    if is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, path = fs_and_path(url)
    fs.pipe_file(path, data)


def read_bytes(url: str) -> bytes:
    """The whole object (transient errors retried)."""
    fs, path = fs_and_path(url)
    return retry_io(fs.cat_file, path)


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001 - not every filesystem caches
        pass
    return retry_io(fs.exists, path)


def list_dir(url: str) -> list[str]:
    """Names (not paths) directly under a directory/prefix, fresh from storage; [] if absent."""
    fs, path = fs_and_path(url)
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001
        pass
    try:
        entries = retry_io(fs.ls, path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)


def remove_tree(url: str) -> None:
    fs, path = fs_and_path(url)
    try:
        retry_io(fs.rm, path, recursive=True)
    except FileNotFoundError:
        pass


def table_to_parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    return buf.getvalue().to_pybytes()


# ---------------------------------------------------------------------------------------------
# Input sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """What to label: a URL prefix with filters, or a manifest of URIs. Part of the plan's identity."""

    input: str | None = None
    manifest: str | None = None
    extensions: tuple[str, ...] | None = DEFAULT_EXTENSIONS
    glob: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "extensions", _normalise_extensions(self.extensions))
        if bool(self.input) == bool(self.manifest):
            raise InputError("give exactly one of --input URL (a prefix/directory) or --manifest URL")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["extensions"] = list(self.extensions) if self.extensions else None
        return d


def _normalise_extensions(extensions: Sequence[str] | None) -> tuple[str, ...] | None:
    if not extensions:
        return None
    return tuple(sorted({e.lower().lstrip(".") for e in extensions if e.strip()}))


def iter_prefix(url: str, extensions: Sequence[str] | None = DEFAULT_EXTENSIONS,
                glob: str | None = None) -> Iterator[str]:
    """Yield full URIs of files under a prefix/directory, lazily and in a deterministic order.

    Listing is pipeline.storage.iter_files (S3 pages consumed as they come); hidden files (".name")
    are skipped. Raises FileNotFoundError when nothing exists at ``url``.
    """
    from pipeline.storage import iter_files

    exts = _normalise_extensions(extensions)
    for uri in iter_files(url, extensions=list(exts) if exts else None, glob=glob):
        if not posixpath.basename(uri).startswith("."):
            yield uri


_URI_COLUMNS = ("uri", "url", "path", "key", "file", "filename")


def iter_manifest(url: str) -> Iterator[str]:
    """Yield URIs from a manifest: Parquet (column uri/url/path), CSV (same names, else first column) or text (one per line)."""
    lower = url.lower()
    try:
        fs, path = fs_and_path(url)
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"manifest {url} does not exist") from None
    except PermissionError as exc:
        raise InputError(f"manifest {url} is not readable: {exc}") from None
    with f:
        if lower.endswith(".parquet") or lower.endswith(".pq"):
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            col = next((c for c in _URI_COLUMNS if c in names), None)
            if col is None:
                raise InputError(f"manifest {url} has no column named one of {', '.join(_URI_COLUMNS)} "
                                 f"(columns: {', '.join(names)})")
            for batch in pf.iter_batches(columns=[col], batch_size=65536):
                for v in batch.column(0).to_pylist():
                    if v:
                        yield str(v)
            return
        text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
        if lower.endswith(".csv"):
            reader = csv.reader(text)
            header = next(reader, None)
            if header is None:
                return
            lowered = [h.strip().lower() for h in header]
            idx = next((lowered.index(c) for c in _URI_COLUMNS if c in lowered), None)
            if idx is None:  # no header: the first column holds URIs, including the first row
                idx = 0
                if header and header[0].strip():
                    yield header[0].strip()
            for row in reader:
                if len(row) > idx and row[idx].strip():
                    yield row[idx].strip()
            return
        for line in text:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def iter_inputs(spec: InputSpec) -> Iterator[str]:
    """All input URIs of a spec, streamed."""
    if spec.manifest:
        for uri in iter_manifest(spec.manifest):
            if not is_local(uri) or os.path.isabs(uri) or uri.startswith("file://"):
                yield uri
            else:
                raise InputError(f"manifest {spec.manifest} holds a relative path {uri!r}; "
                                 "use absolute paths or full URLs (s3://bucket/key)")
        return
    yield from iter_prefix(spec.input, spec.extensions, spec.glob)


# ---------------------------------------------------------------------------------------------
# The shard plan
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A complete, saved shard plan: shard i holds inputs [i*shard_size, (i+1)*shard_size) of the listing."""

    output: str
    spec: dict
    shard_size: int
    total: int
    num_shards: int
    shard_counts: list[int] = field(default_factory=list)
    created_at: str = ""
    version: int = PLAN_VERSION

    def shard_url(self, shard: int) -> str:
        return join_url(self.output, PLAN_DIR, shard_name(shard) + ".parquet")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def read_plan_shard(url: str) -> list[str]:
    """URIs of one plan shard, in plan order (transient storage errors retried)."""
    table = pq.read_table(io.BytesIO(read_bytes(url)))
    return table.column("uri").to_pylist()


def load_plan(output: str) -> Plan | None:
    """The complete plan saved under output, or None when there is none (or only a partial one)."""
    marker = join_url(output, PLAN_DIR, PLAN_MARKER)
    if not exists(marker):
        return None
    d = json.loads(read_bytes(marker))
    return Plan(**d)


def build_plan(spec: InputSpec, output: str, shard_size: int = 1000,
               progress: Callable[[str], None] | None = print, progress_every: int = 100_000) -> Plan:
    """Stream the listing into plan shards under ``<output>/_plan/`` and return the saved plan.

    Reuses a complete plan of the same spec; refuses one of a different spec (the output would mix
    two jobs). A partial plan (crash while listing) is rebuilt: nothing has been labeled from it yet.
    """
    if shard_size <= 0:
        raise InputError("--shard-size must be positive")
    existing = load_plan(output)
    if existing is not None:
        if existing.spec != spec.to_dict() or existing.shard_size != shard_size:
            raise InputError(
                f"{output} already holds the plan of a different job (input {existing.spec}, shard size "
                f"{existing.shard_size}); write to a new --output, or delete {join_url(output, PLAN_DIR)} "
                "and the labels it produced")
        return existing
    remove_tree(join_url(output, PLAN_DIR))
    counts: list[int] = []
    chunk: list[str] = []
    seen: set[str] = set()
    total = 0

    def flush() -> None:
        table = pa.table({"uri": pa.array(chunk, pa.string())})
        write_bytes_atomic(join_url(output, PLAN_DIR, shard_name(len(counts)) + ".parquet"),
                           table_to_parquet_bytes(table))
        counts.append(len(chunk))
        chunk.clear()
        seen.clear()

    try:
        for uri in iter_inputs(spec):
            if uri in seen:  # a manifest listing the same URI twice within a shard: label it once
                continue
            seen.add(uri)
            chunk.append(uri)
            total += 1
            if len(chunk) == shard_size:
                flush()
            if progress and total % progress_every == 0:
                progress(f"[label] listed {total:,} inputs ({len(counts)} plan shards written)")
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"input {spec.input or spec.manifest} does not exist ({exc})") from None
    except PermissionError as exc:
        raise InputError(f"input {spec.input or spec.manifest} is not readable: {exc}") from None
    except OSError as exc:
        raise InputError(f"cannot list {spec.input or spec.manifest}: {exc}") from None
    if chunk:
        flush()
    if total == 0:
        where = spec.manifest or spec.input
        filt = "" if spec.manifest else (
            f" (extensions: {','.join(spec.extensions) if spec.extensions else 'any'}"
            f"{', glob: ' + spec.glob if spec.glob else ''})")
        raise InputError(f"no input files found in {where}{filt}; check the URL and filters")
    plan = Plan(output=output, spec=spec.to_dict(), shard_size=shard_size, total=total,
                num_shards=len(counts), shard_counts=counts,
                created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    write_bytes_atomic(join_url(output, PLAN_DIR, PLAN_MARKER), plan.to_json().encode())
    return plan
