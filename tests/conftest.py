"""Shared pytest fixtures: a moto S3 server, Ray clusters and a synthetic image corpus.

Fixtures
--------
``s3`` (session)        moto ``ThreadedMotoServer`` on 127.0.0.1 with one bucket. Attributes:
                        ``endpoint_url``, ``bucket``, ``fs`` (s3fs), ``pa_fs`` (pyarrow S3), ``env``
                        (AWS_* variables), ``url(key)``. The variables are also put in ``os.environ``
                        for the session, so ``s3fs.S3FileSystem()``, ``pyarrow.fs.FileSystem.from_uri``,
                        ``ebseg_core.storage`` and Ray workers reach the bucket as a user's code would.
``s3_prefix`` (function) a fresh ``s3://<bucket>/<test-name>-<n>/`` URL, unique per test.
``ray_local`` (session) ``ray.init(address="local", num_cpus=8)`` in this process: a private cluster,
                        never an existing one. 8 logical CPUs on 2 cores on purpose: an actor pool must
                        not starve the read tasks (see shared RAY_NOTES).
``ray_head`` (session)  a real ``ray start --head --block`` cluster on loopback, in its own temp dir and
                        on free ports, with token auth on as Ray 2.60 starts a head (its own token
                        file, never ~/.ray/auth_token). Attributes: ``address`` ("127.0.0.1:port",
                        GCS), ``dashboard_url`` (for ``ray job submit --address``), ``auth_env`` (the
                        two variables a client needs: ``RAY_AUTH_MODE=token`` and
                        ``RAY_AUTH_TOKEN_PATH``), ``env`` (the head's environment, auth included),
                        ``client()`` (an authenticated ``JobSubmissionClient``), ``log_tail()``.
``two_nodes`` (session) the one multi-node cluster: ``ray start`` head + second node on loopback, 4 CPUs and
                        one ``test_node`` resource each; yields ``(address, env, slowness)``.
``blob_corpus`` (function) six blob images + label PNGs in a temp dir (see ebseg_core/data/synthetic.py).

Ray: one process can be connected to only one cluster at a time, and ``ray_local`` connects this
pytest process to its own. Tests using ``ray_head`` must therefore talk to it from outside the
process — ``JobSubmissionClient(ray_head.dashboard_url)`` or the ``ray`` CLI — never ``ray.init``.
Both fixtures can be used in the same session.

Set ``EBSEG_KEEP_RAY_LOGS=1`` to keep ``ray_head``'s temp dir (its session logs) after the run.

Teardown never uses ``ray stop``: that kills every Ray process on the machine, including clusters of
other test runs. ``ray_head`` is stopped by SIGTERM to the ``ray start --block`` process it started
(which shuts down its children), then SIGKILL to any process still using its private temp dir.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from tests.helpers import REPO_ROOT, free_port, machine_slowness, port_open, ray_exe, stop_head  # noqa: E402 - needs the repo on sys.path

# Ray: no usage-stats upload attempts (the machine has no internet), and no pre-started idle worker
# processes (one per logical CPU by default: 8 Python processes competing for 2 cores at start-up).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_enable_worker_prestart", "0")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


# ----------------------------------------------------------------------------------------------- tiers

# Fixtures that start (or join) a Ray cluster or the moto S3 server: tests using them are marked so
# that `make test-fast` (-m "not cluster and not s3 and not slow") can leave them out.
_TIER_FIXTURES = {"ray_local": "cluster", "ray_head": "cluster", "two_nodes": "cluster", "s3": "s3",
                  "s3_prefix": "s3"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker in sorted({m for f, m in _TIER_FIXTURES.items() if f in getattr(item, "fixturenames", ())}):
            item.add_marker(marker)


# --------------------------------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    env: dict[str, str]
    fs: object = field(repr=False)
    pa_fs: object = field(repr=False)

    def url(self, key: str = "") -> str:
        """``s3://<bucket>/<key>``."""
        return f"s3://{self.bucket}/{key.lstrip('/')}"


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on loopback with one bucket; the AWS_* env vars point at it for the session."""
    import pyarrow.fs as pafs
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    bucket = "ebseg-test"
    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=endpoint,
        use_listings_cache=False,
    )
    fs.mkdir(bucket)
    pa_fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env["AWS_DEFAULT_REGION"],
    )
    try:
        yield S3Server(endpoint_url=endpoint, bucket=bucket, env=env, fs=fs, pa_fs=pa_fs)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_prefix_counter = itertools.count()


@pytest.fixture
def s3_prefix(s3, request) -> str:
    """A fresh ``s3://<bucket>/<test-name>-<n>/`` URL (nothing exists under it yet)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")[:60]
    return s3.url(f"{name}-{os.getpid()}-{next(_prefix_counter)}/")


