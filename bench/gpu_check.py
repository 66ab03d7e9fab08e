"""One GPU check: kernel, precision, throughput, MFU, CPU cost per image, memory; a table last.

    python bench/gpu_check.py              # on a machine with one H100/H200 (about 5-8 minutes)
    python bench/gpu_check.py --dry-run    # CPU, tiny preset, small inputs: checks the script itself

Needs torch, numpy, pillow and pyarrow only (no Ray, open_clip, segment-anything or network): the
text embeddings are random unit vectors (random weights: the text tower would give nothing better)
and the models have random weights, except the tiny model trained here for the precision agreement.

Steps: build `cuda_ops` (nvcc + ninja); CUDA kernel vs the float64 PyTorch path, forward and
backward, in fp32/fp16/bf16; EBSeg-B label agreement of bf16 and fp16 with fp32 (random weights, and a
tiny model trained on blob images); model-only images/s at batch 1/8/16 with and without
torch.compile, MFU = FLOP/s / the bf16 matmul rate; the CPU cost per image of decode (pipeline/images.py)
and row encoding (pipeline/schema.py); peak GPU memory.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_model import (  # noqa: E402
    build_random_model,
    forward_gflop,
    matmul_gflops,
    random_image,
    timed,
    train_tiny,
)


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []

    def add(self, check: str, result: str) -> None:
        self.rows.append((check, result))
        print(f"[{check}] {result}", flush=True)

    def print(self) -> None:
        width = max(len(c) for c, _ in self.rows)
        print("\n" + "=" * 78)
        for check, result in self.rows:
            print(f"{check:<{width}}  {result}")


def build_kernel(table: Table) -> bool:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cuda_ops.build", "--check"], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get(
                              "TORCH_CUDA_ARCH_LIST", "9.0")))
    ok = proc.returncode == 0
    table.add("cuda_ops build", f"{'OK' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s"
              + ("" if ok else ": " + (proc.stdout + proc.stderr).strip().splitlines()[-1][:120]))
    return ok


def msda_inputs(dtype: torch.dtype, device: str, seed: int = 0):
    """EBSeg-B-like deformable-attention inputs (3 levels, 8 heads, 32 channels, 4 points)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([(40, 54), (20, 27), (10, 14)], dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s = int(areas.sum())
    value = torch.randn(2, s, 8, 32, generator=g, dtype=torch.float64)
    loc = torch.rand(2, s, 8, 3, 4, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    attn = torch.rand(2, s, 8, 3, 4, generator=g, dtype=torch.float64).softmax(-1)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    return cast(value), shapes.to(device), starts.to(device), cast(loc), cast(attn)


def kernel_checks(table: Table, device: str) -> None:
    """Kernel vs the PyTorch path in float64 on the same rounded inputs: forward and all gradients."""
    from cuda_ops import dispatch, ms_deform_attn, ms_deform_attn_pytorch

    tolerance = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
    saved = os.environ.get(dispatch.BACKEND_ENV)
    os.environ[dispatch.BACKEND_ENV] = "cuda"
    try:
        for dtype, tol in tolerance.items():
            value, shapes, starts, loc, attn = msda_inputs(dtype, device)
            ref_in = [t.detach().double().requires_grad_(True) for t in (value, loc, attn)]
            ref = ms_deform_attn_pytorch(ref_in[0], shapes, starts, ref_in[1], ref_in[2])
            grad = torch.randn_like(ref)
            ref.backward(grad)
            ins = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
            out = ms_deform_attn(ins[0], shapes, starts, ins[1], ins[2])
            out.backward(grad.to(dtype))
            errs = [float((out.double() - ref).abs().max() / ref.abs().max())]
            errs += [float((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()) for a, b in zip(ins, ref_in)]
            ok = all(e <= tol for e in errs)
            table.add(f"kernel vs fallback {str(dtype)[6:]}",
                      f"{'OK' if ok else 'FAILED'}: max rel err fwd {errs[0]:.1e}, grads "
                      f"{', '.join(f'{e:.1e}' for e in errs[1:])} (tol {tol:g})")
    finally:
        if saved is None:
            os.environ.pop(dispatch.BACKEND_ENV, None)
        else:
            os.environ[dispatch.BACKEND_ENV] = saved


def agreement(table: Table, model, vocab, size: tuple[int, int], precisions: list[str], label: str) -> None:
    images = [random_image(*size, seed=s) for s in range(2)]
    ref = model.segment(images, vocab, batch_size=1, precision="fp32", return_scores=True)
    for precision in precisions:
        out = model.segment(images, vocab, batch_size=1, precision=precision, return_scores=True)
        same = np.mean([float((a.label_map == b.label_map).float().mean()) for a, b in zip(ref, out)])
        rel = np.mean([float((a.scores - b.scores).abs().mean() / a.scores.abs().mean()) for a, b in zip(ref, out)])
        table.add(f"{label} {precision} vs fp32", f"labels agree {same:.2%}, mean rel score diff {rel:.1e}")


def trained_agreement(table: Table, device: str, steps: int, size: int, precisions: list[str]) -> None:
    from ebseg_core.data.synthetic import blob_image

    t0 = time.perf_counter()
    model, vocab = train_tiny(steps, size, num_classes=4, device=device)
    images = [blob_image(size, size, seed=10 ** 6 + i, num_classes=4, ignore_boundary=False)[0] for i in range(8)]
    ref = model.segment(images, vocab, batch_size=4, precision="fp32")
    for precision in precisions:
        out = model.segment(images, vocab, batch_size=4, precision=precision)
        same = np.mean([float((a.label_map == b.label_map).float().mean()) for a, b in zip(ref, out)])
        table.add(f"trained tiny {precision} vs fp32", f"labels agree {same:.2%} ({steps} training steps, "
                  f"{time.perf_counter() - t0:.0f} s)")


def throughput(model, vocab, size: tuple[int, int], batch: int, precision: str, device: str,
               repeats: int) -> float:
    """Model-only images/s: predict_masks on a batch of already resized images on the device."""
    from ebseg_core.model import autocast_dtype_for

    dtype = autocast_dtype_for(precision, device)
    images = [model.prepare_image(random_image(*size, seed=k)).to(device) for k in range(batch)]

    def run() -> None:
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype or torch.float32,
                                             enabled=dtype is not None):
            model.predict_masks(images, vocab)

    run()
    run()  # warm-up (and compilation when compiled)
    return batch / min(timed(run, device) for _ in range(repeats))


def compile_model(model) -> None:
    """torch.compile the heavy submodules in place (parameter names unchanged)."""
    for module in (model.backbone, model.clip_visual_extractor, model.clip_rec_head,
                   model.sem_seg_head.pixel_decoder, model.sem_seg_head.predictor):
        module.compile()


def pipeline_cpu_cost(table: Table, size: tuple[int, int], names: list[str], repeats: int) -> None:
    """CPU seconds per image of what a labeling worker does besides the model: read the bytes,
    decode (pipeline/images.py) and encode the result row (pipeline/schema.py)."""
    import tempfile

    from PIL import Image

    from ebseg_core.data.synthetic import blob_image
    from pipeline.images import decode_image
    from pipeline.schema import make_ok_row

    rgb, label = blob_image(*size, seed=3, num_classes=min(len(names), 20), ignore_boundary=False)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
        f.write(buf.getvalue())
        f.flush()
        confidence = np.random.default_rng(0).random(label.shape, dtype=np.float32)
        costs = []
        for _ in range(repeats):
            t0 = time.process_time()
            data = Path(f.name).read_bytes()
            decode_image(data)
            make_ok_row(f.name, label.astype(np.int64), confidence, names)
            costs.append(time.process_time() - t0)
    best = min(costs)
    table.add(f"CPU read+decode+encode {size[0]}x{size[1]}",
              f"{best * 1000:.0f} ms CPU/image (one core: {1 / best:.0f} img/s)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, small inputs (checks the script)")
    p.add_argument("--preset", default=None, help="model preset (default ebseg-b; tiny for --dry-run)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,16)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile runs")
    args = p.parse_args()

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    preset = args.preset or ("ebseg-tiny" if dry else "ebseg-b")
    size = (128, 160) if dry else (640, 640)
    batches = [int(b) for b in (args.batches or ("1,2" if dry else "1,8,16")).split(",")]
    repeats = 1 if dry else 3
    precisions = ["bf16"] if dry else ["bf16", "fp16"]
    if dry:
        torch.set_num_threads(2)
    t_start = time.perf_counter()
    table = Table()
    name = torch.cuda.get_device_name() if not dry else "CPU (dry run)"
    table.add("device", f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")

    if not dry and build_kernel(table):
        kernel_checks(table, device)
    elif dry:
        table.add("cuda_ops build + kernel vs fallback", "skipped (no CUDA device)")

    from ebseg_core import Vocabulary, with_inference_settings

    model = build_random_model(preset, device)
    model.config = with_inference_settings(model.config, size=min(size), max_size=max(size))
    vocab = Vocabulary.preset("ade150")
    agreement(table, model, vocab, size, precisions, f"{preset} random weights")
    trained_agreement(table, device, 8 if dry else 300, 64 if dry else 128, precisions)

    peak = matmul_gflops(torch.bfloat16, device, n=256 if dry else 8192)  # bf16 without AMX: ~1 GFLOP/s
    table.add("bf16 matmul rate", f"{peak:.0f} GFLOP/s")
    gflop = forward_gflop(model, random_image(*size), vocab, torch.bfloat16)
    table.add(f"{preset} FLOP/image {size[0]}x{size[1]}", f"{gflop:.1f} GFLOP")
    for compiled in ([False, True] if args.compile and not dry else [False]):
        if compiled:
            t0 = time.perf_counter()
            compile_model(model)
        for batch in batches:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rate = throughput(model, vocab, size, batch, "bf16", device, repeats)
            mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if device == "cuda" else ""
            table.add(f"model-only bf16 batch {batch}{' compiled' if compiled else ''}",
                      f"{rate:.1f} img/s, MFU {rate * gflop / peak:.1%}{mem}")
        if compiled:
            table.add("torch.compile (incl. warm-up runs)", f"{time.perf_counter() - t0:.0f} s")
    rate = throughput(model, vocab, size, batches[-1], "fp32", device, repeats)
    table.add(f"model-only fp32 batch {batches[-1]}", f"{rate:.1f} img/s")
    pipeline_cpu_cost(table, (640, 854) if not dry else (96, 128), vocab.names, 3 if dry else 10)
    table.add("total", f"{time.perf_counter() - t_start:.0f} s")
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
