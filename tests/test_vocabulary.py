from __future__ import annotations

import pytest

from ebseg_core import Vocabulary, VocabularyError
from ebseg_core.vocabulary import MAX_CLASSES


def test_parse_classes_and_synonyms():
    v = Vocabulary.parse(" cat , dog; puppy ,grass")
    assert v.names == ["cat", "dog", "grass"]
    assert v.synonyms[1] == ("dog", "puppy")
    assert len(v) == 3


def test_id_is_stable_and_content_based():
    a, b = Vocabulary.parse("cat,dog;puppy"), Vocabulary.parse("cat, dog ; puppy")
    assert a.id == b.id and len(a.id) == 16
    assert a.id != Vocabulary.parse("cat,dog").id
    assert Vocabulary.from_json(a.to_json()) == a


@pytest.mark.parametrize("text,match", [("", "no class names"), (" , ", "no class names"),
                                        ("cat,Cat", "appears twice"), ("cat,dog,cat;kitty", "appears twice")])
def test_bad_vocabularies_have_clear_errors(text, match):
    with pytest.raises(VocabularyError, match=match):
        Vocabulary.parse(text)


def test_too_large_vocabulary_is_refused():
    with pytest.raises(VocabularyError, match="at most"):
        Vocabulary.from_names([f"class {i}" for i in range(MAX_CLASSES + 1)])


def test_files_in_our_and_the_official_format(tmp_path):
    ours = tmp_path / "ours.txt"
    ours.write_text("# my classes\nwall; walls\n\nsky\n")
    assert Vocabulary.from_file(ours).synonyms == (("wall", "walls"), ("sky",))
    official = tmp_path / "official.txt"
    official.write_text("1:person,child,girl\n2:bicycle,bicycles\n")
    assert Vocabulary.from_file(official).synonyms == (("person", "child", "girl"), ("bicycle", "bicycles"))
    with pytest.raises(VocabularyError, match="not found"):
        Vocabulary.from_file(tmp_path / "missing.txt")
    assert Vocabulary.from_spec(str(ours)).names == ["wall", "sky"]


def test_seen_flags_from_any_shared_synonym():
    train = [["person", "man"], ["bathtub", "tub"], ["sky"]]
    v = Vocabulary.parse("woman;man,tub,armchair")
    assert v.with_training_classes(train).seen_flags() == [True, True, False]
    assert v.with_seen([False, False, True]).seen_flags() == [False, False, True]
    # Without a training list, the released models' COCO-Stuff-171 decides: "man" is a COCO synonym.
    assert v.seen_flags()[0] and not v.seen_flags()[2]
    with pytest.raises(VocabularyError, match="training class list"):
        v.with_training_classes([])


def test_unknown_preset_names_choices():
    with pytest.raises(VocabularyError, match="ade150"):
        Vocabulary.preset("imagenet")


def test_training_class_list_from_an_official_file(tmp_path):
    official = tmp_path / "coco_train.txt"
    official.write_text("1:person,man\n2:wall-other,wall\n")
    v = Vocabulary.parse("wall;walls,lamp")
    classes = Vocabulary.from_file(official).synonyms
    assert v.with_training_classes([list(c) for c in classes]).seen_flags() == [True, False]


def test_from_options_is_the_one_front_door(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("road, route|road;street\nsky\n")
    assert Vocabulary.from_options(text="cat,dog;puppy").synonyms == (("cat",), ("dog", "puppy"))
    assert Vocabulary.from_options(file=str(f)).names == ["road, route", "sky"]
    assert Vocabulary.from_options(preset="ade150") == Vocabulary.preset("ade150")
    for given in ({}, {"text": "a", "preset": "ade150"}, {"text": "a", "file": str(f)}):
        with pytest.raises(VocabularyError, match="exactly one of"):
            Vocabulary.from_options(**given)


def test_vocabulary_file_on_object_storage(s3, s3_prefix):
    url = s3_prefix + "classes.txt"
    s3.fs.pipe(url.removeprefix("s3://"), b"road, route|road;street\nsky\n")
    v = Vocabulary.from_options(file=url)
    assert v.names == ["road, route", "sky"] and v.source == url
    with pytest.raises(VocabularyError, match="not found"):
        Vocabulary.from_options(file=s3_prefix + "missing.txt")


def test_vocabulary_and_model_spec_import_without_torch():
    import subprocess
    import sys

    code = ("import sys; from ebseg_core.vocabulary import Vocabulary; from ebseg_core.model_spec import ModelSpec; "
            "Vocabulary.from_options(preset='ade150').seen_flags(); "
            "ModelSpec.from_options(checkpoint=None, random_weights=True, preset='ebseg-tiny').describe(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
