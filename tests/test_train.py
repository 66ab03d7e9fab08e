"""Training pipeline: config handling, solver pieces, bad-data errors (fast) and real Ray Train runs (slow):
two nodes + moto S3 (loss goes down, validation reduced over both nodes, resume after a failure injected by
tests/train_faults.py) and a `ray job submit` of jobs.train. Exact resume (losses equal to an
uninterrupted run's) and the checkpoint formats are tested in tests/test_checkpoints.py."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ebseg_core import build_model
from ebseg_core.checkpoint import resolve_checkpoint
from ebseg_core.data.synthetic import write_blob_images
from ebseg_core.evaluation import SemSegEvaluator
from ebseg_core.solver import SolverConfig, param_groups, poly_lr_factor
from ebseg_core.train_data import ignore_label_for
from pipeline.train import ConfigError, apply_overrides, config_from_dict, load_config, load_train_state, prepare
from tests.helpers import REPO_ROOT, ray_exe

CONFIGS = REPO_ROOT / "configs"
CLASS_NAMES = "wall\nsky;heaven\ntree\ngrass\n"


# ------------------------------------------------------------------------------------------------ fast
def test_official_configs_load_with_the_official_recipe():
    b = load_config(str(CONFIGS / "ebseg_b_coco171.yaml"))
    l = load_config(str(CONFIGS / "ebseg_l_coco171.yaml"))
    assert (b.solver.base_lr, b.solver.weight_decay, b.solver.clip_grad_norm) == (1e-4, 0.05, 0.01)
    assert (b.solver.ims_per_batch, b.solver.max_iter, b.solver.poly_power) == (16, 120000, 0.9)
    assert b.augment.min_sizes == (320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960)
    assert b.augment.crop_size == (640, 640) and b.criterion.num_points == 12544
    assert l.model.preset == "ebseg-l" and l.solver.base_lr == 8e-5 and l.data.layout == "coco171"
    tiny = load_config(str(CONFIGS / "tiny_generic.yaml"), ["solver.max_iter=7", "run.use_gpu=false"])
    assert tiny.solver.max_iter == 7 and tiny.model.preset == "ebseg-tiny"
    blobs = load_config(str(CONFIGS / "tiny_blobs.yaml")).model.spec().config()  # the run's validation settings
    assert (blobs.name, blobs.test_min_size, blobs.alpha, blobs.beta, blobs.gamma) == ("ebseg-tiny", 64, 0.0, 0.0, 0.0)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'solver.lr'"):
        config_from_dict({"solver": {"lr": 1}})
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["solver.max_iter"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="crop_size"):
        config_from_dict({"augment": {"crop_size": [800, 800]}})
    with pytest.raises(ConfigError, match="model: inference gamma must be in"):
        prepare(config_from_dict({"data": {"train": str(tmp_path)}, "model": {"inference_gamma": 1.5}}))


def test_poly_lr_and_warmup():
    s = SolverConfig(max_iter=100, poly_power=0.9)
    assert poly_lr_factor(0, s) == 1.0
    assert math.isclose(poly_lr_factor(50, s), 0.5**0.9)
    assert poly_lr_factor(100, s) == 0.0
    w = SolverConfig(max_iter=100, warmup_iters=10, warmup_factor=0.1)
    assert math.isclose(poly_lr_factor(0, w), 0.1) and math.isclose(poly_lr_factor(5, w), 0.55 * 0.95**0.9)


def test_param_groups_follow_official_decay_rules():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.norm = torch.nn.LayerNorm(2)
            self.pos_embed = torch.nn.Parameter(torch.zeros(3))
            self.clip_proj = torch.nn.Linear(2, 2)
            self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)

    s = SolverConfig(base_lr=1.0, weight_decay=0.05, clip_multiplier=0.5)
    groups = {g["name"]: g for g in param_groups(M(), s)}
    assert "frozen.weight" not in groups
    assert groups["lin.weight"]["weight_decay"] == 0.05 and groups["norm.weight"]["weight_decay"] == 0.0
    assert groups["pos_embed"]["weight_decay"] == 0.0
    assert groups["clip_proj.weight"]["lr"] == 0.5 and groups["lin.bias"]["lr"] == 1.0


def _generic_dataset(root: Path, n: int, seed: int, names: str = CLASS_NAMES, num_classes: int = 4):
    write_blob_images(root, n, sizes=((128, 128), (112, 144)), num_classes=num_classes, seed=seed)
    (root / "class_names.txt").write_text(names)


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from jobs import train as job

    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    rc = job.run(parser.parse_args(argv))
    return rc, capsys.readouterr().err


def test_bad_datasets_give_named_errors_before_any_worker_starts(tmp_path, capsys):
    cfg = str(CONFIGS / "tiny_generic.yaml")
    data = tmp_path / "d"
    _generic_dataset(data, 4, seed=0)
    unlabeled = tmp_path / "u"
    _generic_dataset(unlabeled, 4, seed=0)
    shutil.rmtree(unlabeled / "labels")
    rc, err = _run_cli(["--config", cfg, "--set", f"data.train={unlabeled}"], capsys)
    assert rc == 2 and "blob_00000" in err and "has a label file" in err and "Traceback" not in err

    data2 = tmp_path / "d2"
    _generic_dataset(data2, 4, seed=0, names="wall\nsky\ntree\n")  # labels use 4 classes
    rc, err = _run_cli(["--config", cfg, "--set", f"data.train={data2}"], capsys)
    assert rc == 2 and "has value 3 but the dataset has 3 classes" in err

    rc, err = _run_cli(["--config", cfg, "--set", f"data.train={data2}", "data.vocabulary=a,b"], capsys)
    assert rc == 2 and "lists 3 classes but the vocabulary" in err

    (data / "images" / "blob_00000.jpg").write_bytes(b"garbage")
    rc, err = _run_cli(["--config", cfg, "--set", f"data.train={data}", "data.skip_bad=true"], capsys)
    assert rc == 2 and "unreadable image" in err and "blob_00000.jpg" in err

    rc, err = _run_cli(["--config", cfg, "--set", "solver.ims_per_batch=3", f"data.train={data2}"], capsys)
    assert rc == 2 and "not divisible" in err

    rc, err = _run_cli(["--config", cfg, "--set", "solver.nope=1"], capsys)
    assert rc == 2 and "unknown config key 'solver.nope'" in err


def test_prepare_lists_remote_dataset(s3, s3_prefix):
    root = s3_prefix + "train"
    write_blob_images(root, 5, sizes=((64, 64),))
    s3.fs.pipe_file(root.split("://", 1)[1] + "/class_names.txt", CLASS_NAMES.encode())
    cfg = load_config(str(CONFIGS / "tiny_generic.yaml"), [f"data.train={root}"])
    payload = prepare(cfg)
    assert len(payload["samples"]) == 5 and payload["samples"][0][0].startswith("s3://")
    assert json.loads(payload["vocabulary"])["synonyms"][1] == ["sky", "heaven"]


def test_worker_payload_does_not_grow_with_the_sample_count(tmp_path):
    """Issue #14: the driver sends its workers shard URLs and counts, not the sample list. A generated
    manifest of 100,000 entries (pointing at three real images) costs the payload what 1,000 do, plus one
    shard URL per 65,536 samples; the workers' view of the shards gives back every entry in order and
    the training stream decodes real samples from it."""
    from ebseg_core.train_data import AugmentConfig, SampleShards, ShardedSamples, TrainSampleDataset
    from pipeline.train import worker_payload

    data = tmp_path / "three"
    _generic_dataset(data, 3, seed=0)
    listing = prepare(load_config(str(CONFIGS / "tiny_generic.yaml"), [f"data.train={data}"]))
    real = listing["samples"]

    def payload_for(n: int) -> tuple[dict, int]:
        cfg = load_config(str(CONFIGS / "tiny_generic.yaml"),
                          [f"data.train={data}", f"run.storage_path={tmp_path / 'runs'}", f"run.name=n{n}"])
        manifest = [real[i % 3] for i in range(n)]
        payload = worker_payload(cfg, {**listing, "samples": manifest, "val_samples": manifest[:8]})
        return payload, len(json.dumps(payload))

    (small, small_bytes), (large, large_bytes) = payload_for(1_000), payload_for(100_000)
    listed_bytes = len(json.dumps(real * 33_334))  # what the former payload held for 100k samples
    print(f"worker payload: {small_bytes} bytes for 1,000 samples, {large_bytes} bytes for 100,000 "
          f"(the list itself: {listed_bytes} bytes)")
    assert "samples" not in large and "val_samples" not in large
    assert large["train_shards"]["counts"] == [65536, 34464] and small["train_shards"]["counts"] == [1000]
    url_bytes = len(json.dumps(large["train_shards"]["urls"][0]))
    assert large_bytes <= small_bytes + url_bytes + 16 and listed_bytes > 100 * large_bytes

    view = ShardedSamples(SampleShards.from_dict(large["train_shards"]))
    assert len(view) == 100_000
    for i in (0, 65_535, 65_536, 99_999):
        assert (view[i].image, view[i].label) == tuple(real[i % 3])
    stream = TrainSampleDataset(view, 4, AugmentConfig(min_sizes=(64,), crop_size=(64, 64), pad_size=64),
                                rank=1, world_size=2, seed=0)
    for position in (0, 49_999, 50_000):
        assert stream[position]["image"].shape == (3, 64, 64)


# ------------------------------------------------------------------------------------------------ slow
TWO_NODE_ITERS = 24  # reports every 4, a checkpoint at 12 and 24, the failure injected at 16


def test_two_node_training_on_s3_learns_and_resumes_exactly(two_nodes, s3, s3_prefix, tmp_path):
    """Two workers on two nodes (DDP over gloo), data and checkpoints in the bucket, one injected failure:
    the run resumes from its checkpoint with every worker's RNG state, its loss goes clearly down, and its
    validation score, sharded over the nodes and reduced, is the mIoU of its weights on all held-out images.
    24 iterations: the loss's first drop (the class terms) is clear by then; 128 were needed before for a
    val mIoU bar above chance, which is no longer asserted (see docs/training.md, "Tests")."""
    address, env, slowness = two_nodes
    n, half, period = TWO_NODE_ITERS, TWO_NODE_ITERS // 2, TWO_NODE_ITERS // 6
    train_url, val_url = s3_prefix + "train", s3_prefix + "val"
    local_val = tmp_path / "val"
    _generic_dataset(local_val, 4, seed=1000)  # two per node: each inference costs ~1 s on 2 cores
    s3.fs.put(str(local_val), val_url.split("://", 1)[1], recursive=True)
    local_train = tmp_path / "train"
    _generic_dataset(local_train, 32, seed=0)
    s3.fs.put(str(local_train), train_url.split("://", 1)[1], recursive=True)
    shutil.rmtree(local_train)  # nothing local: workers and driver read the bucket
    result_json = tmp_path / "result.json"
    storage = s3_prefix + "runs"
    cmd = [
        sys.executable, "-m", "tests.train_faults", "--fail-after", str(half),
        "--address", address, "--config", str(CONFIGS / "tiny_generic.yaml"),
        "--result-json", str(result_json), "--set", f"data.train={train_url}", f"data.val={val_url}",
        f"run.storage_path={storage}", "run.name=two-node", "run.num_workers=2", "run.placement_strategy=STRICT_SPREAD",
        f"solver.max_iter={n}", "solver.base_lr=0.002", "solver.ims_per_batch=4", f"run.checkpoint_period={half}",
        f"run.log_period={period}", f"run.val_period={n}", "run.max_failures=1", "run.num_to_keep=5",
    ]  # fmt: skip
    t0 = time.time()
    # 120-167 s driver wall at load average 7-11 (2026-11-30; the former 128 iterations: 372-374 s).
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600 * slowness)
    wall = time.time() - t0
    (tmp_path / "driver.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(result_json.read_text())
    print(f"two-node run: {wall:.0f} s wall, {result['it_per_s']:.2f} it/s, val mIoU {result['val_miou']:.3f}, "
          f"loss {[round(h[1], 1) for h in result['loss_history']]}")

    # Both workers ran, on different nodes, and the run finished after one injected failure (at the
    # first report after the mid-run checkpoint).
    assert result["iteration"] == n and result["world_size"] == 2 and result["num_nodes"] == 2
    assert result["resumed_from"] == half
    # (Not counted here: both test nodes share one session log dir on this machine, so each node's log
    # monitor forwards every worker line; the once-per-line check is in the single-node job tests.)

    # Checkpoints load as plain tensors and values (weights_only=True) and hold every worker's RNG state.
    ckpts = sorted(p for p in s3.fs.ls(storage.split("://", 1)[1] + "/two-node") if p.rsplit("/", 1)[-1].startswith("checkpoint_2"))
    states = {}
    for c in ckpts:
        local = tmp_path / (c.rsplit("/", 1)[-1] + ".pt")
        s3.fs.get(c + "/train_state.pt", str(local))
        st = load_train_state(str(local))
        states[st["iteration"]] = st
    assert {half, n} <= set(states)
    assert states[n]["loss_history"][: half // period] == states[half]["loss_history"]  # the resumed run continued its history
    rng = states[n]["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # each worker's own state
    assert set(states[n]["model"]) and all(not k.startswith("clip_rec_head.") for k in states[n]["model"])
    assert any(not torch.equal(v, states[half]["model"][k]) for k, v in states[n]["model"].items())  # trained on

    # Loss goes down: the mean over the last reports is well below the first.
    hist = result["loss_history"]
    assert [h[0] for h in hist] == list(range(period, n + 1, period)), hist
    first, last = hist[0][1], sum(h[1] for h in hist[-2:]) / 2
    assert last < 0.85 * first, hist

    # Validation covered every held-out image on both nodes: the reported score is the mIoU of the final
    # weights (from the bucket) on the whole validation set, recomputed here the way validation runs them.
    final = resolve_checkpoint(f"{storage}/two-node")
    assert final.iteration == n
    model = build_model(final.model_config(), checkpoint=final).eval()
    vocab = final.train_vocabulary
    evaluator = SemSegEvaluator(len(vocab), ignore_label_for(len(vocab)))
    with torch.no_grad():
        for label_png in sorted((local_val / "labels").glob("*.png")):
            image = next((local_val / "images").glob(label_png.stem + ".*"))
            rgb = np.asarray(Image.open(image).convert("RGB"))
            label = np.asarray(Image.open(label_png)).astype(np.int64)
            evaluator.process(model.segment([rgb], vocab, batch_size=1)[0].label_map, label)
    assert evaluator.compute()["mIoU"] / 100.0 == pytest.approx(result["val_miou"], abs=1e-3)


def test_ray_job_submit_trains_and_leaves_checkpoint_in_bucket(ray_head, s3, s3_prefix, tmp_path):
    train_url = s3_prefix + "train"
    local = tmp_path / "train"
    _generic_dataset(local, 4, seed=5)
    s3.fs.put(str(local), train_url.split("://", 1)[1], recursive=True)
    storage = s3_prefix + "runs"
    cmd = [
        ray_exe(), "job", "submit", "--address", ray_head.dashboard_url, "--",
        "python", "-m", "jobs.train", "--config", str(CONFIGS / "tiny_generic.yaml"), "--set",
        f"data.train={train_url}", f"run.storage_path={storage}", "run.name=submitted", "run.num_workers=1",
        "solver.ims_per_batch=2", "solver.max_iter=2", "run.checkpoint_period=2", "run.log_period=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("[train] iter 2/2 ") == 1 and out.count("[train] iter 1/2 ") == 1 and "[train] done" in out
    assert "Reporting training result" not in out  # Ray Train's per-report lines (the whole metrics dict)
    ckpts = [p for p in s3.fs.ls(storage.split("://", 1)[1] + "/submitted") if p.rsplit("/", 1)[-1].startswith("checkpoint_2")]
    assert len(ckpts) == 1
    assert s3.fs.exists(ckpts[0] + "/train_state.pt") and s3.fs.exists(ckpts[0] + "/meta.json")
    meta = json.loads(s3.fs.cat_file(ckpts[0] + "/meta.json"))
    assert meta["iteration"] == 2 and meta["preset"] == "ebseg-tiny"
