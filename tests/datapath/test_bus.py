"""meshd's D-Bus layer (meshd/bus.py) against a REAL dbus-daemon and the real busctl.

A stand-in daemon (status() returns the same model as Daemon.status(), reload() flips a flag)
sits behind a BusService on a private system-type bus that enforces the shipped
policy (etc/dbus-1/io.meshd.Mesh1.conf). The GLib main loop runs in a thread;
every call into the BusService is made on that thread, as in meshd.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from helpers.dbus import PrivateBus

gi = pytest.importorskip("gi")
from gi.repository import Gio, GLib  # noqa: E402

from meshd import bus as mbus  # noqa: E402
from meshd.config import ConfigError  # noqa: E402
from meshd.status import Status, format_text  # noqa: E402

pytestmark = pytest.mark.root
NOBODY = 65534
NAME, PATH = mbus.BUS_NAME, mbus.MANAGER_PATH
MGR, WL = mbus.MANAGER_IFACE, mbus.WORKLOAD_IFACE

if os.geteuid() != 0:
    pytest.skip("needs root (setpriv to another user, EXTERNAL auth as root)",
                allow_module_level=True)


def counters(**kw):
    c = dict.fromkeys(("redirected", "excluded", "fail_open", "answered", "miss", "peername",
                       "closed", "inbound", "inbound_excluded", "inbound_fail_open"), 0)
    c.update(kw)
    return c


def workload(name, wid, enrolled=True, **kw):
    w = {"name": name, "id": wid, "cgroup": f"/system.slice/{name}" if enrolled else None,
         "cgroup_id": 1000 + wid if enrolled else 0,
         "enrolled_since": 1764150000.25 if enrolled else 0.0,
         "error": "" if enrolled else f"waiting for unit {name} to start",
         "other_programs": {}, "counters": counters(), "inbound_ports": []}
    w.update(kw)
    return w


class FakeDaemon:
    """What BusService needs from meshd.daemon.Daemon. The status is kept in its
    JSON form (easy to change in a test) and handed out as the model."""

    def __init__(self):
        self.bus = None
        self.reloads: list[str] = []
        self.accept = True
        self.st = {
            "version": "0.1.0", "pid": os.getpid(), "state": "running",
            "updated": time.time(), "started": 1764150000.5,
            "config_dir": "/etc/meshd", "config_files": ["/etc/meshd/meshd.toml"],
            "config_errors": [],
            "mesh": {"outbound_port": 15001, "inbound_port": 15006,
                     "exclude_outbound_ports": [22], "exclude_outbound_cidrs": ["10.9.0.0/16"],
                     "bpffs_dir": "/sys/fs/bpf/meshd", "state_dir": "/run/meshd",
                     "cgroup_root": "/meshd.slice"},
            "envoy": {"state": "running", "pid": 4242, "adopted": False, "restarts": 1,
                      "admin_socket": "/run/meshd/envoy-run/admin.sock",
                      "listeners": {"ipv4": True, "ipv6": True, "inbound_ipv4": True,
                                    "inbound_ipv6": False}},
            "datapath": {"pins": "/sys/fs/bpf/meshd/v1", "adopted": True,
                         "links": ["envoy:getsockopt", "workload:web:connect4"],
                         "tracked_connections": 3},
            "counters": counters(answered=7, miss=1),
            "workloads": [
                workload("web", 1, counters=counters(redirected=5, closed=2),
                         inbound_ports=[8080, 8443], other_programs={"connect4": [77]}),
                workload("my-app.service", 2, enrolled=False),
            ],
        }

    def status(self) -> Status:
        st = copy.deepcopy(self.st)
        st["updated"] = time.time()
        return Status.from_dict(st)

    def reload(self, why: str) -> bool:
        self.reloads.append(why)
        if self.accept:
            self.st["config_errors"] = []
        else:  # what Daemon.reload() does on a rejected config, through the bus hooks
            errs = [ConfigError("/etc/meshd/10-web.toml", 3, "workload.web.cgroup",
                                "must start with /")]
            self.st["config_errors"] = [dataclasses.asdict(e) for e in errs]
            self.bus.config_rejected(errs)
        self.bus.update(self.status())
        return self.accept


class Loop:
    """The GLib main loop in a thread; run() executes a function on it."""

    def __init__(self):
        self.loop = GLib.MainLoop()
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def run(self, fn, *args):
        done, box = threading.Event(), {}

        def call():
            try:
                box["value"] = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                box["error"] = e
            done.set()
            return False
        GLib.idle_add(call)
        assert done.wait(10), "main loop did not run the call"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def stop(self):
        self.loop.quit()
        self.thread.join(5)


class Signals:
    """Every signal from meshd's objects, collected by a second client connection."""

    def __init__(self, address: str):
        self.con = Gio.DBusConnection.new_for_address_sync(
            address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
            | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
        self.q: queue.Queue = queue.Queue()
        self.sub = self.con.signal_subscribe(
            None, None, None, None, None, Gio.DBusSignalFlags.NONE,
            lambda _c, _s, path, iface, name, params: self.q.put(
                (path, iface, name, params.unpack())))
        # A round trip to the bus, so the match rule is in place before we go on.
        self.con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus", "GetId", None, None,
                           Gio.DBusCallFlags.NONE, 2000, None)

    def wait(self, pred, timeout=5.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                item = self.q.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if item[0].startswith(PATH) and pred(*item):
                return item
        raise AssertionError("expected signal did not arrive")

    def drain(self, settle=0.2):
        time.sleep(settle)
        out = []
        while not self.q.empty():
            item = self.q.get()
            if item[0].startswith(PATH):
                out.append(item)
        return out

    def close(self):
        self.con.signal_unsubscribe(self.sub)
        self.con.close_sync(None)


def start_service(bus: PrivateBus, loop: Loop, monkeypatch, daemon=None):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    daemon = daemon or FakeDaemon()
    svc = loop.run(mbus.BusService, daemon)
    daemon.bus = svc
    assert loop.run(svc.publish) is True
    return daemon, svc


@pytest.fixture
def env(monkeypatch):
    """A private bus with the shipped policy, a main loop, and a published BusService."""
    bus = PrivateBus().start()
    loop = Loop()
    svc = None
    try:
        daemon, svc = start_service(bus, loop, monkeypatch)
        yield bus, loop, daemon, svc
    finally:
        if svc is not None:
            loop.run(svc.close)
        loop.stop()
        bus.stop()


def jget(bus, path, iface, prop, user=None):
    r = bus.busctl("--json=short", "get-property", NAME, path, iface, prop, user=user)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def gdbus_call(bus, path, method, user=None):
    cmd = ["gdbus", "call", "--address", bus.address, "--dest", NAME, "--object-path", path,
           "--method", method]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10)


