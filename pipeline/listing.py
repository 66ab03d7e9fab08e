"""Input listing and the deterministic shard plan of a labeling job.

Why a plan on storage instead of ``ray.data.read_images(prefix)``: Ray resolves every path and its
metadata on the driver before the first image is read (Ray issue 40686: hours at 100M objects), and a
resumable job needs a fixed, replayable assignment of inputs to output files. So the listing is
*streamed* (one page of keys at a time) into plan shard files of ``shard_size`` URIs each, written
under ``<output>/_plan/``; the driver never holds more than one shard of paths. ``_plan/plan.json``
is written last and marks the plan complete. Labeling reads the plan shards inside Ray tasks.

The plan is deterministic: the same listing gives the same shards (object stores list keys in
lexicographic order; local directories are walked in sorted order), and a complete plan is reused,
never rebuilt, when the job is rerun, so shard ``i`` always means the same inputs. A rerun on a
complete output appends a *generation* of shards for what the listing has new or changed
(plan_generation: a streaming merge of the sorted listing and the sorted plan).
"""

from __future__ import annotations

import csv
import datetime as _dt
import heapq
import io
import json
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ebseg_core.errors import UserError
from ebseg_core.storage import (
    WriteError,
    exists,
    io_reason,
    is_local,
    iter_file_entries,
    join,
    list_dir,
    open_url,
    read_bytes,
    remove_tree,
    write_bytes_atomic,
)
from pipeline.schema import table_to_parquet_bytes

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
PLAN_DIR = "_plan"
PLAN_MARKER = "plan.json"
PLAN_VERSION = 1


class InputError(UserError):
    """A user mistake about the input (nothing there, unreachable, unreadable manifest): message says what to do."""


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
                glob: str | None = None) -> Iterator[tuple[str, str | None]]:
    """Yield ``(uri, version)`` of files under a prefix/directory, lazily, in lexicographic order.

    Listing is ebseg_core.storage.iter_file_entries (S3 pages consumed as they come; ``version`` is
    size + ETag, or size + mtime locally); hidden files (".name") are skipped. Raises
    FileNotFoundError when nothing exists at ``url``.
    """
    exts = _normalise_extensions(extensions)
    for uri, version in iter_file_entries(url, extensions=list(exts) if exts else None, glob=glob):
        if not posixpath.basename(uri).startswith("."):
            yield uri, version


_URI_COLUMNS = ("uri", "url", "path", "key", "file", "filename")


def iter_manifest(url: str) -> Iterator[str]:
    """Yield URIs from a manifest: Parquet (column uri/url/path), CSV (same names, else first column) or text
    (one per line)."""
    lower = url.lower()
    try:
        f = open_url(url, "rb")
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


def iter_inputs(spec: InputSpec) -> Iterator[tuple[str, str | None]]:
    """All inputs of a spec as ``(uri, version)``, streamed; a manifest gives no version (None)."""
    if spec.manifest:
        for uri in iter_manifest(spec.manifest):
            if not is_local(uri) or os.path.isabs(uri) or uri.startswith("file://"):
                yield uri, None
            else:
                raise InputError(f"manifest {spec.manifest} holds a relative path {uri!r}; "
                                 "use absolute paths or full URLs (s3://bucket/key)")
        return
    assert spec.input is not None  # InputSpec holds exactly one of input and manifest
    yield from iter_prefix(spec.input, spec.extensions, spec.glob)


DEDUP_BUCKETS = 256


