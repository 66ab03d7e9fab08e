"""HTML report: self-contained (no network), right numbers, renders in headless Chromium."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import curate as curate_job
from jobs.cli import module_main
from pipeline import report as R
from tests.test_curate_data import NAMES, build_label_dataset


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "headless Chromium is needed for the report tests: apt-get install -y chromium"
    return exe


def _chromium_args(tmp_path: Path) -> list[str]:
    return [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chrome-profile'}"]


@pytest.fixture(scope="module")
def fx(s3):
    return build_label_dataset(s3, s3.url(f"report-{os.getpid()}/"), n_images=14, n_files=2, seed=3)


@pytest.fixture(scope="module")
def report_file(fx, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    rc = module_main(curate_job, ["report", fx.url, "--out", str(path), "--max-classes", "4", "--samples-per-class", "3"])
    assert rc == 0
    return path


def test_report_is_self_contained(report_file):
    text = report_file.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert not re.search(r'(href|src)="https?:', text)
    # 4 classes charted x 3 samples at most; every embedded image decodes.
    assert len(srcs) <= 12
    for s in srcs[:3]:
        import base64

        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()


def test_report_numbers_match_rows(report_file, fx):
    text = report_file.read_text()
    ok = sum(1 for r in fx.rows if r["status"] == "ok")
    assert f'data-key="rows">{len(fx.rows)}<' in text
    assert f'data-key="labelled">{ok}<' in text
    assert 'data-key="errors">4<' in text
    for name in NAMES:
        images = sum(1 for r in fx.rows if any(c["name"] == name for c in r["classes"]))
        if images:
            assert re.search(rf'<tr data-class="{name}">.*?<td class="n">{images}</td>', text)


def test_report_renders_in_headless_chromium(report_file, fx, tmp_path):
    url = report_file.resolve().as_uri()
    dom = subprocess.run(_chromium_args(tmp_path) + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "EBSeg pseudo-label report" in html
    for name in ("sky", "grass", "car", "not_image", "truncated"):
        assert name in html
    assert f'data-key="rows">{len(fx.rows)}<' in html
    assert html.count("<svg") >= 4  # two class charts, error chart, histograms

    shot = tmp_path / "shot.png"
    res = subprocess.run(_chromium_args(tmp_path) + [f"--screenshot={shot}", "--window-size=1200,2000",
                                                     "--hide-scrollbars", url],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (2000, 1200, 3)
    assert img.std() > 20  # not blank
    colours = np.unique(img.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 200  # text, charts and photos, not a flat page
    # The class colours of the charts are on screen.
    from pipeline.overlay import class_color

    flat = img.reshape(-1, 3).astype(int)
    for cid in (0, 4):
        assert (np.abs(flat - np.array(class_color(cid))).sum(1) <= 6).sum() > 200


def test_report_to_s3_and_bad_input(fx, s3, s3_prefix, capsys, tmp_path):
    out = s3_prefix + "reports/r.html"
    assert module_main(curate_job, ["report", fx.url, "--out", out, "--samples-per-class", "1", "--max-classes", "2"]) == 0
    assert s3.fs.cat(out).decode().startswith("<!DOCTYPE html>")
    capsys.readouterr()
    assert module_main(curate_job, ["report", str(tmp_path / "none"), "--out", str(tmp_path / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_svg_chart_escapes_names():
    svg = R.svg_bar_chart("t", [("<b>&", 3, "#000"), ("x", 0, "#111")])
    assert "<b>" not in svg and "&lt;b&gt;&amp;" in svg
