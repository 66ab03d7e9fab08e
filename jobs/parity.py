"""Check this model against the official EBSeg's numerical parity fixture (every tensor, every loss)."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
example:
  ebseg parity ../shared/reference/parity_tiny_b

Builds the model from the fixture's config.json, loads the official-key weights strictly, runs the
fixture's eval images (inputs.safetensors eval.image0..) at the output sizes its config.json lists
(inputs.eval_output_hw...), alone where it has bs1.img<b>.* tensors, and the training losses where it
has train_outputs.safetensors, and compares every tensor the fixture recorded. Prints one line per
tensor and per hard-threshold decision ("decision: ..."): where our decision differs from the
reference's only within --flip-margin of the threshold, the line and the tensors downstream of it
read "threshold flip: N elements within ... of the threshold" instead of failing.
Exit status 0 when all pass, 1 on a mismatch, 2 when the folder is not a usable fixture.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ebseg_core import parity

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parity.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ebseg_core import parity

    return parity.run_args(args, prog="ebseg parity")


if __name__ == "__main__":
    from jobs.cli import module_main

    sys.exit(module_main(sys.modules[__name__]))
