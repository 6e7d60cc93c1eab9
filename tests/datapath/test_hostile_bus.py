"""The real daemon on a real (private) system bus, called with hostile input:
every method and property with wrong types, huge strings and unknown names gets a
proper D-Bus error, and meshd keeps serving (hypothesis picks the calls).

Also: `meshd run` under `ip netns exec` (no cgroup2 mount) says so in one line."""
from __future__ import annotations

import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MESHD
from helpers.common import sh
from test_bus_daemon import MANAGER, on_bus, prop  # noqa: F401 (fixture)

gi = pytest.importorskip("gi")
from gi.repository import Gio, GLib  # noqa: E402

from meshd import bus as mbus  # noqa: E402

pytestmark = pytest.mark.root
FULL = bool(os.environ.get("MESHD_TEST_FULL"))
NAME, PATH, MGR, WL = mbus.BUS_NAME, mbus.MANAGER_PATH, mbus.MANAGER_IFACE, mbus.WORKLOAD_IFACE
PROPS = sorted(mbus.PROPERTIES[MGR]) + sorted(mbus.PROPERTIES[WL])
HUGE = "x" * (8 << 20)   # 8 MiB: far above any name, below the bus's message limit

names = st.one_of(st.sampled_from(["Reload", "ListWorkloads", "State", "Get", "GetAll", "Set"]
                                  + PROPS),
                  st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=255)
                  .filter(lambda s: not s[0].isdigit()))
ifaces = st.sampled_from([MGR, WL, "org.freedesktop.DBus.Properties",
                          "org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Peer",
                          "io.meshd.Mesh1.Nope", "a.b"])
paths = st.sampled_from([PATH, mbus.workload_path("wl"), mbus.workload_path("nope"),
                         "/io/meshd/Mesh1/workload", "/", "/io/meshd/Mesh1/x/y/z"])
scalar_args = st.one_of(
    st.text(max_size=200).map(lambda s: GLib.Variant("s", s.replace("\0", ""))),
    st.integers(0, 2**32 - 1).map(lambda i: GLib.Variant("u", i)),
    st.booleans().map(lambda b: GLib.Variant("b", b)),
    st.integers(-2**63, 2**63 - 1).map(lambda i: GLib.Variant("x", i)),
    st.just(GLib.Variant("s", HUGE)),
    st.just(GLib.Variant("ay", b"\xff" * 1024)),
    st.just(GLib.Variant("v", GLib.Variant("s", "nested"))),
    st.just(GLib.Variant("a{sv}", {"k": GLib.Variant("i", 1)})),
)
arg_lists = st.lists(scalar_args, max_size=4).map(
    lambda xs: GLib.Variant.new_tuple(*xs) if xs else None)


def connect(address: str) -> Gio.DBusConnection:
    return Gio.DBusConnection.new_for_address_sync(
        address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)


def call(con, path, iface, method, args):
    """The D-Bus error name, or "" for a reply. A timeout or a lost daemon is neither."""
    try:
        con.call_sync(NAME, path, iface, method, args, None, Gio.DBusCallFlags.NONE, 10_000, None)
        return ""
    except GLib.Error as e:
        name = Gio.DBusError.get_remote_error(e)
        assert name, f"not a D-Bus error from the daemon: {e.message}"
        assert name not in ("org.freedesktop.DBus.Error.NoReply",
                            "org.freedesktop.DBus.Error.Timeout",
                            "org.freedesktop.DBus.Error.ServiceUnknown"), (name, e.message)
        return name


def still_serving(mesh, bus):
    assert mesh.proc.poll() is None, mesh.log_text()
    assert prop(bus, "State") in ("running", "degraded")
    assert "Traceback" not in mesh.log_text()


def test_hostile_calls_get_dbus_errors_and_meshd_keeps_serving(on_bus):
    mesh, server, bus = on_bus
    con = connect(bus.address)
    profile = settings(max_examples=600 if FULL else 60, deadline=None, derandomize=not FULL,
                       suppress_health_check=list(HealthCheck))

    @profile
    @given(paths, ifaces, names, arg_lists)
    def any_call(path, iface, method, args):
        call(con, path, iface, method, args)

    @profile
    @given(paths, st.sampled_from([MGR, WL, "io.meshd.Mesh1.Nope", ""]), names,
           st.sampled_from(["Get", "Set", "GetAll"]), scalar_args)
    def property_call(path, iface, name, method, value):
        args = {"Get": GLib.Variant("(ss)", (iface, name)),
                "GetAll": GLib.Variant("(s)", (iface,)),
                "Set": GLib.Variant("(ssv)", (iface, name, value))}[method]
        err = call(con, path, "org.freedesktop.DBus.Properties", method, args)
        if method == "Set":
            assert err, "every property is read-only"

    any_call()
    property_call()
    con.close_sync(None)
    still_serving(mesh, bus)


