"""Trust and recovery of the labeling job: storage faults about the job stop it and a rerun repairs
them, full disks name the write and leave no litter, error rows can be relabeled, failed starts do
not lock an output, manifests are deduplicated across the whole plan, and a rerun with nothing to do
answers without Ray.

Ray tests share the session's ``ray_local`` cluster and label a few tiny local images with ebseg-tiny
(random weights) at inference size 32; the outage test needs its own driver (its workers must see
the proxy as their S3 endpoint) and runs both of its runs on one Ray start.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ebseg_core.data.synthetic import blob_image
from ebseg_core.storage import WriteError
from pipeline.label import LabelConfig, LabelError, build_dataset, run_label
from pipeline.listing import InputSpec, build_plan, read_plan_shard, unique_in_order
from tests.helpers import free_port, kill_processes_mentioning

REPO = Path(__file__).resolve().parent.parent
VOCAB = "red,green;lime,blue"


def write_images(folder: Path, n: int, start: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(blob_image(24 + i % 3 * 8, 32, seed=i, num_classes=3)[0]).save(p)
        paths.append(str(p))
    return paths


def config(output: str, **kw) -> LabelConfig:
    base = dict(output=output, vocabulary=VOCAB, preset="ebseg-tiny", random_weights=True, inference_size=32,
                inference_max_size=64, batch_size=4, shard_size=2, progress_interval_s=0)
    return LabelConfig(**{**base, **kw})


def local_rows(output: str) -> pa.Table:
    files = sorted(Path(output).glob("labels-*.parquet"))
    assert files, f"no label files under {output}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def hidden_files(root: str) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.startswith(".")]


@contextlib.contextmanager
def tmpfs(size: str):
    """A private tmpfs of ``size`` (root only; the test is skipped elsewhere)."""
    mnt = tempfile.mkdtemp(prefix="ebseg-tmpfs-")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], capture_output=True, text=True)
    if res.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)
        os.rmdir(mnt)


def fill(mnt: str, leave_blocks: int = 0) -> Path:
    """Write a filler file so that only ``leave_blocks`` blocks of the filesystem stay free."""
    st = os.statvfs(mnt)
    filler = Path(mnt) / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, (st.f_bavail - leave_blocks) * st.f_frsize))
    assert os.statvfs(mnt).f_bavail == leave_blocks
    return filler


# ------------------------------------------------------------------------------ plan (no Ray)


def test_unique_in_order_matches_a_set(tmp_path):
    rng = random.Random(0)
    uris = [f"s3://b/k{rng.randrange(3000)}.jpg" for _ in range(10_000)]
    got = list(unique_in_order(iter(uris), str(tmp_path), buckets=7, flush_at=50))
    assert got == list(dict.fromkeys(uris))  # first occurrences, in order
    assert not any(n.startswith("bucket-") for n in os.listdir(tmp_path))  # buckets are deleted once read


def test_unique_in_order_memory_is_a_fraction_of_the_uris(tmp_path):
    """Python memory while deduplicating 50k URIs (1 in 10 repeated) stays a fraction of a set of them."""
    import tracemalloc

    def uris():
        for i in range(50_000):
            key = (i * 7919) % 45_000
            yield f"s3://lake/photos/2026/11/30/camera-{key % 97:03d}/{key:09d}.jpg"

    list(unique_in_order(iter(["a", "b", "a"]), str(tmp_path)))  # imports done before measuring
    tracemalloc.start()
    try:
        count = sum(1 for _ in unique_in_order(uris(), str(tmp_path), buckets=32, flush_at=256))
        _, dedup_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        held = set(uris())
        _, set_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == len(held) == 45_000
    assert dedup_peak < 0.25 * set_peak, (dedup_peak, set_peak)


def test_manifest_repeats_across_shards_are_planned_once(tmp_path):
    uris = [f"s3://b/k{i}.jpg" for i in range(7)]
    listed = uris[:3] + [uris[0]] + uris[3:5] + [uris[1], uris[4]] + uris[5:] + [uris[6], uris[0]]
    (tmp_path / "m.txt").write_text("\n".join(listed) + "\n")
    plan = build_plan(InputSpec(manifest=str(tmp_path / "m.txt")), str(tmp_path / "out"), shard_size=2, progress=None)
    planned = [u for s in range(plan.num_shards) for u in read_plan_shard(plan.shard_url(s))]
    assert planned == uris and plan.total == 7 and plan.shard_counts == [2, 2, 2, 1]


def test_full_disk_while_planning_names_the_write(tmp_path, capsys):
    from jobs import label as label_job
    from jobs.cli import module_main

    write_images(tmp_path / "in", 3)
    with tmpfs("64k") as mnt:
        fill(mnt)
        out = os.path.join(mnt, "out")
        rc = module_main(label_job, ["--input", str(tmp_path / "in"), "--output", out, "--vocabulary", VOCAB,
                                     "--preset", "ebseg-tiny", "--random-weights"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert re.fullmatch(rf"ebseg label: error: cannot write {re.escape(out)}/_plan/shard-000000\.parquet: "
                            r"No space left on device\n", err), err
        assert hidden_files(mnt) == []
        with pytest.raises(WriteError, match="No space left on device"):
            build_plan(InputSpec(input=str(tmp_path / "in")), out, shard_size=2, progress=None)
        assert hidden_files(mnt) == []


def test_weights_digest_is_by_content(tmp_path, monkeypatch):
    import torch

    from ebseg_core.checkpoint import weights_digest

    monkeypatch.setenv("EBSEG_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "w.pth"
    torch.save({"w": torch.ones(4)}, ckpt)
    first = weights_digest(str(ckpt))
    shutil.copy(ckpt, tmp_path / "copy.pth")
    monkeypatch.chdir(tmp_path)
    assert weights_digest("w.pth") == first  # the same file by a relative path
    assert weights_digest(str(tmp_path / "copy.pth")) == first  # the same bytes elsewhere
    torch.save({"w": torch.zeros(4)}, ckpt)  # new weights saved under the old path
    assert weights_digest(str(ckpt)) != first


def test_one_weights_identity_from_saving_to_labeling(tmp_path, monkeypatch):
    """The digest `save_weights` records, the resolved checkpoint's and the model id all name the file's bytes."""
    import torch

    from ebseg_core import build_model
    from ebseg_core.checkpoint import resolve_checkpoint, save_weights, weights_digest

    monkeypatch.setenv("EBSEG_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    (tmp_path / "a").mkdir()
    saved = save_weights(tmp_path / "a" / "model.safetensors", build_model("ebseg-tiny"), {"iteration": 1})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = resolve_checkpoint(str(tmp_path / "a")), resolve_checkpoint(str(tmp_path / "b" / "model.safetensors"))
    assert saved == a.digest == b.digest == weights_digest(str(tmp_path / "b" / "model.safetensors"))
    with monkeypatch.context() as patched:  # a resolved checkpoint's digest is reused, not read again
        patched.setattr("ebseg_core.checkpoint.weights_digest", lambda url: pytest.fail(f"digest read again: {url}"))
        assert build_model(a.model_config(), checkpoint=a).model_id == f"ebseg-tiny:{saved[:12]}"
    assert build_model("ebseg-tiny", checkpoint=str(tmp_path / "b" / "model.safetensors")).model_id \
        == f"ebseg-tiny:{saved[:12]}"
    torch.manual_seed(1)
    other = save_weights(tmp_path / "a" / "model.safetensors", build_model("ebseg-tiny"), {"iteration": 2})
    assert other != saved and resolve_checkpoint(str(tmp_path / "a")).digest == other


def test_read_errors_are_sorted_into_file_errors_and_storage_faults(tmp_path, monkeypatch):
    """read_with_retries: a file's own failure is a ReadError, the job's access a StorageFault, transient
    errors are retried (credential errors never), an empty object reads as empty, a big one is too_large."""
    from ebseg_core import storage
    from pipeline import label_read
    from pipeline.images import DecodeError
    from pipeline.label_read import ReadError, StorageFault, read_with_retries

    (tmp_path / "big.bin").write_bytes(b"x" * 11)
    with pytest.raises(ReadError, match="not found"):
        read_with_retries(str(tmp_path / "absent.png"))
    with pytest.raises(ReadError, match="is a directory"):
        read_with_retries(str(tmp_path))
    with pytest.raises(DecodeError) as too_large:
        read_with_retries(str(tmp_path / "big.bin"), max_bytes=10)
    assert too_large.value.kind == "too_large"

    monkeypatch.setattr(storage.time, "sleep", lambda _: None)
    attempts: list[Exception | bytes] = []

    def fake_store(*answers: Exception | bytes):
        """filesystem_for of a store giving ``answers`` in turn (the last one for good)."""
        attempts.clear()

        class Store:
            def cat_file(self, path, start=None, end=None):
                answer = answers[min(len(attempts), len(answers) - 1)]
                attempts.append(answer)
                if isinstance(answer, Exception):
                    raise answer
                return answer

        monkeypatch.setattr(label_read, "filesystem_for", lambda uri: (Store(), uri))

    fake_store(TimeoutError("slow"), ConnectionError("reset"), b"ok")
    assert read_with_retries("s3://b/k", retries=2) == b"ok" and len(attempts) == 3
    fake_store(TimeoutError("slow"))
    with pytest.raises(StorageFault, match="still failing after 2 retries") as fault:
        read_with_retries("s3://b/k", retries=2)
    assert fault.value.hint == label_read.HINT_UNAVAILABLE and len(attempts) == 3
    fake_store(RuntimeError("ExpiredToken: the token has expired (503)"))
    with pytest.raises(StorageFault) as fault:
        read_with_retries("s3://b/k", retries=2)
    assert fault.value.hint == label_read.HINT_CREDENTIALS and len(attempts) == 1
    fake_store(PermissionError("Forbidden"))
    with pytest.raises(ReadError, match="access denied"):
        read_with_retries("s3://b/k")
    fake_store(ValueError("bad header"))
    with pytest.raises(ReadError, match="read failed: ValueError"):
        read_with_retries("s3://b/k")
    fake_store(OSError("InvalidRange: the range is not satisfiable"))
    assert read_with_retries("s3://b/k") == b""


def test_retry_kinds_flag_names_every_error_kind():
    from jobs.label import _ALL_KINDS
    from pipeline.schema import ERROR_KINDS

    assert set(_ALL_KINDS) == set(ERROR_KINDS)


# ------------------------------------------------------------------------------ Ray (shared cluster)


def test_read_stage_is_not_fused_into_the_model(ray_local, tmp_path):
    """The executed plan keeps read_shards a task operator of its own before the model's actor pool."""
    from ray.data._internal.logical.optimizers import get_execution_plan

    from ebseg_core.model_spec import ModelSpec
    from ebseg_core.vocabulary import Vocabulary
    from pipeline.resources import ActorPool

    for cpus in (1.0, 0.5):  # 1.0: the actor asks for what a read task asks for (fused before the fix)
        cfg = config(str(tmp_path / "o"), input=str(tmp_path))
        vocab = Vocabulary.parse(VOCAB)
        ds = build_dataset(cfg, [{"shard": 0, "plan_url": "x", "only": []}],
                           ModelSpec(preset="ebseg-tiny", checkpoint=None, batch_size=2), vocab,
                           ActorPool(1, 0.0, cpus, torch_threads=0))
        names = []
        op = get_execution_plan(ds._logical_plan)[0].dag
        while op is not None:
            names.append(op.name)
            op = op.input_dependencies[0] if op.input_dependencies else None
        names.reverse()
        assert any(n.endswith("MapBatches(read_shards)") for n in names), names
        assert any(n == "MapBatches(Labeler)" for n in names), names


