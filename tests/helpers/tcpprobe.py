"""A TCP server with one behaviour per port, and a probing client, for the
transparency tests: what an application observes (bytes, errors, addresses,
when the first byte came) printed as JSON, so a run direct and a run through
meshd can be compared field by field.

  tcpprobe.py serve BASE_PORT          modes on BASE_PORT + index (MODES), IPv4+IPv6
  tcpprobe.py probe HOST PORT [--send HEX] [--random N] [--half-close] [--read-first]
                                 [--idle SECONDS]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import struct
import sys
import threading
import time

MODES = ("eofreply", "banner", "echo", "rst", "rstread", "http", "whoami", "longpoll")


def port_of(base: int, mode: str) -> int:
    return base + MODES.index(mode)


def _reset(c: socket.socket) -> None:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def _read_to_eof(c: socket.socket) -> bytes:
    data = b""
    while d := c.recv(65536):
        data += d
    return data


def handle(mode: str, c: socket.socket) -> None:
    try:
        if mode == "eofreply":      # answers only after the client's half-close
            data = _read_to_eof(c)
            c.sendall(b"got %d %s\n" % (len(data), hashlib.sha256(data).hexdigest()[:16].encode()))
        elif mode == "banner":      # speaks first, like SMTP or MySQL
            c.sendall(b"220 tcpprobe ready\r\n")
            while d := c.recv(65536):
                c.sendall(d)
        elif mode == "echo":
            while d := c.recv(65536):
                c.sendall(d)
        elif mode == "rst":         # resets with the request unread
            # Not before it arrived: a reset right on accept can reach a direct client
            # that has not returned from connect() yet, and then fails connect() itself
            # (ECONNRESET), which no client behind a proxy can see.
            c.recv(1, socket.MSG_PEEK)
            return _reset(c)
        elif mode == "rstread":
            c.recv(65536)
            return _reset(c)
        elif mode == "http":        # the request head back, under a custom reason phrase
            head = b""
            while b"\r\n\r\n" not in head and (d := c.recv(65536)):
                head += d
            body = head.split(b"\r\n\r\n")[0]
            c.sendall(b"HTTP/1.1 200 Fine Thanks\r\nX-Mixed-Case: yes\r\nContent-Length: %d\r\n"
                      b"Connection: close\r\n\r\n%s" % (len(body), body))
        elif mode == "longpoll":    # GET /sleep/<seconds>: answers after that long
            head = b""
            while b"\r\n\r\n" not in head and (d := c.recv(65536)):
                head += d
            time.sleep(float(head.split(b" ")[1].rsplit(b"/", 1)[1]))
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlate")
        elif mode == "whoami":
            host, port = c.getpeername()[:2]
            c.sendall(f"{host.removeprefix('::ffff:')} {port}\n".encode())
        c.close()
    except OSError:
        c.close()


def accept_loop(mode: str, s: socket.socket) -> None:
    while True:
        threading.Thread(target=handle, args=(mode, s.accept()[0]), daemon=True).start()


def serve(base: int) -> None:
    socks = []
    for mode in MODES:
        s = socket.socket(socket.AF_INET6)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port_of(base, mode)))
        s.listen(128)
        socks.append((mode, s))
    for mode, s in socks:
        threading.Thread(target=accept_loop, args=(mode, s), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def probe(host: str, port: int, send: bytes, half_close: bool, read_first: bool,
          idle: float = 0) -> dict:
    out: dict = {"connect": "ok", "received": "", "end": ""}
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    c = socket.socket(family)
    c.settimeout(10 + idle)
    t0 = time.monotonic()
    try:
        c.connect((host, port))
    except OSError as e:
        out["connect"] = errno_name(e)
        return out
    out["sockname"] = c.getsockname()[0].removeprefix("::ffff:")
    out["peername"] = list(c.getpeername()[:2])
    received = b""
    try:
        if read_first:
            received += c.recv(65536)
            out["first_byte_ms"] = round((time.monotonic() - t0) * 1000, 1)
        if send:
            c.sendall(send)
        if idle:   # an exchange, a quiet spell, then another
            received += c.recv(65536)
            time.sleep(idle)
            c.sendall(send)
        if half_close:
            c.shutdown(socket.SHUT_WR)
        while d := c.recv(65536):
            received += d
        out["end"] = "EOF"
    except OSError as e:
        out["end"] = errno_name(e)
    out["received"] = received.decode("latin-1")
    return out


def random_bytes(n: int) -> bytes:
    return random.Random(n).randbytes(n)


def errno_name(e: OSError) -> str:
    import errno
    return errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("base", type=int)
    p = sub.add_parser("probe")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--send", default="", help="bytes to send, in hex")
    p.add_argument("--random", type=int, default=0, help="send N deterministic random bytes")
    p.add_argument("--half-close", action="store_true")
    p.add_argument("--read-first", action="store_true")
    p.add_argument("--idle", type=float, default=0, help="after one exchange, wait, send again")
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.base)
    else:
        send = bytes.fromhex(a.send) + random_bytes(a.random)
        json.dump(probe(a.host, a.port, send, a.half_close, a.read_first, a.idle), sys.stdout)


if __name__ == "__main__":
    main()
