"""A loopback HTTP server for download tests: one in-memory file, Range support, failure switches.

    with FileServer(payload) as server:
        server.cut_after = 1000       # first request: close the connection after 1000 body bytes
        download_url(server.url, ...)
        server.requests[0].range      # the Range header each request carried (or None)
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

__all__ = ["FileServer", "Request"]


@dataclass(frozen=True)
class Request:
    """What the server saw of one GET."""

    path: str
    range: Optional[str]
    status: int


class FileServer:
    """Serves ``data`` at ``/<name>`` on 127.0.0.1 (a free port) from a background thread.

    Switches, changeable at any time:
        fail_status: answer every request with this error status (e.g. 404).
        ignore_range: answer 200 with the whole file even to Range requests.
        cut_after: on the first request only, send this many body bytes and
            then drop the connection (the headers announce the full length).
    """

    def __init__(self, data: bytes, name: str = "file.bin") -> None:
        self.data = data
        self.name = name
        self.fail_status: Optional[int] = None
        self.ignore_range = False
        self.cut_after: Optional[int] = None
        self.requests: List[Request] = []
        self._lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), name="FileServer", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/{self.name}"

    def start(self) -> "FileServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, request: Request) -> int:
        with self._lock:
            self.requests.append(request)
            return len(self.requests)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up early (the tests do that on purpose) is not an error.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _make_handler(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            data = server.data
            range_header = self.headers.get("Range")
            if self.path != f"/{server.name}":
                self._answer_error(404, range_header)
                return
            if server.fail_status is not None:
                self._answer_error(server.fail_status, range_header)
                return

            start = 0
            status = 200
            match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
            if match and not server.ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    server._record(Request(self.path, range_header, 416))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            number = server._record(Request(self.path, range_header, status))

            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if number == 1 and server.cut_after is not None:
                self.wfile.write(body[: server.cut_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def _answer_error(self, status: int, range_header: Optional[str]) -> None:
            server._record(Request(self.path, range_header, status))
            self.send_error(status)

        def log_message(self, format: str, *args) -> None:  # keep pytest output clean
            pass

    return Handler
