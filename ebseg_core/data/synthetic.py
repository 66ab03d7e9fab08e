"""A synthetic world whose truth is known: smooth coloured blobs with matching label maps.

Used by the tests, the benchmarks, `make demo` and the self-training recipe.

Each class has a fixed colour (the same in every image), so a model trained on these images can
learn the classes from colour alone; the blobs are smooth so the images survive JPEG. Label maps use
classes ``0..K-1`` and, by default, ``255`` (ignore) on a thin band along class boundaries, like the
benchmark datasets do.

Layout written by :func:`write_blob_images` under a root URL (local dir or any fsspec URL)::

    <root>/images/blob_00000.jpg   (even indices JPEG, odd indices PNG)
    <root>/labels/blob_00000.png   (uint8 class indices, 255 = ignore; only with_labels=True)
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..storage import filesystem_for

IGNORE_INDEX = 255
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((48, 64), (64, 48), (40, 40), (56, 72))


def class_color(class_id: int, hue_turn: float = 0.0) -> np.ndarray:
    """A fixed, well separated RGB colour per class (golden-ratio hue walk), float in [0, 255];
    ``hue_turn`` moves its hue by that fraction of the circle."""
    hue = (class_id * 0.618033988749895 + hue_turn) % 1.0
    sat = 0.85 if class_id % 2 == 0 else 0.6
    val = 0.95 if (class_id // 2) % 2 == 0 else 0.7
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0


def blob_image(
    h: int,
    w: int,
    seed: int,
    num_classes: int = 4,
    ignore_boundary: bool = True,
    hue_jitter: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its label map.

    Returns ``(rgb, label)``: ``rgb`` uint8 ``[h, w, 3]``, ``label`` uint8 ``[h, w]`` with values in
    ``0..num_classes-1`` (plus 255 on class boundaries when ``ignore_boundary``). The background is one
    class; 2-6 elliptical blobs of other (random) classes lie on top. Deterministic in ``seed``.

    ``hue_jitter``: each layer's colour turns by a uniform draw in ``±hue_jitter`` of the hue circle
    (its own random stream, so 0 gives the same images as before): a world whose classes vary in look,
    where a few labelled images need not show every look of a class.
    """
    if not 1 <= num_classes <= 255:
        raise ValueError(f"num_classes must be in 1..255, got {num_classes}")
    if h < 4 or w < 4:
        raise ValueError(f"image too small: {h}x{w} (need at least 4x4)")
    if not 0.0 <= hue_jitter <= 0.5:
        raise ValueError(f"hue_jitter must be in [0, 0.5] (a fraction of the hue circle), got {hue_jitter}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    n_blobs = int(rng.integers(2, 7))
    background = int(rng.integers(0, num_classes))
    # Field per layer: background is a constant level, each blob a Gaussian bump; label = argmax.
    fields = [np.full((h, w), 0.5, dtype=np.float32)]
    classes = [background]
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sy, sx = rng.uniform(0.08, 0.3) * h, rng.uniform(0.08, 0.3) * w
        fields.append(np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2.0))
        classes.append(int(rng.integers(0, num_classes)))
    stack = np.stack(fields)  # [L, h, w]
    cls = np.asarray(classes, dtype=np.int64)
    label = cls[stack.argmax(0)].astype(np.uint8)

    # Colour: soft blend of the class colours (smooth edges), a gentle shading, a little noise.
    weights = np.exp((stack - stack.max(0, keepdims=True)) * 12.0)
    weights /= weights.sum(0, keepdims=True)
    turns = np.random.default_rng([seed, 1]).uniform(-hue_jitter, hue_jitter, len(classes))
    palette = np.stack([class_color(c, float(t)) for c, t in zip(classes, turns)])  # [L, 3]
    rgb = np.einsum("lhw,lc->hwc", weights, palette)
    shade = 0.85 + 0.15 * np.sin(xx / w * np.pi * rng.uniform(0.5, 2.0) + rng.uniform(0, 6.28))
    rgb = rgb * shade[..., None] + rng.normal(0.0, 3.0, size=rgb.shape)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)

    if ignore_boundary and num_classes > 1:
        edge = np.zeros((h, w), dtype=bool)
        edge[:-1, :] |= label[:-1, :] != label[1:, :]
        edge[:, :-1] |= label[:, :-1] != label[:, 1:]
        label = label.copy()
        label[edge] = IGNORE_INDEX
    return rgb, label


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(array).save(buf, format="JPEG", quality=92)
    else:
        Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_blob_images(
    fs_or_dir_url: Any,
    n: int,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    with_labels: bool = True,
    num_classes: int = 4,
    seed: int = 0,
    storage_options: dict | None = None,
) -> list[str]:
    """Write ``n`` blob images (and label PNGs) under a root; return the image URIs in order.

    ``fs_or_dir_url``: a local directory (str or Path), any fsspec URL (``s3://bucket/prefix``,
    ``memory://x``), or a tuple ``(fsspec_filesystem, root_path)``. Sizes ``(h, w)`` are cycled.
    Image ``i`` uses seed ``seed + i``; even indices are JPEG, odd PNG. Labels go to
    ``<root>/labels/<stem>.png`` (see :func:`label_uri_for`).
    """
    if isinstance(fs_or_dir_url, tuple):
        fs, root = fs_or_dir_url
    else:
        fs, root = filesystem_for(fs_or_dir_url, storage_options)
    root = root.rstrip("/")
    is_local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if is_local:
        fs.makedirs(f"{root}/images", exist_ok=True)
        if with_labels:
            fs.makedirs(f"{root}/labels", exist_ok=True)
    uris = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        rgb, label = blob_image(h, w, seed + i, num_classes=num_classes)
        stem = f"blob_{i:05d}"
        ext, fmt = ("jpg", "JPEG") if i % 2 == 0 else ("png", "PNG")
        img_path = f"{root}/images/{stem}.{ext}"
        fs.pipe_file(img_path, _encode(rgb, fmt))
        if with_labels:
            fs.pipe_file(f"{root}/labels/{stem}.png", _encode(label, "PNG"))
        uris.append(img_path if is_local else fs.unstrip_protocol(img_path))
    return uris


def label_uri_for(image_uri: str) -> str:
    """The label PNG written next to ``image_uri`` by :func:`write_blob_images`."""
    head, name = image_uri.rsplit("/", 1)
    if not head.endswith("/images") and head != "images":
        raise ValueError(f"not an image written by write_blob_images: {image_uri}")
    stem = name.rsplit(".", 1)[0]
    return f"{head[: -len('images')]}labels/{stem}.png"
