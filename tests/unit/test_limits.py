"""What the data path's maps can hold, checked when the config is read: map sizes,
workload count, exclusions and inbound ports at their limits give located errors."""
import pytest

from meshd import maplayout
from meshd.config import MAX_WORKLOAD_COUNT, ConfigInvalid, MeshConfig, parse_files
from meshd.footprint import Footprint


def errors_of(files: dict) -> list[str]:
    with pytest.raises(ConfigInvalid) as exc:
        parse_files(files)
    return [str(e) for e in exc.value.errors]


def test_defaults_hold_ten_thousand_of_each():
    mesh = MeshConfig()
    assert mesh.max_connections == 65536
    assert mesh.max_exclusions >= 10_000 and mesh.max_inbound_ports >= 10_000
    assert MAX_WORKLOAD_COUNT == maplayout.MAX_WORKLOADS - 1 == 255


def test_map_sizes_reach_the_data_path():
    cfg = parse_files({"a.toml": "[mesh]\nmax_connections = 1024\nmax_exclusions = 20000\n"
                                 "max_inbound_ports = 100\n"})
    dp = Footprint(cfg.mesh).datapath()
    assert dp.sizes == maplayout.MapSizes(connections=1024, exclusions=20000, inbound_ports=100)


@pytest.mark.parametrize("key,value,message", [
    ("max_connections", "10", "10 out of range 64..16777216"),
    ("max_connections", '"big"', "expected integer, got string 'big'"),
    ("max_exclusions", "2000000", "2000000 out of range 16..1048576"),
    ("max_inbound_ports", "70000", "70000 out of range 16..65535"),
])
def test_bad_map_sizes_are_located(key, value, message):
    assert errors_of({"a.toml": f"[mesh]\n\n{key} = {value}\n"}) == [
        f"a.toml:3: mesh.{key}: {message}"]


def test_the_256th_workload_is_refused_where_it_is_declared():
    text = "".join(f'[workload.w{i:03d}]\ncgroup = "/w{i}"\n' for i in range(256))
    assert errors_of({"w.toml": text}) == [
        "w.toml:511: workload.w255: workload 256: at most 255 workloads (each gets an id "
        "1..255 and the source address 127.77.0.<id>)"]
    parse_files({"w.toml": text.rsplit("[workload.w255]", 1)[0]})   # 255 are fine


def test_exclusions_beyond_the_map_are_refused():
    ports = ", ".join(str(p) for p in range(1000, 1020))
    files = {"a.toml": f"[mesh]\nmax_exclusions = 16\nexclude_outbound_ports = [{ports}]\n"}
    assert errors_of(files) == [
        "a.toml:2: mesh.max_exclusions: 20 excluded outbound ports ([mesh] and every "
        "workload's exclude_outbound_ports together) exceed mesh.max_exclusions = 16"]
    # [mesh] and the workloads' count together, per map (IPv4 and IPv6 separately)
    nets = ", ".join(f'"10.{i}.0.0/16"' for i in range(10))
    files = {"a.toml": f"[mesh]\nmax_exclusions = 16\nexclude_outbound_cidrs = [{nets}]\n",
             "b.toml": f'[workload.w]\ncgroup = "/w"\nexclude_outbound_cidrs = [{nets}, "fd00::/8"]\n'}
    assert [e.split(": ", 2)[2] for e in errors_of(files)] == [
        "20 excluded IPv4 networks ([mesh] and every workload's exclude_outbound_cidrs "
        "together) exceed mesh.max_exclusions = 16"]


def test_listed_inbound_ports_beyond_the_map_are_refused():
    ports = ", ".join(str(p) for p in range(2000, 2017))
    files = {"a.toml": f'[mesh]\nmax_inbound_ports = 16\n[workload.w]\ncgroup = "/w"\n'
                       f"inbound_ports = [{ports}]\n"}
    assert errors_of(files) == [
        "a.toml:2: mesh.max_inbound_ports: 17 inbound ports listed by workloads "
        "(inbound_ports) exceed mesh.max_inbound_ports = 16"]


def test_status_text_says_when_connections_went_direct_because_the_maps_were_full():
    import dataclasses

    from meshd.status import Status, WorkloadStatus, format_text
    row = dict.fromkeys(maplayout.COUNTERS, 0)
    st = Status(workloads=(WorkloadStatus(name="web", id=1, counters=dict(row, table_full=7)),),
                counters=dict(row, table_full=2))
    text = format_text(st, True, "status file")
    assert ("  full:      9 connections went direct because the connection maps were full "
            "(raise mesh.max_connections)") in text.splitlines()
    quiet = dataclasses.replace(st, workloads=(), counters=row)
    assert "full:" not in format_text(quiet, True, "status file")
