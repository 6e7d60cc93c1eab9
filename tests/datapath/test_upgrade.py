"""The data path's life cycle: compiled outside the daemon, upgraded without a
hitch, and at its size limits.

- The daemon never has BCC (libbcc) mapped: a short-lived child compiles and
  pins, the daemon adopts the pins through libbpf.
- Installing another build of the programs (other sources, other map sizes)
  under traffic keeps the pinned links and the maps, swaps the programs with
  BPF_LINK_UPDATE, and loses no connection and no request.
- Maps sized below the load: connections beyond mesh.max_connections go direct,
  counted and logged; none is lost.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from conftest import HTTP_PORT, REPO, VIA_ENVOY, free_port, reap, wait_for
from meshd import bpfsys

# A workload process holding connections open: it connects `n` times to
# (host, port), checks the server's hello and one echoed line on each, and prints
# one JSON line: how many work and how many show the real peer (getpeername).
# Each later line on stdin makes it check every connection again the same way.
HOLDER = r"""
import json, resource, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, n + 100))
conns, failed = [], 0
for i in range(n):
    try:
        conns.append(socket.create_connection((host, port), timeout=20))
    except OSError:
        failed += 1
files = [c.makefile("rb") for c in conns]
hello = [f.readline().startswith(b"hello ") for f in files]
def report(word):
    ok = peer = 0
    for c, f, h in zip(conns, files, hello):
        try:
            c.sendall(word)
            if h and f.readline() == word:
                ok += 1
                peer += c.getpeername()[:2] == (host, port)
        except OSError:
            pass
    print(json.dumps({"connected": len(conns), "failed": failed, "ok": ok, "peer": peer}),
          flush=True)
report(b"first\n")
for line in sys.stdin:
    report(line.strip().encode() + b"\n")
"""

# The server side for HOLDER: hello, then echo, for thousands of connections in
# one process (selectors, no thread per connection).
HOLD_SERVER = r"""
import resource, selectors, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (19000, 19000))
ls = socket.socket(socket.AF_INET6)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
ls.bind(("::", int(sys.argv[1])))
ls.listen(4096)
sel = selectors.DefaultSelector()
sel.register(ls, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is ls:
            c, addr = ls.accept()
            c.sendall(b"hello " + addr[0].removeprefix("::ffff:").encode() + b"\n")
            sel.register(c, selectors.EVENT_READ)
            continue
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if data:
            s.sendall(data)
        else:
            sel.unregister(s)
            s.close()
"""

# New connections, one request each, one JSON line per request, until stdin closes.
REQUEST_LOOP = r"""
import http.client, json, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
end = time.time() + 120          # a bound, should the test never close stdin
while not stop.is_set() and time.time() < end:
    rec = {"t0": time.time()}
    try:
        c = http.client.HTTPConnection(host, port, timeout=5)
        c.request("GET", "/echo")
        body = json.loads(c.getresponse().read())
        c.close()
        rec["envoy"] = "x-forwarded-proto" in body["headers"]
    except Exception as e:
        rec["error"] = repr(e)
    print(json.dumps(rec), flush=True)
    time.sleep(0.005)
"""


def daemon_maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def pinned(mesh, kind: str) -> dict[str, int]:
    """Pin name -> the kernel's id of the object (links: the link's program id)."""
    d = os.path.join(mesh.bpffs_dir, "v1", kind)
    out = {}
    for name in sorted(os.listdir(d)):
        fd = bpfsys.obj_get(os.path.join(d, name))
        try:
            out[name] = (bpfsys.link_info(fd).prog_id if kind == "links" else
                         bpfsys.map_info(fd).id if kind == "maps" else bpfsys.prog_id(fd))
        finally:
            os.close(fd)
    return out


def link_ids(mesh) -> dict[str, int]:
    d = os.path.join(mesh.bpffs_dir, "v1", "links")
    out = {}
    for name in sorted(os.listdir(d)):
        fd = bpfsys.obj_get(os.path.join(d, name))
        try:
            out[name] = bpfsys.link_info(fd).id
        finally:
            os.close(fd)
    return out


def another_build(mesh, tag: str) -> str:
    """A copy of bpf/ whose text (so its hash) differs harmlessly."""
    d = os.path.join(mesh.tmp, f"bpf-{tag}")
    shutil.copytree(REPO / "bpf", d)
    with open(os.path.join(d, "meshd.h"), "a") as f:
        f.write(f"\n#define MESHD_TEST_BUILD_{tag} 1\n")
    return d


def restart(mesh, monkeypatch=None, bpf_dir: str | None = None):
    """SIGTERM and start again; with bpf_dir, the new meshd's sources are there."""
    mesh.kill(signal.SIGTERM)
    if bpf_dir:
        monkeypatch.setenv("MESHD_BPF_DIR", bpf_dir)   # meshd's environment is ours
    mesh.start()


def test_daemon_never_loads_bcc_cold_or_warm(meshed):
    mesh, server = meshed
    assert "data path loaded" in mesh.log_text()           # cold: nothing was pinned
    assert mesh.status()["datapath"]["adopted"] is False
    maps = daemon_maps(mesh.proc.pid)
    assert "libbpf" in maps                                 # it works on the pins...
    assert "libbcc" not in maps                             # ...without the compiler
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo")
    assert r.returncode == 0 and VIA_ENVOY in json.loads(r.stdout)["headers"]

    restart(mesh)                                           # warm: adopts the pins
    assert mesh.status()["datapath"]["adopted"] is True
    assert "libbcc" not in daemon_maps(mesh.proc.pid)