# ------------------------------------------------------------------------------------------
def test_object_path_escaping_is_systemds():
    assert mbus.escape_label("web") == "web"
    assert mbus.escape_label("my-app.service") == "my_2dapp_2eservice"
    assert mbus.escape_label("a_b") == "a_5fb"
    assert mbus.escape_label("") == "_"
    for name in ("web", "my-app.service", "a_b", "ünï", "", "_2d"):
        assert mbus.unescape_label(mbus.escape_label(name)) == name
        assert GLib.Variant.is_object_path(mbus.workload_path(name))


def test_introspect_properties_and_list(env):
    bus, loop, daemon, svc = env
    r = bus.busctl("introspect", NAME, PATH)
    assert r.returncode == 0, r.stderr
    for member in (MGR, ".Reload", ".ListWorkloads", ".ConfigRejected", ".WorkloadAdded",
                   ".WorkloadRemoved", ".Counters", ".EnvoyPID", "org.freedesktop.DBus.Peer",
                   "org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable"):
        assert member in r.stdout, member
    tree = bus.busctl("tree", NAME).stdout
    assert "/io/meshd/Mesh1/workload/web" in tree
    assert "/io/meshd/Mesh1/workload/my_2dapp_2eservice" in tree

    assert jget(bus, PATH, MGR, "State") == {"type": "s", "data": "running"}
    assert jget(bus, PATH, MGR, "EnvoyPID") == {"type": "u", "data": 4242}
    assert jget(bus, PATH, MGR, "OutboundPort") == {"type": "q", "data": 15001}
    assert jget(bus, PATH, MGR, "ConfigErrors") == {"type": "a(siss)", "data": []}
    c = jget(bus, PATH, MGR, "Counters")
    assert c["type"] == "a{st}"
    # host total = unattributed (slot 0) + every workload's counters
    assert c["data"]["answered"] == 7 and c["data"]["redirected"] == 5
    assert c["data"]["miss"] == 1 and c["data"]["closed"] == 2
    assert jget(bus, PATH, MGR, "UnattributedCounters")["data"]["redirected"] == 0

    r = bus.busctl("--json=short", "call", NAME, PATH, MGR, "ListWorkloads")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["data"] == [[
        ["my-app.service", "/io/meshd/Mesh1/workload/my_2dapp_2eservice"],
        ["web", "/io/meshd/Mesh1/workload/web"]]]

    web = mbus.workload_path("web")
    assert jget(bus, web, WL, "State")["data"] == "enrolled"
    assert jget(bus, web, WL, "EnrolledSince") == {"type": "t", "data": 1764150000250000}
    assert jget(bus, web, WL, "InboundPorts") == {"type": "aq", "data": [8080, 8443]}
    assert jget(bus, web, WL, "Counters")["data"]["redirected"] == 5
    waiting = mbus.workload_path("my-app.service")
    assert jget(bus, waiting, WL, "State")["data"] == "waiting for unit my-app.service to start"
    assert jget(bus, waiting, WL, "EnrolledSince")["data"] == 0

    assert bus.busctl("call", NAME, PATH, "org.freedesktop.DBus.Peer", "Ping").returncode == 0
    r = bus.busctl("set-property", NAME, PATH, MGR, "State", "s", "x")
    assert r.returncode != 0  # read-only

    # `meshd status` over D-Bus: the property table decodes the very model the
    # daemon published (workloads in ListWorkloads' order; "updated" is not on the bus)
    st = mbus.read_status(bus.address)
    want = daemon.status()
    assert st == dataclasses.replace(want, updated=st.updated, workloads=tuple(
        sorted(want.workloads, key=lambda w: w.name)))
    assert [w.name for w in st.workloads] == ["my-app.service", "web"]
    w = st.workloads[1]
    assert w.cgroup == "/system.slice/web" and w.enrolled_since == 1764150000.25
    assert w.other_programs == {"connect4": (77,)} and w.inbound_ports == (8080, 8443)
    assert st.workloads[0].cgroup is None and st.workloads[0].enrolled_since == 0
    text = format_text(st, True, "D-Bus")
    assert "meshd 0.1.0: running" in text and "waiting for unit my-app.service" in text


