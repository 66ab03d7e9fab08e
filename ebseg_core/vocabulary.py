"""Vocabularies: the class names a user segments with, with synonyms.

Each class has a prompt (the name formatted into the templates; by default its first synonym) and
synonyms, which decide whether the class counts as "seen" in training (any synonym among the
COCO-Stuff-171 training synonyms) and so select the balancing weights at inference, exactly as the
official model does. The benchmark presets carry the official prompts and synonym lists.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

MAX_CLASSES = 5000  # the text classifier and per-pixel scores grow with C; beyond this, split the vocabulary

_PRESET_ALIASES = {
    "coco171": "coco171", "coco-stuff-171": "coco171", "cocostuff": "coco171", "coco": "coco171",
    "ade150": "ade150", "ade-150": "ade150", "a-150": "ade150",
    "ade847": "ade847", "ade-847": "ade847", "a-847": "ade847",
    "pc59": "pc59", "pc-59": "pc59", "pascal-context-59": "pc59",
    "pc459": "pc459", "pc-459": "pc459", "pascal-context-459": "pc459",
    "voc20": "voc20", "voc-20": "voc20", "voc": "voc20",
}


class VocabularyError(UserError):
    """A vocabulary a user gave is unusable; the message says why."""


@dataclass(frozen=True)
class Vocabulary:
    synonyms: tuple[tuple[str, ...], ...]
    seen: tuple[bool, ...] | None = None  # explicit seen/unseen flags; computed from synonyms when None
    source: str = "custom"
    prompts: tuple[str, ...] | None = None  # the name formatted into the templates; None: first synonyms

    def __post_init__(self) -> None:
        if self.prompts is not None:
            if len(self.prompts) != len(self.synonyms):
                raise VocabularyError("prompts must have one entry per class")
            if tuple(self.prompts) == tuple(s[0] for s in self.synonyms if s):
                object.__setattr__(self, "prompts", None)  # one spelling per vocabulary (stable ids)
        if not self.synonyms:
            raise VocabularyError("the vocabulary is empty: give at least one class name")
        if len(self.synonyms) > MAX_CLASSES:
            raise VocabularyError(
                f"the vocabulary has {len(self.synonyms)} classes; at most {MAX_CLASSES} fit in memory at once "
                "— split it into several runs")
        for i, syns in enumerate(self.synonyms):
            if not syns or any(not s.strip() for s in syns):
                raise VocabularyError(f"class {i + 1} has an empty name")
        if self.prompts is not None and any(not p.strip() for p in self.prompts):
            raise VocabularyError("a class has an empty prompt")
        seen_names: dict[str, int] = {}
        for i, name in enumerate(self.names):
            key = name.strip().lower()
            if key in seen_names:
                raise VocabularyError(
                    f"class name {name!r} appears twice (classes {seen_names[key] + 1} and {i + 1}); "
                    "merge them as synonyms with ';'")
            seen_names[key] = i
        if self.seen is not None and len(self.seen) != len(self.synonyms):
            raise VocabularyError("seen flags must have one entry per class")

    @property
    def names(self) -> list[str]:
        """Prompt name of each class."""
        return list(self.prompts) if self.prompts is not None else [s[0] for s in self.synonyms]

    def __len__(self) -> int:
        return len(self.synonyms)

    @property
    def id(self) -> str:
        """Stable id of the vocabulary's content (for lineage and caches)."""
        content: dict[str, object] = {"synonyms": self.synonyms, "seen": self.seen}
        if self.prompts is not None:
            content["prompts"] = self.prompts
        payload = json.dumps(content, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> Vocabulary:
        """'cat,dog;puppy,grass': ',' separates classes, ';' separates synonyms of one class."""
        classes = [c for c in (part.strip() for part in text.split(",")) if c]
        if not classes:
            raise VocabularyError(f"no class names in {text!r}; example: \"cat,dog;puppy,grass\"")
        return cls(tuple(_split_synonyms(c, ";") for c in classes))

    @classmethod
    def from_names(cls, names: list[str] | list[list[str]]) -> Vocabulary:
        return cls(tuple((n,) if isinstance(n, str) else tuple(n) for n in names))

    @classmethod
    def from_file(cls, path: str | Path) -> Vocabulary:
        """One class per line, synonyms separated by ';' (ours) or the official 'id:name,syn,...' format;
        a local path or a URL (``s3://...``)."""
        from .data.benchmarks import BenchmarkError, parse_class_list
        from .storage import read_bytes

        where = str(path)
        try:
            data = read_bytes(where)
        except FileNotFoundError:
            raise VocabularyError(f"vocabulary file not found: {where}") from None
        except IsADirectoryError:
            raise VocabularyError(f"vocabulary file is a directory: {where}") from None
        try:
            classes = parse_class_list(data.decode("utf-8"), where)
        except BenchmarkError as e:
            raise VocabularyError(str(e)) from None
        except UnicodeDecodeError as e:
            raise VocabularyError(f"{where}: not UTF-8 text ({e})") from None
        return cls.from_class_list(classes, source=where)

    @classmethod
    def from_options(cls, *, text: str | None = None, file: str | None = None,
                     preset: str | None = None) -> Vocabulary:
        """The vocabulary flags of every command (``--vocabulary``, ``--vocabulary-file``,
        ``--vocabulary-preset``): exactly one of them."""
        given = [x for x in (text, file, preset) if x]
        if len(given) != 1:
            raise VocabularyError("give exactly one of --vocabulary \"cat,dog;puppy,grass\", --vocabulary-file PATH, "
                                  "--vocabulary-preset NAME")
        if text:
            return cls.parse(text)
        if file:
            return cls.from_file(file)
        return cls.preset(preset)  # type: ignore[arg-type]

    @classmethod
    def from_class_list(cls, classes: list[tuple[str, list[str]]], source: str = "custom") -> Vocabulary:
        """From ``(prompt, synonyms)`` per class, as ``ebseg_core.data.parse_class_list`` reads them."""
        return cls(tuple(tuple(syns) for _, syns in classes), source=source,
                   prompts=tuple(prompt for prompt, _ in classes))

    @classmethod
    def preset(cls, key: str) -> Vocabulary:
        """A benchmark's classes: coco171, ade150, ade847, pc59, pc459, voc20."""
        canonical = _PRESET_ALIASES.get(key.lower())
        if canonical is None:
            raise VocabularyError(f"unknown vocabulary preset {key!r}; choose one of "
                                  f"{sorted(set(_PRESET_ALIASES.values()))}")
        from .data.benchmarks import load_class_list

        return cls.from_class_list(load_class_list(canonical), source=f"preset:{canonical}")

    @classmethod
    def from_spec(cls, spec: str) -> Vocabulary:
        """:meth:`from_options` in one string, as a config file gives it: 'preset:ade150', 'file:path_or_url',
        a path to an existing file, or an inline list."""
        if spec.startswith("preset:"):
            return cls.from_options(preset=spec[len("preset:"):])
        if spec.startswith("file:"):
            return cls.from_options(file=spec[len("file:"):])
        if Path(spec).is_file():
            return cls.from_options(file=spec)
        return cls.from_options(text=spec)

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"synonyms": self.synonyms, "seen": self.seen, "source": self.source,
                           "prompts": self.prompts})

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        d = json.loads(text)
        seen = tuple(d["seen"]) if d.get("seen") is not None else None
        prompts = tuple(d["prompts"]) if d.get("prompts") is not None else None
        return cls(tuple(tuple(s) for s in d["synonyms"]), seen=seen, source=d.get("source", "custom"), prompts=prompts)

    # -- seen / unseen ---------------------------------------------------------------------------
    def seen_flags(self) -> list[bool]:
        """Whether each class counts as seen in training, which picks its balancing weights.

        The explicit ``seen`` flags when given (``with_seen``, ``with_training_classes``, a model's
        metadata); otherwise the overlap with COCO-Stuff-171, the released models' training set.
        """
        if self.seen is not None:
            return list(self.seen)
        return list(_overlap_with_coco171(self.synonyms))

    def with_seen(self, seen: Sequence[bool]) -> Vocabulary:
        return Vocabulary(self.synonyms, tuple(bool(s) for s in seen), self.source, self.prompts)

    def with_training_classes(self, train_synonyms: list[list[str]]) -> Vocabulary:
        """This vocabulary with its seen flags fixed against another training class list."""
        if not train_synonyms or any(not syns for syns in train_synonyms):
            raise VocabularyError("the training class list is empty or has a class without names")
        return self.with_seen(_overlap(self.synonyms, train_synonyms))


def _overlap(synonyms, train_synonyms) -> tuple[bool, ...]:
    """A class is seen when any of its synonyms is a training synonym (exact string match, as the
    official model computes it)."""
    train = {s for syns in train_synonyms for s in syns}
    return tuple(not train.isdisjoint(syns) for syns in synonyms)


@functools.lru_cache(maxsize=32)
def _overlap_with_coco171(synonyms: tuple[tuple[str, ...], ...]) -> tuple[bool, ...]:
    from .data.benchmarks import load_class_list

    return _overlap(synonyms, [syns for _, syns in load_class_list("coco171")])


def _split_synonyms(text: str, sep: str) -> tuple[str, ...]:
    return tuple(s for s in (x.strip() for x in text.split(sep)) if s)
