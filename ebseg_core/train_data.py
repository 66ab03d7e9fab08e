"""Training data for EBSeg: dataset layouts (local paths or any fsspec URL) and the official augmentation.

Layouts
-------
* ``generic``: ``<root>/images/<name>.<jpg|png|...>``, ``<root>/labels/<name>.png`` (uint8/uint16 class
  indices, 255 = ignore) and ``<root>/class_names.txt`` (one class per line, synonyms separated by ';';
  the first synonym is the prompt name). This is what the curation exports write.
* ``coco171``: COCO-Stuff-171 as prepared for detectron2: ``<root>/coco/train2017/*.jpg`` and
  ``<root>/coco/stuffthingmaps_detectron2/train2017/*.png`` (``split`` picks train2017/val2017).

Augmentation (the official MaskFormer semantic mapper): resize the shortest edge to a size chosen from
``min_sizes`` (longest edge capped at ``max_size``), random crop ``crop_size`` (with the category-area
constraint), SSD-style colour jitter, horizontal flip, then pad bottom/right to ``pad_size`` with 128
(image) and the ignore label (label). Per-class binary masks are built from the padded label map.

Bad data: structural problems found while listing (no images, no image with a label file, a class-name
file that does not match the labels) raise :class:`DatasetError` naming the file; images without a label
file are skipped and counted in a warning, as the official loader trains on the images that have labels. Per-sample
problems at read time (unreadable image/label, label value out of range, size mismatch) raise
:class:`DatasetError` too, unless ``skip_bad=True``: then the sample is replaced by the next one and
counted (``TrainSampleDataset.bad_samples``), with a warning naming the file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import posixpath
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import UserError
from .storage import exists, filesystem_for, join, read_bytes, url_for, write_bytes_atomic

__all__ = [
    "AugmentConfig",
    "DatasetError",
    "Sample",
    "DatasetSpec",
    "list_dataset",
    "read_class_names",
    "read_sample",
    "augment",
    "instances_from_label",
    "TrainSampleDataset",
    "EvalSampleDataset",
    "collate_train",
    "ignore_label_for",
    "shard_positions",
    "SampleShards",
    "write_sample_shards",
    "ShardedSamples",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IGNORE_LABEL = 255
IGNORE_LABEL_16BIT = 65535


def ignore_label_for(num_classes: int) -> int:
    """The ignore value of a dataset's label maps: 255 up to 255 classes (8-bit PNGs, the official
    COCO-Stuff/ADE-150 convention), 65535 above (16-bit labels: ADE-847, PC-459, our curation exports)."""
    return IGNORE_LABEL if num_classes <= 255 else IGNORE_LABEL_16BIT


class DatasetError(UserError):
    """A problem with the training data; the message names the file and what to do."""


@dataclass
class AugmentConfig:
    """The official training augmentation (configs/base Base-coco-stuff-164K-171 + the semantic mapper)."""

    min_sizes: tuple[int, ...] = tuple(int(x * 0.1 * 640) for x in range(5, 16))  # 320..960 step 64
    max_size: int = 2560
    crop_size: tuple[int, int] = (640, 640)  # (h, w)
    crop_enabled: bool = True
    single_category_max_area: float = 1.0
    color_aug: bool = True
    flip: bool = True
    pad_size: int = 640  # the mapper pads every sample to exactly this size (its SIZE_DIVISIBILITY)
    image_pad_value: int = 128

    def __post_init__(self) -> None:
        self.min_sizes = tuple(int(s) for s in self.min_sizes)
        if len(self.crop_size) != 2:
            raise UserError(f"crop_size must be (height, width), got {self.crop_size}")
        self.crop_size = (int(self.crop_size[0]), int(self.crop_size[1]))
        if not self.min_sizes or min(self.min_sizes) < 1:
            raise UserError(f"min_sizes must be positive sizes, got {self.min_sizes}")
        if self.crop_enabled and max(self.crop_size) > self.pad_size:
            raise UserError(f"crop_size {self.crop_size} is larger than pad_size {self.pad_size}")
        if self.pad_size % 32:
            raise UserError(f"pad_size must be a multiple of 32 (the model's size divisibility), got {self.pad_size}")


@dataclass(frozen=True)
class Sample:
    image: str  # URL/path of the image
    label: str  # URL/path of the label PNG


@dataclass
class DatasetSpec:
    """Where a dataset lives and how to read it."""

    root: str
    layout: str = "generic"  # "generic" | "coco171"
    split: str = "train2017"  # coco171 only
    skip_bad: bool = False
    storage_options: dict = field(default_factory=dict)


def _find(fs, base: str, exts: tuple[str, ...]) -> dict[str, str]:
    """Files under ``base`` with one of ``exts``, keyed by relative path without extension."""
    if not fs.exists(base):
        return {}
    out = {}
    base_norm = base.rstrip("/")
    for p in sorted(fs.find(base_norm)):
        stem, ext = posixpath.splitext(p)
        if ext.lower() in exts:
            key = stem[len(base_norm) :].lstrip("/")
            out[key] = p
    return out


def read_class_names(url: str, storage_options: dict | None = None) -> list[tuple[str, list[str]]]:
    """A dataset's class-name file as ``(prompt, synonyms)`` per class, in label order.

    Any format the vocabulary accepts (``name;synonym``, ``prompt|synonyms``, the official
    ``id:name,synonym``): one parser, ``ebseg_core.data.parse_class_list``.
    """
    from .data.benchmarks import BenchmarkError, parse_class_list

    fs, path = filesystem_for(url, storage_options)
    if not fs.exists(path):
        raise DatasetError(f"class-name file not found: {url} (one class per line, synonyms separated by ';')")
    try:
        return parse_class_list(fs.cat_file(path).decode("utf-8"), url)
    except BenchmarkError as e:
        raise DatasetError(str(e)) from None


def list_dataset(spec: DatasetSpec) -> tuple[list[Sample], list[tuple[str, list[str]]] | None]:
    """All (image, label) pairs of a dataset, sorted, and its class names (generic layout only).

    Like the official loader (detectron2's ``load_sem_seg`` keeps the intersection of images and label
    files), images without a label file and labels without an image are skipped; their counts are
    logged as a warning naming an example. Only a dataset with no pair left is refused.
    """
    fs, root = filesystem_for(spec.root, spec.storage_options)
    if spec.layout == "generic":
        img_dir, lab_dir = join(root, "images"), join(root, "labels")
        class_names = read_class_names(url_for(spec.root, join(root, "class_names.txt")), spec.storage_options)
    elif spec.layout == "coco171":
        img_dir = join(root, "coco", spec.split)
        lab_dir = join(root, "coco", "stuffthingmaps_detectron2", spec.split)
        class_names = None
    else:
        raise DatasetError(f"unknown dataset layout {spec.layout!r}: use 'generic' or 'coco171'")
    images = _find(fs, img_dir, IMAGE_EXTENSIONS)
    if not images:
        raise DatasetError(f"no images found under {url_for(spec.root, img_dir)} (layout {spec.layout!r})")
    labels = _find(fs, lab_dir, (".png",))
    samples = [Sample(url_for(spec.root, ipath), url_for(spec.root, labels[key]))
               for key, ipath in images.items() if key in labels]
    unlabeled = [url_for(spec.root, ipath) for key, ipath in images.items() if key not in labels]
    orphans = len(labels.keys() - images.keys())
    where = url_for(spec.root, lab_dir)
    if not samples:
        raise DatasetError(
            f"no (image, label) pairs in {spec.root}: none of the {len(images)} image(s) has a label file under "
            f"{where}, e.g. {unlabeled[0]} (expected {key_hint(unlabeled[0])}.png)"
        )
    if unlabeled:
        log.warning("%s: skipping %d of %d image(s) without a label file under %s (e.g. %s); training on %d",
                    spec.root, len(unlabeled), len(images), where, unlabeled[0], len(samples))
    if orphans:
        log.warning("%s: skipping %d label file(s) without an image under %s",
                    spec.root, orphans, url_for(spec.root, img_dir))
    return samples, class_names


def key_hint(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def read_sample(
    sample: Sample, num_classes: int | None, storage_options: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one sample: RGB uint8 [H,W,3] and label int64 [H,W]; DatasetError names the bad file."""
    try:
        with Image.open(io.BytesIO(read_bytes(sample.image, storage_options))) as im:
            image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a data problem of this file
        raise DatasetError(f"unreadable image {sample.image}: {e}") from None
    try:
        with Image.open(io.BytesIO(read_bytes(sample.label, storage_options))) as lm:
            if lm.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DatasetError(
                    f"label {sample.label} has mode {lm.mode}; expected a single-channel PNG of class indices"
                )
            label = np.asarray(lm).astype(np.int64)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"unreadable label {sample.label}: {e}") from None
    if label.shape != image.shape[:2]:
        raise DatasetError(
            f"label {sample.label} is {label.shape[1]}x{label.shape[0]} but image {sample.image} is "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    if num_classes is not None:
        ignore = ignore_label_for(num_classes)
        bad = (label >= num_classes) & (label != ignore)
        if bad.any():
            raise DatasetError(
                f"label {sample.label} has value {int(label[bad].max())} but the dataset has {num_classes} classes "
                f"(valid: 0..{num_classes - 1}, {ignore} = ignore); check class_names.txt"
            )
    return image, label


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------
def _resize_shortest_edge(image: np.ndarray, label: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator):
    h, w = label.shape
    size = int(rng.choice(cfg.min_sizes))
    scale = size / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > cfg.max_size:
        s = cfg.max_size / max(newh, neww)
        newh, neww = newh * s, neww * s
    newh, neww = int(newh + 0.5), int(neww + 0.5)
    if (newh, neww) == (h, w):
        return image, label
    image = np.asarray(Image.fromarray(image).resize((neww, newh), Image.Resampling.BILINEAR))
    lab = torch.from_numpy(label.astype(np.float64))[None, None]
    label = F.interpolate(lab, size=(newh, neww), mode="nearest")[0, 0].numpy().astype(np.int64)
    return image, label


def _random_crop(image: np.ndarray, label: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, ignore: int):
    h, w = label.shape
    ch, cw = min(cfg.crop_size[0], h), min(cfg.crop_size[1], w)

    def pick():
        return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))

    y0, x0 = pick()
    if cfg.single_category_max_area < 1.0:
        # Retry (up to 10 times) crops dominated by one category, like the official constraint.
        for _ in range(10):
            crop = label[y0 : y0 + ch, x0 : x0 + cw]
            vals, cnt = np.unique(crop, return_counts=True)
            cnt = cnt[vals != ignore]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cfg.single_category_max_area:
                break
            y0, x0 = pick()
    return image[y0 : y0 + ch, x0 : x0 + cw], label[y0 : y0 + ch, x0 : x0 + cw]


