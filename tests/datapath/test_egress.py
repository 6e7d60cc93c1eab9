"""Transparent egress, end to end: real eBPF, real Envoy, a server in its own
network namespace, clients inside and outside an enrolled cgroup."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

from conftest import (EXCLUDED_PORT, HTTP_PORT, SSH_PORT, TCP_PORT, VIA_ENVOY, free_port,
                      kill_cgroup, wait_for)

PAYLOAD = random.Random(20261126).randbytes(256 * 1024)   # as tests/helpers/echo_server.py

PEER_CLIENT = r"""
import socket, sys, json
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=10)
hello = s.makefile("rb").readline().decode().strip()
print(json.dumps({"peer": list(s.getpeername()[:2]), "hello": hello}))
"""

# Holds one connection open: prints the server's hello, then waits for stdin to close.
HOLD_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print(s.makefile("rb").readline().decode().strip(), flush=True)
sys.stdin.read()
"""
RQ_TOTAL = "http.outbound_http.downstream_rq_total"
CX_TCP = "tcp.outbound_tcp.downstream_cx_total"


def headers(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["headers"]




def test_curl_in_workload_goes_through_envoy(meshed):
    mesh, server = meshed
    before = mesh.stat("http.outbound_http.downstream_rq_total")
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/payload")
    assert r.returncode == 0, r.stderr
    assert r.stdout == PAYLOAD                      # byte-exact through Envoy
    assert mesh.stat("http.outbound_http.downstream_rq_total") == before + 1
    assert mesh.stat("cluster.meshd_original_dst.upstream_rq_total") >= 1

    echo = json.loads(mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo").stdout)
    assert echo["headers"][VIA_ENVOY] == "http"     # added by Envoy's HTTP handling...
    assert "x-request-id" not in echo["headers"]    # ...which adds nothing else
    assert echo["headers"]["host"] == f"{server.ip4}:{HTTP_PORT}"


def test_python_client_sees_original_peer(meshed):
    mesh, server = meshed
    r = mesh.run_in(sys.executable, "-c", PEER_CLIENT, server.ip4, TCP_PORT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["peer"] == [server.ip4, TCP_PORT]     # getpeername hides Envoy
    assert out["hello"] == f"hello {server.host_ip4}"
    assert mesh.stat("tcp.outbound_tcp.downstream_cx_total") >= 1
    # the BPF counters (refreshed into the status every second) saw it too
    wait_for(lambda: mesh.workload_counter("redirected") >= 1 and
             mesh.workload_counter("answered") >= 1 and
             mesh.workload_counter("peername") >= 1, what="BPF counters")


def test_outside_cgroup_goes_direct(meshed):
    mesh, server = meshed
    before = mesh.stat("http.outbound_http.downstream_rq_total")
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo", cgroup=mesh.outside)
    assert r.returncode == 0, r.stderr
    assert VIA_ENVOY not in json.loads(r.stdout)["headers"]
    assert mesh.stat("http.outbound_http.downstream_rq_total") == before


def test_ipv6_egress(meshed):
    mesh, server = meshed
    before = mesh.stat("http.outbound_http.downstream_rq_total")
    r = mesh.curl(f"http://[{server.ip6}]:{HTTP_PORT}/payload")
    assert r.returncode == 0, r.stderr
    assert r.stdout == PAYLOAD
    assert mesh.stat("http.outbound_http.downstream_rq_total") == before + 1
    cx = mesh.stat(CX_TCP)
    r = mesh.run_in(sys.executable, "-c", PEER_CLIENT, server.ip6, TCP_PORT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["peer"] == [server.ip6, TCP_PORT]   # getpeername hides Envoy
    wait_for(lambda: mesh.stat(CX_TCP) == cx + 1, what="Envoy's IPv6 TCP connection")


def test_excluded_port_goes_direct(mesh, server):
    mesh.configure(exclude_outbound_ports=[22, EXCLUDED_PORT])
    mesh.start()
    before = mesh.stat("http.outbound_http.downstream_rq_total")
    r = mesh.curl(f"http://{server.ip4}:{EXCLUDED_PORT}/echo")
    assert r.returncode == 0, r.stderr
    assert VIA_ENVOY not in json.loads(r.stdout)["headers"]
    assert mesh.stat("http.outbound_http.downstream_rq_total") == before
    # ...while the other port of the same server is still meshed
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo")
    assert VIA_ENVOY in json.loads(r.stdout)["headers"]


def test_per_workload_excluded_cidr(mesh, server):
    mesh.configure(workload_extra=f'exclude_outbound_cidrs = ["{server.ip4}/32"]\n')
    mesh.start()
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo")
    assert VIA_ENVOY not in json.loads(r.stdout)["headers"]
    r = mesh.curl(f"http://[{server.ip6}]:{HTTP_PORT}/echo")   # IPv6 still meshed
    assert VIA_ENVOY in json.loads(r.stdout)["headers"]
    wait_for(lambda: mesh.workload_counter("excluded") >= 1, what="excluded counter")


def test_workload_by_unit_name(mesh, server, cgroups, prefix):
    # systemd puts a unit's processes in <slice>/<unit>; meshd finds it by name
    unit = f"{prefix}-web.service"
    rel = cgroups.make(f"{unit}")            # /<prefix>/<unit>: not a slice, must not match
    slice_rel = f"/{prefix}.slice/{unit}"
    os.makedirs(cgroups.path(slice_rel))
    try:
        mesh.configure_mesh()
        mesh.write("10-workloads.toml", f'[workload.web]\nunit = "{unit}"\n')
        mesh.start()
        wl = mesh.status()["workloads"][0]
        assert wl["cgroup"] == slice_rel and wl["enrolled_since"] > 0
        r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo", cgroup=slice_rel)
        assert VIA_ENVOY in json.loads(r.stdout)["headers"]
        r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo", cgroup=rel)
        assert VIA_ENVOY not in json.loads(r.stdout)["headers"]
    finally:
        mesh.kill()
        kill_cgroup(cgroups.path(f"/{prefix}.slice"))


def test_entries_are_deleted_when_connections_close(meshed):
    mesh, server = meshed
    assert mesh.status()["datapath"]["tracked_connections"] == 0
    cx = mesh.stat(CX_TCP)
    client = mesh.popen_in(sys.executable, "-c", HOLD_CLIENT, server.ip4, TCP_PORT,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == f"hello {server.host_ip4}"
        assert mesh.stat(CX_TCP) == cx + 1                          # through Envoy
        wait_for(lambda: mesh.status()["datapath"]["tracked_connections"] >= 1,
                 what="the open connection tracked")
    finally:
        client.stdin.close()
        client.wait(10)
    for _ in range(5):
        assert mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo").returncode == 0
    wait_for(lambda: mesh.workload_counter("closed") >= 6, what="closed counter")
    wait_for(lambda: mesh.status()["datapath"]["tracked_connections"] == 0,
             what="no tracked connections left")


def test_miss_fails_loudly_and_is_counted(meshed):
    """A connection reaching Envoy without an original destination (here: straight
    to its port from outside the mesh) is refused and counted, never forwarded."""
    mesh, _ = meshed
    before = mesh.stat("tcp.outbound_miss.downstream_cx_total")
    r = mesh.curl(f"http://127.0.0.1:{mesh.outbound_port}/", cgroup=mesh.outside)
    assert r.returncode != 0        # reset: nothing answered
    assert mesh.stat("tcp.outbound_miss.downstream_cx_total") == before + 1
    wait_for(lambda: mesh.status()["counters"].get("miss", 0) >= 1, what="miss counter")
    assert "without an original destination" in mesh.cli("status").stdout


def test_sd_notify_ready_only_when_serving(mesh, server):
    """Type=notify: READY=1 arrives once Envoy's listener is in the data path."""
    sock_path = os.path.join(mesh.tmp, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    mesh.configure()
    os.environ["NOTIFY_SOCKET"] = sock_path
    try:
        mesh.start(wait=False)
    finally:
        del os.environ["NOTIFY_SOCKET"]
    msgs = []
    while not any("READY=1" in m for m in msgs):
        msgs.append(sock.recv(4096).decode())
    sock.close()
    # at READY=1, traffic is already meshed: the very next request goes through Envoy
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo")
    assert VIA_ENVOY in json.loads(r.stdout)["headers"]
    assert any(m.startswith("STATUS=") and "1/1 workloads enrolled" in m for m in msgs), msgs


def test_envoy_counts_each_workload_separately(mesh, server, cgroups):
    """Each workload connects from its own 127.77.0.<id> source, so Envoy's
    per-workload filter chains count its requests, connections and bytes."""
    other = cgroups.make("wl2")
    mesh.configure_mesh()
    mesh.write("10-workloads.toml", f'[workload.wl]\ncgroup = "{mesh.workload}"\n'
                                    f'[workload.wl2]\ncgroup = "{other}"\n')
    mesh.start()
    for _ in range(3):
        assert mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/payload").stdout == PAYLOAD
    assert mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo", cgroup=other).returncode == 0
    r = mesh.run_in(sys.executable, "-c", PEER_CLIENT, server.ip4, TCP_PORT, cgroup=other)
    assert r.returncode == 0, r.stderr

    def envoy_of(name):
        return next(w for w in mesh.status()["workloads"] if w["name"] == name)["envoy"]
    wait_for(lambda: envoy_of("wl")["requests"] == 3 and envoy_of("wl2")["requests"] == 1
             and envoy_of("wl2")["connections"] == 2, what="per-workload Envoy numbers")
    wl, wl2 = envoy_of("wl"), envoy_of("wl2")
    assert wl["connections"] == 3
    assert wl["bytes_received"] > 3 * len(PAYLOAD) > wl2["bytes_received"]
    assert wl["bytes_sent"] > 0 and wl2["bytes_sent"] > 0
    out = mesh.cli("status").stdout
    assert "envoy: connections=3 requests=3" in out


def test_loopback_destinations_pass_direct(meshed):
    """A workload's connections to 127.0.0.1 and ::1 never enter Envoy."""
    mesh, _ = meshed
    port = free_port()
    mesh.echo_server("--http", port, cgroup=mesh.outside)
    before = mesh.stat(RQ_TOTAL)
    for host in ("127.0.0.1", "[::1]"):
        assert VIA_ENVOY not in headers(mesh.curl(f"http://{host}:{port}/echo"))
    assert mesh.stat(RQ_TOTAL) == before


def test_global_excluded_cidr(mesh, server):
    mesh.configure(exclude_outbound_cidrs=[f"{server.ip4}/32"])
    mesh.start()
    before = mesh.stat(RQ_TOTAL)
    assert VIA_ENVOY not in headers(mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo"))
    assert mesh.stat(RQ_TOTAL) == before
    # another address of the same server is still meshed
    assert VIA_ENVOY in headers(mesh.curl(f"http://[{server.ip6}]:{HTTP_PORT}/echo"))
    assert mesh.stat(RQ_TOTAL) == before + 1
    wait_for(lambda: mesh.workload_counter("excluded") >= 1, what="excluded counter")


def test_per_workload_excluded_port(mesh, server, cgroups):
    """exclude_outbound_ports of one workload: its connections to that port go
    direct, another workload's to the same port are meshed."""
    other = cgroups.make("wl2")
    mesh.configure_mesh()
    mesh.write("10-workloads.toml", f'[workload.wl]\ncgroup = "{mesh.workload}"\n'
                                    f"exclude_outbound_ports = [{EXCLUDED_PORT}]\n"
                                    f'[workload.wl2]\ncgroup = "{other}"\n')
    mesh.start()
    url = f"http://{server.ip4}:{EXCLUDED_PORT}/echo"
    before = mesh.stat(RQ_TOTAL)
    assert VIA_ENVOY not in headers(mesh.curl(url))
    assert mesh.stat(RQ_TOTAL) == before
    assert VIA_ENVOY in headers(mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo"))
    assert VIA_ENVOY in headers(mesh.curl(url, cgroup=other))
    assert mesh.stat(RQ_TOTAL) == before + 2


def test_ssh_port_excluded_outbound_by_default(meshed):
    mesh, server = meshed
    assert mesh.status()["mesh"]["exclude_outbound_ports"] == [SSH_PORT]   # nothing configured
    before = mesh.stat(RQ_TOTAL)
    assert VIA_ENVOY not in headers(mesh.curl(f"http://{server.ip4}:{SSH_PORT}/echo"))
    assert VIA_ENVOY not in headers(mesh.curl(f"http://[{server.ip6}]:{SSH_PORT}/echo"))
    assert mesh.stat(RQ_TOTAL) == before
    assert VIA_ENVOY in headers(mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo"))


def test_the_cgroup_and_everything_below_is_meshed(meshed):
    """A process in a child cgroup of the workload's, made before or after meshd
    enrolled it, is steered too."""
    mesh, server = meshed
    before = mesh.stat(RQ_TOTAL)
    child = mesh.cg.make(mesh.workload.rsplit("/", 1)[1] + "/child")
    grandchild = mesh.cg.make(mesh.workload.rsplit("/", 1)[1] + "/child/grand")
    for cg in (child, grandchild):
        assert VIA_ENVOY in headers(mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo",
                                                   cgroup=cg))
    assert mesh.stat(RQ_TOTAL) == before + 2
    # ...but not a sibling of the workload cgroup
    assert VIA_ENVOY not in headers(mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo",
                                                   cgroup=mesh.outside))


def test_status_json(meshed):
    """`meshd status --json`: valid JSON with the workload and its counters."""
    mesh, server = meshed
    assert mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo").returncode == 0

    def status_json():
        r = mesh.cli("status", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)
    st = wait_for(lambda: (st := status_json())["workloads"][0]["counters"].get("redirected")
                  and st["workloads"][0]["envoy"]["requests"] and st,
                  what="the request counted in meshd status --json")
    assert st["state"] == "running" and st["pid"] == mesh.proc.pid
    wl, = st["workloads"]
    assert wl["name"] == "wl" and wl["cgroup"] == mesh.workload
    assert wl["counters"]["redirected"] >= 1 and wl["envoy"]["requests"] == 1
