"""Incremental runs: time and peak memory of the listing diff (pipeline.listing.plan_generation) at N keys.

Why: a rerun into a grown output lists the lake again and merges it with the plan; that must stay
fast and flat in memory however many keys the lake holds. A manifest listing stands in for the lake
(no objects are written): N keys planned, then a listing with N/100 added and N/200 deleted keys,
in shuffled order (so both sides go through the external sort).

Prints, per N: seconds of the diff and the driver's peak RSS growth during it (a fresh process per N).

Usage:  python -m bench.bench_listing_diff --keys 100000 300000 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _manifest(path: Path, keys) -> None:
    with open(path, "w") as f:
        for k in keys:
            f.write(f"s3://lake/photos/{k:09d}.jpg\n")


def one(n: int) -> dict:
    from pipeline.listing import InputSpec, build_plan, plan_generation

    with tempfile.TemporaryDirectory() as d:
        m = Path(d) / "m.txt"
        _manifest(m, range(n))
        spec = InputSpec(manifest=str(m))
        plan = build_plan(spec, str(Path(d) / "out"), shard_size=10_000, progress=None)
        keys = list(range(n // 200, n + n // 100))
        _manifest(m, keys[1::2] + keys[::2])
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        diff = plan_generation(plan, spec, progress=None)
        seconds = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"keys": n, "seconds": seconds, "peak_rss_growth_mib": (rss1 - rss0) / 1024, "new": diff.new,
            "deleted": diff.deleted, "unchanged": diff.unchanged}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # run one size in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    for n in args.keys:
        out = subprocess.run([sys.executable, "-m", "bench.bench_listing_diff", "--one", str(n)], capture_output=True,
                             text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{n:>10,} keys: diff {r['seconds']:.1f} s ({n / r['seconds']:,.0f} keys/s), peak RSS growth "
              f"{r['peak_rss_growth_mib']:.0f} MiB; new {r['new']:,}, deleted {r['deleted']:,}")


if __name__ == "__main__":
    main()
