"""Checkpoints from training to labeling (issues #14, #15): safe formats, exact resume, no secrets in
anything a run writes, and one `--checkpoint` that names a run directory, a checkpoint directory or a
weights file, locally or in object storage."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ebseg_core import Vocabulary, build_model
from ebseg_core.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    infer_preset,
    preset_shapes,
    resolve_checkpoint,
    weight_shapes,
)
from ebseg_core.data.synthetic import blob_image, write_blob_images
from jobs import segment
from jobs.cli import module_main
from pipeline.schema import decode_label_png
from tests.helpers import REPO_ROOT

CONFIG = str(REPO_ROOT / "configs" / "tiny_generic.yaml")
CLASS_NAMES = "wall\nsky;heaven\ntree\ngrass\n"
TINY_RUN = [  # a few iterations of the tiny config on one worker, at 64 px validation/inference size
    "run.num_workers=1", "solver.ims_per_batch=2", "run.log_period=1", "model.inference_size=64",
    "augment.crop_size=[96,96]", "augment.pad_size=96", "augment.min_sizes=[96]",
    "criterion.num_points=256", "criterion.matcher_num_points=256",
]  # fmt: skip


def _dataset(root: Path, n: int = 6) -> Path:
    write_blob_images(root, n, sizes=((96, 96), (96, 112)), num_classes=4, seed=0)
    (root / "class_names.txt").write_text(CLASS_NAMES)
    return root


class _Plant:
    """Unpickling this calls open(marker, "w"): a file appears if a loader runs code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------------------------ fast
def test_planted_pickle_is_refused_in_one_line_and_runs_nothing(tmp_path, capsys):
    from pipeline.train import load_train_state

    marker = tmp_path / "code_ran"
    planted = tmp_path / "train_state.pt"
    torch.save({"iteration": 3, "model": {}, "x": _Plant(marker)}, planted)
    with pytest.raises(CheckpointError) as err:
        load_train_state(str(planted))
    assert "refusing to load train_state.pt" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()

    weights = tmp_path / "weights.pth"
    shutil.copy(planted, weights)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    rc = module_main(segment, [str(img), "--vocabulary", "a,b", "--checkpoint", str(weights), "--out", str(tmp_path)])
    err_text = capsys.readouterr().err
    assert rc == 2 and "not a loadable weights file" in err_text and len(err_text.strip().splitlines()) == 1
    assert not marker.exists()

    with open(planted, "rb") as f:  # the plant is real: an unsafe loader does run it
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_preset_is_inferred_from_shapes_and_mismatches_are_one_line(tmp_path):
    torch.manual_seed(0)
    model = build_model("ebseg-tiny")
    state = model.state_dict()
    official_style = tmp_path / "tiny.pth"
    torch.save({"model": state}, official_style)
    shapes, meta = weight_shapes(str(official_style))
    assert meta == {} and infer_preset(shapes) == "ebseg-tiny"
    assert infer_preset(preset_shapes("ebseg-b")) == "ebseg-b" and infer_preset(preset_shapes("ebseg-l")) == "ebseg-l"
    resolved = resolve_checkpoint(str(official_style))
    assert resolved.preset == "ebseg-tiny" and resolved.train_vocabulary is None

    with pytest.raises(CheckpointError, match="--preset ebseg-l does not match the checkpoint, which is ebseg-tiny"):
        resolve_checkpoint(str(official_style), preset="ebseg-l")
    broken = dict(state)
    dropped = sorted(broken)[5]
    del broken[dropped]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(str(tmp_path / "broken.pth"), preset="ebseg-tiny")
    assert "1 missing keys" in str(err.value) and dropped in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="fits no preset exactly; give --preset"):
        resolve_checkpoint(str(tmp_path / "broken.pth"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        resolve_checkpoint(str(tmp_path / "nothing_here"))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="without model.safetensors"):
        resolve_checkpoint(str(tmp_path / "empty_run"))


def test_run_directory_means_its_latest_or_best_checkpoint(tmp_path):
    from ebseg_core.checkpoint import META_FILE, save_weights

    torch.manual_seed(0)
    model = build_model("ebseg-tiny")
    run = tmp_path / "run"
    for name, iteration, miou in (("checkpoint_2026-11-30_01-00-00.000000", 10, 0.7),
                                  ("checkpoint_2026-11-30_02-00-00.000000", 20, 0.5)):
        (run / name).mkdir(parents=True)
        meta = {"iteration": iteration, "vocabulary": Vocabulary.parse("a,b").to_json()}
        save_weights(run / name / WEIGHTS_FILE, model, meta)
        (run / name / META_FILE).write_text(json.dumps({**meta, "metrics": {"val_miou": miou}}))
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert resolve_checkpoint(str(run)).iteration == 20
    assert resolve_checkpoint(str(run), best=True).iteration == 10
    assert resolve_checkpoint(str(run)).preset == "ebseg-tiny"


# ------------------------------------------------------------------------------------------------ slow
def test_resume_after_a_failure_gives_the_uninterrupted_losses(s3_run, ray_local, tmp_path):
    """Per-iteration losses and the final weights and optimizer state of a run that failed after its
    iteration-2 checkpoint and resumed equal the uninterrupted run's (``s3_run``: same data and config,
    another cluster and storage). The failure is injected by tests/train_faults.py, outside the training code."""
    import pipeline.train as training
    from tests.train_faults import FailOnceTrainer

    assert s3_run["proc"].returncode == 0, s3_run["proc"].stderr[-3000:]
    straight = json.loads((s3_run["tmp"] / "result.json").read_text())
    cfg = training.load_config(CONFIG, [*TINY_RUN, f"data.train={s3_run['data']}", "solver.max_iter=4",
                                        "run.checkpoint_period=2", f"run.storage_path={tmp_path / 'runs'}",
                                        "run.name=resumed", "run.max_failures=1"])
    resumed = training.train(cfg, trainer=functools.partial(FailOnceTrainer, fail_after=2))

    assert straight["resumed_from"] == -1 and resumed["resumed_from"] == 2
    assert [h[0] for h in resumed["loss_history"]] == [1, 2, 3, 4]
    assert resumed["loss_history"] == straight["loss_history"]  # exact, iteration by iteration

    a = training.load_train_state(str(s3_run["final_state"]))
    b = training.load_train_state(str(max((tmp_path / "runs" / "resumed").glob("checkpoint_2*")) / "train_state.pt"))
    assert a["iteration"] == b["iteration"] == 4
    for key, slot in a["optimizer"]["state"].items():
        for name, value in slot.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][key][name])), name
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name