def test_another_build_is_installed_under_traffic_losing_nothing(meshed, monkeypatch):
    mesh, server = meshed
    envoy_pid = mesh.envoy_pid()
    links, maps, progs = link_ids(mesh), pinned(mesh, "maps"), pinned(mesh, "links")
    echo_port = free_port()
    srv = server.popen(sys.executable, "-c", HOLD_SERVER, echo_port, stdout=subprocess.PIPE,
                       text=True)
    holder = loop = None
    try:
        assert srv.stdout.readline().strip() == "ready"
        holder = mesh.popen_in(sys.executable, "-c", HOLDER, server.ip4, echo_port, "20",
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = json.loads(holder.stdout.readline())
        assert first == {"connected": 20, "failed": 0, "ok": 20, "peer": 20}, first
        wait_for(lambda: mesh.status()["datapath"]["tracked_connections"] >= 20,
                 what="the held connections in cookie_dst")
        loop = mesh.popen_in(sys.executable, "-c", REQUEST_LOOP, server.ip4, HTTP_PORT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # build 2: other sources, same maps; build 3: also other map sizes
        builds = [(another_build(mesh, "2"), {}), (another_build(mesh, "3"),
                                                   {"max_connections": 4096})]
        windows = []
        for bpf_dir, sizes in builds:
            if sizes:
                mesh.configure(**sizes)
            t0 = time.time()
            restart(mesh, monkeypatch, bpf_dir)
            windows.append((t0, time.time()))
            assert "data path upgraded" in mesh.log_text()
            st = mesh.status()
            assert st["datapath"]["adopted"] is False and st["envoy"]["pid"] == envoy_pid
            now = pinned(mesh, "links")
            assert link_ids(mesh) == links                  # the same links, never detached...
            assert all(now[n] != progs[n] for n in links)   # ...running the new programs
            progs = now
            new_maps = pinned(mesh, "maps")
            changed = {n for n in maps if new_maps[n] != maps[n]}
            # sources only: every map kept; sizes: only the connection maps replaced
            assert changed == ({"cookie_dst", "tuple_dst", "envoy_upstreams"} if sizes
                               else set()), changed
            maps = new_maps
            # the held connections still work and still show their real peer
            # (getpeername answered from the migrated cookie_dst by the new program)
            holder.stdin.write(f"after-{len(changed)}\n")
            holder.stdin.flush()
            again = json.loads(holder.stdout.readline())
            assert again == {"connected": 20, "failed": 0, "ok": 20, "peer": 20}, again
            assert mesh.status()["datapath"]["tracked_connections"] >= 20
        out, _ = loop.communicate(timeout=30)
    finally:
        for p in (holder, loop, srv):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        reap()
    recs = [json.loads(line) for line in out.splitlines()]
    assert len(recs) > 50
    assert [r for r in recs if "error" in r] == []
    assert all(r["envoy"] for r in recs)                    # none went direct
    # requests were made while each new build was compiled and swapped in
    assert all(any(a < r["t0"] < b for r in recs) for a, b in windows), windows
    counters = mesh.status()["workloads"][0]["counters"]
    assert counters["miss"] == 0 and counters["fail_open"] == 0, counters
    assert counters["table_full"] == 0, counters
    assert mesh.status()["counters"]["miss"] == 0


def test_connections_beyond_max_connections_go_direct_counted_none_lost(mesh, server):
    """1,024 tracked connections against 5,000 held open by 5 workload processes."""
    mesh.configure(max_connections=1024)
    mesh.start()
    port = free_port()
    srv = server.popen(sys.executable, "-c", HOLD_SERVER, port, stdout=subprocess.PIPE,
                       text=True)
    holders = []
    try:
        assert srv.stdout.readline().strip() == "ready"
        for _ in range(5):
            holders.append(mesh.popen_in(sys.executable, "-c", HOLDER, server.ip4, port, "1000",
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True))
        reports = [json.loads(h.stdout.readline()) for h in holders]
        assert all(r == {"connected": 1000, "failed": 0, "ok": 1000, "peer": 1000}
                   for r in reports), reports
        # the status file may be a tick old (written mid-burst): wait until it has
        # counted every connection, tracked or not
        st = wait_for(lambda: (s := mesh.status()) and s["workloads"][0]["counters"][
            "table_full"] + s["datapath"]["tracked_connections"] >= 5000 and s,
            what="every connection counted in status")
        via_envoy = mesh.stat("tcp.outbound_tcp.downstream_cx_total")   # none closed yet
        tracked = st["datapath"]["tracked_connections"]
        counters = st["workloads"][0]["counters"]
        assert tracked == via_envoy and 1000 <= tracked <= 1024, (tracked, via_envoy)
        assert counters["table_full"] == 5000 - via_envoy, counters
        assert counters["redirected"] == via_envoy and counters["miss"] == 0, counters
        assert "connection maps are full (mesh.max_connections = 1024" in mesh.log_text()
        for h in holders:                                   # every one still works
            h.stdin.write("again\n")
            h.stdin.flush()
        assert all(json.loads(h.stdout.readline())["ok"] == 1000 for h in holders)
    finally:
        for p in holders + [srv]:
            if p.poll() is None:
                p.kill()
                p.wait()
        reap()
    # closed: the entries go with the connections, and there is room again
    wait_for(lambda: mesh.status()["datapath"]["tracked_connections"] == 0, timeout=20,
             what="entries deleted on close")
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo")
    assert r.returncode == 0 and VIA_ENVOY in json.loads(r.stdout)["headers"]
