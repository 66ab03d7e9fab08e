"""The open-vocabulary benchmarks EBSeg is evaluated on: their class names and on-disk layouts.

Class names live in ``class_names/<key>.txt`` next to this file, one class per line in the order of the
dataset's label ids, synonyms separated by ``;`` (the first one is the name used in prompts). They were
written from the public dataset definitions:

* ``coco171``: COCO-Stuff 164k, the 80 COCO thing classes then the 91 stuff classes, in category-id order
  (the contiguous ids 0..170 of the prepared ``stuffthingmaps_detectron2`` labels).
* ``ade150``: ADE20K SceneParsing ``objectInfo150`` names with their WordNet synonyms.
* ``ade847``: ADE20K-full, the 847 classes of the MaskFormer/SAN definition (ADE20K index names), in
  train-id order. Ten of its WordNet names share their first word with another class ('screen' for a
  CRT screen and a projection screen); for those the later class is prompted by its next synonym and
  keeps the shared word as a synonym, so that prompt names stay unique.
* ``pc59`` / ``pc459``: PASCAL Context, 59 classes and the full 459 (its ``labels.txt`` without background).
* ``voc20``: PASCAL VOC 2012, the 20 object classes (background is ignored).

The layouts are the prepared ("detectron2") formats used by SAN, which EBSeg follows; see
``docs/evaluation.md`` and ``pipeline/prepare_data.py``, which writes them from the raw downloads.
"""

from __future__ import annotations

import os
import posixpath
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..storage import filesystem_for, iter_files, join

CLASS_NAMES_DIR = Path(__file__).resolve().parent / "class_names"

#: Class-list keys shipped with the package (one ``<key>.txt`` file each).
CLASS_LIST_KEYS = ("coco171", "ade150", "ade847", "pc59", "pc459", "voc20")


class BenchmarkError(UserError):
    """A user mistake about a benchmark: unknown name, wrong root, malformed class-name file."""


# --------------------------------------------------------------------------------------------------
# class names
# --------------------------------------------------------------------------------------------------
_OFFICIAL_LINE = re.compile(r"^\s*(\d+)\s*:(.*)$")


def parse_class_list(text: str, where: str = "class-name file") -> list[tuple[str, list[str]]]:
    """Parse a class list into ``(prompt, synonyms)`` per class, in label order.

    Our format: one class per line, synonyms separated by ``;`` (names may contain commas); the first
    synonym is the prompt (the name formatted into the templates), unless the line names its prompt
    before ``|``: ``road, route|road;route;street``. The official EBSeg/SAN files number their lines
    (``1:wall,walls``) and separate synonyms with ``,``; their first name is the prompt. Synonyms only
    decide whether a class counts as seen in training. Blank lines and ``#`` comments are skipped; a
    file is in one format or the other. Official files may skip ids (COCO's category ids do) but must
    list them in increasing order.
    """
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise BenchmarkError(f"{where}: no class names in it")
    numbered = [bool(_OFFICIAL_LINE.match(line)) for _, line in lines]
    if any(numbered) and not all(numbered):
        n = lines[numbered.index(False)][0]
        raise BenchmarkError(
            f"{where}: line {n} has no 'id:' prefix while other lines do; use either the official "
            "'id:name,synonym,...' format on every line or ours ('name;synonym;...') on every line"
        )
    classes: list[tuple[str, list[str]]] = []
    if all(numbered):
        ids = []
        for n, line in lines:
            m = _OFFICIAL_LINE.match(line)
            assert m is not None
            ids.append(int(m.group(1)))
            names = _unique(s.strip() for s in m.group(2).split(","))
            if not names:
                raise BenchmarkError(f"{where}: line {n} has an id but no class name")
            classes.append((names[0], names))
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise BenchmarkError(f"{where}: class ids must increase line by line (label order); got {ids[:5]}...")
        return classes
    for n, line in lines:
        prompt, bar, rest = line.partition("|")
        names = _unique(s.strip() for s in (rest if bar else line).split(";"))
        prompt = prompt.strip() if bar else (names[0] if names else "")
        if not prompt or not names:
            raise BenchmarkError(f"{where}: line {n} has an empty class name or no synonyms after '|'")
        classes.append((prompt, names))
    return classes


def _unique(names) -> list[str]:
    out: list[str] = []
    for name in names:
        if name and name not in out:
            out.append(name)
    return out