def test_retry_errors_relabels_error_rows_once(ray_local, tmp_path):
    images = write_images(tmp_path / "in", 4)
    missing = str(tmp_path / "in" / "late.png")
    manifest = tmp_path / "m.txt"
    manifest.write_text("\n".join(images[:3] + [missing] + images[3:]) + "\n")
    out = str(tmp_path / "out")
    first = run_label(config(out, manifest=str(manifest)))
    assert first.complete and first.errors == {"read": 1}
    before = {r["uri"]: r for r in local_rows(out).to_pylist()}
    assert before[missing]["status"] == "error" and before[missing]["error_kind"] == "read"

    Image.fromarray(blob_image(30, 30, seed=99, num_classes=3)[0]).save(missing)
    assert run_label(config(out, manifest=str(manifest))).processed == 0  # a plain rerun keeps the error row
    again = run_label(config(out, manifest=str(manifest), retry_errors=("read",)))
    assert again.complete and again.processed == 1 and again.errors == {}
    rows = local_rows(out).to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(before)  # every input exactly once
    after = {r["uri"]: r for r in rows}
    assert after[missing]["status"] == "ok"
    for uri, row in before.items():
        if uri != missing:
            assert after[uri]["labeled_at"] == row["labeled_at"], uri  # untouched, not relabeled
    assert json.loads((Path(out) / "_SUCCESS").read_text())["complete"] is True
    assert run_label(config(out, manifest=str(manifest), retry_errors=("read",))).processed == 0

    # With nothing left to do, a rerun answers without a cluster: a Ray address that nothing listens
    # on would fail any attempt to start or join Ray.
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "jobs.label", "--manifest", str(manifest), "--output", out,
                          "--vocabulary", VOCAB, "--preset", "ebseg-tiny", "--random-weights", "--inference-size", "32",
                          "--inference-max-size", "64", "--batch-size", "4", "--shard-size", "2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "[label] complete:    yes" in res.stdout and "Traceback" not in res.stderr


