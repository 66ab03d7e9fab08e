"""The labeling pipeline: image lake -> Ray Data (read, decode, EBSeg actor pool, encode) -> label Parquet.

Design (why, in short; docs/labeling.md has the long form):
- Inputs come from a deterministic shard plan saved under ``<output>/_plan/`` (pipeline/listing.py):
  listing is streamed, bytes are read inside Ray tasks, never by the driver.
- Stages: plan shard -> read + decode (tasks, threads for I/O overlap, transient
  storage errors retried with backoff, every failure an error row) -> EBSeg (actor pool: model
  and vocabulary embeddings loaded once per actor; Ray restarts dead actors and retries their
  batches) -> encode PNGs/stats and write a Parquet *fragment* per (batch, shard) (tasks).
- Exactly-once output without Ray's checkpointing: a fragment is written whole (temp+rename
  locally, one PUT on object stores) under ``_parts/shard-N/`` with a name derived from its
  contents, so a retried task overwrites its own fragment. When all inputs of a shard are in
  fragments, the shard is compacted into ``labels-N.parquet`` (written whole, then fragments
  deleted). A rerun skips shards with a final file and, for the others, only the URIs not in a
  fragment. A SIGKILL at any moment leaves whole files only, so nothing is lost or doubled.
- Incremental runs: a rerun into a complete output lists again and plans a new generation of
  shards for what is new or changed (listing.plan_generation); once all is final, the rows of
  changed and deleted inputs move to ``_superseded/`` (retire_rows), so ``labels-*.parquet``
  holds one current row per input. ``_runs.json`` keeps the history of runs.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.images import DEFAULT_MAX_PIXELS, DecodeError, decode_image_with_info
from pipeline.resources import actor_torch_threads, set_torch_threads
from pipeline.listing import (
    DEFAULT_EXTENSIONS,
    InputError,
    PLAN_DIR,
    InputSpec,
    ListingDiff,
    Plan,
    build_plan,
    load_plan,
    plan_generation,
    read_plan_shard,
    read_plan_table,
    shard_name,
)
from pipeline.schema import table_to_parquet_bytes
from ebseg_core.storage import (
    WriteError,
    backoff_delay,
    exists,
    filesystem_for,
    is_credential_error,
    is_transient,
    join,
    list_dir,
    read_bytes,
    remove_tree,
    retry_io,
    sweep_temp_files,
    write_bytes_atomic,
)
from ebseg_core.errors import UserError

if TYPE_CHECKING:
    from ebseg_core.checkpoint import ResolvedCheckpoint

PARTS_DIR = "_parts"
JOB_MARKER = "_job.json"
RUNS_LOG = "_runs.json"  # the run history: one record per run (time, listing diff, counts, model)
SUPERSEDED_DIR = "_superseded"  # rows that stopped being current: _superseded/gen-G/labels-N.parquet
SUCCESS_MARKER = "_SUCCESS"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
TEST_EXIT_ENV = "EBSEG_TEST_ACTOR_EXIT_AT_BATCH"  # TEST ONLY: "N:/path/marker" -> one actor exits on batch N
# Status of an input that a storage fault left unread: passed along to count it, never written.
STATUS_DEFERRED = "deferred"


class LabelError(UserError):
    """A problem the user can fix (bad flags, unreachable storage, mismatched output); printed without a traceback."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class LabelConfig:
    """Everything a labeling run needs; the CLI (jobs/label.py) fills it from flags."""

    output: str
    input: str | None = None
    manifest: str | None = None
    extensions: tuple[str, ...] | None = DEFAULT_EXTENSIONS
    glob: str | None = None
    vocabulary: str | None = None  # "cat,dog;puppy,grass"
    vocabulary_file: str | None = None
    vocabulary_preset: str | None = None
    preset: str | None = None  # None: from the checkpoint's metadata or shapes (ebseg-b with random weights)
    checkpoint: str | None = None  # weights file, checkpoint directory or training run directory
    best_checkpoint: bool = False  # a run directory's best-validated checkpoint instead of its latest
    random_weights: bool = False
    num_actors: int | None = None  # default: one per GPU, else 1
    num_gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    num_cpus_per_actor: float | None = None  # default: 1 on GPU; on CPU-only, what leaves a CPU for I/O
    batch_size: int = 8
    inference_size: int | None = None  # shorter side the model sees; default: the preset's (640)
    inference_max_size: int | None = None
    precision: str = "auto"  # ebseg_core.model.autocast_dtype_for
    shard_size: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    read_retries: int = 6
    read_threads: int = 8
    read_batch_size: int = 16
    write_batch_size: int = 64
    actor_resources: dict[str, float] = field(default_factory=dict)
    progress_interval_s: float = 10.0
    progress_bars: bool = False
    retry_errors: tuple[str, ...] = ()  # error kinds whose rows a rerun relabels ("--retry-errors read,model")
    relabel_changed: bool = False  # an incremental run also relabels inputs whose content changed


@dataclass
class LabelSummary:
    """What a run did, printed at the end and saved as ``_SUCCESS`` when the output is complete."""

    output: str
    inputs_total: int
    shards_total: int
    inputs_skipped: int  # labeled by an earlier run
    processed: int
    ok: int
    errors: dict[str, int]
    seconds: float
    images_per_s: float
    complete: bool
    model_id: str = ""
    vocabulary_id: str = ""
    stopped: str = ""  # why the run stopped early (a storage fault about the job, not a file); "" otherwise
    listing: dict = field(default_factory=dict)  # ListingDiff of this run's listing ({} when it did not list)
    finished_at: str = ""

    def lines(self) -> list[str]:
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"
        d = self.listing
        listing = []
        if d:
            kept = (f", {d['changed_kept']:,} changed but kept (--relabel-changed relabels them)"
                    if d["changed_kept"] else "")
            listing = [f"[label] listing:     {d['new']:,} new, {d['changed']:,} changed (relabeled), "
                       f"{d['deleted']:,} deleted, {d['unchanged']:,} already labeled{kept}"]
        return listing + [
            f"[label] output:      {self.output} ({self.shards_total} files labels-*.parquet)",
            f"[label] inputs:      {self.inputs_total:,} ({self.inputs_skipped:,} already labeled by an earlier run)",
            f"[label] this run:    {self.processed:,} labeled, {self.ok:,} ok, errors: {errs}",
            f"[label] throughput:  {self.images_per_s:.2f} images/s over {self.seconds:.1f} s",
            f"[label] complete:    {'yes' if self.complete else 'NO (rerun the same command to finish)'}",
        ]


