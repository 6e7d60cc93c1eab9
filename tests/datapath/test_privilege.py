"""Least privilege, checked on a running mesh (README "Security"):

- Envoy runs as meshd-envoy with exactly the capabilities meshd/envoy/identity.py
  grants (ambient, bounding, effective) and no_new_privs;
- its configuration is readable by its group only, the directory it writes (admin
  socket, logs) by it and root only; every other file in the state directory has
  the audience README "Security" gives it (anyone, root and Envoy, or root only),
  and a workload or Envoy gets no further;
- a workload process (an unprivileged user in an enrolled cgroup) cannot reach
  Envoy's admin API, and cannot get its TCP connections around Envoy: not through
  IPv4-mapped IPv6 addresses, TCP Fast Open or MPTCP, not by leaving its cgroup,
  setting meshd's routing mark or touching the eBPF programs.
"""
from __future__ import annotations

import fnmatch
import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import HTTP_PORT, MESHD, REPO, VIA_ENVOY, free_port, wait_for
from helpers.common import netns_add, netns_del, netns_path
from meshd import certs
from meshd import envoy_config as ec
from meshd import statefiles
from meshd.envoy import admin, identity, process
from meshd.envoy_config import admin_socket_path, bootstrap_path, config_dir

pytestmark = pytest.mark.root
PROBE = REPO / "tests" / "helpers" / "escape_probe.py"
NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
AS_ENVOY = ("setpriv", f"--reuid={identity.ENVOY_USER}", f"--regid={identity.ENVOY_USER}",
            "--clear-groups")

# Every entry of the state directory (a relative path, fnmatch): mode, owner, group,
# and who may read it besides root: "anyone", "envoy" (meshd-envoy) or "root" (no one
# else). README "Security" is this table in prose; an entry it does not name fails.
E = identity.ENVOY_USER
STATE_FILES = {
    "status.json": (0o644, "root", "root", "anyone"),     # = the public D-Bus properties
    "meshd.pid": (0o644, "root", "root", "anyone"),
    "workload-ids.json": (0o644, "root", "root", "anyone"),
    "tcp_fwmark_accept.orig": (0o644, "root", "root", "anyone"),   # a sysctl's value
    "envoy.pid": (0o600, "root", "root", "root"),
    "envoy": (0o750, "root", E, "envoy"),                  # Envoy's configuration
    "envoy/*": (0o640, "root", E, "envoy"),
    "envoy-run": (0o770, "root", E, "envoy"),              # what Envoy writes
    "envoy-run/admin.sock": (0o666, E, E, "envoy"),        # the directory is the gate
    "envoy-run/envoy.log": (0o660, "root", E, "envoy"),
    "flows.sock": (0o660, "root", E, "envoy"),             # Envoy sends flow records
    "flows.log": (0o600, "root", "root", "root"),          # who talked to whom
    "observe.sock": (0o600, "root", "root", "root"),
    "hook.sock": (0o600, "root", "root", "root"),
    "containers": (0o700, "root", "root", "root"),
    "containers/*": (0o644, "root", "root", "root"),       # behind its 0700 directory
    "identity": (0o750, "root", E, "envoy"),               # workloads' keys (SDS files)
    "identity/*": (0o640, "root", E, "envoy"),
    "catalog.json": (0o644, "root", "root", "anyone"),     # the hosts etcd lists
}

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
try:
    ENVOY = pwd.getpwnam(identity.ENVOY_USER)
except KeyError:
    pytest.fail(f"no user {identity.ENVOY_USER}: scripts/setup.sh creates it", pytrace=False)


def probe(mesh, *args, cgroup=None) -> dict:
    """escape_probe.py as nobody, in the enrolled workload's cgroup (by default)."""
    return run_probe(mesh, NOBODY, *args, cgroup=cgroup)


def run_probe(mesh, as_user, *args, cgroup=None) -> dict:
    r = mesh.run_in(*as_user, sys.executable, PROBE, *map(str, args), cgroup=cgroup)
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
    assert mode_owner(run) == (0o770, 0, gid)   # the gate to the admin socket
    assert mode_owner(admin_socket_path(mesh.state_dir))[:2] == (0o666, ENVOY.pw_uid)
    log = statefiles.path(mesh.state_dir, statefiles.ENVOY_LOG)
    assert mode_owner(log)[0] & 0o007 == 0
    # what a workload's process gets for each
    for args in (("read", bootstrap_path(mesh.state_dir)), ("read", log),
                 ("unix", admin_socket_path(mesh.state_dir))):
        r = probe(mesh, *args)
        assert not r["ok"] and r["error"].startswith("EACCES"), (args, r)


