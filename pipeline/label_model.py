"""Stage 2 of the labeling job: the model actor, one EBSeg per actor (Ray Data callable class)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from ebseg_core.model_spec import ModelSpec, padded_size
from ebseg_core.vocabulary import Vocabulary
from pipeline import schema as S


class Labeler:
    """Builds EBSeg once per actor (text embeddings are cached by the model), then labels batches of
    decoded images: one model call per group of equal padded size, at most ``spec.batch_size`` images.

    A batch whose model call fails is labeled again one image at a time, so one bad image costs one
    ``model`` error row. Tests inject faults with a subclass (tests/label_faults.py), passed to
    ``run_label(..., labeler=...)``.
    """

    def __init__(self, spec: ModelSpec, vocabulary: Vocabulary):
        t0 = time.time()
        import torch

        self.torch = torch
        self.model = spec.build()
        self.spec = spec
        self.sizing = spec.input_sizing()
        self.vocab = vocabulary
        if self.model.model_id != spec.model_id:  # the writers record spec.describe(): it must name this model
            raise RuntimeError(f"built {self.model.model_id}, the spec says {spec.model_id}")
        self.model_id = spec.model_id
        self.label_dtype = np.uint8 if len(vocabulary) <= 256 else np.uint16
        print(f"[label] model actor ready in {time.time() - t0:.1f} s: {self.model_id} on {self.model.device}, "
              f"{len(vocabulary)} classes", flush=True)

    def _segment(self, images: list[np.ndarray]) -> list:
        with self.torch.inference_mode():
            return self.model.segment(images, self.vocab, batch_size=self.spec.batch_size,
                                      precision=self.spec.precision)

    def _calls(self, images: list[np.ndarray]) -> list[list[int]]:
        """Indices of ``images`` per model call: equal padded size, at most batch_size each."""
        groups: dict[tuple[int, int], list[int]] = {}
        for k, img in enumerate(images):
            groups.setdefault(padded_size(img.shape[0], img.shape[1], *self.sizing), []).append(k)
        b = self.spec.batch_size
        return [idx[i:i + b] for idx in groups.values() for i in range(0, len(idx), b)]

    def _run(self, images: list[np.ndarray]) -> tuple[list, list[float], list[int]]:
        """(result or exception, milliseconds, images in its model call) per image."""
        results: list = [None] * len(images)
        ms = [0.0] * len(images)
        sizes = [0] * len(images)
        for call in self._calls(images):
            t0 = time.perf_counter()
            try:
                out = self._segment([images[k] for k in call])
                per = (time.perf_counter() - t0) * 1000.0 / len(call)
                for k, res in zip(call, out):
                    results[k], ms[k], sizes[k] = res, per, len(call)
            except Exception:  # noqa: BLE001 - find the image that fails, label the rest
                for k in call:
                    t1 = time.perf_counter()
                    try:
                        results[k] = self._segment([images[k]])[0]
                    except Exception as exc:  # noqa: BLE001
                        results[k] = exc
                    ms[k], sizes[k] = (time.perf_counter() - t1) * 1000.0, 1
        return results, ms, sizes

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status = batch.column("status").to_pylist()
        kinds = batch.column("error_kind").to_pylist()
        errors = batch.column("error").to_pylist()
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        pixels = batch.column("pixels").to_pylist()
        labels: list[bytes | None] = [None] * n
        confs: list[bytes | None] = [None] * n
        ms: list[float | None] = [None] * n
        call_sizes: list[int] = [0] * n
        todo = [i for i in range(n) if status[i] == S.STATUS_OK]
        images = [np.frombuffer(pixels[i], np.uint8).reshape(heights[i], widths[i], 3) for i in todo]
        results, times, sizes = self._run(images)
        for i, res, t, size in zip(todo, results, times, sizes):
            call_sizes[i] = size
            if isinstance(res, Exception):
                status[i], kinds[i], errors[i] = S.STATUS_ERROR, "model", f"{type(res).__name__}: {res}"
                continue
            lab = res.label_map.detach().to("cpu").numpy()
            conf = res.confidence.detach().float().to("cpu").numpy()
            if lab.shape != (heights[i], widths[i]):
                status[i], kinds[i] = S.STATUS_ERROR, "model"
                errors[i] = f"model returned a {lab.shape} label map for a {heights[i]}x{widths[i]} image"
                continue
            labels[i] = lab.astype(self.label_dtype).tobytes()
            confs[i] = conf.astype(np.float16).tobytes()
            ms[i] = t
        out = batch.drop_columns(["pixels", "status", "error_kind", "error"])
        for name, values, typ in (("status", status, pa.string()), ("error_kind", kinds, pa.string()),
                                  ("error", errors, pa.string()), ("label_raw", labels, pa.large_binary()),
                                  ("confidence_raw", confs, pa.large_binary()), ("duration_ms", ms, pa.float32()),
                                  ("call_images", call_sizes, pa.int32())):
            out = out.append_column(name, pa.array(values, typ))
        return out