# ---------------------------------------------------------------------------------------------
# Stage 1: plan shard -> read bytes (retries) + decode
# ---------------------------------------------------------------------------------------------

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


_HINT_CREDENTIALS = "renew the storage credentials and rerun the same command"
_HINT_UNAVAILABLE = "rerun the same command when the storage answers again"


def read_with_retries(uri: str, retries: int = 6, base_delay: float = 0.2, max_bytes: int = DEFAULT_MAX_BYTES,
                      sleep: Callable[[float], None] = time.sleep) -> bytes:
    """Read a whole object, retrying transient errors with exponential backoff and jitter.

    Raises ReadError for a failure of this file (missing, forbidden, not a file), StorageFault for
    one of the job's access (expired/invalid/missing credentials, still failing after retries),
    DecodeError("too_large") for an object above ``max_bytes``.
    """
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            fs, path = filesystem_for(uri)
            data = fs.cat_file(path, start=0, end=max_bytes + 1)
            if len(data) > max_bytes:
                raise DecodeError("too_large", f"file is larger than {max_bytes} bytes")
            return bytes(data)
        except DecodeError:
            raise
        except FileNotFoundError:
            raise ReadError(f"not found: {uri}") from None
        except IsADirectoryError:
            raise ReadError(f"is a directory: {uri}") from None
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_credential_error(exc):
                raise StorageFault(f"storage refused the job's credentials reading {uri}: "
                                   f"{type(exc).__name__}: {exc}", _HINT_CREDENTIALS) from None
            if isinstance(exc, PermissionError):
                raise ReadError(f"access denied: {uri} ({exc})") from None
            if "range is not satisfiable" in str(exc).lower() or "invalidrange" in str(exc).lower():
                return b""  # a ranged GET of an empty object (S3 answers 416): the file is empty
            last = exc
            if not is_transient(exc):
                break
            if attempt == retries:
                raise StorageFault(f"storage still failing after {retries} retries reading {uri}: "
                                   f"{type(exc).__name__}: {exc}", _HINT_UNAVAILABLE) from None
            sleep(backoff_delay(attempt, base_delay))
    raise ReadError(f"read failed: {type(last).__name__}: {last}")


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
                retries: int = 6, threads: int = 8, chunk: int = 16) -> Iterator[pa.Table]:
    """Ray task: read plan shards and yield decoded images ``chunk`` at a time (one row per input).

    Each work item names a plan shard (and, on resume, the URIs of it still to do). Reading happens
    here, in the cluster, never on the driver; a few threads overlap object-store latency.
    Yielding per chunk keeps a task's memory at ``chunk`` decoded images whatever the shard size.
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

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for shard, plan_url, only in zip(batch.column("shard").to_pylist(), batch.column("plan_url").to_pylist(),
                                         batch.column("only").to_pylist()):
            try:
                planned = read_plan_shard(plan_url)
            except Exception as exc:  # noqa: BLE001 - the plan is storage too: stop, name it
                hint = _HINT_CREDENTIALS if is_credential_error(exc) else _HINT_UNAVAILABLE
                yield _decoded_table([shard], [plan_url], [_deferred_row(
                    plan_url, f"cannot read the plan shard {plan_url}: {type(exc).__name__}: {exc}", hint)])
                continue
            wanted = set(only) if only else None
            uris = [u for u in planned if wanted is None or u in wanted]
            for start in range(0, len(uris), chunk):
                part = uris[start:start + chunk]
                rows = list(pool.map(one, part))
                yield _decoded_table([shard] * len(part), part, rows)


def _deferred_row(uri: str, message: str, hint: str) -> dict:
    """A row left unread by a storage fault; it carries the fault's message, and its hint in error_kind."""
    return {"uri": uri, "status": STATUS_DEFERRED, "error_kind": hint, "error": message, "width": None,
            "height": None, "pixels": None, "source_bytes": None, "content_sha1": None}


READ_WORKER_MIB = 256  # a read worker's own memory (Python, pyarrow, Pillow, fsspec: ~120 MiB measured) with margin
READ_IMAGE_MIB = 4  # per input of a chunk: a decoded RGB image of ~1.3 megapixels


def read_task_args(chunk: int) -> dict:
    """Ray remote args of the read tasks: a CPU, and a memory reservation for the worker and one chunk
    of decoded images (Ray Data says at the end of a run when the reads used more). The reservation
    also keeps the reads out of the model actors: Ray Data fuses adjacent map stages whose resources
    are equal, and fused, the actor would read and decode between batches while the GPU waits. The
    model stage never reserves memory this way."""
    return {"num_cpus": 1.0, "memory": (READ_WORKER_MIB + chunk * READ_IMAGE_MIB) * 2**20}


def _decoded_table(shards: list[int], uris: list[str], rows: list[dict]) -> pa.Table:
    return pa.table({
        "shard": pa.array(shards, pa.int32()),
        "uri": pa.array(uris, pa.string()),
        "status": pa.array([r["status"] for r in rows], pa.string()),
        "error_kind": pa.array([r["error_kind"] for r in rows], pa.string()),
        "error": pa.array([r["error"] for r in rows], pa.string()),
        "width": pa.array([r["width"] for r in rows], pa.int32()),
        "height": pa.array([r["height"] for r in rows], pa.int32()),
        "pixels": pa.array([r["pixels"] for r in rows], pa.large_binary()),
        "source_bytes": pa.array([r["source_bytes"] for r in rows], pa.int64()),
        "content_sha1": pa.array([r["content_sha1"] for r in rows], pa.string()),
    })


# ---------------------------------------------------------------------------------------------
# Stage 3: the model, one per actor
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    preset: str
    checkpoint: ResolvedCheckpoint | None  # from ebseg_core.checkpoint.resolve_checkpoint; None = random weights
    batch_size: int
    torch_threads: int = 0  # see pipeline.resources.actor_torch_threads
    inference_size: int | None = None
    inference_max_size: int | None = None
    precision: str = "auto"

    def config(self):
        """The preset's config (with the checkpoint's inference settings) and the inference-size overrides."""
        from ebseg_core import preset_config, with_inference_settings

        if self.checkpoint is not None:
            return self.checkpoint.model_config(self.inference_size, self.inference_max_size)
        return with_inference_settings(preset_config(self.preset), self.inference_size, self.inference_max_size)


