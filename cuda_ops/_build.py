"""Build (JIT or ahead of time) the ms_deform_attn CUDA extension.

The extension is compiled with ``torch.utils.cpp_extension.load`` into the default torch
extensions cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``).  The module
name embeds a hash of the sources, the compile flags and the target architectures, so an
edited kernel or a different GPU gets a fresh build directory and an unchanged one is reused
(a second load is a cache hit taking well under a second).

Ahead of time (e.g. in a Docker image or a Ray runtime_env setup step)::

    python -m cuda_ops.build            # compile into the cache, exit 1 on failure
    python -m cuda_ops.build --check    # same, prints one OK/FAILED line (used by tests)

Setting ``EBSEG_BUILD_CUDA_OPS=1`` makes ``import cuda_ops`` build eagerly instead of on
the first CUDA call.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

_LOG = logging.getLogger("cuda_ops")
_CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (_CSRC / "msda_bindings.cpp", _CSRC / "msda_kernel.cu")
EXTRA_CFLAGS = ["-O3"]
EXTRA_CUDA_CFLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
DEFAULT_ARCH = "9.0"  # H100; used when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


class BuildError(RuntimeError):
    """The CUDA extension could not be compiled or loaded."""


def cuda_home() -> str | None:
    """Root of a CUDA toolkit with nvcc and cuda_runtime.h, or None when there is none.

    $CUDA_HOME wins; then torch's own guess, but only if it really is a toolkit root (it
    guesses /usr/local when nvcc is a wrapper script in /usr/local/bin); then /usr/local/cuda.
    """
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    for home in candidates:
        if home and Path(home, "bin", "nvcc").exists() and Path(home, "include", "cuda_runtime.h").exists():
            return str(home)
    return None


def target_archs() -> list[str]:
    """Compute capabilities to compile for, e.g. ["9.0"].

    Order of preference: $TORCH_CUDA_ARCH_LIST, the visible GPU, DEFAULT_ARCH.  One arch
    keeps the build short (it is slow on small machines).
    """
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        archs = [a.strip() for a in env.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    elif torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = [f"{major}.{minor}"]
    else:
        archs = [DEFAULT_ARCH]
    return archs


def _gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def extension_name(archs: list[str] | None = None) -> str:
    """Cache key: sources + flags + archs + torch/CUDA versions, so stale builds are never reused."""
    archs = target_archs() if archs is None else archs
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(repr((EXTRA_CFLAGS, EXTRA_CUDA_CFLAGS, archs, torch.__version__, torch.version.cuda)).encode())
    tag = "_".join(a.replace(".", "").replace("+", "") for a in archs)
    return f"ebseg_msda_{h.hexdigest()[:12]}_sm{tag}"


def build(verbose: bool = False) -> ModuleType:
    """Compile (or load from the cache) the extension; raises BuildError with the reason."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise BuildError(_error)
        try:
            _module = _compile(verbose)
            return _module
        except Exception as exc:  # compiler missing, nvcc error, loader error, ...
            _error = f"{type(exc).__name__}: {exc}"
            raise BuildError(_error) from exc


def _compile(verbose: bool) -> ModuleType:
    home = cuda_home()
    if home is None:
        raise BuildError("no CUDA toolkit found (set CUDA_HOME or install nvcc)")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise BuildError("no C++ compiler (c++/g++) on PATH")
    from torch.utils import cpp_extension

    # cpp_extension reads this module global for include/library paths and nvcc.
    cpp_extension.CUDA_HOME = home
    archs = target_archs()
    return cpp_extension.load(
        name=extension_name(archs),
        sources=[str(s) for s in SOURCES],
        extra_cflags=EXTRA_CFLAGS,
        extra_cuda_cflags=EXTRA_CUDA_CFLAGS + _gencode_flags(archs),
        with_cuda=True,
        verbose=verbose,
    )


def last_error() -> str | None:
    """Why the last build attempt failed, or None."""
    return _error


def main(argv: list[str] | None = None) -> int:
    """Command line: compile into the torch extensions cache and report."""
    parser = argparse.ArgumentParser(prog="python -m cuda_ops.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print one OK/FAILED line; exit 1 on failure")
    parser.add_argument("--verbose", action="store_true", help="show compiler commands and output")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        mod = build(verbose=args.verbose or not args.check)
    except BuildError as exc:
        print(f"cuda_ops build FAILED: {exc}", file=sys.stderr)
        return 1
    took = time.perf_counter() - start
    print(f"cuda_ops build OK: {mod.__name__} from {mod.__file__} ({took:.1f}s, archs {target_archs()})")
    return 0

