"""Podman containers in the mesh under a real systemd: the guest's Podman (runc, the
systemd cgroup manager, containers in machine.slice/libpod-<id>.scope, the CNI
bridge), with the OCI hook exactly as the .deb installs it
(/usr/share/containers/oci/hooks.d/meshd.json, one of Podman's default hook
directories). The tests run in order on one booted guest.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import time

import pytest

from conftest import SERVER
from helpers.common import wait_for
from meshd import bpfsys
from meshd.envoy import total
from meshd.envoy_config import admin_socket_path

ADMIN = admin_socket_path("/run/meshd")   # the packaged unit's state directory
FULL = os.environ.get("MESHD_TEST_FULL") == "1"

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


def envoy_stats(g, admin: str = ADMIN) -> dict[str, int]:
    out = g.sh(f"curl -sf --unix-socket {admin} http://admin/stats").stdout
    return {k: int(v) for k, _, v in (l.partition(": ") for l in out.splitlines())
            if v.strip().isdigit()}


def outbound_connections(g) -> int:
    return total(envoy_stats(g), "tcp.outbound_tcp.downstream_cx_total")


def run(g, *args: str, workload: str | None = None, check=True, timeout=120):
    ann = f"--annotation {ANNOTATION}={workload} " if workload else ""
    return g.sh(f"podman run {ann}{' '.join(args)}", check=check, timeout=timeout)


def answered(r) -> dict:
    """The echo server's JSON answer to REQUEST, from a container's output."""
    assert r.returncode == 0, r.stdout + r.stderr
    head, _, body = r.stdout.partition("\n\n")     # text mode: \r\n read as \n
    assert head.startswith("HTTP/1.1 200"), head
    return json.loads(body)


def status(g) -> dict:
    return json.loads(g.sh("meshd status --json").stdout)


def status_containers(g) -> list[dict]:
    return status(g).get("containers", [])


def leftovers(g) -> dict:
    """What meshd keeps per container: link pins, Envoy listeners, hook records, the
    container maps' entries, and the containers' scopes (and pods' slices) systemd made."""
    links = g.sh("ls /sys/fs/bpf/meshd/v1/links").stdout.split()
    listeners = json.loads(g.sh(f"curl -sf --unix-socket {ADMIN} "
                                "'http://admin/listeners?format=json'").stdout)
    return {
        "links": [n for n in links if n.startswith("container:")],
        "listeners": [ls["name"] for ls in listeners["listener_statuses"]
                      if ls["name"].startswith("meshd_ctr_")],
        "records": g.sh("ls -A /run/meshd/containers", check=False).stdout.split(),
        "map entries": [f"{n}: {k}" for n, k in map_entries(g).items() if k],
        "scopes": g.sh("find /sys/fs/cgroup/machine.slice -name '*libpod*' 2>/dev/null",
                       check=False).stdout.split(),
    }


CONTAINER_MAPS = ("container_netns", "container_addr4", "ctr_inbound_ports", "netns_listeners")


def map_entries(g) -> dict[str, int]:
    """How many entries each container map holds, read through the guest's pins from
    the host (its bpffs directory is the host's g.bpffs; the guest has no bpftool)."""
    out = {}
    for name in CONTAINER_MAPS:
        fd = bpfsys.obj_get(f"{g.bpffs}/meshd/v1/maps/{name}")
        try:
            out[name] = len(bpfsys.map_keys(fd, bpfsys.map_info(fd).key_size))
        finally:
            os.close(fd)
    return out


def nothing_left(g, timeout: float = 30) -> None:
    wait_for(lambda: status_containers(g) == [], timeout=timeout,
             what="every container un-enrolled")
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not any(leftovers(g).values()), timeout=timeout,
                 what="nothing left of the containers")
    left = leftovers(g)
    assert not any(left.values()), left


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

    def mine():
        return [c for c in status_containers(g) if c["name"] == "mtunit"]
    with meshd_config(g, f'[workload.svc]\nunit = "{unit}"\n', name="20-unit.toml"):
        try:
            g.sh(f"podman create --name mtunit {IMAGE} sleep 300 >/dev/null && "
                 f"podman generate systemd --new --name mtunit > /etc/systemd/system/{unit} && "
                 f"podman rm mtunit >/dev/null && systemctl daemon-reload && "
                 f"systemctl start {unit}", timeout=120)
            wait_for(lambda: [(c["workload"], c["selected_by"], c["enrolled_since"] > 0)
                              for c in mine()] == [("svc", "unit", True)],
                     what="the unit's container enrolled by discovery")
            assert mine()[0]["cgroup"].startswith("/machine.slice/libpod-"), mine()
            before = outbound_connections(g)
            answered(g.sh(f"podman exec mtunit sh -c \"{REQUEST}\""))
            assert outbound_connections(g) == before + 1
        finally:
            g.sh(f"systemctl stop {unit}; rm -f /etc/systemd/system/{unit}; "
                 "systemctl daemon-reload", check=False, timeout=120)
    wait_for(lambda: not mine(), what="the unit's container un-enrolled")


