"""Steady client load with every request and every byte accounted for.

A standalone script (stdlib only: it also runs inside the systemd tier's guest)
and a small Python API for tests and bench/ scripts.

  load.py serve --http PORT ... --tcp PORT ...
      HTTP/1.1 (keep-alive) and TCP echo servers, IPv4+IPv6. `GET /n/<size>/<seq>`
      answers <size> deterministic bytes that depend on <seq>, with `X-Seq: <seq>` and
      `X-Via: envoy|direct` (did the request carry the header Envoy adds on a port
      declared "http"?). Prints "ready" once every port listens.
  load.py client --mode keepalive|newconn|stream --host H --port P --seconds S
                 [--rate R] [--size B] [--max N] [--events]
      One client, paced at R operations a second, stopping by itself after S seconds
      (or N operations); every socket operation has a timeout. Prints "ready" after
      its first operation, then one JSON line of accounting (see `Tally`).
      keepalive: HTTP requests on one kept-alive connection (reconnects if it dies);
      newconn:   HTTP requests, a new connection each;
      stream:    one long TCP connection to an echo port, a chunk of <size> bytes out
                 and back per operation, half-closed at the end (EOF must come back).

The accounting (per client, summed by `Load.results`): `sent` operations started,
`answered` ones whose answer was complete and byte-for-byte right, `failed` the rest
(sent = answered + failed, checked), `bytes_sent`/`bytes_verified`, `connections`
opened, `dropped` established connections that broke (reset, EOF or timeout in the
middle of an exchange, or a kept connection found dead), `closed_by_peer` kept-alive
connections the server side closed cleanly after an answer (`Connection: close`,
e.g. Envoy draining a listener: nothing lost), `via_envoy`/`direct` for HTTP answers,
and a few error samples. With --events, `events` lists [t0, t1, ok, via] per
operation (via: 1 Envoy, 0 direct, -1 not HTTP/unknown) for recovery timings.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import random
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

try:    # imported as tests/helpers/load.py
    from helpers.echo_server import DualStackHTTP, DualStackTCP
except ImportError:   # run as a script, next to echo_server.py (also in the system tier's guest)
    from echo_server import DualStackHTTP, DualStackTCP

PATTERN = random.Random(20261201).randbytes(1 << 20)
VIA_HEADER = "x-forwarded-proto"      # what Envoy adds on a port declared "http"
TIMEOUT = 5.0                         # every socket operation; a client never hangs
MODES = ("keepalive", "newconn", "stream")


def body(size: int, seq: int) -> bytes:
    """<size> bytes that depend on seq (a misdelivered answer does not verify)."""
    start = (seq * 7919) % (len(PATTERN) - size) if size < len(PATTERN) else 0
    return PATTERN[start:start + size]


# -- servers ------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True    # head and body are two writes: no 40 ms stall

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "n":
            self.send_error(404)
            return
        size, seq = int(parts[1]), int(parts[2])
        data = body(size, seq)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Seq", str(seq))
        self.send_header("X-Via", "envoy" if VIA_HEADER in self.headers else "direct")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := self.request.recv(65536):
            self.request.sendall(data)


def _server(base):
    """echo_server.py's dual-stack server class, with a deeper accept queue."""
    return type("Load" + base.__name__, (base,), {"request_queue_size": 1024})


def serve(http_ports, tcp_ports) -> None:
    servers = [_server(DualStackHTTP)(("::", p), Handler) for p in http_ports]
    servers += [_server(DualStackTCP)(("::", p), Echo) for p in tcp_ports]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


# -- clients ------------------------------------------------------------------------

class Tally:
    """One client's accounting (see the module docstring)."""

    FIELDS = ("sent", "answered", "failed", "bytes_sent", "bytes_verified", "connections",
              "dropped", "closed_by_peer", "via_envoy", "direct")

    def __init__(self, events: bool):
        self.n = dict.fromkeys(self.FIELDS, 0)
        self.errors: collections.Counter = collections.Counter()
        self.events = [] if events else None

    def op(self, t0: float, ok: bool, via: int = -1, error: str = "") -> None:
        self.n["answered" if ok else "failed"] += 1
        if via == 1:
            self.n["via_envoy"] += ok
        elif via == 0:
            self.n["direct"] += ok
        if error:
            self.errors[error] += 1
        if self.events is not None:
            self.events.append([round(t0, 4), round(time.time(), 4), int(ok), via])

    def result(self, mode: str) -> dict:
        out = dict(self.n, mode=mode, errors=dict(self.errors.most_common(5)))
        if self.events is not None:
            out["events"] = self.events
        return out


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:120]


def _http_get(conn: http.client.HTTPConnection, size: int, seq: int, tally: Tally) -> tuple[int, bool]:
    """One verified request; returns (via, server closed the connection cleanly)."""
    conn.request("GET", f"/n/{size}/{seq}")
    r = conn.getresponse()
    data = r.read()
    if r.status != 200 or r.getheader("X-Seq") != str(seq) or data != body(size, seq):
        raise ValueError(f"wrong answer: status {r.status}, seq {r.getheader('X-Seq')}, "
                         f"{len(data)} bytes")
    tally.n["bytes_verified"] += len(data)
    return (1 if r.getheader("X-Via") == "envoy" else 0), r.will_close


