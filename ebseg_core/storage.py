"""Storage: every read, write and listing of a local path, ``s3://`` or any other fsspec URL.

One module, below everything that touches storage (``jobs`` -> ``pipeline`` -> ``ebseg_core``), one
function per operation, and the retry of transient errors in one place (``retry_io``). Torch-free
and without pyarrow at import, so that light modules can use it.

Credentials and endpoints come from the environment the usual way (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for
S3-compatible stores such as MinIO); functions take an optional ``storage_options`` dict passed to
the fsspec backend (s3fs keys: ``key``, ``secret``, ``token``, ``endpoint_url``, ``client_kwargs``...).

Local paths are returned as plain absolute paths, remote ones as ``scheme://bucket/key`` URLs.

S3 listings are not cached (``use_listings_cache=False``): jobs on several machines write to the same
prefixes, and a stale directory cache would make freshly written objects look missing.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

import fsspec

from ebseg_core.errors import UserError

T = TypeVar("T")

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

    Raises UserError naming the package to install when no fsspec backend handles the scheme.
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


def is_local(url: str | os.PathLike) -> bool:
    """True for a local path or ``file://`` URL."""
    return not _scheme(os.fspath(url))


def url_for(url: str | os.PathLike, path: str) -> str:
    """A path inside the filesystem of ``url`` (from ``filesystem_for(url)``, ``fs.ls``...) as a URL in
    the user's scheme; local paths stay plain paths."""
    url = os.fspath(url)
    return path if is_local(url) else f"{url.split('://', 1)[0]}://{path}"


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
                rel = name[len(bucket) + 1 + len(prefix) :]
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
            yield url_for(url, path), None
        return
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no such file or directory")
    root = path.rstrip("/")
    for dirpath, dirnames, filenames in fs.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = f"{dirpath.rstrip('/')}/{name}"
            rel = full[len(root) + 1 :] if full.startswith(root + "/") else name
            if _matches(rel, exts, glob):
                yield url_for(url, full), None


def open_url(url: str | os.PathLike, mode: str = "rb", storage_options: dict | None = None, **kwargs: Any) -> IO:
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


# ---------------------------------------------------------------------------------------------
# Errors: which to retry, which stop a job, and the one-line error of a failed write
# ---------------------------------------------------------------------------------------------

_TRANSIENT_MARKERS = (
    "slowdown",
    "slow down",
    "503",
    "service unavailable",
    "throttl",
    "requesttimeout",
    "request timeout",
    "timed out",
    "timeout",
    "connection reset",
    "connection aborted",
    "connectionerror",
    "broken pipe",
    "500",
    "internalerror",
    "internal error",
    "too many requests",
    "429",
    "temporarily",
    "remotedisconnected",
    "endpointconnectionerror",
    "could not connect",
)


def is_transient(exc: BaseException) -> bool:
    """Storage errors worth retrying: throttling, 5xx, timeouts, dropped connections (not 404/403)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(m in text for m in _TRANSIENT_MARKERS)


# Errors about the job's access to storage rather than about one file: every other read of the job
# would fail the same way, so they stop the job (inputs left unlabeled for the rerun), never become rows.
_CREDENTIAL_MARKERS = (
    "expiredtoken",
    "token has expired",
    "tokenrefreshrequired",
    "invalidtoken",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "security token included in the request is invalid",
    "requestexpired",
    "nocredentialserror",
    "unable to locate credentials",
    "partialcredentialserror",
    "credentialretrievalerror",
)


def _error_text(exc: BaseException) -> str:
    """Type names, messages and S3 error codes of an exception and its causes, lower-cased."""
    parts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts.append(f"{type(cur).__name__} {cur}")
        code = (getattr(cur, "response", None) or {}).get("Error", {}).get("Code")
        if code:
            parts.append(str(code))
        cur = cur.__cause__ or cur.__context__
    return " ".join(parts).lower()


def is_credential_error(exc: BaseException) -> bool:
    """Expired, invalid or missing credentials: a fault of the job's access, not of the file read."""
    text = _error_text(exc)
    return any(m in text for m in _CREDENTIAL_MARKERS)


def backoff_delay(attempt: int, base: float = 0.2, cap: float = 10.0) -> float:
    """Exponential backoff with jitter: ~base * 2^attempt, at most cap seconds."""
    return min(base * (2**attempt), cap) * (0.5 + random.random())


