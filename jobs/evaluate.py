"""Evaluate EBSeg (or pseudo-labels) on the open-vocabulary benchmarks: mIoU per dataset, on Ray."""

from __future__ import annotations

import argparse
import sys

from jobs.cli import add_model_arguments
from jobs.cli import non_negative_float as _non_negative_float
from jobs.cli import positive_int as _positive_int

EPILOG = """\
datasets (prepared layouts under --root; see docs/evaluation.md and `ebseg prepare-data --help`):
  ade847 (A-847)  pc459 (PC-459)  ade150 (A-150)  pc59 (PC-59)  voc20 (VOC)  coco171 (COCO-Stuff val)
  generic (with --labels only): --root is a folder of images/, labels/ and class_names.txt
  detectron2 names work too: ade20k_sem_seg_val, pcontext_sem_seg_val, voc_sem_seg_val, ...

examples:
  # the official EBSeg-B weights on the five benchmarks of the paper, 4 GPU actors
  ebseg evaluate --dataset ade847,pc459,ade150,pc59,voc20 --root s3://data/datasets \\
      --checkpoint s3://models/EBSeg_base.pth --preset ebseg-b --num-actors 4 --out s3://runs/eval-b/

  # with the official test-time augmentation (6 scales x flip; ~12x slower)
  ebseg evaluate --dataset voc20 --root ./datasets --checkpoint EBSeg_base.pth --tta

  # check a prepared dataset and the evaluator: predicting the ground truth must give 100
  ebseg evaluate --dataset ade150 --root ./datasets --predictor ground-truth --limit 50

  # time an untrained tiny model (its mIoU means nothing)
  ebseg evaluate --dataset voc20 --root ./datasets --preset ebseg-tiny --random-weights --limit 20

  # score pseudo-labels written by `ebseg label --vocabulary-preset ade150` against ADE-150
  ebseg evaluate --labels s3://lake/labels/ade/ --dataset ade150 --root ./datasets --out ./eval-labels

  # score pseudo-labels against your own labeled images (the training layout: images/, labels/ and
  # class_names.txt, whose classes must be the labels' vocabulary); it also prints how right the label
  # pixels are at or above each confidence: what a fine-tune's min_pixel_confidence would keep
  ebseg evaluate --labels s3://lake/labels/ --dataset generic --root s3://lake/checked/

  # on a Ray cluster
  ray job submit --working-dir . -- python -m jobs.evaluate --dataset ade150 --root s3://... ...

output: the table (mIoU per dataset, as in the EBSeg README; each detail line also gives the mean of the
per-class Boundary IoU for datasets under 255 classes) and, with --out, results.json (all metrics,
per-class IoU/ACC/BoundaryIoU, detectron2 semantics, and the same under detectron2's own keys such as
"BoundaryIoU-<name>" and "min(IoU, B-Iou)-<name>"), summary.csv and per_class_<dataset>.csv.
exit status: 0 all images scored, 1 some images failed (listed), 2 usage error.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ebseg evaluate` flags."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, metavar="NAME[,NAME...]",
                      help="benchmarks to evaluate, comma-separated (see the list below)")
    data.add_argument("--root", required=True, metavar="URL",
                      help="datasets root holding the prepared layouts (local folder or s3://bucket/prefix)")
    data.add_argument("--limit", type=_positive_int, metavar="N",
                      help="only the first N images of each dataset (sorted by name): quick checks")
    data.add_argument("--class-names", metavar="FILE", dest="class_names_file",
                      help="replace the benchmark's class list (one dataset only): one class per line, "
                           "synonyms separated by ';', or the official 'id:name,synonym,...' format")
    data.add_argument("--labels", metavar="URL",
                      help="evaluate this label Parquet (from `ebseg label`) instead of running a model; "
                           "rows are matched to ground truth by image file name")
    mod = parser.add_argument_group("model")
    add_model_arguments(mod, "no checkpoint: untrained model, for timing and smoke tests only")
    mod.add_argument("--predictor", choices=["model", "ground-truth"], default="model",
                     help="'ground-truth' predicts each label itself (a check of data and evaluator: "
                          "must give 100); default: %(default)s")
    mod.add_argument("--tta", action="store_true",
                     help="official test-time augmentation: short side 320..1120 in 6 scales, each also "
                          "flipped, class scores averaged (about 12x the compute)")
    run_ = parser.add_argument_group("resources")
    run_.add_argument("--num-actors", type=_positive_int, metavar="N",
                      help="model replicas (default: one per GPU, else 1)")
    run_.add_argument("--num-gpus-per-actor", type=_non_negative_float, metavar="G",
                      help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    run_.add_argument("--num-cpus-per-actor", type=_non_negative_float, metavar="C",
                      help="CPUs reserved per actor (default: 1 with GPUs, else a share of the CPUs)")
    run_.add_argument("--batch-size", type=_positive_int, default=4, metavar="B",
                      help="images per model call (default: %(default)s)")
    run_.add_argument("--torch-threads", type=int, default=0, metavar="T",
                      help="torch CPU threads per actor (default: every core for a single CPU actor, "
                           "else its CPU share)")
    parser.add_argument("--out", metavar="DIR_OR_URL",
                        help="write results.json, summary.csv and per_class_<dataset>.csv here")


def run(args: argparse.Namespace) -> int:
    """Run an evaluation; 0 when every image was scored, 1 when some failed, 2 on a user error."""
    from pipeline.evaluate import EvalConfig, EvaluateError, evaluate_labels, run_evaluation

    datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
    try:
        if args.labels:
            if len(datasets) != 1:
                raise EvaluateError("--labels scores one dataset: give a single --dataset")
            if args.checkpoint or args.random_weights or args.tta:
                raise EvaluateError("--labels evaluates existing labels: drop --checkpoint/--random-weights/--tta")
            report = evaluate_labels(args.labels, datasets[0], args.root, out=args.out,
                                     class_names_file=args.class_names_file)
        elif "generic" in datasets:
            raise EvaluateError("--dataset generic scores existing labels: give --labels URL (the model path "
                                "evaluates the benchmarks listed below)")
        else:
            cfg = EvalConfig(
                datasets=datasets, root=args.root, preset=args.preset, checkpoint=args.checkpoint,
                random_weights=args.random_weights, best_checkpoint=args.best_checkpoint, num_actors=args.num_actors,
                num_gpus_per_actor=args.num_gpus_per_actor, num_cpus_per_actor=args.num_cpus_per_actor,
                batch_size=args.batch_size, tta=args.tta, out=args.out, limit=args.limit,
                inference_size=args.inference_size, inference_max_size=args.inference_max_size,
                precision=args.precision, class_names_file=args.class_names_file, predictor=args.predictor,
                torch_threads=args.torch_threads,
            )
            report = run_evaluation(cfg)
    except EvaluateError as exc:
        print(f"ebseg evaluate: error: {exc}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    from jobs.cli import module_main

    sys.exit(module_main(sys.modules[__name__]))
