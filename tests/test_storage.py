"""ebseg_core.storage on a local directory and on the moto S3 server."""

from __future__ import annotations

import os
import re
import threading

import pyarrow.fs as pafs
import pytest

from ebseg_core import storage
from ebseg_core.errors import UserError


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
    return url[len(root.rstrip("/")) + 1 :]


def test_iter_files_lists_recursively_in_order(root):
    _make_tree(root)
    found = [_rel(root, u) for u in storage.iter_files(root)]
    assert sorted(found) == sorted(["a.jpg", "b.PNG", "notes.txt", "sub/c.jpg", "sub/deeper/d.jpeg", "sub2/e.png"])
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
    base = s3_prefix[len("s3://") :]
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
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        storage.read_bytes(url)
    assert not storage.exists(url)


def test_write_bytes_atomic_replaces_whole(root):
    url = storage.join(root, "dir", "state.json")
    storage.write_bytes_atomic(url, b"first")
    assert storage.read_bytes(url) == b"first"
    storage.write_bytes_atomic(url, b"second version")
    assert storage.read_bytes(url) == b"second version"
    assert storage.exists(url)
    # No temporary files are left behind.
    assert [_rel(root, u) for u in storage.iter_files(root)] == ["dir/state.json"]


def test_atomic_write_local_readers_never_see_partial(tmp_path):
    """Concurrent readers of a local file see one complete version or the other, never a mix."""
    url = str(tmp_path / "f.bin")
    a, b = b"A" * 200_000, b"B" * 200_000
    storage.write_bytes_atomic(url, a)
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
        storage.write_bytes_atomic(url, b if i % 2 == 0 else a)
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
    storage.write_bytes_atomic(url, b"pyarrow-sees-this")
    fs, path = storage.pyarrow_filesystem_for(url)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"pyarrow-sees-this"
    if root.startswith("s3://"):
        assert isinstance(fs, pafs.S3FileSystem)


def test_pyarrow_filesystem_for_explicit_options(s3, s3_prefix):
    """storage_options in s3fs form map onto pyarrow's S3 client."""
    url = s3_prefix + "opt.bin"
    storage.write_bytes_atomic(url, b"opts")
    opts = {"key": "testing", "secret": "testing", "endpoint_url": s3.endpoint_url}
    fs, path = storage.pyarrow_filesystem_for(url, storage_options=opts)
    assert isinstance(fs, pafs.S3FileSystem)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"opts"
    fsspec_fs, p2 = storage.filesystem_for(url, storage_options=opts)
    assert fsspec_fs.cat_file(p2) == b"opts"


def test_local_file_url_and_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_bytes_atomic("rel/x.txt", b"1")
    fs, path = storage.filesystem_for("file://" + str(tmp_path / "rel" / "x.txt"))
    assert path == str(tmp_path / "rel" / "x.txt")
    assert list(storage.iter_files("rel")) == [str(tmp_path / "rel" / "x.txt")]


