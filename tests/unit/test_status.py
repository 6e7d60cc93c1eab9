"""The status model (meshd/status.py) and the D-Bus property table built on it
(meshd/bus.py), without root and without a bus: JSON round trip, the text
`meshd status` prints, and model -> D-Bus values -> model."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from gi.repository import Gio, GLib

from meshd import bus
from meshd.config import ConfigError
from meshd.maplayout import ACCEL_COUNTERS
from meshd.status import (AccelerationStatus, ContainerStatus, DatapathStatus, EnvoyStatus,
                          MeshSettings, Status, WorkloadEnvoy, WorkloadStatus, format_text, read_file, status_path)

NAMES = ("redirected", "excluded", "fail_open", "answered", "miss", "peername", "closed",
         "inbound", "inbound_excluded", "inbound_fail_open")


def counters(**kw):
    return {n: kw.get(n, 0) for n in NAMES}


def sample(**kw) -> Status:
    st = Status(
        version="0.1.0", pid=1234, state="running", updated=1764150009.75,
        started=1764150000.5, config_dir="/etc/meshd",
        config_files=("/etc/meshd/meshd.toml", "/etc/meshd/web.toml"),
        config_errors=(ConfigError("/etc/meshd/b.toml", 3, "mesh.outbound_port",
                                   "expected integer"),),
        mesh=MeshSettings(outbound_port=15001, inbound_port=15006,
                          exclude_outbound_ports=(22, 5432),
                          exclude_outbound_cidrs=("169.254.0.0/16",),
                          bpffs_dir="/sys/fs/bpf/meshd", state_dir="/run/meshd",
                          cgroup_root="/meshd.slice"),
        envoy=EnvoyStatus(state="running", pid=4242, adopted=True, restarts=2,
                          admin_socket="/run/meshd/envoy-run/admin.sock",
                          listeners={"ipv4": True, "ipv6": True, "inbound_ipv4": True,
                                     "inbound_ipv6": False}),
        datapath=DatapathStatus(pins="/sys/fs/bpf/meshd/v1", adopted=True,
                                links=("envoy:getsockopt", "workload:web:connect4"),
                                tracked_connections=3),
        acceleration=AccelerationStatus(
            mode="on", active=True, kernel="6.18.44", reason="kernel 6.18.44 is on the allowlist",
            counters={**dict.fromkeys(ACCEL_COUNTERS, 0), "sockets": 4, "pairs": 2,
                      "bytes_redirected": 3145728, "fallbacks": 1}),
        counters=counters(answered=7, miss=2),
        workloads=(
            WorkloadStatus(name="web", id=1, cgroup="/system.slice/web.service",
                           cgroup_id=8123, enrolled_since=1764150000.25,
                           other_programs={"connect4": (77, 78)},
                           counters=counters(redirected=5, closed=2),
                           inbound_ports=(8080, 8443),
                           envoy=WorkloadEnvoy(connections=5, requests=12, bytes_sent=4096,
                                               bytes_received=1048576)),
            WorkloadStatus(name="my-app.service", id=2,
                           error="waiting for unit my-app.service to start",
                           counters=counters()),
        ),
        containers=(
            ContainerStatus(id="9f3c" * 16, name="web-1", workload="web",
                            cgroup="/machine.slice/libpod-" + "9f3c" * 16 + ".scope",
                            network="/run/netns/netns-1", addresses=("10.88.0.5",),
                            inbound_ports=(8080,), enrolled_since=1764150001.0,
                            counters=counters(redirected=3)),
            ContainerStatus(id="ab12" * 16, name="svc", workload="web",
                            cgroup="/machine.slice/libpod-" + "ab12" * 16 + ".scope",
                            network="/run/netns/netns-2", enrolled_since=1764150002.5,
                            counters=counters(), selected_by="unit"),
        ))
    return dataclasses.replace(st, **kw)


# -- JSON -----------------------------------------------------------------------------
def test_json_round_trip():
    st = sample()
    assert Status.from_json(st.to_json()) == st
    assert Status.from_json(Status().to_json()) == Status()


def test_status_json_keeps_its_field_names():
    """status.json is read by people and by the tests' Mesh.status(): its keys stay."""
    d = json.loads(sample().to_json())
    assert set(d) == {"version", "pid", "state", "updated", "started", "config_dir",
                      "config_files", "config_errors", "mesh", "envoy", "datapath",
                      "acceleration", "counters", "workloads", "containers", "identity"}
    assert set(d["mesh"]) == {"outbound_port", "inbound_port", "exclude_outbound_ports",
                              "exclude_outbound_cidrs", "bpffs_dir", "state_dir", "cgroup_root"}
    assert set(d["envoy"]) == {"state", "pid", "adopted", "restarts", "admin_socket",
                               "listeners", "user"}
    assert set(d["datapath"]) == {"pins", "adopted", "links", "tracked_connections"}
    assert set(d["acceleration"]) == {"mode", "active", "kernel", "reason", "counters"}
    assert set(d["acceleration"]["counters"]) == {
        "sockets", "pairs", "closed", "messages_redirected", "bytes_redirected", "fallbacks",
        "insert_failed"}
    assert d["config_errors"] == [{"file": "/etc/meshd/b.toml", "line": 3,
                                   "key": "mesh.outbound_port", "message": "expected integer"}]
    web, waiting = d["workloads"]
    assert set(web) == {"name", "id", "cgroup", "cgroup_id", "enrolled_since", "error",
                        "other_programs", "counters", "inbound_ports", "envoy",
                        "spiffe_id", "cert_not_after", "cert_renew_at"}
    assert web["counters"]["redirected"] == 5 and web["inbound_ports"] == [8080, 8443]
    assert web["other_programs"] == {"connect4": [77, 78]}
    assert web["envoy"] == {"connections": 5, "requests": 12, "bytes_sent": 4096,
                            "bytes_received": 1048576}
    assert waiting["cgroup"] is None and waiting["enrolled_since"] == 0.0


