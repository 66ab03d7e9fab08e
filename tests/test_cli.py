"""The `ebseg` command line: discovery, help, error handling, `python -m jobs.<name>`, `ebseg doctor`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import jobs
from jobs import cli

REPO = Path(__file__).resolve().parent.parent
PROBE = '''\
"""Probe command used by the CLI tests."""
import argparse

from jobs.cli import UsageError
from ebseg_core.vocabulary import VocabularyError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["ok", "usage", "value", "plain-value", "missing", "bug", "code"], required=True)


def run(args: argparse.Namespace) -> int:
    if args.mode == "usage":
        raise UsageError("give --input or --manifest")
    if args.mode == "value":
        raise VocabularyError("vocabulary is empty")
    if args.mode == "plain-value":
        raise ValueError("a bug's ValueError")
    if args.mode == "missing":
        raise FileNotFoundError("s3://bucket/nope.jpg: no such file")
    if args.mode == "bug":
        raise RuntimeError("internal failure")
    if args.mode == "code":
        return 3
    print("probe ran")
    return 0
'''


@pytest.fixture
def probe_command(tmp_path, monkeypatch):
    """A real subcommand module `jobs/clitestprobe.py`, visible to discovery for this test only."""
    pkg_dir = tmp_path / "extra_jobs"
    pkg_dir.mkdir()
    (pkg_dir / "clitestprobe.py").write_text(PROBE)
    monkeypatch.setattr(jobs, "__path__", [*jobs.__path__, str(pkg_dir)])
    monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, "clitestprobe"))
    yield "clitestprobe"
    sys.modules.pop("jobs.clitestprobe", None)


def test_help_lists_every_command_with_its_summary(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, (module_name, summary) in cli.commands().items():
        assert name in out and summary != "(no description)", module_name
        assert summary.split()[0] in out
    assert "doctor" in out and "Check the installation" in out
    assert "ebseg <command> --help" in out, "help teaches the next step"


def test_help_does_not_import_command_modules(monkeypatch, capsys):
    sys.modules.pop("jobs.doctor", None)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "jobs.doctor" not in sys.modules


def test_command_runs(probe_command, capsys):
    assert cli.main([probe_command, "--mode", "ok"]) == 0
    assert "probe ran" in capsys.readouterr().out
    assert cli.main([probe_command, "--mode", "code"]) == 3


@pytest.mark.parametrize(
    "mode,message",
    [
        ("usage", "give --input or --manifest"),
        ("value", "vocabulary is empty"),
        ("missing", "s3://bucket/nope.jpg: no such file"),
    ],
)
def test_user_errors_are_one_line_exit_2(probe_command, capsys, mode, message, monkeypatch):
    monkeypatch.delenv("EBSEG_DEBUG", raising=False)
    assert cli.main([probe_command, "--mode", mode]) == 2
    err = capsys.readouterr().err
    assert err == f"ebseg {probe_command}: error: {message}\n"
    assert "Traceback" not in err


def test_debug_env_shows_traceback(probe_command, monkeypatch):
    monkeypatch.setenv("EBSEG_DEBUG", "1")
    with pytest.raises(ValueError, match="vocabulary is empty"):
        cli.main([probe_command, "--mode", "value"])


def test_bugs_are_not_hidden(probe_command):
    with pytest.raises(RuntimeError, match="internal failure"):
        cli.main([probe_command, "--mode", "bug"])
    with pytest.raises(ValueError, match="a bug's ValueError"):  # only UserError is a user's mistake
        cli.main([probe_command, "--mode", "plain-value"])


def test_argparse_errors_name_the_command(probe_command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([probe_command, "--mode", "nonsense"])
    assert exc.value.code == 2
    assert f"ebseg {probe_command}: error:" in capsys.readouterr().err


def test_unknown_command_and_no_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-thing"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "<command>" in capsys.readouterr().out


def test_module_main_matches_cli(probe_command, capsys):
    import importlib

    module = importlib.import_module(f"jobs.{probe_command}")
    assert cli.module_main(module, ["--mode", "ok"]) == 0
    assert "probe ran" in capsys.readouterr().out
    assert cli.module_main(module, ["--mode", "usage"]) == 2
    assert capsys.readouterr().err == f"ebseg {probe_command}: error: give --input or --manifest\n"


def test_underscore_module_gets_dashed_command_and_alias(monkeypatch, tmp_path, capsys):
    pkg_dir = tmp_path / "more_jobs"
    pkg_dir.mkdir()
    (pkg_dir / "two_words.py").write_text(textwrap.dedent('''\
        """Two-word command."""
        def add_arguments(parser):
            pass
        def run(args):
            print("two words ran")
            return 0
        '''))
    monkeypatch.setattr(jobs, "__path__", [*jobs.__path__, str(pkg_dir)])
    monkeypatch.setattr(cli, "SUBCOMMANDS", ("two_words",))
    try:
        assert cli.main(["two-words"]) == 0
        assert cli.main(["two_words"]) == 0
        assert capsys.readouterr().out.count("two words ran") == 2
    finally:
        sys.modules.pop("jobs.two_words", None)


def _ebseg_script() -> str:
    script = Path(sys.executable).parent / "ebseg"
    assert script.exists(), f"console script missing at {script}: run `make setup` (pip install -e .)"
    return str(script)


def test_console_script_doctor_json():
    """The installed `ebseg` script runs `doctor` and reports what the jobs need."""
    proc = subprocess.run(
        [_ebseg_script(), "doctor", "--json"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["missing"] == []
    from importlib.metadata import version

    import torch

    assert report["packages"]["torch"] == version("torch")
    assert report["packages"]["ray"] == version("ray")
    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert report["cuda_ops"]["importable"] is True
    assert set(report["credentials"].values()) <= {"set", "unset"}


def test_python_m_jobs_doctor_text(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.doctor", "--bogus-flag"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "ebseg doctor: error: unrecognized arguments: --bogus-flag" in proc.stderr


def test_segment_label_and_evaluate_share_the_model_flags():
    """One definition of --checkpoint/--best-checkpoint/--preset/--random-weights/--inference-*/--precision."""
    import argparse

    from jobs import evaluate, label, segment

    flags = ["--checkpoint", "runs/r", "--best-checkpoint", "--preset", "ebseg-tiny", "--inference-size", "64",
             "--inference-max-size", "128", "--precision", "bf16"]
    required = {segment: ["x.jpg", "--out", "o"], label: ["--output", "o"], evaluate: ["--dataset", "ade150",
                                                                                        "--root", "d"]}
    for module, extra in required.items():
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args = parser.parse_args(extra + flags)
        assert (args.checkpoint, args.best_checkpoint, args.preset, args.inference_size, args.inference_max_size,
                args.precision) == ("runs/r", True, "ebseg-tiny", 64, 128, "bf16"), module.__name__
    parser = argparse.ArgumentParser()
    label.add_arguments(parser)
    cfg = label.config_from_args(parser.parse_args(["--output", "o", "--input", "i"] + flags))
    assert cfg.best_checkpoint and cfg.precision == "bf16" and cfg.inference_max_size == 128
