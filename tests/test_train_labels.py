"""`ebseg train` straight from label Parquet (issue #14): a curation query picks the rows, the workers
read images and label rows by URI, and `model.checkpoint` fine-tunes from a run directory."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from ebseg_core import Vocabulary, build_model
from ebseg_core.checkpoint import META_FILE, WEIGHTS_FILE, resolve_checkpoint, save_weights
from jobs import train as train_job
from jobs.cli import module_main
from pipeline.label_source import LabelSourceSpec, list_label_samples
from tests.conftest import REPO_ROOT
from tests.test_checkpoints import TINY_RUN
from tests.test_curate_data import build_label_dataset
from tests.train_faults import LoaderCheckingTrainer

CONFIG = str(REPO_ROOT / "configs" / "tiny_generic.yaml")
QUERY = {"classes": [{"name": "car", "min_fraction": 0.02}], "without": ["road"],
         "keep_classes": ["grass", "car", "edge"], "min_pixel_confidence": 0.4}


@pytest.fixture(scope="module")
def lake(s3, tmp_path_factory):
    """Label Parquet of blob images in the bucket, and a base run directory holding tiny weights."""
    fx = build_label_dataset(s3, s3.url(f"train-labels-{os.getpid()}/"), n_images=14, n_files=2, seed=5)
    run = tmp_path_factory.mktemp("base") / "run"
    torch.manual_seed(123)  # not the workers' seed: a fresh init differs from these weights
    model = build_model("ebseg-tiny")
    for name in ("checkpoint_2026-11-30_01-00-00.000000", "checkpoint_2026-11-30_02-00-00.000000"):
        (run / name).mkdir(parents=True)
        meta = {"iteration": 3, "vocabulary": Vocabulary.parse("a,b").to_json()}
        save_weights(run / name / WEIGHTS_FILE, model, meta)
        (run / name / META_FILE).write_text(json.dumps(meta))
    return fx, run


def _overrides(fx, run, tmp, *extra: str) -> list[str]:
    return [*TINY_RUN, "data.layout=labels", f"data.train={fx.url}", f"data.labels={json.dumps(QUERY)}",
            f"model.checkpoint={run}", f"run.storage_path={tmp / 'runs'}", *extra]


def test_prepare_lists_the_query_rows_and_resolves_the_base_run_directory(lake, tmp_path):
    from pipeline.train import load_config, prepare

    fx, run = lake
    payload = prepare(load_config(CONFIG, _overrides(fx, run, tmp_path)))
    want = list_label_samples(LabelSourceSpec.from_options(fx.url, QUERY))
    assert [tuple(s) for s in payload["samples"]] == [(s.image, s.label) for s in want.samples]
    assert 3 <= len(payload["samples"]) < 14  # the query keeps some rows, not all
    vocab = Vocabulary.from_json(payload["vocabulary"])
    assert vocab.synonyms == (("grass", "lawn", "turf"), ("car", "automobile"), ("edge",))
    assert payload["label_reader"]["label_filter"]["min_confidence"] == 0.4
    # a run directory means its latest checkpoint's weights file, fixed for every worker
    latest = resolve_checkpoint(str(run)).weights_url
    assert payload["config"]["model"]["checkpoint"] == latest and latest.endswith(
        "checkpoint_2026-11-30_02-00-00.000000/" + WEIGHTS_FILE)


@pytest.mark.parametrize("extra, message", [
    (['data.labels={"classes": ["cat"]}'], "data.labels: "),
    (['data.labels={"colour": "red"}'], "data.labels: unknown label-source option(s) colour"),
    (["model.preset=ebseg-b"], "model.checkpoint: "),
])
def test_label_source_mistakes_are_one_line(lake, tmp_path, capsys, extra, message):
    fx, run = lake
    rc = module_main(train_job, ["--config", CONFIG, "--set", *_overrides(fx, run, tmp_path), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"ebseg train: error: {message}") and len(err.strip().splitlines()) == 1, err


def test_fine_tune_from_label_parquet_with_a_query(lake, ray_local, tmp_path):
    """A few iterations from the base run on the selected label rows: the workers read label rows (a
    generic reader would refuse the row references), treat their ignore pixels as unknown, and the
    result carries the query's classes."""
    from safetensors.torch import load_file

    from pipeline.train import load_config, train

    fx, run = lake
    # Its loader must read pseudo-label ignore pixels as unknown (the losses skip them), not as "no class".
    checking = functools.partial(LoaderCheckingTrainer, expect_unknown=True)
    result = train(load_config(CONFIG, _overrides(fx, run, tmp_path, "run.name=ft", "solver.max_iter=3",
                                                  "run.checkpoint_period=3")), trainer=checking)
    assert [h[0] for h in result["loss_history"]] == [1, 2, 3] and result["bad_samples"] == 0
    assert "--vocabulary 'grass;lawn;turf,car;automobile,edge'" in result["label_command"]
    tuned = resolve_checkpoint(result["run_dir"])
    assert tuned.iteration == 3 and tuned.preset == "ebseg-tiny"
    assert tuned.train_vocabulary.synonyms == (("grass", "lawn", "turf"), ("car", "automobile"), ("edge",))
    base = load_file(resolve_checkpoint(str(run)).weights_url)
    after = load_file(tuned.weights_url)
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert any(k.startswith("sem_seg_head.") for k in changed)  # it trained
    assert all(torch.equal(base[k], after[k]) for k in base if k.startswith("clip_rec_head."))  # frozen: from the base