def test_failed_start_does_not_lock_the_output(ray_local, tmp_path):
    write_images(tmp_path / "in", 3)
    out = str(tmp_path / "out")
    with pytest.raises(LabelError, match="GPU"):  # fails after planning, before labeling anything
        run_label(config(out, input=str(tmp_path / "in"), inference_size=48, num_gpus_per_actor=1.0))
    assert (Path(out) / "_job.json").exists()
    fixed = run_label(config(out, input=str(tmp_path / "in")))  # the corrected command
    assert fixed.complete and fixed.processed == 3
    assert json.loads((Path(out) / "_job.json").read_text())["inference_size"] == 32
    with pytest.raises(LabelError, match="holds labels of another job"):  # now it holds labels: refused
        run_label(config(out, input=str(tmp_path / "in"), inference_size=48))


def test_full_disk_while_labeling_one_line_then_rerun(ray_local, tmp_path):
    write_images(tmp_path / "in", 6)
    with tmpfs("1m") as mnt:
        out = os.path.join(mnt, "out")
        cfg = config(out, input=str(tmp_path / "in"))
        # Room for the plan (3 shards + plan.json) and _job.json, one block each; none for labels.
        filler = fill(mnt, leave_blocks=5)
        first = run_label(cfg)
        assert not first.complete
        assert re.fullmatch(rf"cannot write {re.escape(out)}/_parts/shard-00000\d/part-[0-9a-f]+\.parquet: No space "
                            r"left on device \(\d of 6 images are labeled; free space and rerun the same command\)",
                            first.stopped), first.stopped
        assert hidden_files(out) == []  # no temp files left behind
        assert not (Path(out) / "_SUCCESS").exists()
        filler.unlink()
        # A temp file that a killed writer would leave: swept by the rerun.
        os.makedirs(os.path.join(out, "_parts", "shard-000001"), exist_ok=True)
        Path(out, "_parts", "shard-000001", ".part-x.parquet.abc123.tmp").write_bytes(b"x")
        Path(out, ".labels-000000.parquet.def456.tmp").write_bytes(b"x")
        second = run_label(cfg)
        assert second.complete and not second.stopped
        uris = local_rows(out).column("uri").to_pylist()
        assert sorted(uris) == sorted(str(p) for p in (tmp_path / "in").iterdir())
        assert hidden_files(out) == []


