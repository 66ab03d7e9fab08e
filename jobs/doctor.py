"""Check the installation: package versions, CUDA, the deformable-attention kernel, storage and Ray settings."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

# (import name, distribution name, required to run the jobs)
PACKAGES: tuple[tuple[str, str, bool], ...] = (
    ("torch", "torch", True),
    ("torchvision", "torchvision", True),
    ("ray", "ray", True),
    ("open_clip", "open_clip_torch", True),
    ("segment_anything", "segment-anything", True),
    ("numpy", "numpy", True),
    ("pyarrow", "pyarrow", True),
    ("fsspec", "fsspec", True),
    ("s3fs", "s3fs", True),
    ("PIL", "pillow", True),
    ("safetensors", "safetensors", True),
    ("scipy", "scipy", True),
    ("yaml", "pyyaml", True),
    ("pycocotools", "pycocotools", True),
    ("duckdb", "duckdb", True),
)

# Environment variables worth showing; secrets are reported as set/unset only.
SETTINGS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_DEFAULT_REGION", "AWS_PROFILE", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "EBSEG_MSDA_BACKEND")
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--build-kernel", action="store_true",
                        help="also compile/load the CUDA kernel of cuda_ops now (can take minutes the first "
                             "time; cached afterwards). Without it, only whether a compiler is present is shown")


def _package_versions() -> tuple[dict[str, str | None], list[str]]:
    versions: dict[str, str | None] = {}
    missing: list[str] = []
    for module_name, dist, required in PACKAGES:
        try:
            import_module(module_name)
        except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
            versions[dist] = None
            if required:
                missing.append(f"{dist} ({type(e).__name__}: {e})")
            continue
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = getattr(sys.modules[module_name], "__version__", "installed")
    return versions, missing


def _cuda_report() -> dict:
    try:
        import torch
    except Exception:  # noqa: BLE001
        return {"available": False, "reason": "torch not importable"}
    info: dict = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if info["available"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _kernel_report(build: bool) -> dict:
    info: dict = {}
    try:
        import cuda_ops  # noqa: F401
        from cuda_ops import _build
    except Exception as e:  # noqa: BLE001 - tolerate absence: the PyTorch path is used
        return {"importable": False, "reason": f"{type(e).__name__}: {e}"}
    info["importable"] = True
    home = _build.cuda_home()
    info["cuda_home"] = home
    info["nvcc"] = shutil.which("nvcc") or (os.path.join(home, "bin", "nvcc") if home else None)
    if info["nvcc"] and not os.path.exists(info["nvcc"]):
        info["nvcc"] = None
    if build:
        from cuda_ops import kernel_available

        info["kernel_built"] = bool(kernel_available())
        if not info["kernel_built"]:
            info["build_error"] = _build.last_error()
    return info


def collect(build_kernel: bool = False) -> tuple[dict, list[str]]:
    """Everything ``ebseg doctor`` reports, plus the list of missing required packages."""
    versions, missing = _package_versions()
    report = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "cuda": _cuda_report(),
        "cuda_ops": _kernel_report(build_kernel),
        "environment": {k: os.environ.get(k) for k in SETTINGS},
        "credentials": {k: ("set" if os.environ.get(k) else "unset") for k in SECRETS},
    }
    return report, missing


def _print_text(report: dict, missing: list[str]) -> None:
    print(f"python       {report['python']}  ({report['platform']})")
    for dist, ver in report["packages"].items():
        print(f"{dist:<18} {ver or 'MISSING'}")
    cuda = report["cuda"]
    if cuda.get("available"):
        print(f"cuda         available (torch built for CUDA {cuda['torch_cuda']}): {', '.join(cuda['devices'])}")
    else:
        print(f"cuda         not available (torch CUDA build: {cuda.get('torch_cuda')}); models run on the CPU")
    k = report["cuda_ops"]
    if not k.get("importable"):
        print(f"cuda_ops     not importable: {k.get('reason')}")
    else:
        compiler = k.get("nvcc") or "no nvcc found (set CUDA_HOME)"
        print(f"cuda_ops     importable; CUDA_HOME={k.get('cuda_home')}; compiler: {compiler}")
        if "kernel_built" in k:
            state = "built and loaded" if k["kernel_built"] else f"NOT built: {k.get('build_error')}"
            print(f"             kernel {state}")
        else:
            print("             kernel not checked (add --build-kernel to compile/load it)")
    for key, value in report["environment"].items():
        if value:
            print(f"{key:<18} {value}")
    if not report["environment"].get("RAY_ADDRESS"):
        print("RAY_ADDRESS        unset: jobs start a local Ray instance (or join the cluster they run on)")
    print("credentials        " + ", ".join(f"{k} {v}" for k, v in report["credentials"].items()))
    if missing:
        print("\nmissing required packages: " + "; ".join(missing))
        print("fix: make setup   (or: pip install -e .)")
    else:
        print("\nall required packages import")


def run(args: argparse.Namespace) -> int:
    report, missing = collect(build_kernel=args.build_kernel)
    if args.json:
        print(json.dumps({**report, "missing": missing}, indent=1))
    else:
        _print_text(report, missing)
    return 1 if missing else 0


if __name__ == "__main__":
    from jobs.cli import module_main

    sys.exit(module_main(sys.modules[__name__]))