def state_entries(state_dir: str) -> dict[str, os.stat_result]:
    out = {}
    for top, dirs, files in os.walk(state_dir):
        for name in dirs + files:
            p = os.path.join(top, name)
            out[os.path.relpath(p, state_dir)] = os.lstat(p)
    return out


def rule_for(rel: str):
    rules = [k for k in STATE_FILES if fnmatch.fnmatchcase(rel, k) and
             (k.count("/") == rel.count("/"))]
    assert rules, f"{rel}: not in STATE_FILES: who may read it? (README \"Security\")"
    return STATE_FILES[rules[0]]


def test_every_state_file_has_its_audience_and_no_more(meshed):
    """The whole state directory after traffic (flow log, Envoy's log, sockets): each
    entry's mode and owner as declared, and a workload (nobody, in its cgroup) and Envoy's
    user (outside the mesh) are refused whatever is not theirs."""
    mesh, server = meshed
    assert mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo").returncode == 0
    wait_for(lambda: os.path.exists(os.path.join(mesh.state_dir, "flows.log")),
             what="the flow log")
    st = os.stat(mesh.state_dir)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)
    entries = state_entries(mesh.state_dir)
    for want in ("flows.log", "flows.sock", "observe.sock", "envoy-run/admin.sock",
                 "envoy/bootstrap.json", "status.json"):
        assert want in entries, sorted(entries)
    for rel in sorted(entries):
        if rel.startswith(".") or "/." in rel:
            continue   # an atomic write's temporary file, there for a moment
        check_audience(mesh, rel)


def check_audience(mesh, rel: str) -> None:
    """One state-directory entry against STATE_FILES: its mode and owner, and what a
    workload (nobody, in its cgroup) and Envoy's user (outside the mesh) get."""
    mode, owner, group, who = rule_for(rel)
    path = os.path.join(mesh.state_dir, rel)
    st = os.lstat(path)
    uid = {"root": 0, E: ENVOY.pw_uid}
    gid = {"root": 0, E: grp.getgrnam(E).gr_gid}
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (
        mode, uid[owner], gid[group]), (rel, oct(st.st_mode), st.st_uid, st.st_gid)
    kind = "list" if stat.S_ISDIR(st.st_mode) else (
        "unix" if stat.S_ISSOCK(st.st_mode) else "read")
    denied = {"anyone": (), "envoy": ("workload",), "root": ("workload", "envoy")}[who]
    for as_whom in ("workload", "envoy"):
        if as_whom == "workload":
            r = probe(mesh, kind, path)
        elif kind == "unix" and who == "envoy":
            continue   # Envoy's own sockets: it uses them (test_observe, the stats)
        else:
            r = run_probe(mesh, AS_ENVOY, kind, path, cgroup=mesh.outside)
        if as_whom in denied:
            assert not r["ok"] and r["error"].startswith("EACCES"), (rel, as_whom, r)
        elif kind != "unix":
            assert r["ok"], (rel, as_whom, r)


