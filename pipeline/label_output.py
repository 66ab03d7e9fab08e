"""The labeling job's output as a whole: what is done and what is left (resume), who may write to it
(job identity), incremental runs (a new plan generation, retiring rows that stopped being current),
error rows to label again, and the run history.

Every change is a whole-file write that is skipped when already done, so a kill anywhere is finished
by the rerun and readers of ``labels-*.parquet`` see each current input once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from ebseg_core.errors import UserError
from ebseg_core.model_spec import ModelSpec
from ebseg_core.storage import exists, join, list_dir, read_bytes, remove_tree, write_bytes_atomic
from ebseg_core.vocabulary import Vocabulary
from pipeline import schema as S
from pipeline.label_write import PARTS_DIR, final_name, fragment_name, fragment_uris, fragment_urls, read_parquet_url
from pipeline.listing import InputSpec, ListingDiff, Plan, plan_generation, read_plan_shard, read_plan_table, shard_name
from pipeline.schema import table_to_parquet_bytes

if TYPE_CHECKING:
    from pipeline.label import LabelSummary

JOB_MARKER = "_job.json"
RUNS_LOG = "_runs.json"  # the run history: one record per run (time, listing diff, counts, model)
SUPERSEDED_DIR = "_superseded"  # rows that stopped being current: _superseded/gen-G/labels-N.parquet
SUCCESS_MARKER = "_SUCCESS"


class LabelError(UserError):
    """A problem the user can fix (bad flags, unreachable storage, mismatched output); printed without a traceback."""


@dataclass
class Work:
    """What a run has left to do on an output: work items for the read stage (a plan shard and, when
    it is partly labeled, the URIs still to do), inputs expected per shard, shards only to compact."""

    items: list[dict] = field(default_factory=list)
    expected: dict[int, int] = field(default_factory=dict)
    to_compact: list[int] = field(default_factory=list)
    done_shards: int = 0
    skipped: int = 0  # inputs labeled by an earlier run

    @property
    def todo(self) -> int:
        return sum(self.expected.values())


def pending_work(output: str, plan: Plan) -> Work:
    """Resume: which shards are final, which are partly in fragments, what is left to label."""
    finals = {n for n in list_dir(output) if n.startswith("labels-") and n.endswith(".parquet")}
    part_dirs = {n for n in list_dir(join(output, PARTS_DIR)) if n.startswith("shard-")}
    work = Work()
    for s in range(plan.num_shards):
        if final_name(s) in finals:
            work.done_shards += 1
            work.skipped += plan.shard_counts[s]
            if shard_name(s) in part_dirs:  # crash between final write and fragment cleanup
                remove_tree(join(output, PARTS_DIR, shard_name(s)))
            continue
        only: list[str] = []
        if shard_name(s) in part_dirs:
            done = fragment_uris(output, s)
            if done:
                pending = [u for u in read_plan_shard(plan.shard_url(s)) if u not in done]
                work.skipped += plan.shard_counts[s] - len(pending)
                if not pending:
                    work.to_compact.append(s)
                    continue
                only = pending
        work.items.append({"shard": s, "plan_url": plan.shard_url(s), "only": only})
        work.expected[s] = len(only) if only else plan.shard_counts[s]
    return work


def labeled_any(output: str) -> bool:
    """Whether an output holds any label row (final files or fragments)."""
    return (any(n.startswith("labels-") for n in list_dir(output))
            or any(fragment_urls(output, int(d.split("-")[1]))
                   for d in list_dir(join(output, PARTS_DIR)) if d.startswith("shard-")))


def finish(output: str, summary_json: bytes) -> None:
    """A complete output: drop the empty fragments folder, write ``_SUCCESS``."""
    if not list_dir(join(output, PARTS_DIR)):
        remove_tree(join(output, PARTS_DIR))
    write_bytes_atomic(join(output, SUCCESS_MARKER), summary_json)


def job_identity(spec: ModelSpec, vocab: Vocabulary) -> dict:
    """What must be equal for two runs to share an output: vocabulary, model and its weights by content."""
    from ebseg_core.checkpoint import weights_digest

    url = spec.checkpoint.weights_url if spec.checkpoint else None
    try:
        weights = weights_digest(url) if url else "random"
    except (OSError, ValueError) as exc:
        raise LabelError(f"cannot read checkpoint {url}: {exc}") from None
    return {"vocabulary_id": vocab.id, "preset": spec.preset, "weights_sha256": weights,
            "inference_size": spec.inference_size, "inference_max_size": spec.inference_max_size}


def check_job_identity(output: str, checkpoint: str | None, ident: dict, labeled_any: bool,
                       log: Callable[[str], None]) -> None:
    """Refuse to mix labels of different vocabularies/models in one output.

    An output whose earlier run labeled nothing (it failed at start, e.g. a checkpoint that does
    not fit the preset) is taken over by this run: there is nothing to mix.
    """
    url = join(output, JOB_MARKER)
    if exists(url):
        old = json.loads(read_bytes(url))
        if old == ident:
            return
        if "weights_sha256" not in old and _same_legacy_job(old, ident, checkpoint):
            log(f"[label] {JOB_MARKER} of an earlier version: the weights are now recorded by content")
        elif labeled_any:
            raise LabelError(f"{output} holds labels of another job ({old}); this run is {ident}. "
                             "Write to a new --output to label with a different vocabulary or model.")
        else:
            log(f"[label] {output} was started by a job that labeled nothing ({old}); this run replaces it")
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
        if not any(matching(read_parquet_url(url, ["status", "error_kind"]))):
            return 0
        table = read_parquet_url(url)
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
            for url in fragment_urls(output, s):
                n = keep(url, s)
                if n:
                    remove_tree(url)
                    reopened += n
    return reopened


def all_final(output: str, plan: Plan) -> bool:
    finals = {n for n in list_dir(output) if n.startswith("labels-") and n.endswith(".parquet")}
    return all(final_name(s) in finals for s in range(plan.num_shards))


def listing_diff(output: str, spec: InputSpec, plan: Plan, earlier: Plan | None, relabel_changed: bool,
                 log: Callable[[str], None]) -> ListingDiff | None:
    """An incremental run: on an output whose earlier runs are complete, list again and plan what is
    new or changed (a new generation). An unfinished output is finished first and not listed
    (at most one generation is in flight); None when this run did not list again."""
    if earlier is None:  # this run made the plan: everything in it is new
        return ListingDiff(listed=plan.total, new=plan.total, generation=0)
    if not all_final(output, plan):
        log("[label] an earlier run is unfinished: finishing it (rerun afterwards to pick up inputs added since)")
        return None
    retire_rows(output, plan, log)
    log(f"[label] incremental run: listing {spec.input or spec.manifest} again and comparing it with the plan ...")
    diff = plan_generation(plan, spec, relabel_changed=relabel_changed, progress=log)
    if diff.generation is not None:
        remove_tree(join(output, SUCCESS_MARKER))
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
        table = read_parquet_url(plan.retire_url(g), ["uri", "shard"])
        by_shard: dict[int, set[str]] = defaultdict(set)
        for uri, shard in zip(table.column("uri").to_pylist(), table.column("shard").to_pylist()):
            by_shard[shard].add(uri)
        for shard in sorted(by_shard):
            gone = pa.array(sorted(by_shard[shard]), pa.string())
            final = join(output, final_name(shard))
            if pc.any(pc.is_in(read_parquet_url(final, ["uri"]).column("uri"), gone)).as_py():
                rows = read_parquet_url(final)
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