# -------------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_local(s3):
    """This process connected to a private local Ray cluster (num_cpus=8) that sees the moto bucket."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    context = ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        object_store_memory=1_500_000_000,
        runtime_env={"env_vars": {**s3.env, "RAY_USAGE_STATS_ENABLED": "0"}},
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    except Exception:  # Ray Data not installed: the cluster is still usable for plain tasks.
        pass
    try:
        yield context
    finally:
        ray.shutdown()


@dataclass
class RayHead:
    address: str
    dashboard_url: str
    temp_dir: str
    log_path: str
    token: str = field(repr=False)
    env: dict[str, str] = field(repr=False)

    @property
    def auth_env(self) -> dict[str, str]:
        """What a submitting shell or a driver needs to talk to this token-auth cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.env["RAY_AUTH_TOKEN_PATH"]}

    def log_tail(self, n: int = 4000) -> str:
        """The end of ``ray start``'s own output (for assertion messages)."""
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def client(self):
        """A ``JobSubmissionClient`` for this cluster, authenticated by its token."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"})

    def submit_and_wait(
        self, entrypoint: str, timeout: float = 300, runtime_env: dict | None = None
    ) -> tuple[str, str]:
        """Submit ``entrypoint`` as a Ray job, wait until it ends; return ``(status, logs)``.

        ``status`` is the final JobStatus value ("SUCCEEDED", "FAILED", "STOPPED"). The job runs
        with the head's environment (S3 env vars, this venv's ``python`` first on PATH, the repo on
        PYTHONPATH), cwd = the repository root. Raises AssertionError if it does not end in time.
        """
        client = self.client()
        submission_id = f"test-{secrets.token_hex(6)}"
        client.submit_job(
            entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env
        )
        deadline = time.time() + timeout
        while True:
            status = client.get_job_status(submission_id)
            if status.is_terminal():
                return str(status.value), client.get_job_logs(submission_id)
            if time.time() > deadline:
                client.stop_job(submission_id)
                raise AssertionError(
                    f"job {entrypoint!r} still {status} after {timeout} s; logs so far:\n"
                    f"{client.get_job_logs(submission_id)[-4000:]}"
                )
            time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_head(s3, tmp_path_factory):
    """A real ``ray start --head`` cluster on loopback (use JobSubmissionClient/CLI, not ray.init)."""
    bin_dir = Path(sys.executable).parent
    ray_exe = bin_dir / "ray"
    if not ray_exe.exists():
        ray_exe = Path(shutil.which("ray") or "ray")
    # Short temp dir: Ray puts unix sockets in it (path length limit ~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    token = secrets.token_hex(32)
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as f:
        f.write(token)
    log_path = str(tmp_path_factory.mktemp("ray_head") / "ray_start.log")
    gcs_port, dashboard_port, agent_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        **s3.env,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Token auth on, as a Ray 2.60 head starts, with a token of its own (not ~/.ray/auth_token,
        # which the embedded test clusters share): clients must present it (docs/labeling.md).
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": token_path,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(
            p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p
        ),
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(ray_exe), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--num-cpus=8",
        "--object-store-memory=1000000000",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, cwd=str(REPO_ROOT),
    )  # fmt: skip
    head = RayHead(
        address=f"127.0.0.1:{gcs_port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        temp_dir=temp_dir,
        log_path=log_path,
        token=token,
        env=env,
    )
    try:
        # Ready = the head's agent (which actually runs submitted jobs) listens AND the dashboard's
        # job module answers; before that, submissions fail ("No available agent", dropped connection).
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"ray start --head exited with {proc.returncode}:\n{head.log_tail()}"
                )
            try:
                # /api/jobs/ is served by the JobHead subprocess of the dashboard, which starts
                # after /api/version answers; submitting earlier gets the connection dropped.
                if port_open(agent_port):
                    request = urllib.request.Request(f"{head.dashboard_url}/api/jobs/",
                                                     headers={"Authorization": f"Bearer {token}"})
                    with urllib.request.urlopen(request, timeout=5) as r:
                        if r.status == 200:
                            break
            except urllib.error.HTTPError as e:
                raise RuntimeError(
                    f"ray head dashboard answered {e.code} {e.reason} (token not accepted?)"
                ) from e
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"ray head not ready after 180 s:\n{head.log_tail()}")
            time.sleep(0.5)
        yield head
    finally:
        stop_head(proc, temp_dir)
        log.close()
        if os.environ.get("EBSEG_KEEP_RAY_LOGS"):
            print(f"ray_head logs kept in {temp_dir} (EBSEG_KEEP_RAY_LOGS set)")
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def two_nodes(s3, tmp_path_factory):
    """The one multi-node test cluster: a head node and a second node (4 logical CPUs and one ``test_node``
    resource each, so a job can place one actor per node) started with `ray start` on loopback.

    Yields (address, env, slowness): a driver joins with ``env`` and ``RAY_ADDRESS=address``; waits are
    quiet-machine values scaled by ``slowness`` (:func:`tests.helpers.machine_slowness`).
    """
    env = {
        **os.environ,
        **s3.env,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",  # loopback test cluster: no token files to distribute between nodes
        "RAY_raylet_start_wait_time_s": "180",  # 2 shared cores: node registration can be slow
        "PYTHONPATH": os.pathsep.join(p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
    logs = tmp_path_factory.mktemp("two_nodes")
    port = free_port()

    def node(extra: list[str], name: str) -> subprocess.Popen:
        cmd = [
            ray_exe(), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=4",
            "--object-store-memory=400000000", "--disable-usage-stats", f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}", '--resources={"test_node": 1}', *extra,
        ]  # fmt: skip
        return subprocess.Popen(
            cmd, env=env, stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(REPO_ROOT),
        )  # fmt: skip

    slowness = machine_slowness()
    head = node(["--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}"], "head")
    procs = [head]
    try:
        address = f"127.0.0.1:{port}"

        def status() -> str:
            return subprocess.run(
                [ray_exe(), "status", f"--address={address}"], env=env, capture_output=True, text=True
            ).stdout

        def wait_started(name: str, deadline: float) -> None:
            """Until `ray start` of ``name`` says its node runs: a look at its log every 0.25 s (``ray status``
            is a whole Python process, which on 2 busy cores slowed the start it waited for); ``ray status``
            only every 10 s, in case the line ever changes."""
            next_status = time.time() + 10
            while "Ray runtime started" not in (logs / f"{name}.log").read_text(errors="replace"):
                if time.time() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"ray {name} not ready after {time.time() - started:.0f} s (slowness "
                                       f"{slowness:.1f}):\n{(logs / f'{name}.log').read_text()[-3000:]}")
                if time.time() > next_status:
                    if "node_" in status():
                        return
                    next_status = time.time() + 10
                time.sleep(0.25)

        started = time.time()
        wait_started("head", started + 240 * slowness)  # a quiet head is up in ~15 s; a node joins its GCS
        head_s = time.time() - started
        procs.append(node([f"--address={address}", "--min-worker-port=21000", "--max-worker-port=21999"], "worker"))
        deadline = time.time() + max(240 * slowness, 8 * head_s)  # a second node takes about what the head took
        wait_started("worker", deadline)
        while True:  # both nodes registered with all their CPUs
            out = status()
            if out.count("node_") >= 2 and "8.0 CPU" in out.replace("0.0/8.0 CPU", "8.0 CPU"):
                break
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"two-node cluster not ready (head took {head_s:.0f} s, slowness {slowness:.1f}):"
                                   f"\n{out}\n{(logs / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield address, env, slowness
    finally:
        for p in reversed(procs):
            stop_head(p, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- corpus


@dataclass
class BlobCorpus:
    root: str
    images: list[str]
    labels: list[str]
    num_classes: int


@pytest.fixture
def blob_corpus(tmp_path) -> BlobCorpus:
    """Six small blob images (3 JPEG, 3 PNG) with label PNGs in a temp dir, 4 classes."""
    from ebseg_core.data.synthetic import label_uri_for, write_blob_images

    images = write_blob_images(tmp_path / "corpus", 6, num_classes=4, seed=0)
    return BlobCorpus(
        root=str(tmp_path / "corpus"),
        images=images,
        labels=[label_uri_for(u) for u in images],
        num_classes=4,
    )
