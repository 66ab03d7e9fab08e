"""Grouping decoded images by padded model input before the model actors (issue #16, item 4).

On a lake of mixed image sizes EBSeg batches only images of equal padded size, so batches cut in
arrival order fall apart into small model calls. The read tasks group by padded size instead; these
tests check that the groups are what the model batches, that every input still comes out exactly
once, and that the labels do not change.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ebseg_core.data.synthetic import blob_image
from ebseg_core.model_spec import ModelSpec, padded_size
from pipeline.label import LabelConfig, run_label
from pipeline.label_read import SizeGrouping, read_shards
from pipeline.listing import InputSpec, build_plan

VOCAB = "red,green;lime,blue"
SIZES = [(32, 32), (40, 36), (32, 48), (30, 50), (48, 32), (60, 34)]  # three padded sizes at inference size 32
SPEC = ModelSpec("ebseg-tiny", None, inference_size=32, inference_max_size=64)


def mixed_lake(folder: Path, n: int, seed: int = 0) -> dict[str, tuple[int, int]]:
    """n PNGs of the SIZES in a shuffled order (so arrival order mixes them); uri -> (h, w)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        h, w = rng.choice(SIZES)
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(blob_image(h, w, seed=i, num_classes=3)[0]).save(path)
        out[str(path)] = (h, w)
    return out


def fewest_calls(sizes: list[tuple[int, int]], batch_size: int) -> int:
    """The fewest model calls that label these images: one per batch_size images of one padded size."""
    keys = Counter(padded_size(h, w, *SPEC.input_sizing()) for h, w in sizes)
    return sum(math.ceil(n / batch_size) for n in keys.values())


def test_read_tasks_yield_groups_of_one_padded_size(tmp_path):
    lake = mixed_lake(tmp_path / "in", 30)
    lake[str(tmp_path / "in" / "broken.png")] = None  # an error row travels in a group of its own
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    plan = build_plan(InputSpec(input=str(tmp_path / "in")), str(tmp_path / "out"), shard_size=100, progress=None)
    item = pa.table({"shard": [0], "plan_url": [plan.shard_url(0)], "only": pa.array([[]], pa.list_(pa.string()))})
    short, max_size, d = SPEC.input_sizing()
    grouping = SizeGrouping(batch_size=4, short=short, max_size=max_size, divisibility=d, max_held=16)
    tables = list(read_shards(item, chunk=5, grouping=grouping))
    uris = [u for t in tables for u in t.column("uri").to_pylist()]
    assert sorted(uris) == sorted(lake)  # every input exactly once
    full = 0
    for t in tables:
        keys = {grouping.key(r) for r in t.to_pylist()}
        assert len(keys) == 1 and 1 <= t.num_rows <= 4, (keys, t.num_rows)
        full += t.num_rows == 4
    good = [hw for hw in lake.values() if hw is not None]
    assert len(tables) == fewest_calls(good, 4) + 1  # + the error row's group
    assert full == sum(n // 4 for n in Counter(padded_size(h, w, short, max_size, d) for h, w in good).values())
    ungrouped = list(read_shards(item, chunk=5))
    assert sorted(u for t in ungrouped for u in t.column("uri").to_pylist()) == sorted(lake)


def test_held_images_are_bounded(tmp_path):
    """More distinct sizes than max_held allows: groups go out unfilled, never more than max_held wait."""
    grouping = SizeGrouping(batch_size=8, short=32, max_size=64, divisibility=32, max_held=3)
    from pipeline.label_read import _Buckets

    buckets = _Buckets(grouping)
    out = []
    for i, (h, w) in enumerate([(32, 32), (32, 48), (48, 32)] * 4):
        out += list(buckets.add((0, {"uri": f"u{i}", "pixels": b"x", "height": h, "width": w})))
        assert buckets.held <= 3
    out += list(buckets.flush())
    assert sorted(r["uri"] for g in out for _, r in g) == sorted(f"u{i}" for i in range(12))
    assert all(len({grouping.key(r) for _, r in g}) == 1 for g in out)


def _rows(output: str) -> dict[str, dict]:
    files = sorted(Path(output).glob("labels-*.parquet"))
    return {r["uri"]: r for f in files for r in pq.read_table(f).to_pylist()}


def test_grouped_job_makes_the_fewest_model_calls_and_the_same_labels(ray_local, tmp_path):
    lake = mixed_lake(tmp_path / "in", 24, seed=1)
    runs = {}
    for grouped in (True, False):
        out = str(tmp_path / f"out-{grouped}")
        cfg = LabelConfig(input=str(tmp_path / "in"), output=out, vocabulary=VOCAB, preset="ebseg-tiny",
                          random_weights=True, inference_size=32, inference_max_size=64, batch_size=4,
                          shard_size=12, progress_interval_s=0, group_by_size=grouped)
        summary = run_label(cfg, log=lambda _: None)
        assert summary.complete and summary.processed == len(lake) and summary.errors == {}
        runs[grouped] = (summary, _rows(out))
    (grouped, rows), (plain, plain_rows) = runs[True], runs[False]
    assert sorted(rows) == sorted(plain_rows) == sorted(lake)  # exactly once, both ways
    shards = [sorted(lake)[:12], sorted(lake)[12:]]  # the plan's shards: sorted URIs, 12 each
    assert grouped.model_calls == sum(fewest_calls([lake[u] for u in s], 4) for s in shards)
    assert plain.model_calls >= grouped.model_calls
    for uri, row in rows.items():
        assert row["status"] == "ok" and (row["height"], row["width"]) == lake[uri]
        assert row["label_png"] == plain_rows[uri]["label_png"], uri  # the same labels