class Labeler:
    """Ray Data callable class: builds EBSeg once per actor, then labels batches of decoded images."""

    def __init__(self, spec: ModelSpec, vocabulary: Any, test_exit: str | None = None):
        t0 = time.time()
        import torch

        from ebseg_core import build_model

        set_torch_threads(spec.torch_threads)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if spec.checkpoint is None:  # random weights: the same in every actor, so labels agree across actors
            torch.manual_seed(0)
        self.model = build_model(spec.config(), checkpoint=spec.checkpoint)
        self.model.to(self.device).eval()
        self.spec = spec
        self.vocab = vocabulary
        self.model_id = str(getattr(self.model, "model_id", spec.preset))
        cfg = getattr(self.model, "config", None)
        self.model_config = json.dumps(
            {"model_id": self.model_id, "preset": spec.preset,
             "checkpoint": spec.checkpoint.weights_url if spec.checkpoint else None,
             "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg},
            default=str)
        self.label_dtype = np.uint8 if len(vocabulary.names) <= 256 else np.uint16
        self.calls = 0
        self.test_exit = test_exit  # TEST ONLY (EBSEG_TEST_ACTOR_EXIT_AT_BATCH), see _maybe_test_exit
        print(f"[label] model actor ready in {time.time() - t0:.1f} s: {self.model_id} on {self.device}, "
              f"{len(vocabulary.names)} classes", flush=True)

    def _maybe_test_exit(self) -> None:
        """TEST ONLY: simulate an actor dying mid-job, once per marker file (used by tests/test_label*.py)."""
        if not self.test_exit:
            return
        at, marker = self.test_exit.split(":", 1)
        if self.calls == int(at) and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)

    def _segment(self, images: list[np.ndarray]) -> list:
        with self.torch.inference_mode():
            return self.model.segment(images, self.vocab, batch_size=self.spec.batch_size,
                                      precision=self.spec.precision)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        self._maybe_test_exit()
        n = batch.num_rows
        status = batch.column("status").to_pylist()
        kinds = batch.column("error_kind").to_pylist()
        errors = batch.column("error").to_pylist()
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        pixels = batch.column("pixels").to_pylist()
        labels: list[bytes | None] = [None] * n
        confs: list[bytes | None] = [None] * n
        ms: list[float | None] = [None] * n
        todo = [i for i in range(n) if status[i] == S.STATUS_OK]
        images = [np.frombuffer(pixels[i], np.uint8).reshape(heights[i], widths[i], 3) for i in todo]
        t0 = time.perf_counter()
        try:
            results: list = self._segment(images) if images else []
            per = (time.perf_counter() - t0) * 1000.0 / max(1, len(images))
            times = [per] * len(images)
        except Exception:  # noqa: BLE001 - find the image that fails, label the rest
            results, times = [], []
            for img in images:
                t1 = time.perf_counter()
                try:
                    results.append(self._segment([img])[0])
                except Exception as exc:  # noqa: BLE001
                    results.append(exc)
                times.append((time.perf_counter() - t1) * 1000.0)
        for i, res, t in zip(todo, results, times):
            if isinstance(res, Exception):
                status[i], kinds[i], errors[i] = S.STATUS_ERROR, "model", f"{type(res).__name__}: {res}"
                continue
            lab = res.label_map.detach().to("cpu").numpy()
            conf = res.confidence.detach().float().to("cpu").numpy()
            if lab.shape != (heights[i], widths[i]):
                status[i], kinds[i] = S.STATUS_ERROR, "model"
                errors[i] = f"model returned a {lab.shape} label map for a {heights[i]}x{widths[i]} image"
                continue
            labels[i] = lab.astype(self.label_dtype).tobytes()
            confs[i] = conf.astype(np.float16).tobytes()
            ms[i] = t
        out = batch.drop_columns(["pixels", "status", "error_kind", "error"])
        return out.append_column("status", pa.array(status, pa.string())) \
            .append_column("error_kind", pa.array(kinds, pa.string())) \
            .append_column("error", pa.array(errors, pa.string())) \
            .append_column("label_raw", pa.array(labels, pa.large_binary())) \
            .append_column("confidence_raw", pa.array(confs, pa.large_binary())) \
            .append_column("duration_ms", pa.array(ms, pa.float32())) \
            .append_column("model_id", pa.array([self.model_id] * n, pa.string())) \
            .append_column("model_config", pa.array([self.model_config] * n, pa.string()))


# ---------------------------------------------------------------------------------------------
# Stage 4: encode rows and write fragments
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocabInfo:
    names: list[str]
    synonyms: list[list[str]]
    id: str


def fragment_name(uris: list[str]) -> str:
    """Content-derived fragment name: a retried task rewrites the same file instead of adding one."""
    return "part-" + hashlib.sha1("\n".join(sorted(uris)).encode()).hexdigest()[:24] + ".parquet"