# ------------------------------------------------------------------------------ credential outage (own driver)


OUTAGE_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, os, sys
    from tests.flaky_proxy import FlakyProxy
    from jobs import label as label_job
    from jobs.cli import module_main

    upstream, argv = sys.argv[1], json.loads(sys.argv[2])
    # Image reads (not the plan or the labels) answer ExpiredToken after the first 3 went through.
    proxy = FlakyProxy(upstream, error="expired_token", fail_fraction=1.0, max_failures=10**6, path_contains="/images/",
                       pass_first=3, repeat=True, lifetime_s=600).start()
    os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url  # driver and its Ray workers
    def label_job_output_complete(argv):
        from ebseg_core.storage import exists, join
        return exists(join(argv[argv.index("--output") + 1], "_SUCCESS"))

    results = []
    for _ in range(2):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = module_main(label_job, argv)
        results.append({"rc": rc, "stderr": err.getvalue(), "injected": proxy.injected,
                        "success_marker": label_job_output_complete(argv)})
        proxy.heal()
    print("RESULT", json.dumps(results))
""")


def test_credential_outage_stops_the_job_and_a_rerun_completes(s3, s3_prefix, tmp_path):
    from tests.test_label import check_rows, mixed_corpus, read_output

    prefix = s3_prefix + "images/"
    files = mixed_corpus()
    for name, (data, _, _) in files.items():
        s3.fs.pipe_file(prefix.removeprefix("s3://") + name, data)
    expected = {prefix + name: (kind, hw) for name, (_, kind, hw) in files.items()}
    out = s3_prefix + "labels/"
    argv = ["--input", prefix, "--output", out, "--vocabulary", VOCAB, "--preset", "ebseg-tiny", "--random-weights",
            "--inference-size", "32", "--inference-max-size", "64", "--batch-size", "4", "--shard-size", "5",
            "--progress-interval", "0"]
    ray_tmp = tempfile.mkdtemp(prefix="ro", dir="/tmp")
    env = {**os.environ, **s3.env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    try:
        res = subprocess.run([sys.executable, "-c", OUTAGE_SCRIPT, s3.endpoint_url, json.dumps(argv)], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=400)
    finally:
        kill_processes_mentioning(ray_tmp)
    line = next((l for l in res.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert res.returncode == 0 and line, res.stdout[-3000:] + res.stderr[-3000:]
    first, second = json.loads(line[len("RESULT "):])
    assert first["injected"] > 0, "no ExpiredToken was answered: the test proves nothing"
    assert first["rc"] == 1, first
    errors = [l for l in first["stderr"].splitlines() if l.startswith("ebseg label: error:")]
    assert len(errors) == 1 and "token has expired" in errors[0], first["stderr"]
    assert re.search(rf"\(\d+ of {len(expected)} images are labeled; renew the storage credentials and rerun the same "
                     r"command\)$", errors[0]), errors
    assert "Traceback" not in first["stderr"], first["stderr"]
    assert not first["success_marker"] and second["success_marker"]
    assert second["rc"] == 0, second
    table = read_output(s3, out)
    check_rows(table, expected)  # every input exactly once, no `read` error rows from the outage
    assert "read" not in table.column("error_kind").to_pylist()


def test_help_label_example_is_accepted_as_typed():
    """The `ebseg --help` label example parses and passes the checks that refused it (no --checkpoint)."""
    import argparse
    import shlex

    from jobs import cli
    from jobs import label as label_job

    text = cli.EPILOG.replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.strip().startswith("ebseg label "))
    words = shlex.split(line.split("  pseudo-label")[0])[2:]
    parser = argparse.ArgumentParser()
    label_job.add_arguments(parser)
    cfg = label_job.config_from_args(parser.parse_args(words))
    assert cfg.checkpoint and cfg.input and cfg.vocabulary and not cfg.random_weights


def test_input_refused_at_start_stops_before_labeling(s3, s3_prefix, tmp_path, monkeypatch):
    """Credentials refused on the first inputs: one LabelError from the driver's probe, nothing labeled."""
    import s3fs

    from tests.flaky_proxy import FlakyProxy

    for i in range(3):
        s3.fs.pipe_file(f"{s3_prefix.removeprefix('s3://')}images/img_{i}.png",
                        Path(write_images(tmp_path / "src", 1, start=i)[0]).read_bytes())
    out = str(tmp_path / "out")
    with FlakyProxy(s3.endpoint_url, error="expired_token", fail_fraction=1.0, max_failures=10**6,
                    path_contains="/images/", repeat=True, lifetime_s=120) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()  # the driver's cached client still knows the old endpoint
        try:
            with pytest.raises(LabelError, match=r"refused the job's credentials .*token has expired.*renew"):
                run_label(config(out, input=s3_prefix + "images/"))
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
        assert proxy.injected >= 1
    assert not list(Path(out).glob("labels-*")) and not (Path(out) / "_parts").exists()


