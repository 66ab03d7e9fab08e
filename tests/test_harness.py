"""Smoke tests of the shared fixtures: if these fail, every other test's setup is suspect."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from ebseg_core.data.synthetic import IGNORE_INDEX, blob_image, class_color, label_uri_for, write_blob_images


def test_s3_fixture_env_points_at_moto(s3):
    import os

    assert s3.endpoint_url.startswith("http://127.0.0.1:")
    for key, value in s3.env.items():
        assert os.environ[key] == value
    assert s3.url("a/b.txt") == f"s3://{s3.bucket}/a/b.txt"


def test_s3fs_write_then_list(s3, s3_prefix):
    import s3fs

    key = s3_prefix[len("s3://"):] + "hello.txt"
    s3.fs.pipe_file(key, b"hi there")
    assert s3.fs.ls(s3_prefix[len("s3://"):]) == [key]
    # A default-constructed client (what user code does) reaches the same bucket via the env vars.
    plain = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    assert plain.cat_file(key) == b"hi there"


def test_pyarrow_write_then_list(s3, s3_prefix):
    import pyarrow.fs as pafs

    base = s3_prefix[len("s3://"):].rstrip("/")
    with s3.pa_fs.open_output_stream(f"{base}/x.bin") as out:
        out.write(b"\x00\x01\x02")
    infos = s3.pa_fs.get_file_info(pafs.FileSelector(base, recursive=True))
    assert [(i.path, i.size) for i in infos] == [(f"{base}/x.bin", 3)]
    # from_uri with no arguments honours AWS_ENDPOINT_URL and reaches moto too.
    fs, path = pafs.FileSystem.from_uri(s3_prefix + "x.bin")
    with fs.open_input_stream(path) as f:
        assert f.read() == b"\x00\x01\x02"
    # And the s3fs client sees what pyarrow wrote.
    assert s3.fs.cat_file(f"{base}/x.bin") == b"\x00\x01\x02"


def test_s3_prefix_is_unique(s3, s3_prefix, request):
    assert s3_prefix.startswith(f"s3://{s3.bucket}/")
    assert s3_prefix.endswith("/")
    assert not s3.fs.exists(s3_prefix[len("s3://"):])


def test_ray_data_reads_bucket_and_writes_parquet(ray_local, s3, s3_prefix):
    import pyarrow.parquet as pq
    import ray

    inputs = write_blob_images(s3_prefix + "in", 5, with_labels=False, seed=3)
    assert len(inputs) == 5

    class Measure:
        """Callable class, as the labeling job uses (one instance per actor)."""

        def __call__(self, batch):
            sizes = []
            for data in batch["bytes"]:
                with Image.open(io.BytesIO(data)) as im:
                    sizes.append(im.size[0] * im.size[1])
            return {"path": batch["path"], "pixels": np.asarray(sizes, dtype=np.int64)}

    ds = ray.data.read_binary_files(s3_prefix + "in/images/", include_paths=True)
    ds = ds.map_batches(Measure, batch_size=2, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    ds.write_parquet(s3_prefix + "out/")

    # pyarrow also leaves a zero-byte "out/" directory marker; count only the data files.
    out_keys = [k for k in s3.fs.find(s3_prefix[len("s3://"):] + "out/") if not k.endswith("/")]
    assert out_keys and all(k.endswith(".parquet") for k in out_keys)
    table = pq.read_table(s3_prefix[len("s3://"):] + "out/", filesystem=s3.pa_fs)
    rows = sorted(zip(table.column("path").to_pylist(), table.column("pixels").to_pylist()))
    assert [p.rsplit("/", 1)[1] for p, _ in rows] == [u.rsplit("/", 1)[1] for u in inputs]
    expected = [48 * 64, 64 * 48, 40 * 40, 56 * 72, 48 * 64]
    assert [px for _, px in rows] == expected


def test_job_submitted_to_ray_head_runs(ray_head):
    from ray.job_submission import JobStatus

    client = ray_head.client()
    job_id = client.submit_job(
        entrypoint="python -c \"import os; print('hello-from-job', os.environ['AWS_ENDPOINT_URL'])\""
    )
    deadline = time.time() + 180
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        assert time.time() < deadline, f"job still {status} after 180 s:\n{ray_head.log_tail()}"
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert "hello-from-job" in logs
    # The head was started with the moto endpoint, so jobs reach the test bucket.
    assert ray_head.env["AWS_ENDPOINT_URL"] in logs


def test_failing_job_reports_failed(ray_head):
    """submit_and_wait reports a failing job as FAILED with its output (it can fail)."""
    status, logs = ray_head.submit_and_wait(
        "python -c \"import sys; print('about-to-fail'); sys.exit(3)\"", timeout=180
    )
    assert status == "FAILED"
    assert "about-to-fail" in logs


def test_blob_image_is_deterministic_and_labels_in_range():
    rgb, label = blob_image(40, 56, seed=7, num_classes=5)
    assert rgb.shape == (40, 56, 3) and rgb.dtype == np.uint8
    assert label.shape == (40, 56) and label.dtype == np.uint8
    values = set(np.unique(label).tolist())
    assert values <= set(range(5)) | {IGNORE_INDEX}
    assert values - {IGNORE_INDEX}, "at least one class present"
    rgb2, label2 = blob_image(40, 56, seed=7, num_classes=5)
    assert np.array_equal(rgb, rgb2) and np.array_equal(label, label2)
    rgb3, _ = blob_image(40, 56, seed=8, num_classes=5)
    assert not np.array_equal(rgb, rgb3)


def test_blob_colours_correlate_with_labels():
    """Pixels of a class sit near that class's colour: a model can learn the classes."""
    rgb, label = blob_image(64, 64, seed=1, num_classes=4)
    for c in set(np.unique(label).tolist()) - {IGNORE_INDEX}:
        mean = rgb[label == c].astype(np.float32).mean(0)
        dists = [np.linalg.norm(mean - class_color(k)) for k in range(4)]
        assert int(np.argmin(dists)) == c, (c, dists)


