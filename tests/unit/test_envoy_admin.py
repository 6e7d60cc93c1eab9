"""The admin API client against a small HTTP server on a UNIX socket that answers the way
Envoy's admin does (HTTP/1.1 only, chunked stats), and the stats arithmetic."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import socketserver
import tempfile
import threading

import pytest

from meshd.envoy import admin

STATS = {"stats": [{"name": "server.state", "value": 0},
                   {"name": "http.outbound_http.downstream_rq_total", "value": 3},
                   {"name": "cluster.x.upstream_rq_time", "histograms": {}}]}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):   # quiet (and a UNIX peer has no address to log)
        pass

    def do_GET(self):
        self.server.requests.append((self.request_version, self.path, dict(self.headers)))
        if self.request_version != "HTTP/1.1":   # as Envoy 1.40's admin does
            return self.reply(426, b"Upgrade Required")
        if self.path in self.server.canned:
            return self.reply(*self.server.canned[self.path])
        if self.path == "/ready":
            return self.reply(200, b"LIVE\n")
        if self.path == "/stats?format=json":
            return self.chunked(json.dumps(STATS).encode())
        if self.path == "/truncated":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"100\r\nshort")   # promises 256 bytes, then closes
            self.close_connection = True
            return
        if self.path == "/garbage":
            self.wfile.write(b"SSH-2.0-not-http\r\n\r\n")
            self.close_connection = True
            return
        if self.path == "/silent":
            self.server.release.wait(10)
            self.close_connection = True
            return
        self.reply(404, b"no such thing")

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def chunked(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(body), 7):   # many small chunks, one with an extension
            part = body[i:i + 7]
            self.wfile.write(f"{len(part):x}{';x=y' if i == 7 else ''}\r\n".encode()
                             + part + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def envoy_admin():
    d = tempfile.mkdtemp(prefix="mt-admin-")   # short: sun_path holds 108 bytes
    srv = Server(os.path.join(d, "admin.sock"), Handler)
    srv.requests, srv.canned, srv.release = [], {}, threading.Event()
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        t.join(5)
        shutil.rmtree(d, ignore_errors=True)


def test_get_speaks_http_1_1_with_a_host(envoy_admin):
    assert admin.get(envoy_admin.server_address, "/ready") == (200, b"LIVE\n")
    ((version, path, headers),) = envoy_admin.requests
    assert (version, path) == ("HTTP/1.1", "/ready")
    assert headers["Host"] == "localhost"


def test_the_fake_refuses_http_1_0_like_envoy(envoy_admin):
    """The server really is as strict as Envoy: an HTTP/1.0 client gets 426."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(envoy_admin.server_address)
        s.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
        assert s.makefile("rb").readline().split()[1] == b"426"


def test_stats_reads_a_chunked_body(envoy_admin):
    assert admin.stats(envoy_admin.server_address) == {
        "server.state": 0, "http.outbound_http.downstream_rq_total": 3}


def test_error_status_is_an_admin_error(envoy_admin):
    envoy_admin.canned["/stats?format=json"] = (503, b"try later")
    with pytest.raises(admin.AdminError, match="HTTP 503"):
        admin.stats(envoy_admin.server_address)


@pytest.mark.parametrize("path", ["/truncated", "/garbage"])
def test_broken_replies_are_admin_errors(envoy_admin, path):
    with pytest.raises(admin.AdminError):
        admin.get(envoy_admin.server_address, path)


def test_no_answer_times_out(envoy_admin):
    with pytest.raises(TimeoutError):
        admin.get(envoy_admin.server_address, "/silent", timeout=0.2)
    assert admin.is_ready(envoy_admin.server_address, 0.2) is True   # others still served


def test_no_socket_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        admin.get(str(tmp_path / "none.sock"), "/ready")
    with pytest.raises(OSError):
        admin.stats(str(tmp_path / "none.sock"))
    assert admin.is_ready(str(tmp_path / "none.sock")) is False


def test_ready_only_on_200(envoy_admin):
    assert admin.is_ready(envoy_admin.server_address) is True
    envoy_admin.canned["/ready"] = (503, b"PRE_INITIALIZING\n")
    assert admin.is_ready(envoy_admin.server_address) is False


def test_total_sums_the_per_workload_chains():
    stats = {"http.outbound_http.downstream_rq_total": 1,
             "http.outbound_http_3.downstream_rq_total": 2,
             "http.outbound_http_12.downstream_rq_total": 4,
             "http.outbound_http_x.downstream_rq_total": 100,      # not a workload id
             "http.inbound_http_3.downstream_rq_total": 1000,      # another listener
             "http.outbound_http_3.downstream_rq_2xx": 10000}      # another counter
    assert admin.total(stats, "http.outbound_http.downstream_rq_total") == 7
    assert admin.total({}, "http.outbound_http.downstream_rq_total") == 0
