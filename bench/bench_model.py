"""EBSeg eval-forward benchmark: seconds/image, ours/official (same-process normaliser), FLOPs, RSS.

    python bench/bench_model.py                      # EBSeg-B, fp32, 2 threads
    python bench/bench_model.py --large              # EBSeg-L too
    python bench/bench_model.py --precisions fp32,bf16 --agreement
    python bench/bench_model.py --presets "" --precisions fp32,bf16,fp16 --agreement   # agreement only

Random weights (timing does not depend on them). Absolute times on a shared machine move from run to
run and from day to day, so the official comparison never uses a time from another run: the
normaliser, segment-anything's own `ImageEncoderViT` (ViT-B configuration, one 1024x1024 input), runs
alternately with our 640x640 forward in this process (min of --repeats each), and

    ours/official = (ours / normaliser) / OFFICIAL_OVER_NORMALISER

where OFFICIAL_OVER_NORMALISER = 0.852 is the official EBSeg-B 640x640 fp32 time over the same
normaliser, measured side by side beside the official code on this kind of machine (2 threads).

`--agreement` trains the tiny preset briefly on the synthetic blob corpus (ebseg_core/data/synthetic.py) and reports
the pixel agreement of each precision's label maps with fp32's (random weights give near-tied scores
that say little about a precision).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OFFICIAL_OVER_NORMALISER = 0.852  # official EBSeg-B 640x640 fp32, 2 threads / normaliser (side by side)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_gflops(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """Best rate of an n x n x n matmul: the machine's practical peak for this dtype."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm up
    best = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def normaliser(device: str) -> tuple[nn.Module, torch.Tensor]:
    """segment-anything's ViT-B image encoder (its own code, random weights) and one 1024x1024 input."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    enc = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                          out_chans=256, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                          use_rel_pos=True, window_size=14, global_attn_indexes=(2, 5, 8, 11)).to(device).eval()
    return enc, torch.randn(1, 3, 1024, 1024, device=device)


def forward_gflop(model, image: np.ndarray, vocab, dtype: torch.dtype | None) -> float:
    """FLOPs of one eval forward (matmuls, convolutions, attention) by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = model.prepare_image(image)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), torch.autocast(model.device.type, dtype=dtype or torch.float32,
                                                  enabled=dtype is not None):
        model.predict_masks([x], vocab)
    return counter.get_total_flops() / 1e9


