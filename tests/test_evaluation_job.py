"""`ebseg evaluate` as a Ray job on a real head: the tiny model over a benchmark in the moto bucket."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from ebseg_core.data.synthetic import blob_image


def test_tiny_model_evaluation_job_writes_table(ray_head, s3, s3_prefix, tmp_path):
    root = tmp_path / "d"
    (root / "VOC2012/JPEGImages").mkdir(parents=True)
    (root / "VOC2012/annotations_detectron2/val").mkdir(parents=True)
    for i in range(4):
        rgb, label = blob_image(48, 64, seed=i, num_classes=20)
        Image.fromarray(rgb).save(root / f"VOC2012/JPEGImages/im{i}.jpg")
        Image.fromarray(label.astype(np.uint8)).save(root / f"VOC2012/annotations_detectron2/val/im{i}.png")
    for f in sorted(root.rglob("*")):
        if f.is_file():
            s3.fs.put_file(str(f), s3_prefix + "data/" + f.relative_to(root).as_posix())
    status, logs = ray_head.submit_and_wait(
        f"python -m jobs.evaluate --dataset voc20 --root {s3_prefix}data --preset ebseg-tiny --random-weights "
        f"--inference-size 64 --num-actors 1 --batch-size 2 --out {s3_prefix}out/",
        timeout=560,
    )
    assert status == "SUCCEEDED", logs[-4000:]
    assert "| Model | VOC |" in logs and "images/s" in logs
    doc = json.loads(s3.fs.cat(s3_prefix + "out/results.json"))
    voc = doc["datasets"]["voc20"]
    assert voc["num_images"] == 4 and voc["errors"] == []
    assert 0 <= voc["mIoU"] <= 100 and len(voc["IoU"]) == 20
    assert doc["model"]["preset"] == "ebseg-tiny" and doc["images_per_second"] > 0
    print("tiny evaluation images/s (job wall clock, incl. model build):", doc["images_per_second"])
