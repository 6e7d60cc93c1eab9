"""Test isolation: a test's meshd, Envoy and workloads live in the network namespace
the test made, so the suite runs next to a meshd serving the host's namespace. (The
`netns` fixture also checks, after every test, that the host's namespace kept its
policy routing, sysctl and sk_lookup programs.)"""
from __future__ import annotations

import os

from conftest import HTTP_PORT, VIA_ENVOY, host_netns_footprint, netns_path, sh
from meshd import bpfsys


def netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def listening(ports, run=sh) -> set[int]:
    out = run("ss", "-Hltn").stdout
    return {p for p in ports for line in out.splitlines() if f":{p} " in line}


def test_everything_runs_in_the_tests_namespace(meshed, prefix):
    mesh, server = meshed
    ns = netns_inode(netns_path(mesh.netns))
    host = netns_inode("/proc/self/ns/net")
    assert ns != host
    for pid in (mesh.proc.pid, mesh.envoy_pid()):
        assert netns_inode(f"/proc/{pid}/ns/net") == ns, pid
    for cgroup in (mesh.workload, mesh.outside):   # enrolled or not: inside
        r = mesh.run_in("readlink", "/proc/self/ns/net", cgroup=cgroup)
        assert r.stdout.decode().strip() == f"net:[{ns}]"

    ports = {mesh.outbound_port, mesh.inbound_port}
    assert listening(ports, mesh.ns_run) == ports           # Envoy listens in there...
    assert listening(ports) == set()                        # ...not in the host's namespace

    fd = mesh.netns_fd()
    try:
        ours = [i for i in bpfsys.prog_query(fd, bpfsys.SK_LOOKUP)
                if bpfsys.prog_name(i) == "meshd_sk_lookup"]
    finally:
        os.close(fd)
    assert len(ours) == 1
    assert ours[0] not in host_netns_footprint(prefix)["sk_lookup"]
    assert "lookup 19795" in mesh.ns_run("ip", "rule").stdout

    # and the mesh works in there
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo")
    assert r.returncode == 0 and VIA_ENVOY.encode() in r.stdout, r.stderr
