"""Helpers that tests import: the repository root, free ports, the ray CLI, the machine's slowness, and
stopping test Ray clusters.

(pytest's conftest.py keeps only fixtures and hooks; modules import what they need from here.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_using(marker: str) -> list[int]:
    """PIDs of processes whose command line mentions ``marker`` (our head's private temp dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry))
    return pids


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:  # a throwaway test cluster: no need to wait for a graceful shutdown
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    # Workers and agents of this head run with our temp dir on their command line.
    kill_processes_mentioning(temp_dir)


def kill_processes_mentioning(marker: str, within_s: float = 10.0) -> None:
    """SIGKILL every process whose command line mentions ``marker`` (a Ray instance's private temp dir)."""
    deadline = time.time() + within_s
    while time.time() < deadline:
        leftovers = _pids_using(marker)
        if not leftovers:
            break
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def ray_exe() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe if exe.exists() else shutil.which("ray"))


def machine_slowness() -> float:
    """How much slower than quiet this machine is now: the wall time of a fresh ``import ray`` over the 2 s
    it takes at most on 2 quiet cores (measured 0.8 s CPU; 9.3 s wall at load average 40). Waits are
    quiet-machine figures times this, so a busy CI machine gets proportionally longer, never shorter."""
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "import ray"], check=True, capture_output=True)
    return max(1.0, (time.time() - t0) / 2.0)
