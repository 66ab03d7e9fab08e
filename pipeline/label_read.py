"""Stage 1 of the labeling job: plan shard -> read bytes (retries, backoff) -> decode -> group by size.

Runs in Ray tasks, never on the driver. Every input becomes one row: decoded pixels, an error row
(``read`` or a decode kind), or a *deferred* row when storage refused the job rather than the file
(the writer counts those and the driver stops the job, so a rerun does them).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ebseg_core.model_spec import padded_size
from ebseg_core.storage import filesystem_for, is_credential_error, is_transient, retry_io
from pipeline import schema as S
from pipeline.images import DEFAULT_MAX_PIXELS, DecodeError, decode_image_with_info
from pipeline.listing import read_plan_shard

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Status of an input that a storage fault left unread: passed along to count it, never written.
STATUS_DEFERRED = "deferred"


class ReadError(Exception):
    """Reading one file failed for a reason of that file: it becomes a ``read`` error row."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class StorageFault(Exception):
    """Storage refused the job rather than one file (credentials expired or missing, throttling that
    outlasts the retries): the input is left unlabeled and the job stops, so a rerun does it."""

    def __init__(self, message: str, hint: str):
        super().__init__(message, hint)
        self.message = message
        self.hint = hint


HINT_CREDENTIALS = "renew the storage credentials and rerun the same command"
HINT_UNAVAILABLE = "rerun the same command when the storage answers again"


