"""Faults under load: what each one costs, request by request and byte by byte.

A steady mix (tests/helpers/load.py: keep-alive HTTP, a new connection per HTTP
request, a long TCP stream; egress from the enrolled workload to a server host and
ingress from that host to a server in the workload) runs while a fault is injected
several times. What must hold:
- meshd killed (SIGKILL) and restarted, SIGHUP reloads, a config change every 100 ms,
  a workload cgroup removed and re-created, the bus daemon restarted, the state
  directory read-only or full: zero failed requests, zero dropped connections, every
  HTTP answer through Envoy, Envoy never restarted;
- Envoy killed: each client loses the operation in flight (at most one more), new
  connections go direct while it is down (fail open) and through the new Envoy after.

Short form by default (a few injections); MESHD_TEST_FULL=1 runs the full counts.
With MESHD_FAULTS_REPORT=<file> every test appends its figures as a JSON line
(bench/faults.py drives that and renders bench/README.md's fault table).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HTTP_PORT, VIA_ENVOY, free_port, wait_for
from helpers import load as loadmod
from helpers.dbus import PrivateBus

FULL = os.environ.get("MESHD_TEST_FULL") == "1"
# Ingress with the client's own address (original_src) loses about 1 in 400 new
# connections from a client that also holds a long-lived one to the same port, with
# no fault at all (bench/README.md, "Faults"): the rig serves ingress with Envoy's own
# address by default, so that what is measured is the fault; bench/faults.py runs the
# control once more with MESHD_FAULTS_PRESERVE_CLIENT=1 to show that figure.
PRESERVE_CLIENT = os.environ.get("MESHD_FAULTS_PRESERVE_CLIENT") == "1"


def scale(short: int, full: int) -> int:
    return full if FULL else short


class Rig:
    """The mesh, the server host, a load server on each side and the mix."""

    def __init__(self, mesh, server):
        self.mesh, self.server = mesh, server
        self.eg_http, self.eg_tcp = free_port(), free_port()    # on the server host
        self.in_http, self.in_tcp = free_port(), free_port()    # in the workload
        self.procs: list[subprocess.Popen] = []

    def configure(self, **mesh_extra):
        mesh_extra.setdefault("preserve_client_address", PRESERVE_CLIENT)
        self.mesh.configure(http_ports=[self.eg_http, self.in_http], **mesh_extra)

    def start(self, **mesh_extra) -> "Rig":
        self.configure(**mesh_extra)
        self.mesh.start()
        self.procs.append(loadmod.start_server(self.server.popen, [self.eg_http], [self.eg_tcp]))
        self.procs.append(loadmod.start_server(self.mesh.popen_in, [self.in_http], [self.in_tcp]))
        # the workload's listeners enter the data path (sockops saw listen(); Envoy's
        # inbound chains follow within a status tick)
        wait_for(lambda: self.via_envoy_ingress(), timeout=15, interval=0.2,
                 what="ingress through Envoy")
        assert self.via_envoy_egress()
        return self

    def _via(self, r: subprocess.CompletedProcess) -> bool:
        assert r.returncode == 0, r.stderr
        return b"X-Via: envoy" in r.stdout

    def via_envoy_egress(self, cgroup=None) -> bool:
        return self._via(self.mesh.curl(f"http://{self.server.ip4}:{self.eg_http}/n/10/1",
                                        "-D", "-", cgroup=cgroup))

    def via_envoy_ingress(self) -> bool:
        return self._via(self.server.curl(f"http://{self.server.host_ip4}:{self.in_http}/n/10/1",
                                          "-D", "-"))

    def load(self, seconds: float, events: bool = False, rate: float = 50) -> loadmod.Load:
        """The mix, both directions, running (each client has done one operation)."""
        ld = loadmod.Load()
        try:
            loadmod.start_mix(ld, self.mesh.popen_in, self.server.ip4, self.eg_http,
                              self.eg_tcp, seconds, "egress", rate=rate, events=events)
            loadmod.start_mix(ld, self.server.popen, self.server.host_ip4, self.in_http,
                              self.in_tcp, seconds, "ingress", rate=rate, events=events)
            ld.wait_ready()
        except BaseException:
            ld.stop()
            raise
        return ld

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()
            p.stdout.close()


@pytest.fixture
def rig(mesh, server):
    r = Rig(mesh, server)
    try:
        yield r
    finally:
        r.stop()


def report(fault: str, injections: int, res: dict, recovery: str = "", note: str = "") -> None:
    """Append this test's figures for bench/faults.py (when it asked for them)."""
    path = os.environ.get("MESHD_FAULTS_REPORT")
    if not path:
        return
    t = res["total"]
    row = dict(fault=fault, injections=injections, sent=t["sent"], lost=t["failed"],
               dropped=t["dropped"], closed_by_peer=t["closed_by_peer"],
               bytes_sent=t["bytes_sent"], bytes_verified=t["bytes_verified"],
               recovery=recovery, note=note,
               clients={n: {k: v for k, v in c.items() if k != "events"}
                        for n, c in res.items() if n != "total"})
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def assert_lossless(res: dict, envoy_pid: int, mesh) -> None:
    """Nothing lost, nothing dropped, every HTTP answer through Envoy, the same Envoy."""
    t = res["total"]
    msg = loadmod.summary(res)
    assert t["failed"] == 0 and t["dropped"] == 0, msg
    assert t["bytes_verified"] == t["bytes_sent"] > 0, msg
    assert t["direct"] == 0 and t["via_envoy"] > 0, msg
    for name, c in res.items():
        if name != "total":
            assert c["answered"] >= 3, msg                     # each client kept going
            if c["mode"] == "stream":
                assert c["connections"] == 1, msg              # one stream throughout
    assert mesh.envoy_pid() == envoy_pid
    assert mesh.status()["envoy"]["restarts"] == 0