def test_local_walk_is_in_lexicographic_order(tmp_path):
    for name in ["a.b", "a/c", "a/b/d", "a-z", "a0", "b", "a/c.d/e", "A"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    found = list(storage.iter_files(str(tmp_path)))
    assert found == sorted(found) and len(found) == 8


def test_list_dir_and_remove_tree(root):
    base = storage.join(root, "d")
    assert storage.list_dir(base) == []
    for rel in ["b.bin", "a.bin", "sub/c.bin"]:
        storage.write_bytes_atomic(storage.join(base, rel), b"x")
    assert storage.list_dir(base) == ["a.bin", "b.bin", "sub"]
    storage.remove_tree(storage.join(base, "sub"))
    assert storage.list_dir(base) == ["a.bin", "b.bin"]
    storage.remove_tree(base)
    assert not storage.exists(base) and storage.list_dir(base) == []
    storage.remove_tree(base)  # nothing there: fine


def test_failed_write_is_one_line_and_leaves_no_temp_file(tmp_path):
    (tmp_path / "file").write_bytes(b"not a directory")
    url = str(tmp_path / "file" / "x.bin")
    with pytest.raises(storage.WriteError) as info:
        storage.write_bytes_atomic(url, b"data")
    assert isinstance(info.value, UserError)
    # the OS's short reason, not "[Errno 17] File exists: '/path'"
    assert re.fullmatch(rf"cannot write {re.escape(url)}: (File exists|Not a directory)", str(info.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unknown_scheme_is_not_a_write_error():
    with pytest.raises(UserError, match="no filesystem for nosuch://") as info:
        storage.write_bytes_atomic("nosuch://bucket/x", b"1")
    assert not isinstance(info.value, storage.WriteError)


def test_sweep_temp_files_removes_only_interrupted_writes(tmp_path):
    out = tmp_path / "out"
    (out / "_parts" / "shard-000001").mkdir(parents=True)
    litter = [
        out / ".labels-000000.parquet.abc123.tmp",
        out / "_parts" / "shard-000001" / ".frag.parquet.x.tmp",
        out / ".tmp-old",
    ]
    kept = [out / "labels-000000.parquet", out / ".hidden", out / "_parts" / "shard-000001" / "frag.parquet"]
    for p in litter + kept:
        p.write_bytes(b"x")
    assert storage.sweep_temp_files(str(out), subdirs=["_parts"]) == len(litter)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in litter)
    assert storage.sweep_temp_files("s3://bucket/out", subdirs=["_parts"]) == 0


class _S3Error(Exception):
    """An error as botocore raises it: a message and ``response["Error"]["Code"]``."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.response = {"Error": {"Code": code}}


def test_error_classification():
    transient = [
        TimeoutError("read"),
        ConnectionResetError(104, "reset"),
        OSError("SlowDown: reduce your rate"),
        RuntimeError("503 Service Unavailable"),
    ]
    permanent = [
        FileNotFoundError("s3://b/k"),
        PermissionError("Forbidden"),
        IsADirectoryError("d"),
        OSError("No space left on device"),
        ValueError("bad header"),
    ]
    assert [storage.is_transient(e) for e in transient] == [True] * len(transient)
    assert [storage.is_transient(e) for e in permanent] == [False] * len(permanent)

    try:
        try:
            raise _S3Error("An error occurred when calling GetObject", "ExpiredToken")
        except _S3Error as inner:
            raise PermissionError("Forbidden") from inner
    except PermissionError as outer:
        assert storage.is_credential_error(outer), "the S3 error code of a cause counts"
    assert storage.is_credential_error(RuntimeError("Unable to locate credentials"))
    assert not any(storage.is_credential_error(e) for e in transient + permanent)


def test_retry_io_retries_transient_errors_only(monkeypatch):
    slept = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    calls = []

    def flaky(fail_times: int, exc: Exception):
        calls.append(1)
        if len(calls) <= fail_times:
            raise exc
        return "done"

    assert storage.retry_io(flaky, 2, TimeoutError("slow")) == "done"
    assert len(calls) == 3 and len(slept) == 2
    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retry_io(flaky, 5, FileNotFoundError("gone"))
    assert len(calls) == 1, "a missing file is not retried"
    calls.clear()
    with pytest.raises(TimeoutError):
        storage.retry_io(flaky, 10, TimeoutError("slow"), retries=3)
    assert len(calls) == 4
    assert all(0 < d <= 15.0 for d in slept)


def test_retry_io_retries_what_its_retryable_hook_accepts(monkeypatch):
    """A caller's ``retryable`` replaces is_transient: it can refuse a transient error or accept another."""
    monkeypatch.setattr(storage.time, "sleep", lambda _: None)
    calls = []

    def failing(exc: Exception):
        calls.append(1)
        raise exc

    with pytest.raises(TimeoutError):
        storage.retry_io(failing, TimeoutError("slow"), retryable=lambda exc: False)
    assert len(calls) == 1, "refused by the hook: raised at once"
    calls.clear()
    with pytest.raises(ValueError):
        storage.retry_io(failing, ValueError("odd"), retries=2, retryable=lambda exc: isinstance(exc, ValueError))
    assert len(calls) == 3, "accepted by the hook: retried, the last error raised"


def test_url_for_keeps_the_users_scheme(tmp_path):
    _, path = storage.filesystem_for("s3a://bucket/prefix/")
    assert storage.url_for("s3a://bucket/prefix/", path + "/x.png") == "s3a://bucket/prefix/x.png"
    fs, path = storage.filesystem_for("file://" + str(tmp_path))
    assert storage.url_for("file://" + str(tmp_path), path) == str(tmp_path)
    assert storage.is_local("file:///x") and storage.is_local("rel/dir") and not storage.is_local("s3://b/k")
