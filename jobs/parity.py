"""Check this model against the official EBSeg's numerical parity fixture (every tensor, every loss)."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
example:
  ebseg parity ../shared/reference/parity_tiny_b

Builds the model from the fixture's config.json, loads the official-key weights strictly, runs the
fixture's inputs and compares every recorded intermediate tensor and training loss. Prints one line
per tensor; exit status 0 when all are within tolerance, 1 on a mismatch, 2 when the folder is not a
fixture.
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
