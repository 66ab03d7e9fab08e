"""Training samples straight from label Parquet: a curation query picks the rows, nothing is exported.

A million-image selection of pseudo-labels trains without first copying images and label PNGs into
the ``generic`` layout: the listing is a list of :class:`ebseg_core.train_data.Sample` whose ``image``
is the source URI and whose ``label`` points at one row of one row group of one label Parquet file
(``<file url>#row_group=G&row=R&image_id=ID``). :class:`LabelRowReader` has the signature of
``train_data.read_sample`` and returns the same (RGB uint8 image, int64 label) pair, the label filtered
like ``ebseg curate export``: kept classes renumbered ``0..K-1``, other classes and pixels below the
pixel-confidence threshold set to the ignore value (``ignore_label_for(K)``).

Why row-group addresses: Parquet reads a column chunk per row group, so reading one row costs its row
group's mask columns (``ebseg label`` writes 256 rows per group). The reader keeps the last few row
groups it read, and the confidence column is read only when a threshold needs it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ebseg_core.storage import pyarrow_filesystem_for, read_bytes
from ebseg_core.train_data import DatasetError, Sample
from pipeline import curate as C
from pipeline import schema as S

_FILTER_KEYS = ("name", "min_fraction", "max_fraction", "min_confidence", "max_confidence")
OPTION_KEYS = ("classes", "without", "limit", "sample", "per_class", "seed", "keep_classes",
               "min_pixel_confidence", "most_confident")


@dataclass
class LabelSourceSpec:
    """Which label rows train, and how their labels are filtered (the options of ``ebseg curate export``).

    ``query``: class/area/confidence filters (ok rows only); ``sample``/``per_class``/``seed``: an
    optional seeded sample of the matches; ``keep_classes``: the class subset (None = every class);
    ``min_pixel_confidence``: pixels below it become the ignore value; ``most_confident``: keep only
    this fraction of the selected rows, those whose image-level mean confidence (pixel-weighted over
    its classes) is highest. Why: on pseudo-labels the most confident images are the most correct
    ones (measured in docs/training.md, "Self-training, measured"), and unlike a pixel threshold it
    leaves no ignored holes, which Mask2Former's mask loss would learn as "no object here".
    """

    url: str
    query: C.Query = field(default_factory=C.Query)
    sample: int | None = None
    per_class: int | None = None
    seed: int = 0
    keep_classes: list[str] | None = None
    min_pixel_confidence: float | None = None
    most_confident: float | None = None

    @classmethod
    def from_options(cls, url: str, options: Mapping[str, Any] | None) -> LabelSourceSpec:
        """Spec from a plain mapping (a training config's YAML), e.g.::

            {"classes": [{"name": "car", "min_fraction": 0.05, "min_confidence": 0.6}, "grass"],
             "without": ["road"], "keep_classes": ["car", "grass"], "min_pixel_confidence": 0.5}
        """
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(OPTION_KEYS))
        if unknown:
            raise C.CurationError(f"unknown label-source option(s) {', '.join(unknown)}; "
                                  f"valid: {', '.join(OPTION_KEYS)}")
        filters = []
        for item in opts.get("classes") or []:
            item = {"name": item} if isinstance(item, str) else dict(item)
            bad = sorted(set(item) - set(_FILTER_KEYS))
            if bad or "name" not in item:
                raise C.CurationError(f"class filter {item!r}: give 'name' and any of "
                                      f"{', '.join(_FILTER_KEYS[1:])}" + (f" (not {', '.join(bad)})" if bad else ""))
            filters.append(C.ClassFilter(**item))
        for key in ("limit", "sample", "per_class"):
            v = opts.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise C.CurationError(f"label-source option {key} must be a whole number >= 0, got {v!r}")
        most = opts.get("most_confident")
        if most is not None and (isinstance(most, bool) or not isinstance(most, (int, float)) or not 0 < most <= 1):
            raise C.CurationError(f"label-source option most_confident is a fraction in (0, 1], got {most!r}")
        keep = opts.get("keep_classes")
        return cls(
            url=url,
            query=C.Query(classes=filters, without=list(opts.get("without") or []), status=S.STATUS_OK,
                          limit=opts.get("limit")),
            sample=opts.get("sample"),
            per_class=opts.get("per_class"),
            seed=int(opts.get("seed", 0)),
            keep_classes=[keep] if isinstance(keep, str) else (list(keep) if keep else None),
            min_pixel_confidence=opts.get("min_pixel_confidence"),
            most_confident=None if most is None else float(most),
        )


def label_ref(file_url: str, row_group: int, row: int, image_id: str) -> str:
    """The ``Sample.label`` of one label row."""
    return f"{file_url}#row_group={row_group}&row={row}&image_id={quote(image_id, safe='')}"


def parse_label_ref(ref: str) -> tuple[str, int, int, str]:
    """(file url, row group, row, image_id) of a :func:`label_ref` string."""
    url, sep, frag = ref.rpartition("#")
    q = parse_qs(frag)
    try:
        if not sep:
            raise KeyError("#")
        return url, int(q["row_group"][0]), int(q["row"][0]), unquote(q["image_id"][0])
    except (KeyError, ValueError, IndexError):
        raise DatasetError(f"{ref!r} is not a label-row reference (<parquet url>#row_group=G&row=R&image_id=ID); "
                           "was the dataset listed with data.layout 'labels'?") from None


def _file_url(dataset_url: str, path: str) -> str:
    """URL of one file of a label dataset, from its pyarrow filesystem path."""
    return f"{dataset_url.split('://', 1)[0]}://{path}" if "://" in dataset_url else path


@dataclass
class LabelListing:
    """What :func:`list_label_samples` found: the samples, their class names and how to read them."""

    samples: list[Sample]
    class_names: list[tuple[str, list[str]]]  # (prompt, synonyms) of kept class i, as read_class_names gives
    reader: LabelRowReader
    matched: int  # rows the query selected (before dropping ones without a readable position)


def list_label_samples(spec: LabelSourceSpec) -> LabelListing:
    """Samples of the rows ``spec`` selects, in dataset order (file, row group, row).

    Reads only small columns: the query's summaries, then ``image_id``/``status`` per row group to
    address each selected row (the last written row of an image wins, as in the exports).
    """
    ds = C.open_labels(spec.url)
    lf = C.make_label_filter(ds, spec.keep_classes, spec.min_pixel_confidence)
    if spec.query.status not in (None, S.STATUS_OK):
        raise C.CurationError("training reads labelled rows: the query's status must be 'ok'")
    q = replace(spec.query, status=S.STATUS_OK)
    selected = C.select(ds, q, spec.sample, spec.per_class, spec.seed, columns=["image_id", "uri", "classes"])
    if spec.most_confident is not None:
        selected = most_confident_rows(selected, spec.most_confident)
    uri_of = dict(zip(selected.column("image_id").to_pylist(), selected.column("uri").to_pylist()))
    if not uri_of:
        raise DatasetError(f"the label query selects no labelled images in {spec.url}")
    where: dict[str, tuple[int, int, int]] = {}
    for fi, path in enumerate(ds.files):
        with ds.filesystem.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=["image_id", "status"])
                for r, (iid, status) in enumerate(zip(t.column(0).to_pylist(), t.column(1).to_pylist())):
                    if status == S.STATUS_OK and iid in uri_of:
                        where[iid] = (fi, rg, r)
    order = sorted(where, key=lambda image_id: where[image_id])
    samples = [Sample(uri_of[i], label_ref(_file_url(ds.url, ds.files[where[i][0]]), where[i][1], where[i][2], i))
               for i in order]
    from ebseg_core.data.benchmarks import parse_class_list

    # The same parse as the class_names.txt of an export (read_class_names), so both train alike.
    names = parse_class_list("\n".join(C.class_names_lines(ds, lf.keep_ids)), spec.url)
    return LabelListing(samples, names, LabelRowReader(lf), len(uri_of))


def image_mean_confidence(classes: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per row, the mean pixel confidence of the whole label map, from the ``classes`` summaries."""
    out = np.zeros(len(classes), dtype=np.float64)
    for i, row in enumerate(classes.to_pylist()):
        pixels = sum(c["pixels"] for c in row)
        out[i] = sum(c["pixels"] * c["mean_confidence"] for c in row) / pixels if pixels else 0.0
    return out


def most_confident_rows(table: pa.Table, fraction: float) -> pa.Table:
    """The ``ceil(fraction * rows)`` rows of highest image-level mean confidence, in table order
    (ties by position, so the choice is reproducible)."""
    n = int(np.ceil(fraction * table.num_rows - 1e-9))
    order = np.argsort(-image_mean_confidence(table.column("classes")), kind="stable")[:n]
    return table.take(pa.array(np.sort(order)))


class LabelRowReader:
    """``read_sample`` for label-row samples: (RGB uint8 [H,W,3], int64 label [H,W] with ignore).

    Picklable (DataLoader workers); each process keeps its own cache of the last ``cache_row_groups``
    row groups read (0: none).
    ``row_group_reads`` counts the row groups it fetched from storage.
    """

    def __init__(self, label_filter: C.LabelFilter, cache_row_groups: int = 4):
        self.label_filter = label_filter
        self.cache_row_groups = cache_row_groups
        self.row_group_reads = 0
        self._cache: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()

    @property
    def num_classes(self) -> int:
        return len(self.label_filter.keep_ids)

    @property
    def ignore_label(self) -> int:
        return self.label_filter.ignore_index

    def to_dict(self) -> dict:
        """JSON-serialisable form (a training driver's payload to its workers)."""
        return {"label_filter": asdict(self.label_filter), "cache_row_groups": self.cache_row_groups}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelRowReader:
        return cls(C.LabelFilter(**d["label_filter"]), int(d.get("cache_row_groups", 4)))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict(), "row_group_reads": 0}

    def _row_group(self, file_url: str, rg: int, storage_options: dict | None) -> pa.Table:
        key = (file_url, rg)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        columns = ["image_id", "label_png"] + (["confidence_png"] if self.label_filter.min_confidence is not None
                                               else [])
        fs, path = pyarrow_filesystem_for(file_url, storage_options)
        with fs.open_input_file(path) as f:
            table = pq.ParquetFile(f).read_row_group(rg, columns=columns)
        self.row_group_reads += 1
        self._cache[key] = table
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return table

    def __call__(self, sample: Sample, num_classes: int | None = None,
                 storage_options: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        from pipeline.images import decode_image
        file_url, rg, row, image_id = parse_label_ref(sample.label)
        if num_classes is not None and num_classes != self.num_classes:
            raise DatasetError(f"the label query keeps {self.num_classes} classes but training expects {num_classes}")
        try:
            table = self._row_group(file_url, rg, storage_options)
            if row >= table.num_rows or table.column("image_id")[row].as_py() != image_id:
                raise DatasetError(f"{file_url} changed since the samples were listed (row {row} of row group "
                                   f"{rg} is not image {image_id}); list the label dataset again")
            label = S.decode_label_png(table.column("label_png")[row].as_py())
            conf = None
            if self.label_filter.min_confidence is not None:
                conf = S.decode_confidence_png(table.column("confidence_png")[row].as_py())
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001 - storage or decoding failure of this label row
            raise DatasetError(f"unreadable label row {sample.label}: {type(e).__name__}: {e}") from None
        try:
            image = decode_image(read_bytes(sample.image, storage_options))
        except Exception as e:  # noqa: BLE001 - any read/decode failure is a data problem of this file
            raise DatasetError(f"unreadable image {sample.image}: {e}") from None
        if image.shape[:2] != label.shape:
            raise DatasetError(f"image {sample.image} is {image.shape[1]}x{image.shape[0]} but was labelled at "
                               f"{label.shape[1]}x{label.shape[0]} (changed since labelling?)")
        return image, self.label_filter.apply(label, conf)