def test_concurrent_starts_all_enrolled_then_nothing_left(podman):
    g = podman
    n = 50 if FULL else 8
    names = [f"mtc{i}" for i in range(n)]
    try:
        t0 = time.monotonic()
        g.sh(" & ".join(f"podman run -d --name {c} --annotation {ANNOTATION}=web {IMAGE} "
                        "sleep 600 >/dev/null" for c in names) + " & wait", timeout=600)
        print(f"\n{n} concurrent annotated podman run -d: all returned after "
              f"{time.monotonic() - t0:.1f} s")
        # the hook returned for each: every one is enrolled, with its listener pair
        left = leftovers(g)
        assert (len(left["links"]), len(left["listeners"])) == (8 * n, 2 * n), left
        assert map_entries(g)["container_netns"] == n
        wait_for(lambda: len(status_containers(g)) == n, what="the status (written every second)")
        st = status_containers(g)
        assert all(c["enrolled_since"] for c in st), st
        assert len({c["addresses"][0] for c in st}) == n
        before = outbound_connections(g)
        for c in (names[0], names[-1]):
            answered(g.sh(f"podman exec {c} sh -c \"{REQUEST}\"", check=False))
        assert outbound_connections(g) == before + 2
    finally:
        g.sh(f"podman rm -f -t 0 {' '.join(names)}", check=False, timeout=600)
    nothing_left(g, timeout=60)


# -- more of the datapath tier's scenarios, here under systemd's cgroup manager --------

PAYLOAD_SHA256 = hashlib.sha256(random.Random(20261126).randbytes(256 * 1024)).hexdigest()
TOOLS = "localhost/meshd-test/tools:latest"
CTR_TCP, CTR_HTTP = 7000, 7080      # a containerized echo_server.py's ports


def request(host: str, port: int, path: str, hold: bool) -> str:
    """A busybox shell line: GET path; `hold` keeps stdin open a second (a port
    declared HTTP: Envoy ends a request at a half-close)."""
    req = f"printf 'GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'"
    return f"{{ {req}; sleep 1; }} | nc {host} {port}" if hold else f"{req} | nc {host} {port}"


def payload_sha256(line: str) -> str:
    """The sha256 of the last 256 KiB a line prints (echo_server's /payload body)."""
    return f"{line} | busybox tail -c {256 * 1024} | busybox sha256sum"


