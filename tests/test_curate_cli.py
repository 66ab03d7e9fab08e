"""`ebseg curate` command line: outputs match the API, user mistakes give one clear line (no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import curate as cli
from jobs.cli import module_main
from tests.test_curate_data import NAMES, build_label_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fx(s3):
    return build_label_dataset(s3, s3.url(f"curate-cli-{os.getpid()}/"), n_images=12, n_files=2, seed=7)


def _run(capsys, *argv):
    rc = module_main(cli, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_query_uris_match_brute_force(fx, capsys):
    rc, out, err = _run(capsys, "query", fx.url, "--class", "car", "--min-fraction", "0.1", "--without", "road",
                        "--format", "uris")
    assert rc == 0, err
    want = sorted(r["uri"] for r in fx.rows if r["status"] == "ok"
                  and any(c["id"] == 4 and float(np.float32(c["pixel_fraction"])) >= 0.1 for c in r["classes"])
                  and not any(c["id"] == 3 for c in r["classes"]))
    assert sorted(out.split()) == want and want


def test_query_table_errors_and_sample(fx, capsys):
    rc, out, err = _run(capsys, "query", fx.url, "--status", "error", "--error-kind", "not_image")
    assert rc == 0 and out.count("ERROR not_image") == 2 and "2 rows" in err
    rc, out, _ = _run(capsys, "query", fx.url, "--status", "ok", "--sample", "3", "--seed", "5", "--format", "ids")
    rc2, out2, _ = _run(capsys, "query", fx.url, "--status", "ok", "--sample", "3", "--seed", "5", "--format", "ids")
    assert rc == rc2 == 0 and out == out2 and len(out.split()) == 3
    rc, out, _ = _run(capsys, "query", fx.url, "--class", "grass", "--per-class", "2", "--format", "jsonl")
    rows = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and len(rows) == 2 and all(any(c["name"] == "grass" for c in r["classes"]) for r in rows)


def test_stats_json_and_table(fx, capsys):
    rc, out, _ = _run(capsys, "stats", fx.url, "--json")
    d = json.loads(out)
    assert rc == 0 and d["rows"] == len(fx.rows) and d["errors"] == 4
    assert [c["name"] for c in d["classes"]] == NAMES
    car_images = sum(1 for r in fx.rows if any(c["id"] == 4 for c in r["classes"]))
    assert d["classes"][4]["images"] == car_images
    rc, out, _ = _run(capsys, "stats", fx.url)
    assert rc == 0 and "error not_image: 2" in out and "automobile" not in out and " car " in out
    rc, out, _ = _run(capsys, "classes", fx.url)
    assert rc == 0 and out.splitlines()[1] == "1\tgrass\t(lawn, turf)"


def test_export_generic_via_cli(fx, capsys, tmp_path):
    dest = tmp_path / "train"
    rc, out, err = _run(capsys, "export", fx.url, "--to", str(dest), "--format", "generic", "--per-class", "2",
                        "--keep-classes", "sky,lawn", "--min-pixel-confidence", "0.25")
    assert rc == 0, err
    n = int(out.split()[1])
    assert n == len(list((dest / "images").iterdir())) == len(list((dest / "labels").iterdir())) > 0
    assert (dest / "class_names.txt").read_text().splitlines() == ["sky", "grass;lawn;turf"]
    for p in (dest / "labels").iterdir():
        assert set(np.unique(np.asarray(Image.open(p)))) <= {0, 1, 255}


def test_user_mistakes_are_one_line_errors(fx, capsys, s3, s3_prefix, tmp_path):
    rc, out, err = _run(capsys, "query", fx.url, "--class", "autombile")
    assert rc == 2 and "Did you mean: automobile" in err and "Traceback" not in err
    rc, _, err = _run(capsys, "query", fx.url, "--min-fraction", "0.2")
    assert rc == 2 and "need a --class" in err
    rc, _, err = _run(capsys, "query", fx.url, "--class", "car", "--min-fraction", "1.5")
    assert rc == 2 and "[0, 1]" in err
    rc, _, err = _run(capsys, "query", str(tmp_path / "missing"))
    assert rc == 2 and "does not exist" in err
    other = tmp_path / "x.parquet"
    pq.write_table(pa.table({"id": [1]}), other)
    rc, _, err = _run(capsys, "stats", str(other))
    assert rc == 2 and "not an EBSeg label Parquet" in err
    rc, _, err = _run(capsys, "export", fx.url, "--to", str(tmp_path / "e"), "--keep-classes", "carr")
    assert rc == 2 and "'carr' is not in the vocabulary" in err


def test_module_help_teaches():
    res = subprocess.run([sys.executable, "-m", "jobs.curate", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for word in ("query", "export", "report", "examples:", "--min-fraction"):
        assert word in res.stdout
    res = subprocess.run([sys.executable, "-m", "jobs.curate", "export", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--min-pixel-confidence" in res.stdout and "class_names.txt" in res.stdout
