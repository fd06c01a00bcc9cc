"""A flaky S3 in front of the real one: an HTTP proxy on 127.0.0.1 that forwards every request to moto's server
but answers one request in `fail_every` (of those under `fail_prefix`) itself with a transient S3 error
(500 InternalError, 503 SlowDown, 503 ServiceUnavailable, in turn), and every request under a denied prefix
with 403 AccessDenied.

Clients (boto3, pyarrow's AWS SDK, Ray workers) use the proxy's URL as their S3 endpoint; moto does not check
signatures, so forwarding a signed request to another port is fine.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

TRANSIENT = ((500, "InternalError"), (503, "SlowDown"), (503, "ServiceUnavailable"))
# Hop-by-hop headers are the proxy's own business (RFC 9110 7.6.1); the body is re-sent with a length.
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FlakyS3Proxy:
    """Start with `start()`, use `url` as the S3 endpoint, read `requests` / `failed`, `stop()` at the end."""

    def __init__(self, upstream: str, fail_every: int = 0, fail_prefix: str = "/",
                 denied_prefix: str | None = None) -> None:
        self.upstream = urlsplit(upstream)
        self.fail_every = fail_every  # 0: never fail
        self.fail_prefix = fail_prefix  # only requests under this path ("/bucket/prefix") fail
        self.denied_prefix = denied_prefix  # "/bucket/key-prefix": 403 for every request under it
        self.requests = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FlakyS3Proxy":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _verdict(self, path: str) -> tuple[int, str] | None:
        """The error to answer with instead of forwarding, or None."""
        if self.denied_prefix and path.startswith(self.denied_prefix):
            return 403, "AccessDenied"
        if not path.startswith(self.fail_prefix):
            return None
        with self._lock:
            self.requests += 1
            if self.fail_every and self.requests % self.fail_every == 0:
                self.failed += 1
                return TRANSIENT[(self.failed - 1) % len(TRANSIENT)]
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the AWS SDK expects

            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                verdict = proxy._verdict(urlsplit(self.path).path)
                if verdict is not None:
                    status, code = verdict
                    payload = (b"" if self.command == "HEAD" else
                               (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                                f"<Message>injected by the test proxy</Message><RequestId>flaky</RequestId>"
                                f"</Error>").encode())
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                if self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_HEADERS and not (key.lower() == "content-length"
                                                                    and self.command != "HEAD"):
                            self.send_header(key, value)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler
