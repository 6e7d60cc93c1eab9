"""Envoy as a systemd transient unit: the properties meshd asks for, the slice and unit
names, and the supervisor's decisions (adopt / start / restart / stop) against a fake
systemd manager.  No systemd here (PID 1 is not systemd on the dev machine); the nspawn
tier runs the real thing."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from helpers import fake_envoy
from meshd.envoy import identity, process, systemd_manager
from meshd.envoy import systemd_unit as es
from meshd.envoy.supervisor import RESTARTING, STARTING, STOPPED
from meshd.envoy_config import bootstrap_path

# -- slice and unit names --------------------------------------------------------------


@pytest.mark.parametrize("root, want", [
    ("/meshd.slice", "meshd.slice"),
    ("meshd.slice", "meshd.slice"),
    ("/meshd.slice/", "meshd.slice"),
    ("/meshd.slice/meshd-a.slice", "meshd-a.slice"),
    ("/meshd.slice/meshd-a.slice/meshd-a-b.slice", "meshd-a-b.slice"),
    ("/", None),
    ("", None),
    ("/mt12ab34/meshd", None),              # the tests' cgroup roots: child-process mode
    ("/system.slice/meshd.service", None),  # a service is not a slice
    ("/a-b.slice", None),                   # would live in a.slice, not at the top
    ("/meshd.slice/other.slice", None),     # systemd would put other.slice at the top
    ("/-.slice", None),
    ("/meshd--x.slice", None),
])
def test_slice_for_cgroup_root(root, want):
    assert es.slice_for_cgroup_root(root) == want


def test_default_instance_uses_the_plain_unit_name():
    assert es.unit_name_for("/run/meshd") == "meshd-envoy.service"
    assert es.unit_name_for("/run/meshd/") == "meshd-envoy.service"
    assert es.unit_name_for("/run/./meshd") == "meshd-envoy.service"


def test_other_instances_get_their_own_stable_unit():
    a, b = es.unit_name_for("/run/meshd-a"), es.unit_name_for("/run/meshd-b")
    assert len({a, b, "meshd-envoy.service"}) == 3
    assert a == es.unit_name_for("/run/meshd-a")
    for name in (a, b):
        assert name.startswith("meshd-envoy-") and name.endswith(".service")
        assert all(c.isalnum() or c in "-." for c in name) and len(name) < 64


# -- the transient unit's properties ---------------------------------------------------


def props(**kw) -> dict:
    args = dict(binary="/usr/bin/envoy", state_dir="/run/meshd", log_level="warning",
                slice_name="meshd.slice")
    args.update(kw)
    out = es.unit_properties(**args)
    names = [n for n, _, _ in out]
    assert len(names) == len(set(names)), "a property is set twice"
    return {n: (sig, v) for n, sig, v in out}


def test_exec_start_runs_envoy_on_our_bootstrap_with_the_journal_as_log():
    p = props()
    sig, execs = p["ExecStart"]
    assert sig == "a(sasb)"
    assert execs == [("/usr/bin/envoy",
                      ["/usr/bin/envoy", "-c", "/run/meshd/envoy/bootstrap.json", "-l",
                       "warning", "--disable-hot-restart"], False)]
    assert "--log-path" not in execs[0][1]
    assert p["StandardOutput"] == ("s", "journal")
    assert p["StandardError"] == ("s", "journal")
    assert p["SyslogIdentifier"] == ("s", "meshd-envoy")


def test_unit_lives_in_the_slice_and_is_supervised_by_meshd_alone():
    p = props(slice_name="meshd-a.slice")
    assert p["Slice"] == ("s", "meshd-a.slice")
    assert p["Type"] == ("s", "simple")
    assert p["Restart"] == ("s", "no")
    assert p["KillMode"] == ("s", "mixed")
    assert p["CollectMode"] == ("s", "inactive-or-failed")
    assert p["TimeoutStopUSec"] == ("t", 5_000_000)
    assert "Description" in p and "/run/meshd" in p["Description"][1]


def test_no_property_would_tie_envoy_to_meshds_own_unit():
    # Envoy must survive `systemctl stop/restart meshd`: no PartOf/BindsTo/Requires on it.
    p = props()
    for key in ("PartOf", "BindsTo", "Requires", "StopWhenUnneeded", "RemainAfterExit"):
        assert key not in p


USER = identity.EnvoyIdentity("meshd-envoy", 998, 997, ("CAP_NET_ADMIN", "CAP_SYS_ADMIN"))


def test_envoy_keeps_only_the_capabilities_it_uses():
    p = props(identity=USER)
    assert p["User"] == ("s", "meshd-envoy")
    assert p["CapabilityBoundingSet"] == p["AmbientCapabilities"] == ("t", (1 << 12) | (1 << 21))
    assert props()["NoNewPrivileges"] == ("b", True)
    low = identity.EnvoyIdentity("meshd-envoy", 998, 997, identity.capabilities_for([80]))
    assert props(identity=low)["CapabilityBoundingSet"][1] == (1 << 10) | (1 << 12) | (1 << 21)


def test_envoy_as_root_without_its_user_keeps_the_bounding_set():
    root = identity.EnvoyIdentity("root", 0, 0, ("CAP_NET_ADMIN", "CAP_SYS_ADMIN"), "no user")
    p = props(identity=root)
    assert "User" not in p and p["AmbientCapabilities"] == ("t", 0)
    assert p["CapabilityBoundingSet"] == ("t", (1 << 12) | (1 << 21))


def test_sandbox_writes_only_envoys_run_directory():
    p = props(identity=USER)
    assert p["ProtectSystem"] == ("s", "strict")
    assert p["ReadWritePaths"] == ("as", ["/run/meshd/envoy-run"])
    assert p["ProtectHome"] == ("s", "yes")
    assert props(binary="/root/venv/envoy", identity=USER)["ProtectHome"] == ("s", "read-only")
    assert p["RestrictNamespaces"] == ("t", 0x40000000)   # setns into network namespaces only
    assert p["SystemCallFilter"] == ("(bas)", (True, ["@system-service"]))
    assert props()["LimitNOFILE"] == props()["LimitNOFILESoft"] == ("t", 524288)


def test_network_namespace_only_when_configured():
    assert "NetworkNamespacePath" not in props()
    p = props(netns="/run/netns/h1")
    assert p["NetworkNamespacePath"] == ("s", "/run/netns/h1")


def test_relative_state_dir_is_made_absolute():
    p = props(state_dir="run")
    argv = p["ExecStart"][1][0][1]
    assert argv[2] == os.path.join(os.getcwd(), "run", "envoy", "bootstrap.json")


# The D-Bus type systemd declares for each property it is sent (org.freedesktop.systemd1(5)):
# StartTransientUnit refuses a property whose variant has another type.
SYSTEMD_TYPES = {
    "Description": "s", "ExecStart": "a(sasb)", "Type": "s", "Slice": "s", "Restart": "s",
    "KillMode": "s", "TimeoutStopUSec": "t", "CollectMode": "s", "StandardOutput": "s",
    "StandardError": "s", "SyslogIdentifier": "s", "LimitNOFILE": "t", "LimitNOFILESoft": "t",
    "NoNewPrivileges": "b", "ProtectSystem": "s", "CapabilityBoundingSet": "t",
    "NetworkNamespacePath": "s", "User": "s", "AmbientCapabilities": "t", "ReadWritePaths": "as",
    "ProtectHome": "s", "PrivateTmp": "b", "PrivateDevices": "b", "ProtectKernelTunables": "b",
    "ProtectKernelModules": "b", "ProtectKernelLogs": "b", "ProtectControlGroups": "b",
    "ProtectClock": "b", "ProtectHostname": "b", "ProtectProc": "s", "RestrictNamespaces": "t",
    "RestrictAddressFamilies": "(bas)", "SystemCallArchitectures": "as",
    "SystemCallFilter": "(bas)", "SystemCallErrorNumber": "i", "RestrictRealtime": "b",
    "RestrictSUIDSGID": "b", "LockPersonality": "b", "MemoryDenyWriteExecute": "b",
    "RemoveIPC": "b", "UMask": "u",
}


def test_start_transient_unit_call_carries_each_property_with_systemds_type():
    GLib = pytest.importorskip("gi.repository.GLib")
    out = es.unit_properties("/e/envoy", "/run/meshd", "info", "meshd.slice", netns="/run/netns/x",
                             identity=USER)
    call = GLib.Variant("(ssa(sv)a(sa(sv)))",
                        ("meshd-envoy.service", "replace", systemd_manager.to_variants(out), []))
    props = call.get_child_value(2)
    sent = {}
    for i in range(props.n_children()):
        pair = props.get_child_value(i)   # (sv)
        sent[pair.get_child_value(0).get_string()] = pair.get_child_value(1).get_variant()
    assert {n: v.get_type_string() for n, v in sent.items()} == SYSTEMD_TYPES
    assert sent["ExecStart"].unpack() == [
        ("/e/envoy", ["/e/envoy", "-c", "/run/meshd/envoy/bootstrap.json", "-l", "info",
                      "--disable-hot-restart"], False)]


# -- the supervisor against a fake systemd ---------------------------------------------


class FakeManager(systemd_manager.SystemdManager):
    """SystemdManager's D-Bus calls faked (stop_and_wait is the real one, on top of
    them): units are real processes (a copy of `tail` named envoy, following our bootstrap
    file, so process.is_our_envoy accepts them)."""

    def __init__(self, fake_envoy: str):   # no bus
        self.fake_envoy = fake_envoy
        self.units: dict[str, tuple[str, subprocess.Popen]] = {}
        self.calls: list[tuple] = []

    def run(self, name: str, argv: list[str]) -> subprocess.Popen:
        p = fake_envoy.start([self.fake_envoy] + argv[1:])
        self.units[name] = ("active", p)
        return p

    def unit(self, name):
        u = self.units.get(name)
        if u is None:
            return None
        state, p = u
        if p.poll() is not None:   # main process died: systemd collects the unit
            del self.units[name]
            return None
        return state, p.pid

    def start_transient(self, name, props):
        self.calls.append(("start", name))
        argv = dict((n, v) for n, _, v in props)["ExecStart"][0][1]
        # `tail -f FILE`: the bootstrap path is in argv, as for Envoy's `-c FILE`
        self.run(name, [argv[0], "-f", argv[2]])
        return "/org/freedesktop/systemd1/job/1"

    def stop(self, name):
        self.calls.append(("stop", name))
        u = self.units.pop(name, None)
        if u is None:
            return False
        u[1].terminate()
        u[1].wait(5)
        return True

    def reset_failed(self, name):
        self.calls.append(("reset", name))

    def kill_all(self):
        for _, p in self.units.values():
            p.kill()
            p.wait(5)


@pytest.fixture
def fake(tmp_path):
    GLib = pytest.importorskip("gi.repository.GLib")
    binary = fake_envoy.binary(tmp_path)
    state = tmp_path / "run"
    os.makedirs(os.path.dirname(bootstrap_path(str(state))))
    open(bootstrap_path(str(state)), "w").write("{}\n")
    m = FakeManager(str(binary))
    states: list[str] = []
    sup = es.SystemdEnvoySupervisor(str(binary), str(state), "meshd.slice", "info",
                                    states.append, manager=m)
    yield sup, m, states, GLib
    sup.detach()
    m.kill_all()


def spin(GLib, pred, timeout=5.0):
    ctx = GLib.MainContext.default()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while ctx.iteration(False):
            pass
        if pred():
            return True
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_starts_the_unit_when_there_is_none(fake):
    sup, m, states, GLib = fake
    sup.start()
    assert m.calls == [("start", sup.unit_name)]
    spin(GLib, lambda: sup.pid is not None)
    assert sup.pid == m.unit(sup.unit_name)[1]
    assert not sup.adopted and sup.state == STARTING and sup.restarts == 0


def test_adopts_a_running_unit_instead_of_starting_a_second_envoy(fake):
    sup, m, states, GLib = fake
    p = m.run(sup.unit_name, sup.command()[:1] + ["-f", sup.bootstrap])
    sup.start()
    assert m.calls == []
    assert sup.adopted and sup.pid == p.pid and sup.state == STARTING


def test_replaces_a_unit_that_does_not_run_our_envoy(fake):
    sup, m, states, GLib = fake
    m.run(sup.unit_name, sup.command()[:1] + ["-f", "/dev/null"])  # not our bootstrap
    sup.start()
    assert [c[0] for c in m.calls if c[0] != "reset"] == ["stop", "start"]
    assert not sup.adopted


def test_restarts_with_backoff_when_envoy_dies(fake):
    sup, m, states, GLib = fake
    sup.start()
    spin(GLib, lambda: sup.pid is not None)
    first = sup.pid
    os.kill(first, signal.SIGKILL)
    spin(GLib, lambda: sup.state == RESTARTING)
    assert sup.restarts == 1 and sup.pid is None
    spin(GLib, lambda: sup.pid is not None and sup.pid != first)
    assert [c[0] for c in m.calls] == ["start", "start"]
    assert STARTING in states and RESTARTING in states


def restart_delays(caplog) -> list[str]:
    """The delays of "<restart phrase> in 0.2s" log lines, in order."""
    return [r.getMessage().rsplit(" in ", 1)[1] for r in caplog.records
            if r.levelname == "INFO" and " again in " in r.getMessage()]


def test_backoff_grows_for_an_envoy_that_never_serves(fake, caplog):
    """A crash loop: each Envoy dies before answering /ready (the fake never does)."""
    sup, m, states, GLib = fake
    caplog.set_level("INFO", logger="meshd.envoy")
    sup.start()
    for _ in range(3):
        spin(GLib, lambda: sup.pid is not None)
        pid = sup.pid
        os.kill(pid, signal.SIGKILL)
        spin(GLib, lambda: sup.pid is None or sup.pid != pid)
    assert restart_delays(caplog)[:3] == ["0.2s", "0.4s", "0.8s"]


def test_an_envoy_that_served_is_restarted_without_delay_growth(fake, caplog, monkeypatch):
    """Kills in a row of an Envoy that was serving are not a crash loop: each next Envoy
    starts after the first backoff step, so recovery does not slow down kill by kill."""
    from meshd.envoy import supervisor
    sup, m, states, GLib = fake
    caplog.set_level("INFO", logger="meshd.envoy")
    monkeypatch.setattr(supervisor, "is_ready", lambda sock: True)
    monkeypatch.setattr(supervisor, "BACKOFF_RESET_AFTER_READY", 0.0)
    sup.start()
    for _ in range(3):
        spin(GLib, lambda: sup.state == supervisor.RUNNING and sup.pid is not None)
        pid = sup.pid
        os.kill(pid, signal.SIGKILL)
        spin(GLib, lambda: sup.pid is None or sup.pid != pid)
    assert restart_delays(caplog)[:3] == ["0.2s", "0.2s", "0.2s"]


def test_stop_stops_the_unit(fake):
    sup, m, states, GLib = fake
    sup.start()
    spin(GLib, lambda: sup.pid is not None)
    sup.stop()
    assert ("stop", sup.unit_name) in m.calls
    assert m.unit(sup.unit_name) is None
    assert sup.state == STOPPED and sup.pid is None


def test_detach_leaves_the_unit_running(fake):
    sup, m, states, GLib = fake
    sup.start()
    spin(GLib, lambda: sup.pid is not None)
    pid = sup.pid
    sup.detach()
    assert [c[0] for c in m.calls] == ["start"]
    assert m.unit(sup.unit_name) == ("active", pid)


def test_replaces_an_envoy_left_by_child_process_mode(fake):
    """A meshd that ran without systemd left its Envoy (named by envoy.pid): the unit's
    Envoy must not serve next to it."""
    sup, m, states, GLib = fake
    os.makedirs(sup.state_dir, exist_ok=True)
    child = fake_envoy.start([m.fake_envoy, "-f", sup.bootstrap])
    try:
        process.write_pid_file(sup.state_dir, child.pid)
        sup.start()
        assert process.pidfd_open(child.pid) is None   # stopped and reaped
        assert process.read_pid_file(sup.state_dir) is None
        assert m.calls == [("start", sup.unit_name)]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_stop_unit_without_systemd_does_not_touch_the_bus(monkeypatch):
    made = []
    monkeypatch.setattr(systemd_manager, "systemd_booted", lambda: False)
    monkeypatch.setattr(systemd_manager, "SystemdManager", lambda *a: made.append(a))
    assert es.stop_unit("meshd-envoy.service") is False
    assert systemd_manager.connect() is None
    assert made == []