def test_hue_jitter_turns_each_blob_within_its_bound_and_keeps_the_labels():
    """The jittered world has the same layout and truth; each blob's hue moves, never past the bound."""
    import colorsys

    rgb, label = blob_image(64, 80, seed=3, num_classes=4)
    rgb_j, label_j = blob_image(64, 80, seed=3, num_classes=4, hue_jitter=0.1)
    assert np.array_equal(label, label_j) and not np.array_equal(rgb, rgb_j)
    assert np.array_equal(blob_image(64, 80, seed=3, num_classes=4, hue_jitter=0.0)[0], rgb)
    def median_hue(img: np.ndarray, mask: np.ndarray) -> float:
        return colorsys.rgb_to_hsv(*(np.median(img[mask].astype(np.float32), 0) / 255))[0]

    turned = []
    for c in set(np.unique(label).tolist()) - {IGNORE_INDEX}:
        turn = (median_hue(rgb_j, label == c) - median_hue(rgb, label == c) + 0.5) % 1.0 - 0.5
        assert abs(turn) <= 0.1 + 0.02, (c, turn)  # shading and noise move a median hue a little
        turned.append(abs(turn))
    assert max(turned) > 0.01
    with pytest.raises(ValueError, match="hue_jitter"):
        blob_image(8, 8, seed=0, hue_jitter=0.7)


def test_write_blob_images_local_decodes(blob_corpus):
    assert len(blob_corpus.images) == 6
    assert [u.rsplit(".", 1)[1] for u in blob_corpus.images] == ["jpg", "png"] * 3
    for image_uri, label_uri in zip(blob_corpus.images, blob_corpus.labels):
        with Image.open(image_uri) as im:
            assert im.mode == "RGB"
            rgb = np.asarray(im)
        with Image.open(label_uri) as lm:
            assert lm.mode == "L"
            label = np.asarray(lm)
        assert rgb.shape[:2] == label.shape
        assert set(np.unique(label).tolist()) <= set(range(blob_corpus.num_classes)) | {IGNORE_INDEX}


def test_write_blob_images_to_s3(s3, s3_prefix):
    uris = write_blob_images(s3_prefix + "c", 3, sizes=[(32, 32)], num_classes=3, seed=5)
    assert uris == [s3_prefix + f"c/images/blob_{i:05d}.{ext}" for i, ext in enumerate(["jpg", "png", "jpg"])]
    for uri in uris:
        label = np.asarray(Image.open(io.BytesIO(s3.fs.cat_file(label_uri_for(uri)[5:]))))
        assert label.shape == (32, 32)
        assert set(np.unique(label).tolist()) <= {0, 1, 2, IGNORE_INDEX}
    with pytest.raises(ValueError):
        label_uri_for("s3://b/elsewhere/x.jpg")
