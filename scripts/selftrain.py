"""Self-training, measured on the blob world (pipeline/selftrain.py): one round per seed, then the
held-out mIoU before and after, its gain, and the run-to-run spread across seeds; with --control also the
same fine-tune on the labelled images alone, which separates what the pseudo-labels add from what the
extra iterations add.

    .venv/bin/python scripts/selftrain.py --workdir out/selftrain --seeds 0 1 2 --control
    # the former recipe (every lake image, a pixel threshold, the base learning rate, no truth mixed in):
    .venv/bin/python scripts/selftrain.py --base-iters 150 --finetune-iters 60 --finetune-lr 2e-3 \
        --most-confident 1 --min-pixel-confidence 0.3 --no-mix-labelled
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    from pipeline.selftrain import SelfTrainConfig, run_selftrain

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="out/selftrain", help="a new or empty folder per seed goes under it")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base-iters", type=int, default=SelfTrainConfig.base_iters)
    p.add_argument("--finetune-iters", type=int, default=SelfTrainConfig.finetune_iters)
    p.add_argument("--finetune-lr", type=float, default=SelfTrainConfig.finetune_lr)
    p.add_argument("--most-confident", type=float, default=SelfTrainConfig.most_confident,
                   help="fraction of the fine-tune rows kept, the most confident images (1: all)")
    p.add_argument("--min-pixel-confidence", type=float, default=SelfTrainConfig.min_pixel_confidence)
    p.add_argument("--no-mix-labelled", action="store_true", help="fine-tune on the lake's labels alone")
    p.add_argument("--control", action="store_true", help="also fine-tune on the labelled images alone")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    for seed in args.seeds:
        work = os.path.join(args.workdir, f"seed{seed}")
        if os.path.exists(work) and os.listdir(work):
            print(f"selftrain: error: {work} is not empty; give a new --workdir", file=sys.stderr)
            return 2

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    results = []
    for seed in args.seeds:
        cfg = SelfTrainConfig(os.path.join(args.workdir, f"seed{seed}"), seed=seed, base_iters=args.base_iters,
                              finetune_iters=args.finetune_iters, finetune_lr=args.finetune_lr,
                              most_confident=None if args.most_confident >= 1 else args.most_confident,
                              min_pixel_confidence=args.min_pixel_confidence, mix_labelled=not args.no_mix_labelled,
                              control=args.control)
        results.append(run_selftrain(cfg))
    print("\nseed  held-out mIoU before  after   gain  control  after-control  (pseudo-labels' mIoU, rows kept)")
    for seed, r in zip(args.seeds, results):
        ctrl = f"{r.miou_control:7.1f}  {r.gain_over_control:+13.1f}" if r.miou_control is not None else " " * 22
        print(f"{seed:>4}  {r.miou_before:20.1f}  {r.miou_after:5.1f}  {r.gain:+5.1f}  {ctrl}  "
              f"({r.lake_miou_before:.1f}, {r.selected})")
    if len(results) > 1:
        gains = [r.gain for r in results]
        print(f"gain mean {statistics.mean(gains):+.1f} (min {min(gains):+.1f}, sd {statistics.stdev(gains):.1f})")
        if args.control:
            over = [r.gain_over_control for r in results]
            print(f"over the control: mean {statistics.mean(over):+.1f} (min {min(over):+.1f}, "
                  f"sd {statistics.stdev(over):.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"seed": s, **r.__dict__, "gain": r.gain, "gain_over_control": r.gain_over_control}
                       for s, r in zip(args.seeds, results)], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