def retry_io(fn: Callable[..., T], *args: Any, retries: int = 6,
             retryable: Callable[[Exception], bool] = is_transient, **kwargs: Any) -> T:
    """Call a storage operation, retrying the errors ``retryable`` accepts (transient ones) with backoff;
    others raise at once, and the last one when the retries run out.

    A caller that sorts failures passes its own ``retryable`` and sorts what raises: an error that
    ``retryable`` still accepts is one the retries did not outlast (``pipeline.label_read``).
    """
    for attempt in range(retries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unless retryable
            if attempt == retries or not retryable(exc):
                raise
            time.sleep(backoff_delay(attempt))
    raise AssertionError("unreachable")


class WriteError(UserError):
    """Writing ``url`` failed for a reason a retry does not fix (full disk, no permission, read-only store,
    or a store still failing after the retries); a UserError, so the command prints its one line."""

    def __init__(self, url: str, reason: str):
        super().__init__(url, reason)
        self.url = url
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot write {self.url}: {self.reason}"


def io_reason(exc: BaseException) -> str:
    """The short cause of an I/O error: 'No space left on device' rather than '[Errno 28] ...: path'."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------
# Whole-file reads and writes, existence, directories
# ---------------------------------------------------------------------------------------------


def read_bytes(url: str | os.PathLike, storage_options: dict | None = None) -> bytes:
    """The whole content of one file (transient errors retried); FileNotFoundError names the URL."""
    url = os.fspath(url)
    fs, path = filesystem_for(url, storage_options)
    try:
        return retry_io(fs.cat_file, path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: no such file") from e


def _fresh(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drop what the filesystem cached about ``path``: other machines write to the same prefixes."""
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001 - not every filesystem caches
        pass


def exists(url: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """True if a file, directory or (on object stores) a non-empty prefix exists at ``url``, fresh from storage."""
    fs, path = filesystem_for(url, storage_options)
    _fresh(fs, path)
    return bool(retry_io(fs.exists, path))


def list_dir(url: str | os.PathLike, storage_options: dict | None = None) -> list[str]:
    """Names (not paths) directly under a directory/prefix, sorted, fresh from storage; [] if absent."""
    fs, path = filesystem_for(url, storage_options)
    _fresh(fs, path)
    try:
        entries = retry_io(fs.ls, path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)


def remove_tree(url: str | os.PathLike, storage_options: dict | None = None) -> None:
    """Delete a file or a directory/prefix and everything below it; nothing there is fine."""
    fs, path = filesystem_for(url, storage_options)
    try:
        retry_io(fs.rm, path, recursive=True)
    except FileNotFoundError:
        pass


def write_bytes_atomic(url: str | os.PathLike, data: bytes, storage_options: dict | None = None) -> str:
    """Write ``data`` so that readers see either the old content or all of the new; return the URL
    (local: the absolute path).

    Local: a hidden temporary file in the same directory, fsync, then ``os.replace`` (atomic on POSIX);
    a failed write removes it (a full disk leaves no litter). S3 (and GCS/Azure): one PUT of the final
    key is already atomic. Other backends: a temporary sibling moved over the target. Transient errors
    are retried; anything else raises WriteError naming the file.
    """
    url = os.fspath(url)
    fs, path = filesystem_for(url, storage_options)
    try:
        return retry_io(_write_once, fs, url, path, data)
    except Exception as exc:  # noqa: BLE001 - every failure of a write is reported as that write's
        raise WriteError(url, io_reason(exc)) from exc


def _write_once(fs: fsspec.AbstractFileSystem, url: str, path: str, data: bytes) -> str:
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


def _is_temp_name(name: str) -> bool:
    """Hidden temp files of an interrupted local write_bytes_atomic (and older '.tmp-*' ones)."""
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(".tmp-"))


def sweep_temp_files(output: str, subdirs: Sequence[str] = ()) -> int:
    """Remove temp files that a killed writer left in a local output (root and ``subdirs``, one level
    below each); object stores write with one PUT and have none. Returns how many were removed."""
    if not is_local(output):
        return 0
    root = _local_path(output)
    dirs = [root]
    for sub in subdirs:
        d = os.path.join(root, sub)
        dirs.append(d)
        if os.path.isdir(d):
            dirs.extend(os.path.join(d, n) for n in sorted(os.listdir(d)) if os.path.isdir(os.path.join(d, n)))
    removed = 0
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if _is_temp_name(name) and os.path.isfile(os.path.join(d, name)):
                os.unlink(os.path.join(d, name))
                removed += 1
    return removed
