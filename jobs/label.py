"""Label a folder or bucket of images with EBSeg into Parquet pseudo-labels (Ray Data, resumable)."""

from __future__ import annotations

import argparse
import sys

from jobs.cli import add_model_arguments
from jobs.cli import non_negative_float as _non_negative_float
from jobs.cli import positive_int as _positive_int

EPILOG = """\
examples:
  # a bucket of photos, 4 GPU actors, the 150 ADE20K classes
  ebseg label --input s3://lake/photos/ --output s3://lake/labels/ade/ \\
      --vocabulary-preset ade150 --checkpoint s3://models/ebseg_b.pth --num-actors 4

  # your own classes; ',' separates classes, ';' adds synonyms of the class before it
  ebseg label --input ./photos --output ./labels --vocabulary "cat,dog;puppy,grass" \\
      --checkpoint ebseg_b.pth

  # a list of files instead of a prefix (Parquet/CSV column uri|url|path, or one URI per line)
  ebseg label --manifest s3://lake/todo.parquet --output s3://lake/labels/ --vocabulary-file classes.txt ...

  # on a Ray cluster
  ray job submit --working-dir . -- python -m jobs.label --input s3://... --output s3://... ...

resume: rerun the same command. Finished shards are skipped and only missing inputs are labeled;
the output then holds every input exactly once (errors included, as status="error" rows).
incremental: rerun the same command on a complete output: only inputs added since are labeled
(--relabel-changed: also overwritten ones); deleted inputs leave the current rows (_runs.json: history).
Output: <output>/labels-NNNNNN.parquet (schema: docs/label_schema.md), plus _plan/, _job.json and
_SUCCESS (a summary, written when every shard is done). Details: docs/labeling.md.
"""


_ALL_KINDS_TEXT = "read, empty, not_image, truncated, too_large, unsupported, decode, model, encode"
_ALL_KINDS = tuple(_ALL_KINDS_TEXT.split(", "))  # pipeline.schema.ERROR_KINDS; kept here so --help loads no pyarrow


def _error_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in _ALL_KINDS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"unknown error kind {', '.join(unknown) or repr(text)} "
                                         f"(kinds: {_ALL_KINDS_TEXT})")
    return kinds


