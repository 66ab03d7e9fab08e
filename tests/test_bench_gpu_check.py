"""The GPU check's dry run (CPU, tiny preset): the script that will run on a lent GPU works end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_its_table():
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--batches", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("=" * 78)[-1]
    for row in ("device", "trained tiny bf16 vs fp32", "bf16 matmul rate", "ebseg-tiny FLOP/image",
                "model-only bf16 batch 1", "model-only fp32 batch 1", "CPU read+decode+encode", "total"):
        assert re.search(rf"^{re.escape(row)}\s", table, re.M), f"row {row!r} missing from:\n{table}"
    agree = float(re.search(r"trained tiny bf16 vs fp32\s+labels agree ([\d.]+)%", table).group(1))
    assert agree >= 95.0, table
    gflop = float(re.search(r"FLOP/image \S+\s+([\d.]+) GFLOP", table).group(1))
    assert gflop > 0, table


def test_gpu_check_without_a_gpu_says_so():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_check: error: no CUDA device")
