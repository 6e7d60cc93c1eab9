"""The observe socket (<state_dir>/observe.sock), both ends: the daemon keeps a
bounded ring of recent flow records and streams them, and new ones as they
come, to `meshd observe` (meshd/cli.py), which filters and prints them.

One request line per connection, JSON: {"since": <unix time>, "follow": bool}.
The answer is one JSON flow record per line; with follow the connection stays
open for new ones. A client that does not keep up is dropped, never waited for
(the daemon's loop is never blocked).
"""
from __future__ import annotations

import collections
import json
import logging
import socket
import time
from typing import Iterator

from .unixlisten import UnixListener

log = logging.getLogger("meshd")

RING = 4096                 # records kept for `meshd observe` without --follow
CLIENT_BUFFER = 4 << 20     # bytes queued for one slow client before it is dropped


class _Client:
    def __init__(self, sock: socket.socket):
        self.sock, self.inbuf, self.out = sock, b"", bytearray()
        self.follow = False
        self.started = False
        self.watch = 0
        self.out_watch = 0


class ObserveServer:
    def __init__(self, path: str, ring: int = RING):
        from gi.repository import GLib
        self._glib = GLib
        self.path = path
        self.ring: collections.deque = collections.deque(maxlen=ring)
        self._clients: dict[int, _Client] = {}
        self.dropped_clients = 0
        # Flow records name peers: root only, as the state files.
        self.listener = UnixListener(path, 0o600, self._on_conn)

    # -- records in --
    def publish(self, records: list[dict]) -> None:
        self.ring.extend(records)
        followers = [c for c in self._clients.values() if c.started and c.follow]
        if not records or not followers:
            return
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        for c in followers:
            if c.sock.fileno() in self._clients:   # not dropped by an earlier _queue
                self._queue(c, data)

    # -- clients --
    def _on_conn(self, conn: socket.socket) -> None:
        GLib = self._glib
        c = _Client(conn)
        c.watch = GLib.io_add_watch(conn.fileno(), GLib.PRIORITY_DEFAULT,
                                    GLib.IO_IN | GLib.IO_HUP | GLib.IO_ERR, self._on_in)
        self._clients[conn.fileno()] = c

    def _on_in(self, fd, cond) -> bool:
        c = self._clients.get(fd)
        if c is None:
            return False
        try:
            data = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data or (c.started and data):   # closed, or talking out of turn
            self._close(fd, c)
            return False
        c.inbuf += data
        if b"\n" not in c.inbuf:
            if len(c.inbuf) > 4096:
                self._close(fd, c)
                return False
            return True
        line = c.inbuf.split(b"\n", 1)[0]
        try:
            req = json.loads(line)
            since, follow = float(req.get("since") or 0), bool(req.get("follow"))
        except (ValueError, TypeError, AttributeError):
            self._close(fd, c)
            return False
        c.started, c.follow = True, follow
        backlog = [r for r in self.ring if r["time"] >= since]
        self._queue(c, "".join(json.dumps(r, sort_keys=True) + "\n"
                               for r in backlog).encode())
        if not follow and fd in self._clients and not c.out:
            self._close(fd, c)
            return False
        return fd in self._clients

    def _queue(self, c: _Client, data: bytes) -> None:
        fd = c.sock.fileno()
        if len(c.out) + len(data) > CLIENT_BUFFER:
            self.dropped_clients += 1
            log.info("observe: a client does not keep up; dropped")
            self._close(fd, c)
            return
        c.out += data
        self._flush(fd, c)

    def _flush(self, fd: int, c: _Client) -> bool:
        GLib = self._glib
        while c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                if not c.out_watch:
                    c.out_watch = GLib.io_add_watch(fd, GLib.PRIORITY_DEFAULT, GLib.IO_OUT,
                                                    self._on_out)
                return True
            except OSError:
                self._close(fd, c)
                return False
            del c.out[:n]
        if c.out_watch:
            GLib.source_remove(c.out_watch)
            c.out_watch = 0
        if not c.follow and c.started:
            self._close(fd, c)
            return False
        return True

    def _on_out(self, fd, cond) -> bool:
        c = self._clients.get(fd)
        if c is None:
            return False
        c.out_watch = 0   # this watch ends here; _flush adds a new one if still blocked
        self._flush(fd, c)
        return False

    def _close(self, fd: int, c: _Client) -> None:
        if self._clients.pop(fd, None) is None:
            return
        for w in (c.watch, c.out_watch):
            if w:
                try:
                    self._glib.source_remove(w)
                except Exception:   # the watch already ended (its callback returned False)
                    pass
        c.watch = c.out_watch = 0
        c.sock.close()

    def close(self) -> None:
        for fd, c in list(self._clients.items()):
            self._close(fd, c)
        self.listener.close()


# -- the client side (`meshd observe`) --
def stream(path: str, since: float, follow: bool, timeout: float = 5.0) -> Iterator[dict]:
    """The daemon's records with time >= since; with follow, forever."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(json.dumps({"since": since, "follow": follow}).encode() + b"\n")
    s.settimeout(None if follow else timeout)
    with s, s.makefile("rb") as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def matches(r: dict, workload: str = "", direction: str = "", status: str = "") -> bool:
    """--workload, --direction (in/out or inbound/outbound), --status: a code
    (404), a class (5xx), "ok", "miss", "error" (>= 500, a TCP connection with
    Envoy's flags, or a miss) or Envoy's flags (UF)."""
    if workload and r["workload"] != workload:
        return False
    if direction and not r["direction"].startswith(direction):
        return False
    if status:
        st = r["status"]
        if status == "error":
            return st == "miss" or (st.isdigit() and int(st) >= 500) or (
                r["protocol"] == "tcp" and st != "ok")
        if len(status) == 3 and status.endswith("xx"):
            return st[:1] == status[0] and st.isdigit()
        return st == status
    return True


def format_line(r: dict) -> str:
    """One line, hubble style: time, source, direction, destination, protocol,
    HTTP method/path/status, bytes each way, duration."""
    t = time.strftime("%H:%M:%S", time.localtime(r["time"])) + f".{int(r['time'] * 1000) % 1000:03d}"
    wl = r["workload"] or "-"
    if r["direction"] == "outbound":
        src, dst, arrow = f"{wl}", r["destination"], "->"
    else:
        src, dst, arrow = r["source"], f"{wl} ({r['destination']})", "->"
    what = f"{r['method']} {r['path']} {r['status']}" if r["method"] else r["status"]
    return (f"{t} {r['direction'][:3]:3} {src} {arrow} {dst} {r['protocol']} {what} "
            f"sent={r['bytes_sent']}B recv={r['bytes_received']}B {r['duration_ms']}ms")
