"""A real HTTP server on 127.0.0.1 for download tests, with Range support and fault switches.

Usage (or take the ``http_server`` fixture from conftest.py)::

    with LoopbackServer(folder) as server:
        url = server.url_for("Task04_Hippocampus.tar")      # a file under ``folder``
        url = server.url_for(Path("/elsewhere/file.tar"))   # or any absolute file (aliased)
        server.cut_after(1_000_000, requests=1)             # first request dies after 1 MB
        server.fail_with(503, requests=2)                   # first 2 requests get HTTP 503
        server.ignore_range = True                          # answer Range requests with 200
        server.requests                                     # what the server saw, in order

Faults count requests in arrival order; ``fail_with`` is applied before ``cut_after``.
"""

from __future__ import annotations

import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_CHUNK = 64 * 1024


@dataclass
class RequestRecord:
    """One request as the server saw it."""

    path: str
    range: str | None  # the Range header, e.g. "bytes=1000-"
    status: int
    bytes_sent: int = 0


class LoopbackServer:
    """Threaded HTTP/1.0 file server on a free port of 127.0.0.1, serving ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.requests: list[RequestRecord] = []
        self.ignore_range = False
        self._aliases: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._cut_bytes = 0
        self._cut_left = 0
        self._status = 0
        self._status_left: int | None = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.loopback = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url_for(self, path: str | Path) -> str:
        """URL of a file under ``root`` (relative path) or of any absolute file (served by alias)."""
        path = Path(path)
        if path.is_absolute():
            resolved = path.resolve()
            try:
                relative = resolved.relative_to(self.root).as_posix()
            except ValueError:
                with self._lock:
                    relative = f"_alias/{len(self._aliases)}/{resolved.name}"
                    self._aliases[relative] = resolved
        else:
            relative = path.as_posix()
        return f"{self.base_url}/{urllib.parse.quote(relative)}"

    def cut_after(self, n_bytes: int, requests: int = 1) -> None:
        """Close the connection after ``n_bytes`` of body on each of the next ``requests`` requests."""
        with self._lock:
            self._cut_bytes, self._cut_left = n_bytes, requests

    def fail_with(self, status: int, requests: int | None = None) -> None:
        """Answer the next ``requests`` requests (all when None) with ``status``; 0 switches off."""
        with self._lock:
            self._status, self._status_left = status, requests

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the handler -------------------------------------------------------------------
    def _resolve(self, url_path: str) -> Path | None:
        relative = urllib.parse.unquote(url_path.split("?", 1)[0]).lstrip("/")
        with self._lock:
            if relative in self._aliases:
                return self._aliases[relative]
        candidate = (self.root / relative).resolve()
        if candidate.is_relative_to(self.root) and candidate.is_file():
            return candidate
        return None

    def _take_status(self) -> int:
        with self._lock:
            if not self._status or self._status_left == 0:
                return 0
            if self._status_left is not None:
                self._status_left -= 1
            return self._status

    def _take_cut(self) -> int | None:
        with self._lock:
            if self._cut_left <= 0:
                return None
            self._cut_left -= 1
            return self._cut_bytes

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)


class _Handler(BaseHTTPRequestHandler):
    server_version = "msdseg-loopback/1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        server: LoopbackServer = self.server.loopback  # type: ignore[attr-defined]
        range_header = self.headers.get("Range")
        record = RequestRecord(path=self.path, range=range_header, status=0)
        server._record(record)

        forced = server._take_status()
        if forced:
            record.status = forced
            self.send_error(forced)
            return
        file = server._resolve(self.path)
        if file is None:
            record.status = 404
            self.send_error(404)
            return

        size = file.stat().st_size
        start, end = 0, size - 1
        match = _RANGE.match(range_header or "")
        if match and not server.ignore_range:
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start >= size:
                record.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            record.status = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            record.status = 200
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

        cut = server._take_cut()
        remaining = end - start + 1 if cut is None else min(cut, end - start + 1)
        with open(file, "rb") as handle:
            handle.seek(start)
            try:
                while remaining > 0:
                    chunk = handle.read(min(_CHUNK, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    record.bytes_sent += len(chunk)
                    remaining -= len(chunk)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
        if cut is not None:
            # drop the connection with the body incomplete, as a flaky mirror would
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