def unique_in_order(uris: Iterator[str], workdir: str, buckets: int = DEDUP_BUCKETS,
                    flush_at: int = 128) -> Iterator[str]:
    """``uris`` without repeats, each at its first position, holding about 1/``buckets`` of them in memory.

    Why not a set: a manifest can list hundreds of millions of URIs. Hashed buckets on local disk
    instead (linear I/O, no sort): pass 1 spools the URIs in order to one file and ``(position, uri)``
    to the bucket of ``hash(uri)``, so every copy of a URI lands in the same bucket; pass 2 finds the
    positions of repeats bucket by bucket (one bucket's URIs in a set); pass 3 streams the spool and
    skips those positions (a merge of the buckets' sorted position lists). Disk: about twice the URI
    bytes, under ``workdir``. Pass 1 buffers at most ``buckets * flush_at`` URIs. A failing local
    write raises WriteError naming the file.
    """
    spool_path = os.path.join(workdir, "spool.arrows")
    bucket_paths = [os.path.join(workdir, f"bucket-{b:04d}.arrows") for b in range(buckets)]
    _spool_and_bucket(uris, spool_path, bucket_paths, flush_at)
    repeats = [r for b, path in enumerate(bucket_paths)
               if (r := _repeated_positions(path, os.path.join(workdir, f"repeats-{b:04d}.arrows")))]
    skip = heapq.merge(*(_read_column(p) for p in repeats))
    next_skip = next(skip, None)
    for pos, uri in enumerate(_read_column(spool_path)):
        if pos == next_skip:
            next_skip = next(skip, None)
        else:
            yield uri


_POS_URI = pa.schema([("pos", pa.int64()), ("uri", pa.string())])


class _ArrowStream:
    """An Arrow IPC stream file being written; OS errors become WriteError naming the file."""

    def __init__(self, path: str, schema: pa.Schema):
        self.path, self.schema = path, schema
        try:
            self.writer = pa.ipc.new_stream(path, schema)
        except OSError as exc:
            raise WriteError(path, io_reason(exc)) from exc

    def write(self, columns: list[list]) -> None:
        try:
            self.writer.write_batch(pa.record_batch(
                [pa.array(c, f.type) for c, f in zip(columns, self.schema)], schema=self.schema))
        except OSError as exc:
            raise WriteError(self.path, io_reason(exc)) from exc

    def close(self) -> None:
        self.writer.close()


def _spool_and_bucket(uris: Iterator[str], spool_path: str, bucket_paths: list[str], flush_at: int) -> None:
    """Pass 1: every URI in order to the spool, ``(position, uri)`` to the bucket of its hash."""
    spool = _ArrowStream(spool_path, pa.schema([("uri", pa.string())]))
    writers = [_ArrowStream(p, _POS_URI) for p in bucket_paths]
    pending: list[tuple[list[int], list[str]]] = [([], []) for _ in bucket_paths]
    in_order: list[str] = []
    for pos, uri in enumerate(uris):
        b = hash(uri) % len(bucket_paths)
        pending[b][0].append(pos)
        pending[b][1].append(uri)
        if len(pending[b][0]) >= flush_at:
            writers[b].write([pending[b][0], pending[b][1]])
            pending[b] = ([], [])
        in_order.append(uri)
        if len(in_order) >= 8192:
            spool.write([in_order])
            in_order = []
    if in_order:
        spool.write([in_order])
    spool.close()
    for (pos_list, names), w in zip(pending, writers):
        if pos_list:
            w.write([pos_list, names])
        w.close()


def _repeated_positions(bucket_path: str, out_path: str) -> str | None:
    """Pass 2 for one bucket: the positions of repeated URIs (sorted) to ``out_path``; None if none."""
    seen: set[str] = set()
    dups: list[int] = []
    with pa.ipc.open_stream(bucket_path) as reader:
        for batch in reader:
            for pos, uri in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                if uri in seen:
                    dups.append(pos)  # positions arrive in order: the list stays sorted
                else:
                    seen.add(uri)
    os.unlink(bucket_path)
    if not dups:
        return None
    w = _ArrowStream(out_path, pa.schema([("pos", pa.int64())]))
    w.write([dups])
    w.close()
    return out_path


