"""The labeling job's driver: image lake -> Ray Data (read, decode, EBSeg actor pool, encode) -> label Parquet.

Design (why, in short; docs/labeling.md has the long form):
- Inputs come from a deterministic shard plan saved under ``<output>/_plan/`` (pipeline/listing.py):
  listing is streamed, bytes are read inside Ray tasks, never by the driver.
- Stages: plan shard -> read + decode + group by padded size (tasks, ``label_read``) -> EBSeg (actor
  pool, ``label_model``: model and vocabulary embeddings loaded once per actor; Ray restarts dead
  actors and retries their batches) -> encode PNGs/stats and write a Parquet *fragment* per
  (batch, shard) (tasks, ``label_write``), compacted per shard into ``labels-N.parquet``.
- Exactly-once output without Ray's checkpointing: fragments are whole files named by their
  contents; a rerun skips final shards and, for the others, the URIs already in a fragment
  (``label_output.pending_work``). A SIGKILL at any moment leaves whole files only.
- Incremental runs: a rerun into a complete output lists again and plans a new generation of shards
  for what is new or changed; once all is final, the rows of changed and deleted inputs move to
  ``_superseded/`` (``label_output.retire_rows``). ``_runs.json`` keeps the history of runs.
- The model is decided once, here (``ebseg_core.model_spec.ModelSpec``); the actors build it from
  the spec and the writers record ``spec.describe()`` in each file's metadata.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from ebseg_core.errors import UserError
from ebseg_core.model_spec import ModelSpec
from ebseg_core.storage import (
    WriteError,
    filesystem_for,
    is_credential_error,
    join,
    retry_io,
    sweep_temp_files,
)
from ebseg_core.vocabulary import Vocabulary
from pipeline import schema as S
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.label_model import Labeler
from pipeline.label_output import (
    LabelError,
    Work,
    all_final,
    append_run,
    check_job_identity,
    finish,
    job_identity,
    labeled_any,
    listing_diff,
    pending_work,
    reopen_error_rows,
    retire_rows,
)
from pipeline.label_read import DEFAULT_MAX_BYTES, HINT_CREDENTIALS, SizeGrouping, read_shards, read_task_args
from pipeline.label_write import PARTS_DIR, compact_shard, encode_and_write
from pipeline.listing import (
    DEFAULT_EXTENSIONS,
    PLAN_DIR,
    InputSpec,
    ListingDiff,
    Plan,
    build_plan,
    load_plan,
    read_plan_shard,
)
from pipeline.resources import ActorPool, cluster_actor_pool, ensure_ray


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
    # Group decoded images of equal padded size before the model actors (full batches on mixed-size
    # lakes); False only to measure what it buys (bench/bench_label.py --mixed-sizes).
    group_by_size: bool = True


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
    model_calls: int = 0  # model forward calls of this run (processed images / model_calls: the mean batch)
    stopped: str = ""  # why the run stopped early (a storage fault about the job, not a file); "" otherwise
    listing: dict = field(default_factory=dict)  # ListingDiff of this run's listing ({} when it did not list)
    finished_at: str = ""

    def lines(self) -> list[str]:
        """The summary printed at the end of a run."""
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
            f"[label] throughput:  {self.images_per_s:.2f} images/s over {self.seconds:.1f} s, "
            f"{self.model_calls:,} model calls",
            f"[label] complete:    {'yes' if self.complete else 'NO (rerun the same command to finish)'}",
        ]


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
                                 f"{exc}; {HINT_CREDENTIALS}") from None
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

    def __enter__(self) -> _Progress:
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


def run_label(cfg: LabelConfig, log: Callable[[str], None] = print,
              labeler: type[Labeler] = Labeler) -> LabelSummary:
    """Label every input of ``cfg`` into ``cfg.output``; resumable: rerun the same call after a crash.

    Everything that can be decided without the cluster (flags, vocabulary, checkpoint, plan, what is
    left to do, whether the input is readable) is decided before Ray starts; a rerun with nothing
    left to do never starts it. ``labeler``: the model stage's callable class (tests pass a subclass
    that injects faults).
    """
    t_start = time.time()
    spec, vocab = _model_and_vocabulary(cfg, log)
    plan, listing = _plan(cfg, spec, vocab, log)
    work = pending_work(cfg.output, plan)
    if work.skipped:
        log(f"[label] resuming: {work.done_shards} shards already written, {work.skipped:,} inputs already labeled, "
            f"{work.todo:,} to go")
    progress = _Counts()
    if work.items:
        _probe_input(work.items[0]["only"][:3] or read_plan_shard(work.items[0]["plan_url"])[:3])
        progress = _label_items(cfg, spec, vocab, plan, work, log, labeler)
    else:  # nothing to label: finish any complete-but-unmerged shards here, without a cluster
        for s in work.to_compact:
            compact_shard(cfg.output, s, plan.shard_url(s))
    return _finish(cfg, spec, vocab, plan, listing, work, progress, time.time() - t_start, log)


def _model_and_vocabulary(cfg: LabelConfig, log: Callable[[str], None]) -> tuple[ModelSpec, Vocabulary]:
    """The checked flags: the model spec (checkpoint resolved) and the vocabulary with its seen flags."""
    unknown = sorted(set(cfg.retry_errors) - set(S.ERROR_KINDS))
    if unknown:
        raise LabelError(f"--retry-errors: unknown error kind {', '.join(unknown)} "
                         f"(kinds: {', '.join(S.ERROR_KINDS)})")
    try:
        spec = ModelSpec.from_options(
            checkpoint=cfg.checkpoint, random_weights=cfg.random_weights, preset=cfg.preset,
            best_checkpoint=cfg.best_checkpoint, inference_size=cfg.inference_size,
            inference_max_size=cfg.inference_max_size, precision=cfg.precision, batch_size=cfg.batch_size)
    except UserError as exc:
        raise LabelError(str(exc)) from None
    try:
        vocab = spec.vocabulary_for(Vocabulary.from_options(
            text=cfg.vocabulary, file=cfg.vocabulary_file, preset=cfg.vocabulary_preset))
    except UserError as exc:
        raise LabelError(f"bad vocabulary: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a vocabulary file on unreachable storage
        raise LabelError(f"cannot read the vocabulary {cfg.vocabulary_file}: {type(exc).__name__}: {exc}") from None
    if spec.random_weights:
        bar = "!" * 78
        log(f"{bar}\n!! --random-weights: the model is UNTRAINED. The labels written are MEANINGLESS;\n"
            f"!! use this only to test the pipeline. Pass --checkpoint for real labels.\n{bar}")
    return spec, vocab


def _plan(cfg: LabelConfig, spec: ModelSpec, vocab: Vocabulary,
          log: Callable[[str], None]) -> tuple[Plan, ListingDiff | None]:
    """The output's plan: made by the first run, reused (and extended by a new generation on a
    complete output) by reruns; also checks that the output belongs to this job."""
    try:
        inputs = InputSpec(input=cfg.input, manifest=cfg.manifest, extensions=cfg.extensions, glob=cfg.glob)
        ident = job_identity(spec, vocab)
        log(f"[label] listing {cfg.input or cfg.manifest} into a shard plan under "
            f"{join(cfg.output, PLAN_DIR)} ...")
        swept = sweep_temp_files(cfg.output, [PARTS_DIR, PLAN_DIR])
        if swept:
            log(f"[label] removed {swept} temp file(s) left by an interrupted run")
        earlier = load_plan(cfg.output)
        plan = build_plan(inputs, cfg.output, shard_size=cfg.shard_size, progress=log)
        check_job_identity(cfg.output, cfg.checkpoint, ident, labeled_any(cfg.output), log)
        listing = listing_diff(cfg.output, inputs, plan, earlier, cfg.relabel_changed, log)
        if cfg.retry_errors:
            n = reopen_error_rows(cfg.output, plan, set(cfg.retry_errors))
            log(f"[label] --retry-errors {','.join(cfg.retry_errors)}: {n:,} error rows to label again")
    except (UserError, WriteError) as exc:
        raise LabelError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - storage unreachable, bucket missing, no permission
        raise LabelError(f"cannot use the output {cfg.output}: {type(exc).__name__}: {exc}") from None
    log(f"[label] plan: {plan.total:,} inputs in {plan.num_shards} shards of up to {plan.shard_size}")
    return plan, listing


@dataclass
class _Counts:
    """What the labeled rows of this run add up to (the driver's tally of the writers' summaries)."""

    processed: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    model_calls: float = 0.0
    stopped: str = ""  # a storage fault's line, with {labeled}/{total} fields; "" when it ran to the end


def _finish(cfg: LabelConfig, spec: ModelSpec, vocab: Vocabulary, plan: Plan, listing: ListingDiff | None,
            work: Work, counts: _Counts, seconds: float, log: Callable[[str], None]) -> LabelSummary:
    """Retire superseded rows, write ``_SUCCESS`` and the run history, print the summary."""
    complete = all_final(cfg.output, plan)
    if complete and not counts.stopped:
        retire_rows(cfg.output, plan, log)
    stopped = counts.stopped.format(labeled=f"{work.skipped + counts.processed:,}", total=f"{plan.total:,}")
    summary = LabelSummary(output=cfg.output, inputs_total=plan.total, shards_total=plan.num_shards,
                           inputs_skipped=work.skipped, processed=counts.processed, ok=counts.ok,
                           errors=dict(counts.errors), seconds=seconds,
                           images_per_s=counts.processed / seconds if seconds > 0 else 0.0,
                           complete=complete, model_id=spec.model_id, vocabulary_id=vocab.id, stopped=stopped,
                           model_calls=round(counts.model_calls),
                           listing=dataclasses.asdict(listing) if listing else {},
                           finished_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    if complete:
        finish(cfg.output, json.dumps(dataclasses.asdict(summary)).encode())
    try:
        append_run(cfg.output, summary, preset=spec.preset)
    except WriteError as exc:  # e.g. the full disk that stopped the run: its own line says what to do
        log(f"[label] this run is not in the history: {exc}")
    for line in summary.lines():
        log(line)
    return summary


def _label_items(cfg: LabelConfig, spec: ModelSpec, vocab: Vocabulary, plan: Plan, work: Work,
                 log: Callable[[str], None], labeler: type[Labeler]) -> _Counts:
    """Run the Ray Data pipeline over the work items, compacting each shard as soon as its rows are in.

    Stops early (``stopped``) when a storage fault about the job, not a file, stopped it: the inputs
    it left are unlabeled, for the rerun.
    """
    import ray

    ensure_ray(quiet=not cfg.progress_bars)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    # An actor can die before its first batch for reasons outside the model (its node went away);
    # Ray Data's default budget for that is 0, which fails the whole job. Start a replacement instead.
    # A model that cannot load at all still fails after these few tries (its checkpoint was validated
    # above).
    ctx.max_consecutive_actor_init_deaths = max(ctx.max_consecutive_actor_init_deaths, 3)
    try:
        pool = cluster_actor_pool(num_actors=cfg.num_actors, gpus_per_actor=cfg.num_gpus_per_actor,
                                  cpus_per_actor=cfg.num_cpus_per_actor)
    except UserError as exc:
        raise LabelError(str(exc)) from None
    spec = spec.with_threads(pool.torch_threads)
    compact = ray.remote(num_cpus=0.25, max_retries=3)(compact_shard)
    pending_compactions: list = [compact.remote(cfg.output, s, plan.shard_url(s)) for s in work.to_compact]
    log(f"[label] {pool.num_actors} model actor(s) x ({pool.gpus:g} GPU, {pool.cpus:g} CPU), batch size "
        f"{cfg.batch_size}, model {spec.preset}{' (random weights)' if spec.random_weights else ''}, "
        f"{len(vocab)} classes")
    ds = build_dataset(cfg, work.items, spec, vocab, pool, labeler)
    counts = _Counts()
    got: dict[int, int] = defaultdict(int)
    compacting: set[int] = set()
    with _Progress(log, cfg.progress_interval_s, plan.total, work.skipped, work.todo) as progress:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                s = row["shard"]
                got[s] += row["rows"]
                counts.processed += row["rows"]
                counts.ok += row["ok"]
                counts.model_calls += row["model_calls"]
                counts.errors.update(json.loads(row["error_kinds"]))
                if row["fault"] and not counts.stopped:
                    counts.stopped = (f"{row['fault']} ({{labeled}} of {{total}} images are labeled; "
                                      f"{row['fault_hint']})")
                if got[s] >= work.expected.get(s, 0) and s not in compacting and not row["deferred"]:
                    compacting.add(s)
                    pending_compactions.append(compact.remote(cfg.output, s, plan.shard_url(s)))
            progress.processed, progress.ok, progress.errors = counts.processed, counts.ok, sum(counts.errors.values())
            if counts.stopped:
                break  # stop reading and labeling: everything left is for the rerun
            if len(pending_compactions) > 32:
                _, pending_compactions = ray.wait(pending_compactions, num_returns=len(pending_compactions) - 16)
    ray.get(pending_compactions)
    return counts


def build_dataset(cfg: LabelConfig, items: list[dict], spec: ModelSpec, vocab: Vocabulary, pool: ActorPool,
                  labeler: type[Labeler] = Labeler):
    """The Ray Data pipeline: plan shards -> read + decode + group by size (tasks) -> EBSeg (actor pool)
    -> encode + write (tasks).

    With ``cfg.group_by_size`` the read tasks hand the actors groups of equal padded size and each
    block they write is one model batch (``batch_size=None``: Ray Data must not re-cut them); without
    it the actors take ``batch_size`` rows as they come and split them by size.
    """
    import ray
    from ray.data import ActorPoolStrategy

    short, max_size, divisibility = spec.input_sizing()
    held = max(cfg.read_batch_size, 4 * cfg.batch_size)
    grouping = (SizeGrouping(cfg.batch_size, short, max_size, divisibility, max_held=held)
                if cfg.group_by_size else None)
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=min(len(items), 10_000))
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes,
                                   "retries": cfg.read_retries, "threads": cfg.read_threads,
                                   "chunk": cfg.read_batch_size, "grouping": grouping},
                        **read_task_args(cfg.read_batch_size + (held if grouping else 0)))
    # Fault tolerance of the actor pool: Ray Data creates its actors with max_restarts=-1 and
    # max_task_retries=-1 (ray/data/_internal/execution/operators/actor_pool_map_operator.py),
    # so a dead actor is restarted and its in-flight batch re-run; we rely on those defaults
    # (passing them again is deprecated in Ray 2.60).
    ds = ds.map_batches(labeler, fn_constructor_kwargs={"spec": spec, "vocabulary": vocab},
                        batch_size=None if grouping else cfg.batch_size, batch_format="pyarrow",
                        compute=ActorPoolStrategy(size=pool.num_actors), num_gpus=pool.gpus, num_cpus=pool.cpus,
                        resources=dict(cfg.actor_resources) or None)
    return ds.map_batches(encode_and_write, batch_size=cfg.write_batch_size, batch_format="pyarrow",  # type: ignore[arg-type]
                          fn_kwargs={"output": cfg.output, "vocab": vocab, "model": spec.describe()}, num_cpus=0.5)