def test_job_marker_of_an_earlier_version_is_upgraded_not_refused(tmp_path):
    """Outputs written when `_job.json` named the checkpoint by path keep working: same job -> upgraded."""
    from pipeline.label_output import check_job_identity

    ident = {"vocabulary_id": "v1", "preset": "ebseg-tiny", "weights_sha256": "random", "inference_size": 32,
             "inference_max_size": None}
    legacy = {"vocabulary_id": "v1", "preset": "ebseg-tiny", "checkpoint": None, "random_weights": True,
              "inference_size": 32, "inference_max_size": None}
    marker = tmp_path / "_job.json"
    cfg = config(str(tmp_path))
    marker.write_text(json.dumps(legacy))
    check_job_identity(cfg.output, cfg.checkpoint, ident, True, lambda _: None)
    assert json.loads(marker.read_text()) == ident
    marker.write_text(json.dumps({**legacy, "inference_size": 48}))  # another job that holds labels: refused
    with pytest.raises(LabelError, match="holds labels of another job"):
        check_job_identity(cfg.output, cfg.checkpoint, ident, True, lambda _: None)


def test_progress_lines_come_on_a_timer_not_per_batch():
    """Progress is printed every interval even while no batch arrives (a slow model, a large write batch)."""
    import threading

    from pipeline.label import _Progress

    lines: list[str] = []
    two = threading.Event()

    def log(line: str) -> None:
        lines.append(line)
        if len(lines) >= 2:
            two.set()

    with _Progress(log, 0.05, total=100, skipped=10, todo=90) as progress:
        progress.processed, progress.ok, progress.errors = 5, 4, 1
        assert two.wait(30), lines  # no batch arrives in between: the lines come from the timer
    assert lines[-1].startswith("[label] 15/100 images (15.0%)") and "ok 4 errors 1" in lines[-1]


