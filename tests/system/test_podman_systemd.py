"""Podman containers in the mesh under a real systemd: the guest's Podman (runc, the
systemd cgroup manager, containers in machine.slice/libpod-<id>.scope, the CNI
bridge), with the OCI hook exactly as the .deb installs it
(/usr/share/containers/oci/hooks.d/meshd.json, one of Podman's default hook
directories). The tests run in order on one booted guest.
"""
from __future__ import annotations

import json

import pytest

from conftest import SERVER
from helpers.common import wait_for
from meshd.envoy import total
from meshd.envoy_config import admin_socket_path

ADMIN = admin_socket_path("/run/meshd")   # the packaged unit's state directory

IMAGE = "localhost/meshd-test/busybox:latest"
ANNOTATION = "io.meshd.workload"
# The guest's Podman: runc with the systemd cgroup manager (Debian's default
# manager; crun would do too in this pure cgroup2 guest, runc is what the rest of
# the suite uses), vfs storage (the guest's root is an overlay: no overlay on it),
# this machine's lower hard limits, no pids limit (the guest's cgroup2 has no pids
# controller here).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
pids_limit = 0
keyring = false
[engine]
runtime = "runc"
cgroup_manager = "systemd"
"""
STORAGE_CONF = """\
[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
"""
# busybox nc ends when its stdin does: stdin stays open a second, for the whole answer
REQUEST = ("{ printf 'GET /echo HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'; "
           f"sleep 1; }} | nc {SERVER} 8080")


@pytest.fixture(scope="module")
def podman(guest):
    """The guest with both packages installed, meshd running with one bare
    [workload.web] (selected by annotation), Podman configured and a busybox image."""
    g = guest
    g.add_server_host()
    g.sh("mkdir -p /etc/meshd /etc/containers && "
         "printf '[workload.web]\\n' > /etc/meshd/10-test.toml && "
         f"cat > /etc/containers/containers.conf <<'EOF'\n{CONTAINERS_CONF}EOF\n"
         f"cat > /etc/containers/storage.conf <<'EOF'\n{STORAGE_CONF}EOF\n")
    g.install_debs()
    assert g.sh("systemctl is-active meshd").stdout.strip() == "active"
    g.sh("test -f /usr/share/containers/oci/hooks.d/meshd.json")
    g.sh("mkdir -p /run/mtimage/bin /run/mtimage/tmp && cp /bin/busybox /run/mtimage/bin/ && "
         "for a in sh nc cat sleep printf echo true; do ln -s busybox /run/mtimage/bin/$a; done && "
         f"tar -C /run/mtimage -c . | podman import - {IMAGE} >/dev/null && rm -r /run/mtimage")
    return g


def outbound_connections(g) -> int:
    out = g.sh(f"curl -sf --unix-socket {ADMIN} http://admin/stats").stdout
    stats = {k: int(v) for k, _, v in (l.partition(": ") for l in out.splitlines())
             if v.strip().isdigit()}
    return total(stats, "tcp.outbound_tcp.downstream_cx_total")


def run(g, *args: str, workload: str | None = None, check=True, timeout=120):
    ann = f"--annotation {ANNOTATION}={workload} " if workload else ""
    return g.sh(f"podman run {ann}{' '.join(args)}", check=check, timeout=timeout)


def answered(r) -> dict:
    """The echo server's JSON answer to REQUEST, from a container's output."""
    assert r.returncode == 0, r.stdout + r.stderr
    head, _, body = r.stdout.partition("\n\n")     # text mode: \r\n read as \n
    assert head.startswith("HTTP/1.1 200"), head
    return json.loads(body)


def status_containers(g) -> list[dict]:
    return json.loads(g.sh("meshd status --json").stdout).get("containers", [])


def leftovers(g) -> dict:
    """What meshd keeps per container: link pins, Envoy listeners, hook records,
    and the containers' scopes systemd made."""
    links = g.sh("ls /sys/fs/bpf/meshd/v1/links").stdout.split()
    listeners = json.loads(g.sh(f"curl -sf --unix-socket {ADMIN} "
                                "'http://admin/listeners?format=json'").stdout)
    return {
        "links": [n for n in links if n.startswith("container:")],
        "listeners": [ls["name"] for ls in listeners["listener_statuses"]
                      if ls["name"].startswith("meshd_ctr_")],
        "records": g.sh("ls -A /run/meshd/containers", check=False).stdout.split(),
        "scopes": g.sh("ls /sys/fs/cgroup/machine.slice 2>/dev/null | grep libpod",
                       check=False).stdout.split(),
    }


def test_unannotated_container_goes_direct(podman):
    g = podman
    before = outbound_connections(g)
    answered(run(g, "--rm", IMAGE, "sh", "-c", f'"{REQUEST}"'))
    assert outbound_connections(g) == before


def test_annotated_containers_first_connection_goes_through_envoy(podman):
    g = podman
    before = outbound_connections(g)
    # the container's first instruction is this connection: no wait, no retry
    seen = answered(run(g, "--rm", IMAGE, "sh", "-c", f'"{REQUEST}"', workload="web"))
    assert seen["client"] == "10.240.1.1"     # as direct: the guest's masquerade on the bridge
    assert outbound_connections(g) == before + 1
    entries = [json.loads(line) for line in g.sh(
        "journalctl -u meshd -o json --no-pager WORKLOAD=web").stdout.splitlines()]
    enrolled = [e for e in entries if "enrolled into workload web" in e["MESSAGE"]]
    # under the systemd cgroup manager: the container's scope in machine.slice
    assert enrolled and enrolled[-1]["CGROUP"].startswith("/machine.slice/libpod-"), enrolled



def test_meshd_stopped_container_starts_direct_then_is_enrolled(podman):
    g = podman
    g.sh("systemctl stop meshd")
    try:
        try:
            before = outbound_connections(g)
            run(g, "-d", "--name", "mtlate", IMAGE, "sleep", "300", workload="web")
            answered(g.sh(f"podman exec mtlate sh -c \"{REQUEST}\"", check=False))
            assert outbound_connections(g) == before              # direct: nobody enrolled it
        finally:
            g.sh("systemctl start meshd", timeout=180)
        wait_for(lambda: [c["enrolled_since"] > 0 for c in status_containers(g)] == [True],
                 what="the container enrolled by the restarted meshd")
        (ctr,) = status_containers(g)
        assert ctr["workload"] == "web" and ctr["cgroup"].startswith("/machine.slice/libpod-"), ctr
        answered(g.sh(f"podman exec mtlate sh -c \"{REQUEST}\""))
        assert outbound_connections(g) == before + 1
    finally:
        g.sh("podman rm -f -t 0 mtlate", check=False, timeout=120)
    wait_for(lambda: status_containers(g) == [], what="the container un-enrolled")


def test_container_run_by_a_unit_is_selected_by_unit(podman):
    """A container run by a unit `podman generate systemd --new` wrote (conmon in the
    unit's cgroup, the container in its own scope), selected by `unit =` with no
    annotation: enrolled by discovery, its connections then go through Envoy."""
    g = podman
    unit = "container-mtunit.service"
    g.sh(f"printf '[workload.svc]\\nunit = \"{unit}\"\\n' > /etc/meshd/20-unit.toml")
    try:
        g.sh(f"podman create --name mtunit {IMAGE} sleep 300 >/dev/null && "
             f"podman generate systemd --new --name mtunit > /etc/systemd/system/{unit} && "
             f"podman rm mtunit >/dev/null && systemctl daemon-reload && systemctl start {unit}",
             timeout=120)

        def mine():
            return [c for c in status_containers(g) if c["name"] == "mtunit"]
        wait_for(lambda: [(c["workload"], c["selected_by"], c["enrolled_since"] > 0)
                          for c in mine()] == [("svc", "unit", True)],
                 what="the unit's container enrolled by discovery")
        assert mine()[0]["cgroup"].startswith("/machine.slice/libpod-"), mine()
        before = outbound_connections(g)
        answered(g.sh(f"podman exec mtunit sh -c \"{REQUEST}\""))
        assert outbound_connections(g) == before + 1
    finally:
        g.sh(f"systemctl stop {unit}; rm -f /etc/systemd/system/{unit} /etc/meshd/20-unit.toml; "
             "systemctl daemon-reload", check=False, timeout=120)
    wait_for(lambda: not mine(), what="the unit's container un-enrolled")


def test_removed_containers_leave_nothing(podman):
    g = podman
    names = [f"mtc{i}" for i in range(4)]
    g.sh(" & ".join(f"podman run -d --name {n} --annotation {ANNOTATION}=web {IMAGE} sleep 300 "
                    ">/dev/null" for n in names) + " & wait", timeout=180)
    wait_for(lambda: sum(c["enrolled_since"] > 0 for c in status_containers(g)) == 4,
             what="4 containers enrolled")
    assert len(leftovers(g)["links"]) > 0
    g.sh(f"podman rm -f -t 0 {' '.join(names)}", timeout=120)
    wait_for(lambda: status_containers(g) == [], what="every container un-enrolled")
    wait_for(lambda: leftovers(g) == {"links": [], "listeners": [], "records": [], "scopes": []},
             what="nothing left of the containers")
