"""Convert raw public benchmark downloads into the prepared layouts of ``ebseg_core.data.benchmarks``.

The conversions follow the usual (SAN / detectron2) preparation so that labels hold contiguous class
ids with 255 for ignored pixels:

* ``ade150``: ADEChallengeData2016 ``annotations/<split>/*.png`` hold 0 = unlabeled, 1..150 = classes;
  prepared label = value - 1 with 0 -> 255. Images are copied unchanged.
* ``voc20``: VOC2012 ``SegmentationClass`` (or ``SegmentationClassAug``) palette PNGs hold 0 = background,
  1..20 = classes, 255 = boundary; prepared label: background and boundary -> 255, class k -> k - 1. The
  split lists are ``ImageSets/Segmentation/<split>.txt``; as in the official script, labels that are
  entirely ignored after conversion are not written.
* ``coco171``: COCO-Stuff ``stuffthingmaps/<split>2017/*.png`` hold the 0-based COCO category id
  (category id - 1) or 255; prepared label = the class's position among the 171 used categories (80 thing
  ids out of 1..90, stuff ids 92..182), anything else -> 255. All-ignored labels are not written.

PASCAL Context (59/459) and ADE20K-full (847) need their annotation toolkits (the Detail API json and the
ADE20K index pickle) and are not converted here yet.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ebseg_core.data import get_benchmark

SUPPORTED = ("ade150", "voc20", "coco171")
NOT_YET = {
    "pc59": "PASCAL Context needs the Detail API annotations (trainval_merged.json) to build its labels",
    "pc459": "PASCAL Context-459 needs the full .mat annotations and the Detail API split lists",
    "ade847": "ADE20K-full needs the ADE20K_2021_17_01 index pickle and its per-object masks",
}

#: COCO category ids of the 171 COCO-Stuff classes, in class order (80 things, then 91 stuff).
COCO_THING_IDS_MISSING = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO171_IDS = tuple([i for i in range(1, 91) if i not in COCO_THING_IDS_MISSING] + list(range(92, 183)))


class PrepareError(ValueError):
    """The raw input is not what the conversion expects (wrong folder, wrong label format)."""


@dataclass
class PrepareSummary:
    dataset: str
    split: str
    written: int
    skipped_empty: int
    out_image_dir: str
    out_label_dir: str


# ---------------------------------------------------------------------------------------------------
# label conversions (pure functions, tested directly)
# ---------------------------------------------------------------------------------------------------
def _lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    lut = np.full(size, 255, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


ADE150_LUT = _lut({v: v - 1 for v in range(1, 151)})
VOC20_LUT = _lut({v: v - 1 for v in range(1, 21)})
COCO171_LUT = _lut({cid - 1: i for i, cid in enumerate(COCO171_IDS)})


def _check_uint8_label(arr: np.ndarray, where: str, max_value: int, extra_ok: tuple[int, ...] = ()) -> None:
    if arr.ndim != 2:
        raise PrepareError(f"{where}: expected a single-channel label image, got shape {arr.shape} "
                           "(a color rendering instead of the class-index PNG?)")
    if arr.dtype != np.uint8:
        raise PrepareError(f"{where}: expected 8-bit labels, got {arr.dtype}")
    bad = np.setdiff1d(np.unique(arr), np.array(list(range(max_value + 1)) + list(extra_ok)))
    if bad.size:
        raise PrepareError(f"{where}: label values {bad[:5].tolist()} are outside 0..{max_value}"
                           + (f" and {list(extra_ok)}" if extra_ok else "") + "; is this the right dataset?")


def convert_ade150(label: np.ndarray, where: str = "label") -> np.ndarray:
    """ADE20K SceneParsing annotation (0 unlabeled, 1..150) -> 0..149, 255 ignore."""
    _check_uint8_label(label, where, 150)
    return ADE150_LUT[label]


def convert_voc20(label: np.ndarray, where: str = "label") -> np.ndarray:
    """VOC class-index PNG (0 background, 1..20, 255 boundary) -> 0..19, 255 ignore."""
    _check_uint8_label(label, where, 20, extra_ok=(255,))
    return VOC20_LUT[label]


def convert_coco171(label: np.ndarray, where: str = "label") -> np.ndarray:
    """COCO-Stuff stuffthingmap (category id - 1, 255 unlabeled) -> 0..170, 255 ignore."""
    _check_uint8_label(label, where, 181, extra_ok=(255,))
    return COCO171_LUT[label]


def _read_label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise PrepareError(f"{path}: expected a class-index PNG (mode L or P), got mode {im.mode}")
        return np.array(im)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# dataset walkers: (image path, label path, output stem)
# ---------------------------------------------------------------------------------------------------
def _require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise PrepareError(f"{what}: {path} is not a folder; {hint}")
    return path


def _ade150_items(raw: Path, split: str) -> Iterator[tuple[Path, Path, str]]:
    sub = {"val": "validation", "train": "training"}[split]
    hint = "--raw must be the unpacked ADEChallengeData2016 folder (with images/ and annotations/)"
    ann = _require_dir(raw / "annotations" / sub, "ADE20K annotations", hint)
    img = _require_dir(raw / "images" / sub, "ADE20K images", hint)
    for lab in sorted(ann.glob("*.png")):
        yield img / (lab.stem + ".jpg"), lab, lab.stem


def _voc_items(raw: Path, split: str) -> Iterator[tuple[Path, Path, str]]:
    hint = "--raw must be the VOC2012 folder (VOCdevkit/VOC2012 with JPEGImages/ and SegmentationClass/)"
    _require_dir(raw / "JPEGImages", "VOC images", hint)
    label_dir = raw / "SegmentationClassAug" if split == "train" and (raw / "SegmentationClassAug").is_dir() \
        else raw / "SegmentationClass"
    _require_dir(label_dir, "VOC labels", hint)
    lists = {"val": ["ImageSets/Segmentation/val.txt", "val.txt"],
             "train": ["trainaug.txt", "ImageSets/Segmentation/trainaug.txt", "ImageSets/Segmentation/train.txt"]}
    for rel in lists[split]:
        if (raw / rel).is_file():
            ids = [x.strip().split()[0] for x in (raw / rel).read_text().splitlines() if x.strip()]
            break
    else:
        raise PrepareError(f"VOC split list for {split!r} not found: looked for {lists[split]} under {raw}")
    for i in ids:
        yield raw / "JPEGImages" / f"{i}.jpg", label_dir / f"{i}.png", i


def _coco_items(raw: Path, split: str) -> Iterator[tuple[Path, Path, str]]:
    sub = f"{split}2017"
    hint = ("--raw must be the COCO folder holding stuffthingmaps/ (from stuffthingmaps_trainval2017.zip) "
            f"and {sub}/ (the images)")
    ann = _require_dir(raw / "stuffthingmaps" / sub, "COCO-Stuff labels", hint)
    img = _require_dir(raw / sub, "COCO images", hint)
    for lab in sorted(ann.glob("*.png")):
        yield img / (lab.stem + ".jpg"), lab, lab.stem


_CONVERT: dict[str, tuple[Callable, Callable]] = {
    "ade150": (_ade150_items, convert_ade150),
    "voc20": (_voc_items, convert_voc20),
    "coco171": (_coco_items, convert_coco171),
}
_SKIP_EMPTY = {"ade150": False, "voc20": True, "coco171": True}


def _out_dirs(dataset: str, split: str, out: str) -> tuple[str, str]:
    from pipeline.storage import join

    name = dataset if split == "val" else f"{dataset}-train"
    if dataset == "voc20" and split == "train":
        b = get_benchmark("voc20")
        return join(out, b.image_dir), join(out, "VOC2012/annotations_detectron2/train")
    if dataset == "ade150" and split == "train":
        return (join(out, "ADEChallengeData2016/images/training"),
                join(out, "ADEChallengeData2016/annotations_detectron2/training"))
    b = get_benchmark(name)
    return join(out, b.image_dir), join(out, b.label_dir)


def prepare_dataset(dataset: str, raw: str, out: str, split: str = "val", limit: int | None = None,
                    log: Callable[[str], None] = print) -> PrepareSummary:
    """Convert one split of a raw download into the prepared layout under ``out`` (local or s3://)."""
    from pipeline.storage import atomic_write_bytes, join

    key = get_benchmark(dataset).classes
    if key in NOT_YET:
        raise PrepareError(f"prepare-data {key}: not supported yet ({NOT_YET[key]}); prepare it with SAN's "
                           "scripts (docs/evaluation.md) and point --root at the result")
    if key not in _CONVERT:
        raise PrepareError(f"unknown dataset {dataset!r}; supported: {', '.join(SUPPORTED)}")
    if split not in ("val", "train"):
        raise PrepareError(f"--split must be val or train, got {split!r}")
    raw_path = Path(os.path.expanduser(raw))
    if not raw_path.is_dir():
        raise PrepareError(f"--raw {raw} is not a folder")
    items, convert = _CONVERT[key]
    img_out, lab_out = _out_dirs(key, split, out)
    written = skipped = 0
    for n, (img, lab, stem) in enumerate(items(raw_path, split)):
        if limit is not None and written >= limit:
            break
        if not lab.is_file():
            raise PrepareError(f"label file missing: {lab}")
        if not img.is_file():
            raise PrepareError(f"image missing for label {lab.name}: expected {img}")
        arr = convert(_read_label(lab), str(lab))
        if _SKIP_EMPTY[key] and bool((arr == 255).all()):
            skipped += 1
            continue
        atomic_write_bytes(join(lab_out, stem + ".png"), _png(arr))
        atomic_write_bytes(join(img_out, stem + ".jpg"), img.read_bytes())
        written += 1
        if written % 500 == 0:
            log(f"{key} {split}: {written} written")
    if written == 0:
        raise PrepareError(f"{key} {split}: nothing to convert under {raw}")
    log(f"{key} {split}: {written} image/label pairs written to {lab_out}"
        + (f" ({skipped} all-ignored labels skipped)" if skipped else ""))
    return PrepareSummary(key, split, written, skipped, img_out, lab_out)