def log_count(mesh, text: str) -> int:
    return mesh.log_text().count(text)


# -- meshd killed and restarted ------------------------------------------------------

def test_meshd_sigkill_and_restart_under_load(rig):
    mesh = rig.start().mesh
    envoy_pid = mesh.envoy_pid()
    n = scale(2, 10)
    ld = rig.load(seconds=60)
    times = []
    try:
        for _ in range(n):
            time.sleep(0.3)
            mesh.kill(signal.SIGKILL)
            t0 = time.time()
            time.sleep(0.3)                  # no meshd at all for a moment
            mesh.start()                     # returns once status.json says running
            times.append(time.time() - t0)
        time.sleep(0.3)
    finally:
        res = ld.results(finish=True)
    st = mesh.status()
    assert st["datapath"]["adopted"] is True and st["envoy"]["adopted"] is True
    report("meshd SIGKILL + restart", n, res,
           recovery=f"running again {max(times):.2f} s after the kill (0.3 s of it without meshd)")
    assert_lossless(res, envoy_pid, mesh)


# -- reloads: SIGHUP, and a config change every 100 ms ---------------------------------

def test_sighup_reloads_under_load(rig):
    mesh = rig.start().mesh
    envoy_pid = mesh.envoy_pid()
    n = scale(5, 50)
    before = log_count(mesh, "configuration reloaded (SIGHUP)")
    ld = rig.load(seconds=60)
    try:
        for i in range(n):
            mesh.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: log_count(mesh, "configuration reloaded (SIGHUP)") >= before + i + 1,
                     what="the reload")
            time.sleep(0.1)
    finally:
        res = ld.results(finish=True)
    report("SIGHUP reload", n, res)
    assert_lossless(res, envoy_pid, mesh)


def test_config_change_every_100ms_under_load(rig):
    """Alternate an exclusion and a second workload (new filter chains in Envoy):
    every change is a real reload that reaches the maps and Envoy's listeners."""
    mesh = rig.start().mesh
    envoy_pid = mesh.envoy_pid()
    other = mesh.cg.make("other")
    seconds = scale(3, 60)
    before = log_count(mesh, "configuration reloaded")
    ld = rig.load(seconds=seconds + 30)
    changes = 0
    try:
        end = time.time() + seconds
        while time.time() < end:
            changes += 1
            if changes % 2:
                rig.configure(exclude_outbound_ports=[22, 1000 + changes % 50])
            else:
                mesh.write("20-other.toml", f'[workload.other]\ncgroup = "{other}"\n'
                           f'exclude_outbound_ports = [{2000 + changes % 50}]\n')
            time.sleep(0.1)
        # the last change applies (the debounce is 100 ms)
        wait_for(lambda: (st := mesh.status()) and len(st["workloads"]) == 2
                 and st["config_errors"] == [], what="the last change applied")
    finally:
        res = ld.results(finish=True)
    reloads = log_count(mesh, "configuration reloaded") - before
    report("config change every 100 ms", changes, res,
           note=f"{seconds} s, {reloads} reloads applied (inotify, 100 ms debounce)")
    assert reloads >= changes // 3, (reloads, changes)
    assert_lossless(res, envoy_pid, mesh)
    assert rig.via_envoy_egress(cgroup=other)                 # the second workload meshed


