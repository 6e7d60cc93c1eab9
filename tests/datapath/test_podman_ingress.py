"""Inbound into Podman containers: connections to a meshed container's ports
(from the host, from another container, from another host) go through Envoy's
inbound listener inside the container's namespace before the application sees
them, and the application sees the client's real address.

The server is tests/helpers/echo_server.py run inside the container with the
host's Python (helpers/podman.py HOST_USR): "hello <client address>" on TCP_PORT.
"""
from __future__ import annotations

import random
import sys

from conftest import HTTP_PORT, MESHD, TCP_PORT, Mesh, sh, wait_for
from helpers.podman import HOST_USR, Podman

PAYLOAD = random.Random(20261126).randbytes(256 * 1024)
CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rb")
print(f.readline().decode().strip(), flush=True)
"""


def start_server(podman, name: str, workload: str | None = "web", options=()):
    r = podman.run(name, "/usr/bin/python3", "/helpers/echo_server.py", "--tcp", TCP_PORT,
                   "--http", HTTP_PORT, workload=workload, detach=True,
                   options=[*HOST_USR, *options])
    assert r.returncode == 0, r.stderr
    ip = podman.inspect(name)["NetworkSettings"]["IPAddress"]

    def ready():
        r = podman.exec(name, "sh", "-c", f"echo | nc {ip} {TCP_PORT}")
        return r.returncode == 0 and r.stdout.startswith(b"hello")
    wait_for(ready, 20, what="the server in the container")
    return ip


def stats_of(mesh, wid: int, direction: str) -> int:
    return mesh.stats().get(f"tcp.{direction}_tcp_{wid}.downstream_cx_total", 0)


def ids(mesh) -> dict[str, int]:
    return {w["name"]: w["id"] for w in mesh.status()["workloads"]}


def configure(mesh):
    mesh.configure_mesh(protocols={})
    mesh.write("10-workloads.toml", f'[workload.wl]\ncgroup = "{mesh.workload}"\n'
                                    "[workload.web]\n[workload.client]\n")


def test_host_to_container_both_legs_count_and_server_sees_the_client(mesh, podman):
    configure(mesh)
    mesh.start()
    ip = start_server(podman, "srv")
    # the server is enrolled and Envoy listens inside its namespace
    i = ids(mesh)
    wait_for(lambda: any(c["inbound_ports"] for c in mesh.status()["containers"]),
             what="the container's port seen")
    out0, in0 = stats_of(mesh, i["wl"], "outbound"), stats_of(mesh, i["web"], "inbound")
    r = mesh.run_in(sys.executable, "-c", CLIENT, ip, TCP_PORT)     # an enrolled host process
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == "hello 10.88.0.1"           # the bridge address, as direct
    assert stats_of(mesh, i["wl"], "outbound") == out0 + 1          # leg 1: host Envoy outbound
    assert stats_of(mesh, i["web"], "inbound") == in0 + 1           # leg 2: inbound in the container
    # bytes exact through both legs
    r = mesh.curl(f"http://{ip}:{HTTP_PORT}/payload")
    assert r.returncode == 0 and r.stdout == PAYLOAD, r.stderr
    wait_for(lambda: mesh.status()["containers"][0]["counters"]["inbound"] >= 2,
             what="sk_lookup counted")


def test_unmeshed_host_process_to_container_still_goes_through_inbound(mesh, podman):
    configure(mesh)
    mesh.start()
    ip = start_server(podman, "srv")
    i = ids(mesh)
    in0 = stats_of(mesh, i["web"], "inbound")
    r = mesh.run_in(sys.executable, "-c", CLIENT, ip, TCP_PORT, cgroup=mesh.outside)
    assert r.stdout.decode().strip() == "hello 10.88.0.1", r.stderr
    assert stats_of(mesh, i["web"], "inbound") == in0 + 1


def test_container_to_container_both_legs_and_real_client_address(mesh, podman):
    configure(mesh)
    mesh.start()
    ip = start_server(podman, "srv")
    podman.run("cli", "sleep", "300", workload="client", detach=True)
    cli_ip = podman.inspect("cli")["NetworkSettings"]["IPAddress"]
    i = ids(mesh)
    out0, in0 = stats_of(mesh, i["client"], "outbound"), stats_of(mesh, i["web"], "inbound")
    r = podman.exec("cli", "sh", "-c", f"echo ping | nc {ip} {TCP_PORT}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(b"\n")[:2] == [f"hello {cli_ip}".encode(), b"ping"]
    assert stats_of(mesh, i["client"], "outbound") == out0 + 1
    assert stats_of(mesh, i["web"], "inbound") == in0 + 1


def test_unannotated_server_container_is_not_steered(mesh, podman):
    configure(mesh)
    mesh.start()
    ip = start_server(podman, "plain", workload=None)
    i = ids(mesh)
    in0 = stats_of(mesh, i["web"], "inbound")
    r = mesh.run_in(sys.executable, "-c", CLIENT, ip, TCP_PORT, cgroup=mesh.outside)
    assert r.stdout.decode().strip() == "hello 10.88.0.1", r.stderr
    assert stats_of(mesh, i["web"], "inbound") == in0


def test_container_on_host_a_to_container_on_host_b(prefix, cgroups, podman_store):
    """Two meshd instances as two hosts joined by a veth; B publishes its
    container's port. A's container -> A's Envoy (outbound, in A's container
    namespace) -> B -> B's Envoy (inbound, in B's container namespace) -> the app,
    which sees host A's address (the bridge masquerades it, as without meshd)."""
    a, b = Mesh(prefix, cgroups, "a"), Mesh(prefix, cgroups, "b")
    pa = pb = None
    veth = f"{prefix}ab"
    try:
        sh("ip", "link", "add", veth, "netns", a.netns, "type", "veth", "peer", "name",
           veth + "p", "netns", b.netns)
        n = random.randint(1, 250)
        ip_a, ip_b = f"10.232.{n}.1", f"10.232.{n}.2"
        for ns, dev, ip in ((a.netns, veth, ip_a), (b.netns, veth + "p", ip_b)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for m in (a, b):
            configure(m)
            m.start()
        pa = Podman(podman_store, prefix + "a", a.netns, a.config_dir, MESHD[0], a.tmp)
        pb = Podman(podman_store, prefix + "b", b.netns, b.config_dir, MESHD[0], b.tmp)
        start_server(pb, "srv", options=["--publish", f"{ip_b}:18{TCP_PORT % 1000:03d}:{TCP_PORT}"])
        pa.run("cli", "sleep", "300", workload="client", detach=True)
        ia, ib = ids(a), ids(b)
        out0, in0 = stats_of(a, ia["client"], "outbound"), stats_of(b, ib["web"], "inbound")
        r = pa.exec("cli", "sh", "-c", f"echo ping | nc {ip_b} 18{TCP_PORT % 1000:03d}")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split(b"\n")[:2] == [f"hello {ip_a}".encode(), b"ping"]
        assert stats_of(a, ia["client"], "outbound") == out0 + 1    # host A's Envoy
        assert stats_of(b, ib["web"], "inbound") == in0 + 1         # host B's Envoy
    finally:
        for p in (pa, pb):
            if p:
                p.cleanup()
        for m in (a, b):
            m.teardown()