def test_a_status_file_from_another_version_still_reads():
    """Unknown keys are ignored, missing ones take their defaults."""
    d = json.loads(sample().to_json())
    d["future_field"] = {"x": 1}
    del d["datapath"]
    del d["workloads"][0]["envoy"]
    st = Status.from_dict(d)
    assert st.datapath == DatapathStatus()
    assert st.workloads[0].envoy == WorkloadEnvoy()
    assert st.workloads[0].counters == sample().workloads[0].counters


def test_read_file(tmp_path):
    assert read_file(str(tmp_path)) is None
    with open(status_path(str(tmp_path)), "w") as f:
        f.write("{not json")
    assert read_file(str(tmp_path)) is None
    with open(status_path(str(tmp_path)), "w") as f:
        f.write(sample().to_json())
    assert read_file(str(tmp_path)) == sample()


def test_host_counters_add_up_the_workloads_and_the_unattributed():
    total = sample().host_counters()
    assert total == counters(redirected=5, closed=2, answered=7, miss=2)


# -- text -----------------------------------------------------------------------------
def test_text_shows_rejection_fail_open_workloads_and_misses():
    st = sample(state="degraded", envoy=EnvoyStatus(state="restarting", restarts=2,
                                                    listeners={"ipv4": False, "ipv6": False}))
    text = format_text(st, True, "D-Bus (io.meshd.Mesh1)")
    lines = text.splitlines()
    assert lines[0] == "meshd 0.1.0: degraded (pid 1234)"
    assert lines[1] == "  source:    D-Bus (io.meshd.Mesh1)"
    assert "REJECTED" in text
    assert "    /etc/meshd/b.toml:3: mesh.outbound_port: expected integer" in lines
    assert "(pid None, restarts 2)" in text and "listeners: ipv4 DOWN, ipv6 DOWN" in text
    assert "workloads FAIL OPEN" in text
    assert "  excluded:  ports [22, 5432] cidrs ['169.254.0.0/16']" in lines
    assert "  datapath:  /sys/fs/bpf/meshd/v1 (adopted), 2 links, 3 tracked connections" in lines
    assert "  workloads: 2" in lines
    assert "    web              enrolled   /system.slice/web.service" in lines
    assert "      inbound ports via Envoy: [8080, 8443]" in lines
    assert "      also attached on connect4 (not meshd's): program id(s) [77, 78]" in lines
    assert ("      envoy: connections=5 requests=12 bytes_sent=4096 bytes_received=1048576"
            in lines)
    assert any(l.startswith("      redirected=5 excluded=0") for l in lines)
    assert "waiting for unit my-app.service to start -" in text
    assert ("  accel:     active (mode on; kernel 6.18.44 is on the allowlist)" in lines)
    assert any(l.split() == ["sockets=4", "pairs=2", "closed=0", "messages_redirected=0",
                             "bytes_redirected=3145728", "fallbacks=1", "insert_failed=0"]
               for l in lines)
    assert "2 connections reached Envoy without an original destination" in text