def _rgb_to_hsv_cv(img: np.ndarray) -> np.ndarray:
    """RGB uint8 -> HSV uint8 with OpenCV's 8-bit convention (H in 0..179, S and V in 0..255)."""
    x = img.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    mn = x.min(-1)
    d = v - mn
    s = np.where(v > 0, d * 255.0 / np.maximum(v, 1e-6), 0.0)
    dd = np.maximum(d, 1e-6)
    h_not_r = np.where(v == g, 120.0 + 60.0 * (b - r) / dd, 240.0 + 60.0 * (r - g) / dd)
    h = np.where(v == r, 60.0 * (g - b) / dd, h_not_r)
    h = np.where(d == 0, 0.0, h)
    h = np.where(h < 0, h + 360.0, h)
    out = np.stack([np.round(h / 2.0) % 180, np.round(s), np.round(v)], -1)
    return np.clip(out, 0, 255).astype(np.uint8)


def _hsv_cv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h = hsv[..., 0].astype(np.float32) * 2.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32)
    c = v * s
    hp = (h / 60.0) % 6
    xx = c * (1 - np.abs(hp % 2 - 1))
    m = v - c
    z = np.zeros_like(c)
    sector = np.floor(hp).astype(np.int64)
    choices = [
        np.stack([c, xx, z], -1),
        np.stack([xx, c, z], -1),
        np.stack([z, c, xx], -1),
        np.stack([z, xx, c], -1),
        np.stack([xx, z, c], -1),
        np.stack([c, z, xx], -1),
    ]
    rgb = np.zeros(hsv.shape, dtype=np.float32)
    for k, val in enumerate(choices):
        rgb = np.where((sector == k)[..., None], val, rgb)
    return np.clip(np.round(rgb + m[..., None]), 0, 255).astype(np.uint8)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _color_aug_ssd(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SSD photometric distortion: brightness +-32, contrast and saturation x[0.5,1.5], hue +-18 (each p=0.5)."""

    def contrast(img):
        return _convert(img, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else img

    def saturation(img):
        if rng.integers(2):
            hsv = _rgb_to_hsv_cv(img)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
            return _hsv_cv_to_rgb(hsv)
        return img

    def hue(img):
        if rng.integers(2):
            hsv = _rgb_to_hsv_cv(img)
            hsv[..., 0] = ((hsv[..., 0].astype(int) + int(rng.integers(-18, 19))) % 180).astype(np.uint8)
            return _hsv_cv_to_rgb(hsv)
        return img

    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-32, 32))
    if rng.integers(2):
        image = hue(saturation(contrast(image)))
    else:
        image = contrast(hue(saturation(image)))
    return image


def augment(image: np.ndarray, label: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator,
            ignore_label: int = IGNORE_LABEL) -> tuple[Tensor, Tensor]:
    """Official training augmentation -> (image uint8 [3,P,P], label int64 [P,P]) padded to ``pad_size``."""
    image, label = _resize_shortest_edge(image, label, cfg, rng)
    if cfg.crop_enabled:
        image, label = _random_crop(image, label, cfg, rng, ignore_label)
    if cfg.color_aug:
        image = _color_aug_ssd(image, rng)
    if cfg.flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return pad_sample(image, label, cfg.pad_size, cfg.image_pad_value, ignore_label)


def pad_sample(image: np.ndarray, label: np.ndarray, pad_size: int, image_pad: int = 128, ignore: int = IGNORE_LABEL):
    """Pad bottom/right to ``pad_size`` (or the next multiple of 32 if larger, where the official code would crop)."""
    h, w = label.shape
    th = pad_size if h <= pad_size else int(math.ceil(h / 32) * 32)
    tw = pad_size if w <= pad_size else int(math.ceil(w / 32) * 32)
    img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    lab = torch.from_numpy(np.ascontiguousarray(label)).long()
    img = F.pad(img, (0, tw - w, 0, th - h), value=image_pad)
    lab = F.pad(lab, (0, tw - w, 0, th - h), value=ignore)
    return img.contiguous(), lab.contiguous()


Tensor = torch.Tensor


def instances_from_label(label: Tensor, ignore_label: int = IGNORE_LABEL, ignore_is_unknown: bool = False
                         ) -> dict[str, Tensor]:
    """Per-class targets of a label map: sorted unique classes != ignore and their boolean masks.

    Officially an ignore pixel lies outside every mask, so the mask losses teach "no class here"; that
    suits a thin band along class boundaries. Pseudo-labels mark pixels they are unsure of as ignore,
    where "no class here" is wrong (it taught a fine-tune to leave half the image unlabelled): with
    ``ignore_is_unknown`` the targets carry ``known`` (label != ignore) and the losses skip the rest.
    """
    classes = torch.unique(label)
    classes = classes[classes != ignore_label]
    masks = label[None] == classes[:, None, None] if len(classes) else torch.zeros((0, *label.shape), dtype=torch.bool)
    target = {"labels": classes.long(), "masks": masks}
    if ignore_is_unknown:
        target["known"] = label != ignore_label
    return target


# --------------------------------------------------------------------------------------------------
# Sample streams for training
# --------------------------------------------------------------------------------------------------
def shard_positions(num_samples: int, rank: int, world_size: int, position: int, seed: int) -> int:
    """Index of the sample at ``position`` of this rank's infinite, epoch-shuffled stream.

    Every epoch is a fresh permutation (seeded by ``seed`` and the epoch) split evenly across ranks
    (the remainder is dropped), so the stream is a pure function of the position: resuming at
    iteration i reads exactly the samples an uninterrupted run would have read.
    """
    per_rank = num_samples // world_size
    if per_rank == 0:
        raise DatasetError(f"{num_samples} training samples cannot be split over {world_size} workers")
    epoch, offset = divmod(position, per_rank)
    return int(_epoch_permutation(num_samples, seed, epoch)[rank * per_rank + offset])


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's order, computed once per epoch instead of once per sample (O(N) each: millions of samples)."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    perm.flags.writeable = False
    return perm


# --------------------------------------------------------------------------------------------------
# Sample lists as Parquet shards (the driver writes them once; workers read them by position)
# --------------------------------------------------------------------------------------------------
SHARD_ROWS = 65536
_SHARD_INDEX = "index.json"


@dataclass(frozen=True)
class SampleShards:
    """Where a sample list lives: Parquet files of (image, label) rows, in list order, and their row counts.

    This, not the list, is what a training driver sends its workers, so the payload does not grow with
    the dataset (millions of samples).
    """

    urls: tuple[str, ...]
    counts: tuple[int, ...]

    def __len__(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict:
        return {"urls": list(self.urls), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, d: dict) -> SampleShards:
        return cls(tuple(d["urls"]), tuple(int(c) for c in d["counts"]))


def write_sample_shards(samples: Sequence[Sample], directory: str, rows_per_shard: int = SHARD_ROWS,
                        storage_options: dict | None = None) -> SampleShards:
    """Write ``samples`` as Parquet shards under ``directory/<digest of the list>/`` (local path or URL).

    Content-addressed: the same list (a rerun or a resume of the same data) finds its shards already
    there and reuses them; ``index.json`` is written last, so a half-written directory is rewritten.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    for s in samples:
        digest.update(f"{len(s.image)}:{s.image}{len(s.label)}:{s.label}".encode())
    base = join(directory, digest.hexdigest()[:24])
    index_url = join(base, _SHARD_INDEX)
    if exists(index_url, storage_options):
        return SampleShards.from_dict(json.loads(read_bytes(index_url, storage_options)))
    urls, counts = [], []
    for k, start in enumerate(range(0, max(len(samples), 1), rows_per_shard)):
        chunk = samples[start : start + rows_per_shard]
        buf = io.BytesIO()
        pq.write_table(pa.table({"image": [s.image for s in chunk], "label": [s.label for s in chunk]}), buf)
        urls.append(write_bytes_atomic(join(base, f"part-{k:05d}.parquet"), buf.getvalue(), storage_options))
        counts.append(len(chunk))
    shards = SampleShards(tuple(urls), tuple(counts))
    write_bytes_atomic(index_url, json.dumps(shards.to_dict()).encode(), storage_options)
    return shards


class ShardedSamples(Sequence[Sample]):
    """The samples of :class:`SampleShards` by position, each shard read from storage on first use.

    Keeps the last ``cache_shards`` shards it read (Arrow string columns: ~100 bytes per sample).
    Picklable (DataLoader workers start with an empty cache).
    """

    def __init__(self, shards: SampleShards, storage_options: dict | None = None, cache_shards: int = 64):
        self.shards = shards
        self.storage_options = storage_options or {}
        self.cache_shards = max(1, cache_shards)
        self._ends = np.cumsum(shards.counts)
        self._cache: OrderedDict[int, tuple[list, list]] = OrderedDict()
        self.shard_reads = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict(), "shard_reads": 0}

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        if isinstance(i, slice):  # Sequence promises slices too
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        k = int(np.searchsorted(self._ends, i, side="right"))
        images, labels = self._shard(k)
        j = i - (int(self._ends[k - 1]) if k else 0)
        return Sample(images[j].as_py(), labels[j].as_py())

    def _shard(self, k: int):
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        import pyarrow.parquet as pq

        url = self.shards.urls[k]
        table = pq.read_table(io.BytesIO(read_bytes(url, self.storage_options)))
        if table.num_rows != self.shards.counts[k]:
            raise DatasetError(f"sample list shard {url} has {table.num_rows} rows, expected {self.shards.counts[k]}"
                               " (was the run directory changed?)")
        self._cache[k] = (table.column("image"), table.column("label"))
        self.shard_reads += 1
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return self._cache[k]