def profile(run, title: str, rows: int = 25) -> None:
    """Top operators by self CPU time of one forward (what to optimise next)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(f"profile {title}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def build_random_model(preset: str, device: str):
    """The preset with random weights and class embeddings by name hash (``CLIPConfig.class_embeddings``):
    a random text tower takes minutes per vocabulary on 2 cores and gives no better classes."""
    import dataclasses

    from ebseg_core import build_model, preset_config

    cfg = preset_config(preset)
    cfg = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, class_embeddings="name-hash"))
    return build_model(cfg, device=device)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def bench_preset(preset: str, args, norm, rates: dict) -> None:
    from ebseg_core import Vocabulary
    from ebseg_core.model import autocast_dtype_for

    t0 = time.perf_counter()
    model = build_random_model(preset, args.device)
    print(f"\n== {preset} (random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"built in {time.perf_counter() - t0:.1f} s)")
    vocab = Vocabulary.preset(args.vocabulary)
    norm_model, norm_input = norm
    for precision in args.precisions:
        dtype = autocast_dtype_for(precision, args.device)
        for size in args.sizes:
            h, w = size
            image = random_image(h, w)
            run = functools.partial(model.segment, [image], vocab, batch_size=1, precision=precision)
            run()  # warm-up (allocator, lazy init)
            if args.profile:
                profile(run, f"{preset} {precision} {h}x{w}")
                break
            ours, norms = [], []
            for _ in range(args.repeats):
                ours.append(timed(run, args.device))
                if norm_model is not None and size == args.sizes[0]:
                    with torch.no_grad():
                        norms.append(timed(lambda: norm_model(norm_input), args.device))
            best = min(ours)
            gflop = forward_gflop(model, image, vocab, dtype)
            rate = gflop / best
            peak = rates[dtype or torch.float32]
            line = (f"{precision} {h}x{w}: {best:.3f} s/image (min of {len(ours)}: "
                    f"{', '.join(f'{t:.2f}' for t in ours)}); {gflop:.0f} GFLOP/image; {rate:.0f} GFLOP/s = "
                    f"{rate / peak:.0%} of the {precision} matmul rate")
            print(line)
            if norms:
                n = min(norms)
                ratio = best / n
                print(f"  normaliser (SAM ViT-B encoder, 1024x1024, fp32): {n:.3f} s (min of {len(norms)}: "
                      f"{', '.join(f'{t:.2f}' for t in norms)}); ours/normaliser {ratio:.3f}"
                      + (f"; ours/official {ratio / OFFICIAL_OVER_NORMALISER:.2f}" if preset == "ebseg-b" else ""))
    del model, run  # run (a bound segment) holds the model too
    gc.collect()


def train_tiny(steps: int, size: int, num_classes: int, seed: int = 0, device: str = "cpu"):
    """The tiny preset trained on blob images (each class one colour) until it labels them well."""
    from ebseg_core import Vocabulary, build_model, with_inference_settings
    from ebseg_core.criterion import TrainingLoss
    from ebseg_core.data.synthetic import blob_image

    torch.manual_seed(seed)
    model = build_model("ebseg-tiny", device=device)
    model.config = with_inference_settings(model.config, size=size, alpha=0.0, beta=0.0, gamma=0.0)
    vocab = Vocabulary.parse(",".join(f"class{i}" for i in range(num_classes))).with_seen([True] * num_classes)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=1e-4)
    loss_module = TrainingLoss(model, vocab)
    model.train()
    for step in range(steps):
        images, targets = [], []
        for k in range(2):
            rgb, label = blob_image(size, size, seed=seed * 100000 + step * 2 + k, num_classes=num_classes,
                                    ignore_boundary=False)
            classes = np.unique(label)
            images.append(torch.from_numpy(rgb).permute(2, 0, 1))
            targets.append({"labels": torch.from_numpy(classes.astype(np.int64)),
                            "masks": torch.from_numpy(np.stack([label == c for c in classes])).float()})
        losses = loss_module(torch.stack(images).float().to(device), targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, vocab


def precision_agreement(args) -> None:
    from ebseg_core.data.synthetic import blob_image

    t0 = time.perf_counter()
    model, vocab = train_tiny(args.train_steps, args.train_size, num_classes=4)
    images, labels = zip(*(blob_image(args.train_size, args.train_size, seed=10 ** 6 + i, num_classes=4,
                                      ignore_boundary=False) for i in range(args.eval_images)))
    ref = model.segment(list(images), vocab, batch_size=1, precision="fp32")
    acc = np.mean([float((r.label_map.numpy() == lab).mean()) for r, lab in zip(ref, labels)])
    print(f"\n== precision agreement: tiny preset trained {args.train_steps} steps on {args.train_size}px blob "
          f"images ({time.perf_counter() - t0:.0f} s); fp32 pixel accuracy on {len(images)} held-out images "
          f"{acc:.1%}")
    for precision in args.precisions:
        if precision == "fp32":
            continue
        out = model.segment(list(images), vocab, batch_size=1, precision=precision)
        same = np.mean([float((a.label_map == b.label_map).float().mean()) for a, b in zip(ref, out)])
        print(f"{precision} label maps agree with fp32 on {same:.2%} of pixels (target >= 99.5%)"
              f"{'' if same >= 0.995 else ' -- BELOW TARGET'}")
    resize_agreement(model, vocab, args)


def resize_agreement(model, vocab, args) -> None:
    """Label agreement of segment(resize="device") with the PIL-exact path, on images that need a
    downscale (1.6x the test size) or an upscale (0.75x), and the input difference on real photos."""
    from ebseg_core.data.synthetic import blob_image
    from ebseg_core.model import device_resize, pil_resize, resized_shape

    for factor in (1.6, 0.75):
        side = round(args.train_size * factor)
        images = [blob_image(side, round(side * 4 / 3), seed=2 * 10 ** 6 + i, num_classes=4, ignore_boundary=False)[0]
                  for i in range(args.eval_images)]
        pil = model.segment(images, vocab, batch_size=1, resize="pil")
        dev = model.segment(images, vocab, batch_size=1, resize="device")
        same = np.mean([float((a.label_map == b.label_map).float().mean()) for a, b in zip(pil, dev)])
        print(f"resize=device label maps agree with resize=pil on {same:.2%} of pixels "
              f"({len(images)} blob images {side}x{round(side * 4 / 3)} -> short side {args.train_size})")
    try:
        import skimage.data
    except ImportError:
        return
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = getattr(skimage.data, name)()
        size = resized_shape(*img.shape[:2], 640, 2560)
        diff = np.abs(pil_resize(img, size).astype(np.float32)
                      - device_resize(torch.from_numpy(img).permute(2, 0, 1), size).permute(1, 2, 0).numpy())
        print(f"device_resize vs PIL, skimage {name} {img.shape[0]}x{img.shape[1]} -> {size[0]}x{size[1]}: "
              f"max {diff.max():.0f} level, {(diff > 0).mean():.1%} of values differ")


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", action="store_true", help="also benchmark EBSeg-L")
    p.add_argument("--presets", default="ebseg-b",
                   help='comma-separated presets (default ebseg-b; "" with --agreement: agreement only)')
    p.add_argument("--sizes", default="640x640,640x854",
                   help="HxW images; the first alternates with the normaliser (default 640x640,640x854)")
    p.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16, fp16 (default fp32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocabulary", default="ade150", help="vocabulary preset for the text side")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-normaliser", dest="normaliser", action="store_false",
                   help="skip the segment-anything normaliser (no ours/official figure)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: profile one forward per preset/precision (first size), top ops")
    p.add_argument("--agreement", action="store_true",
                   help="train the tiny preset on blob images and report label agreement of each precision")
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--train-size", type=int, default=128)
    p.add_argument("--eval-images", type=int, default=8)
    args = p.parse_args()
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.precisions = [s.strip() for s in args.precisions.split(",")]
    presets = [s.strip() for s in args.presets.split(",") if s.strip()] + (["ebseg-l"] if args.large else [])
    torch.set_num_threads(args.threads)
    os.environ["EBSEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="ebseg-bench-")

    from ebseg_core.model import autocast_dtype_for

    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rates = {}
    for precision in dict.fromkeys(["fp32"] + args.precisions) if presets else ():
        dtype = autocast_dtype_for(precision, args.device) or torch.float32
        rates[dtype] = matmul_gflops(dtype, args.device)
        print(f"matmul 2048^3 {precision}: {rates[dtype]:.0f} GFLOP/s")
    norm = normaliser(args.device) if args.normaliser and presets else (None, None)
    for preset in presets:
        bench_preset(preset, args, norm, rates)
    if args.agreement:
        precision_agreement(args)
    print(f"\npeak RSS {peak_rss_gb():.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
