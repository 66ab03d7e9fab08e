"""Benchmark ms_deform_attn: our CUDA kernel vs the exact PyTorch (grid_sample) path.

Default shapes are the EBSeg-B pixel-decoder encoder: batch 8, levels 80x80, 40x40, 20x20,
8 heads x 32 channels (256), 4 points, every one of the 8400 tokens is a query.

    python bench/bench_ms_deform_attn.py                      # GPU: all dtypes, both paths
    python bench/bench_ms_deform_attn.py --batch 1 --iters 3  # CPU: PyTorch path only

Times are medians over --iters runs after --warmup runs (CUDA events on GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_ops import ms_deform_attn_pytorch  # noqa: E402
from cuda_ops.dispatch import BACKEND_ENV, DeformableAttentionKernel  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_inputs(batch, levels, heads, ch, points, dtype, device):
    """Random inputs at the given shapes (locations slightly beyond [0, 1], as in real models)."""
    ss = torch.tensor(levels, dtype=torch.int64, device=device)
    areas = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s = int(areas.sum())
    value = torch.randn(batch, s, heads, ch, device=device, dtype=dtype)
    loc = (torch.rand(batch, s, heads, len(levels), points, 2, device=device) * 1.1 - 0.05).to(dtype)
    attn = torch.rand(batch, s, heads, len(levels), points, device=device).softmax(-1).to(dtype)
    return value, ss, lsi, loc, attn


def timed(fn, warmup, iters, device):
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_path(impl, inputs, warmup, iters, device):
    """(forward ms, forward+backward ms, output) for one implementation."""
    value, ss, lsi, loc, attn = inputs
    with torch.no_grad():
        fwd = timed(lambda: impl(value, ss, lsi, loc, attn), warmup, iters, device)
        out = impl(value, ss, lsi, loc, attn)
    leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
    grad = torch.randn_like(out)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        impl(leaves[0], ss, lsi, leaves[1], leaves[2]).backward(grad)

    both = timed(fwd_bwd, warmup, iters, device)
    return fwd, both, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--levels", default="80x80,40x40,20x20", help="comma-separated HxW per level")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--channels", type=int, default=256, help="total channels (heads * C_head)")
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--dtypes", default=None, help="comma list of float32,float16,bfloat16")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    levels = [tuple(int(x) for x in lv.split("x")) for lv in args.levels.split(",")]
    dtypes = (args.dtypes or ("float32,float16,bfloat16" if on_gpu else "float32")).split(",")
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    iters = args.iters if args.iters is not None else (20 if on_gpu else 3)
    ch = args.channels // args.heads
    queries = sum(h * w for h, w in levels)

    print(f"ms_deform_attn benchmark on {torch.cuda.get_device_name(device) if on_gpu else 'CPU'} "
          f"(torch {torch.__version__})")
    print(f"batch {args.batch}, levels {levels}, {args.heads} heads x {ch} ch, {args.points} points, "
          f"{queries} queries; median of {iters} after {warmup} warm-up")
    if not on_gpu:
        print("No CUDA device: timing the PyTorch (grid_sample) path only; the kernel needs a GPU.")
    else:
        from cuda_ops import _build

        try:
            _build.build()
        except _build.BuildError as exc:
            print(f"CUDA kernel unavailable ({exc}); timing the PyTorch path only.")
            on_gpu = False
    os.environ.pop(BACKEND_ENV, None)

    header = f"{'dtype':9} {'path':8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd x':>7} {'fwd+bwd x':>10} {'max|diff|':>10}"
    print(header)
    print("-" * len(header))
    for name in dtypes:
        dtype = DTYPES[name]
        inputs = make_inputs(args.batch, levels, args.heads, ch, args.points, dtype, device)
        try:
            py_fwd, py_both, py_out = bench_path(ms_deform_attn_pytorch, inputs, warmup, iters, device)
        except RuntimeError as exc:  # e.g. a dtype grid_sample does not support on this device
            print(f"{name:9} {'pytorch':8} failed: {exc}")
            continue
        print(f"{name:9} {'pytorch':8} {py_fwd:9.3f} {py_both:11.3f} {1.0:7.2f} {1.0:10.2f} {'-':>10}")
        if on_gpu:
            k_fwd, k_both, k_out = bench_path(DeformableAttentionKernel.apply, inputs, warmup, iters, device)
            diff = (k_out.float() - py_out.float()).abs().max().item()
            print(f"{name:9} {'cuda':8} {k_fwd:9.3f} {k_both:11.3f} {py_fwd / k_fwd:7.2f} "
                  f"{py_both / k_both:10.2f} {diff:10.2e}")
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("x = speed-up over the PyTorch path (higher is better).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