def test_workload_objects_come_and_go_with_signals(env):
    bus, loop, daemon, svc = env
    sig = Signals(bus.address)
    try:
        loop.run(svc.update, daemon.status())
        assert sig.drain() == []  # nothing changed: nothing emitted

        daemon.st["workloads"].append(workload("db", 3))
        loop.run(svc.update, daemon.status())
        db = mbus.workload_path("db")
        sig.wait(lambda p, i, n, a: (i, n, a) == (MGR, "WorkloadAdded", ("db", db)))
        assert "/io/meshd/Mesh1/workload/db" in bus.busctl("tree", NAME).stdout
        assert jget(bus, db, WL, "Name")["data"] == "db"

        daemon.st["workloads"].pop()
        loop.run(svc.update, daemon.status())
        sig.wait(lambda p, i, n, a: (i, n, a) == (MGR, "WorkloadRemoved", ("db", db)))
        assert "workload/db" not in bus.busctl("tree", NAME).stdout
        assert bus.busctl("get-property", NAME, db, WL, "Name").returncode != 0

        # PropertiesChanged carries exactly the values that changed
        sig.drain()
        daemon.st["state"] = "degraded"
        daemon.st["envoy"].update(state="restarting", pid=None)
        daemon.st["workloads"][0]["counters"] = counters(redirected=9, closed=2)
        loop.run(svc.update, daemon.status())
        _, _, _, (iface, changed, inval) = sig.wait(
            lambda p, i, n, a: p == PATH and n == "PropertiesChanged")
        assert iface == MGR and inval == []
        assert changed["State"] == "degraded" and changed["EnvoyState"] == "restarting"
        assert changed["EnvoyPID"] == 0 and changed["Counters"]["redirected"] == 9
        assert "Version" not in changed and "OutboundPort" not in changed
        _, _, _, (iface, changed, _) = sig.wait(
            lambda p, i, n, a: p == mbus.workload_path("web") and n == "PropertiesChanged")
        assert iface == WL and set(changed) == {"Counters"}
        assert changed["Counters"]["redirected"] == 9

        # a workload that gets enrolled: State and EnrolledSince change together
        daemon.st["workloads"][1] = workload("my-app.service", 2)
        loop.run(svc.update, daemon.status())
        _, _, _, (_, changed, _) = sig.wait(
            lambda p, i, n, a: p.endswith("my_2dapp_2eservice") and n == "PropertiesChanged")
        assert changed["State"] == "enrolled" and changed["EnrolledSince"] == 1764150000250000
    finally:
        sig.close()