def tools_image(g, podman: str = "podman") -> str:
    """The test image plus /lib and /lib64 (so the guest's Python runs inside, with
    its /usr bound: tests/helpers/echo_server.py as a containerized server) and
    /pause (a pod's infra container: Podman's own pause image needs a registry)."""
    if g.sh(f"{podman} image exists {TOOLS}", check=False).returncode != 0:
        g.sh("mkdir -p /run/mttools/bin /run/mttools/tmp && cp /bin/busybox /run/mttools/bin/ && "
             "for a in sh nc sleep printf echo; do ln -s busybox /run/mttools/bin/$a; done && "
             "ln -s usr/lib /run/mttools/lib && ln -s usr/lib64 /run/mttools/lib64 && "
             "printf '#!/bin/sh\\nexec sleep 100000\\n' > /run/mttools/pause && "
             "chmod 755 /run/mttools/pause && "
             f"tar -C /run/mttools -c . | {podman} import - {TOOLS} >/dev/null && "
             "rm -r /run/mttools")
    return TOOLS


@contextlib.contextmanager
def meshd_config(g, text: str, name: str = "20-mt.toml"):
    """/etc/meshd/<name> holding `text` while the block runs. Written by rename (one
    inotify event, one reload); each change waits for meshd's status to list the
    files in force, and fails if the change was rejected."""
    def applied(present: bool):
        st = status(g)
        assert not st["config_errors"], st["config_errors"]
        return any(f.endswith(f"/{name}") for f in st["config_files"]) == present
    g.sh(f"cat > /etc/meshd/.{name}.new <<'EOF'\n{text}EOF\n"
         f"mv /etc/meshd/.{name}.new /etc/meshd/{name}")
    try:
        wait_for(lambda: applied(True), what=f"meshd's reload with {name}")
        yield
    finally:
        g.sh(f"rm -f /etc/meshd/{name}")
        wait_for(lambda: applied(False), what=f"meshd's reload without {name}")


def workload_ids(g) -> dict[str, int]:
    return {w["name"]: w["id"] for w in status(g)["workloads"]}


def chain_connections(g, wid: int, direction: str, admin: str = ADMIN) -> int:
    """Connections one workload's Envoy chain counted: direction inbound or outbound."""
    return envoy_stats(g, admin).get(f"tcp.{direction}_tcp_{wid}.downstream_cx_total", 0)


def ip_of(g, name: str, podman: str = "podman") -> str:
    return g.sh(f"{podman} inspect -f '{{{{.NetworkSettings.IPAddress}}}}' {name}").stdout.strip()


def test_annotated_containers_request_carries_envoys_headers(podman):
    """The server host's port 2222 declared "http": Envoy's HTTP handling serves the
    container's request (its headers reach the server), bytes exact."""
    g = podman
    rq = "http.outbound_http.downstream_rq_total"
    with meshd_config(g, '[mesh]\nprotocols = { 2222 = "http" }\n'):
        before = total(envoy_stats(g), rq)
        line = request(SERVER, 2222, "/echo", hold=True)
        seen = answered(run(g, "--rm", IMAGE, "sh", "-c", f'"{line}"', workload="web"))
        assert seen["headers"].get("x-forwarded-proto") == "http", seen   # Envoy's HTTP handling
        assert seen["client"] == "10.240.1.1"
        assert total(envoy_stats(g), rq) == before + 1
        line = payload_sha256(request(SERVER, 2222, "/payload", hold=True))
        r = run(g, "--rm", IMAGE, "sh", "-c", f'"{line}"', workload="web")
        assert r.stdout.split()[0] == PAYLOAD_SHA256, r.stdout + r.stderr
        assert total(envoy_stats(g), rq) == before + 2
    nothing_left(g)