def test_text_of_a_healthy_quiet_mesh_shows_no_alarm():
    up = dataclasses.replace(sample().envoy, listeners=dict.fromkeys(
        ("ipv4", "ipv6", "inbound_ipv4", "inbound_ipv6"), True))
    st = sample(config_errors=(), counters=counters(), envoy=up,
                acceleration=AccelerationStatus(reason="acceleration = false"),
                workloads=(WorkloadStatus(name="web", id=1, cgroup="/w", enrolled_since=1.0,
                                          counters=counters()),), containers=())
    text = format_text(st, True, "status file /run/meshd/status.json")
    assert "source:    status file /run/meshd/status.json" in text
    assert "  accel:     inactive (mode off; acceleration = false)" in text.splitlines()
    for alarm in ("REJECTED", "FAIL OPEN", "not in the data path", "misses",
                  "envoy: connections=", "redirected=", "not meshd's"):
        assert alarm not in text, alarm
    st = sample(config_errors=())   # inbound_ipv6 is not in the SOCKMAP
    assert "not in the data path: inbound_ipv6 (those connections fail open)" in format_text(
        st, True, "x")


def test_text_when_not_running():
    text = format_text(sample(updated=0.0), False, "status file /s")
    assert text.startswith("meshd 0.1.0: NOT RUNNING (last status ")


# -- the D-Bus property table ------------------------------------------------------------
def _over_the_wire(props, values: dict) -> dict:
    """What a client's GetAll gets back: each value through a GVariant of its signature."""
    table = {p.name: p for p in props}
    return {k: GLib.Variant(table[k].signature, v).unpack() for k, v in values.items()}


def test_model_to_bus_and_back_is_lossless():
    st = sample()
    manager = _over_the_wire(bus.MANAGER_PROPERTIES, bus.manager_values(st))
    workloads = [bus.decode(bus.WORKLOAD_PROPERTIES,
                            _over_the_wire(bus.WORKLOAD_PROPERTIES, bus.workload_values(w)))
                 for w in st.workloads]
    back = Status.from_dict(dict(bus.decode(bus.MANAGER_PROPERTIES, manager),
                                 updated=st.updated, workloads=workloads))
    assert back == st


def test_bus_values_follow_the_documented_api():
    m = bus.manager_values(sample())
    assert m["StartedAt"] == 1764150000500000                    # µs
    assert m["ConfigErrors"] == [("/etc/meshd/b.toml", 3, "mesh.outbound_port",
                                  "expected integer")]
    assert m["Counters"] == counters(redirected=5, closed=2, answered=7, miss=2)
    assert m["UnattributedCounters"] == counters(answered=7, miss=2)
    assert bus.manager_values(sample(envoy=EnvoyStatus()))["EnvoyPID"] == 0   # None on the bus
    web, waiting = (bus.workload_values(w) for w in sample().workloads)
    assert web["State"] == "enrolled" and web["EnrolledSince"] == 1764150000250000
    assert waiting["State"] == "waiting for unit my-app.service to start"
    assert waiting["EnrolledSince"] == 0 and waiting["Cgroup"] == ""
    assert web["Requests"] == 12 and web["OtherPrograms"] == {"connect4": [77, 78]}


def test_introspection_is_made_from_the_table():
    node = Gio.DBusNodeInfo.new_for_xml(bus.INTROSPECTION_XML)
    ifaces = {i.name: i for i in node.interfaces}
    for iface, props in ((bus.MANAGER_IFACE, bus.MANAGER_PROPERTIES),
                         (bus.WORKLOAD_IFACE, bus.WORKLOAD_PROPERTIES)):
        info = ifaces[iface]
        assert [p.name for p in info.properties] == [p.name for p in props]
        for p in props:
            got = info.lookup_property(p.name)
            assert got.signature == p.signature
            assert got.flags == Gio.DBusPropertyInfoFlags.READABLE
            emits = [a.value for a in got.annotations
                     if a.key == "org.freedesktop.DBus.Property.EmitsChangedSignal"]
            assert emits == [p.emits]
    # a sample of the published API (docs/dbus-api.md): these never change
    mgr = ifaces[bus.MANAGER_IFACE]
    assert [(mgr.lookup_property(n).signature) for n in
            ("State", "PID", "StartedAt", "ConfigErrors", "EnvoyListeners", "OutboundPort",
             "Counters")] == ["s", "u", "t", "a(siss)", "a{sb}", "q", "a{st}"]
    wl = ifaces[bus.WORKLOAD_IFACE]
    assert wl.lookup_property("OtherPrograms").signature == "a{sau}"


def test_bus_module_does_not_load_the_data_path():
    r = subprocess.run([sys.executable, "-c",
                        "import sys, meshd.bus; print('meshd.datapath' in sys.modules)"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
