"""Incremental runs: a rerun into a complete output labels what is new (and, with --relabel-changed,
what changed), retires the rows of changed and deleted inputs, and keeps one current row per input.
The diff of a listing against the plan is a streaming merge: tested at 300k keys for flat memory."""

from __future__ import annotations

import json
import os
import re
import time
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from ebseg_core.data.synthetic import blob_image
from pipeline.label import run_label
from pipeline.listing import InputSpec, build_plan, load_plan, plan_generation, read_plan_shard
from tests.test_label_recovery import config, local_rows, write_images


def _manifest(path: Path, keys) -> None:
    with open(path, "w") as f:
        for k in keys:
            f.write(f"s3://lake/photos/{k:09d}.jpg\n")


def _diff_peak(tmp_path: Path, n: int) -> tuple[int, float, object]:
    """Plan a manifest of n keys, then diff a listing with n//100 new keys and n//200 deleted ones."""
    out = str(tmp_path / f"out-{n}")
    _manifest(tmp_path / f"m-{n}.txt", range(n))
    spec = InputSpec(manifest=str(tmp_path / f"m-{n}.txt"))
    plan = build_plan(spec, out, shard_size=10_000, progress=None)
    # the lake grows and loses some keys; the manifest is written in a shuffled-ish order
    keys = list(range(n // 200, n + n // 100))  # the first n//200 keys are deleted, n//100 new ones added
    _manifest(tmp_path / f"m-{n}.txt", keys[1::2] + keys[::2])
    tracemalloc.start()
    t0 = time.perf_counter()
    diff = plan_generation(plan, spec, progress=None, sort_run=20_000)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, seconds, diff


def test_diff_of_a_300k_listing_streams_with_flat_memory(tmp_path):
    peak_small, s_small, d_small = _diff_peak(tmp_path, 30_000)
    peak_big, s_big, d_big = _diff_peak(tmp_path, 300_000)
    print(f"diff 30k: peak {peak_small / 2**20:.1f} MiB in {s_small:.1f} s; "
          f"300k: peak {peak_big / 2**20:.1f} MiB in {s_big:.1f} s")
    assert (d_big.new, d_big.deleted, d_big.unchanged, d_big.listed) == (3000, 1500, 298_500, 301_500)
    assert (d_small.new, d_small.deleted) == (300, 150)
    # 10x the keys; the diff holds sorted runs, one plan shard and this run's retired list only
    assert peak_big < 2.5 * peak_small, (peak_small, peak_big)
    plan = load_plan(str(tmp_path / "out-300000"))
    new = [u for s in range(30, plan.num_shards) for u in read_plan_shard(plan.shard_url(s))]
    assert len(new) == 3000 and new == sorted(new)
    assert plan.generations[-1]["new"] == 3000 and plan.generations[-1]["retired"] is False


def _current(out: str) -> dict[str, dict]:
    rows = local_rows(out).to_pylist()
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)), "an input with more than one current row"
    return {r["uri"]: r for r in rows}


