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

from tests.helpers import REPO_ROOT, free_port, port_open, stop_head  # noqa: E402 - needs the repo on sys.path

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