def test_workload_keys_are_for_meshd_and_envoy_only(mesh, server):
    """With identities (trust_domain), each workload's private key lives in its SDS file
    in <state_dir>/identity: root:meshd-envoy 0640 in a 0750 directory of that group.
    Envoy's user reads it, and serves the certificate; a workload cannot read it, and
    neither can read the host CA's key (root's alone)."""
    td = "privilege.test"
    root, host = os.path.join(mesh.tmp, "ca-root"), os.path.join(mesh.tmp, "ca-host")
    for args in (("init", "--trust-domain", td, "--dir", root),
                 ("issue-intermediate", "--dir", root, "--host", "h", "--out", host)):
        r = subprocess.run(MESHD + ["ca", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    mesh.configure(trust_domain=td, identity_dir=host, mtls_port=free_port())
    mesh.echo_server("--http", free_port())   # a port to serve over mTLS: Envoy needs the key
    mesh.start()
    key = os.path.join(mesh.state_dir, "identity", "wl_wl.json")
    wait_for(lambda: os.path.exists(key), what="the workload's SDS file")
    for rel in ("identity", "identity/wl_wl.json", "identity/trust.json"):
        check_audience(mesh, rel)
    leaf, err = certs.read_leaf(key)
    assert leaf is not None and b"PRIVATE KEY" in leaf.key_pem, err   # the key is in that file
    # Envoy (as meshd-envoy) loaded it: its certificate is among Envoy's
    def served():
        code, body = admin.get(admin_socket_path(mesh.state_dir), "/certs")
        return code == 200 and f"spiffe://{td}/workload/wl" in body.decode()
    wait_for(served, what="the workload's certificate in Envoy")
    ca_key = os.path.join(host, "intermediate.key")
    for who in (NOBODY, AS_ENVOY):
        r = run_probe(mesh, who, "read", ca_key, cgroup=mesh.outside)
        assert not r["ok"] and r["error"].startswith("EACCES"), (who, r)


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
    wait_for(lambda: mesh.status()["envoy"]["user"] == identity.ENVOY_USER, what="status user")
    assert f"user {identity.ENVOY_USER}" in mesh.cli("status").stdout


# -- each capability Envoy keeps, and why (meshd/envoy/identity.py) --------------------

NEEDS = {   # capability -> the listener of meshd's that Envoy cannot open without it
    "CAP_NET_ADMIN": "meshd_inbound",     # transparent (IP_TRANSPARENT)
    "CAP_SYS_ADMIN": "meshd_ctr_",         # inside a container's namespace (setns)
    "CAP_NET_BIND_SERVICE": "meshd_outbound",   # on a port below 1024 (here 81)
}


def test_each_capability_envoy_keeps_is_needed(prefix, cgroups, netns):
    """Envoy as meshd-envoy, on a bootstrap holding meshd's own listeners as static
    ones (a static listener that fails stops Envoy at start-up, naming it): with the
    capabilities identity.py grants it starts and opens them all; without any one of
    them it fails on exactly the listener that capability is granted for."""
    assert set(NEEDS) == set(identity.CAPABILITIES) | {"CAP_NET_BIND_SERVICE"}
    assert identity.capabilities_for((81,)) == tuple(sorted(NEEDS))
    ctr = netns_add(f"{prefix}c")   # a container's network namespace
    tmp = tempfile.mkdtemp(prefix=f"{prefix}caps-")
    try:
        os.chmod(tmp, 0o755)
        os.chown(tmp, ENVOY.pw_uid, ENVOY.pw_gid)
        sock = os.path.join(tmp, "admin.sock")
        ctr_listener, ctr_cluster = ec.render_container("c0ffee", netns_path(ctr), 1, free_port(),
                                                        access_log=False)
        listeners = [ec.render_inbound_listener(free_port(), False, access_log=False),
                     ctr_listener, ec.render_listeners(81, False, access_log=False)[0]]
        assert [li["name"][:len(n)] for li, n in zip(listeners, NEEDS.values())] == list(
            NEEDS.values())
        assert listeners[0]["transparent"] is True
        bootstrap = os.path.join(tmp, "bootstrap.json")
        with open(bootstrap, "w") as f:
            json.dump({"node": {"id": "caps", "cluster": "caps"},
                       "admin": {"address": {"pipe": {"path": sock}}},
                       "static_resources": {"listeners": listeners,
                                            "clusters": ec.render_clusters(False) + [ctr_cluster]}}, f)
        os.chmod(bootstrap, 0o644)
        run = cgroups.make("envoycaps")

        def envoy(caps):
            who = identity.EnvoyIdentity(identity.ENVOY_USER, ENVOY.pw_uid, ENVOY.pw_gid, caps)
            return cgroups.popen(run, *who.setpriv(), process.find_envoy(""), "-c", bootstrap,
                                 "--disable-hot-restart", "-l", "error", "--base-id",
                                 str(os.getpid() % 10000),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        p = envoy(tuple(NEEDS))
        try:
            wait_for(lambda: p.poll() is not None or admin.is_ready(sock), what="Envoy ready")
            assert p.poll() is None, p.stdout.read()
            code, body = admin.get(sock, "/listeners?format=json")
            names = [li["name"] for li in json.loads(body)["listener_statuses"]]
            assert sorted(names) == sorted(li["name"] for li in listeners)
        finally:
            p.kill()
            p.wait()
        for cap, listener in NEEDS.items():
            p = envoy(tuple(c for c in NEEDS if c != cap))
            try:
                out, _ = p.communicate(timeout=30)
            finally:
                p.kill()
                p.wait()
            assert p.returncode not in (0, None), (cap, out)
            failed = [l for l in out.splitlines() if "failed to bind or apply" in l]
            assert len(failed) == 1 and f"listener '{listener}" in failed[0], (cap, out[-2000:])
    finally:
        netns_del(ctr)
        shutil.rmtree(tmp, ignore_errors=True)
