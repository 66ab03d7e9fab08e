"""Labeling throughput: the whole Ray Data job vs the model alone, and driver/cluster memory at N vs 10N images.

Why: the pipeline is worth its complexity only if it keeps the model busy (goal: job throughput
>= 90% of model-only throughput on the same machine and model) and if memory does not grow with
the number of inputs (goal: flat peak memory from N to 10N).

What is measured:
- model-only: one process, the model built once, ``model.segment`` over decoded images in batches
  (warm-up batch excluded): images/s.
- job: ``run_label`` on a local directory of the same images (Ray started and warmed by a first run),
  on N and on 10N inputs. Every job pays a fixed cost (listing, its model actor's start and model
  load, compaction), so the job's steady rate is the marginal one, 9N / (wall(10N) - wall(N)); that
  is what is compared with model-only.
- memory: peak RSS of the driver and peak summed RSS of Ray worker processes during a job of N and
  of 10N images.

- ``--mixed-sizes``: a lake of several aspect ratios in shuffled order, labeled with and without
  grouping by padded size before the actors (``LabelConfig.group_by_size``), side by side: model
  calls, mean images per call (against the fewest calls possible) and images/s.

Usage:  python -m bench.bench_label --preset ebseg-tiny --random-weights --images 32 --size 256 --inference-size 256
        python -m bench.bench_label --mixed-sizes --preset ebseg-tiny --random-weights --images 96 --size 64 \\
            --inference-size 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

import numpy as np
from PIL import Image

# Aspect ratios (h, w) of the mixed lake: landscape 4:3 and 16:9, portrait 3:4, square.
MIXED_ASPECTS = [(3, 4), (9, 16), (4, 3), (1, 1)]


def write_images(root: str, n: int, size: int, seed: int = 0, mixed: bool = False) -> list[str]:
    """n JPEGs with smooth random content: size x (size * 4/3), or with ``mixed`` the MIXED_ASPECTS at
    short side ``size`` in a shuffled order."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        ah, aw = MIXED_ASPECTS[rng.integers(len(MIXED_ASPECTS))] if mixed else (3, 4)
        h, w = (size, size * aw // ah) if ah <= aw else (size * ah // aw, size)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(0.01, 0.05, 3)
        img = np.stack([127 + 120 * np.sin(f[c] * (x + y * (c + 1)) + i) for c in range(3)], axis=2)
        path = os.path.join(root, f"img_{i:06d}.jpg")
        Image.fromarray(img.astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def model_only(args, paths: list[str]) -> float:
    """images/s of model.segment alone (decode excluded), warm."""
    import torch

    from ebseg_core import Vocabulary
    from ebseg_core.model_spec import ModelSpec

    spec = ModelSpec.from_options(checkpoint=args.checkpoint, random_weights=args.checkpoint is None,
                                  preset=args.preset, batch_size=args.batch_size, inference_size=args.inference_size)
    model = spec.with_threads(args.threads).build(device="cpu")
    vocab = Vocabulary.parse(args.vocabulary)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    with torch.inference_mode():
        model.segment(images[: args.batch_size], vocab, batch_size=args.batch_size)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(images), args.batch_size):
            model.segment(images[i: i + args.batch_size], vocab, batch_size=args.batch_size)
        return len(images) / (time.perf_counter() - t0)


class PeakRSS:
    """Samples RSS of this process and of Ray workers (processes whose name starts with 'ray::')."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.driver = 0
        self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.driver = max(self.driver, self._rss(me))
            total = 0
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        with open(f"/proc/{entry}/cmdline", "rb") as f:
                            cmd = f.read(64)
                    except OSError:
                        continue
                    if cmd.startswith(b"ray::"):
                        total += self._rss(int(entry))
            self.workers = max(self.workers, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def job(args, input_dir: str, output: str, group_by_size: bool = True):
    from pipeline.label import LabelConfig, run_label

    cfg = LabelConfig(input=input_dir, output=output, vocabulary=args.vocabulary, preset=args.preset,
                      checkpoint=args.checkpoint, random_weights=args.checkpoint is None,
                      inference_size=args.inference_size, batch_size=args.batch_size, shard_size=args.shard_size,
                      num_actors=args.num_actors, num_cpus_per_actor=args.num_cpus_per_actor, progress_bars=False,
                      progress_interval_s=30.0, group_by_size=group_by_size)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        summary = run_label(cfg, log=lambda s: None)
        wall = time.perf_counter() - t0
    return summary, wall, mem


def fewest_calls(args, paths: list[str]) -> int:
    """The fewest model calls that label the lake: per plan shard (sorted paths), one call per
    batch_size images of one padded size."""
    from collections import Counter

    from ebseg_core.model_spec import ModelSpec, padded_size

    spec = ModelSpec.from_options(checkpoint=args.checkpoint, random_weights=args.checkpoint is None,
                                  preset=args.preset, inference_size=args.inference_size)
    ordered = sorted(paths)
    calls = 0
    for start in range(0, len(ordered), args.shard_size):
        keys = Counter()
        for p in ordered[start:start + args.shard_size]:
            with Image.open(p) as im:
                keys[padded_size(im.height, im.width, *spec.input_sizing())] += 1
        calls += sum(-(-n // args.batch_size) for n in keys.values())
    return calls


def mixed_sizes(args, work: str) -> None:
    """The mixed-size lake labeled with and without grouping by padded size, side by side."""
    lake = os.path.join(work, "mixed")
    paths = write_images(lake, args.images, args.size, mixed=True)
    job(args, lake, os.path.join(work, "out_warm"))  # Ray workers started once, not counted
    rows = []
    for rep in range(2):  # alternate, so that a machine busy at one moment does not favour one side
        for grouped in (False, True):
            summary, wall, _ = job(args, lake, os.path.join(work, f"out_{grouped}_{rep}"), group_by_size=grouped)
            rows.append((grouped, summary, wall))
    best = fewest_calls(args, paths)
    print(f"mixed lake: {len(paths)} images, aspects {MIXED_ASPECTS} at short side {args.size}, model {args.preset}, "
          f"batch {args.batch_size}, inference size {args.inference_size or 'preset'}, shard size {args.shard_size}")
    print(f"fewest model calls possible: {best} ({len(paths) / best:.2f} images per call)")
    rate = {}
    for grouped, summary, wall in rows:
        name = "grouped by size" if grouped else "arrival order"
        rate.setdefault(grouped, []).append(summary.processed / wall)
        print(f"{name:<16} model calls {summary.model_calls:4d}, {summary.processed / summary.model_calls:5.2f} "
              f"images per call, {summary.processed / wall:7.2f} images/s (wall {wall:.1f} s)")
    ratio = max(rate[True]) / max(rate[False])
    print(f"images/s grouped / arrival order (best of 2 each): {ratio:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ebseg-tiny")
    p.add_argument("--checkpoint")
    p.add_argument("--random-weights", action="store_true", help="required when no --checkpoint")
    p.add_argument("--vocabulary", default="sky,tree,road,building,person")
    p.add_argument("--images", type=int, default=32, help="N (the job also runs on 10N)")
    p.add_argument("--size", type=int, default=256, help="image height in pixels (width = 4/3 of it)")
    p.add_argument("--inference-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--num-cpus-per-actor", type=float, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads for the model-only run (0: default)")
    p.add_argument("--mixed-sizes", action="store_true", help="compare grouping by padded size on a mixed lake")
    args = p.parse_args(argv)
    if args.checkpoint is None and not args.random_weights:
        p.error("give --checkpoint or --random-weights")
    import ray

    work = tempfile.mkdtemp(prefix="bench_label_")
    try:
        ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 2)), include_dashboard=False,
                 log_to_driver=False)
        if args.mixed_sizes:
            mixed_sizes(args, work)
            return 0
        n = args.images
        small = os.path.join(work, "in_n")
        paths = write_images(small, n, args.size)
        # Warm run: Ray workers started once, not counted (each job still starts its own model actor).
        job(args, small, os.path.join(work, "out_warm"))
        summary, wall, mem_n = job(args, small, os.path.join(work, "out_n"))
        big = os.path.join(work, "in_10n")
        os.makedirs(big, exist_ok=True)
        for k in range(10):  # 10N inputs: the same images under 10 names each
            for path in paths:
                os.link(path, os.path.join(big, f"c{k}_" + os.path.basename(path)))
        summary10, wall10, mem_10n = job(args, big, os.path.join(work, "out_10n"))
        model_ips = model_only(args, paths)
        # The fixed cost of a job (listing, actor start, model load, compaction) cancels in the difference.
        marginal_ips = (summary10.processed - summary.processed) / max(wall10 - wall, 1e-9)
        print(f"images: {n} of {args.size}x{args.size * 4 // 3}, model {args.preset}, batch {args.batch_size}, "
              f"inference size {args.inference_size or 'preset'}, shard size {args.shard_size}")
        rows = [("model only", model_ips, ""),
                (f"job, N={n}", summary.processed / wall, f"wall {wall:.1f} s"),
                (f"job, 10N={10 * n}", summary10.processed / wall10, f"wall {wall10:.1f} s"),
                ("job, marginal", marginal_ips, "9N / (wall 10N - wall N): start-up cancelled")]
        for label, ips, note in rows:
            print(f"{label:<18} {ips:8.2f} images/s  {note}")
        print(f"ratio marginal / model only: {100 * marginal_ips / model_ips:.1f} %  (goal >= 90 %)")
        print(f"peak RSS N={n}:   driver {mem_n.driver / 2**20:6.0f} MiB, ray workers {mem_n.workers / 2**20:6.0f} MiB")
        print(f"peak RSS 10N={10 * n}: driver {mem_10n.driver / 2**20:6.0f} MiB, "
              f"ray workers {mem_10n.workers / 2**20:6.0f} MiB")
        print(f"growth N -> 10N: driver {(mem_10n.driver - mem_n.driver) / 2**20:+.0f} MiB, "
              f"workers {(mem_10n.workers - mem_n.workers) / 2**20:+.0f} MiB (goal: flat)")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
