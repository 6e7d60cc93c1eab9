"""Podman containers in the mesh, with real Podman (runc, CNI bridge), real
eBPF and Envoy: the OCI hook enrolls an annotated container before its first
instruction; its first connection goes through Envoy, made from inside the
container's own network namespace; it is un-enrolled when it stops.

Every podman command runs in the mesh's network namespace (the bridge and the
containers' veths live there), with the session's own storage (helpers/podman.py).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from conftest import HTTP_PORT, TCP_PORT, VIA_ENVOY, wait_for

PAYLOAD = random.Random(20261126).randbytes(256 * 1024)   # as tests/helpers/echo_server.py
FULL = os.environ.get("MESHD_TEST_FULL") == "1"
# Ports are plain TCP (Envoy's tcp_proxy: counted per connection) unless a test
# declares HTTP_PORT "http".
RQ = "http.outbound_http.downstream_rq_total"
CX = "tcp.outbound_tcp.downstream_cx_total"


def configure(mesh, workloads="[workload.web]\n", **mesh_extra):
    mesh_extra.setdefault("protocols", {})
    mesh.configure_mesh(**mesh_extra)
    mesh.write("10-workloads.toml", workloads)


def http_get(server_ip: str, path: str, hold: bool = False) -> list[str]:
    """busybox nc half-closes when its stdin ends, and Envoy's HTTP handling ends a
    request at a half-close: with `hold` (a port declared HTTP) stdin stays open
    a second, long enough for the answer."""
    req = f"GET {path} HTTP/1.1\\r\\nHost: {server_ip}:{HTTP_PORT}\\r\\nConnection: close\\r\\n\\r\\n"
    send = f"{{ printf '{req}'; sleep 1; }}" if hold else f"printf '{req}'"
    return ["sh", "-c", f"{send} | nc {server_ip} {HTTP_PORT}"]


def body(r: subprocess.CompletedProcess) -> bytes:
    assert r.returncode == 0, r.stderr
    head, _, rest = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return rest


def echo(r: subprocess.CompletedProcess) -> dict:
    return json.loads(body(r))


def containers(mesh) -> list[dict]:
    st = mesh.status()
    return st.get("containers", []) if st else []


def ctr_links(mesh) -> list[str]:
    return [name for name in os.listdir(os.path.join(mesh.bpffs_dir, "v1", "links"))
            if name.startswith("container:")]


def ctr_listeners(mesh) -> list[str]:
    lds = json.loads(Path(mesh.state_dir, "envoy", "lds.json").read_text())
    return [r["name"] for r in lds["resources"] if r["name"].startswith("meshd_ctr_")]


def envoy_listeners(mesh) -> list[str]:
    """Envoy's own view (the admin API): the listeners it holds now."""
    from meshd.envoy import admin
    from meshd.envoy_config import admin_socket_path
    code, raw = admin.get(admin_socket_path(mesh.state_dir), "/listeners?format=json")
    assert code == 200, raw
    return [ls["name"] for ls in json.loads(raw)["listener_statuses"]]


CONTAINER_MAPS = ("container_netns", "container_addr4", "ctr_inbound_ports", "netns_listeners")


def map_keys(mesh, *names: str) -> dict[str, list]:
    from meshd.datapath import Datapath
    dp = Datapath(mesh.bpffs_dir)
    dp.open()
    try:
        return {n: dp._map(n).keys() for n in names}
    finally:
        dp.close()


def meshd_fds(mesh) -> int:
    return len(os.listdir(f"/proc/{mesh.status()['pid']}/fd"))


def assert_no_container_left(mesh, podman, timeout: float = 30) -> None:
    """Nothing of the test's containers remains: in meshd's status, its pinned
    links, Envoy's files and Envoy itself (the sockets closed: the kernel
    dropped them from netns_listeners), the container maps, the workload ids
    (no workload has a cgroup in these tests), the records, the cgroups."""
    wait_for(lambda: containers(mesh) == [] and ctr_links(mesh) == [] and
             ctr_listeners(mesh) == [], timeout=timeout, what="every container un-enrolled")
    wait_for(lambda: not any(n.startswith("meshd_ctr_") for n in envoy_listeners(mesh)),
             timeout=timeout, what="Envoy closed the containers' listeners")
    names = (*CONTAINER_MAPS, "workload_ids")
    wait_for(lambda: not any(map_keys(mesh, *names).values()), timeout=timeout,
             what="the container map entries gone")
    assert os.listdir(os.path.join(mesh.state_dir, "containers")) == []
    from conftest import cgroup2_root
    left = [os.path.join(d, e) for d, dirs, _ in os.walk(os.path.join(cgroup2_root(),
                                                                      podman.prefix))
            for e in dirs if e.startswith("libpod-")]
    assert left == [], "container cgroups left"


