"""EBSeg eval-forward benchmark on CPU (or GPU): seconds per image, peak memory, text-embedding cost.

    python bench/bench_model.py [--preset ebseg-b] [--size 640] [--threads 2] [--repeats 3]

Random weights (no checkpoint is downloadable here); one 640x640 image at a time, as the official
evaluation runs, ADE-150 vocabulary. Prints the figures; compare with the official implementation's
17.6 s/image and 4.4 GB peak RSS measured on this 2-core machine (from the issue).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ebseg-b")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocabulary", default="ade150", help="vocabulary preset for the text side")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["EBSEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="ebseg-bench-")  # cold text cache

    from ebseg_core import Vocabulary, build_model

    t0 = time.perf_counter()
    model = build_model(args.preset, device=args.device)
    print(f"build {args.preset} (random weights): {time.perf_counter() - t0:.1f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    vocab = Vocabulary.preset(args.vocabulary)
    t0 = time.perf_counter()
    model.class_text_embeddings(vocab)
    cold = time.perf_counter() - t0
    model.weights_changed()  # drop the in-memory cache: the next call reads the on-disk cache
    t0 = time.perf_counter()
    model.class_text_embeddings(vocab)
    warm = time.perf_counter() - t0
    print(f"text embeddings {len(vocab)} classes x {len(model.config.templates)} templates: "
          f"first {cold:.1f} s, cached on disk {warm * 1000:.0f} ms")

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(args.size, args.size, 3), dtype=np.uint8)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model.segment([image], vocab, batch_size=1)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"eval forward {args.size}x{args.size}, {args.threads} threads: {best:.2f} s/image (min of {args.repeats}; "
          f"all {', '.join(f'{t:.2f}' for t in times)})")
    print(f"peak RSS {peak_rss_gb():.2f} GB")
    print(f"vs official (17.6 s/image, 4.4 GB, 146 s first text encoding): time ratio {best / 17.6:.2f}, "
          f"memory ratio {peak_rss_gb() / 4.4:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
