"""`ebseg segment`: label PNGs and overlays for local images, and clear refusals."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from ebseg_core.data.synthetic import blob_image
from jobs import segment
from jobs.cli import module_main
from pipeline.schema import decode_label_png


def test_segment_writes_labels_and_overlays(tmp_path, capsys):
    rgb, _ = blob_image(90, 120, seed=5, num_classes=3)
    Image.fromarray(rgb).save(tmp_path / "blobs.png")
    out = tmp_path / "out"
    rc = module_main(segment, [str(tmp_path / "blobs.png"), "--vocabulary", "sky,tree;trees,road", "--preset", "ebseg-tiny",
                       "--random-weights", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "MEANINGLESS" in captured.err
    label = decode_label_png((out / "blobs.label.png").read_bytes())
    assert label.shape == (90, 120) and label.max() < 3
    overlay = Image.open(out / "blobs.overlay.png")
    assert overlay.height == 90 and overlay.width > 120  # image + legend panel
    meta = json.loads((out / "classes.json").read_text())
    assert meta["names"] == ["sky", "tree", "road"]


def test_segment_refuses_without_weights_or_inputs(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert module_main(segment, [str(img), "--vocabulary", "a,b", "--preset", "ebseg-tiny", "--out", str(tmp_path)]) == 2
    assert "--random-weights" in capsys.readouterr().err
    assert module_main(segment, [str(tmp_path / "nope.jpg"), "--vocabulary", "a", "--preset", "ebseg-tiny",
                         "--random-weights", "--out", str(tmp_path)]) == 2
    assert "image not found" in capsys.readouterr().err
    assert module_main(segment, [str(img), "--vocabulary", "a,a", "--preset", "ebseg-tiny", "--random-weights",
                         "--out", str(tmp_path)]) == 2
    assert "appears twice" in capsys.readouterr().err


def _exif_rotated_jpeg(path) -> tuple[int, int]:
    """A JPEG stored landscape with EXIF orientation 6 (display rotated 90 degrees): returns the
    displayed (height, width)."""
    rgb, _ = blob_image(40, 64, seed=9, num_classes=3)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return 64, 40


def test_segment_and_label_give_the_same_labels_for_an_exif_rotated_photo(tmp_path, capsys, ray_local):
    """One decoder for both commands: the same photo gets the same label map (at its displayed size)."""
    import pyarrow.parquet as pq

    from pipeline.label import LabelConfig, run_label

    photos = tmp_path / "photos"
    photos.mkdir()
    shape = _exif_rotated_jpeg(photos / "rotated.jpg")
    vocab = "sky,tree;trees,road"
    model = ["--preset", "ebseg-tiny", "--random-weights", "--inference-size", "32"]
    rc = module_main(segment, [str(photos / "rotated.jpg"), "--vocabulary", vocab, *model, "--out", str(tmp_path / "seg")])
    assert rc == 0, capsys.readouterr().err
    from_segment = decode_label_png((tmp_path / "seg" / "rotated.label.png").read_bytes())

    run_label(LabelConfig(output=str(tmp_path / "labels"), input=str(photos), vocabulary=vocab, preset="ebseg-tiny",
                          random_weights=True, inference_size=32, progress_bars=False), log=lambda _: None)
    row = pq.read_table(tmp_path / "labels" / "labels-000000.parquet").to_pylist()[0]
    from_label = decode_label_png(row["label_png"])
    assert from_segment.shape == from_label.shape == shape
    assert np.array_equal(from_segment, from_label)


def test_segment_device_that_is_not_there_is_one_line(tmp_path, capsys):
    import torch

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    n = torch.cuda.device_count()
    device = "cuda" if n == 0 else f"cuda:{n}"  # a device this machine does not have
    rc = module_main(segment, [str(img), "--vocabulary", "a,b", "--preset", "ebseg-tiny", "--random-weights",
                               "--device", device, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"ebseg segment: error: --device {device} asks for ") and err.count("\n") == 1
    assert "this machine has" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_segment_random_weights_give_the_same_labels_on_every_run(tmp_path, capsys):
    rgb, _ = blob_image(64, 80, seed=9, num_classes=4)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    labels = []
    for run in ("a", "b"):
        rc = module_main(segment, [str(tmp_path / "img.png"), "--vocabulary", "sky,tree,road,car,grass",
                                   "--preset", "ebseg-tiny", "--random-weights", "--inference-size", "64",
                                   "--out", str(tmp_path / run)])
        assert rc == 0, capsys.readouterr().err
        labels.append(decode_label_png((tmp_path / run / "img.label.png").read_bytes()))
    assert np.array_equal(labels[0], labels[1])
    assert module_main(segment, [str(tmp_path / "img.png"), "--vocabulary", "a,b", "--random-weights",
                                 "--checkpoint", "x.pth", "--out", str(tmp_path / "c")]) == 2
    assert "exclude each other" in capsys.readouterr().err