def read_with_retries(uri: str, retries: int = 6, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a whole object, retrying transient errors with backoff (``retry_io``).

    Raises ReadError for a failure of this file (missing, forbidden, not a file), StorageFault for
    one of the job's access (expired/invalid/missing credentials, still failing after retries),
    DecodeError("too_large") for an object above ``max_bytes``.
    """
    try:
        return retry_io(_read_capped, uri, max_bytes, retries=retries, retryable=_worth_retrying)
    except DecodeError:
        raise
    except FileNotFoundError:
        raise ReadError(f"not found: {uri}") from None
    except IsADirectoryError:
        raise ReadError(f"is a directory: {uri}") from None
    except Exception as exc:  # noqa: BLE001 - sorted below
        if is_credential_error(exc):
            raise StorageFault(f"storage refused the job's credentials reading {uri}: "
                               f"{type(exc).__name__}: {exc}", HINT_CREDENTIALS) from None
        if isinstance(exc, PermissionError):
            raise ReadError(f"access denied: {uri} ({exc})") from None
        if _worth_retrying(exc):
            raise StorageFault(f"storage still failing after {retries} retries reading {uri}: "
                               f"{type(exc).__name__}: {exc}", HINT_UNAVAILABLE) from None
        raise ReadError(f"read failed: {type(exc).__name__}: {exc}") from None


def _worth_retrying(exc: Exception) -> bool:
    """Transient storage errors, but never a credential error or a file too large: retries do not fix those."""
    return not isinstance(exc, DecodeError) and not is_credential_error(exc) and is_transient(exc)


def _read_capped(uri: str, max_bytes: int) -> bytes:
    """One read attempt of at most ``max_bytes`` (DecodeError("too_large") above it)."""
    fs, path = filesystem_for(uri)
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except Exception as exc:  # noqa: BLE001 - all but an empty object re-raised
        text = str(exc).lower()
        if "range is not satisfiable" in text or "invalidrange" in text:
            return b""  # a ranged GET of an empty object (S3 answers 416): the file is empty
        raise
    if len(data) > max_bytes:
        raise DecodeError("too_large", f"file is larger than {max_bytes} bytes")
    return bytes(data)


def _read_decode_one(uri: str, max_pixels: int, max_bytes: int, retries: int) -> dict:
    t0 = time.perf_counter()
    row: dict[str, Any] = {"uri": uri, "status": S.STATUS_OK, "error_kind": None, "error": None, "width": None,
                           "height": None, "pixels": None, "source_bytes": None, "content_sha1": None}
    try:
        data = read_with_retries(uri, retries=retries, max_bytes=max_bytes)
    except StorageFault as exc:
        return _deferred_row(uri, exc.message, exc.hint)
    except ReadError as exc:
        row.update(status=S.STATUS_ERROR, error_kind="read", error=exc.message)
        return row
    except DecodeError as exc:
        row.update(status=S.STATUS_ERROR, error_kind=exc.kind, error=exc.message)
        return row
    row["source_bytes"] = len(data)
    row["content_sha1"] = hashlib.sha1(data).hexdigest()
    try:
        rgb, _info = decode_image_with_info(data, max_pixels=max_pixels)
    except DecodeError as exc:
        row.update(status=S.STATUS_ERROR, error_kind=exc.kind, error=exc.message)
        return row
    except Exception as exc:  # noqa: BLE001 - a decoder bug must cost one row, not the job
        row.update(status=S.STATUS_ERROR, error_kind="decode", error=f"{type(exc).__name__}: {exc}")
        return row
    h, w = rgb.shape[:2]
    row.update(width=w, height=h, pixels=rgb.tobytes())
    row["decode_ms"] = (time.perf_counter() - t0) * 1000.0
    return row


def read_shards(batch: pa.Table, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                retries: int = 6, threads: int = 8, chunk: int = 16,
                grouping: SizeGrouping | None = None) -> Iterator[pa.Table]:
    """Ray task: read plan shards and yield decoded images (one row per input).

    Each work item names a plan shard (and, on resume, the URIs of it still to do). Reading happens
    here, in the cluster, never on the driver; a few threads overlap object-store latency, ``chunk``
    files at a time. Without ``grouping`` a table is yielded per chunk; with it, images wait in
    :class:`SizeGrouping` buckets and a table is one group of equal padded model input (full model
    batches on a lake of mixed sizes). Either way a task's memory is bounded whatever the shard size.
    After a storage fault (StorageFault) the task reads nothing more: its remaining inputs are
    passed on as deferred rows, which the writer counts and does not write.
    """
    fault: list[dict] = []  # the first deferred row of this task, once there is one

    def one(uri: str) -> dict:
        if fault:
            return {**fault[0], "uri": uri}
        row = _read_decode_one(uri, max_pixels, max_bytes, retries)
        if row["status"] == STATUS_DEFERRED:
            fault.append(row)
        return row

    buckets = _Buckets(grouping) if grouping is not None else None
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for shard, plan_url, only in zip(batch.column("shard").to_pylist(), batch.column("plan_url").to_pylist(),
                                         batch.column("only").to_pylist()):
            try:
                planned = read_plan_shard(plan_url)
            except Exception as exc:  # noqa: BLE001 - the plan is storage too: stop, name it
                hint = HINT_CREDENTIALS if is_credential_error(exc) else HINT_UNAVAILABLE
                yield decoded_table([(shard, _deferred_row(
                    plan_url, f"cannot read the plan shard {plan_url}: {type(exc).__name__}: {exc}", hint))])
                continue
            wanted = set(only) if only else None
            uris = [u for u in planned if wanted is None or u in wanted]
            for start in range(0, len(uris), chunk):
                rows = [(shard, row) for row in pool.map(one, uris[start:start + chunk])]
                if buckets is None:
                    yield decoded_table(rows)
                    continue
                for row in rows:
                    for group in buckets.add(row):
                        yield decoded_table(group)
    if buckets is not None:
        for group in buckets.flush():
            yield decoded_table(group)


@dataclass(frozen=True)
class SizeGrouping:
    """Group decoded images by padded model input size before the model actors, so that each model
    call gets ``batch_size`` images on a lake of mixed sizes (EBSeg batches only equal padded sizes).

    Plain numbers (``ModelSpec.input_sizing``), so the read tasks need neither torch nor the checkpoint.
    ``max_held``: images held back at most, waiting for their group to fill; above it the largest group
    goes out unfilled.
    """

    batch_size: int
    short: int
    max_size: int
    divisibility: int
    max_held: int

    def key(self, row: dict) -> tuple[int, int] | None:
        """The padded size of a decoded row; None for rows without pixels (errors, deferred)."""
        if row["pixels"] is None:
            return None
        return padded_size(row["height"], row["width"], self.short, self.max_size, self.divisibility)


class _Buckets:
    """Rows waiting per padded size; ``add`` gives back the groups that are full (or must go out)."""

    def __init__(self, grouping: SizeGrouping):
        self.grouping = grouping
        self.groups: dict[tuple[int, int] | None, list[tuple[int, dict]]] = {}
        self.held = 0

    def add(self, item: tuple[int, dict]) -> Iterator[list[tuple[int, dict]]]:
        key = self.grouping.key(item[1])
        group = self.groups.setdefault(key, [])
        group.append(item)
        self.held += 1
        if len(group) >= self.grouping.batch_size:
            yield self._pop(key)
        while self.held > self.grouping.max_held:
            yield self._pop(max(self.groups, key=lambda k: len(self.groups[k])))

    def flush(self) -> Iterator[list[tuple[int, dict]]]:
        while self.groups:
            yield self._pop(next(iter(self.groups)))

    def _pop(self, key) -> list[tuple[int, dict]]:
        group = self.groups.pop(key)
        self.held -= len(group)
        return group


def _deferred_row(uri: str, message: str, hint: str) -> dict:
    """A row left unread by a storage fault; it carries the fault's message, and its hint in error_kind."""
    return {"uri": uri, "status": STATUS_DEFERRED, "error_kind": hint, "error": message, "width": None,
            "height": None, "pixels": None, "source_bytes": None, "content_sha1": None}


READ_WORKER_MIB = 256  # a read worker's own memory (Python, pyarrow, Pillow, fsspec: ~120 MiB measured) with margin
READ_IMAGE_MIB = 4  # per decoded image held: a decoded RGB image of ~1.3 megapixels


def read_task_args(images_held: int) -> dict:
    """Ray remote args of the read tasks: a CPU, and a memory reservation for the worker and the decoded
    images it holds at most (a chunk, plus those waiting in SizeGrouping buckets; Ray Data says at the
    end of a run when the reads used more). The reservation
    also keeps the reads out of the model actors: Ray Data fuses adjacent map stages whose resources
    are equal, and fused, the actor would read and decode between batches while the GPU waits. The
    model stage never reserves memory this way."""
    return {"num_cpus": 1.0, "memory": (READ_WORKER_MIB + images_held * READ_IMAGE_MIB) * 2**20}


def decoded_table(rows: list[tuple[int, dict]]) -> pa.Table:
    """(shard, row) pairs as the table the model stage reads."""
    def col(name: str, typ: pa.DataType) -> pa.Array:
        return pa.array([r[name] for _, r in rows], typ)

    return pa.table({
        "shard": pa.array([s for s, _ in rows], pa.int32()),
        "uri": col("uri", pa.string()),
        "status": col("status", pa.string()),
        "error_kind": col("error_kind", pa.string()),
        "error": col("error", pa.string()),
        "width": col("width", pa.int32()),
        "height": col("height", pa.int32()),
        "pixels": col("pixels", pa.large_binary()),
        "source_bytes": col("source_bytes", pa.int64()),
        "content_sha1": col("content_sha1", pa.string()),
    })
