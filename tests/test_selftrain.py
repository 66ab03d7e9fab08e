"""Self-training measured where the truth is known (issue #14, pipeline/selftrain.py): the scoring the
recipe and `make demo` use, the image-level selection (`most_confident`), the labelled truth mixed in
as label rows, and the in-process comparison of bench/bench_selftrain.py. No recipe measured so far
gains over its control by more than the fine-tune's own noise, so there is no gain test: see
docs/training.md, "Self-training, measured"."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.selftrain import score_labels


def test_score_labels_is_the_evaluators_miou(tmp_path):
    """The scoring the recipe uses gives 100 for the truth itself and less for a corrupted copy."""
    import numpy as np
    from PIL import Image

    from pipeline import schema as S
    from pipeline.selftrain import CLASS_NAMES, SelfTrainConfig, write_world

    world = write_world(str(tmp_path / "world"), SelfTrainConfig(str(tmp_path), labelled=1, lake=1, held_out=3))
    import pyarrow.parquet as pq

    def write(labels_url, corrupt: bool):
        rows = []
        for png in sorted((tmp_path / "world" / "held_out" / "labels").glob("*.png")):
            lab = np.array(Image.open(png)).astype(np.int64)
            lab[lab == 255] = 0
            if corrupt:
                lab[: lab.shape[0] // 2] = (lab[: lab.shape[0] // 2] + 1) % len(CLASS_NAMES)
            conf = np.ones(lab.shape, np.float32)
            uri = str(next((tmp_path / "world" / "held_out" / "images").glob(png.stem + ".*")))
            rows.append(S.make_ok_row(uri, lab, conf, list(CLASS_NAMES), "ebseg-tiny", "v"))
        schema = S.label_schema(list(CLASS_NAMES), [[n] for n in CLASS_NAMES], "v", {"preset": "ebseg-tiny"})
        (tmp_path / labels_url).mkdir()
        pq.write_table(S.rows_to_table(rows, schema), str(tmp_path / labels_url / "part-0.parquet"))
        return str(tmp_path / labels_url)

    assert score_labels(write("exact", False), world["held_out"]) == pytest.approx(100.0)
    assert score_labels(write("half", True), world["held_out"]) < 70.0


def _write_rows(path, rows):
    import pyarrow.parquet as pq

    from pipeline import schema as S
    from pipeline.selftrain import CLASS_NAMES

    schema = S.label_schema(list(CLASS_NAMES), [[n] for n in CLASS_NAMES], "v", {"preset": "ebseg-tiny"})
    path.mkdir(parents=True)
    pq.write_table(S.rows_to_table(rows, schema), str(path / "part-0.parquet"))
    return str(path)


def test_most_confident_keeps_the_images_of_highest_mean_confidence(tmp_path):
    """`most_confident` ranks rows by their whole label map's mean confidence, not by one class's."""
    import numpy as np

    from pipeline import schema as S
    from pipeline.label_source import LabelSourceSpec, list_label_samples
    from pipeline.selftrain import CLASS_NAMES

    rng = np.random.default_rng(0)
    means = rng.permutation(np.linspace(0.3, 0.9, 10))
    rows = []
    for i, m in enumerate(means):
        lab = np.zeros((8, 8), np.int64)
        lab[:2] = 1  # a small class whose confidence is the opposite of the image's: a per-class rank would differ
        conf = np.full((8, 8), m, np.float32)
        conf[:2] = 1.2 - m
        rows.append(S.make_ok_row(f"/img/{i}.png", lab, conf, list(CLASS_NAMES), "m", "v"))
    url = _write_rows(tmp_path / "labels", rows)
    got = list_label_samples(LabelSourceSpec.from_options(url, {"most_confident": 0.3})).samples
    whole = [(6 * m + 2 * (1.2 - m)) / 8 for m in means]
    want = {f"/img/{i}.png" for i in np.argsort(whole)[-3:]}
    assert {s.image for s in got} == want
    assert [s.image for s in got] == sorted((s.image for s in got), key=lambda u: int(u[5:-4]))  # dataset order
    everything = list_label_samples(LabelSourceSpec.from_options(url, {"most_confident": 1})).samples
    assert len(everything) == 10


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, "half", True])
def test_most_confident_outside_0_1_is_one_line(tmp_path, bad):
    from pipeline.curate import CurationError
    from pipeline.label_source import LabelSourceSpec

    with pytest.raises(CurationError, match="most_confident is a fraction in"):
        LabelSourceSpec.from_options(str(tmp_path), {"most_confident": bad})


def test_truth_rows_read_back_as_the_truth(tmp_path):
    """The labelled images' truth, mixed into the fine-tune as label rows, trains as the truth (the ignore band
    filled with a neighbouring class)."""
    import numpy as np
    from PIL import Image

    from pipeline import schema as S
    from pipeline.label_source import LabelSourceSpec, list_label_samples
    from pipeline.selftrain import CLASS_NAMES, SelfTrainConfig, write_truth_labels, write_world

    world = write_world(str(tmp_path / "world"), SelfTrainConfig(str(tmp_path), labelled=3, lake=1, held_out=0))
    img = next((tmp_path / "world" / "lake" / "images").iterdir())
    lake = _write_rows(tmp_path / "rows" / "lake", [S.make_ok_row(str(img), np.zeros((64, 64), np.int64),
                                                                  np.full((64, 64), 0.4, np.float32),
                                                                  list(CLASS_NAMES), "m", "v")])
    write_truth_labels(world["labelled"], lake, str(tmp_path / "rows" / "labelled"))
    listing = list_label_samples(LabelSourceSpec.from_options(str(tmp_path / "rows"), {"most_confident": 0.75}))
    assert len(listing.samples) == 3 and all("/labelled/" in s.image for s in listing.samples)  # confidence 1 first
    for s in listing.samples:
        image, label = listing.reader(s, len(CLASS_NAMES))
        truth = np.array(Image.open(tmp_path / "world" / "labelled" / "labels" / (s.image.rsplit("/", 1)[1][:-4] + ".png")))
        known = truth != 255
        assert image.shape[:2] == truth.shape and (label[known] == truth[known]).all()
        assert 0 < (~known).sum() and set(np.unique(label[~known])) <= set(range(len(CLASS_NAMES)))


def test_bench_selftrain_runs_on_the_training_jobs_pieces(tmp_path, capsys):
    """The in-process comparison builds on the training job's pieces; a rename there must fail here,
    not in the next person's measurement (it once imported a loss class that no longer existed). One
    iteration each (all_lake is recipe's path with more rows), on a hue-shifted lake pseudo-labelled with
    test-time augmentation."""
    from bench import bench_selftrain

    out = tmp_path / "r.json"
    assert bench_selftrain.main(["--seeds", "0", "--labelled", "2", "--lake", "2", "--held-out", "2", "--base-iters", "1",
                                 "--finetune-iters", "1", "--look", "hue-shift",
                                 "--variants", "recipe", "control", "class_balanced", "oracle",
                                 "--teacher-tta", "48,64", "--min-pixel-confidence", "0.5",
                                 "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    variants = ("recipe", "control", "class_balanced", "oracle")
    measured = ("before", "lake", "lake_kept", "lake_acc", "lake_acc_top50", "lake_acc_top30", *variants)
    assert set(result) == {"seed", *measured}
    assert all(0 <= result[k] <= 100 for k in measured)
    table = capsys.readouterr().out.splitlines()
    assert table[-1].split()[:2] == ["0", f"{result['before']:.1f}"] and table[-1].split()[-1].startswith(("+", "-"))


def test_class_balanced_selection_keeps_each_predicted_class_share():
    """Class-balanced selection keeps the most confident part of every predicted class, where one global
    threshold would drop the class the teacher is unsure of altogether."""
    from bench.bench_selftrain import class_balanced

    rng = np.random.default_rng(0)
    label = np.tile(np.array([0, 1], dtype=np.int64), (10, 5))  # columns of class 0 and 1 alternate
    conf = np.where(label == 0, rng.uniform(0.9, 1.0, label.shape), rng.uniform(0.3, 0.6, label.shape))
    image = np.zeros((10, 10, 3), np.uint8)
    ((_, kept),) = class_balanced([(label, conf.astype(np.float32))], [image], keep=0.5)
    for c in (0, 1):
        mine = label == c
        assert (kept[mine] == c).sum() == 25 and (kept[mine] == 255).sum() == 25
        assert conf[mine & (kept == c)].min() >= conf[mine & (kept == 255)].max()  # the confident half stays


def test_confidence_ranking_scores_the_most_confident_pixels():
    """The bench's calibration figures: the share of right pixels among all and among the most confident."""
    from bench.bench_selftrain import confidence_ranking

    truth = np.zeros((10, 10), np.uint8)
    truth[0, :] = 255  # ignored pixels count nowhere
    pred = np.zeros((10, 10), np.int64)
    pred[5:] = 1  # rows 5-9 wrong
    conf = np.where(pred == 0, 0.9, 0.95).astype(np.float32)
    conf[1:3] = 0.99  # rows 1-2: right and the most confident
    figures = confidence_ranking([(pred, conf)], [(None, truth)])
    assert figures["lake_acc"] == pytest.approx(100 * 40 / 90)
    assert figures["lake_acc_top30"] == pytest.approx(100 * 20 / 27)  # rows 1-2, then 7 of the wrong rows
    assert figures["lake_acc_top50"] == pytest.approx(100 * 20 / 45)