def test_host_and_container_to_container_through_both_legs(podman):
    """A server in an annotated container (the guest's Python, echo_server.py) on the
    bridge, reached from an enrolled host unit and from another annotated container:
    each connection counted by the client's outbound chain and the server's inbound
    chain (inside the server's namespace), bytes exact, and the server sees the
    client's own address (the bridge's for the host, as direct)."""
    g = podman
    img = tools_image(g)
    config = '[workload.client]\n[workload.hostcli]\nunit = "mthostcli.service"\n'
    g.sh("systemd-run --unit=mthostcli.service sleep infinity")
    try:
        with meshd_config(g, config):
            wait_for(lambda: [w["enrolled_since"] > 0 for w in status(g)["workloads"]
                              if w["name"] == "hostcli"] == [True], what="the host unit enrolled")
            run(g, "-d", "--name", "mtsrv", "-v", "/usr:/usr:ro", "-v", "/mnt/meshd:/helpers:ro",
                img, "python3", "/helpers/echo_server.py", "--tcp", str(CTR_TCP),
                "--http", str(CTR_HTTP), workload="web")
            run(g, "-d", "--name", "mtcli", img, "sleep", "300", workload="client")
            srv, cli = ip_of(g, "mtsrv"), ip_of(g, "mtcli")
            wait_for(lambda: [sorted(c["inbound_ports"]) for c in status_containers(g)
                              if c["name"] == "mtsrv"] == [[CTR_TCP, CTR_HTTP]],
                     what="the server's ports seen by sockops")
            ids = workload_ids(g)

            def legs():
                return (chain_connections(g, ids["hostcli"], "outbound"),
                        chain_connections(g, ids["client"], "outbound"),
                        chain_connections(g, ids["web"], "inbound"))
            h0, c0, in0 = legs()
            # host -> container
            r = g.in_unit("mthostcli.service", f"echo ping | busybox nc {srv} {CTR_TCP}")
            assert r.stdout.split("\n")[:2] == ["hello 10.88.0.1", "ping"], r.stdout
            assert legs() == (h0 + 1, c0, in0 + 1)
            r = g.in_unit("mthostcli.service",
                          f"curl -sf http://{srv}:{CTR_HTTP}/payload | sha256sum")
            assert r.stdout.split()[0] == PAYLOAD_SHA256
            assert legs() == (h0 + 2, c0, in0 + 2)
            # container -> container
            r = g.sh(f"podman exec mtcli sh -c 'echo ping | nc {srv} {CTR_TCP}'")
            assert r.stdout.split("\n")[:2] == [f"hello {cli}", "ping"], r.stdout
            assert legs() == (h0 + 2, c0 + 1, in0 + 3)
            line = payload_sha256(request(srv, CTR_HTTP, "/payload", hold=False))
            r = g.sh(f"podman exec mtcli sh -c \"{line}\"")
            assert r.stdout.split()[0] == PAYLOAD_SHA256, r.stdout
            assert legs() == (h0 + 2, c0 + 2, in0 + 4)
            g.sh("podman rm -f -t 0 mtsrv mtcli", timeout=120)
            nothing_left(g)
    finally:
        g.sh("podman rm -f -t 0 mtsrv mtcli; systemctl stop mthostcli.service", check=False,
             timeout=120)


def test_label_selected_container_is_enrolled_within_a_second(podman):
    g = podman
    label = "io.meshd.test/app"
    with meshd_config(g, f'[workload.lbl]\ncontainer_labels = {{ "{label}" = "mtlbl" }}\n'):
        try:
            run(g, "-d", "--name", "mtother", "--label", f"{label}=other", IMAGE, "sleep", "300")
            run(g, "-d", "--name", "mtlbl", "--label", f"{label}=mtlbl", IMAGE, "sleep", "300")
            returned = time.time()
            wait_for(lambda: [c["enrolled_since"] > 0 for c in status_containers(g)] == [True],
                     what="the label-selected container enrolled")
            (c,) = status_containers(g)                 # the other label is not selected
            took = c["enrolled_since"] - returned
            print(f"\nlabel-selected container enrolled {took:.2f} s after `podman run -d` "
                  "returned (systemd cgroup manager)")
            assert took <= 1.0                          # the "within a second"
            assert (c["name"], c["workload"], c["selected_by"]) == ("mtlbl", "lbl", "label"), c
            assert c["cgroup"].startswith("/machine.slice/libpod-"), c
            # `meshd status` reads it from D-Bus here (the guest has a system bus)
            assert "selected by label" in g.sh("meshd status").stdout
            before = outbound_connections(g)
            answered(g.sh(f"podman exec mtlbl sh -c \"{REQUEST}\"", check=False))
            assert outbound_connections(g) == before + 1
            answered(g.sh(f"podman exec mtother sh -c \"{REQUEST}\"", check=False))   # direct
            assert outbound_connections(g) == before + 1
        finally:
            g.sh("podman rm -f -t 0 mtlbl mtother", check=False, timeout=120)
        nothing_left(g)


