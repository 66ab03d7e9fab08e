"""The labeling job end to end on the moto S3 bucket: rows, errors, resume, faults, clusters.

Model: ebseg-tiny with --random-weights (seeded, so every actor has the same weights) at a small
inference size, so one image costs well under a second on CPU. What these tests check is the
pipeline: every input exactly once, the right status and error kind, label maps at original size.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ebseg_core.data.synthetic import blob_image
from pipeline.label import LabelConfig, run_label
from pipeline.listing import InputSpec, build_plan, read_plan_shard
from pipeline.schema import decode_confidence_png, decode_label_png, metadata_from_schema
from tests.flaky_proxy import FlakyProxy
from tests.helpers import kill_processes_mentioning
from tests.label_faults import exiting_labeler

REPO = Path(__file__).resolve().parent.parent
VOCAB = "red,green;lime,blue"
MODEL_FLAGS = ["--preset", "ebseg-tiny", "--random-weights", "--inference-size", "32", "--inference-max-size", "64"]


# ----------------------------------------------------------------------------------------- corpus


def _png(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG", **kw)
    return b.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def mixed_corpus() -> dict[str, tuple[bytes, str, object]]:
    """name -> (bytes, expected status or error kind, expected (h, w) for good images)."""
    rgb = lambda h, w, s: Image.fromarray(blob_image(h, w, seed=s, num_classes=3)[0])  # noqa: E731
    out: dict[str, tuple[bytes, str, object]] = {}
    for i, (h, w) in enumerate([(48, 64), (64, 48), (40, 40), (33, 57), (90, 30)]):
        out[f"rgb_{i}.jpg"] = (_jpeg(rgb(h, w, i)), "ok", (h, w))
    out["grey.png"] = (_png(rgb(40, 50, 7).convert("L")), "ok", (40, 50))
    rgba = rgb(36, 44, 8).convert("RGBA")
    rgba.putalpha(128)
    out["alpha.png"] = (_png(rgba), "ok", (36, 44))
    pal = rgb(30, 30, 9).convert("P")
    out["palette.gif"] = (_pal_bytes(pal), "ok", (30, 30))
    out["cmyk.jpg"] = (_jpeg(rgb(32, 48, 10).convert("CMYK")), "ok", (32, 48))
    out["deep.png"] = (_png(Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))), "ok", (30, 40))
    exif_im = rgb(40, 60, 11)
    exif = exif_im.getexif()
    exif[0x0112] = 6
    out["rotated.jpg"] = (_jpeg(exif_im, exif=exif.tobytes()), "ok", (60, 40))  # shown rotated: H and W swap
    frames = [rgb(24, 24, s) for s in (12, 13)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out["anim.gif"] = (b.getvalue(), "ok", (24, 24))
    out["empty.jpg"] = (b"", "empty", None)
    out["html.png"] = (b"<html><body>403 Forbidden</body></html>", "not_image", None)
    good = _jpeg(rgb(64, 64, 14))
    out["truncated.jpg"] = (good[: len(good) // 3], "truncated", None)
    return out


def _pal_bytes(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "GIF", transparency=0)
    return b.getvalue()


@pytest.fixture(scope="module")
def corpus(s3):
    """The mixed corpus uploaded once to s3://<bucket>/label-corpus-<pid>/images/."""
    prefix = s3.url(f"label-corpus-{os.getpid()}/images/")
    files = mixed_corpus()
    for name, (data, _, _) in files.items():
        s3.fs.pipe_file(f"{prefix.removeprefix('s3://')}{name}", data)
    expected = {prefix + name: (kind, hw) for name, (_, kind, hw) in files.items()}
    return prefix, expected


# ---------------------------------------------------------------------------------------- helpers


def read_output(s3, output: str) -> pa.Table:
    """Every labels-*.parquet under output (only final files: _parts/_plan are not data)."""
    path = output.removeprefix("s3://")
    files = sorted(f for f in s3.fs.ls(path, detail=False) if f.rsplit("/", 1)[-1].startswith("labels-"))
    assert files, f"no label files under {output}"
    tables = [pq.read_table(io.BytesIO(s3.fs.cat_file(f))) for f in files]
    return pa.concat_tables(tables)