@pytest.mark.parametrize("method, args, error", [
    ("Reload", GLib.Variant("(s)", ("now",)), "org.freedesktop.DBus.Error.InvalidArgs"),
    ("ListWorkloads", GLib.Variant("(u)", (1,)), "org.freedesktop.DBus.Error.InvalidArgs"),
    ("Reload", GLib.Variant("(s)", (HUGE,)), "org.freedesktop.DBus.Error.InvalidArgs"),
    ("NoSuchMethod", None, "org.freedesktop.DBus.Error.UnknownMethod"),
    ("N" * 255, None, "org.freedesktop.DBus.Error.UnknownMethod"),
])
def test_wrong_types_and_unknown_methods(on_bus, method, args, error):
    mesh, server, bus = on_bus
    con = connect(bus.address)
    assert call(con, PATH, MGR, method, args) == error
    # a property that does not exist, of an object that does not exist
    assert call(con, PATH, "org.freedesktop.DBus.Properties", "Get",
                GLib.Variant("(ss)", (MGR, "NoSuchProperty"))) == "org.freedesktop.DBus.Error.InvalidArgs"
    assert call(con, mbus.workload_path("nope"), "org.freedesktop.DBus.Properties", "Get",
                GLib.Variant("(ss)", (WL, "State"))) in ("org.freedesktop.DBus.Error.UnknownObject",
                                                        "org.freedesktop.DBus.Error.UnknownMethod")
    con.close_sync(None)
    still_serving(mesh, bus)


def test_unprivileged_hostile_calls_are_refused(on_bus):
    """As nobody: Reload (with or without arguments) is refused, reading still works."""
    mesh, server, bus = on_bus
    r = bus.busctl("call", *MANAGER, "Reload", user=65534)
    assert r.returncode != 0 and ("Access denied" in r.stderr or "AccessDenied" in r.stderr), r
    r = bus.busctl("call", *MANAGER, "Reload", "s", "x" * 100_000, user=65534)
    assert r.returncode != 0
    r = bus.busctl("set-property", *MANAGER, "State", "s", "stopped", user=65534)
    assert r.returncode != 0
    assert prop(bus, "State", user=65534) == "running"
    still_serving(mesh, bus)


def test_run_without_cgroup2_says_what_to_do(tmp_path, netns):
    """`ip netns exec` mounts a /sys without cgroup2: one line, exit 1, no traceback."""
    (tmp_path / "meshd.toml").write_text(f'[mesh]\nstate_dir = "{tmp_path}/run"\n')
    r = sh("ip", "netns", "exec", netns, *MESHD, "run", "--config-dir", str(tmp_path), check=False)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "no cgroup2 hierarchy is mounted here" in line and "mesh.netns" in line


@pytest.mark.parametrize("content, line, key, message", [
    (b"[mesh]\nx = " + b"[" * 5000 + b"]" * 5000 + b"\n", 2, "mesh.x", "nested more than 64"),
    (b'[workload.wl2]\n\ncgroup = "/\xff"\n', 3, "workload.wl2.cgroup", "not UTF-8: byte 0xff at line 3, column 12"),
])
def test_the_daemon_rejects_hostile_files_with_their_place(meshed, content, line, key, message):
    """A running meshd given such a file keeps its last good config and reports the
    file, line and key (status and log), without a traceback."""
    mesh, server = meshed
    path = os.path.join(mesh.config_dir, "20-bad.toml")
    with open(path + ".tmp", "wb") as f:
        f.write(content)
    os.rename(path + ".tmp", path)

    def rejected():
        st = mesh.status()
        return st and [e for e in st["config_errors"] if e["file"] == path]
    from helpers.common import wait_for
    (err,) = wait_for(rejected, what="config rejected")
    assert (err["line"], err["key"]) == (line, key) and message in err["message"], err
    assert "Traceback" not in mesh.log_text()
    assert mesh.proc.poll() is None and mesh.status()["state"] == "running"
    r = mesh.curl(f"http://{server.ip4}:8080/echo")   # the last good config still serves
    assert r.returncode == 0
