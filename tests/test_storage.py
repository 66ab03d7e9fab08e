"""pipeline.storage on a local directory and on the moto S3 server."""

from __future__ import annotations

import os
import threading

import pyarrow.fs as pafs
import pytest

from pipeline import storage


def _make_tree(root: str) -> list[str]:
    files = ["a.jpg", "b.PNG", "notes.txt", "sub/c.jpg", "sub/deeper/d.jpeg", "sub2/e.png"]
    for rel in files:
        with storage.open_url(storage.join(root, rel), "wb") as f:
            f.write(rel.encode())
    return files


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same tests on a local dir and on an S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_prefix") + "root"


def _rel(root: str, url: str) -> str:
    return url[len(root.rstrip("/")) + 1:]


def test_iter_files_lists_recursively_in_order(root):
    _make_tree(root)
    found = [_rel(root, u) for u in storage.iter_files(root)]
    assert sorted(found) == sorted(
        ["a.jpg", "b.PNG", "notes.txt", "sub/c.jpg", "sub/deeper/d.jpeg", "sub2/e.png"]
    )
    assert found == [_rel(root, u) for u in storage.iter_files(root)], "deterministic order"


def test_iter_files_filters(root):
    _make_tree(root)
    images = {_rel(root, u) for u in storage.iter_files(root, extensions=[".jpg", "jpeg", "png"])}
    assert images == {"a.jpg", "b.PNG", "sub/c.jpg", "sub/deeper/d.jpeg", "sub2/e.png"}
    globbed = {_rel(root, u) for u in storage.iter_files(root, glob="sub/*.jp*g")}
    assert globbed == {"sub/c.jpg", "sub/deeper/d.jpeg"}
    both = {_rel(root, u) for u in storage.iter_files(root, extensions="png", glob="sub*")}
    assert both == {"sub2/e.png"}


def test_iter_files_returns_urls_that_open(root):
    _make_tree(root)
    for url in storage.iter_files(root, extensions=[".txt"]):
        assert storage.read_bytes(url) == b"notes.txt"
        if root.startswith("s3://"):
            assert url.startswith("s3://")
        else:
            assert os.path.isabs(url)


def test_iter_files_single_file_and_missing(root):
    _make_tree(root)
    single = storage.join(root, "sub", "c.jpg")
    assert list(storage.iter_files(single)) == [single]
    missing = storage.join(root, "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        list(storage.iter_files(missing))


def test_iter_files_is_lazy_on_s3(s3, s3_prefix, monkeypatch):
    """The first key comes back after one listing page, before the rest of the prefix is listed."""
    monkeypatch.setattr(storage, "_LIST_CHUNK", 10)
    base = s3_prefix[len("s3://"):]
    s3.fs.pipe({f"{base}k{i:03d}.bin": b"x" for i in range(35)})
    calls = []
    fs, _ = storage.filesystem_for(s3_prefix)
    original = fs._call_s3

    async def counting(method, *args, **kwargs):
        if method == "list_objects_v2":
            calls.append(kwargs.get("MaxKeys"))
        return await original(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", counting)
    # Make moto answer 10 keys per page, as S3 answers 1000 under a big prefix.
    monkeypatch.setattr(fs, "req_kw", {**fs.req_kw, "MaxKeys": 10})
    it = storage.iter_files(s3_prefix)
    first = next(it)
    assert first == s3_prefix + "k000.bin"
    assert len(calls) == 1, "one page fetched to yield the first file"
    rest = list(it)
    assert len(rest) == 34
    assert len(calls) == 4, "35 keys / 10 per page"


def test_unknown_scheme_names_a_fix():
    with pytest.raises(ValueError, match="pip install gcsfs|fsspec backend"):
        storage.filesystem_for("gs://bucket/x")
    with pytest.raises(ValueError, match="no filesystem for nosuch://"):
        storage.filesystem_for("nosuch://bucket/x")


def test_open_missing_names_url(root):
    url = storage.join(root, "absent.bin")
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        storage.open_url(url)
    assert not storage.exists(url)


def test_atomic_write_bytes_replaces_whole(root):
    url = storage.join(root, "dir", "state.json")
    storage.atomic_write_bytes(url, b"first")
    assert storage.read_bytes(url) == b"first"
    storage.atomic_write_bytes(url, b"second version")
    assert storage.read_bytes(url) == b"second version"
    assert storage.exists(url)
    # No temporary files are left behind.
    assert [_rel(root, u) for u in storage.iter_files(root)] == ["dir/state.json"]


def test_atomic_write_local_readers_never_see_partial(tmp_path):
    """Concurrent readers of a local file see one complete version or the other, never a mix."""
    url = str(tmp_path / "f.bin")
    a, b = b"A" * 200_000, b"B" * 200_000
    storage.atomic_write_bytes(url, a)
    bad = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            data = storage.read_bytes(url)
            if data not in (a, b):
                bad.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(30):
        storage.atomic_write_bytes(url, b if i % 2 == 0 else a)
    stop.set()
    t.join()
    assert bad == []


def test_join():
    assert storage.join("s3://b/p", "x", "y.jpg") == "s3://b/p/x/y.jpg"
    assert storage.join("s3://b/p/", "/x/") == "s3://b/p/x/"
    assert storage.join("/tmp/a", "b", "c.txt") == "/tmp/a/b/c.txt"
    assert storage.join("rel/dir", "f") == os.path.join("rel/dir", "f")


def test_pyarrow_filesystem_for_reaches_same_data(root):
    url = storage.join(root, "t", "x.bin")
    storage.atomic_write_bytes(url, b"pyarrow-sees-this")
    fs, path = storage.pyarrow_filesystem_for(url)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"pyarrow-sees-this"
    if root.startswith("s3://"):
        assert isinstance(fs, pafs.S3FileSystem)


def test_pyarrow_filesystem_for_explicit_options(s3, s3_prefix):
    """storage_options in s3fs form map onto pyarrow's S3 client."""
    url = s3_prefix + "opt.bin"
    storage.atomic_write_bytes(url, b"opts")
    opts = {"key": "testing", "secret": "testing", "endpoint_url": s3.endpoint_url}
    fs, path = storage.pyarrow_filesystem_for(url, storage_options=opts)
    assert isinstance(fs, pafs.S3FileSystem)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"opts"
    fsspec_fs, p2 = storage.filesystem_for(url, storage_options=opts)
    assert fsspec_fs.cat_file(p2) == b"opts"


def test_local_file_url_and_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.atomic_write_bytes("rel/x.txt", b"1")
    fs, path = storage.filesystem_for("file://" + str(tmp_path / "rel" / "x.txt"))
    assert path == str(tmp_path / "rel" / "x.txt")
    assert list(storage.iter_files("rel")) == [str(tmp_path / "rel" / "x.txt")]