def check_rows(table: pa.Table, expected: dict) -> None:
    """Exactly one row per input, right status/kind, label and confidence at the original size."""
    uris = table.column("uri").to_pylist()
    assert sorted(uris) == sorted(expected), "every input exactly once"
    for row in table.to_pylist():
        kind, hw = expected[row["uri"]]
        if kind == "ok":
            assert row["status"] == "ok", (row["uri"], row["error_kind"], row["error"])
            lab = decode_label_png(row["label_png"])
            conf = decode_confidence_png(row["confidence_png"])
            assert lab.shape == hw and conf.shape == hw, row["uri"]
            assert (row["height"], row["width"]) == hw
            assert lab.max() < 3
            assert abs(sum(c["pixel_fraction"] for c in row["classes"]) - 1.0) < 1e-4
            assert row["model_id"].startswith("ebseg-tiny")
        else:
            assert row["status"] == "error" and row["error_kind"] == kind, (row["uri"], row["error_kind"], row["error"])
            assert row["label_png"] is None and row["error"]


def base_config(input_url: str, output: str, **kw) -> LabelConfig:
    return LabelConfig(input=input_url, output=output, vocabulary=VOCAB, preset="ebseg-tiny", random_weights=True,
                       inference_size=32, inference_max_size=64, batch_size=4, shard_size=5,
                       progress_bars=False, progress_interval_s=5.0, **kw)


