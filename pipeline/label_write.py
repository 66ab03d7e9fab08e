"""Stage 3 of the labeling job and the shard files: encode label rows, write fragments, compact shards.

Exactly-once output without Ray's checkpointing: a fragment is written whole (temp+rename locally,
one PUT on object stores) under ``_parts/shard-N/`` with a name derived from its contents, so a
retried task overwrites its own fragment. When all inputs of a shard are in fragments, the shard is
compacted into ``labels-N.parquet`` (written whole, then the fragments deleted).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ebseg_core.storage import WriteError, join, list_dir, read_bytes, remove_tree, write_bytes_atomic
from ebseg_core.vocabulary import Vocabulary
from pipeline import schema as S
from pipeline.label_read import STATUS_DEFERRED
from pipeline.listing import read_plan_shard, shard_name
from pipeline.schema import table_to_parquet_bytes

PARTS_DIR = "_parts"


def fragment_name(uris: list[str]) -> str:
    """Content-derived fragment name: a retried task rewrites the same file instead of adding one."""
    return "part-" + hashlib.sha1("\n".join(sorted(uris)).encode()).hexdigest()[:24] + ".parquet"


def encode_and_write(batch: pa.Table, output: str, vocab: Vocabulary, model: dict) -> pa.Table:
    """Turn model outputs into label rows (PNG masks, class stats) and write one fragment per shard.

    ``model`` is what the files record about the model (``ModelSpec.describe``, built once on the
    driver). Returns one summary row per shard for the driver. Deferred inputs (a storage fault) are counted,
    not written; a fragment that cannot be written (full disk, no permission) is reported as a
    fault, not raised, so the driver can stop the job with one line instead of a Ray traceback.
    """
    d = batch.to_pydict()
    now = _dt.datetime.now(_dt.UTC)
    label_dtype = np.uint8 if len(vocab.names) <= 256 else np.uint16
    by_shard: dict[int, list[dict]] = defaultdict(list)
    deferred: Counter = Counter()
    fault: dict[int, tuple[str, str]] = {}
    for i in range(batch.num_rows):
        uri, shard = d["uri"][i], d["shard"][i]
        if d["status"][i] == STATUS_DEFERRED:
            deferred[shard] += 1
            fault.setdefault(shard, (d["error"][i], d["error_kind"][i]))
            continue
        common = dict(model_id=model["model_id"], vocabulary_id=vocab.id, labeled_at=now,
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
    schema = S.label_schema(vocab.names, [list(s) for s in vocab.synonyms], vocab.id, model=model)
    summary: dict[str, list] = {"shard": [], "rows": [], "ok": [], "error_kinds": [], "model_calls": [],
                                "deferred": [], "fault": [], "fault_hint": []}
    calls: dict[int, float] = defaultdict(float)  # model calls per shard: each of a call's n rows adds 1/n
    for shard, n in zip(d["shard"], d["call_images"]):
        calls[shard] += 1.0 / n if n else 0.0
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
        summary["model_calls"].append(calls[shard])
        summary["deferred"].append(deferred[shard])
        summary["fault"].append(message)
        summary["fault_hint"].append(hint)
    return pa.table({"shard": pa.array(summary["shard"], pa.int32()), "rows": pa.array(summary["rows"], pa.int64()),
                     "ok": pa.array(summary["ok"], pa.int64()),
                     "error_kinds": pa.array(summary["error_kinds"], pa.string()),
                     "model_calls": pa.array(summary["model_calls"], pa.float64()),
                     "deferred": pa.array(summary["deferred"], pa.int64()),
                     "fault": pa.array(summary["fault"], pa.string()),
                     "fault_hint": pa.array(summary["fault_hint"], pa.string())})


def final_name(shard: int) -> str:
    return f"labels-{shard:06d}.parquet"


def fragment_urls(output: str, shard: int) -> list[str]:
    d = join(output, PARTS_DIR, shard_name(shard))
    return [join(d, n) for n in list_dir(d) if n.endswith(".parquet") and not n.startswith(".")]


def read_parquet_url(url: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(url)), columns=columns)


def fragment_uris(output: str, shard: int) -> set[str]:
    """URIs already labeled in a shard's fragments (reads only the uri column)."""
    done: set[str] = set()
    for url in fragment_urls(output, shard):
        done.update(read_parquet_url(url, ["uri"]).column("uri").to_pylist())
    return done


def compact_shard(output: str, shard: int, plan_url: str) -> dict:
    """Merge a complete shard's fragments into ``labels-N.parquet`` (plan order, each URI once), then drop them."""
    uris = read_plan_shard(plan_url)
    tables = [read_parquet_url(u) for u in fragment_urls(output, shard)]
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