def test_label_writes_no_secret_anywhere(s3, s3_prefix, tmp_path):
    """`ebseg label` as a user runs it (its own embedded Ray) with a unique secret as the S3 key: the
    secret reaches no file of Ray's session (logs, runtime envs), no output object, and no line printed."""
    import tempfile
    import uuid

    from ebseg_core.data.synthetic import write_blob_images

    secret = "planted-" + uuid.uuid4().hex
    images = s3_prefix + "images"
    write_blob_images(images, 4, with_labels=False)
    out = s3_prefix + "labels"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rls", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, **s3.env, "AWS_SECRET_ACCESS_KEY": secret, "RAY_TMPDIR": str(ray_tmp),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    try:
        res = subprocess.run([sys.executable, "-m", "jobs.label", "--input", images, "--output", out,
                              "--vocabulary", VOCAB, "--preset", "ebseg-tiny", "--random-weights", "--inference-size",
                              "32", "--inference-max-size", "64"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert secret not in res.stdout + res.stderr
        found, scanned = [], 0
        for path in list(ray_tmp.rglob("*")) + list(tmp_path.rglob("*")):
            if path.is_file() and not path.is_symlink():
                scanned += 1
                if secret.encode() in path.read_bytes():
                    found.append(str(path))
        assert list(ray_tmp.rglob("raylet.out")), "Ray's session logs were not where the test looks"
        for key in s3.fs.find(out.split("://", 1)[1]):
            scanned += 1
            if secret.encode() in s3.fs.cat_file(key):
                found.append(f"s3://{key}")
        assert not found, f"the secret leaked into {found}"
        assert scanned > 20
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