def test_reload_as_root_and_rejection_signal(env):
    bus, loop, daemon, svc = env
    r = bus.busctl("call", NAME, PATH, MGR, "Reload")
    assert (r.returncode, r.stdout.strip()) == (0, "b true"), r.stderr
    assert daemon.reloads == ["D-Bus Reload()"]

    sig = Signals(bus.address)
    try:
        daemon.accept = False
        r = bus.busctl("call", NAME, PATH, MGR, "Reload")
        assert r.stdout.strip() == "b false", r.stderr
        _, _, _, (errors,) = sig.wait(lambda p, i, n, a: n == "ConfigRejected")
        assert errors == [("/etc/meshd/10-web.toml", 3, "workload.web.cgroup", "must start with /")]
        _, _, _, (_, changed, _) = sig.wait(
            lambda p, i, n, a: p == PATH and n == "PropertiesChanged")
        assert changed["ConfigErrors"] == errors
    finally:
        sig.close()
    assert jget(bus, PATH, MGR, "ConfigErrors")["data"] == [list(errors[0])]


def test_non_root_may_read_but_not_reload(env):
    bus, loop, daemon, svc = env
    r = bus.busctl("--json=short", "call", NAME, PATH, "org.freedesktop.DBus.Properties",
                   "GetAll", "s", MGR, user=NOBODY)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["data"][0]["State"]["data"] == "running"
    assert bus.busctl("introspect", NAME, PATH, user=NOBODY).returncode == 0
    assert bus.busctl("call", NAME, PATH, MGR, "ListWorkloads", user=NOBODY).returncode == 0
    assert jget(bus, mbus.workload_path("web"), WL, "State", user=NOBODY)["data"] == "enrolled"

    r = bus.busctl("call", NAME, PATH, MGR, "Reload", user=NOBODY)
    assert r.returncode != 0
    r = gdbus_call(bus, PATH, f"{MGR}.Reload", user=NOBODY)
    assert r.returncode != 0 and "org.freedesktop.DBus.Error.AccessDenied" in r.stderr, r.stderr
    assert "Rejected send message" in r.stderr  # the bus policy stopped it, not meshd
    assert daemon.reloads == []


def test_reload_checks_the_uid_in_code_too(monkeypatch, tmp_path):
    """With a bus that lets anyone call anything, meshd itself refuses non-root."""
    lax = tmp_path / "lax.conf"
    lax.write_text("<busconfig><policy context='default'><allow send_destination='*'/>"
                   "</policy></busconfig>")
    bus, loop = PrivateBus(policy=lax).start(), Loop()
    try:
        daemon, svc = start_service(bus, loop, monkeypatch)
        r = gdbus_call(bus, PATH, f"{MGR}.Reload", user=NOBODY)
        assert "org.freedesktop.DBus.Error.AccessDenied" in r.stderr, r.stderr
        assert "only root" in r.stderr
        assert daemon.reloads == []
        loop.run(svc.close)
    finally:
        loop.stop()
        bus.stop()


