"""Colour palette and label overlays with a legend, for humans looking at pseudo-labels.

Why deterministic colours: the same class keeps the same colour in every image, report and run,
so a reviewer learns "grass is this green" once. Why a legend in the image: overlay PNGs get
copied into tickets and slides, away from any class list.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Hand-picked, well separated colours for the first classes; a golden-ratio hue walk after that.
_BASE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]
IGNORE_COLOR = (0, 0, 0)


def class_color(class_id: int) -> tuple[int, int, int]:
    """The RGB colour of a class id; identical on every call, machine and run."""
    if class_id < 0:
        return IGNORE_COLOR
    if class_id < len(_BASE):
        return _BASE[class_id]
    k = class_id - len(_BASE)
    hue = (0.11 + k * 0.618033988749895) % 1.0
    sat = (0.55, 0.8, 0.95)[k % 3]
    val = (0.95, 0.75, 0.6)[(k // 3) % 3]
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def palette(n: int) -> np.ndarray:
    """``[n, 3]`` uint8 colours for class ids ``0..n-1`` (row i = :func:`class_color` (i))."""
    return np.array([class_color(i) for i in range(n)], dtype=np.uint8).reshape(n, 3)


@lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def overlay(
    image: np.ndarray,
    label: np.ndarray,
    names: Sequence[str],
    alpha: float = 0.5,
    ignore_index: int | None = None,
    legend: bool = True,
    max_legend_entries: int = 20,
    draw_boundaries: bool = True,
) -> Image.Image:
    """Blend class colours over ``image`` (HxWx3 uint8 RGB) and add a legend panel on the right.

    The legend lists the classes present, largest area first, with their colour and percentage.
    ``ignore_index`` pixels keep the original image (no colour).
    """
    image = np.asarray(image)
    label = np.asarray(label).astype(np.int64)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
    if image.shape[:2] != label.shape:
        raise ValueError(f"image size {image.shape[:2]} differs from label size {label.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    valid = np.ones(label.shape, dtype=bool) if ignore_index is None else label != ignore_index
    colours = palette(max(len(names), int(label[valid].max()) + 1 if valid.any() else 1))
    colour_img = colours[np.where(valid, label, 0)].astype(np.float32)
    out = image.astype(np.float32)
    a = np.where(valid, alpha, 0.0)[..., None].astype(np.float32)
    out = out * (1.0 - a) + colour_img * a
    if draw_boundaries and label.shape[0] > 1 and label.shape[1] > 1:
        edge = np.zeros(label.shape, dtype=bool)
        edge[:-1, :] |= label[:-1, :] != label[1:, :]
        edge[:, :-1] |= label[:, :-1] != label[:, 1:]
        out[edge] = out[edge] * 0.3 + 255.0 * 0.7
    blended = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    if not legend:
        return blended

    ids, counts = np.unique(label[valid], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    total = max(int(valid.sum()), 1)
    entries = [(int(ids[i]), counts[i] / total) for i in order]
    hidden = max(0, len(entries) - max_legend_entries)
    entries = entries[:max_legend_entries]

    h, w = label.shape
    font_size = int(np.clip(h / 28, 11, 18))
    font = _font(font_size)
    row_h = font_size + 8
    sw = font_size + 2
    lines: list[tuple[int | None, str]] = [
        (cid, f"{names[cid] if cid < len(names) else f'class {cid}'}  {frac * 100:.1f}%") for cid, frac in entries
    ]
    if hidden:
        lines.append((None, f"+{hidden} more"))
    probe = ImageDraw.Draw(blended)
    text_w = max((probe.textlength(t, font=font) for _, t in lines), default=60)
    panel_w = int(sw + 18 + text_w + 10)
    panel_h = max(h, 10 + row_h * len(lines) + 10)
    canvas = Image.new("RGB", (w + panel_w, panel_h), (255, 255, 255))
    canvas.paste(blended, (0, 0))
    d = ImageDraw.Draw(canvas)
    d.rectangle([w, 0, w + panel_w - 1, panel_h - 1], outline=(180, 180, 180))
    y = 10
    for cid, text in lines:
        if cid is not None:
            col = class_color(cid)
            d.rectangle([w + 8, y, w + 8 + sw, y + sw], fill=col, outline=(60, 60, 60))
        d.text((w + sw + 16, y), text, fill=(20, 20, 20), font=font)
        y += row_h
    return canvas
