"""The ``ebseg`` command: one subcommand per module of ``jobs/``.

Each subcommand module ``jobs/<name>.py`` exposes ``add_arguments(parser)``, ``run(args) -> int`` and
a one-line docstring (the help text). The commands are a fixed list; a module is imported only when its
command runs (``--help`` reads the docstrings with ``ast``), so ``ebseg --help`` is fast and does not load
torch or Ray. ``python -m jobs.<name>`` behaves exactly like ``ebseg <name>`` through :func:`module_main`.

User mistakes (``ebseg_core.errors.UserError``, e.g. ``UsageError``, and ``FileNotFoundError`` raised
while a command runs) print ``ebseg <command>: error: <message>`` and exit with status 2, without a traceback. Set
``EBSEG_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from ebseg_core.errors import UserError

# Subcommands, in the order `ebseg --help` lists them (the order of a typical workflow).
SUBCOMMANDS: tuple[str, ...] = (
    "doctor",
    "segment",
    "label",
    "curate",
    "prepare_data",
    "train",
    "evaluate",
    "parity",
)

EPILOG = """\
typical flow:
  ebseg doctor                          check the installation (versions, CUDA, kernel, cluster)
  ebseg segment --help                  try the model on a few local images
  ebseg label --input s3://bucket/images/ --output s3://bucket/labels/ --vocabulary "cat,dog;puppy,grass" \\
      --checkpoint EBSeg_base.pth       pseudo-label a bucket of images into Parquet with Ray Data
  ebseg curate --help                   query, export and report the labels

Run `ebseg <command> --help` for a command's options. Every command also runs as
`python -m jobs.<command>`, e.g. on a Ray cluster:
  ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.label ...
Set EBSEG_DEBUG=1 to see a traceback instead of a one-line error.
"""


class UsageError(UserError):
    """A mistake of the user's (bad flag combination, missing input): printed without a traceback."""


# A plain ValueError is a bug somewhere and keeps its traceback; user mistakes raise a UserError.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_model_arguments(group, random_weights_help: str) -> None:
    """The model flags of segment, label and evaluate: which weights, architecture, input size, precision."""
    group.add_argument("--checkpoint", metavar="PATH_OR_URL",
                       help="EBSeg weights: an official .pth, or of `ebseg train` a run directory (its latest "
                            "checkpoint), a checkpoint directory or its model.safetensors; local, s3:// or https://")
    group.add_argument("--best-checkpoint", action="store_true",
                       help="with a run directory: its checkpoint with the best validation mIoU instead of the latest")
    group.add_argument("--preset", default=None,
                       help="model architecture: ebseg-b, ebseg-l, ebseg-tiny (default: from the checkpoint's "
                            "metadata or shapes; ebseg-b with --random-weights)")
    group.add_argument("--random-weights", action="store_true", help=random_weights_help)
    group.add_argument("--inference-size", type=positive_int, metavar="PIXELS",
                       help="shorter side the model sees (default: the checkpoint's, else the preset's 640); "
                            "smaller is faster and coarser. Results are always at the image's own size")
    group.add_argument("--inference-max-size", type=positive_int, metavar="PIXELS",
                       help="cap on the longer side the model sees (default: the preset's, 2560)")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="model precision: auto (bf16 on GPUs that support it, fp16 on older GPUs, fp32 on "
                            "CPU), fp32, bf16 or fp16 (default: %(default)s; label maps agree with fp32 on 99.96%% "
                            "(bf16) and 99.99%% (fp16) of pixels of a trained tiny model on CPU, 2026-11-30; on a "
                            "CPU without fp16/bf16 matrix units both run slower than fp32; figures and commands: "
                            "docs/performance.md)")


def command_name(module_name: str) -> str:
    """CLI spelling of a module name: ``prepare_data`` -> ``prepare-data``."""
    return module_name.replace("_", "-")


def _summary_without_import(path: Path) -> str:
    """First line of a module's docstring, read with ``ast`` so nothing heavy gets imported."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError):
        doc = None
    return (doc or "").strip().splitlines()[0] if doc else "(no description)"


def commands() -> dict[str, tuple[str, str]]:
    """``{command name: (module name, one-line help)}`` in ``SUBCOMMANDS`` order."""
    found = {}
    for module_name in SUBCOMMANDS:
        spec = importlib.util.find_spec(f"jobs.{module_name}")
        if spec is None or not spec.origin:
            raise ImportError(f"no module jobs.{module_name}")
        found[command_name(module_name)] = (module_name, _summary_without_import(Path(spec.origin)))
    return found


def _run_guarded(prog: str, func, args: argparse.Namespace) -> int:
    """Call ``run(args)``, turning user errors into one line on stderr and exit status 2."""
    try:
        code = func(args)
    except USER_ERRORS as e:
        if os.environ.get("EBSEG_DEBUG"):
            raise
        message = str(e) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


def _describe(module: ModuleType) -> str:
    return (module.__doc__ or "").strip()


def module_main(module: ModuleType, argv: list[str] | None = None) -> int:
    """What ``python -m jobs.<name>`` runs: parse ``argv`` with the module's arguments, then run it."""
    # Under `python -m jobs.x` the module is called "__main__"; its spec keeps the real name.
    spec = getattr(module, "__spec__", None)
    name = (spec.name if spec is not None else module.__name__).rsplit(".", 1)[-1]
    prog = f"ebseg {command_name(name)}"
    parser = argparse.ArgumentParser(
        prog=prog, description=_describe(module), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    return _run_guarded(prog, module.run, args)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ebseg-on-ray")
    except Exception:
        return "unknown (not installed; run `make setup`)"


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the ``selected`` command's module is imported to add its options."""
    listed = commands()
    parser = argparse.ArgumentParser(
        prog="ebseg",
        description="EBSeg on Ray: open-vocabulary semantic segmentation (EBSeg, CVPR 2024) in PyTorch, "
        "pseudo-labeling with Ray Data and training with Ray Train.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for cmd, (module_name, summary) in listed.items():
        aliases = [module_name] if module_name != cmd else []
        p = sub.add_parser(
            cmd, aliases=aliases, help=summary, description=summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        p.set_defaults(_module=module_name)
        if selected in (cmd, module_name):
            module = importlib.import_module(f"jobs.{module_name}")
            p.description = _describe(module) or summary
            module.add_arguments(p)
    return parser


def _selected_command(argv: list[str]) -> str | None:
    for token in argv:
        if not token.startswith("-"):
            return token
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ebseg`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = _selected_command(argv)
    try:
        parser = build_parser(selected)
    except ImportError as e:
        print(
            f"ebseg {selected}: error: cannot load the command ({e}); is the project installed? "
            "Run `make setup`, or `ebseg doctor` to see what is missing.",
            file=sys.stderr,
        )
        return 1
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"jobs.{args._module}")
    return _run_guarded(f"ebseg {command_name(args._module)}", module.run, args)


if __name__ == "__main__":
    sys.exit(main())