def encode_and_write(batch: pa.Table, output: str, vocab: VocabInfo) -> pa.Table:
    """Turn model outputs into label rows (PNG masks, class stats) and write one fragment per shard.

    Returns one summary row per shard for the driver. Deferred inputs (a storage fault) are counted,
    not written; a fragment that cannot be written (full disk, no permission) is reported as a
    fault, not raised, so the driver can stop the job with one line instead of a Ray traceback.
    """
    d = batch.to_pydict()
    now = _dt.datetime.now(_dt.timezone.utc)
    label_dtype = np.uint8 if len(vocab.names) <= 256 else np.uint16
    by_shard: dict[int, list[dict]] = defaultdict(list)
    deferred: Counter = Counter()
    fault: dict[int, tuple[str, str]] = {}
    model_config = next((c for c in d["model_config"] if c), "{}")
    for i in range(batch.num_rows):
        uri, shard = d["uri"][i], d["shard"][i]
        if d["status"][i] == STATUS_DEFERRED:
            deferred[shard] += 1
            fault.setdefault(shard, (d["error"][i], d["error_kind"][i]))
            continue
        common = dict(model_id=d["model_id"][i] or "", vocabulary_id=vocab.id, labeled_at=now,
                      source_bytes=d["source_bytes"][i], content_sha1=d["content_sha1"][i])
        row = None
        if d["status"][i] == S.STATUS_OK:
            try:
                h, w = d["height"][i], d["width"][i]
                lab = np.frombuffer(d["label_raw"][i], label_dtype).reshape(h, w)
                conf = np.frombuffer(d["confidence_raw"][i], np.float16).reshape(h, w).astype(np.float32)
                row = S.make_ok_row(uri, lab, conf, vocab.names, duration_ms=d["duration_ms"][i], **common)
            except Exception as exc:  # noqa: BLE001 - an encoding bug costs one row
                row = S.make_error_row(uri, "encode", f"{type(exc).__name__}: {exc}", **common)
        if row is None:
            row = S.make_error_row(uri, d["error_kind"][i] or "unknown", d["error"][i] or "", width=d["width"][i],
                                   height=d["height"][i], **common)
        by_shard[shard].append(row)
    try:
        model_meta = json.loads(model_config)
    except json.JSONDecodeError:
        model_meta = {"raw": model_config}
    schema = S.label_schema(vocab.names, vocab.synonyms, vocab.id, model=model_meta)
    summary: dict[str, list] = {"shard": [], "rows": [], "ok": [], "error_kinds": [], "model_id": [],
                                "deferred": [], "fault": [], "fault_hint": []}
    for shard in sorted(set(by_shard) | set(deferred)):
        rows = by_shard.get(shard, [])
        if rows:
            table = S.rows_to_table(rows, schema=schema)
            name = fragment_name([r["uri"] for r in rows])
            try:
                write_bytes_atomic(join(output, PARTS_DIR, shard_name(shard), name),
                                   table_to_parquet_bytes(table))
            except WriteError as exc:
                hint = ("free space and rerun the same command" if "space" in exc.reason.lower()
                        else "fix the output storage and rerun the same command")
                deferred[shard] += len(rows)
                fault.setdefault(shard, (str(exc), hint))
                rows = []
        kinds = Counter(r["error_kind"] for r in rows if r["status"] != S.STATUS_OK)
        message, hint = fault.get(shard, ("", ""))
        summary["shard"].append(shard)
        summary["rows"].append(len(rows))
        summary["ok"].append(sum(1 for r in rows if r["status"] == S.STATUS_OK))
        summary["error_kinds"].append(json.dumps(kinds))
        summary["model_id"].append(rows[0]["model_id"] if rows else "")
        summary["deferred"].append(deferred[shard])
        summary["fault"].append(message)
        summary["fault_hint"].append(hint)
    return pa.table({"shard": pa.array(summary["shard"], pa.int32()), "rows": pa.array(summary["rows"], pa.int64()),
                     "ok": pa.array(summary["ok"], pa.int64()),
                     "error_kinds": pa.array(summary["error_kinds"], pa.string()),
                     "model_id": pa.array(summary["model_id"], pa.string()),
                     "deferred": pa.array(summary["deferred"], pa.int64()),
                     "fault": pa.array(summary["fault"], pa.string()),
                     "fault_hint": pa.array(summary["fault_hint"], pa.string())})


# ---------------------------------------------------------------------------------------------
# Shard bookkeeping: fragments -> final file
# ---------------------------------------------------------------------------------------------


def final_name(shard: int) -> str:
    return f"labels-{shard:06d}.parquet"


def _fragment_urls(output: str, shard: int) -> list[str]:
    d = join(output, PARTS_DIR, shard_name(shard))
    return [join(d, n) for n in list_dir(d) if n.endswith(".parquet") and not n.startswith(".")]


def _read_parquet_url(url: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(url)), columns=columns)


def fragment_uris(output: str, shard: int) -> set[str]:
    """URIs already labeled in a shard's fragments (reads only the uri column)."""
    done: set[str] = set()
    for url in _fragment_urls(output, shard):
        done.update(_read_parquet_url(url, ["uri"]).column("uri").to_pylist())
    return done


def compact_shard(output: str, shard: int, plan_url: str) -> dict:
    """Merge a complete shard's fragments into ``labels-N.parquet`` (plan order, each URI once), then drop them."""
    uris = read_plan_shard(plan_url)
    tables = [_read_parquet_url(u) for u in _fragment_urls(output, shard)]
    if not tables:
        raise RuntimeError(f"shard {shard}: no fragments to compact")
    schema = tables[0].schema
    table = pa.concat_tables([t.cast(schema) if t.schema != schema else t for t in tables])
    first: dict[str, int] = {}
    for idx, uri in enumerate(table.column("uri").to_pylist()):
        first.setdefault(uri, idx)  # a URI written twice (retried task) is kept once
    missing = [u for u in uris if u not in first]
    if missing:
        raise RuntimeError(f"shard {shard}: {len(missing)} inputs have no row yet (first: {missing[0]})")
    table = table.take(pa.array([first[u] for u in uris], pa.int64())).replace_schema_metadata(schema.metadata)
    write_bytes_atomic(join(output, final_name(shard)), table_to_parquet_bytes(table, row_group_size=256))
    remove_tree(join(output, PARTS_DIR, shard_name(shard)))
    return {"shard": shard, "rows": table.num_rows}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def load_vocabulary(cfg: LabelConfig):
    """Parse the vocabulary flags (exactly one of text, file, preset) into an ebseg_core Vocabulary."""
    from ebseg_core import Vocabulary

    given = [x for x in (cfg.vocabulary, cfg.vocabulary_file, cfg.vocabulary_preset) if x]
    if len(given) != 1:
        raise LabelError("give exactly one of --vocabulary \"cat,dog;puppy,grass\", --vocabulary-file PATH, "
                         "--vocabulary-preset NAME")
    try:
        if cfg.vocabulary:
            vocab = Vocabulary.parse(cfg.vocabulary)
        elif cfg.vocabulary_file:
            path = cfg.vocabulary_file
            if "://" in path:  # a vocabulary on object storage: fetch it
                import tempfile

                with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
                    f.write(read_bytes(path))
                path = f.name
            vocab = Vocabulary.from_file(path)
        else:
            vocab = Vocabulary.preset(cfg.vocabulary_preset)
    except LabelError:
        raise
    except FileNotFoundError as exc:
        raise LabelError(f"vocabulary file not found: {exc}") from None
    except (ValueError, KeyError) as exc:
        raise LabelError(f"bad vocabulary: {exc}") from None
    if not vocab.names:
        raise LabelError("the vocabulary has no classes")
    return vocab