def test_annotated_container_first_connection_goes_through_envoy(mesh, server, podman):
    configure(mesh, protocols={HTTP_PORT: "http"})
    mesh.start()
    rq = mesh.stat(RQ)
    # the container's first instruction is this request: no wait, no retry
    r = podman.run("web", *http_get(server.ip4, "/echo", hold=True), workload="web")
    seen = echo(r)
    assert seen["headers"].get(VIA_ENVOY) == "http"          # Envoy's HTTP handling saw it
    assert seen["client"] == server.host_ip4                  # as direct: the bridge's masquerade
    assert mesh.stat(RQ) == rq + 1
    # bytes are exact through Envoy
    r = podman.run("web2", *http_get(server.ip4, "/payload", hold=True), workload="web")
    assert body(r) == PAYLOAD
    assert mesh.stat(RQ) == rq + 2
    assert "enrolled into workload web" in mesh.log_text()


def test_first_tcp_connection_is_counted_by_envoy_bytes_exact(mesh, server, podman):
    configure(mesh)
    mesh.start()
    cx = mesh.stat(CX)
    r = podman.run("web", *http_get(server.ip4, "/payload"), workload="web")
    assert body(r) == PAYLOAD
    assert mesh.stat(CX) == cx + 1
    wid = mesh.status()["workloads"][0]["id"]
    assert mesh.stats()[f"tcp.outbound_tcp_{wid}.downstream_cx_tx_bytes_total"] == len(
        r.stdout)


def test_unannotated_container_goes_direct(mesh, server, podman):
    configure(mesh)
    mesh.start()
    cx = mesh.stat(CX)
    seen = echo(podman.run("plain", *http_get(server.ip4, "/echo")))
    assert seen["client"] == server.host_ip4
    assert mesh.stat(CX) == cx
    assert containers(mesh) == []


def test_tcp_through_envoy_from_the_containers_own_address(mesh, podman, cgroups):
    """A server on the bridge (in the mesh's namespace) sees the container's own
    address: Envoy connects from inside the container's namespace."""
    configure(mesh)
    mesh.start()
    srv = mesh.echo_server("--tcp", TCP_PORT, cgroup=mesh.outside)
    try:
        podman.run("web", "sleep", "300", workload="web", detach=True)
        ip = podman.inspect("web")["NetworkSettings"]["IPAddress"]
        cx = mesh.stat("tcp.outbound_tcp.downstream_cx_total")
        r = podman.exec("web", "sh", "-c", f"echo ping | nc 10.88.0.1 {TCP_PORT}")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split(b"\n")[:2] == [f"hello {ip}".encode(), b"ping"]
        assert mesh.stat("tcp.outbound_tcp.downstream_cx_total") == cx + 1
        wait_for(lambda: containers(mesh), what="the container in the status")
        st = containers(mesh)
        assert [(c["workload"], c["addresses"], bool(c["enrolled_since"])) for c in st] == [
            ("web", [ip], True)]
        assert st[0]["name"] == f"{podman.prefix}-web"          # from conmon's command line
        wait_for(lambda: containers(mesh)[0]["counters"]["redirected"] >= 1, what="counters")
    finally:
        srv.kill()


def test_undeclared_workload_starts_unmeshed_with_a_warning(mesh, server, podman):
    configure(mesh)
    mesh.start()
    cx = mesh.stat(CX)
    r = podman.run("nope", *http_get(server.ip4, "/echo"), workload="nosuch")
    assert echo(r)["client"] == server.host_ip4              # started, and works directly
    assert mesh.stat(CX) == cx
    assert "workload nosuch is not declared" in mesh.log_text()
    podman.run("nope2", "sleep", "300", workload="nosuch", detach=True)
    wait_for(lambda: any("not declared" in c["error"] for c in containers(mesh)),
             what="the warning in the status")
    assert "NOT MESHED: workload nosuch is not declared" in mesh.cli("status").stdout


def test_meshd_stopped_container_starts_direct_then_is_enrolled(mesh, server, podman):
    configure(mesh)
    mesh.start()
    mesh.kill(signal.SIGTERM)     # stopped: the data path and Envoy stay, nobody enrolls
    cx = mesh.stat(CX)
    r = podman.run("web", "sleep", "300", workload="web", detach=True)   # starts: fail open
    assert r.returncode == 0, r.stderr
    echo(podman.exec("web", *http_get(server.ip4, "/echo")))
    assert mesh.stat(CX) == cx
    mesh.start()                  # back: it reads the hook's record and enrolls it
    wait_for(lambda: [c["enrolled_since"] > 0 for c in containers(mesh)] == [True],
             what="the container enrolled")
    wait_for(lambda: envoy_listeners(mesh) and any(
        n.startswith("meshd_ctr_") for n in envoy_listeners(mesh)), what="its listener")
    echo(podman.exec("web", *http_get(server.ip4, "/echo")))
    assert mesh.stat(CX) == cx + 1


