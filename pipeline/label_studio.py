"""Label Studio pre-annotations: brush masks in its RLE format, and the vocabulary as a labeling config.

Why our own encoder: the brush encoder on PyPI ships inside ``label-studio-sdk`` (whose dependencies pin
numpy below the version this project needs, and pull in opencv, nltk, black, ...) or the deprecated
``label-studio-converter``. The format is small and documented by its decoder (Label Studio's
frontend uses the ``rle-pack`` layout):

* a header of 32 bits: number of words ``num``; 5 bits: word size - 1; 4 x 4 bits: the four run-length
  field sizes - 1;
* then chunks until ``num`` words are produced: 1 bit ``repeat``; 2 bits: which run-length field size;
  that many bits: run length - 1; then one word (``repeat``) or run-length words (literal);
* bits are read most significant first; the last byte is zero-padded.

The words are the RGBA bytes of an image as wide and high as the source, row-major; Label Studio reads
the mask from the alpha channel. We write 255 in all four channels of painted pixels, 0 elsewhere.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np

WORD_BITS = 8
RUN_FIELD_BITS = (3, 4, 8, 16)  # the run-length field sizes written in the header (Label Studio's own)
CHANNELS = 4  # RGBA
FROM_NAME = "label"  # name of the <BrushLabels> tag in the labeling config
TO_NAME = "image"  # name of the <Image> tag


def _pack_fields(values: np.ndarray, widths: np.ndarray) -> list[int]:
    """Concatenate unsigned ``values`` of ``widths`` bits (MSB first) into bytes, zero-padded."""
    widths = widths.astype(np.int64)
    total = int(widths.sum())
    field = np.repeat(np.arange(len(widths)), widths)
    first_bit = np.cumsum(widths) - widths
    shift = widths[field] - 1 - (np.arange(total) - first_bit[field])
    bits = (values.astype(np.uint64)[field] >> shift.astype(np.uint64)) & np.uint64(1)
    return np.packbits(bits.astype(np.uint8)).tolist()


def encode_brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE (``value.rle``) of a 2-D mask; nonzero pixels are painted.

    Every pixel is four equal RGBA words, so every run of the word stream is at least 4 long and is
    written as a repeat chunk; runs longer than the largest field (2**16 words) are split.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    flat = m.reshape(-1) != 0
    num = flat.size * CHANNELS
    if num >= 2**32:
        raise ValueError(f"a {m.shape[1]}x{m.shape[0]} mask is too large for the 32-bit word count")
    if flat.size:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([starts, [flat.size]])) * CHANNELS
        run_values = np.where(flat[starts], 255, 0)
    else:
        lengths = run_values = np.zeros(0, dtype=np.int64)
    longest = 2 ** RUN_FIELD_BITS[-1]
    pieces = -(-lengths // longest)  # chunks per run
    chunk_value = np.repeat(run_values, pieces)
    chunk_len = np.full(int(pieces.sum()), longest, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    chunk_len[last] = lengths - (pieces - 1) * longest
    size_index = np.searchsorted(2 ** np.asarray(RUN_FIELD_BITS), chunk_len)  # smallest field that fits
    size_bits = np.asarray(RUN_FIELD_BITS)[size_index]
    k = len(chunk_len)
    values = np.stack([np.ones(k, np.int64), size_index, chunk_len - 1, chunk_value], 1).reshape(-1)
    widths = np.stack([np.ones(k, np.int64), np.full(k, 2), size_bits, np.full(k, WORD_BITS)], 1).reshape(-1)
    header_values = np.array([num, WORD_BITS - 1, *[b - 1 for b in RUN_FIELD_BITS]], dtype=np.int64)
    header_widths = np.array([32, 5, 4, 4, 4, 4])
    return _pack_fields(np.concatenate([header_values, values]), np.concatenate([header_widths, widths]))


def _hex(rgb: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def labeling_config_xml(names: Sequence[str], class_ids: Sequence[int]) -> str:
    """The project's labeling config: an image and one brush label per class (our overlay colours).

    ``class_ids`` are the vocabulary ids of ``names`` (they pick the colour, so a class looks the same
    here as in the overlays and the HTML report).
    """
    from pipeline.overlay import class_color

    if len(set(names)) != len(names):
        raise ValueError("class names must be unique: Label Studio identifies a label by its name")
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=TO_NAME, value="$image", zoom="true")
    brush = ET.SubElement(view, "BrushLabels", name=FROM_NAME, toName=TO_NAME)
    for name, cid in zip(names, class_ids):
        ET.SubElement(brush, "Label", value=str(name), background=_hex(class_color(int(cid))))
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def brush_result(mask: np.ndarray, name: str, result_id: str, score: float | None = None) -> dict:
    """One ``brushlabels`` region of a task's prediction (the mask at the source image's size)."""
    h, w = np.asarray(mask).shape
    out = {
        "id": result_id,
        "from_name": FROM_NAME,
        "to_name": TO_NAME,
        "type": "brushlabels",
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": [str(name)]},
    }
    if score is not None:
        out["score"] = float(score)
    return out