def _ensure_ray(cfg: LabelConfig) -> None:
    import ray

    if not cfg.progress_bars:
        # Quiet by default: our own progress line replaces Ray Data's bars and its per-run INFO lines
        # (plan, start, finish); its warnings still show.
        # (Ray Data reconfigures its "ray.data" logger per run; these module loggers keep their level.)
        logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled, to enable..."
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:  # embedded local Ray; logical CPUs > cores so actors never starve the read tasks
        cpus = os.cpu_count() or 2
        ray.init(address="local", num_cpus=max(4, 2 * cpus), include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING)


def _resources(cfg: LabelConfig) -> tuple[int, float, float]:
    import ray

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    cpus = float(res.get("CPU", 1))
    g = cfg.num_gpus_per_actor if cfg.num_gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if g > 0 and g > gpus:
        raise LabelError(f"--num-gpus-per-actor {g:g} asks for {g:g} GPU per model actor, but the Ray cluster has "
                         f"{gpus:g} GPUs ({cpus:g} CPUs); leave the flag out to label on CPU")
    n = cfg.num_actors or (max(1, int(gpus // g)) if g > 0 else 1)
    if cfg.num_cpus_per_actor is not None:
        c = cfg.num_cpus_per_actor
    elif g > 0:
        c = 1.0
    else:  # leave at least one logical CPU to the read/encode tasks
        c = max(0.25, min(1.0, (cpus - 1.0) / n))
    return n, g, c


def _job_identity(cfg: LabelConfig, vocab, checkpoint: str | None) -> dict:
    """What must be equal for two runs to share an output: vocabulary, model and its weights by content."""
    from ebseg_core.checkpoint import weights_digest

    try:
        weights = weights_digest(checkpoint) if checkpoint else "random"
    except (OSError, ValueError) as exc:
        raise LabelError(f"cannot read checkpoint {checkpoint}: {exc}") from None
    return {"vocabulary_id": vocab.id, "preset": cfg.preset, "weights_sha256": weights,
            "inference_size": cfg.inference_size, "inference_max_size": cfg.inference_max_size}


def _check_job_identity(cfg: LabelConfig, ident: dict, labeled_any: bool, log: Callable[[str], None]) -> None:
    """Refuse to mix labels of different vocabularies/models in one output.

    An output whose earlier run labeled nothing (it failed at start, e.g. a checkpoint that does
    not fit the preset) is taken over by this run: there is nothing to mix.
    """
    url = join(cfg.output, JOB_MARKER)
    if exists(url):
        old = json.loads(read_bytes(url))
        if old == ident:
            return
        if "weights_sha256" not in old and _same_legacy_job(old, ident, cfg.checkpoint):
            log(f"[label] {JOB_MARKER} of an earlier version: the weights are now recorded by content")
        elif labeled_any:
            raise LabelError(f"{cfg.output} holds labels of another job ({old}); this run is {ident}. "
                             "Write to a new --output to label with a different vocabulary or model.")
        else:
            log(f"[label] {cfg.output} was started by a job that labeled nothing ({old}); this run replaces it")
    write_bytes_atomic(url, json.dumps(ident).encode())


def _same_legacy_job(old: dict, ident: dict, checkpoint: str | None) -> bool:
    """A ``_job.json`` written before weights were identified by content matches when it names the
    same checkpoint path and everything else is equal (all it could tell); it then gets the content
    identity."""
    keys = ("vocabulary_id", "preset", "inference_size", "inference_max_size")
    return all(old.get(k) == ident[k] for k in keys) and old.get("checkpoint") == checkpoint


def reopen_error_rows(output: str, plan: Plan, kinds: set[str]) -> int:
    """Make the error rows of ``kinds`` unlabeled again, so that this run labels
    those inputs once more; returns how many. Rows kept from a final file move to a fragment of
    their shard first, then the final file goes: a crash in between leaves the final file (the
    next rerun removes the fragment), so every input stays exactly once."""
    reopened = 0

    def matching(table: pa.Table) -> list[bool]:
        return [st == S.STATUS_ERROR and k in kinds
                for st, k in zip(table.column("status").to_pylist(), table.column("error_kind").to_pylist())]

    def keep(url: str, shard: int) -> int:
        """Rewrite the rows of ``url`` that stay into a fragment of ``shard``; 0 when none match."""
        if not any(matching(_read_parquet_url(url, ["status", "error_kind"]))):
            return 0
        table = _read_parquet_url(url)
        drop = matching(table)
        kept = table.filter(pa.array([not x for x in drop]))
        if kept.num_rows:
            name = fragment_name(kept.column("uri").to_pylist())
            write_bytes_atomic(join(output, PARTS_DIR, shard_name(shard), name), table_to_parquet_bytes(kept))
        return sum(drop)

    finals = set(list_dir(output))
    part_dirs = set(list_dir(join(output, PARTS_DIR)))
    for s in range(plan.num_shards):
        final = join(output, final_name(s))
        if final_name(s) in finals:
            n = keep(final, s)
            if n:
                remove_tree(join(output, SUCCESS_MARKER))
                remove_tree(final)
                reopened += n
        elif shard_name(s) in part_dirs:
            for url in _fragment_urls(output, s):
                n = keep(url, s)
                if n:
                    remove_tree(url)
                    reopened += n
    return reopened


def _check_checkpoint(cfg: LabelConfig) -> ResolvedCheckpoint | None:
    """The checkpoint resolved and checked against the preset on the driver, before Ray starts (None: random)."""
    if cfg.checkpoint is None:
        if not cfg.random_weights:
            raise LabelError("no --checkpoint given. Pass --checkpoint PATH_OR_URL (an official EBSeg .pth, or a "
                             "run/checkpoint directory or model.safetensors of `ebseg train`), or --random-weights "
                             "to test the pipeline with an untrained model.")
        return None
    if cfg.random_weights:
        raise LabelError("--checkpoint and --random-weights exclude each other")
    from ebseg_core.checkpoint import CheckpointError, resolve_checkpoint

    try:
        return resolve_checkpoint(cfg.checkpoint, preset=cfg.preset, best=cfg.best_checkpoint)
    except (CheckpointError, FileNotFoundError) as exc:
        raise LabelError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - storage unreachable, no permission
        raise LabelError(f"cannot reach checkpoint {cfg.checkpoint}: {type(exc).__name__}: {exc}") from None


def _probe_input(uris: list[str]) -> None:
    """Read one byte of the first few inputs on the driver, before Ray starts: a job that cannot read
    its input at all (credentials expired or missing, access denied on the whole prefix) stops here
    with one line. Any other outcome is a file's own business, found again by the job."""
    denied = []
    for uri in uris:
        try:
            fs, path = filesystem_for(uri)
            retry_io(fs.cat_file, path, start=0, end=1)
            return
        except Exception as exc:  # noqa: BLE001 - classified
            if is_credential_error(exc):
                raise LabelError(f"storage refused the job's credentials reading {uri}: {type(exc).__name__}: "
                                 f"{exc}; {_HINT_CREDENTIALS}") from None
            if not isinstance(exc, PermissionError):
                return
            denied.append(f"{uri} ({exc})")
    if denied:
        raise LabelError(f"access denied reading the first {len(denied)} inputs, e.g. {denied[0]}: "
                         "check the permissions of the job's credentials on the input")


class _Progress:
    """Prints a progress line every ``interval`` seconds from a thread, whether or not batches arrive."""

    def __init__(self, log: Callable[[str], None], interval: float, total: int, skipped: int, todo: int):
        import threading

        self.log, self.interval, self.total, self.skipped, self.todo = log, interval, total, skipped, todo
        self.processed = self.ok = self.errors = 0
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="label-progress", daemon=True)

    def __enter__(self) -> "_Progress":
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            done = self.processed + self.skipped
            rate = self.processed / max(time.time() - self.t0, 1e-9)
            eta = f"{(self.todo - self.processed) / rate:.0f} s" if rate > 0 else "-"
            self.log(f"[label] {done:,}/{self.total:,} images ({100 * done / max(self.total, 1):.1f}%) | "
                     f"{rate:.2f} img/s | ok {self.ok:,} errors {self.errors:,} | ETA {eta}")


def run_label(cfg: LabelConfig, log: Callable[[str], None] = print) -> LabelSummary:
    """Label every input of ``cfg`` into ``cfg.output``; resumable: rerun the same call after a crash.

    Everything that can be decided without the cluster (flags, vocabulary, checkpoint, plan, what is
    left to do, whether the input is readable) is decided before Ray starts; a rerun with nothing
    left to do never starts it.
    """
    t_start = time.time()
    if cfg.batch_size <= 0:
        raise LabelError("--batch-size must be positive")
    unknown = sorted(set(cfg.retry_errors) - set(S.ERROR_KINDS))
    if unknown:
        raise LabelError(f"--retry-errors: unknown error kind {', '.join(unknown)} "
                         f"(kinds: {', '.join(S.ERROR_KINDS)})")
    checkpoint = _check_checkpoint(cfg)
    cfg = dataclasses.replace(cfg, preset=checkpoint.preset if checkpoint else (cfg.preset or "ebseg-b"))
    vocab = load_vocabulary(cfg)
    vocab = checkpoint.vocabulary_for(vocab) if checkpoint else vocab
    mspec = ModelSpec(preset=cfg.preset, checkpoint=checkpoint, batch_size=cfg.batch_size,
                      inference_size=cfg.inference_size, inference_max_size=cfg.inference_max_size,
                      precision=cfg.precision)
    try:
        mspec.config()
    except (KeyError, ValueError, TypeError) as exc:
        raise LabelError(f"bad model settings: {exc}") from None
    if cfg.random_weights:
        bar = "!" * 78
        log(f"{bar}\n!! --random-weights: the model is UNTRAINED. The labels written are MEANINGLESS;\n"
            f"!! use this only to test the pipeline. Pass --checkpoint for real labels.\n{bar}")
    try:
        spec = InputSpec(input=cfg.input, manifest=cfg.manifest, extensions=cfg.extensions, glob=cfg.glob)
    except InputError as exc:
        raise LabelError(str(exc)) from None
    ident = _job_identity(cfg, vocab, checkpoint.weights_url if checkpoint else None)
    log(f"[label] listing {cfg.input or cfg.manifest} into a shard plan under {join(cfg.output, '_plan')} ...")
    try:
        swept = sweep_temp_files(cfg.output, [PARTS_DIR, PLAN_DIR])
        if swept:
            log(f"[label] removed {swept} temp file(s) left by an interrupted run")
        earlier = load_plan(cfg.output)
        plan = build_plan(spec, cfg.output, shard_size=cfg.shard_size, progress=log)
        labeled_any = (any(n.startswith("labels-") for n in list_dir(cfg.output))
                       or any(_fragment_urls(cfg.output, int(d.split("-")[1]))
                              for d in list_dir(join(cfg.output, PARTS_DIR)) if d.startswith("shard-")))
        _check_job_identity(cfg, ident, labeled_any, log)
        listing = _listing_diff(cfg, spec, plan, earlier, log)
        if cfg.retry_errors:
            n = reopen_error_rows(cfg.output, plan, set(cfg.retry_errors))
            log(f"[label] --retry-errors {','.join(cfg.retry_errors)}: {n:,} error rows to label again")
    except (InputError, LabelError) as exc:
        raise LabelError(str(exc)) from None
    except WriteError as exc:
        raise LabelError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - storage unreachable, bucket missing, no permission
        raise LabelError(f"cannot use the output {cfg.output}: {type(exc).__name__}: {exc}") from None
    log(f"[label] plan: {plan.total:,} inputs in {plan.num_shards} shards of up to {plan.shard_size}")

    # Resume: which shards are final, which are partly in fragments.
    finals = {n for n in list_dir(cfg.output) if n.startswith("labels-") and n.endswith(".parquet")}
    done_shards = {s for s in range(plan.num_shards) if final_name(s) in finals}
    part_dirs = {n for n in list_dir(join(cfg.output, PARTS_DIR)) if n.startswith("shard-")}
    items: list[dict] = []
    expected: dict[int, int] = {}
    to_compact: list[int] = []
    skipped = sum(plan.shard_counts[s] for s in done_shards)
    for s in range(plan.num_shards):
        if s in done_shards:
            if shard_name(s) in part_dirs:  # crash between final write and fragment cleanup
                remove_tree(join(cfg.output, PARTS_DIR, shard_name(s)))
            continue
        only: list[str] = []
        if shard_name(s) in part_dirs:
            done = fragment_uris(cfg.output, s)
            if done:
                pending = [u for u in read_plan_shard(plan.shard_url(s)) if u not in done]
                skipped += plan.shard_counts[s] - len(pending)
                if not pending:
                    to_compact.append(s)
                    continue
                only = pending
        items.append({"shard": s, "plan_url": plan.shard_url(s), "only": only})
        expected[s] = len(only) if only else plan.shard_counts[s]
    todo = sum(expected.values())
    if skipped:
        log(f"[label] resuming: {len(done_shards)} shards already written, {skipped:,} inputs already labeled, "
            f"{todo:,} to go")

    ok = processed = 0
    model_id = stopped = ""
    errors: Counter = Counter()
    if items:
        _probe_input(items[0]["only"][:3] or read_plan_shard(items[0]["plan_url"])[:3])
        processed, ok, errors, model_id, stopped = _label_items(cfg, mspec, vocab, plan, items, expected, to_compact,
                                                                 skipped, todo, log)
    else:  # nothing to label: finish any complete-but-unmerged shards here, without a cluster
        for s in to_compact:
            compact_shard(cfg.output, s, plan.shard_url(s))

    complete = _all_final(cfg.output, plan)
    if complete and not stopped:
        retire_rows(cfg.output, plan, log)
    seconds = time.time() - t_start
    if stopped:
        stopped = stopped.format(labeled=f"{skipped + processed:,}", total=f"{plan.total:,}")
    summary = LabelSummary(output=cfg.output, inputs_total=plan.total, shards_total=plan.num_shards,
                           inputs_skipped=skipped, processed=processed, ok=ok, errors=dict(errors),
                           seconds=seconds, images_per_s=processed / seconds if seconds > 0 else 0.0,
                           complete=complete, model_id=model_id, vocabulary_id=vocab.id, stopped=stopped,
                           listing=dataclasses.asdict(listing) if listing else {},
                           finished_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if complete:
        if not list_dir(join(cfg.output, PARTS_DIR)):
            remove_tree(join(cfg.output, PARTS_DIR))
        write_bytes_atomic(join(cfg.output, SUCCESS_MARKER), json.dumps(dataclasses.asdict(summary)).encode())
    try:
        append_run(cfg.output, summary, preset=cfg.preset)
    except WriteError as exc:  # e.g. the full disk that stopped the run: its own line says what to do
        log(f"[label] this run is not in the history: {exc}")
    for line in summary.lines():
        log(line)
    return summary


def _all_final(output: str, plan: Plan) -> bool:
    finals = {n for n in list_dir(output) if n.startswith("labels-") and n.endswith(".parquet")}
    return all(final_name(s) in finals for s in range(plan.num_shards))


def _listing_diff(cfg: LabelConfig, spec: InputSpec, plan: Plan, earlier: Plan | None,
                  log: Callable[[str], None]) -> ListingDiff | None:
    """An incremental run: on an output whose earlier runs are complete, list again and plan what is
    new or changed (a new generation). An unfinished output is finished first and not listed
    (at most one generation is in flight); None when this run did not list again."""
    if earlier is None:  # this run made the plan: everything in it is new
        return ListingDiff(listed=plan.total, new=plan.total, generation=0)
    if not _all_final(cfg.output, plan):
        log("[label] an earlier run is unfinished: finishing it (rerun afterwards to pick up inputs added since)")
        return None
    retire_rows(cfg.output, plan, log)
    log(f"[label] incremental run: listing {cfg.input or cfg.manifest} again and comparing it with the plan ...")
    diff = plan_generation(plan, spec, relabel_changed=cfg.relabel_changed, progress=log)
    if diff.generation is not None:
        remove_tree(join(cfg.output, SUCCESS_MARKER))
        log(f"[label] generation {diff.generation}: {diff.new:,} new and {diff.changed:,} changed inputs to label, "
            f"{diff.deleted:,} deleted")
    return diff


def retire_rows(output: str, plan: Plan, log: Callable[[str], None] = print) -> int:
    """Take the rows that stopped being current out of the older shards, once every shard is final.

    For each generation not yet retired, its ``_plan/retired-G.parquet`` names (uri, old shard):
    changed inputs (their new row is in a shard of generation G, already final) and deleted ones.
    Per old shard: the rows go to ``_superseded/gen-G/labels-N.parquet``, then ``labels-N.parquet``
    is rewritten without them, then its plan shard; each step is a whole-file write that is skipped
    when already done, so a kill anywhere is finished by the rerun, and readers of ``*.parquet``
    (which skip ``_`` paths) see each current input once. Returns the number of rows retired.
    """
    moved = 0
    for g, gen in enumerate(plan.generations):
        if gen.get("retired", True):
            continue
        table = _read_parquet_url(plan.retire_url(g), ["uri", "shard"])
        by_shard: dict[int, set[str]] = defaultdict(set)
        for uri, shard in zip(table.column("uri").to_pylist(), table.column("shard").to_pylist()):
            by_shard[shard].add(uri)
        for shard in sorted(by_shard):
            gone = pa.array(sorted(by_shard[shard]), pa.string())
            final = join(output, final_name(shard))
            if pc.any(pc.is_in(_read_parquet_url(final, ["uri"]).column("uri"), gone)).as_py():
                rows = _read_parquet_url(final)
                drop = pc.is_in(rows.column("uri"), gone)
                old = rows.filter(drop)
                write_bytes_atomic(join(output, SUPERSEDED_DIR, f"gen-{g:06d}", final_name(shard)),
                                   table_to_parquet_bytes(old))
                write_bytes_atomic(final, table_to_parquet_bytes(rows.filter(pc.invert(drop)),
                                                                 row_group_size=256))
                moved += old.num_rows
            planned = read_plan_table(plan.shard_url(shard))
            keep = pc.invert(pc.is_in(planned.column("uri"), gone))
            if not pc.all(keep).as_py():
                planned = planned.filter(keep)
                write_bytes_atomic(plan.shard_url(shard), table_to_parquet_bytes(planned))
            plan.shard_counts[shard] = planned.num_rows
        gen["retired"] = True
        plan.save()
    if moved:
        log(f"[label] {moved:,} rows of changed or deleted inputs moved to {join(output, SUPERSEDED_DIR)}")
    return moved


def append_run(output: str, summary: LabelSummary, preset: str) -> None:
    """Add this run to the output's run history ``_runs.json`` (a small JSON list, rewritten whole)."""
    url = join(output, RUNS_LOG)
    runs = json.loads(read_bytes(url)) if exists(url) else []
    d = summary.listing or {}
    runs.append({"finished_at": summary.finished_at, "generation": d.get("generation"),
                 "listed": d.get("listed"), "new": d.get("new"), "changed": d.get("changed"),
                 "changed_kept": d.get("changed_kept"), "deleted": d.get("deleted"),
                 "unchanged": d.get("unchanged"), "labeled": summary.processed, "ok": summary.ok,
                 "errors": summary.errors, "inputs": summary.inputs_total, "complete": summary.complete,
                 "model_id": summary.model_id, "preset": preset, "vocabulary_id": summary.vocabulary_id,
                 "seconds": round(summary.seconds, 1)})
    write_bytes_atomic(url, json.dumps(runs, indent=1).encode())


def _label_items(cfg: LabelConfig, mspec: ModelSpec, vocab, plan: Plan, items: list[dict], expected: dict[int, int],
                 to_compact: list[int], skipped: int, todo: int, log: Callable[[str], None]):
    """Run the Ray Data pipeline over the work items; (processed, ok, errors, model_id, stopped).

    ``stopped`` is a one-line reason (with ``{labeled}``/``{total}`` fields) when a storage fault
    about the job, not a file, stopped it: the inputs it left are unlabeled, for the rerun.
    """
    import ray

    _ensure_ray(cfg)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    # An actor can die before its first batch for reasons outside the model (its node went away);
    # Ray Data's default budget for that is 0, which fails the whole job. Start a replacement instead.
    # A model that cannot load at all still fails after these few tries (its checkpoint was validated
    # above).
    if hasattr(ctx, "max_consecutive_actor_init_deaths"):
        ctx.max_consecutive_actor_init_deaths = max(ctx.max_consecutive_actor_init_deaths, 3)
    n_actors, gpus, cpus = _resources(cfg)
    threads = actor_torch_threads(gpus, n_actors, cpus, default_share=cfg.num_cpus_per_actor is None)
    mspec = dataclasses.replace(mspec, torch_threads=threads)
    vinfo = VocabInfo(names=list(vocab.names), synonyms=[list(s) for s in vocab.synonyms], id=vocab.id)
    test_exit = os.environ.get(TEST_EXIT_ENV) or None  # TEST ONLY
    compact = ray.remote(num_cpus=0.25, max_retries=3)(compact_shard)
    pending_compactions: list = [compact.remote(cfg.output, s, plan.shard_url(s)) for s in to_compact]
    log(f"[label] {n_actors} model actor(s) x ({gpus:g} GPU, {cpus:g} CPU), batch size {cfg.batch_size}, "
        f"model {cfg.preset}{' (random weights)' if cfg.random_weights else ''}, {len(vinfo.names)} classes")
    ds = build_dataset(cfg, items, mspec, vocab, vinfo, n_actors, gpus, cpus, test_exit)
    ok = processed = 0
    model_id = stopped = ""
    errors: Counter = Counter()
    got: dict[int, int] = defaultdict(int)
    compacting: set[int] = set()
    with _Progress(log, cfg.progress_interval_s, plan.total, skipped, todo) as progress:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                s = row["shard"]
                got[s] += row["rows"]
                processed += row["rows"]
                ok += row["ok"]
                errors.update(json.loads(row["error_kinds"]))
                model_id = model_id or row["model_id"]
                if row["fault"] and not stopped:
                    stopped = f"{row['fault']} ({{labeled}} of {{total}} images are labeled; {row['fault_hint']})"
                if got[s] >= expected.get(s, 0) and s not in compacting and not row["deferred"]:
                    compacting.add(s)
                    pending_compactions.append(compact.remote(cfg.output, s, plan.shard_url(s)))
            progress.processed, progress.ok, progress.errors = processed, ok, sum(errors.values())
            if stopped:
                break  # stop reading and labeling: everything left is for the rerun
            if len(pending_compactions) > 32:
                _, pending_compactions = ray.wait(pending_compactions, num_returns=len(pending_compactions) - 16)
    ray.get(pending_compactions)
    return processed, ok, errors, model_id, stopped


def build_dataset(cfg: LabelConfig, items: list[dict], mspec: ModelSpec, vocab, vinfo: VocabInfo, n_actors: int,
                  gpus: float, cpus: float, test_exit: str | None = None):
    """The Ray Data pipeline: plan shards -> read + decode (tasks) -> EBSeg (actor pool) -> encode + write (tasks)."""
    import ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 10_000))
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes,
                                   "retries": cfg.read_retries, "threads": cfg.read_threads,
                                   "chunk": cfg.read_batch_size},
                        **read_task_args(cfg.read_batch_size))
    # Fault tolerance of the actor pool: Ray Data creates its actors with max_restarts=-1 and
    # max_task_retries=-1 (ray/data/_internal/execution/operators/actor_pool_map_operator.py),
    # so a dead actor is restarted and its in-flight batch re-run; we rely on those defaults
    # (passing them again is deprecated in Ray 2.60).
    ds = ds.map_batches(Labeler, fn_constructor_kwargs={"spec": mspec, "vocabulary": vocab, "test_exit": test_exit},
                        batch_size=cfg.batch_size, batch_format="pyarrow",
                        compute=ActorPoolStrategy(size=n_actors), num_gpus=gpus, num_cpus=cpus,
                        resources=dict(cfg.actor_resources) or None)
    return ds.map_batches(encode_and_write, batch_size=cfg.write_batch_size, batch_format="pyarrow",
                          fn_kwargs={"output": cfg.output, "vocab": vinfo}, num_cpus=0.5)