# -- a workload cgroup removed and re-created -----------------------------------------

def test_workload_cgroup_removed_and_recreated_under_load(rig):
    mesh = rig.mesh
    other = mesh.cg.make("other")
    mesh.write("20-other.toml", f'[workload.other]\ncgroup = "{other}"\n')
    rig.start()
    envoy_pid = mesh.envoy_pid()

    def other_state():
        st = mesh.status()
        w = [w for w in st["workloads"] if w["name"] == "other"]
        return w[0] if w else None
    n = scale(3, 20)
    ld = rig.load(seconds=60)
    try:
        for _ in range(n):
            old_id = wait_for(lambda: (w := other_state()) and not w["error"] and w["cgroup_id"],
                              what="other enrolled")
            os.rmdir(mesh.cg.path(other))
            wait_for(lambda: (w := other_state()) and w["error"], what="other gone")
            mesh.cg.make("other")
            wait_for(lambda: (w := other_state()) and not w["error"]
                     and w["cgroup_id"] not in (0, old_id), what="other re-enrolled")
            assert rig.via_envoy_egress(cgroup=other)
    finally:
        res = ld.results(finish=True)
    report("workload cgroup removed + re-created", n, res)
    assert_lossless(res, envoy_pid, mesh)


# -- the bus daemon restarted ----------------------------------------------------------

def test_bus_daemon_restarted_under_load(rig, monkeypatch):
    bus = PrivateBus().start()
    try:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)   # inherited by meshd
        mesh = rig.start().mesh
        on_bus = lambda: "io.meshd.Mesh1" in bus.busctl("list", "--acquired").stdout  # noqa: E731
        wait_for(on_bus, what="meshd on the bus")
        envoy_pid = mesh.envoy_pid()
        n = scale(1, 10)
        ld = rig.load(seconds=60)
        try:
            for _ in range(n):
                bus.stop()
                time.sleep(0.2)
                bus.start()                      # same socket path, a new daemon
                wait_for(on_bus, timeout=20, interval=0.2, what="meshd back on the new bus")
        finally:
            res = ld.results(finish=True)
        assert mesh.proc.poll() is None
        report("bus daemon restarted", n, res, note="meshd back on the bus within its retry interval")
        assert_lossless(res, envoy_pid, mesh)
    finally:
        bus.stop()
        bus.dir.exists() and __import__("shutil").rmtree(bus.dir, ignore_errors=True)


# -- the state directory read-only, or full ---------------------------------------------

def _mount(*args):
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _umount(path):
    subprocess.run(["umount", path], check=False, capture_output=True)


def _state_dir_fault(rig, fault: str, break_it, repair, n: int):
    """Break the state directory, change the config (a new exclusion and a second
    workload) while it is broken, repair it: traffic never notices, meshd stays up
    and the change applies once files can be written again."""
    mesh = rig.mesh
    other = mesh.cg.make("other")
    envoy_pid = mesh.envoy_pid()
    ld = rig.load(seconds=60)
    try:
        for i in range(n):
            break_it()
            try:
                mesh.write("20-other.toml", f'[workload.other]\ncgroup = "{other}"\n'
                           f'exclude_outbound_ports = [{3000 + i}]\n')
                wait_for(lambda: log_count(mesh, "cannot write") > i, what="the write error logged")
                time.sleep(0.5)
                assert mesh.proc.poll() is None
            finally:
                repair()
            # the kernel side applied at once; Envoy's files once they can be written
            # (retried every status tick)
            wid = wait_for(lambda: [w["id"] for w in mesh.status()["workloads"]
                                    if w["name"] == "other" and not w["error"]],
                           what="other enrolled")[0]
            wait_for(lambda: f'"outbound_wl{wid}"' in lds_text(mesh), timeout=10,
                     what="Envoy's files written after the repair")
            assert rig.via_envoy_egress(cgroup=other)
            os.unlink(os.path.join(mesh.config_dir, "20-other.toml"))
            wait_for(lambda: len(mesh.status()["workloads"]) == 1, what="other removed")
    finally:
        res = ld.results(finish=True)
    report(fault, n, res, note="a config change made meanwhile: maps at once, Envoy's files "
           "within a second of the repair")
    assert_lossless(res, envoy_pid, mesh)
    assert "Traceback" not in mesh.log_text()
    assert "writable again" in mesh.log_text()


