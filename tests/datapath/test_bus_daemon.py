"""The real daemon on a real (private) system bus with the shipped policy:
what an operator sees with busctl and `meshd status`."""
from __future__ import annotations

import json
import os

import pytest

from conftest import HTTP_PORT, wait_for
from helpers.dbus import PrivateBus

MANAGER = ("io.meshd.Mesh1", "/io/meshd/Mesh1", "io.meshd.Mesh1.Manager")


@pytest.fixture
def on_bus(mesh, server, monkeypatch):
    bus = PrivateBus().start()
    try:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)   # inherited by meshd
        mesh.configure(protocols={HTTP_PORT: "http"})   # so Envoy counts requests
        mesh.start()
        wait_for(lambda: "io.meshd.Mesh1" in bus.busctl("list", "--acquired").stdout,
                 what="meshd on the bus")
        yield mesh, server, bus
    finally:
        mesh.kill()
        bus.stop()


def prop(bus, name, obj=MANAGER, user=None):
    r = bus.busctl("get-property", *obj, name, "--json=short", user=user)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["data"]


def test_busctl_reads_the_running_daemon(on_bus):
    mesh, server, bus = on_bus
    assert prop(bus, "State") == "running"
    assert prop(bus, "ConfigDirectory") == mesh.config_dir
    assert prop(bus, "EnvoyPID") == mesh.envoy_pid()
    r = bus.busctl("call", *MANAGER, "ListWorkloads", "--json=short")
    (name, path), = json.loads(r.stdout)["data"][0]
    assert name == "wl" and path == "/io/meshd/Mesh1/workload/wl"
    wl = (MANAGER[0], path, "io.meshd.Mesh1.Workload")
    assert prop(bus, "Cgroup", wl) == mesh.workload
    # traffic shows up in the workload's counters on the bus
    assert mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo").returncode == 0
    wait_for(lambda: prop(bus, "Counters", wl).get("redirected", 0) >= 1, what="counters")
    wait_for(lambda: prop(bus, "Requests", wl) == 1, what="Envoy's per-workload requests")
    assert prop(bus, "BytesReceived", wl) > 0
    # anyone may read
    assert prop(bus, "State", user=65534) == "running"


def test_meshd_status_reads_the_bus(on_bus, monkeypatch):
    """`meshd status` reads the D-Bus API and says so; without the bus it falls
    back to the status file and says that instead. Both print the same model."""
    mesh, server, bus = on_bus
    assert mesh.curl(f"http://{server.ip4}:{HTTP_PORT}/echo").returncode == 0
    wait_for(lambda: mesh.workload_counter("redirected") >= 1, what="counters")

    out = mesh.cli("status")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "  source:    D-Bus (io.meshd.Mesh1)" in out.stdout, out.stdout
    assert "wl" in out.stdout and "enrolled" in out.stdout and "redirected=" in out.stdout

    # --json is the model's JSON: the same keys and values as status.json, live
    # numbers included ("updated" is not on the bus; times travel in µs)
    over_bus = json.loads(mesh.cli("status", "--json", check=True).stdout)
    from_file = mesh.status()
    assert set(over_bus) == set(from_file)
    for key in ("version", "pid", "state", "config_dir", "config_files", "mesh"):
        assert over_bus[key] == from_file[key], key
    assert round(over_bus["started"] * 1e6) == round(from_file["started"] * 1e6)
    assert over_bus["envoy"]["pid"] == mesh.envoy_pid()
    (wl,) = over_bus["workloads"]
    assert wl["name"] == "wl" and wl["cgroup"] == mesh.workload
    assert wl["counters"]["redirected"] >= 1 and set(wl) == set(from_file["workloads"][0])

    # no bus for the CLI: the status file, named as the source
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={bus.dir}/no-such-bus")
    out = mesh.cli("status")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (f"  source:    status file {os.path.join(mesh.state_dir, 'status.json')}"
            in out.stdout), out.stdout
    assert "D-Bus" not in out.stdout and "enrolled" in out.stdout


def test_reload_over_the_bus_root_only(on_bus):
    mesh, server, bus = on_bus
    denied = bus.busctl("call", *MANAGER, "Reload", user=65534)
    assert denied.returncode != 0 and "Access denied" in denied.stderr
    mesh.write("20-bad.toml", "[mesh]\nexclude_outbound_ports = 5\n")
    # inotify already rejected it; an explicit Reload says so too
    r = bus.busctl("call", *MANAGER, "Reload", "--json=short")
    assert json.loads(r.stdout)["data"] == [False]
    errors = prop(bus, "ConfigErrors")
    assert errors[0][:3] == [os.path.join(mesh.config_dir, "20-bad.toml"), 2,
                             "mesh.exclude_outbound_ports"]
    os.unlink(os.path.join(mesh.config_dir, "20-bad.toml"))
    r = bus.busctl("call", *MANAGER, "Reload", "--json=short")
    assert json.loads(r.stdout)["data"] == [True]
    assert prop(bus, "ConfigErrors") == []