def test_new_changed_deleted_then_rerun(ray_local, tmp_path, capsys):
    src = tmp_path / "in"
    images = write_images(src, 4)
    out = str(tmp_path / "out")
    first = run_label(config(out, input=str(src)))
    assert first.complete and first.listing["new"] == 4
    before = _current(out)

    added = write_images(src, 2, start=10)
    changed, deleted = images[1], images[2]
    Image.fromarray(blob_image(40, 52, seed=77, num_classes=3)[0]).save(changed)  # new content and size
    os.unlink(deleted)
    kept = run_label(config(out, input=str(src)))  # without --relabel-changed: counted, kept
    assert kept.complete and kept.processed == 2
    assert (kept.listing["new"], kept.listing["changed_kept"], kept.listing["deleted"]) == (2, 1, 1)
    rows = _current(out)
    assert set(rows) == set(images + added) - {deleted}
    assert rows[changed]["content_sha1"] == before[changed]["content_sha1"]

    again = run_label(config(out, input=str(src), relabel_changed=True))
    assert again.complete and again.processed == 1
    assert (again.listing["new"], again.listing["changed"], again.listing["deleted"]) == (0, 1, 0)
    rows = _current(out)
    assert set(rows) == set(images + added) - {deleted}
    assert rows[changed]["content_sha1"] != before[changed]["content_sha1"]
    assert (rows[changed]["height"], rows[changed]["width"]) == (40, 52)
    for uri in (images[0], images[3]):
        assert rows[uri]["labeled_at"] == before[uri]["labeled_at"]  # untouched
    # the deleted and the superseded rows are kept aside, where readers of *.parquet do not look
    aside = [r["uri"] for f in sorted(Path(out, "_superseded").rglob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(aside) == sorted([deleted, changed])
    retired = [r for f in sorted(Path(out, "_plan").glob("retired-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert {(r["uri"], r["reason"]) for r in retired} == {(deleted, "deleted"), (changed, "changed")}
    runs = json.loads(Path(out, "_runs.json").read_text())
    assert [(r["new"], r["changed"], r["deleted"], r["labeled"]) for r in runs] == [(4, 0, 0, 4), (2, 0, 1, 2),
                                                                                   (0, 1, 0, 1)]
    success = json.loads(Path(out, "_SUCCESS").read_text())
    assert success["complete"] and success["listing"]["changed"] == 1 and success["inputs_total"] == 5

    # what readers see: the current rows only; `ebseg curate stats` shows the run history
    from jobs import curate as curate_cli
    from jobs.cli import module_main

    capsys.readouterr()
    assert module_main(curate_cli, ["stats", out, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["rows"] == 5 and [r["new"] for r in st["runs"]] == [4, 2, 0]
    assert module_main(curate_cli, ["stats", out]) == 0
    text = capsys.readouterr().out
    assert "labeling runs (3, from _runs.json)" in text
    assert len(re.findall(r"^  \d{4}-\d\d-\d\dT", text, flags=re.M)) == 3

    nothing = run_label(config(out, input=str(src), relabel_changed=True))
    assert nothing.processed == 0 and nothing.listing["unchanged"] == 5 and nothing.complete
    assert set(_current(out)) == set(rows)


def test_kill_between_listing_and_labeling_then_while_retiring(ray_local, tmp_path, monkeypatch):
    import pipeline.label_output as L

    src = tmp_path / "in"
    images = write_images(src, 3)
    out = str(tmp_path / "out")
    assert run_label(config(out, input=str(src))).complete
    before = _current(out)
    finals = {p.name: p.read_bytes() for p in Path(out).glob("labels-*.parquet")}

    added = write_images(src, 3, start=20)
    os.unlink(images[0])
    # 1. The listing step of the next run, as run_label does it, and then the driver dies: the
    # generation is planned (plan.json says so), nothing of it is labeled, nothing retired.
    plan = load_plan(out)
    diff = plan_generation(plan, InputSpec(input=str(src)), progress=None)
    assert (diff.new, diff.deleted, diff.generation) == (3, 1, 1)
    assert {p.name: p.read_bytes() for p in Path(out).glob("labels-*.parquet")} == finals  # old shards untouched

    rerun = run_label(config(out, input=str(src)))
    assert rerun.complete and rerun.processed == 3
    assert rerun.listing == {}  # it finished the planned generation; it did not list again
    rows = _current(out)
    assert set(rows) == set(images[1:] + added)
    for uri in images[1:]:
        assert rows[uri]["labeled_at"] == before[uri]["labeled_at"]

    # 2. The driver dies after a changed input's new row is final and its old row is set aside,
    # before its old shard is rewritten (a test-only wrapper raises on that write).
    Image.fromarray(blob_image(44, 36, seed=78, num_classes=3)[0]).save(images[1])
    os.unlink(added[0])
    real_write = L.write_bytes_atomic

    class Killed(BaseException):
        pass

    def dies_rewriting_shard_0(url: str, data: bytes) -> None:
        if url == os.path.join(out, "labels-000000.parquet"):
            raise Killed(url)
        real_write(url, data)

    monkeypatch.setattr(L, "write_bytes_atomic", dies_rewriting_shard_0)
    try:
        run_label(config(out, input=str(src), relabel_changed=True))
        raise AssertionError("the wrapper did not fire")
    except Killed:
        pass
    monkeypatch.setattr(L, "write_bytes_atomic", real_write)
    assert list(Path(out, "_superseded").rglob("labels-000000.parquet"))  # set aside, not yet rewritten

    last = run_label(config(out, input=str(src), relabel_changed=True))
    assert last.complete and last.processed == 0
    assert (last.listing["new"], last.listing["changed"], last.listing["deleted"]) == (0, 0, 0)
    assert last.listing["unchanged"] == 4
    rows = _current(out)
    assert set(rows) == {images[1], images[2], added[1], added[2]}
    assert (rows[images[1]]["height"], rows[images[1]]["width"]) == (44, 36)
    aside = [r["uri"] for f in Path(out, "_superseded").rglob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert sorted(aside) == sorted([images[0], images[1], added[0]])


def test_s3_listing_diff_sees_overwritten_keys_by_size_and_etag(s3, s3_prefix):
    base = s3_prefix[len("s3://"):]
    s3.fs.pipe({f"{base}in/k{i}.jpg": b"x" * (10 + i) for i in range(4)})
    out = s3_prefix + "out"
    spec = InputSpec(input=s3_prefix + "in")
    plan = build_plan(spec, out, shard_size=2, progress=None)
    s3.fs.pipe({f"{base}in/k1.jpg": b"y" * 11,  # same size, new content: the ETag tells
                f"{base}in/k9.jpg": b"z"})
    s3.fs.rm(f"{base}in/k2.jpg")
    s3.fs.invalidate_cache()
    kept = plan_generation(plan, spec, relabel_changed=False, progress=None)
    assert (kept.new, kept.changed_kept, kept.deleted, kept.unchanged) == (1, 1, 1, 2)
    plan = load_plan(out)
    assert plan.generations[-1]["retired"] is False and plan.num_shards == 3
    assert read_plan_shard(plan.shard_url(2)) == [s3_prefix + "in/k9.jpg"]


def test_a_listing_killed_before_plan_json_leaves_nothing_that_counts(tmp_path):
    src = tmp_path / "in"
    write_images(src, 3)
    out = tmp_path / "out"
    spec = InputSpec(input=str(src))
    plan = build_plan(spec, str(out), shard_size=2, progress=None)
    # what a listing killed after writing its shards and retired list, before plan.json, leaves
    (out / "_plan" / "shard-000002.parquet").write_bytes((out / "_plan" / "shard-000000.parquet").read_bytes())
    (out / "_plan" / "retired-000001.parquet").write_bytes(b"stale")
    diff = plan_generation(load_plan(str(out)), spec, progress=None)
    assert (diff.new, diff.deleted, diff.unchanged, diff.generation) == (0, 0, 3, None)
    assert sorted(p.name for p in (out / "_plan").iterdir()) == ["plan.json", "shard-000000.parquet",
                                                                 "shard-000001.parquet"]
    assert load_plan(str(out)) == plan