def _resource(text: str) -> tuple[str, float]:
    name, sep, amount = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT, got {text!r}")
    return name, _non_negative_float(amount)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ebseg label` flags."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    src = parser.add_argument_group("input (one of)")
    src.add_argument("--input", metavar="URL", help="prefix or directory to label: s3://bucket/prefix/, gs://..., "
                     "/local/dir (recursive)")
    src.add_argument("--manifest", metavar="URL", help="file listing the inputs: Parquet/CSV (column uri, url or "
                     "path) or text (one URI per line)")
    src.add_argument("--extensions", default="jpg,jpeg,png,webp,gif,bmp,tif,tiff", metavar="LIST",
                     help="with --input: file extensions to take, comma separated, or 'any' (default: %(default)s)")
    src.add_argument("--glob", metavar="PATTERN", help="with --input: only paths (relative to the input) matching "
                     "this fnmatch pattern, e.g. '2024-*/*.jpg'")
    parser.add_argument("--output", required=True, metavar="URL",
                        help="where the label Parquet goes (local dir or any fsspec URL); reruns resume here")
    voc = parser.add_argument_group("vocabulary (one of)")
    voc.add_argument("--vocabulary", metavar="TEXT", help="class names: ',' between classes, ';' between "
                     "synonyms of one class, e.g. \"cat,dog;puppy,grass\"")
    voc.add_argument("--vocabulary-file", metavar="PATH",
                     help="one class per line, synonyms separated by ';' (the first is the prompt, "
                          "or name the prompt before '|': 'road, route|road;street')")
    voc.add_argument("--vocabulary-preset", metavar="NAME", help="a benchmark class set: coco171, ade150, ade847, "
                     "pc59, pc459, voc20")
    mod = parser.add_argument_group("model")
    add_model_arguments(mod, "run without a checkpoint (untrained model: labels are MEANINGLESS; for testing "
                             "the pipeline only)")
    run = parser.add_argument_group("resources")
    run.add_argument("--num-actors", type=_positive_int, metavar="N", help="model replicas (default: one per GPU "
                     "of the cluster, else 1)")
    run.add_argument("--num-gpus-per-actor", type=_non_negative_float, metavar="G", help="GPUs per replica, "
                     "fractions share a GPU (default: 1 when the cluster has GPUs, else 0)")
    run.add_argument("--num-cpus-per-actor", type=_non_negative_float, metavar="C", help="CPUs reserved per "
                     "replica (default: 1 with GPUs; on CPU-only clusters what leaves a CPU for reading)")
    run.add_argument("--actor-resource", type=_resource, action="append", default=[], metavar="NAME=AMOUNT",
                     help="custom Ray resource each replica needs (repeatable), e.g. to pin replicas to nodes")
    run.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                     help="images per model call (default: %(default)s)")
    run.add_argument("--shard-size", type=_positive_int, default=1000, metavar="N", help="inputs per output file "
                     "and unit of resume (default: %(default)s); fixed once the plan exists")
    run.add_argument("--max-pixels", type=_positive_int, default=100_000_000, metavar="N",
                     help="refuse images above N pixels as too_large (default: %(default)s)")
    run.add_argument("--max-bytes", type=_positive_int, default=256 * 1024 * 1024, metavar="N",
                     help="refuse files above N bytes as too_large (default: %(default)s)")
    run.add_argument("--read-retries", type=int, default=6, metavar="N",
                     help="retries of a transient storage error (503, SlowDown, timeout) per file "
                          "(default: %(default)s)")
    parser.add_argument("--retry-errors", type=_error_kinds, nargs="?", const=_ALL_KINDS, default=(),
                        metavar="KIND,...",
                        help="relabel the error rows of these kinds (all kinds when none is named) in an existing "
                             "output, e.g. 'read' after a storage outage; each input keeps exactly one row. "
                             f"Kinds: {_ALL_KINDS_TEXT}")
    run.add_argument("--relabel-changed", action="store_true",
                     help="on a rerun into an existing output, also relabel inputs whose content changed since "
                          "(S3: size or ETag; local: size or mtime); without it they are counted and keep their row")
    run.add_argument("--progress-interval", type=_non_negative_float, default=10.0, metavar="SECONDS",
                     help="seconds between progress lines, 0 for none (default: %(default)s)")
    run.add_argument("--progress-bars", action="store_true", help="also show Ray Data's per-operator progress "
                     "bars (many lines when the output is not a terminal)")
    run.add_argument("--no-progress-bars", action="store_true", help=argparse.SUPPRESS)  # the default now


def config_from_args(args: argparse.Namespace):
    """LabelConfig from parsed flags."""
    from pipeline.label import LabelConfig

    ext = (args.extensions or "").strip()
    extensions = None if ext.lower() in ("", "any", "*") else tuple(e for e in ext.split(",") if e.strip())
    return LabelConfig(
        output=args.output, input=args.input, manifest=args.manifest, extensions=extensions, glob=args.glob,
        vocabulary=args.vocabulary, vocabulary_file=args.vocabulary_file, vocabulary_preset=args.vocabulary_preset,
        preset=args.preset, checkpoint=args.checkpoint, best_checkpoint=args.best_checkpoint,
        random_weights=args.random_weights,
        num_actors=args.num_actors, num_gpus_per_actor=args.num_gpus_per_actor,
        num_cpus_per_actor=args.num_cpus_per_actor, actor_resources=dict(args.actor_resource),
        batch_size=args.batch_size, inference_size=args.inference_size,
        inference_max_size=args.inference_max_size, precision=args.precision, shard_size=args.shard_size,
        max_pixels=args.max_pixels,
        max_bytes=args.max_bytes, read_retries=args.read_retries, progress_interval_s=args.progress_interval,
        progress_bars=args.progress_bars, retry_errors=tuple(args.retry_errors),
        relabel_changed=args.relabel_changed,
    )


def run(args: argparse.Namespace) -> int:
    """Run a labeling job; 0 when every input has a row, 1 when incomplete (e.g. stopped by a storage
    fault: rerun), 2 on a user error."""
    from pipeline.label import LabelError, run_label

    try:
        summary = run_label(config_from_args(args))
    except LabelError as exc:
        print(f"ebseg label: error: {exc}", file=sys.stderr)
        return 2
    if summary.stopped:
        print(f"ebseg label: error: {summary.stopped}", file=sys.stderr)
    return 0 if summary.complete else 1


if __name__ == "__main__":
    from jobs.cli import module_main

    sys.exit(module_main(sys.modules[__name__]))