def lds_text(mesh) -> str:
    try:
        return Path(mesh.state_dir, "envoy", "lds.json").read_text()
    except OSError:
        return ""


def test_state_dir_read_only_under_load(rig):
    rig.start()
    sd = rig.mesh.state_dir
    mounted = []

    def ro():
        _mount("--bind", sd, sd)
        mounted.append(sd)
        _mount("-o", "remount,bind,ro", sd)

    def rw():
        _umount(sd)
        mounted.remove(sd)
    try:
        _state_dir_fault(rig, "state directory read-only", ro, rw, scale(1, 10))
    finally:
        for m in mounted:
            _umount(m)


def test_state_dir_full_under_load(rig):
    sd = rig.mesh.state_dir
    os.makedirs(sd)
    _mount("-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", sd)
    filler = Path(sd, "filler")
    try:
        rig.start()

        def fill():
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            # the last few blocks a small write may still find
            try:
                with open(Path(sd, "filler2"), "wb") as f:
                    while True:
                        f.write(b"\0" * 512)
                        f.flush()
            except OSError:
                pass

        def free():
            filler.unlink()
            Path(sd, "filler2").unlink(missing_ok=True)
        _state_dir_fault(rig, "state directory full (tmpfs)", fill, free, scale(1, 10))
    finally:
        rig.mesh.kill()
        rig.mesh.cli("cleanup")
        _umount(sd)


# -- no fault: the control row ------------------------------------------------------------

def test_no_fault_baseline(rig):
    mesh = rig.start().mesh
    envoy_pid = mesh.envoy_pid()
    ld = rig.load(seconds=int(os.environ.get("MESHD_FAULTS_BASELINE", scale(3, 30))) + 30)
    time.sleep(int(os.environ.get("MESHD_FAULTS_BASELINE", scale(3, 30))))
    res = ld.results(finish=True)
    report("none (control)" + (", client address preserved" if PRESERVE_CLIENT else ""), 0, res)
    assert_lossless(res, envoy_pid, mesh)


# -- Envoy killed ------------------------------------------------------------------------

def test_envoy_sigkill_under_load(rig):
    """A kill costs each client the operation in flight (and at most one more that
    races the listener's close); new connections go direct while Envoy is down and
    through the new Envoy once meshd restarted it."""
    mesh = rig.start().mesh
    n = scale(2, 10)
    ld = rig.load(seconds=60, events=True, rate=100)
    kills = []
    try:
        for _ in range(n):
            time.sleep(0.5)
            old = mesh.envoy_pid()
            kills.append(time.time())
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: (st := mesh.status()) and st["envoy"]["state"] == "running"
                     and st["envoy"]["pid"] not in (None, old) and st["state"] == "running",
                     timeout=15, what="Envoy restarted by meshd")
            wait_for(rig.via_envoy_egress, timeout=5, what="egress through the new Envoy")
        time.sleep(0.5)
    finally:
        res = ld.results(finish=True)
    t = res["total"]
    msg = loadmod.summary({k: {f: v for f, v in c.items() if f != "events"}
                           for k, c in res.items()})
    windows = [loadmod.after(res, k, nxt) for k, nxt in zip(kills, kills[1:] + [float("inf")])]
    served = all(w["first_ok"] is not None and w["first_via_envoy"] is not None for w in windows)
    if served:
        report("Envoy SIGKILL", n, res,
               recovery=f"new connections served (direct) {max(w['first_ok'] for w in windows) * 1000:.0f}"
                        f" ms after the kill at worst; through the new Envoy after "
                        f"{max(w['first_via_envoy'] for w in windows) * 1000:.0f} ms at worst",
               note=f"lost in flight at the kill: {sum(w['failed_in_flight'] for w in windows)}; "
                    f"new operations started after it and lost: "
                    f"{sum(w['failed_after'] for w in windows)}")
    assert served, windows
    for name, c in res.items():
        if name != "total":
            # the operation in flight, and at most one more that raced the listener's
            # close or the new Envoy's start (measured: bench/README.md, "Faults")
            assert c["failed"] <= 2 * n and c["dropped"] <= 2 * n, msg
            assert c["events"][-1][2] == 1, msg                     # serving at the end
    assert t["direct"] > 0, msg                                       # failed open meanwhile
    assert mesh.status()["envoy"]["restarts"] == n


