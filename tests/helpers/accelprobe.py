"""Client and server for the acceleration suite: real sockets, deterministic
bytes, SHA-256 checksums on both ends, one JSON line of results per run.

server PORT          listens on every address of the namespace; per connection
                     the client's first line says what to do:
  sink                 read to EOF, answer {"n", "sha"} (the client half-closed)
  splicesink           the same, reading through splice(socket -> pipe)
  source N             send N bytes (stream(N)), then close
  echo                 send back everything read, until EOF
  pause S              sleep S seconds before reading (back-pressure), then sink
  fionread K           wait until readable, let K bytes arrive, answer
                       {"fionread", "read"}: FIONREAD's value and what recv got
  reset K              read K bytes, then reset (SO_LINGER 0)
port + 1             accepts 1 s late, then answers whether poll() saw the
                       bytes queued before accept() at once, and what they were
client HOST PORT MODE [args]   connects, prints one JSON line, exit 0 on success
                     (modes: sink/sendfile/splice/splicesink N, source N, echo N, pause S N,
                     fionread K, reset, late N, rtt COUNT, stall N)
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import select
import socket
import struct
import sys
import tempfile
import termios
import threading
import time

CHUNK = 256 * 1024
_POOL = [random.Random(i).randbytes(CHUNK) for i in range(17)]


def stream(n: int):
    """n deterministic bytes: chunk i starts with i (8 bytes) and goes on with
    random bytes, so reordered, lost or repeated bytes change the checksum."""
    i = 0
    while n > 0:
        k = min(n, CHUNK)
        yield (struct.pack("<Q", i) + _POOL[i % 17][8:])[:k]
        n -= k
        i += 1


def expected_sha(n: int) -> str:
    h = hashlib.sha256()
    for b in stream(n):
        h.update(b)
    return h.hexdigest()


def read_line(s: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            break
        buf += c
    return buf.decode().strip()


def drain(s: socket.socket) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    while True:
        b = s.recv(CHUNK)
        if not b:
            return n, h.hexdigest()
        h.update(b)
        n += len(b)


def drain_splice(s: socket.socket) -> tuple[int, str]:
    """drain(), reading through splice(socket -> pipe)."""
    h, n = hashlib.sha256(), 0
    r, w = os.pipe()
    try:
        while k := os.splice(s.fileno(), w, 65536):
            while k:
                b = os.read(r, k)
                h.update(b)
                n += len(b)
                k -= len(b)
    finally:
        os.close(r)
        os.close(w)
    return n, h.hexdigest()


def send_json(s: socket.socket, obj) -> None:
    s.sendall(json.dumps(obj).encode() + b"\n")


# -- server ------------------------------------------------------------------------
def serve_one(c: socket.socket) -> None:
    with c:
        cmd, *args = read_line(c).split()
        if cmd == "sink":
            n, sha = drain(c)
            send_json(c, {"n": n, "sha": sha})
        elif cmd == "splicesink":
            n, sha = drain_splice(c)
            send_json(c, {"n": n, "sha": sha})
        elif cmd == "source":
            for b in stream(int(args[0])):
                c.sendall(b)
        elif cmd == "echo":
            while b := c.recv(CHUNK):
                c.sendall(b)
        elif cmd == "pause":
            time.sleep(float(args[0]))
            n, sha = drain(c)
            send_json(c, {"n": n, "sha": sha})
        elif cmd == "fionread":
            want = int(args[0])
            select.select([c], [], [], 10)
            deadline = time.time() + 10
            while time.time() < deadline and fionread(c) < want:
                time.sleep(0.01)
            v = fionread(c)
            got = c.recv(want * 2, socket.MSG_DONTWAIT)
            send_json(c, {"fionread": v, "read": len(got)})
        elif cmd == "reset":
            got = 0
            while got < int(args[0]):
                got += len(c.recv(CHUNK))
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def fionread(s: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def server(port: int) -> None:
    ls = socket.socket(socket.AF_INET6)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", port))
    ls.listen(512)
    late = socket.socket()   # for "late": accept only after a pause
    late.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    late.bind(("0.0.0.0", port + 1))
    late.listen(8)
    threading.Thread(target=late_server, args=(late,), daemon=True).start()
    print("ready", flush=True)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve_one, args=(c,), daemon=True).start()


def late_server(ls: socket.socket) -> None:
    """Accept late, then see whether the bytes queued before accept() are
    readable at once (poll), without a further send to wake us."""
    while True:
        time.sleep(1.0)
        c, _ = ls.accept()
        with c:
            t0 = time.monotonic()
            ready = select.select([c], [], [], 5)[0]
            waited = time.monotonic() - t0
            n = 0
            h = hashlib.sha256()
            while ready and n < 3 * 1024 * 1024:
                b = c.recv(CHUNK)
                if not b:
                    break
                h.update(b)
                n += len(b)
            send_json(c, {"ready": bool(ready), "waited": waited, "n": n, "sha": h.hexdigest()})


# -- client ------------------------------------------------------------------------
def client(host: str, port: int, mode: str, args: list[str]) -> dict:
    s = socket.create_connection((host, port), timeout=60)
    out: dict = {"mode": mode}
    if mode in ("sink", "sendfile", "splice", "splicesink"):
        n = int(args[0])
        s.sendall(b"splicesink\n" if mode == "splicesink" else b"sink\n")
        if mode in ("sink", "splicesink"):
            for b in stream(n):
                s.sendall(b)
        else:
            with tempfile.TemporaryFile() as f:
                for b in stream(n):
                    f.write(b)
                f.flush()
                (send_file if mode == "sendfile" else send_splice)(s, f, n)
        s.shutdown(socket.SHUT_WR)             # half-close: the server answers after EOF
        out.update(json.loads(read_line(s)), want_sha=expected_sha(n))
    elif mode == "source":
        s.sendall(f"source {args[0]}\n".encode())
        out["n"], out["sha"] = drain(s)
        out["want_sha"] = expected_sha(int(args[0]))
    elif mode == "echo":
        n = int(args[0])
        s.sendall(b"echo\n")
        t = threading.Thread(target=lambda: ([s.sendall(b) for b in stream(n)],
                                             s.shutdown(socket.SHUT_WR)))
        t.start()
        out["n"], out["sha"] = drain(s)
        t.join()
        out["want_sha"] = expected_sha(n)
    elif mode == "pause":
        # The server reads nothing for S seconds. Send without blocking: when no
        # byte is accepted for a whole second, the path pushed back (note how
        # much had gone by then); then send the rest blocking.
        pause, n = float(args[0]), int(args[1])
        s.sendall(f"pause {pause}\n".encode())
        s.setblocking(False)
        sent, blocked_at = 0, None
        for b in stream(n):
            view = memoryview(b)
            while view:
                try:
                    k = s.send(view)
                    view, sent = view[k:], sent + k
                except BlockingIOError:
                    if blocked_at is None and not select.select([], [s], [], 1.0)[1]:
                        blocked_at = sent
                    elif blocked_at is not None:
                        select.select([], [s], [], 60)
        s.setblocking(True)
        s.settimeout(60)
        out["blocked_at"] = blocked_at
        s.shutdown(socket.SHUT_WR)
        out.update(json.loads(read_line(s)), want_sha=expected_sha(n))
    elif mode == "fionread":
        k = int(args[0])
        s.sendall(f"fionread {k}\n".encode())
        time.sleep(0.3)                        # the command line is read on its own
        s.sendall(next(stream(k)))
        out.update(json.loads(read_line(s)), sent=k)
    elif mode == "reset":
        s.sendall(b"reset 1000\n" + b"x" * 1000)
        try:
            got = s.recv(10)
            out["result"] = "eof" if got == b"" else f"data {got!r}"
        except ConnectionResetError:
            out["result"] = "reset"
    elif mode == "late":
        n = int(args[0])
        for b in stream(n):
            s.sendall(b)                       # before the server accept()s
        out.update(json.loads(read_line(s)), want_sha=expected_sha(n))
    elif mode == "rtt":
        # round trips of one small message (for measurements, not assertions)
        s.sendall(b"echo\n")
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(int(args[0])):
            t0 = time.perf_counter()
            s.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(s.recv(64 - got))
            times.append(time.perf_counter() - t0)
        times.sort()
        out["p50_us"] = times[len(times) // 2] * 1e6
        out["p99_us"] = times[int(len(times) * 0.99)] * 1e6
    elif mode == "stall":
        # a stream that stops: the peer goes away mid-transfer (Envoy restarts);
        # how it ends, and after how many bytes
        s.sendall(f"source {args[0]}\n".encode())
        n = 0
        print("started", flush=True)
        try:
            while b := s.recv(CHUNK):
                n += len(b)
            out["result"] = "eof"
        except ConnectionResetError:
            out["result"] = "reset"
        except socket.timeout:
            out["result"] = "hang"
        out["n"] = n
    s.close()
    return out


def send_file(s, f, n) -> None:
    off = 0
    while off < n:
        off += os.sendfile(s.fileno(), f.fileno(), off, n - off)


def send_splice(s, f, n) -> None:
    r, w = os.pipe()
    try:
        off = 0
        while off < n:
            k = os.splice(f.fileno(), w, min(65536, n - off), offset_src=off)
            off += k
            while k:
                k -= os.splice(r, s.fileno(), k)
    finally:
        os.close(r)
        os.close(w)


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("server").add_argument("port", type=int)
    c = sub.add_parser("client")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("mode")
    c.add_argument("args", nargs="*")
    a = p.parse_args()
    if a.cmd == "server":
        server(a.port)
        return 0
    print(json.dumps(client(a.host, a.port, a.mode, a.args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