def _read_column(path: str) -> Iterator:
    """The first column of an Arrow IPC stream file, value by value."""
    with pa.ipc.open_stream(path) as reader:
        for batch in reader:
            yield from batch.column(0).to_pylist()


# ---------------------------------------------------------------------------------------------
# The shard plan
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A complete, saved shard plan. Shards are numbered across *generations*: generation 0 holds
    the first listing ([i*shard_size, (i+1)*shard_size) of it per shard); each incremental run that
    finds new or changed inputs appends a generation of shards holding only those."""

    output: str
    spec: dict
    shard_size: int
    total: int  # planned inputs in all shards (after retirements: the current inputs)
    num_shards: int
    shard_counts: list[int] = field(default_factory=list)
    created_at: str = ""
    version: int = PLAN_VERSION
    # one dict per generation: generation, first_shard, num_shards, listed, new, changed, deleted,
    # unchanged, changed_kept, created_at, retired (its retired rows have left the older shards)
    generations: list[dict] = field(default_factory=list)

    def shard_url(self, shard: int) -> str:
        return join(self.output, PLAN_DIR, shard_name(shard) + ".parquet")

    def retire_url(self, generation: int) -> str:
        return join(self.output, PLAN_DIR, retire_name(generation))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self) -> None:
        """Write plan.json (atomically): the plan, or its new generation, becomes real here."""
        self.total = sum(self.shard_counts)
        self.num_shards = len(self.shard_counts)
        write_bytes_atomic(join(self.output, PLAN_DIR, PLAN_MARKER), self.to_json().encode())


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def retire_name(generation: int) -> str:
    return f"retired-{generation:06d}.parquet"


PLAN_SCHEMA = pa.schema([("uri", pa.string()), ("version", pa.string())])
RETIRED_SCHEMA = pa.schema([("uri", pa.string()), ("shard", pa.int64()), ("reason", pa.string())])


def read_plan_shard(url: str) -> list[str]:
    """URIs of one plan shard, in plan order (transient storage errors retried)."""
    return read_plan_table(url).column("uri").to_pylist()


def read_plan_table(url: str) -> pa.Table:
    """A plan shard as a table (uri, version); plans written before versions were kept get nulls."""
    table = pq.read_table(io.BytesIO(read_bytes(url)))
    if "version" not in table.column_names:
        table = table.append_column("version", pa.nulls(table.num_rows, pa.string()))
    return table.select(["uri", "version"])


def load_plan(output: str) -> Plan | None:
    """The complete plan saved under output, or None when there is none (or only a partial one)."""
    marker = join(output, PLAN_DIR, PLAN_MARKER)
    if not exists(marker):
        return None
    d = json.loads(read_bytes(marker))
    plan = Plan(**d)
    if not plan.generations:  # a plan written before generations: all of it is generation 0
        plan.generations = [{"generation": 0, "first_shard": 0, "num_shards": plan.num_shards, "listed": plan.total,
                             "new": plan.total, "changed": 0, "deleted": 0, "unchanged": 0, "changed_kept": 0,
                             "created_at": plan.created_at, "retired": True}]
    return plan


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class _ShardWriter:
    """Writes (uri, version) entries into consecutive plan shards of ``shard_size``, from ``first``."""

    def __init__(self, output: str, first: int, shard_size: int):
        self.output, self.next, self.shard_size = output, first, shard_size
        self.counts: list[int] = []
        self.uris: list[str] = []
        self.versions: list[str | None] = []

    def add(self, uri: str, version: str | None) -> None:
        self.uris.append(uri)
        self.versions.append(version)
        if len(self.uris) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.uris:
            return
        table = pa.table({"uri": pa.array(self.uris, pa.string()), "version": pa.array(self.versions, pa.string())})
        write_bytes_atomic(join(self.output, PLAN_DIR, shard_name(self.next) + ".parquet"),
                           table_to_parquet_bytes(table))
        self.counts.append(len(self.uris))
        self.next += 1
        self.uris, self.versions = [], []


def _listing(spec: InputSpec, workdir: str) -> Iterator[tuple[str, str | None]]:
    """The spec's inputs, each once: a listing of a prefix holds every key once; a manifest may
    repeat a URI anywhere in it."""
    if spec.manifest:
        return ((u, None) for u in unique_in_order((u for u, _ in iter_inputs(spec)), workdir))
    return iter_inputs(spec)


def _listing_errors(spec: InputSpec, exc: BaseException) -> InputError:
    where = spec.input or spec.manifest
    if isinstance(exc, FileNotFoundError):
        return InputError(f"input {where} does not exist ({exc})")
    if isinstance(exc, PermissionError):
        return InputError(f"input {where} is not readable: {exc}")
    return InputError(f"cannot list {where}: {exc}")


def build_plan(spec: InputSpec, output: str, shard_size: int = 1000,
               progress: Callable[[str], None] | None = print, progress_every: int = 100_000) -> Plan:
    """Stream the listing into plan shards under ``<output>/_plan/`` and return the saved plan.

    Reuses a complete plan of the same spec (plan_generation adds what changed since); refuses one
    of a different spec (the output would mix two jobs). A partial plan (crash while listing) is
    rebuilt: nothing has been labeled from it yet.
    """
    if shard_size <= 0:
        raise InputError("--shard-size must be positive")
    existing = load_plan(output)
    if existing is not None:
        if existing.spec != spec.to_dict() or existing.shard_size != shard_size:
            raise InputError(
                f"{output} already holds the plan of a different job (input {existing.spec}, shard size "
                f"{existing.shard_size}); write to a new --output, or delete {join(output, PLAN_DIR)} "
                "and the labels it produced")
        return existing
    remove_tree(join(output, PLAN_DIR))
    writer = _ShardWriter(output, 0, shard_size)
    total = 0
    with tempfile.TemporaryDirectory(prefix="ebseg-plan-") as workdir:
        try:
            for uri, version in _listing(spec, workdir):
                writer.add(uri, version)
                total += 1
                if progress and total % progress_every == 0:
                    progress(f"[label] listed {total:,} inputs ({len(writer.counts)} plan shards written)")
        except (InputError, WriteError):
            raise
        except OSError as exc:
            raise _listing_errors(spec, exc) from None
    writer.flush()
    if total == 0:
        where = spec.manifest or spec.input
        filt = "" if spec.manifest else (
            f" (extensions: {','.join(spec.extensions) if spec.extensions else 'any'}"
            f"{', glob: ' + spec.glob if spec.glob else ''})")
        raise InputError(f"no input files found in {where}{filt}; check the URL and filters")
    plan = Plan(output=output, spec=spec.to_dict(), shard_size=shard_size, total=total,
                num_shards=len(writer.counts), shard_counts=writer.counts, created_at=_now())
    plan.generations = [{"generation": 0, "first_shard": 0, "num_shards": plan.num_shards, "listed": total,
                         "new": total, "changed": 0, "deleted": 0, "unchanged": 0, "changed_kept": 0,
                         "created_at": plan.created_at, "retired": True}]
    plan.save()
    return plan


# ---------------------------------------------------------------------------------------------
# Incremental runs: a streaming diff of the listing against the plan
# ---------------------------------------------------------------------------------------------

SORT_RUN = 100_000  # entries per sorted run spilled to disk by external_sort
MERGE_BATCH = 512  # entries read at a time from each sorted run while merging


def external_sort(rows: Iterator[tuple], names: Sequence[str], types: Sequence[pa.DataType], workdir: str,
                  key: Callable[[tuple], Any], run_size: int = SORT_RUN) -> Iterator[tuple]:
    """``rows`` sorted by ``key``, holding at most ``run_size`` of them in memory: sorted runs are
    spilled to Arrow files under ``workdir``, then merged (heapq) ``MERGE_BATCH`` of each at a time
    (100 M entries: 1,000 runs, 0.5 M entries in memory while merging).

    Why sort at all, when S3 and local listings come sorted: a manifest, and plans written before
    listings were sorted, are not, and the plan is many shards of several generations."""
    schema = pa.schema(list(zip(names, types)))
    runs: list[str] = []
    buf: list[tuple] = []

    def spill() -> None:
        buf.sort(key=key)
        path = os.path.join(workdir, f"run-{len(runs):06d}.arrows")
        try:
            with pa.ipc.new_stream(path, schema) as w:
                for i in range(0, len(buf), MERGE_BATCH):
                    part = buf[i:i + MERGE_BATCH]
                    w.write_batch(pa.record_batch([pa.array([r[j] for r in part], t) for j, t in enumerate(types)],
                                                  schema=schema))
        except OSError as exc:
            raise WriteError(path, io_reason(exc)) from exc
        runs.append(path)
        buf.clear()

    for row in rows:
        buf.append(row)
        if len(buf) >= run_size:
            spill()
    if not runs:
        buf.sort(key=key)
        yield from buf
        return
    if buf:
        spill()

    def read_run(path: str) -> Iterator[tuple]:
        with pa.ipc.open_stream(path) as reader:
            for batch in reader:
                yield from zip(*(c.to_pylist() for c in batch.columns))

    yield from heapq.merge(*(read_run(p) for p in runs), key=key)


def iter_planned(plan: Plan) -> Iterator[tuple[str, int, str | None]]:
    """Every planned entry as (uri, shard, version), shard by shard (one shard in memory)."""
    for s in range(plan.num_shards):
        t = read_plan_table(plan.shard_url(s))
        for uri, version in zip(t.column("uri").to_pylist(), t.column("version").to_pylist()):
            yield uri, s, version


def _latest(planned: Iterator[tuple[str, int, str | None]]) -> Iterator[tuple[str, int, str | None]]:
    """Of consecutive entries of one uri (sorted by (uri, shard)), the last: the latest shard plans it."""
    prev = None
    for entry in planned:
        if prev is not None and entry[0] != prev[0]:
            yield prev
        prev = entry
    if prev is not None:
        yield prev


def diff_sorted(listed: Iterator[tuple[str, str | None]],
                planned: Iterator[tuple[str, int, str | None]]) -> Iterator[tuple[str, str, str | None, int]]:
    """Merge two streams sorted by uri (``planned`` by (uri, shard)) into (change, uri, version, old_shard):
    change is new, changed, unchanged or deleted; ``version`` the listed one; ``old_shard`` the
    latest shard planning the uri (-1 for new). A version unknown on either side (manifests,
    old plans) counts as unchanged."""
    planned = _latest(planned)
    lst = next(listed, None)
    pln = next(planned, None)
    while lst is not None or pln is not None:
        if lst is not None and (pln is None or lst[0] < pln[0]):
            yield "new", lst[0], lst[1], -1
            lst = next(listed, None)
        elif pln is not None and (lst is None or pln[0] < lst[0]):
            yield "deleted", pln[0], None, pln[1]
            pln = next(planned, None)
        elif lst is not None and pln is not None:
            same = lst[1] is None or pln[2] is None or lst[1] == pln[2]
            yield ("unchanged" if same else "changed"), lst[0], lst[1], pln[1]
            lst, pln = next(listed, None), next(planned, None)


@dataclass
class ListingDiff:
    """What a listing holds compared with the plan: counts, for the summary and the run history."""

    listed: int = 0
    new: int = 0
    changed: int = 0  # changed and planned again (--relabel-changed)
    changed_kept: int = 0  # changed, left with its old label (no --relabel-changed)
    deleted: int = 0
    unchanged: int = 0
    generation: int | None = None  # the generation planned by this listing, if any


def _remove_unplanned(plan: Plan) -> None:
    """Delete plan shards and retired lists beyond plan.json: a listing killed before plan.json left them
    (a stale retired list would report deletions that never were)."""
    for name in list_dir(join(plan.output, PLAN_DIR)):
        stem, _, ext = name.partition(".")
        kind, _, num = stem.partition("-")
        if ext != "parquet" or not num.isdigit():
            continue
        beyond = plan.num_shards if kind == "shard" else len(plan.generations) if kind == "retired" else None
        if beyond is not None and int(num) >= beyond:
            remove_tree(join(plan.output, PLAN_DIR, name))


def plan_generation(plan: Plan, spec: InputSpec, relabel_changed: bool = False,
                    progress: Callable[[str], None] | None = print, progress_every: int = 100_000,
                    sort_run: int = SORT_RUN) -> ListingDiff:
    """List the input again and diff it with ``plan``; when something is new, changed (and
    ``relabel_changed``) or deleted, add a generation: shards of the new/changed inputs (sorted by
    uri) after the existing ones, and ``_plan/retired-G.parquet`` naming the rows of older shards
    that stop being current (changed: relabeled in this generation; deleted). plan.json is written
    last, so a crash before it leaves the plan as it was (the shards written beyond it are
    overwritten by the next try). Memory: ``sort_run`` entries per side plus one plan shard,
    whatever the size of the lake; the retired list (this run's changes) is held whole.
    """
    diff = ListingDiff()
    gen = len(plan.generations)
    first = plan.num_shards
    _remove_unplanned(plan)
    writer = _ShardWriter(plan.output, first, plan.shard_size)
    retired: dict[str, list] = {"uri": [], "shard": [], "reason": []}
    with tempfile.TemporaryDirectory(prefix="ebseg-diff-") as workdir:
        os.makedirs(os.path.join(workdir, "listed"))
        os.makedirs(os.path.join(workdir, "planned"))
        try:
            listed = external_sort(_listing(spec, workdir), ("uri", "version"), (pa.string(), pa.string()),
                                   os.path.join(workdir, "listed"), key=lambda r: r[0], run_size=sort_run)
            planned = external_sort(iter_planned(plan), ("uri", "shard", "version"),
                                    (pa.string(), pa.int64(), pa.string()), os.path.join(workdir, "planned"),
                                    key=lambda r: (r[0], r[1]), run_size=sort_run)
            for change, uri, version, old in diff_sorted(listed, planned):
                if change != "deleted":
                    diff.listed += 1
                    if progress and diff.listed % progress_every == 0:
                        progress(f"[label] listed {diff.listed:,} inputs ({diff.new:,} new so far)")
                if change == "new":
                    diff.new += 1
                    writer.add(uri, version)
                elif change == "unchanged":
                    diff.unchanged += 1
                elif change == "changed" and not relabel_changed:
                    diff.changed_kept += 1
                else:
                    if change == "changed":
                        diff.changed += 1
                        writer.add(uri, version)
                    else:
                        diff.deleted += 1
                    retired["uri"].append(uri)
                    retired["shard"].append(old)
                    retired["reason"].append(change)
        except (InputError, WriteError):
            raise
        except OSError as exc:
            raise _listing_errors(spec, exc) from None
    writer.flush()
    if not (diff.new or diff.changed or diff.deleted):
        return diff
    write_bytes_atomic(plan.retire_url(gen), table_to_parquet_bytes(pa.table(retired, schema=RETIRED_SCHEMA)))
    diff.generation = gen
    plan.shard_counts = plan.shard_counts + writer.counts
    plan.generations = plan.generations + [{
        "generation": gen, "first_shard": first, "num_shards": len(writer.counts), "listed": diff.listed,
        "new": diff.new, "changed": diff.changed, "deleted": diff.deleted, "unchanged": diff.unchanged,
        "changed_kept": diff.changed_kept, "created_at": _now(), "retired": False}]
    plan.save()
    return diff
