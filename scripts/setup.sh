#!/usr/bin/env bash
# Create or update the project's virtualenv (.venv) with the project (editable) and its test tools.
#
# Idempotent: an existing .venv is updated in place, never deleted, and when neither pyproject.toml
# nor scripts/constraints.txt changed since the last successful run it returns in well under a second.
# Uses uv when available (torch and the rest from PyPI), otherwise `python -m venv` + pip.
# scripts/constraints.txt pins the versions the test suite was last run with.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.ebseg-setup-stamp"
CONSTRAINTS=scripts/constraints.txt

want=$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)

install_chromium() {
    # Debian's Chromium renders the curation report in its screenshot test.
    command -v chromium >/dev/null 2>&1 && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian chromium (used by the curation report screenshot test)"
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
               DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
            echo "setup: WARNING: apt-get install chromium failed; the report screenshot test will fail" >&2
        fi
    else
        echo "setup: note: chromium not found; the report screenshot test needs it (apt-get install chromium)" >&2
    fi
}

venv_complete() {
    [[ -x "$VENV/bin/python" && -x "$VENV/bin/ebseg" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] &&
        "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as md, importlib.util as u
md.version("ebseg-on-ray")
for m in ("ebseg_core", "cuda_ops", "pipeline", "jobs", "torch", "torchvision", "ray", "pytest", "moto"):
    assert u.find_spec(m) is not None, m
PY
}

install_chromium

if venv_complete; then
    echo "setup: $VENV is up to date"
    exit 0
fi

UV=()
if command -v uv >/dev/null 2>&1; then
    UV=(uv)
elif "$PYTHON" -m uv --version >/dev/null 2>&1; then
    UV=("$PYTHON" -m uv)
fi

start=$(date +%s)
if [[ ${#UV[@]} -gt 0 ]]; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "setup: creating $VENV with uv"
        "${UV[@]}" venv --python "$PYTHON" "$VENV"
    fi
    echo "setup: installing -e .[test] into $VENV with uv (first time: downloads torch, several GB)"
    "${UV[@]}" pip install --python "$VENV/bin/python" -e ".[test]" -c "$CONSTRAINTS"
else
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "setup: creating $VENV with $PYTHON -m venv (uv not found)"
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m ensurepip --upgrade
    echo "setup: installing -e .[test] into $VENV with pip (first time: downloads torch, several GB)"
    # The constraints pin torch to a PyPI release, so pip never takes a local CPU-only wheel
    # (that one has no matching torchvision).
    "$VENV/bin/python" -m pip install -e ".[test]" -c "$CONSTRAINTS"
fi
echo "$want" > "$STAMP"
echo "setup: done in $(( $(date +%s) - start )) s"
