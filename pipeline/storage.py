"""URL -> filesystem helpers shared by every job (local paths, ``s3://`` and any other fsspec URL).

Credentials and endpoints come from the environment the usual way (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for
S3-compatible stores such as MinIO); every function takes an optional ``storage_options`` dict passed to
the fsspec backend (s3fs keys: ``key``, ``secret``, ``token``, ``endpoint_url``, ``client_kwargs``...).

Local paths are returned as plain absolute paths, remote ones as ``scheme://bucket/key`` URLs.

S3 listings are not cached (``use_listings_cache=False``): jobs on several machines write to the same
prefixes, and a stale directory cache would make freshly written objects look missing.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any
from urllib.parse import urlparse

import fsspec

from ebseg_core.errors import UserError

# Backends users most often need, named in the error raised for an unknown scheme.
_BACKEND_HINTS = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "hf": "huggingface_hub",
    "http": "aiohttp",
    "https": "aiohttp",
}

# Items fetched from the S3 listing per round trip to fsspec's event loop (S3 pages hold 1000 keys).
_LIST_CHUNK = 1000


def _scheme(url: str) -> str:
    """The URL scheme, or "" for a local path (``file://`` counts as local)."""
    if "://" not in url:
        return ""
    scheme = url.split("://", 1)[0].lower()
    return "" if scheme in ("file", "local") else scheme


def _local_path(url: str) -> str:
    if url.startswith("file://"):
        url = urlparse(url).path
    return os.path.abspath(os.path.expanduser(url))


def _defaults_for(scheme: str) -> dict[str, Any]:
    if scheme in ("s3", "s3a"):
        return {"use_listings_cache": False}
    return {}


def filesystem_for(
    url: str | os.PathLike, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fsspec filesystem, path inside it)`` for a local path or URL.

    Raises ValueError naming the package to install when no fsspec backend handles the scheme.
    """
    url = os.fspath(url)
    scheme = _scheme(url)
    if not scheme:
        return fsspec.filesystem("file"), _local_path(url)
    options = {**_defaults_for(scheme), **(storage_options or {})}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:
        known = scheme in fsspec.available_protocols()
        if known and not isinstance(e, ImportError):
            raise UserError(f"cannot open {url!r}: {e}") from e
        pkg = _BACKEND_HINTS.get(scheme)
        hint = (
            f"install its fsspec backend: pip install {pkg}"
            if pkg
            else "install the fsspec backend for that scheme (see fsspec's list of implementations)"
        )
        raise UserError(f"no filesystem for {scheme}:// URLs ({url!r}); {hint}") from e
    return fs, path


def _url_for(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if _is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _s3_endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def pyarrow_filesystem_for(url: str | os.PathLike, storage_options: dict | None = None):
    """Return ``(pyarrow.fs.FileSystem, path)`` for a URL, e.g. for Ray Data's ``filesystem=``.

    Local paths use pyarrow's LocalFileSystem; ``s3://`` uses pyarrow's native S3 client (fast, used by
    Ray Data's readers and writers) configured from ``storage_options`` or the environment, the
    endpoint from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` passed explicitly so that older pyarrow
    versions, which ignore those variables, reach the same store. Other schemes wrap the fsspec
    filesystem in ``PyFileSystem(FSSpecHandler(...))``.
    """
    import pyarrow.fs as pafs

    url = os.fspath(url)
    scheme = _scheme(url)
    if not scheme:
        return pafs.LocalFileSystem(), _local_path(url)
    if scheme in ("s3", "s3a"):
        opts = dict(storage_options or {})
        client_kwargs = dict(opts.pop("client_kwargs", None) or {})
        endpoint = opts.pop("endpoint_url", None) or client_kwargs.pop("endpoint_url", None)
        endpoint = endpoint or _s3_endpoint_from_env()
        region = client_kwargs.pop("region_name", None) or os.environ.get("AWS_DEFAULT_REGION")
        region = region or os.environ.get("AWS_REGION")
        kwargs: dict[str, Any] = {}
        if "key" in opts or "secret" in opts:
            kwargs["access_key"] = opts.pop("key", None)
            kwargs["secret_key"] = opts.pop("secret", None)
            if "token" in opts:
                kwargs["session_token"] = opts.pop("token")
        if opts.pop("anon", False):
            kwargs["anonymous"] = True
        opts.pop("use_listings_cache", None)
        if opts or client_kwargs:
            # Options pyarrow's S3 client has no equivalent for: go through s3fs instead.
            fs, path = filesystem_for(url, storage_options)
            return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
            kwargs["scheme"] = parsed.scheme or "https"
        if region:
            kwargs["region"] = region
        path = url.split("://", 1)[1].rstrip("/")
        return pafs.S3FileSystem(**kwargs), path
    fs, path = filesystem_for(url, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(url: str | os.PathLike, *parts: str) -> str:
    """Join path segments onto a local path or URL with exactly one ``/`` between them."""
    url = os.fspath(url)
    if not _scheme(url) and not url.startswith("file://"):
        return os.path.join(url, *[p.strip("/") for p in parts if p])
    out = url
    for part in parts:
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def _matches(rel: str, extensions: tuple[str, ...] | None, glob: str | None) -> bool:
    if extensions is not None and not rel.lower().endswith(extensions):
        return False
    if glob is not None and not fnmatch.fnmatchcase(rel, glob):
        return False
    return True


def _normalise_extensions(extensions: Iterable[str] | None) -> tuple[str, ...] | None:
    if extensions is None:
        return None
    if isinstance(extensions, str):
        extensions = [extensions]
    return tuple("." + e.lower().lstrip(".") for e in extensions)


def iter_files(
    url: str | os.PathLike,
    extensions: Iterable[str] | None = None,
    glob: str | None = None,
    storage_options: dict | None = None,
) -> Iterator[str]:
    """Yield the URL of every file below ``url`` (recursively), lazily, in a deterministic order.

    ``extensions``: e.g. ``[".jpg", "png"]`` (case-insensitive). ``glob``: an ``fnmatch`` pattern
    matched against the path relative to ``url`` (``*`` also crosses ``/``, so ``"*.jpg"`` matches
    nested files). A URL naming a single file yields that file. Raises FileNotFoundError when nothing
    exists at ``url``. See iter_file_entries for the order and how it stays lazy.
    """
    for found, _version in iter_file_entries(url, extensions, glob, storage_options):
        yield found


def iter_file_entries(
    url: str | os.PathLike,
    extensions: Iterable[str] | None = None,
    glob: str | None = None,
    storage_options: dict | None = None,
) -> Iterator[tuple[str, str | None]]:
    """Like iter_files, with each file's *version*: a string that changes when its content does
    (S3: ``"<size>:<ETag>"``; local: ``"<size>:<mtime_ns>"``; other backends: None, unknown).

    Order: on S3 and local disks, URLs come in lexicographic (code point) order of the whole URL,
    a total order that a merge of two listings can rely on. S3 lists keys in UTF-8 byte order
    (the same order), page by page (1000 keys) as the caller consumes them, so memory stays flat.
    Local directories are walked with ``os.scandir`` one directory at a time, a directory sorted
    as ``name + "/"`` among the files (so ``a.b`` comes before ``a/c``). Other backends use
    ``fs.walk`` (sorted per directory, not a total order).
    """
    url = os.fspath(url)
    exts = _normalise_extensions(extensions)
    fs, path = filesystem_for(url, storage_options)
    if _is_local(fs):
        yield from _iter_local(url, path, exts, glob)
        return
    if hasattr(fs, "_iterdir") and getattr(fs, "async_impl", False) and _scheme(url) in ("s3", "s3a"):
        yield from _iter_s3(fs, url, path, exts, glob)
        return
    yield from _iter_walk(fs, url, path, exts, glob)


def _local_version(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}"


def _iter_local(url: str, root: str, exts, glob) -> Iterator[tuple[str, str | None]]:
    if os.path.isfile(root):
        if _matches(os.path.basename(root), exts, glob):
            yield root, _local_version(os.stat(root))
        return
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{url}: no such file or directory")

    def sorted_entries(directory: str) -> Iterator[os.DirEntry]:
        try:
            entries = list(os.scandir(directory))
        except PermissionError:
            return iter(())
        # a directory sorts as "name/": its files come exactly where their full paths sort
        return iter(sorted(entries, key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=True) else e.name))

    stack = [sorted_entries(root)]  # one directory's entries per level of depth
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif entry.is_dir(follow_symlinks=True):
            stack.append(sorted_entries(entry.path))
        elif entry.is_file(follow_symlinks=True):
            rel = os.path.relpath(entry.path, root).replace(os.sep, "/")
            if _matches(rel, exts, glob):
                yield entry.path, _local_version(entry.stat(follow_symlinks=True))


def _s3_version(item: dict) -> str:
    return f"{item.get('size', item.get('Size', ''))}:{str(item.get('ETag', '')).strip(chr(34))}"


def _iter_s3(fs, url: str, path: str, exts, glob) -> Iterator[tuple[str, str | None]]:
    from fsspec.asyn import sync

    path = path.rstrip("/")
    bucket, _, key = path.partition("/")
    prefix = key + "/" if key else ""
    agen = fs._iterdir(bucket, delimiter="", prefix=prefix)

    async def take(n: int) -> list[dict]:
        out = []
        async for item in agen:
            out.append(item)
            if len(out) >= n:
                break
        return out

    found_any = False
    try:
        while True:
            try:
                chunk = sync(fs.loop, take, _LIST_CHUNK)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{url}: {e}") from e
            if not chunk:
                break
            for item in chunk:
                name = item["name"]
                if item.get("type") == "directory" or name.endswith("/"):
                    continue
                found_any = True
                rel = name[len(bucket) + 1 + len(prefix):]
                if _matches(rel, exts, glob):
                    yield "s3://" + name, _s3_version(item)
            if len(chunk) < _LIST_CHUNK:
                break
    finally:
        try:
            sync(fs.loop, agen.aclose)
        except Exception:  # closing a finished generator: nothing to release
            pass
    if not found_any:
        # Maybe the URL names a single object rather than a prefix.
        if key and fs.isfile(path):
            if _matches(posixpath.basename(key), exts, glob):
                yield "s3://" + path, _s3_version(fs.info(path))
            return
        raise FileNotFoundError(f"{url}: no objects under this prefix")


def _iter_walk(fs, url: str, path: str, exts, glob) -> Iterator[tuple[str, str | None]]:
    if fs.isfile(path):
        if _matches(posixpath.basename(path.rstrip("/")), exts, glob):
            yield _url_for(fs, path), None
        return
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no such file or directory")
    root = path.rstrip("/")
    for dirpath, dirnames, filenames in fs.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = f"{dirpath.rstrip('/')}/{name}"
            rel = full[len(root) + 1:] if full.startswith(root + "/") else name
            if _matches(rel, exts, glob):
                yield _url_for(fs, full), None


def open_url(
    url: str | os.PathLike, mode: str = "rb", storage_options: dict | None = None, **kwargs: Any
) -> IO:
    """Open a local path or URL. Writing to a local path creates its parent directories.

    Raises FileNotFoundError naming the URL when reading something that does not exist.
    """
    url = os.fspath(url)
    fs, path = filesystem_for(url, storage_options)
    if any(m in mode for m in "wax") and _is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        return fs.open(path, mode, **kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: no such file") from e


def read_bytes(url: str | os.PathLike, storage_options: dict | None = None) -> bytes:
    """The whole content of one file."""
    with open_url(url, "rb", storage_options) as f:
        return f.read()


def exists(url: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """True if a file, directory or (on object stores) a non-empty prefix exists at ``url``."""
    fs, path = filesystem_for(url, storage_options)
    return bool(fs.exists(path))


def atomic_write_bytes(
    url: str | os.PathLike, data: bytes, storage_options: dict | None = None
) -> str:
    """Write ``data`` so that readers see either the old content or all of the new; return the URL.

    Local: write a temporary file in the same directory, fsync, then ``os.replace`` (atomic on POSIX).
    S3 (and GCS/Azure): one PUT of the final key is already atomic, so it is written directly.
    Other backends: write a temporary sibling, then move it over the target.
    """
    url = os.fspath(url)
    fs, path = filesystem_for(url, storage_options)
    if _is_local(fs):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path
    if _scheme(url) in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"):
        fs.pipe_file(path, data)
        return url
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)
    return url
