"""meshd's life cycle, end to end: live config changes (good and bad), Envoy
dying, meshd dying, `meshd cleanup`, and living next to other cgroup programs.

Each test asserts what an operator would check: the status, `meshd status`,
Envoy's own counters, and where a workload's requests really went (Envoy adds
the x-forwarded-proto header Envoy adds to requests on a port declared HTTP, which a
direct request never has)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import EXCLUDED_PORT, HTTP_PORT, TCP_PORT, VIA_ENVOY, reap, wait_for
from meshd import bpfsys
from meshd.datapath import ENVOY_HOOKS, HOOKS, WORKLOAD_HOOKS

RQ_TOTAL = "http.outbound_http.downstream_rq_total"
# The hooks meshd attaches to cgroups (sk_lookup goes on the network namespace).
CGROUP_HOOKS = {h: HOOKS[h] for h in WORKLOAD_HOOKS + ENVOY_HOOKS}

# A long-lived connection to the echo port: prints the server's hello, then one
# echoed line per line it reads on stdin.
LONG_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rb")
print(f.readline().decode().strip(), flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(f.readline().decode().strip(), flush=True)
"""

# Sequential HTTP requests, a fresh connection each, for argv[3] seconds: one
# JSON line per request (start time, end time, status, through Envoy?, error).
REQUEST_LOOP = r"""
import http.client, json, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.time() + seconds
while time.time() < end:
    t0 = time.time()
    rec = {"t0": t0}
    try:
        c = http.client.HTTPConnection(host, port, timeout=5)
        c.request("GET", "/echo")
        r = c.getresponse()
        body = json.loads(r.read())
        c.close()
        rec.update(status=r.status, envoy="x-forwarded-proto" in body["headers"],
                   host=body["headers"].get("host"))
    except Exception as e:
        rec["error"] = repr(e)
    rec["t1"] = time.time()
    print(json.dumps(rec), flush=True)
    time.sleep(0.002)
"""

OTHER_PROG = rb"""
#include <uapi/linux/bpf.h>
BPF_ARRAY(calls, u64, 1);
int other_connect4(struct bpf_sock_addr *ctx)
{
	int zero = 0;
	u64 *v = calls.lookup(&zero);
	if (v)
		__sync_fetch_and_add(v, 1);
	return 1;
}
"""


# -- helpers ----------------------------------------------------------------------------

def echo(mesh, server, port=HTTP_PORT, cgroup=None) -> dict:
    r = mesh.curl(f"http://{server.ip4}:{port}/echo", cgroup=cgroup)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def via_envoy(mesh, server, port=HTTP_PORT) -> bool:
    return VIA_ENVOY in echo(mesh, server, port)["headers"]



def attached(cgroup_dir: str) -> dict[str, list[int]]:
    """Program ids attached to a cgroup directory, for every cgroup hook meshd uses."""
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {name: bpfsys.prog_query(fd, hook.attach_type) for name, hook in CGROUP_HOOKS.items()}
    finally:
        os.close(fd)


def netns_sk_lookup_progs(mesh) -> list[int]:
    """sk_lookup programs on the namespace the mesh serves (other instances' too)."""
    fd = mesh.netns_fd()
    try:
        return bpfsys.prog_query(fd, bpfsys.SK_LOOKUP)
    finally:
        os.close(fd)


def pinned_link_prog(mesh, name: str) -> int:
    fd = bpfsys.obj_get(os.path.join(mesh.bpffs_dir, "v1", "links", name))
    try:
        return bpfsys.link_info(fd).prog_id
    finally:
        os.close(fd)


def envoy_listener_up(mesh) -> bool:
    """Is Envoy's IPv4 outbound listener in the pinned SOCKMAP (what connect4 checks)?"""
    fd = bpfsys.obj_get(os.path.join(mesh.bpffs_dir, "v1", "maps", "envoy_listeners"))
    try:
        return bpfsys.map_lookup(fd, (0).to_bytes(4, "little"), 8) is not None
    finally:
        os.close(fd)