def run_http(a, tally: Tally, keep: bool, ready) -> None:
    conn = None
    seq = 0
    for t0 in _ticks(a):
        seq += 1
        tally.n["sent"] += 1
        tally.n["bytes_sent"] += a.size          # the bytes asked for
        established = False
        try:
            if conn is None:
                conn = http.client.HTTPConnection(a.host, a.port, timeout=TIMEOUT)
                conn.connect()
                tally.n["connections"] += 1
            established = True
            via, closed = _http_get(conn, a.size, seq, tally)
            tally.op(t0, True, via)
            if closed or not keep:
                if keep:
                    tally.n["closed_by_peer"] += 1
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException, ValueError) as e:
            # A connection that was up and broke mid-exchange (or a kept one found
            # dead) is dropped; a refused connect or a wrong answer is only failed.
            if established and not isinstance(e, ValueError):
                tally.n["dropped"] += 1
            tally.op(t0, False, error=_err(e))
            if conn is not None:
                conn.close()
            conn = None
        ready()
    if conn is not None:
        conn.close()


def run_stream(a, tally: Tally, ready) -> None:
    sock = None
    seq = 0
    for t0 in _ticks(a):
        seq += 1
        tally.n["sent"] += 1
        tally.n["bytes_sent"] += a.size
        data = body(a.size, seq)
        try:
            if sock is None:
                sock = socket.create_connection((a.host, a.port), timeout=TIMEOUT)
                tally.n["connections"] += 1
            sock.sendall(data)
            got = _recv_exactly(sock, len(data))
            if got != data:
                raise ValueError(f"echo differs ({len(got)} of {len(data)} bytes)")
            tally.n["bytes_verified"] += len(data)
            tally.op(t0, True)
        except (OSError, ValueError) as e:
            if sock is not None:
                tally.n["dropped"] += 1
                sock.close()
                sock = None
            tally.op(t0, False, error=_err(e))
        ready()
    if sock is not None:
        try:   # a clean end: half-close, the server's EOF must come back
            sock.shutdown(socket.SHUT_WR)
            if sock.recv(1) != b"":
                raise ValueError("bytes after the half-close")
        except (OSError, ValueError) as e:
            tally.n["dropped"] += 1
            tally.errors[f"at close: {_err(e)}"] += 1
        sock.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            raise ConnectionError(f"EOF after {got} of {n} bytes")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


_STOP: list[int] = []   # SIGTERM: finish the operation under way, then report


def _ticks(a):
    """Start times of the operations: paced at a.rate a second (no catching up
    after a slow one), for a.seconds or a.max operations."""
    start = time.time()
    end = start + a.seconds
    gap = 1.0 / a.rate if a.rate > 0 else 0.0
    done = n = 0
    while (now := time.time()) < end and (not a.max or done < a.max) and not _STOP:
        yield now
        done += 1
        n += 1
        nxt = start + n * gap
        if (wait := nxt - time.time()) > 0:   # one reading of the clock: never negative
            time.sleep(min(wait, max(0.0, end - time.time())))
        else:   # behind: restart the schedule from now rather than bursting
            start, n = time.time(), 0


def client(a) -> dict:
    tally = Tally(a.events)
    said = []

    def ready():
        if not said:
            said.append(1)
            print("ready", flush=True)
    if a.mode == "stream":
        run_stream(a, tally, ready)
    else:
        run_http(a, tally, a.mode == "keepalive", ready)
    ready()
    return tally.result(a.mode)


# -- the Python API -------------------------------------------------------------------

def client_args(mode: str, host: str, port: int, seconds: float, rate: float = 50,
                size: int = 1024, max_ops: int = 0, events: bool = False) -> list[str]:
    assert mode in MODES, mode
    args = ["client", "--mode", mode, "--host", host, "--port", str(port),
            "--seconds", str(seconds), "--rate", str(rate), "--size", str(size)]
    if max_ops:
        args += ["--max", str(max_ops)]
    return args + (["--events"] if events else [])


SUMMED = Tally.FIELDS