def test_stop_unenrolls_and_restart_loses_nothing(mesh, server, podman):
    configure(mesh)
    mesh.start()
    podman.run("a", "sleep", "300", workload="web", detach=True)
    podman.run("b", "sleep", "300", workload="web", detach=True)
    assert len(ctr_links(mesh)) == 16 and len(ctr_listeners(mesh)) == 4
    links_before = sorted(ctr_links(mesh))
    mesh.kill()                                     # SIGKILL while containers run
    mesh.start()
    assert sorted(ctr_links(mesh)) == links_before  # adopted, not lost
    assert [c["enrolled_since"] > 0 for c in containers(mesh)] == [True, True]
    cx = mesh.stat(CX)
    echo(podman.exec("a", *http_get(server.ip4, "/echo")))
    assert mesh.stat(CX) == cx + 1
    # stop one while meshd is down: the restarted meshd finds it gone
    mesh.kill()
    podman.rm("a")
    mesh.start()
    wait_for(lambda: len(containers(mesh)) == 1, what="a forgotten")
    assert len(ctr_links(mesh)) == 8 and len(ctr_listeners(mesh)) == 2
    podman.rm("b")                                  # and one while meshd runs
    wait_for(lambda: containers(mesh) == [] and ctr_links(mesh) == [], what="b un-enrolled")
    assert ctr_listeners(mesh) == []
    wait_for(lambda: not any(n.startswith("meshd_ctr_") for n in envoy_listeners(mesh)),
             what="Envoy dropped the listeners")
    assert os.listdir(os.path.join(mesh.state_dir, "containers")) == []


def test_host_network_container_is_meshed_like_a_host_process(mesh, server, podman):
    configure(mesh)
    mesh.start()
    cx = mesh.stat(CX)
    r = podman.run("host", *http_get(server.ip4, "/echo"), workload="web",
                   options=["--network", "host"])
    echo(r)
    assert mesh.stat(CX) == cx + 1
    assert ctr_listeners(mesh) == []                # Envoy's own listeners serve it


def test_concurrent_starts_all_enrolled_and_nothing_left(mesh, server, podman):
    n = 50 if FULL else 8
    configure(mesh)
    mesh.start()
    t0 = time.monotonic()
    procs = [subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{mesh.netns}", *podman.store.base, "--hooks-dir",
         podman.hooks_dir, "run", "-d", "--name", podman.name(f"c{i}"), "--cgroup-parent",
         f"/{podman.prefix}/ctr", "--annotation", "io.meshd.workload=web",
         "localhost/meshd-test/busybox:latest", "sleep", "600"],
        env=podman.store.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(n)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    # figures for bench/README.md ("Podman at scale"), not thresholds
    print(f"\n{n} concurrent podman run -d: all returned after {time.monotonic() - t0:.1f} s; "
          f"meshd's 'listeners not up' lines: "
          f"{mesh.log_text().count('Envoy' + chr(39) + 's listeners inside it are not up')}")
    # the hook returned for each: every one is enrolled, with its listener
    assert len(ctr_listeners(mesh)) == 2 * n and len(ctr_links(mesh)) == 8 * n
    wait_for(lambda: len(containers(mesh)) == n, what="the status (written every second)")
    st = containers(mesh)
    assert all(c["enrolled_since"] for c in st), st
    assert len({c["addresses"][0] for c in st}) == n
    cx = mesh.stat(CX)
    for i in (0, n - 1):
        echo(podman.exec(f"c{i}", *http_get(server.ip4, "/echo")))
    assert mesh.stat(CX) == cx + 2
    podman.cleanup()
    assert_no_container_left(mesh, podman)


def test_start_stop_cycles_leak_nothing(mesh, server, podman):
    cycles = 200 if FULL else 5
    configure(mesh)
    mesh.start()
    # one cycle first: whatever meshd opens once (the hook socket's peers,
    # Envoy's admin connection) is open before counting
    assert podman.run("cy", "true", workload="web").returncode == 0
    assert_no_container_left(mesh, podman)
    fds = meshd_fds(mesh)
    t0 = time.monotonic()
    for i in range(cycles):
        r = podman.run(f"cy{i}", "true", workload="web")
        assert r.returncode == 0, r.stderr
    took = time.monotonic() - t0
    assert_no_container_left(mesh, podman)
    assert meshd_fds(mesh) <= fds
    print(f"\n{cycles} start/stop cycles in {took:.0f} s; meshd's open files {fds} before, "
          f"{meshd_fds(mesh)} after")