@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory):
    """`ebseg train` of the tiny config into the moto bucket, as a user runs it (its own local Ray
    cluster), with a unique secret as AWS_SECRET_ACCESS_KEY (moto accepts any key)."""
    tmp = tmp_path_factory.mktemp("s3_run")
    data = _dataset(tmp / "data")
    storage = s3.url(f"trainckpt-{uuid.uuid4().hex[:8]}/runs")
    secret = "planted-" + uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="rck", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, **s3.env, "AWS_SECRET_ACCESS_KEY": secret, "RAY_TMPDIR": ray_tmp,
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs.train", "--config", CONFIG, "--result-json", str(tmp / "result.json"),
           "--set", *TINY_RUN, f"data.train={data}", f"run.storage_path={storage}", "run.name=tiny",
           "solver.max_iter=4", "run.checkpoint_period=2"]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp), capture_output=True, text=True, timeout=600)
    if proc.returncode and "timed out during startup" in proc.stderr:
        # Ray gives its own node 30 s (fixed) to register: on a saturated machine (load 40 measured) a
        # second start is the margin; the run itself resumes or restarts the same.
        proc = subprocess.run(cmd, env=env, cwd=str(tmp), capture_output=True, text=True, timeout=600)
    final_state = tmp / "final_train_state.pt"  # kept before any test plants a file in the bucket
    if proc.returncode == 0:
        run_key = storage.split("://", 1)[1] + "/tiny"
        latest = max(p for p in s3.fs.ls(run_key) if p.rsplit("/", 1)[-1].startswith("checkpoint_2"))
        s3.fs.get(f"{latest}/train_state.pt", str(final_state))
    try:
        yield {"proc": proc, "storage": storage, "secret": secret, "ray_tmp": Path(ray_tmp), "tmp": tmp, "data": data,
               "final_state": final_state}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_train_writes_no_secret_anywhere(s3_run, s3):
    proc, secret = s3_run["proc"], s3_run["secret"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scanned, found = 0, []
    for root in (s3_run["ray_tmp"], s3_run["tmp"]):  # Ray's session dirs and logs; the run's local files
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                scanned += 1
                if secret.encode() in path.read_bytes():
                    found.append(str(path))
    logs = list(s3_run["ray_tmp"].rglob("runtime_env*.log")) + list(s3_run["ray_tmp"].rglob("raylet.out"))
    assert logs, "Ray's session logs were not where the test looks"
    bucket_root = s3_run["storage"].split("://", 1)[1]
    objects = s3.fs.find(bucket_root)
    assert any(o.endswith(WEIGHTS_FILE) for o in objects) and any(o.endswith("train_state.pt") for o in objects)
    for key in objects:
        scanned += 1
        if secret.encode() in s3.fs.cat_file(key):
            found.append(f"s3://{key}")
    assert secret not in proc.stdout + proc.stderr
    # Each progress line once (Ray Train's print patch showed every worker print twice).
    assert (proc.stdout + proc.stderr).count("[train] iter 4/4 ") == 1, proc.stderr[-3000:]
    assert not found, f"the secret leaked into {found}"
    assert scanned > 20


def test_train_prints_the_label_command_and_segment_uses_its_result(s3_run, s3, tmp_path, capsys):
    proc, storage = s3_run["proc"], s3_run["storage"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_url = f"{storage}/tiny"
    assert f"ebseg label --input IMAGES_DIR_OR_URL --output LABELS_DIR_OR_URL --vocabulary " \
           f"'wall,sky;heaven,tree,grass' --checkpoint {run_url}" in proc.stdout

    rgb, _ = blob_image(96, 96, seed=11, num_classes=4)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    local_run = tmp_path / "run"
    s3.fs.get(run_url.split("://", 1)[1], str(local_run), recursive=True)
    checkpoints = sorted(local_run.glob("checkpoint_2*"))
    assert len(checkpoints) == 2
    latest = checkpoints[-1]
    weights_url = f"{run_url}/{latest.name}/{WEIGHTS_FILE}"

    outputs = {}
    for name, ckpt in (("run_dir", str(local_run)), ("ckpt_dir", str(latest)),
                       ("train_state", str(latest / "train_state.pt")), ("s3_weights", weights_url)):
        out = tmp_path / name
        rc = module_main(segment, [str(tmp_path / "img.png"), "--vocabulary", "wall,sky,tree,grass",
                                   "--checkpoint", ckpt, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert "(ebseg-tiny, iteration 4)" in err  # preset and iteration from the checkpoint's metadata
        outputs[name] = ((out / "img.label.png").read_bytes(), json.loads((out / "classes.json").read_text()))
    labels = {v[0] for v in outputs.values()}
    model_ids = {v[1]["model_id"] for v in outputs.values()}
    assert len(labels) == 1 and len(model_ids) == 1 and next(iter(model_ids)).startswith("ebseg-tiny:")
    assert decode_label_png(next(iter(labels))).shape == (96, 96)

    rc = module_main(segment, [str(tmp_path / "img.png"), "--vocabulary", "wall,sky", "--preset", "ebseg-b",
                               "--checkpoint", weights_url, "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "--preset ebseg-b does not match the checkpoint, which is ebseg-tiny" in err
    assert len(err.strip().splitlines()) == 1

    # The metadata carries the training classes (seen/unseen) and the settings validation used.
    resolved = resolve_checkpoint(weights_url)
    assert resolved.train_vocabulary.synonyms == (("wall",), ("sky", "heaven"), ("tree",), ("grass",))
    assert resolved.vocabulary_for(Vocabulary.parse("heaven,car")).seen == (True, False)
    assert resolved.model_config().test_min_size == 64 and resolved.model_config().gamma == 0.0
    first = resolve_checkpoint(str(checkpoints[0]))
    assert first.iteration == 2 and first.digest != resolved.digest

    # `ebseg evaluate` resolves the same way, on the driver (no Ray needed to see a mismatch).
    from pipeline.evaluate import EvalConfig, EvaluateError

    ev = EvalConfig(["voc20"], str(tmp_path), checkpoint=str(local_run))
    assert ev.preset == "ebseg-tiny" and ev.model.checkpoint.iteration == 4 and ev.model.config().test_min_size == 64
    with pytest.raises(EvaluateError, match="--preset ebseg-l does not match"):
        EvalConfig(["voc20"], str(tmp_path), checkpoint=weights_url, preset="ebseg-l")


def test_label_with_the_run_directory_in_object_storage(s3_run, s3, ray_local, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.label import LabelConfig, run_label

    assert s3_run["proc"].returncode == 0
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        rgb, _ = blob_image(96, 96, seed=20 + i, num_classes=4)
        Image.fromarray(rgb).save(images / f"im{i}.png")
    cfg = LabelConfig(output=str(tmp_path / "labels"), input=str(images), vocabulary="wall,sky,tree,grass",
                      checkpoint=f"{s3_run['storage']}/tiny", batch_size=2, progress_bars=False)
    summary = run_label(cfg, log=lambda _: None)
    table = pq.read_table(str(tmp_path / "labels"))
    assert table.num_rows == 2 and set(table.column("status").to_pylist()) == {"ok"}, summary
    model_ids = set(table.column("model_id").to_pylist())
    assert len(model_ids) == 1 and next(iter(model_ids)).startswith("ebseg-tiny:")


def test_resume_refuses_a_planted_train_state_and_runs_nothing(s3_run, s3, ray_local, tmp_path, capsys):
    """Someone who can write to the bucket plants a train_state.pt with code; rerunning the run refuses it
    (`ebseg train` in this process, on the test's Ray cluster: its workers would run the planted code)."""
    from jobs import train as job

    assert s3_run["proc"].returncode == 0
    run_key = f"{s3_run['storage']}/tiny".split("://", 1)[1]
    latest = max(p for p in s3.fs.ls(run_key) if p.rsplit("/", 1)[-1].startswith("checkpoint_2"))
    marker = tmp_path / "code_ran"
    planted = tmp_path / "train_state.pt"
    torch.save({"iteration": 4, "model": {}, "x": _Plant(marker)}, planted)
    s3.fs.put_file(str(planted), f"{latest}/train_state.pt")
    rc = module_main(job, ["--config", CONFIG, "--set", *TINY_RUN, f"data.train={s3_run['data']}",
                           f"run.storage_path={s3_run['storage']}", "run.name=tiny", "solver.max_iter=4",
                           "run.checkpoint_period=2"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ebseg train: error:")]
    assert rc == 2, err[-3000:]
    assert len(errors) == 1 and "refusing to load train_state.pt" in errors[0], err[-3000:]
    assert not marker.exists()


def test_label_refuses_bad_checkpoints_in_one_line_before_anything_starts(tmp_path):
    """The labeling job checks the checkpoint on the driver first: a truncated .pth, a file that is not
    safetensors, or weights of another preset give one line -- before the input is listed, so before
    any cluster could start (Ray starts only after planning)."""
    from PIL import Image

    from ebseg_core.data.synthetic import blob_image
    from pipeline.label import LabelConfig, LabelError, run_label

    (tmp_path / "in").mkdir()
    Image.fromarray(blob_image(32, 32, seed=1, num_classes=2)[0]).save(tmp_path / "in" / "a.png")
    torch.manual_seed(0)
    good = tmp_path / "tiny.pth"
    torch.save({"model": build_model("ebseg-tiny").state_dict()}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    for ckpt, preset, expect in [(cut, None, "cut.pth"), (garbage, None, "model.safetensors"),
                                 (good, "ebseg-b", "--preset ebseg-b does not match")]:
        out = tmp_path / f"out-{ckpt.stem}-{preset}"
        with pytest.raises(LabelError) as err:
            run_label(LabelConfig(output=str(out), input=str(tmp_path / "in"), vocabulary="a,b",
                                  checkpoint=str(ckpt), preset=preset), log=lambda _: None)
        assert expect in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert not out.exists()  # refused before the plan, the output, or a cluster
