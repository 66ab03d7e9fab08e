"""Convert raw public benchmark downloads into the prepared layouts of ``ebseg_core.data.benchmarks``.

The conversions reproduce the preparation scripts behind the published numbers (``datasets/prepare_*.py``
of SAN and EBSeg; MaskFormer's for ADE20K-full), so that ``ebseg evaluate`` scores the same labels.
Labels hold contiguous class ids; ignored pixels are 255 in 8-bit PNGs, 65535 in 16-bit TIFFs:

* ``ade150``: ADEChallengeData2016 ``annotations/<split>/*.png`` hold 0 = unlabeled, 1..150 = classes;
  prepared label = value - 1 with 0 -> 255. Images are copied unchanged.
* ``voc20``: VOC2012 ``SegmentationClass`` (or ``SegmentationClassAug``) palette PNGs hold 0 = background,
  1..20 = classes, 255 = boundary; prepared label: background and boundary -> 255, class k -> k - 1. The
  split lists are ``ImageSets/Segmentation/<split>.txt``; as in the official script, labels that are
  entirely ignored after conversion are not written.
* ``coco171``: COCO-Stuff ``stuffthingmaps/<split>2017/*.png`` hold the 0-based COCO category id
  (category id - 1) or 255; prepared label = the class's position among the 171 used categories (80 thing
  ids out of 1..90, stuff ids 92..182), anything else -> 255. All-ignored labels are not written.
* ``pc59``: ``--raw`` is ``VOCdevkit/VOC2010`` with ``JPEGImages/`` and ``trainval_merged.json`` (the
  PASCAL in Detail annotations); a split is the json's images of that phase. A label is what the Detail
  API's ``getMask`` gives: on 0 = background, each segmentation annotation of the image (compressed RLE)
  paints its category id, in file order. The 59 ids of :data:`PC59_DETAIL_IDS` become 0..58 in ascending
  id order, background -> 255; any other id fails, as in SAN's script. Images are copied unchanged.
* ``pc459``: the same images and split, labels from ``trainval/<name>.mat`` (``LabelMap``: 0 = unlabeled,
  1..459 = the lines of PASCAL Context's ``labels.txt``) of its ``trainval.tar.gz`` unpacked in VOC2010/;
  prepared label = value - 1 with 0 -> 65535, as a 16-bit TIFF.
* ``ade847``: ``--raw`` is ``ADE20K_2021_17_01`` with ``index_ade20k.pkl`` and ``images/``; a split is
  the index entries whose file name is ``ADE_val_*`` (val) or not (train). A pixel's ADE20K object id is
  ``R // 10 * 256 + G`` of ``<image>_seg.png``; the 847 ids of ``ebseg_core.data.ade847_ids`` become
  0..846, any other -> 65535 (16-bit TIFF). As in MaskFormer's script, image and label are shrunk to a
  short side of 512 when larger (bilinear / nearest, computed exactly as OpenCV's ``cv2.resize`` does)
  and the image is re-encoded as JPEG at Pillow's default quality.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ebseg_core.data import get_benchmark
from ebseg_core.data.ade847_ids import ADE847_ADE20K_IDS
from ebseg_core.errors import UserError
from ebseg_core.storage import join, write_bytes_atomic

#: COCO category ids of the 171 COCO-Stuff classes, in class order (80 things, then 91 stuff).
COCO_THING_IDS_MISSING = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO171_IDS = tuple([i for i in range(1, 91) if i not in COCO_THING_IDS_MISSING] + list(range(92, 183)))

#: PASCAL in Detail category ids of the 59 PASCAL Context classes, in class order. SAN's
#: ``datasets/prepare_pcontext_sem_seg_59cls.py`` lists them (with 0 = background) and numbers them in
#: ascending order; each id is also the class's line in the 459-class ``labels.txt`` (2 = aeroplane).
PC59_DETAIL_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144,
    158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354,
    355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)

#: ADE20K-full images and labels are shrunk to this short side when larger (MaskFormer's preparation).
ADE847_SHORT_SIDE = 512


class PrepareError(UserError):
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
def _lut(mapping: dict[int, int], size: int = 256, ignore: int = 255, dtype: type = np.uint8) -> np.ndarray:
    lut: np.ndarray = np.full(size, ignore, dtype)
    for k, v in mapping.items():
        lut[k] = v
    return lut


ADE150_LUT = _lut({v: v - 1 for v in range(1, 151)})
VOC20_LUT = _lut({v: v - 1 for v in range(1, 21)})
COCO171_LUT = _lut({cid - 1: i for i, cid in enumerate(COCO171_IDS)})
PC59_LUT = _lut({cid: i for i, cid in enumerate(PC59_DETAIL_IDS)}, size=max(PC59_DETAIL_IDS) + 1)
# R // 10 <= 25, so object ids stay below 26 * 256
ADE847_LUT = _lut({oid: i for i, oid in enumerate(ADE847_ADE20K_IDS)}, size=26 * 256, ignore=65535,
                  dtype=np.uint16)


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


def convert_pc59(mask: np.ndarray, where: str = "label") -> np.ndarray:
    """Detail class mask (0 background, 59 category ids) -> 0..58, 255 ignore."""
    bad = np.setdiff1d(np.unique(mask), (0,) + PC59_DETAIL_IDS)
    if bad.size:
        raise PrepareError(f"{where}: category ids {bad[:5].tolist()} are not PASCAL Context-59 classes; "
                           "expected trainval_merged.json, the 59-class Detail annotations")
    return PC59_LUT[mask]


def convert_pc459(label_map: np.ndarray, where: str = "label") -> np.ndarray:
    """PASCAL Context ``LabelMap`` (0 unlabeled, 1..459) -> 0..458, 65535 ignore (uint16)."""
    if label_map.ndim != 2 or label_map.dtype.kind not in "iu":
        raise PrepareError(f"{where}: expected a 2-D integer LabelMap, got {label_map.dtype} "
                           f"{label_map.shape}")
    if label_map.size and (label_map.min() < 0 or label_map.max() > 459):
        raise PrepareError(f"{where}: LabelMap values {label_map.min()}..{label_map.max()} are outside "
                           "0..459; is this the 459-class trainval.tar.gz of PASCAL Context?")
    return label_map.astype(np.uint16) - np.uint16(1)  # 0 wraps around to 65535


def convert_ade847(seg: np.ndarray, where: str = "label") -> np.ndarray:
    """ADE20K ``*_seg.png`` (object id = R // 10 * 256 + G) -> 0..846, 65535 ignore (uint16)."""
    if seg.ndim != 3 or seg.shape[2] < 3 or seg.dtype != np.uint8:
        raise PrepareError(f"{where}: expected the 8-bit RGB object mask (*_seg.png), got {seg.dtype} "
                           f"{seg.shape}")
    return ADE847_LUT[(seg[..., 0] // 10).astype(np.int64) * 256 + seg[..., 1]]


def detail_class_mask(image: dict, annotations: list[dict], where: str = "image") -> np.ndarray:
    """The Detail API's ``getMask(image)``: on 0, each annotation in file order paints its category id."""
    from pycocotools import mask as mask_utils

    h, w = int(image["height"]), int(image["width"])
    mask = np.zeros((h, w), np.int64)
    for ann in annotations:
        rle = ann.get("segmentation")
        if not (isinstance(rle, dict) and isinstance(rle.get("counts"), str) and "size" in rle):
            raise PrepareError(f"{where}: annotation {ann.get('id')} is not a compressed RLE mask; "
                               "expected trainval_merged.json of PASCAL in Detail")
        try:
            m = mask_utils.decode(rle)
        except ValueError as exc:
            raise PrepareError(f"{where}: annotation {ann.get('id')}: {exc}") from exc
        if m.shape != (h, w):
            raise PrepareError(f"{where}: annotation {ann.get('id')} is {m.shape[0]}x{m.shape[1]}, the image "
                               f"{h}x{w}")
        mask[m != 0] = ann["category_id"]
    return mask


# ---------------------------------------------------------------------------------------------------
# ADE20K-full resizing: cv2.resize reproduced in numpy (bit-exact for the shrinking done here)
# ---------------------------------------------------------------------------------------------------
def short_side_size(h: int, w: int, short: int = ADE847_SHORT_SIDE) -> tuple[int, int]:
    """MaskFormer's ADE20K-full output size: short side ``short`` when it is larger, aspect kept."""
    if w >= h > short:
        return short, round(w / float(h) * short)
    if h >= w > short:
        return round(h / float(w) * short), short
    return h, w


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output position: the two source indices and their 11-bit weights, as cv2 computes them."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    i = np.floor(f).astype(np.int64)
    f = f - i.astype(np.float32)
    f[(i < 0) | (i >= src - 1)] = 0  # borders repeat the edge pixel
    i = np.clip(i, 0, src - 1)
    w1 = np.rint(f * np.float32(2048)).astype(np.int32)
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int32)
    return i, np.minimum(i + 1, src - 1), w0, w1


def resize_linear_u8(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """``cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)`` for a uint8 image being shrunk.

    OpenCV works in fixed point: 11-bit weights, an exact horizontal pass, then a vertical pass that
    rounds as its SIMD kernel does; matching that bit for bit keeps our images identical to the
    official preparation without depending on OpenCV (checked against cv2 4.8 and 5.0).
    """
    x0, x1, a0, a1 = _linear_taps(img.shape[1], w)
    y0, y1, b0, b1 = _linear_taps(img.shape[0], h)
    channels = (None,) * (img.ndim - 2)
    src = img.astype(np.int32)  # the largest intermediate, 255 * 2048 * 128, fits
    rows = src[:, x0] * a0[(slice(None), *channels)] + src[:, x1] * a1[(slice(None), *channels)]
    b0, b1 = b0[(slice(None), None, *channels)], b1[(slice(None), None, *channels)]
    out = ((((rows[y0] >> 4) * b0) >> 16) + (((rows[y1] >> 4) * b1) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def resize_nearest(label: np.ndarray, h: int, w: int) -> np.ndarray:
    """``cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)``: source index floor(i * src / dst)."""
    src_h, src_w = label.shape[:2]
    ys = np.minimum(np.floor(np.arange(h) * (1.0 / (h / src_h))).astype(np.int64), src_h - 1)
    xs = np.minimum(np.floor(np.arange(w) * (1.0 / (w / src_w))).astype(np.int64), src_w - 1)
    return label[ys[:, None], xs[None, :]]


def _shrink_ade847(image: Path, label: np.ndarray) -> tuple[bytes, np.ndarray]:
    """MaskFormer's ADE20K-full step: short side <= 512, image re-encoded as JPEG even when kept."""
    with Image.open(image) as im:  # other modes (CMYK) could not be written back as JPEG: made RGB
        img = np.asarray(im if im.mode in ("RGB", "L") else im.convert("RGB"))
    h, w = short_side_size(*img.shape[:2])
    if (h, w) != img.shape[:2]:
        img, label = resize_linear_u8(img, h, w), resize_nearest(label, h, w)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    return buf.getvalue(), label


# ---------------------------------------------------------------------------------------------------
# reading raw files
# ---------------------------------------------------------------------------------------------------
def _read_label(path: Path) -> np.ndarray:
    if not path.is_file():
        raise PrepareError(f"label file missing: {path}")
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise PrepareError(f"{path}: expected a class-index PNG (mode L or P), got mode {im.mode}")
        return np.array(im)


def _read_label_map(path: Path) -> np.ndarray:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        raise PrepareError(f"PASCAL Context annotation missing: {path}")
    try:
        mat = loadmat(path)
    except (MatReadError, ValueError, OSError) as exc:
        raise PrepareError(f"{path}: not a readable .mat file ({exc})") from exc
    if "LabelMap" not in mat:
        raise PrepareError(f"{path}: no 'LabelMap' in it; expected PASCAL Context's trainval/*.mat")
    return mat["LabelMap"]


def _read_ade_seg(path: Path) -> np.ndarray:
    if not path.is_file():
        raise PrepareError(f"ADE20K object mask missing: {path}")
    with Image.open(path) as im:
        return np.array(im)


def _encode_label(arr: np.ndarray, ext: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format={".png": "PNG", ".tif": "TIFF"}[ext])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# dataset walkers
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    """One raw sample: its output name, its image, and how to build its prepared label (read lazily)."""

    stem: str
    image: Path
    label: Callable[[], np.ndarray]


def _require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise PrepareError(f"{what}: {path} is not a folder; {hint}")
    return path


def _converted(read: Callable[[Path], np.ndarray], convert: Callable[[np.ndarray, str], np.ndarray],
               path: Path) -> np.ndarray:
    return convert(read(path), str(path))


def _ade150_items(raw: Path, split: str) -> Iterator[_Item]:
    sub = {"val": "validation", "train": "training"}[split]
    hint = "--raw must be the unpacked ADEChallengeData2016 folder (with images/ and annotations/)"
    ann = _require_dir(raw / "annotations" / sub, "ADE20K annotations", hint)
    img = _require_dir(raw / "images" / sub, "ADE20K images", hint)
    for lab in sorted(ann.glob("*.png")):
        yield _Item(lab.stem, img / f"{lab.stem}.jpg", partial(_converted, _read_label, convert_ade150, lab))


def _voc_items(raw: Path, split: str) -> Iterator[_Item]:
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
        lab = label_dir / f"{i}.png"
        yield _Item(i, raw / "JPEGImages" / f"{i}.jpg", partial(_converted, _read_label, convert_voc20, lab))


def _coco_items(raw: Path, split: str) -> Iterator[_Item]:
    sub = f"{split}2017"
    hint = ("--raw must be the COCO folder holding stuffthingmaps/ (from stuffthingmaps_trainval2017.zip) "
            f"and {sub}/ (the images)")
    ann = _require_dir(raw / "stuffthingmaps" / sub, "COCO-Stuff labels", hint)
    img = _require_dir(raw / sub, "COCO images", hint)
    for lab in sorted(ann.glob("*.png")):
        yield _Item(lab.stem, img / f"{lab.stem}.jpg", partial(_converted, _read_label, convert_coco171, lab))


def _detail_images(raw: Path, split: str) -> Iterator[tuple[dict, list[dict]]]:
    """(image record, its segmentation annotations in file order) for one phase of trainval_merged.json.

    Records are keyed by id as the Detail API keys them (a repeated id keeps its first place and its
    last record), and only ``.jpg`` file names are used, as in SAN's scripts.
    """
    hint = ("--raw must be VOCdevkit/VOC2010 holding JPEGImages/ and trainval_merged.json (the PASCAL in "
            "Detail annotations that SAN's and EBSeg's preparation reads)")
    _require_dir(raw / "JPEGImages", "VOC2010 images", hint)
    path = raw / "trainval_merged.json"
    if not path.is_file():
        raise PrepareError(f"PASCAL Context annotations not found: {path}; {hint}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrepareError(f"{path}: not a JSON file ({exc})") from exc
    try:
        images = {im["image_id"]: im for im in data["images"]}
        by_image: dict[int, list[dict]] = {}
        for ann in {a["id"]: a for a in data["annos_segmentation"]}.values():
            by_image.setdefault(ann["image_id"], []).append(ann)
    except (KeyError, TypeError) as exc:
        raise PrepareError(f"{path}: not the PASCAL in Detail format (images / annos_segmentation with "
                           f"image_id and id; missing {exc})") from exc
    for im in images.values():
        if im.get("phase") == split and str(im.get("file_name", "")).endswith(".jpg"):
            yield im, by_image.get(im["image_id"], [])


def _pc59_label(image: dict, annotations: list[dict]) -> np.ndarray:
    where = f"trainval_merged.json, {image['file_name']}"
    return convert_pc59(detail_class_mask(image, annotations, where), where)


def _pc59_items(raw: Path, split: str) -> Iterator[_Item]:
    for im, anns in _detail_images(raw, split):
        image = raw / "JPEGImages" / im["file_name"]
        yield _Item(image.stem, image, partial(_pc59_label, im, anns))


def _pc459_items(raw: Path, split: str) -> Iterator[_Item]:
    mats = _require_dir(raw / "trainval", "PASCAL Context full annotations", "unpack PASCAL Context's "
                        "trainval.tar.gz into --raw (VOCdevkit/VOC2010/trainval/*.mat)")
    for im, _ in _detail_images(raw, split):
        image = raw / "JPEGImages" / im["file_name"]
        mat = mats / f"{image.stem}.mat"
        yield _Item(image.stem, image, partial(_converted, _read_label_map, convert_pc459, mat))


def _ade847_items(raw: Path, split: str) -> Iterator[_Item]:
    hint = "--raw must be the unpacked ADE20K_2021_17_01 folder (with index_ade20k.pkl and images/)"
    path = raw / "index_ade20k.pkl"
    if not path.is_file():
        raise PrepareError(f"ADE20K index not found: {path}; {hint}")
    try:
        with open(path, "rb") as f:
            index = pickle.load(f)
    except Exception as exc:  # unpickling a wrong file fails in many ways
        raise PrepareError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); {hint}") from exc
    if not isinstance(index, dict) or "folder" not in index or "filename" not in index:
        raise PrepareError(f"{path}: expected the ADE20K index (a dict with 'folder' and 'filename'); {hint}")
    for folder, name in zip(index["folder"], index["filename"]):
        if (str(name).split("_")[1:2] == ["val"]) != (split == "val"):
            continue
        # folders are relative to the parent of ADE20K_2021_17_01 ('ADE20K_2021_17_01/images/ADE/...')
        parts = Path(folder).parts
        if "images" not in parts:
            raise PrepareError(f"{path}: folder {folder!r} of {name} has no images/ part; {hint}")
        image = raw.joinpath(*parts[parts.index("images"):], name)
        seg = image.with_name(image.stem + "_seg.png")
        yield _Item(image.stem, image, partial(_converted, _read_ade_seg, convert_ade847, seg))


@dataclass(frozen=True)
class _Conversion:
    items: Callable[[Path, str], Iterator[_Item]]
    skip_empty: bool  # the official script does not write labels that are entirely ignored
    shrink: bool = False  # ADE20K-full: short side <= 512 and JPEG re-encoding (MaskFormer's script)


_CONVERSIONS = {
    "ade150": _Conversion(_ade150_items, skip_empty=False),
    "voc20": _Conversion(_voc_items, skip_empty=True),
    "coco171": _Conversion(_coco_items, skip_empty=True),
    "pc59": _Conversion(_pc59_items, skip_empty=False),
    "pc459": _Conversion(_pc459_items, skip_empty=False),
    "ade847": _Conversion(_ade847_items, skip_empty=False, shrink=True),
}

#: Output folders of --split train where no benchmark names them (the upstream scripts' layout).
_TRAIN_DIRS = {
    "ade150": ("ADEChallengeData2016/images/training",
               "ADEChallengeData2016/annotations_detectron2/training"),
    "voc20": ("VOC2012/JPEGImages", "VOC2012/annotations_detectron2/train"),
    "pc59": ("pcontext/train/image", "pcontext/train/label"),
    "pc459": ("pcontext_full/train/image", "pcontext_full/train/label"),
    "ade847": ("ADE20K_2021_17_01/images_detectron2/training",
               "ADE20K_2021_17_01/annotations_detectron2/training"),
}


def _out_dirs(dataset: str, split: str, out: str) -> tuple[str, str]:
    if split == "train" and dataset in _TRAIN_DIRS:
        image_dir, label_dir = _TRAIN_DIRS[dataset]
    else:
        b = get_benchmark(dataset if split == "val" else f"{dataset}-train")
        image_dir, label_dir = b.image_dir, b.label_dir
    return join(out, image_dir), join(out, label_dir)


def prepare_dataset(dataset: str, raw: str, out: str, split: str = "val", limit: int | None = None,
                    log: Callable[[str], None] = print) -> PrepareSummary:
    """Convert one split of a raw download into the prepared layout under ``out`` (local or s3://)."""
    bench = get_benchmark(dataset)
    key = bench.classes
    if split not in ("val", "train"):
        raise PrepareError(f"--split must be val or train, got {split!r}")
    raw_path = Path(os.path.expanduser(raw))
    if not raw_path.is_dir():
        raise PrepareError(f"--raw {raw} is not a folder")
    conv = _CONVERSIONS[key]
    img_out, lab_out = _out_dirs(key, split, out)
    written = skipped = 0
    for item in conv.items(raw_path, split):
        if limit is not None and written >= limit:
            break
        if not item.image.is_file():
            raise PrepareError(f"image missing for {item.stem}: expected {item.image}")
        arr = item.label()
        if conv.skip_empty and bool((arr == bench.ignore_label).all()):
            skipped += 1
            continue
        if conv.shrink:
            image_bytes, arr = _shrink_ade847(item.image, arr)
        else:
            image_bytes = item.image.read_bytes()
        write_bytes_atomic(join(lab_out, item.stem + bench.label_ext), _encode_label(arr, bench.label_ext))
        write_bytes_atomic(join(img_out, item.stem + bench.image_ext), image_bytes)
        written += 1
        if written % 500 == 0:
            log(f"{key} {split}: {written} written")
    if written == 0:
        raise PrepareError(f"{key} {split}: nothing to convert under {raw}")
    log(f"{key} {split}: {written} image/label pairs written to {lab_out}"
        + (f" ({skipped} all-ignored labels skipped)" if skipped else ""))
    return PrepareSummary(key, split, written, skipped, img_out, lab_out)
