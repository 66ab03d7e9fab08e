"""Segment a few local images with EBSeg: a label PNG and a coloured overlay with a legend per image."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jobs.cli import UsageError, add_model_arguments, positive_int

EPILOG = """\
examples:
  ebseg segment photo.jpg street.png --vocabulary "sky,tree;trees,road,car;cars" \\
      --checkpoint EBSeg_base.pth --out results/
  ebseg segment *.jpg --vocabulary-preset ade150 --preset ebseg-l --checkpoint EBSeg_large.pth --out ade/
  # the result of `ebseg train` (its run directory: the latest checkpoint; preset and training classes
  # come from the checkpoint's metadata)
  ebseg segment photo.jpg --vocabulary "wall,sky,tree" --checkpoint runs/tiny-generic --out results/

For each IMAGE it writes <out>/<name>.label.png (class index per pixel, 8-bit, or 16-bit above 256
classes), <out>/<name>.overlay.png (colours + legend) and <out>/classes.json (index -> names).
For folders or buckets of images use `ebseg label` (Ray, resumable, Parquet).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    voc = parser.add_argument_group("vocabulary (one of)")
    voc.add_argument("--vocabulary", metavar="TEXT",
                     help="class names: ',' between classes, ';' between synonyms, e.g. \"cat,dog;puppy,grass\"")
    voc.add_argument("--vocabulary-file", metavar="PATH",
                     help="one class per line, synonyms separated by ';' (the first is the prompt, "
                          "or name the prompt before '|': 'road, route|road;street')")
    voc.add_argument("--vocabulary-preset", metavar="NAME", help="coco171, ade150, ade847, pc59, pc459 or voc20")
    mod = parser.add_argument_group("model")
    add_model_arguments(mod, "run an untrained model, the same on every run (labels are MEANINGLESS; for trying "
                             "the tool only)")
    mod.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda if available)")
    parser.add_argument("--batch-size", type=positive_int, default=2, metavar="B",
                        help="images per model call (default: %(default)s)")


def _decode(path: str):
    """The labeling job's decoder (EXIF rotation, alpha on white, 16-bit scaling), so `segment` and
    `label` see the same pixels of the same file."""
    from pipeline.images import DecodeError, decode_image

    try:
        return decode_image(Path(path).read_bytes())
    except DecodeError as e:
        raise UsageError(f"cannot read image {path}: {e.message}") from None
    except OSError as e:
        raise UsageError(f"cannot read image {path}: {e.strerror or e}") from None


def _check_device(device: str) -> None:
    """One line saying what was asked and what the machine has, instead of torch's driver traceback."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device}: {e}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise UsageError(f"--device {device} asks for a CUDA GPU, but this machine has none (torch sees 0 CUDA "
                             f"devices; torch built for CUDA {torch.version.cuda or '(none: a CPU-only build)'}); "
                             "use --device cpu or leave --device out")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {device} asks for CUDA device {dev.index}, but this machine has {n} "
                             f"(cuda:0 to cuda:{n - 1})")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ebseg_core.model_spec import ModelSpec
    from ebseg_core.vocabulary import Vocabulary

    vocab = Vocabulary.from_options(text=args.vocabulary, file=args.vocabulary_file, preset=args.vocabulary_preset)
    spec = ModelSpec.from_options(
        checkpoint=args.checkpoint, random_weights=args.random_weights, preset=args.preset,
        best_checkpoint=args.best_checkpoint, inference_size=args.inference_size,
        inference_max_size=args.inference_max_size, precision=args.precision, batch_size=args.batch_size)
    if args.device:
        _check_device(args.device)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise UsageError(f"image not found: {', '.join(missing)}")
    images = [_decode(p) for p in args.images]
    vocab = spec.vocabulary_for(vocab)
    if spec.checkpoint is not None:
        print(f"checkpoint: {spec.checkpoint.describe()}", file=sys.stderr)
    else:  # the same untrained model on every run (as `ebseg label --random-weights`)
        print("WARNING: --random-weights: the model is UNTRAINED, the labels below are MEANINGLESS.", file=sys.stderr)
    model = spec.build(device=args.device)
    from pipeline.overlay import overlay
    from pipeline.schema import encode_label_png

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = model.segment(images, vocab, batch_size=spec.batch_size, precision=spec.precision)
    for path, img, res in zip(args.images, images, results):
        stem = Path(path).stem
        label = res.label_map.numpy()
        (out / f"{stem}.label.png").write_bytes(encode_label_png(label, num_classes=len(vocab)))
        overlay(img, label, vocab.names).save(out / f"{stem}.overlay.png")
        present = np.unique(label)
        print(f"{path}: {img.shape[1]}x{img.shape[0]}, classes: "
              + ", ".join(f"{vocab.names[c]} {100 * float((label == c).mean()):.1f}%" for c in present))
    (out / "classes.json").write_text(json.dumps({"names": vocab.names, "synonyms": vocab.synonyms,
                                                 "vocabulary_id": vocab.id, "model_id": model.model_id}, indent=1))
    print(f"{len(images)} image(s) in {time.perf_counter() - start:.1f} s -> {out}/")
    return 0


if __name__ == "__main__":
    from jobs.cli import module_main

    sys.exit(module_main(sys.modules[__name__]))