def test_pod_containers_share_one_listener_pair_then_nothing_left(podman):
    """Two annotated containers of one pod (machine.slice/machine-libpod_pod_<pod>.slice/):
    one namespace, so one listener pair and one sk_lookup link; both through Envoy."""
    g = podman
    img = tools_image(g)
    try:
        g.sh(f"podman pod create --name mtpod --infra-image {img} --infra-command /pause "
             "--infra-name mtpod-infra >/dev/null", timeout=120)
        for name in ("mtpa", "mtpb"):
            run(g, "-d", "--pod", "mtpod", "--name", name, img, "sleep", "300", workload="web")
        wait_for(lambda: len(status_containers(g)) == 2, what="both in the status")
        st = status_containers(g)
        assert [(c["workload"], c["error"], c["enrolled_since"] > 0) for c in st] == [
            ("web", "", True)] * 2, st
        assert st[0]["addresses"] == st[1]["addresses"] and st[0]["network"] == st[1]["network"]
        slices = {re.fullmatch(r"(/machine\.slice/machine-libpod_pod_[0-9a-f]{64}\.slice)"
                               r"/libpod-[0-9a-f]{64}\.scope", c["cgroup"]) for c in st}
        assert None not in slices and len({m[1] for m in slices}) == 1, st
        left = leftovers(g)
        assert (len(left["links"]), len(left["listeners"])) == (7 + 8, 2), left
        assert map_entries(g)["container_netns"] == 1
        for name in ("mtpa", "mtpb"):
            before = outbound_connections(g)
            answered(g.sh(f"podman exec {name} sh -c \"{REQUEST}\"", check=False))
            assert outbound_connections(g) == before + 1, f"{name} did not go through Envoy"
    finally:
        g.sh("podman pod rm -f -t 0 mtpod", check=False, timeout=120)
    nothing_left(g)


def meshd_fds(g) -> int:
    return int(g.sh("ls /proc/$(systemctl show -p MainPID --value meshd)/fd | wc -l").stdout)


def test_start_stop_cycles_leak_nothing(podman):
    g = podman
    cycles = 200 if FULL else 10
    # one cycle first: whatever meshd opens once is open before counting
    run(g, "--rm", IMAGE, "true", workload="web")
    nothing_left(g)
    fds = meshd_fds(g)
    cursor = g.sh("journalctl -u meshd -n 0 --show-cursor --no-pager").stdout.split("cursor: ")[1]
    t0 = time.monotonic()
    g.sh(f"for i in $(seq {cycles}); do podman run --rm --annotation {ANNOTATION}=web {IMAGE} "
         "true || exit 1; done", timeout=60 + 5 * cycles)
    took = time.monotonic() - t0
    enrolled = g.sh(f"journalctl -u meshd --after-cursor='{cursor.strip()}' -o cat --no-pager "
                    "| grep -c 'enrolled into workload web'", check=False).stdout
    assert int(enrolled) == cycles          # the hook enrolled every one before it ran
    nothing_left(g)
    assert meshd_fds(g) <= fds
    print(f"\n{cycles} start/stop cycles in {took:.0f} s; meshd's open files {fds} before, "
          f"{meshd_fds(g)} after")