def _prompt_first(classes: list[tuple[str, list[str]]]) -> list[list[str]]:
    return [[prompt, *[s for s in syns if s != prompt]] for prompt, syns in classes]


def parse_class_names(text: str, where: str = "class-name file") -> list[list[str]]:
    """Names per class, the prompt first (see :func:`parse_class_list`): for display and lookups."""
    return _prompt_first(parse_class_list(text, where))


def read_class_list_file(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """Read a class-name file (either format) as ``(prompt, synonyms)`` per class."""
    p = Path(path)
    if not p.is_file():
        raise BenchmarkError(f"class-name file not found: {p}")
    return parse_class_list(p.read_text(encoding="utf-8"), str(p))


def load_class_list(key: str) -> list[tuple[str, list[str]]]:
    """``(prompt, synonyms)`` per class (label order) for a benchmark key or a file path.

    ``key``: one of :data:`CLASS_LIST_KEYS` (or a benchmark name such as ``ade150-val``), or the path of
    a class-name file in our format or the official ``id:name,syn,...`` format.
    """
    if os.path.sep in key or key.endswith(".txt") or Path(key).is_file():
        return read_class_list_file(key)
    canonical = key.lower()
    if canonical in BENCHMARKS:
        canonical = BENCHMARKS[canonical].classes
    if canonical not in CLASS_LIST_KEYS:
        raise BenchmarkError(
            f"no class list named {key!r}; known: {', '.join(CLASS_LIST_KEYS)}; or pass the path of a "
            "class-name file (one class per line, synonyms separated by ';', or the official "
            "'id:name,synonym,...' format)"
        )
    path = CLASS_NAMES_DIR / f"{canonical}.txt"
    if not path.is_file():
        raise BenchmarkError(
            f"the class list {canonical!r} is not shipped in this installation ({path} missing); pass "
            "a class-name file instead (our 'name;synonym' format or the official 'id:name,synonym')"
        )
    return read_class_list_file(path)


def load_class_names(key: str) -> list[list[str]]:
    """Names per class (label order), the prompt first, for a benchmark key or a file path."""
    return _prompt_first(load_class_list(key))


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Benchmark:
    """Where a prepared benchmark split lives under a datasets root, and what its label values mean.

    Label files hold, per pixel, the contiguous class id ``0..num_classes-1`` (the line number in the
    class list) or ``ignore_label`` for unlabeled pixels; images and labels pair by file name stem.
    """

    name: str
    classes: str  # class-list key
    num_classes: int
    image_dir: str  # relative to the datasets root, '/'-separated
    label_dir: str
    image_ext: str
    label_ext: str
    ignore_label: int
    description: str

    def image_root(self, root: str) -> str:
        return join(root, self.image_dir)

    def label_root(self, root: str) -> str:
        return join(root, self.label_dir)


_BENCHMARK_LIST = [
    Benchmark("coco171", "coco171", 171, "coco/val2017", "coco/stuffthingmaps_detectron2/val2017",
              ".jpg", ".png", 255,
              "COCO-Stuff-171 val2017 (5000 images); labels = stuffthingmaps remapped to 0..170"),
    Benchmark("coco171-train", "coco171", 171, "coco/train2017", "coco/stuffthingmaps_detectron2/train2017",
              ".jpg", ".png", 255, "COCO-Stuff-171 train2017 (118k images), EBSeg's training set"),
    Benchmark("voc20", "voc20", 20, "VOC2012/JPEGImages", "VOC2012/annotations_detectron2/val",
              ".jpg", ".png", 255,
              "PASCAL VOC 2012 val (1449 images), 20 classes, background and boundaries ignored"),
    Benchmark("pc59", "pc59", 59, "pcontext/val/image", "pcontext/val/label", ".jpg", ".png", 255,
              "PASCAL Context-59 val (5105 images), background ignored"),
    Benchmark("pc459", "pc459", 459, "pcontext_full/val/image", "pcontext_full/val/label", ".jpg", ".tif",
              65535, "PASCAL Context-459 val (5105 images), 16-bit TIFF labels, background = 65535"),
    Benchmark("ade150", "ade150", 150, "ADEChallengeData2016/images/validation",
              "ADEChallengeData2016/annotations_detectron2/validation", ".jpg", ".png", 255,
              "ADE20K-150 val (2000 images); labels = SceneParsing annotation - 1, 0 -> 255"),
    Benchmark("ade847", "ade847", 847, "ADE20K_2021_17_01/images_detectron2/validation",
              "ADE20K_2021_17_01/annotations_detectron2/validation", ".jpg", ".tif", 65535,
              "ADE20K-full-847 val (2000 images, resized to short side <= 512), 16-bit TIFF labels"),
]

#: Benchmark name -> layout. Aliases: the detectron2 dataset names used by SAN/EBSeg configs.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in _BENCHMARK_LIST}
_ALIASES = {
    "coco_2017_test_stuff_sem_seg": "coco171", "coco171-val": "coco171",
    "coco_2017_train_stuff_sem_seg": "coco171-train",
    "voc_sem_seg_val": "voc20", "voc20-val": "voc20", "voc": "voc20",
    "pcontext_sem_seg_val": "pc59", "pc59-val": "pc59",
    "pcontext_full_sem_seg_val": "pc459", "pc459-val": "pc459",
    "ade20k_sem_seg_val": "ade150", "ade150-val": "ade150",
    "ade20k_full_sem_seg_val": "ade847", "ade847-val": "ade847",
}
for _alias, _target in _ALIASES.items():
    BENCHMARKS[_alias] = BENCHMARKS[_target]


def get_benchmark(name: str) -> Benchmark:
    """The layout of a benchmark by name (``ade150``) or detectron2 dataset name (``ade20k_sem_seg_val``)."""
    b = BENCHMARKS.get(name.strip().lower())
    if b is None:
        raise BenchmarkError(
            f"unknown benchmark {name!r}; choose one of {', '.join(b.name for b in _BENCHMARK_LIST)}"
        )
    return b


@dataclass(frozen=True)
class Pair:
    """One evaluation sample: an image and its ground-truth label file."""

    key: str  # path of the label relative to the label dir, without extension (stable id)
    image_uri: str
    label_uri: str


def _rel_stem(uri: str, base: str) -> str:
    rel = uri[len(base):].lstrip("/\\").replace("\\", "/")
    return posixpath.splitext(rel)[0]


def _list(base: str, ext: str) -> dict[str, str]:
    try:
        uris = list(iter_files(base, extensions=[ext]))
    except FileNotFoundError:
        return {}
    _, base_path = filesystem_for(base)  # local: absolute, as iter_files lists them; remote: bucket/key
    return {_rel_stem(u if "://" not in u else u.split("://", 1)[1], base_path): u for u in uris}


def list_pairs(benchmark: Benchmark | str, root: str, limit: int | None = None) -> list[Pair]:
    """All (image, label) pairs of a prepared benchmark under ``root`` (local dir or ``s3://...``).

    Sorted by key, so every run and every worker sees the same order. Pairs are matched by the stem of
    the file name (as detectron2's ``load_sem_seg``); labels without an image are skipped with a
    warning (VOC's image folder holds train and val images; the label folder only the split's).
    """
    b = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    image_root, label_root = b.image_root(root), b.label_root(root)
    labels = _list(label_root, b.label_ext)
    if not labels:
        raise BenchmarkError(
            f"{b.name}: no '{b.label_ext}' label files in {label_root}; expected the prepared layout "
            f"<root>/{b.label_dir}/*{b.label_ext} (and images in <root>/{b.image_dir}). Is --root the "
            f"folder that contains '{b.label_dir.split('/')[0]}/'? Prepare the raw download with "
            f"'ebseg prepare-data {b.classes} --raw DIR --out ROOT'."
        )
    images = _list(image_root, b.image_ext)
    if not images:
        raise BenchmarkError(
            f"{b.name}: found labels but no '{b.image_ext}' images in {image_root}; expected "
            f"<root>/{b.image_dir}/*{b.image_ext}"
        )
    keys = sorted(labels)
    pairs = [Pair(k, images[k], labels[k]) for k in keys if k in images]
    missing = len(keys) - len(pairs)
    if not pairs:
        raise BenchmarkError(
            f"{b.name}: no label in {label_root} has an image of the same name in {image_root} "
            f"(e.g. label {keys[0]!r})"
        )
    if missing:
        warnings.warn(f"{b.name}: {missing} of {len(keys)} labels have no image in {image_root}; skipped",
                      stacklevel=2)
    return pairs[:limit] if limit is not None else pairs