def job_env(s3, tmp: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, **s3.env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": tmp,
           "PYTHONPATH": str(REPO), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def job_cmd(input_url: str, output: str, *more: str) -> list[str]:
    return [sys.executable, "-m", "jobs.label", "--input", input_url, "--output", output, "--vocabulary", VOCAB,
            *MODEL_FLAGS, "--progress-interval", "5", *more]


# ------------------------------------------------------------------------------------------ tests


def test_plan_is_deterministic_and_streamed(tmp_path):
    src = tmp_path / "in"
    (src / "b").mkdir(parents=True)
    for name in ["z.jpg", "a.png", "b/c.jpg", "notes.txt", ".hidden.jpg"]:
        (src / name).write_bytes(b"x")
    spec = InputSpec(input=str(src), extensions=("jpg", "png"))
    plan = build_plan(spec, str(tmp_path / "out"), shard_size=2, progress=None)
    assert plan.total == 3 and plan.num_shards == 2 and plan.shard_counts == [2, 1]
    listed = [u for s in range(plan.num_shards) for u in read_plan_shard(plan.shard_url(s))]
    assert [Path(u).name for u in listed] == ["a.png", "c.jpg", "z.jpg"]  # lexicographic: .../b/c.jpg
    assert listed == sorted(listed)
    again = build_plan(spec, str(tmp_path / "out"), shard_size=2, progress=None)
    assert again == plan  # reused, not rebuilt
    with pytest.raises(ValueError, match="different job"):
        build_plan(InputSpec(input=str(src), extensions=("jpg",)), str(tmp_path / "out"), shard_size=2, progress=None)


def test_manifest_inputs(tmp_path):
    uris = [f"s3://b/k{i}.jpg" for i in range(5)]
    (tmp_path / "m.txt").write_text("# comment\n" + "\n".join(uris + uris[:1]) + "\n")
    pq.write_table(pa.table({"path": uris}), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("id,uri\n" + "\n".join(f"{i},{u}" for i, u in enumerate(uris)))
    for name in ("m.txt", "m.parquet", "m.csv"):
        plan = build_plan(InputSpec(manifest=str(tmp_path / name)), str(tmp_path / f"out-{name}"), shard_size=10,
                          progress=None)
        assert read_plan_shard(plan.shard_url(0)) == uris, name


def test_empty_input_is_a_clear_error(tmp_path, capsys):
    from jobs import label as label_job
    from jobs.cli import module_main

    (tmp_path / "in").mkdir()
    rc = module_main(label_job, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--vocabulary", VOCAB,
               *MODEL_FLAGS])
    assert rc == 2
    assert "no input files found" in capsys.readouterr().err
    rc = module_main(label_job, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out2"), "--vocabulary", "a,,b",
               "--preset", "ebseg-tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "--random-weights" in err  # no checkpoint: refused before anything else
    rc = module_main(label_job, ["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out3"), "--vocabulary", ",;,",
               *MODEL_FLAGS])
    assert rc == 2 and "vocabulary" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reference_run(ray_local, s3, corpus):
    """The corpus labeled once in this process (1 actor); checked by one test, compared by another."""
    output = s3.url(f"label-reference-{os.getpid()}/")
    return output, run_label(base_config(corpus[0], output))


def test_mixed_corpus_on_s3(ray_local, s3, corpus, reference_run):
    """Good images of many modes/sizes and broken files -> one row each, right kinds, labels at original size."""
    input_url, expected = corpus
    s3_prefix, summary = reference_run
    assert summary.complete and summary.processed == len(expected)
    assert summary.errors == {"empty": 1, "not_image": 1, "truncated": 1}
    table = read_output(s3, s3_prefix)
    check_rows(table, expected)
    meta = metadata_from_schema(pq.read_schema(io.BytesIO(s3.fs.cat_file(
        s3_prefix.removeprefix("s3://") + "labels-000000.parquet"))))
    assert meta.names == ["red", "green", "blue"] and meta.synonyms[1] == ["green", "lime"]
    assert meta.model["preset"] == "ebseg-tiny"
    assert json.loads(s3.fs.cat_file(s3_prefix.removeprefix("s3://") + "_SUCCESS"))["complete"] is True
    # A rerun of a finished job labels nothing and changes nothing.
    again = run_label(base_config(input_url, s3_prefix))
    assert again.processed == 0 and again.inputs_skipped == len(expected)
    assert read_output(s3, s3_prefix).column("uri").to_pylist() == table.column("uri").to_pylist()


def test_actor_killed_mid_job(ray_local, s3, s3_prefix, corpus, tmp_path):
    """The model actor exits on its 2nd batch (a test-only Labeler subclass); Ray restarts it and the batch is redone."""
    input_url, expected = corpus
    marker = tmp_path / "actor-exited"
    summary = run_label(base_config(input_url, s3_prefix), labeler=exiting_labeler(2, str(marker)))
    assert marker.exists(), "the actor did not exit: the test proves nothing"
    assert summary.complete
    check_rows(read_output(s3, s3_prefix), expected)


def test_sigkill_mid_job_then_rerun_is_exactly_once(ray_head, s3, s3_prefix, corpus, tmp_path):
    """SIGKILL the job's driver (on a running cluster) after its first output file; the rerun finishes
    the rest, no row twice."""
    input_url, expected = corpus
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    env = job_env(s3, ray_tmp)
    env["RAY_ADDRESS"] = ray_head.address
    env.update(ray_head.auth_env)  # the head's token, not the one the embedded test clusters share
    out_path = s3_prefix.removeprefix("s3://")
    cmd = job_cmd(input_url, s3_prefix, "--shard-size", "2", "--batch-size", "2")
    log = open(tmp_path / "run1.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            names = [p.rsplit("/", 1)[-1] for p in s3.fs.ls(out_path, detail=False)] if s3.fs.exists(out_path) else []
            if any(n.startswith("labels-") for n in names):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "job ended before it could be killed:\n" + (tmp_path / "run1.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_processes_mentioning(ray_tmp)
        log.close()
    names = [p.rsplit("/", 1)[-1] for p in s3.fs.ls(out_path, detail=False)]
    assert "_SUCCESS" not in names
    done_before = sum(1 for n in names if n.startswith("labels-"))
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        kill_processes_mentioning(ray_tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(s3.fs.cat_file(out_path + "_SUCCESS"))
    assert summary["inputs_skipped"] >= 2 * done_before > 0, summary  # the rerun did not redo finished shards
    assert summary["processed"] + summary["inputs_skipped"] == len(expected)
    check_rows(read_output(s3, s3_prefix), expected)


def test_transient_s3_errors_are_retried(s3, s3_prefix, corpus, tmp_path):
    """A proxy answers 30% of GETs with 503 SlowDown: the job still labels everything, no read errors."""
    input_url, expected = corpus
    ray_tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")
    with FlakyProxy(s3.endpoint_url, fail_fraction=0.3, max_failures=200, lifetime_s=300) as proxy:
        env = job_env(s3, ray_tmp, AWS_ENDPOINT_URL=proxy.url, AWS_ENDPOINT_URL_S3=proxy.url)
        try:
            res = subprocess.run(job_cmd(input_url, s3_prefix), cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=300)
        finally:
            kill_processes_mentioning(ray_tmp)
        injected = proxy.injected
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert injected >= 5, f"only {injected} errors injected: the test proves nothing"
    table = read_output(s3, s3_prefix)
    assert "read" not in table.column("error_kind").to_pylist()
    check_rows(table, expected)


def test_ray_job_submit(ray_head, s3, s3_prefix, corpus):
    """`ray job submit --working-dir . -- python -m jobs.label ...` as docs/labeling.md shows it.

    The head runs with token auth, as Ray 2.60 starts one: the submitting shell presents the head's token
    (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH), and without it the submission is refused. The submitting
    shell holds no storage credentials: the job reads and writes the bucket with the head's own (a node
    with an instance role or its own settings), never through the runtime env, which Ray logs in plain text."""
    input_url, expected = corpus
    shell = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    shell["PATH"] = ray_head.env["PATH"]
    label = ["python", *job_cmd(input_url, s3_prefix)[1:]]
    submit = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_head.dashboard_url,
              "--working-dir", "."]

    refused = subprocess.run([*submit, "--", "python", "-c", "print('ran')"], cwd=REPO, env=shell,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "ran\n" not in refused.stdout, refused.stdout[-2000:]
    assert "401" in refused.stdout + refused.stderr or "auth" in (refused.stdout + refused.stderr).lower()

    proc = subprocess.run([*submit, "--", *label], cwd=REPO, env={**shell, **ray_head.auth_env},
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "[label] complete:    yes" in out
    check_rows(read_output(s3, s3_prefix), expected)


def test_two_node_cluster_same_rows(two_nodes, s3, corpus, reference_run):
    """Two model actors that need a resource each node has once -> one actor per node; same rows as one node."""
    address, env, slowness = two_nodes
    input_url, expected = corpus
    one = reference_run[0]
    two = s3.url(f"two-node-{os.getpid()}/")
    cmd = job_cmd(input_url, two, "--batch-size", "4", "--shard-size", "5", "--num-actors", "2",
                  "--num-cpus-per-actor", "1", "--actor-resource", "test_node=1")
    res = subprocess.run(cmd, cwd=REPO, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True,
                         timeout=300 * slowness)
    assert res.returncode == 0 and "[label] complete:    yes" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = read_output(s3, one), read_output(s3, two)
    check_rows(b, expected)
    ra = {r["uri"]: r for r in a.to_pylist()}
    for r in b.to_pylist():
        o = ra[r["uri"]]
        assert (r["status"], r["error_kind"], r["width"], r["height"]) == (o["status"], o["error_kind"], o["width"],
                                                                            o["height"])
        if r["status"] == "ok":
            la, lb = decode_label_png(o["label_png"]), decode_label_png(r["label_png"])
            assert (la == lb).mean() > 0.99, r["uri"]


def test_actor_torch_threads_rule():
    from pipeline.resources import actor_torch_threads

    assert actor_torch_threads(1.0, 1, 1.0, default_share=True) == 0  # GPU actor: torch's default
    assert actor_torch_threads(0.0, 1, 1.0, default_share=True) == -1  # lone CPU actor: every core
    assert actor_torch_threads(0.0, 3, 0.5, default_share=True) == 1  # several: their CPU share
    assert actor_torch_threads(0.0, 1, 1.5, default_share=False) == 2  # the user's share, rounded up