# Host B: a network namespace in the guest behind a veth, served by a second meshd
# (the .deb's /usr/bin/meshd as a transient unit) with its own Podman (storage,
# run root, CNI network on its own subnet, the packaged hook re-pointed at B's
# config). Addresses: the veth 10.242.0.0/24, B's containers 10.243.0.0/24.
HOST_B = "mthostb"
VETH_A, VETH_B = "10.242.0.1", "10.242.0.2"
B_SUBNET = "10.243.0.0/24"
B_DIR = f"/run/{HOST_B}"
B_CONFIG = f"{B_DIR}/etc"
B_STATE = f"{B_DIR}/run"
B_BPFFS = f"/sys/fs/bpf/{HOST_B}"
B_STORE = f"/var/lib/{HOST_B}"
B_CNI = json.dumps({"cniVersion": "0.4.0", "name": HOST_B, "plugins": [
    {"type": "bridge", "bridge": f"{HOST_B}0", "isGateway": True, "ipMasq": True,
     "hairpinMode": True, "ipam": {"type": "host-local", "routes": [{"dst": "0.0.0.0/0"}],
                                   "ranges": [[{"subnet": B_SUBNET, "gateway": "10.243.0.1"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": True}},
    {"type": "firewall"}]})
B_MESH = f"""\
[mesh]
bpffs_dir = "{B_BPFFS}"
state_dir = "{B_STATE}"
cgroup_root = "/{HOST_B}.slice"
netns = "/run/netns/{HOST_B}"
[workload.web]
"""
# nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup tree from runc
IN_B = f"nsenter --net=/run/netns/{HOST_B}"
PODMAN_B = (f"CONTAINERS_CONF={B_DIR}/containers.conf {IN_B} podman "
            f"--root {B_STORE}/root --runroot {B_DIR}/runroot --storage-driver vfs "
            f"--hooks-dir {B_DIR}/hooks.d")


def start_host_b(g) -> None:
    """B's namespace, veth and route (B's containers reached through B), B's meshd
    running, B's Podman with its image."""
    g.sh(f"ip netns add {HOST_B} && ip link add mtva type veth peer name mtvb && "
         f"ip link set mtvb netns {HOST_B} && ip addr add {VETH_A}/24 dev mtva && "
         f"ip link set mtva up && ip -n {HOST_B} addr add {VETH_B}/24 dev mtvb && "
         f"ip -n {HOST_B} link set mtvb up && ip -n {HOST_B} link set lo up && "
         f"ip route add {B_SUBNET} via {VETH_B} && "
         f"{IN_B} sysctl -qw net.ipv4.ip_forward=1")
    g.sh(f"mkdir -p {B_CONFIG} {B_STATE} {B_DIR}/hooks.d {B_DIR}/cni {B_DIR}/tmp {B_STORE} "
         f"{B_BPFFS} && chmod 755 {B_DIR} {B_STATE} && "
         f"cat > {B_CONFIG}/00-mesh.toml <<'EOF'\n{B_MESH}EOF\n"
         f"cat > {B_DIR}/cni/{HOST_B}.conflist <<'EOF'\n{B_CNI}\nEOF\n"
         f"cat > {B_DIR}/containers.conf <<'EOF'\n{CONTAINERS_CONF}"
         f'tmp_dir = "{B_DIR}/tmp"\n[network]\nnetwork_config_dir = "{B_DIR}/cni"\n'
         f'default_network = "{HOST_B}"\nEOF\n'
         f"sed 's#\"/etc/meshd\"#\"{B_CONFIG}\"#' /usr/share/containers/oci/hooks.d/meshd.json "
         f"> {B_DIR}/hooks.d/meshd.json && grep -q {B_CONFIG} {B_DIR}/hooks.d/meshd.json")
    g.sh(f"systemd-run --unit={HOST_B}.service -p NetworkNamespacePath=/run/netns/{HOST_B} "
         f"/usr/bin/meshd run --config-dir {B_CONFIG}")
    wait_for(lambda: status_b(g).get("state") == "running", timeout=120, what="host B's meshd")
    tools_image(g, PODMAN_B)


def status_b(g) -> dict:
    r = g.sh(f"cat {B_STATE}/status.json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout else {}


def stop_host_b(g) -> None:
    g.sh(f"{PODMAN_B} rm -af -t 0; {PODMAN_B} system reset -f", check=False, timeout=120)
    g.sh(f"systemctl stop {HOST_B}.service; "
         f"{IN_B} meshd cleanup --config-dir {B_CONFIG}; "
         f"systemctl stop {HOST_B}.slice; ip route del {B_SUBNET}; ip link del mtva; "
         f"ip netns del {HOST_B}; rm -rf {B_BPFFS} {B_STORE} {B_DIR} /var/lib/cni/networks/{HOST_B}",
         check=False, timeout=120)


def test_container_on_host_a_to_container_on_host_b(podman):
    """A container on host A (the guest, its packaged meshd) to a server container on
    host B (a second meshd serving its own namespace, its own Podman) through B's
    container address: A's Envoy counts the outbound leg, B's Envoy the inbound leg,
    bytes exact, and the server sees the client's address as it does without meshd
    on A (A's bridge masquerades it to A's veth address)."""
    g = podman
    admin_b = admin_socket_path(B_STATE)
    try:
        start_host_b(g)
        g.sh(f"{PODMAN_B} run -d --name mtbsrv -v /usr:/usr:ro -v /mnt/meshd:/helpers:ro "
             f"--annotation {ANNOTATION}=web {TOOLS} python3 /helpers/echo_server.py "
             f"--tcp {CTR_TCP} --http {CTR_HTTP} >/dev/null", timeout=120)
        srv = ip_of(g, "mtbsrv", PODMAN_B)
        assert srv.startswith("10.243.0."), srv
        wait_for(lambda: [sorted(c["inbound_ports"]) for c in status_b(g)["containers"]
                          if c["name"] == "mtbsrv"] == [[CTR_TCP, CTR_HTTP]],
                 what="B's server enrolled, its ports seen by sockops")
        run(g, "-d", "--name", "mtadirect", IMAGE, "sleep", "300")
        run(g, "-d", "--name", "mtacli", IMAGE, "sleep", "300", workload="web")
        web_a = workload_ids(g)["web"]
        web_b = {w["name"]: w["id"] for w in status_b(g)["workloads"]}["web"]

        def legs():
            return (chain_connections(g, web_a, "outbound"),
                    chain_connections(g, web_b, "inbound", admin_b))

        def hello(ctr: str) -> str:
            r = g.sh(f"podman exec {ctr} sh -c 'echo ping | nc {srv} {CTR_TCP}'")
            first, second = r.stdout.split("\n")[:2]
            assert first.startswith("hello ") and second == "ping", r.stdout
            return first.removeprefix("hello ")

        out0, in0 = legs()
        direct = hello("mtadirect")                 # A unmeshed: only B's inbound leg
        assert direct == VETH_A, direct             # A's masquerade, B's inbound preserving it
        assert legs() == (out0, in0 + 1)
        assert hello("mtacli") == direct            # meshed on A: the same address
        assert legs() == (out0 + 1, in0 + 2)
        line = payload_sha256(request(srv, CTR_HTTP, "/payload", hold=False))
        r = g.sh(f"podman exec mtacli sh -c \"{line}\"")
        assert r.stdout.split()[0] == PAYLOAD_SHA256, r.stdout + r.stderr
        assert legs() == (out0 + 2, in0 + 3)
        print(f"\nA's container -> B's container {srv}: the server saw {direct} "
              "(direct and meshed), both legs counted, 256 KiB exact")
    finally:
        g.sh("podman rm -f -t 0 mtadirect mtacli", check=False, timeout=120)
        stop_host_b(g)
    nothing_left(g)
