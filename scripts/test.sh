#!/usr/bin/env bash
# The one test entry point (README's `make test` and CI's .ci/run both come here).
# Fails if any test fails, if pytest collects nothing (exit 5), or if every test was skipped.
# Extra arguments go to pytest: scripts/test.sh -k storage, scripts/test.sh tests/test_storage.py
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# The cuda_ops compile-only test builds the kernel with nvcc when a CUDA toolkit is installed.
if [[ -d /usr/local/cuda ]]; then
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
export RAY_USAGE_STATS_ENABLED=0

report=$(mktemp -t ebseg-junit.XXXXXX.xml)
trap 'rm -f "$report"' EXIT
set +e
# Test paths given (tests/test_x.py, tests/test_x.py::name)? Then run those instead of all of tests/.
targets=(tests)
for arg in "$@"; do
    if [[ $arg != -* && -e ${arg%%::*} ]]; then
        targets=()
        break
    fi
done
.venv/bin/python -m pytest -q "${targets[@]}" --durations=20 --junitxml="$report" "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "test: pytest collected no tests; failing (a run that tests nothing must not pass)" >&2
    exit 1
fi
if [[ $rc -ne 0 ]]; then
    exit "$rc"
fi
.venv/bin/python - "$report" <<'PY'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
ran = sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) for s in suites)
if ran <= 0:
    sys.exit("test: every collected test was skipped; failing")
print(f"test: {ran} tests ran")
PY
