"""Train (or fine-tune) EBSeg on Ray Train from a YAML config; resumes from the run's latest checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """
examples:
  # on a Ray cluster (from your laptop):
  ray job submit --working-dir . -- python -m jobs.train --config configs/ebseg_b_coco171.yaml \\
      --set data.train=s3://my-bucket/datasets run.storage_path=s3://my-bucket/runs run.num_workers=8 run.use_gpu=true
  # locally, tiny model on a generated dataset:
  ebseg train --config configs/tiny_generic.yaml --set data.train=./my_dataset data.val=./my_val
  # fine-tune a run's weights on the confident labels of a lake, straight from the label Parquet:
  ebseg train --config configs/tiny_generic.yaml --set model.checkpoint=./runs/tiny-generic \\
      data.layout=labels data.train=s3://lake/labels/ 'data.labels={"min_pixel_confidence": 0.5}'
  # see the merged config without training:
  ebseg train --config configs/ebseg_l_coco171.yaml --print-config

Config sections: model, data, augment, criterion, solver, run (see docs/training.md).
Running the same run.name with the same run.storage_path again resumes from its latest checkpoint.
The run ends by printing the `ebseg label` command that uses its weights (--checkpoint <storage_path>/<name>).
Credentials are never put into the job's runtime env: see "Credentials" in docs/training.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config",
                        help="YAML training config (configs/*.yaml); defaults = the official EBSeg-B recipe")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config values, e.g. solver.max_iter=2000 run.num_workers=4 data.train=s3://b/d",
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config as JSON and exit")
    parser.add_argument("--result-json", default=None, help="also write the final metrics to this local JSON file")


def run(args: argparse.Namespace) -> int:
    from ebseg_core.checkpoint import WEIGHTS_FILE, CheckpointError
    from ebseg_core.train_data import DatasetError
    from ebseg_core.vocabulary import VocabularyError
    from pipeline.train import ConfigError, load_config, train

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"ebseg train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        result = train(cfg, address=args.address)
    except (ConfigError, DatasetError, VocabularyError) as e:
        print(f"ebseg train: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a failed Ray run: show the root cause, not a traceback
        cause = _root_cause(e)
        if isinstance(cause, CheckpointError):  # e.g. a train_state.pt that is not plain tensors and values
            print(f"ebseg train: error: {_first_line(cause)}", file=sys.stderr)
            return 2
        print(f"ebseg train: error: training failed: {type(cause).__name__}: {_first_line(cause)} "
              "(the workers' traceback is in the log above)", file=sys.stderr)
        return 1
    command = result.pop("label_command")
    summary = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    print("[train] done: " + json.dumps(summary, default=str))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({**summary, "loss_history": result.get("loss_history", [])}, f, default=str)
    print(f"[train] weights: {result['run_dir']} (its latest checkpoint's {WEIGHTS_FILE}); label with them:")
    print(f"  {command}")
    return 0


def _root_cause(e: BaseException) -> BaseException:
    """The first failed worker's exception (Ray Train's WorkerGroupError), then the end of its cause chain."""
    failures = getattr(e, "worker_failures", None)
    if failures:
        e = failures[min(failures)]
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__


if __name__ == "__main__":
    from jobs.cli import module_main

    sys.exit(module_main(sys.modules[__name__]))
