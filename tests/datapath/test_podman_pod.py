"""Podman pods in the mesh: the containers of one pod share one network
namespace, so Envoy's listeners there belong to the namespace, not to a
container. Both annotated containers are meshed, traffic from each goes
through Envoy, removing one keeps the other working, removing both leaves
nothing. Real Podman (runc, CNI bridge), real eBPF and Envoy.
"""
from __future__ import annotations

import sys

from conftest import TCP_PORT, wait_for
from test_podman_ingress import CLIENT, stats_of
from test_podman import (CX, assert_no_container_left, configure, containers, ctr_links,
                         ctr_listeners, echo, envoy_listeners, http_get, map_keys)


def ctr_envoy_listeners(mesh) -> list[str]:
    return sorted(n for n in envoy_listeners(mesh) if n.startswith("meshd_ctr_"))


def container_netns_entries(mesh) -> list:
    return map_keys(mesh, "container_netns")["container_netns"]


def test_pod_containers_share_the_namespaces_listeners(mesh, server, podman, cgroups):
    configure(mesh)
    mesh.start()
    pod = podman.pod_create("pod")
    for name in ("a", "b"):
        r = podman.run_in_pod(pod, name, "sleep", "300", workload="web")
        assert r.returncode == 0, r.stderr
    wait_for(lambda: len(containers(mesh)) == 2, what="both in the status")
    st = containers(mesh)
    assert [(c["workload"], c["error"], bool(c["enrolled_since"])) for c in st] == [
        ("web", "", True)] * 2, st
    assert st[0]["addresses"] == st[1]["addresses"]            # one namespace,
    assert st[0]["network"] == st[1]["network"], st             # one path (Podman's bind mount)
    # one listener pair for the namespace; each container's cgroup hooks, and
    # sk_lookup linked to the namespace once
    assert len(ctr_listeners(mesh)) == 2
    assert len(ctr_links(mesh)) == 7 + 8
    wait_for(lambda: len(ctr_envoy_listeners(mesh)) == 2, what="Envoy's listeners up")
    listeners = ctr_envoy_listeners(mesh)
    assert len(container_netns_entries(mesh)) == 1

    def through_envoy(name):
        cx = mesh.stat(CX)
        echo(podman.exec(name, *http_get(server.ip4, "/echo")))
        assert mesh.stat(CX) == cx + 1, f"{name}'s connection did not go through Envoy"

    through_envoy("a")
    through_envoy("b")
    # a meshd restart adopts the namespace as it was: same links, same listeners
    links = sorted(ctr_links(mesh))
    mesh.kill()
    mesh.start()
    assert sorted(ctr_links(mesh)) == links and ctr_envoy_listeners(mesh) == listeners
    through_envoy("a")
    # inbound: a server in b, called from the host (the mesh's namespace), is
    # steered into Envoy's inbound listener in the pod's namespace
    srv = podman.cmd("exec", "-d", f"{podman.prefix}-b", "sh", "-c",
                     f"while true; do echo hello | nc -l -p {TCP_PORT}; done")
    assert srv.returncode == 0, srv.stderr
    ip, wid = st[0]["addresses"][0], mesh.status()["workloads"][0]["id"]
    wait_for(lambda: all(TCP_PORT in c["inbound_ports"] for c in containers(mesh)),
             what="the pod's port seen by sockops")
    inb = stats_of(mesh, wid, "inbound")
    r = mesh.run_in(sys.executable, "-c", CLIENT, ip, TCP_PORT, cgroup=mesh.outside)
    assert r.returncode == 0 and r.stdout.strip() == b"hello", r
    assert stats_of(mesh, wid, "inbound") == inb + 1

    podman.rm("a")           # b keeps the namespace's listeners, unchanged
    wait_for(lambda: len(containers(mesh)) == 1, what="a un-enrolled")
    assert len(ctr_links(mesh)) == 8 and len(ctr_listeners(mesh)) == 2
    assert ctr_envoy_listeners(mesh) == listeners
    through_envoy("b")

    podman.rm("b")
    wait_for(lambda: containers(mesh) == [] and ctr_links(mesh) == [], what="b un-enrolled")
    podman.cmd("pod", "rm", "-f", "-t", "0", pod, check=True)
    assert_no_container_left(mesh, podman)


def test_pod_containers_of_two_workloads(mesh, server, podman):
    """One namespace counts into one workload: a second workload in the same
    pod is reported, not meshed, and works directly."""
    configure(mesh, workloads="[workload.web]\n[workload.db]\n")
    mesh.start()
    pod = podman.pod_create("pod")
    assert podman.run_in_pod(pod, "a", "sleep", "300", workload="web").returncode == 0
    assert podman.run_in_pod(pod, "b", "sleep", "300", workload="db").returncode == 0
    wait_for(lambda: len(containers(mesh)) == 2, what="both in the status")
    by_name = {c["name"]: c for c in containers(mesh)}
    a, b = by_name[f"{podman.prefix}-a"], by_name[f"{podman.prefix}-b"]
    assert a["enrolled_since"] and not a["error"]
    assert not b["enrolled_since"]
    assert "shares its network namespace with container" in b["error"], b
    assert "NOT MESHED" in mesh.cli("status").stdout
    cx = mesh.stat(CX)
    echo(podman.exec("b", *http_get(server.ip4, "/echo")))    # direct
    assert mesh.stat(CX) == cx
    echo(podman.exec("a", *http_get(server.ip4, "/echo")))    # through Envoy
    assert mesh.stat(CX) == cx + 1