class TrainSampleDataset(torch.utils.data.Dataset):
    """Map-style dataset whose index is the position in this rank's stream (see ``shard_positions``).

    Reads each sample from its URL on demand (no local copy) and applies the augmentation with an RNG
    seeded by (seed, rank, position), so data order and augmentation survive a resume exactly.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        augment_cfg: AugmentConfig,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        skip_bad: bool = False,
        storage_options: dict | None = None,
        reader: Callable[[Sample, int, dict | None], tuple[np.ndarray, np.ndarray]] | None = None,
        ignore_is_unknown: bool = False,
    ):
        self.samples = samples  # a list, or ShardedSamples reading the driver's shards on demand
        # read_sample's signature; pipeline.label_source.LabelRowReader reads label-Parquet rows
        self.reader = reader or read_sample
        self.num_classes = num_classes
        self.ignore_label = ignore_label_for(num_classes)
        self.cfg = augment_cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.skip_bad = skip_bad
        self.storage_options = storage_options or {}
        self.bad_samples = 0
        self.ignore_is_unknown = ignore_is_unknown  # see instances_from_label
        shard_positions(len(self.samples), rank, world_size, 0, seed)  # validates the split

    def __len__(self) -> int:  # an infinite stream; DataLoader needs a bound
        return 2**62

    def __getitem__(self, position: int) -> dict:
        for attempt in range(100):
            idx = shard_positions(len(self.samples), self.rank, self.world_size, position + attempt * 7919, self.seed)
            sample = self.samples[idx]
            try:
                image, label = self.reader(sample, self.num_classes, self.storage_options)
            except DatasetError as e:
                if not self.skip_bad:
                    raise
                self.bad_samples += 1
                log.warning("skipping bad sample (%d so far on this worker): %s", self.bad_samples, e)
                continue
            rng = np.random.default_rng([self.seed, self.rank, position])
            img, lab = augment(image, label, self.cfg, rng, self.ignore_label)
            return {"image": img, "label": lab, "ignore": self.ignore_label, "bad": attempt,
                    "ignore_is_unknown": self.ignore_is_unknown}
        raise DatasetError("100 bad samples in a row; the dataset looks broken")


class EvalSampleDataset(torch.utils.data.Dataset):
    """Validation samples at their original size (RGB uint8 [H,W,3], label int64 [H,W])."""

    def __init__(self, samples: Sequence[Sample], num_classes: int, storage_options: dict | None = None):
        self.samples = list(samples)
        self.num_classes = num_classes
        self.storage_options = storage_options or {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return read_sample(self.samples[i], self.num_classes, self.storage_options)


def collate_train(batch: list[dict]) -> tuple[Tensor, list[dict], int]:
    """Stack images [B,3,P,P] (uint8) and build per-image targets from the label maps."""
    images = torch.stack([b["image"] for b in batch])
    targets = [instances_from_label(b["label"], b["ignore"], b.get("ignore_is_unknown", False)) for b in batch]
    return images, targets, sum(int(b["bad"]) for b in batch)