class Load:
    """Client processes started through `popen(*cmd, **kw)` (whatever places them:
    a test cgroup in the mesh's namespace, a server host's namespace), all in one go.

        load = Load()
        load.start(mesh.popen_in, "keepalive", server.ip4, HTTP_PORT, seconds=6, name="egress-ka")
        load.wait_ready()
        ... inject faults ...
        res = load.results()     # {name: tally}, plus res["total"]
    """

    def __init__(self, python: str = sys.executable, script: str = __file__):
        self.python, self.script = python, script
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, popen, mode: str, host: str, port: int, seconds: float,
              name: str = "", **opts) -> subprocess.Popen:
        name = name or f"{mode}-{len(self.procs)}"
        assert name not in self.procs, name
        p = popen(self.python, self.script, *client_args(mode, host, port, seconds, **opts),
                  stdout=subprocess.PIPE, text=True)
        self.procs[name] = p
        return p

    def wait_ready(self) -> None:
        for name, p in self.procs.items():
            line = p.stdout.readline().strip()
            if line != "ready":
                raise AssertionError(f"load client {name} did not start: {line!r}")

    def results(self, timeout: float = 60, finish: bool = False) -> dict[str, dict]:
        """Every client's tally once all have stopped by themselves (finish: ask them
        to stop now, SIGTERM: each completes the operation under way and reports),
        and their sum under "total"; a client that does not stop in time is killed
        and fails."""
        if finish:
            for p in self.procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        out: dict[str, dict] = {}
        deadline = time.time() + timeout
        try:
            for name, p in self.procs.items():
                text, _ = p.communicate(timeout=max(0.1, deadline - time.time()))
                lines = [line for line in text.splitlines() if line.startswith("{")]
                if p.returncode != 0 or not lines:
                    raise AssertionError(f"load client {name} exited {p.returncode}: {text[-500:]!r}")
                out[name] = json.loads(lines[-1])
                t = out[name]
                assert t["sent"] == t["answered"] + t["failed"], (name, t)
        finally:
            self.stop()
        out["total"] = {k: sum(t[k] for t in out.values()) for k in SUMMED}
        return out

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        self.procs = {}


def start_server(popen, http_ports=(), tcp_ports=(), python: str = sys.executable,
                 script: str = __file__) -> subprocess.Popen:
    """`load.py serve` through popen (placing it where it should run), once it listens."""
    args = [a for p in http_ports for a in ("--http", str(p))]
    args += [a for p in tcp_ports for a in ("--tcp", str(p))]
    p = popen(python, script, "serve", *args, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        p.wait()
        raise AssertionError(f"load server did not start: {line!r}")
    return p


def start_mix(load: "Load", popen, host: str, http_port: int, tcp_port: int, seconds: float,
              name: str, clients: int = 1, rate: float = 50, stream_size: int = 16384,
              events: bool = False) -> None:
    """The standard mix towards one server: `clients` each of keep-alive HTTP, a new
    connection per HTTP request, and a long TCP stream, named <name>-<mode>-<i>."""
    for i in range(clients):
        load.start(popen, "keepalive", host, http_port, seconds, f"{name}-keepalive-{i}",
                   rate=rate, events=events)
        load.start(popen, "newconn", host, http_port, seconds, f"{name}-newconn-{i}",
                   rate=rate, events=events)
        load.start(popen, "stream", host, tcp_port, seconds, f"{name}-stream-{i}",
                   rate=rate, size=stream_size, events=events)


def after(res: dict[str, dict], t: float, until: float = float("inf")) -> dict:
    """What the clients run with events saw after a fault at time t (and before
    `until`, the next fault): seconds from t until an operation started after t first
    succeeded (`first_ok`; None: never), until one first went through Envoy
    (`first_via_envoy`, HTTP only), how many operations started after t failed
    (`failed_after`), and how many were under way at t and failed (`failed_in_flight`)."""
    ev = [e for n, c in res.items() if n != "total" for e in c.get("events", ())
          if e[1] >= t and e[0] < until]
    ok_after = [e for e in ev if e[0] >= t and e[2]]
    via = [e for e in ok_after if e[3] == 1]
    return dict(first_ok=min((e[1] - t for e in ok_after), default=None),
                first_via_envoy=min((e[0] - t for e in via), default=None),
                failed_after=sum(1 for e in ev if e[0] >= t and not e[2]),
                failed_in_flight=sum(1 for e in ev if e[0] < t and not e[2]))


def summary(res: dict[str, dict]) -> str:
    """One line per client, for assertion messages."""
    return "; ".join(f"{n}: " + ", ".join(f"{k}={t[k]}" for k in SUMMED if t.get(k)) +
                     (f" errors={t['errors']}" if t.get("errors") else "")
                     for n, t in res.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--http", type=int, action="append", default=[])
    s.add_argument("--tcp", type=int, action="append", default=[])
    c = sub.add_parser("client")
    c.add_argument("--mode", choices=MODES, required=True)
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--seconds", type=float, required=True)
    c.add_argument("--rate", type=float, default=50.0, help="operations a second (0: as fast as it can)")
    c.add_argument("--size", type=int, default=1024)
    c.add_argument("--max", type=int, default=0)
    c.add_argument("--events", action="store_true")
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.http, a.tcp)
    else:
        signal.signal(signal.SIGTERM, lambda *_: _STOP.append(1))
        report = json.dumps(client(a))
        # A SIGTERM that interrupts a write blocked on a full pipe (a report of more than
        # 64 KiB, the parent not reading yet) ends that write short and the rest is lost,
        # with exit status 0 (seen: the full form's reports cut at 64 and 128 KiB). An
        # ignored signal interrupts nothing, and the client is stopping anyway.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(report, flush=True)


if __name__ == "__main__":
    main()