# -- the long run: reloads and workload churn, fds flat ------------------------------------

class LogTail:
    """Counts a message in meshd's log, reading only what was added since last time."""

    def __init__(self, mesh):
        self.mesh, self.pos, self.seen = mesh, 0, {}

    def count(self, text: str) -> int:
        self.mesh.log.flush()
        with open(self.mesh.log.name) as f:
            f.seek(self.pos)
            new = f.read()
            self.pos = f.tell()
        for t in set(self.seen) | {text}:
            self.seen[t] = self.seen.get(t, 0) + new.count(t)
        return self.seen[text]

    def wait(self, text: str, n: int, what: str) -> None:
        wait_for(lambda: self.count(text) >= n, timeout=10, interval=0.005, what=what)


def footprint(pid: int) -> tuple[int, int]:
    """(open fds, resident KiB) of a process; the fewest fds of a few looks, so that
    a file open for a moment (a /proc read by a rescan) is not counted."""
    fds = min(len(os.listdir(f"/proc/{pid}/fd")) for _ in range(5) if time.sleep(0.02) is None)
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, rss


def test_fds_flat_across_reloads_and_workload_churn(mesh, server):
    """SIGHUP reloads and a workload cgroup removed and re-created, over and over:
    meshd's open files do not grow (RSS is reported, not asserted)."""
    reloads = int(os.environ.get("MESHD_FAULTS_RELOADS", scale(100, 10000)))
    churns = int(os.environ.get("MESHD_FAULTS_CHURNS", scale(10, 1000)))
    every = max(1, int(os.environ.get("MESHD_FAULTS_SAMPLE_EVERY", 0)) or reloads // 10)
    churn = mesh.cg.make("churn")
    mesh.configure()
    mesh.write("20-churn.toml", f'[workload.churn]\ncgroup = "{churn}"\n')
    mesh.start()
    pid, tail = mesh.proc.pid, LogTail(mesh)
    tail.wait("workload churn enrolled", 1, "churn enrolled")

    def reload(i: int) -> None:
        mesh.proc.send_signal(signal.SIGHUP)
        tail.wait("configuration reloaded (SIGHUP)", i, "a SIGHUP reload")

    def recreate(i: int) -> None:
        os.rmdir(mesh.cg.path(churn))
        tail.wait("workload churn no longer enrolled", i, "churn gone")
        mesh.cg.make("churn")
        tail.wait("workload churn enrolled", i + 1, "churn re-enrolled")
    for i in range(1, 21):      # warm up: caches, lazily opened files
        reload(i)
    for i in range(1, 4):
        recreate(i)
    base, t0 = footprint(pid), time.monotonic()
    curve = [("start", 0, *base, 0.0)]   # (phase, count, fds, RSS KiB, s since start)
    for i in range(1, reloads + 1):
        reload(20 + i)
        if i % every == 0:
            curve.append(("reloads", i, *footprint(pid), round(time.monotonic() - t0, 1)))
    for i in range(1, churns + 1):
        recreate(3 + i)
        if i % max(1, every // 10) == 0:
            curve.append(("churns", i, *footprint(pid), round(time.monotonic() - t0, 1)))
    end = footprint(pid)
    curve.append(("end", reloads + churns, *end, round(time.monotonic() - t0, 1)))
    assert mesh.proc.poll() is None
    assert "Traceback" not in mesh.log_text()
    path = os.environ.get("MESHD_FAULTS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(dict(longrun=dict(reloads=reloads, churns=churns, curve=curve))) + "\n")
    assert end[0] <= base[0], curve          # fds do not grow
    assert via_envoy_curl(mesh, server)


def via_envoy_curl(mesh, server) -> bool:
    r = mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo")
    return r.returncode == 0 and VIA_ENVOY in json.loads(r.stdout)["headers"]
