"""Least privilege, checked on a running mesh (README "Security"):

- Envoy runs as meshd-envoy with exactly the capabilities meshd/envoy/identity.py
  grants (ambient, bounding, effective) and no_new_privs;
- its configuration is readable by its group only, the directory it writes (admin
  socket, logs) by it and root only;
- a workload process (an unprivileged user in an enrolled cgroup) cannot reach
  Envoy's admin API, and cannot get its TCP connections around Envoy: not through
  IPv4-mapped IPv6 addresses, TCP Fast Open or MPTCP, not by leaving its cgroup,
  setting meshd's routing mark or touching the eBPF programs.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import sys
from pathlib import Path

import pytest

from conftest import HTTP_PORT, REPO, VIA_ENVOY
from meshd import statefiles
from meshd.envoy import identity
from meshd.envoy_config import admin_socket_path, bootstrap_path, config_dir

pytestmark = pytest.mark.root
PROBE = REPO / "tests" / "helpers" / "escape_probe.py"
NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
try:
    ENVOY = pwd.getpwnam(identity.ENVOY_USER)
except KeyError:
    pytest.fail(f"no user {identity.ENVOY_USER}: scripts/setup.sh creates it", pytrace=False)


def probe(mesh, *args, cgroup=None) -> dict:
    """escape_probe.py as nobody, in the enrolled workload's cgroup (by default)."""
    r = mesh.run_in(*NOBODY, sys.executable, PROBE, *map(str, args), cgroup=cgroup)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line)


def mode_owner(path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def test_envoy_runs_as_its_user_with_only_its_capabilities(meshed):
    mesh, server = meshed
    st = proc_status(mesh.envoy_pid())
    assert st["Uid"].split() == [str(ENVOY.pw_uid)] * 4
    assert st["Gid"].split() == [str(ENVOY.pw_gid)] * 4
    assert st["Groups"].strip() == ""
    want = (1 << 12) | (1 << 21)   # CAP_NET_ADMIN, CAP_SYS_ADMIN
    for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(st[field], 16) == want, (field, st[field])
    assert st["NoNewPrivs"].strip() == "1"
    # and with those alone it serves: egress, and ingress from the client's own address
    # (original_src: IP_TRANSPARENT + SO_MARK) is tests/datapath/test_ingress.py
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo")
    assert r.returncode == 0 and VIA_ENVOY.encode() in r.stdout


def test_files_are_readable_only_by_whom_they_must_be(meshed):
    mesh, server = meshed
    gid = grp.getgrnam(identity.ENVOY_USER).gr_gid
    cdir = config_dir(mesh.state_dir)
    assert mode_owner(cdir) == (0o750, 0, gid)
    for name in os.listdir(cdir):
        assert mode_owner(os.path.join(cdir, name)) == (0o640, 0, gid), name
    run = statefiles.path(mesh.state_dir, statefiles.ENVOY_RUN_DIR)
    assert mode_owner(run) == (0o750, ENVOY.pw_uid, 0)   # the gate to the admin socket
    assert mode_owner(admin_socket_path(mesh.state_dir))[:2] == (0o666, ENVOY.pw_uid)
    log = statefiles.path(mesh.state_dir, statefiles.ENVOY_LOG)
    assert mode_owner(log)[0] & 0o007 == 0
    # what a workload's process gets for each
    for args in (("read", bootstrap_path(mesh.state_dir)), ("read", log),
                 ("unix", admin_socket_path(mesh.state_dir))):
        r = probe(mesh, *args)
        assert not r["ok"] and r["error"].startswith("EACCES"), (args, r)


def test_a_workload_cannot_reach_envoys_admin_api(meshed):
    """Not through its socket (above), and not over TCP: Envoy's only TCP ports are its
    listeners, and a direct connection to one reaches no admin handler."""
    mesh, server = meshed
    for port in (mesh.outbound_port, mesh.inbound_port):
        r = probe(mesh, "http", "127.0.0.1", port, "plain")
        body = r.get("body", "")
        assert "server.live" not in body and "cluster_manager" not in body, body[:300]
    r = mesh.run_in(*NOBODY, "curl", "-sS", "--max-time", "5",
                    f"http://127.0.0.1:{mesh.outbound_port}/stats")
    assert b"server." not in r.stdout


@pytest.mark.parametrize("mode", ["plain", "v4mapped", "fastopen", "mptcp"])
def test_a_workloads_tcp_goes_through_envoy_however_it_connects(meshed, mode):
    mesh, server = meshed
    r = probe(mesh, "http", server.ip4, HTTP_PORT, mode)
    if mode == "mptcp" and not r["ok"] and r["error"].startswith(("EPROTONOSUPPORT", "ENOPROTOOPT")):
        pytest.fail("MPTCP is not available on this kernel: cannot test it", pytrace=False)
    assert r["ok"], r
    assert VIA_ENVOY in r["body"].lower(), r["body"][:500]


@pytest.mark.parametrize("what", ["cgroup", "somark", "bpf"])
def test_a_workload_cannot_leave_the_mesh(meshed, what):
    """It cannot move to a cgroup that is not enrolled, set the mark meshd's policy
    routing trusts, or use bpf(2) to detach or change meshd's programs."""
    mesh, server = meshed
    args = [mesh.cg.path(mesh.outside)] if what == "cgroup" else []
    r = probe(mesh, what, *args)
    assert not r["ok"] and r["error"].startswith(("EACCES", "EPERM")), r
    # and its next connection still goes through Envoy
    r = probe(mesh, "http", server.ip4, HTTP_PORT, "plain")
    assert VIA_ENVOY in r["body"].lower()


def test_status_and_bus_say_who_envoy_runs_as(meshed):
    mesh, server = meshed
    from conftest import wait_for
    wait_for(lambda: mesh.status()["envoy"]["user"] == identity.ENVOY_USER, what="status user")
    assert f"user {identity.ENVOY_USER}" in mesh.cli("status").stdout