def test_policy_on_a_system_bus_default(monkeypatch):
    """Under Debian's system.conf defaults (no owning, no method calls) the shipped
    file must open exactly the read-only API; only root owns the name."""
    bus, loop = PrivateBus(default_policy="system").start(), Loop()
    try:
        daemon, svc = start_service(bus, loop, monkeypatch)
        for args in (("introspect", NAME, PATH),
                     ("get-property", NAME, PATH, MGR, "Version"),
                     ("call", NAME, PATH, "org.freedesktop.DBus.Properties", "GetAll", "s", MGR),
                     ("call", NAME, PATH, MGR, "ListWorkloads"),
                     ("call", NAME, PATH, "org.freedesktop.DBus.Peer", "Ping")):
            r = bus.busctl(*args, user=NOBODY)
            assert r.returncode == 0, (args, r.stderr)
        r = gdbus_call(bus, PATH, f"{MGR}.Reload", user=NOBODY)
        assert "org.freedesktop.DBus.Error.AccessDenied" in r.stderr, r.stderr
        assert bus.busctl("call", NAME, PATH, MGR, "Reload").stdout.strip() == "b true"
        # nobody cannot own the name, even once meshd is gone
        loop.run(svc.close)
        own = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "/usr/bin/python3", "-c",
             "import sys; from gi.repository import Gio, GLib\n"
             "c = Gio.DBusConnection.new_for_address_sync(sys.argv[1], "
             "Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | "
             "Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)\n"
             "c.call_sync('org.freedesktop.DBus', '/org/freedesktop/DBus', "
             "'org.freedesktop.DBus', 'RequestName', GLib.Variant('(su)', (sys.argv[2], 4)), "
             "None, 0, 2000, None)", bus.address, NAME],
            capture_output=True, text=True, timeout=10)
        assert own.returncode != 0 and "AccessDenied" in own.stderr, own.stderr
    finally:
        loop.stop()
        bus.stop()


def test_publish_never_raises(monkeypatch, caplog):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/meshd-test-bus")
    svc = mbus.BusService(FakeDaemon())
    assert svc.publish() is False
    assert "without its D-Bus API" in caplog.text
    svc.update(FakeDaemon().status())  # no bus: still fine, and quiet
    svc.config_rejected([])
    svc.close()
    assert mbus.read_status("unix:path=/nonexistent/meshd-test-bus") is None

    bus, loop = PrivateBus().start(), Loop()
    try:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        assert mbus.read_status(bus.address) is None  # nobody owns the name yet
        daemon, first = start_service(bus, loop, monkeypatch)
        caplog.clear()
        second = loop.run(mbus.BusService, FakeDaemon())
        assert loop.run(second.publish) is False
        assert "already owned" in caplog.text
        loop.run(second.close)
        assert mbus.read_status(bus.address).state == "running"  # the first one still serves
        loop.run(first.close)
        assert mbus.read_status(bus.address) is None
    finally:
        loop.stop()
        bus.stop()


def test_back_on_the_bus_after_dbus_daemon_restarts(monkeypatch, caplog):
    monkeypatch.setattr(mbus, "RECONNECT_INTERVAL", 0.0)
    tmp = tempfile.mkdtemp(prefix="meshd-bus-")
    bus, loop = PrivateBus(tmp).start(), Loop()
    try:
        daemon, svc = start_service(bus, loop, monkeypatch)
        bus.stop()  # meshd must survive this (a shared GDBus connection would exit)
        wait = time.time() + 5
        while loop.run(lambda: svc.con) is not None and time.time() < wait:
            time.sleep(0.05)
        assert "lost the system bus" in caplog.text
        bus = PrivateBus(tmp).start()
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        loop.run(svc.update, daemon.status())
        assert jget(bus, mbus.workload_path("web"), WL, "State")["data"] == "enrolled"
        loop.run(svc.close)
    finally:
        loop.stop()
        bus.stop()
        shutil.rmtree(tmp, ignore_errors=True)