def proc_state(pid: int) -> str | None:
    """The state letter of a process ("Z" for a zombie), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def current_envoy_pid(mesh) -> int | None:
    try:
        return mesh.envoy_pid()
    except (OSError, ValueError):
        return None   # removed while Envoy is down



# -- 1. a bad change is rejected, the last good config keeps serving --------------------

def test_bad_config_rejected_with_location_while_traffic_flows(meshed):
    mesh, server = meshed
    assert mesh.status()["config_errors"] == []
    assert via_envoy(mesh, server)

    # A wrong type, on line 3 of a new file: the last good config must stay in force.
    bad = mesh.write("20-bad.toml", '[mesh]\n# excluded ports, as a list\n'
                                    'exclude_outbound_ports = "x"\n')
    errors = wait_for(lambda: mesh.status()["config_errors"],
                      what="config_errors in status.json")
    assert len(errors) == 1, errors
    assert errors[0]["file"] == bad
    assert errors[0]["line"] == 3
    assert errors[0]["key"] == "mesh.exclude_outbound_ports"
    assert "expected array of integers" in errors[0]["message"]

    r = mesh.cli("status")
    assert r.returncode == 0, r.stdout + r.stderr              # still running
    assert f"{bad}:3: mesh.exclude_outbound_ports: expected array" in r.stdout, r.stdout
    assert "REJECTED" in r.stdout and "last good config stays in force" in r.stdout, r.stdout

    before = mesh.stat(RQ_TOTAL)
    assert via_envoy(mesh, server)                             # traffic still meshed
    assert via_envoy(mesh, server, EXCLUDED_PORT)              # old exclusions in force
    assert mesh.stat(RQ_TOTAL) == before + 2
    assert mesh.status()["state"] == "running"

    # A syntax error is located too: line, and the key whose value it breaks.
    mesh.write("20-bad.toml", '[mesh]\nexclude_outbound_ports = [22,\n\n= 5\n')
    key = "mesh.exclude_outbound_ports"
    wait_for(lambda: [(e["file"], e["key"], e["line"]) for e in mesh.status()["config_errors"]]
             == [(bad, key, 4)], what="syntax error in status.json")
    err = mesh.status()["config_errors"][0]
    assert "invalid TOML" in err["message"], err
    assert f"{bad}:4: {key}: invalid TOML" in mesh.cli("status").stdout
    assert via_envoy(mesh, server)

    # Fixed: errors gone and the fixed file applies.
    mesh.write("20-bad.toml", f"[mesh]\nexclude_outbound_ports = [22, {EXCLUDED_PORT}]\n")
    wait_for(lambda: mesh.status()["config_errors"] == [], what="errors cleared")
    st = mesh.status()
    assert st["mesh"]["exclude_outbound_ports"] == [22, EXCLUDED_PORT]
    assert bad in st["config_files"]
    r = mesh.cli("status")
    assert r.returncode == 0 and "REJECTED" not in r.stdout, r.stdout
    assert not via_envoy(mesh, server, EXCLUDED_PORT)
    assert via_envoy(mesh, server)


# -- 2. a good change applies live, without restarting Envoy or dropping connections ----

def test_config_change_applies_live_keeping_envoy_and_connections(meshed):
    mesh, server = meshed
    envoy_pid = mesh.envoy_pid()
    assert via_envoy(mesh, server, EXCLUDED_PORT)              # not excluded yet

    client = mesh.cg.popen(mesh.workload, sys.executable, "-c", LONG_CLIENT, server.ip4, TCP_PORT,
                           stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == f"hello {server.host_ip4}"
        client.stdin.write("before\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "before"
        # the connection really is held by Envoy (a plain TCP port)
        assert mesh.stat("tcp.outbound_tcp.downstream_cx_total") == 1
        rx = mesh.stat("tcp.outbound_tcp.downstream_cx_rx_bytes_total")
        assert rx == len("before\n")

        mesh.configure(exclude_outbound_ports=[22, EXCLUDED_PORT])
        # applied live by inotify, while the connection below stays open
        wait_for(lambda: not via_envoy(mesh, server, EXCLUDED_PORT), interval=0.02,
                 what="excluded port to go direct")
        wait_for(lambda: mesh.status()["mesh"]["exclude_outbound_ports"] == [22, EXCLUDED_PORT],
                 what="status to show the change")
        assert via_envoy(mesh, server)                         # other ports still meshed

        assert mesh.envoy_pid() == envoy_pid
        assert proc_state(envoy_pid) not in (None, "Z")
        assert mesh.status()["envoy"]["restarts"] == 0

        for word in ("after", "and-again"):
            client.stdin.write(word + "\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == word
        # the same proxied connection carried them: no new one, more bytes
        assert mesh.stat("tcp.outbound_tcp.downstream_cx_total") == 1
        assert mesh.stat("tcp.outbound_tcp.downstream_cx_rx_bytes_total") == \
            rx + len("after\nand-again\n")
    finally:
        client.kill()
        client.wait()


# -- 3. Envoy dies: fail open while it is down, meshed again once it is back ------------

def test_envoy_killed_fails_open_then_recovers(meshed):
    mesh, server = meshed
    assert via_envoy(mesh, server)
    old_pid = mesh.envoy_pid()
    fail_open_before = mesh.workload_counter("fail_open")

    # Freeze meshd so that its supervisor cannot restart Envoy during the check.
    mesh.proc.send_signal(signal.SIGSTOP)
    try:
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: proc_state(old_pid) in (None, "Z"), timeout=5, what="Envoy to die")
        wait_for(lambda: not envoy_listener_up(mesh), timeout=5,
                 what="Envoy's listener to leave the SOCKMAP")

        # (curl gives up after 10 s; a dead Envoy port would refuse the connection)
        body = echo(mesh, server)
        assert VIA_ENVOY not in body["headers"]           # direct: failed open
        assert body["client"] == server.host_ip4
        assert proc_state(old_pid) in (None, "Z")              # Envoy still down
        assert not envoy_listener_up(mesh)
    finally:
        mesh.proc.send_signal(signal.SIGCONT)

    wait_for(lambda: mesh.workload_counter("fail_open") >= fail_open_before + 1, timeout=5,
             what="BPF fail_open counter")
    new_pid = wait_for(lambda: (p := current_envoy_pid(mesh)) and p != old_pid and p,
                       timeout=10, what="a new Envoy")
    wait_for(lambda: (st := mesh.status()) and st["envoy"]["state"] == "running"
             and st["envoy"]["pid"] == new_pid and st["state"] == "running",
             timeout=10, what="status: Envoy running again")
    assert mesh.status()["envoy"]["restarts"] >= 1
    wait_for(lambda: envoy_listener_up(mesh), timeout=5,
             what="Envoy's listener back in the SOCKMAP")
    before = mesh.stat(RQ_TOTAL)
    assert via_envoy(mesh, server)
    assert mesh.stat(RQ_TOTAL) == before + 1
    assert proc_state(new_pid) not in (None, "Z")


# -- 4. meshd killed mid-stream: no request lost, the new meshd adopts ------------------

def test_meshd_sigkill_loses_no_request_and_restart_adopts(meshed):
    mesh, server = meshed
    envoy_pid = mesh.envoy_pid()
    links = mesh.status()["datapath"]["links"]
    before = mesh.stat(RQ_TOTAL)

    client = mesh.cg.popen(mesh.workload, sys.executable, "-c", REQUEST_LOOP,
                           server.ip4, HTTP_PORT, "4", stdout=subprocess.PIPE,
                           text=True)
    try:
        time.sleep(1.0)
        killed_at = time.time()
        mesh.kill(signal.SIGKILL)
        time.sleep(0.5)                                          # no meshd at all
        mesh.start()
        restarted_at = time.time()
        out, _ = client.communicate(timeout=20)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    reap()

    recs = [json.loads(line) for line in out.splitlines()]
    errors = [r for r in recs if "error" in r or r.get("status") != 200]
    assert errors == [], errors[:5]
    assert all(r["envoy"] for r in recs), [r for r in recs if not r["envoy"]][:5]
    assert all(r["host"] == f"{server.ip4}:{HTTP_PORT}" for r in recs)
    # the stream spanned the kill, the gap without meshd and the restart
    assert sum(r["t1"] < killed_at for r in recs) >= 10
    assert sum(killed_at < r["t0"] and r["t1"] < restarted_at for r in recs) >= 10
    assert sum(r["t0"] > restarted_at for r in recs) >= 10
    assert mesh.stat(RQ_TOTAL) == before + len(recs)           # all through Envoy

    st = mesh.status()
    assert st["pid"] == mesh.proc.pid
    assert st["datapath"]["adopted"] is True
    assert st["envoy"]["adopted"] is True
    assert st["envoy"]["pid"] == envoy_pid == mesh.envoy_pid()
    assert st["envoy"]["restarts"] == 0
    assert st["datapath"]["links"] == links
    assert via_envoy(mesh, server)


# -- 5. meshd cleanup leaves nothing behind ----------------------------------------------

def test_cleanup_leaves_no_pin_link_process_or_cgroup(meshed):
    mesh, server = meshed
    assert via_envoy(mesh, server)
    wl_dir = mesh.cg.path(mesh.workload)
    own_cgroup = mesh.cg.path(mesh.cgroup_root)
    envoy_pid = mesh.envoy_pid()
    links = mesh.status()["datapath"]["links"]
    assert {f"workload:wl:{h}" for h in WORKLOAD_HOOKS} <= set(links), links
    assert {f"envoy:{h}" for h in ENVOY_HOOKS} <= set(links), links
    assert all(attached(wl_dir)[h] for h in WORKLOAD_HOOKS)
    sk_lookup = pinned_link_prog(mesh, "netns:sk_lookup")
    assert sk_lookup in netns_sk_lookup_progs(mesh)
    assert os.path.isdir(mesh.bpffs_dir) and os.path.isdir(own_cgroup)

    # meshd is our child: reap it as soon as cleanup's SIGTERM ends it (a zombie would
    # look alive to cleanup, as it would not under systemd).
    reaper = threading.Thread(target=mesh.proc.wait, daemon=True)
    reaper.start()
    r = mesh.cli("cleanup")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"stopped meshd (pid {mesh.proc.pid})" in r.stdout
    assert "stopped Envoy" in r.stdout
    assert f"detached {len(links)} link(s)" in r.stdout
    assert "warning" not in r.stderr, r.stderr
    reaper.join(5)
    assert mesh.proc.poll() is not None

    assert not os.path.exists(mesh.bpffs_dir)
    assert attached(wl_dir) == {h: [] for h in CGROUP_HOOKS}
    assert sk_lookup not in netns_sk_lookup_progs(mesh)
    assert proc_state(envoy_pid) in (None, "Z")
    reap()
    assert proc_state(envoy_pid) is None
    assert not os.path.exists(own_cgroup)
    # every state file removed, so the (emptied) state directory is gone too
    assert not os.path.exists(mesh.state_dir), os.listdir(mesh.state_dir)
    r = mesh.cli("status")
    assert r.returncode == 3 and "not running" in r.stdout, r.stdout

    body = echo(mesh, server)
    assert VIA_ENVOY not in body["headers"] and body["client"] == server.host_ip4


# -- 6. somebody else's program on the same cgroup ---------------------------------------

@pytest.fixture
def other_prog(mesh, prefix):
    """A counting cgroup/connect4 program on the workload cgroup, linked and pinned
    under /sys/fs/bpf/<prefix>-other like another tool would."""
    from bcc import BPF
    b = BPF(text=OTHER_PROG)
    fn = b.load_func(b"other_connect4", BPF.CGROUP_SOCK_ADDR,
                     attach_type=bpfsys.CGROUP_INET4_CONNECT)
    pin_dir = f"/sys/fs/bpf/{prefix}-other"
    os.makedirs(pin_dir)
    link_pin = os.path.join(pin_dir, "link")
    cg_fd = os.open(mesh.cg.path(mesh.workload), os.O_RDONLY | os.O_DIRECTORY)
    try:
        link = bpfsys.link_create(fn.fd, cg_fd, bpfsys.CGROUP_INET4_CONNECT)
        try:
            bpfsys.obj_pin(link, link_pin)
        finally:
            os.close(link)
        ids = bpfsys.prog_query(cg_fd, bpfsys.CGROUP_INET4_CONNECT)
    finally:
        os.close(cg_fd)
    assert len(ids) == 1
    calls = b[b"calls"]
    try:
        yield ids[0], lambda: calls[calls.Key(0)].value
    finally:
        if os.path.exists(link_pin):
            fd = bpfsys.obj_get(link_pin)
            try:
                bpfsys.link_detach(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
            os.unlink(link_pin)
        os.rmdir(pin_dir)
        b.cleanup()


def test_other_cgroup_program_keeps_working_and_stays_attached(mesh, server, other_prog):
    other_id, other_calls = other_prog
    wl_dir = mesh.cg.path(mesh.workload)
    mesh.configure()
    mesh.start()

    progs = attached(wl_dir)
    assert other_id in progs["connect4"] and len(progs["connect4"]) == 2
    ours = {h: [p for p in ids if p != other_id] for h, ids in progs.items()}
    assert all(ours[h] for h in WORKLOAD_HOOKS)

    calls = other_calls()
    before = mesh.stat(RQ_TOTAL)
    assert via_envoy(mesh, server)                               # meshd steered it...
    assert other_calls() == calls + 1                            # ...and the other program ran
    assert mesh.stat(RQ_TOTAL) == before + 1

    reaper = threading.Thread(target=mesh.proc.wait, daemon=True)
    reaper.start()
    r = mesh.cli("cleanup")
    assert r.returncode == 0, r.stdout + r.stderr
    reaper.join(5)

    assert attached(wl_dir) == {h: ([other_id] if h == "connect4" else []) for h in CGROUP_HOOKS}
    assert os.path.exists(f"/sys/fs/bpf/{mesh.prefix}-other/link")
    assert not os.path.exists(mesh.bpffs_dir)
    calls = other_calls()
    assert not via_envoy(mesh, server)                           # direct now...
    assert other_calls() == calls + 1                            # ...still counted
