"""What a workload process tries in order to get around the mesh; run as an
unprivileged user inside an enrolled cgroup. Prints one JSON object:
{"ok": true, "body": ...} or {"ok": false, "error": "EACCES ..."}.

    escape_probe.py http HOST PORT MODE   MODE: plain | v4mapped | fastopen | mptcp
    escape_probe.py unix PATH             connect to an AF_UNIX socket (Envoy's admin)
    escape_probe.py read PATH             read a file
    escape_probe.py list PATH             list a directory
    escape_probe.py cgroup PATH           move itself into another cgroup (cgroup.procs)
    escape_probe.py somark                SO_MARK on a socket (meshd's routing mark)
    escape_probe.py bpf                   BPF_PROG_GET_NEXT_ID (any bpf(2) use at all)
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import sys

IPPROTO_MPTCP = 262
MSG_FASTOPEN = 0x20000000


def request(host: str, port: int) -> bytes:
    return f"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def read_all(s: socket.socket) -> str:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out.decode(errors="replace")


def http(host: str, port: int, mode: str) -> str:
    if mode == "v4mapped":
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect((f"::ffff:{host}", port))
    elif mode == "fastopen":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.sendto(request(host, port), MSG_FASTOPEN, (host, port))   # blocking: connects
        s.settimeout(10)
        return read_all(s)
    elif mode == "mptcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        s.settimeout(10)
        s.connect((host, port))
    else:
        s = socket.create_connection((host, port), timeout=10)
    s.sendall(request(host, port))
    return read_all(s)


def main(argv: list[str]) -> dict:
    what = argv[0]
    try:
        if what == "http":
            return {"ok": True, "body": http(argv[1], int(argv[2]), argv[3])}
        if what == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(argv[1])
            s.sendall(b"GET /stats HTTP/1.0\r\n\r\n")
            return {"ok": True, "body": read_all(s)[:200]}
        if what == "read":
            with open(argv[1], "rb") as f:
                return {"ok": True, "body": f.read(200).decode(errors="replace")}
        if what == "list":
            return {"ok": True, "body": " ".join(os.listdir(argv[1]))[:200]}
        if what == "cgroup":
            with open(os.path.join(argv[1], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            return {"ok": True, "body": open("/proc/self/cgroup").read()}
        if what == "somark":
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x4D53)
            return {"ok": True, "body": ""}
        if what == "bpf":
            libc = ctypes.CDLL(None, use_errno=True)
            attr = ctypes.create_string_buffer(16)
            if libc.syscall(321, 11, attr, 16) < 0:   # bpf(BPF_PROG_GET_NEXT_ID)
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            return {"ok": True, "body": ""}
    except OSError as e:
        return {"ok": False, "error": f"{errno.errorcode.get(e.errno, e.errno)} {e}"}
    raise SystemExit(f"unknown probe {what}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
