"""A loopback HTTP proxy in front of an S3 endpoint (moto) that answers some GETs with an S3 error.

Why: transient throttling is the most common object-store failure in a long labeling job; the
pipeline must retry it, not turn it into error rows or a crash. ``error="expired_token"`` plays a
credential outage instead (every matching GET refused until ``heal()``), which must stop the job. Point a client's endpoint_url
(or AWS_ENDPOINT_URL) at ``proxy.url``; requests are forwarded to the real endpoint unchanged
(path-style S3, so the Host header does not matter to moto).

Bounded and self-stopping: at most ``max_failures`` injected errors, no error twice in a row for
the same path (so a client with any retry eventually gets through), and the server thread stops
after ``lifetime_s`` even if the test forgets to call ``stop()``.
"""

from __future__ import annotations

import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message><RequestId>flaky</RequestId></Error>")
EXPIRED_TOKEN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredToken</Code>'
                      b"<Message>The provided token has expired.</Message><RequestId>flaky</RequestId></Error>")
# error name -> (HTTP status, reason, body), as S3 answers them
ERRORS = {"slow_down": (503, "Slow Down", SLOW_DOWN_BODY), "expired_token": (400, "Bad Request", EXPIRED_TOKEN_BODY)}
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


class FlakyProxy:
    """Forwarding proxy; ``fail_fraction`` of GET requests (object reads) get an S3 error.

    ``error``: a key of ERRORS. ``path_contains``: only requests whose path holds this text can fail.
    ``pass_first``: that many matching requests go through before any fails. ``repeat``: a path may
    fail again right after failing (an outage, not a blip).
    """

    def __init__(self, upstream: str, fail_fraction: float = 0.3, max_failures: int = 200,
                 lifetime_s: float = 600.0, seed: int = 0, only_get: bool = True, error: str = "slow_down",
                 path_contains: str | None = None, pass_first: int = 0, repeat: bool = False):
        up = urlparse(upstream)
        self.upstream_host, self.upstream_port = up.hostname, up.port or 80
        self.fail_fraction = fail_fraction
        self.max_failures = max_failures
        self.only_get = only_get
        self.error = ERRORS[error]
        self.path_contains = path_contains
        self.pass_first = pass_first
        self.repeat = repeat
        self.injected = 0
        self.forwarded = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._last_failed: set[str] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy._should_fail(self.command, self.path):
                    status, reason, error_body = proxy.error
                    self.send_response(status, reason)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error_body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error_body)
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_HEADERS and (k.lower() != "content-length" or self.command == "HEAD"):
                            self.send_header(k, v)  # HEAD keeps the object's length; bodies get their own
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.forwarded += 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="flaky-proxy", daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._started = False
        self._stopped = False

    def _should_fail(self, method: str, path: str) -> bool:
        if self.only_get and method != "GET":
            return False
        if self.path_contains is not None and self.path_contains not in path:
            return False
        with self._lock:
            if self.pass_first > 0:
                self.pass_first -= 1
                return False
            if path in self._last_failed and not self.repeat:  # never twice in a row for one path
                self._last_failed.discard(path)
                return False
            if self.injected >= self.max_failures or self._rng.random() >= self.fail_fraction:
                return False
            self.injected += 1
            self._last_failed.add(path)
            return True

    def heal(self) -> None:
        """End the outage: forward every request from now on."""
        with self._lock:
            self.max_failures = self.injected

    def start(self) -> FlakyProxy:
        self._started = True
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        if self._started:
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FlakyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
