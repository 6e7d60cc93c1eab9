"""The Python map layout against the C side: sizes, the generated constants, and
the compiler's verdict on the layout checks (the host's cc; no root, no BPF)."""

import ctypes
import re
import subprocess
from pathlib import Path

import pytest

from meshd import maplayout as ml

BPF = Path(__file__).parents[2] / "bpf"
HEADER = (BPF / "meshd.h").read_text()

# What the kernel ABI and meshd.h's comments document: (size, {field: offset}).
DOCUMENTED = {
    ml.MeshSettings: (8, {"outbound_port": 0, "inbound_port": 2, "flags": 4}),
    ml.OrigDst: (24, {"family": 0, "pad": 1, "port": 2, "workload": 4, "addr": 8}),
    ml.ConnTuple: (40, {"family": 0, "pad": 1, "sport": 2, "dport": 4, "pad2": 6,
                        "saddr": 8, "daddr": 24}),
    ml.PortKey: (8, {"workload": 0, "port": 4, "pad": 6}),
    ml.Cidr4Key: (12, {"prefixlen": 0, "workload": 4, "addr": 8}),
    ml.Cidr6Key: (24, {"prefixlen": 0, "workload": 4, "addr": 8}),
    ml.Route4Key: (8, {"prefixlen": 0, "addr": 4}),
    ml.Route6Key: (20, {"prefixlen": 0, "addr": 4}),
    ml.Route6Src: (16, {"addr": 0}),
    ml.AccelKey: (48, {"netns": 0, "t": 8}),
    ml.CtrNetns: (8, {"index": 0, "addr4": 4}),
    ml.NetnsSlot: (16, {"netns": 0, "slot": 8, "pad": 12}),
    ml.CtrPort: (8, {"addr4": 0, "port": 4, "pad": 6}),
}


@pytest.mark.parametrize("cls", ml.STRUCTS, ids=lambda c: c.C_NAME)
def test_struct_sizes_and_offsets_are_the_documented_ones(cls):
    size, offsets = DOCUMENTED[cls]
    assert ctypes.sizeof(cls) == size
    assert {name: getattr(cls, name).offset for name, _ in cls._fields_} == offsets


def _c_structs() -> str:
    """The struct definitions of meshd.h, as written there."""
    found = {m.group(1): m.group(0)
             for m in re.finditer(r"^struct (\w+) \{.*?^\};", HEADER, re.S | re.M)}
    return "\n".join(found[cls.C_NAME] for cls in ml.STRUCTS)


def _compile(source: str) -> subprocess.CompletedProcess:
    return subprocess.run(["cc", "-fsyntax-only", "-std=gnu11", "-include", "linux/types.h",
                           "-x", "c", "-"], input=source, text=True, capture_output=True)


def test_c_compiler_agrees_with_every_struct():
    r = _compile(ml.c_prelude() + _c_structs() + ml.c_asserts())
    assert r.returncode == 0, r.stderr


def test_layout_checks_catch_a_struct_that_differs():
    # the checks must be able to fail: swap two fields of conn_tuple in C
    swapped = _c_structs().replace("\t__u16 sport;", "\t__u16 sport_;").replace(
        "\t__u16 dport;", "\t__u16 sport;").replace("\t__u16 sport_;", "\t__u16 dport;")
    assert swapped != _c_structs()
    r = _compile(ml.c_prelude() + swapped + ml.c_asserts())
    assert r.returncode != 0
    assert "struct conn_tuple.sport: differs from meshd/maplayout.py" in r.stderr


def test_header_refuses_to_compile_without_the_generated_constants():
    r = _compile(HEADER)
    assert r.returncode != 0
    assert "meshd/maplayout.py generates the shared constants" in r.stderr


def test_shared_constants_are_defined_only_by_the_prelude():
    for name in ("MESHD_MAX_WORKLOADS", "WORKLOAD_NET4", "MESHD_ENVOY_INBOUND_SOURCE4",
                 "WL_EXPLICIT_PORTS", "MESHD_NR_COUNTERS"):
        assert f"#define {name} " in ml.c_prelude() or f"{name} = " in ml.c_prelude()
        for src in BPF.glob("*.[ch]"):
            text = src.read_text()
            assert not re.search(rf"#define {name}\b|^\s*{name}\s*=", text, re.M), (src.name, name)
    assert "enum meshd_counter {" not in HEADER and "enum listener_slot {" not in HEADER


def test_counter_enum_is_generated_from_the_one_list():
    prelude = ml.c_prelude()
    slots = [int(v) for v in re.findall(r"\tC_\w+ = (\d+),", prelude)]
    names = re.findall(r"\tC_(\w+) = \d+,", prelude)
    assert names == [n.upper() for n in ml.COUNTERS] and slots == list(range(len(ml.COUNTERS)))
    assert f"MESHD_NR_COUNTERS = {len(ml.COUNTERS)}," in prelude
    assert ml.NR_COUNTERS == len(ml.COUNTERS)


def test_every_counter_the_programs_use_is_generated():
    used = set()
    for src in BPF.glob("*.c"):
        used |= set(re.findall(r"\bC_[A-Z_]+\b", src.read_text()))
    assert "C_REDIRECTED" in used and "C_INBOUND_FAIL_OPEN" in used
    assert used <= {f"C_{n.upper()}" for n in ml.COUNTERS}


def test_addresses_in_the_prelude():
    prelude = ml.c_prelude()
    assert "#define WORKLOAD_NET4 0x7f4d0000\n" in prelude           # 127.77.0.0
    assert "#define MESHD_ENVOY_INBOUND_SOURCE4 0x7f000006\n" in prelude   # 127.0.0.6
    assert ml.workload_source4(7) == "127.77.0.7"
    assert ml.workload_source4(ml.MAX_WORKLOADS - 1) == "127.77.0.255"


def test_envoy_config_uses_the_same_addresses():
    # Envoy's per-workload chains match the source connect4 binds, and sk_lookup
    # passes Envoy's own source: both sides must name the same addresses.
    from meshd import envoy_config as ec
    files = ec.render(15001, 15006, "/run/meshd", ipv6=False, workload_ports={9: []})
    (outbound, _) = files["lds.json"]["resources"]
    chain = next(c for c in outbound["filter_chains"] if c["name"] == "outbound_wl9")
    assert chain["filter_chain_match"]["source_prefix_ranges"][0]["address_prefix"] == \
        ml.workload_source4(9)
    inbound = next(c for c in files["cds.json"]["resources"] if c["name"] == "meshd_inbound")
    assert inbound["upstream_bind_config"]["source_address"]["address"] == \
        str(ml.ENVOY_INBOUND_SOURCE4)


def test_cidr_keys_hold_the_workload_then_the_network_in_network_order():
    k4 = ml.cidr_key(3, "10.1.2.3/16")
    assert bytes(k4) == (48).to_bytes(4, "little") + bytes([0, 0, 0, 3, 10, 1, 0, 0])
    k6 = ml.cidr_key(0, "fd00::/8")
    assert isinstance(k6, ml.Cidr6Key)
    assert bytes(k6) == (40).to_bytes(4, "little") + bytes(4) + bytes([0xfd]) + bytes(15)


def test_route_entries_hold_addresses_in_network_order():
    assert bytes(ml.route_key("192.168.0.0/16")) == (16).to_bytes(4, "little") + bytes(
        [192, 168, 0, 0])
    assert ml.route_source("10.0.0.1").to_bytes(4, "little") == bytes([10, 0, 0, 1])
    k6, v6 = ml.route_key("2001:db8::/32"), ml.route_source("2001:db8::5")
    assert bytes(k6) == (32).to_bytes(4, "little") + bytes([0x20, 1, 0xd, 0xb8]) + bytes(12)
    assert bytes(v6) == bytes([0x20, 1, 0xd, 0xb8]) + bytes(11) + b"\x05"


def test_structs_are_equal_and_hashed_by_their_bytes():
    a, b = ml.PortKey(workload=1, port=80), ml.PortKey(workload=1, port=80)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != ml.PortKey(workload=2, port=80)
    assert "port=80" in repr(a)


def test_every_map_in_the_header_is_declared_as_the_layout_says():
    in_header = {}
    for m in re.finditer(r"^(MESHD_MAP|MESHD_SOCKMAP|MESHD_SOCKHASH)\((.*)\);$", HEADER, re.M):
        args = [a.strip() for a in m.group(2).split(",")]
        if m.group(1) == "MESHD_SOCKMAP":   # (name, size)
            in_header[args[0]] = ("sockmap", args[1], "0")
        elif m.group(1) == "MESHD_SOCKHASH":   # (name, key, value, size)
            in_header[args[0]] = ("sockhash", args[3], "0")
        else:                               # ("type", key, value, name, size, flags)
            in_header[args[3]] = (args[0].strip('"'), args[4], args[5])
    assert "settings" in in_header and "envoy_listeners" in in_header
    assert set(in_header) == set(ml.MAPS)
    sizes = {"MESHD_MAX_WORKLOADS": ml.MAX_WORKLOADS,
             "MESHD_MAX_WORKLOADS * MESHD_NR_COUNTERS": ml.MAX_WORKLOADS * ml.NR_COUNTERS,
             "MESHD_MAX_ACCEL": ml.ACCEL_MAX_SOCKETS,
             "MESHD_NR_ACCEL_COUNTERS": len(ml.ACCEL_COUNTERS)}
    flags = {"0": 0, "BPF_F_NO_PREALLOC": ml.BPF_F_NO_PREALLOC}
    for name, (kind, size, flag) in in_header.items():
        size = sizes.get(size, int(size) if size.isdigit() else size)
        spec = ml.MAPS[name]
        assert (kind, size, flags[flag]) == (spec.kind, spec.size, spec.flags), name


def test_map_sizes_come_from_the_prelude():
    prelude = ml.c_prelude(ml.MapSizes(connections=1024, exclusions=99, inbound_ports=7))
    assert "#define MESHD_MAX_CONNS 1024\n" in prelude
    assert "#define MESHD_MAX_EXCLUSIONS 99\n" in prelude
    assert "#define MESHD_MAX_INBOUND_PORTS 7\n" in prelude
    assert ml.MAPS["cookie_dst"].max_entries(ml.MapSizes(connections=1024)) == 1024
    assert ml.MAPS["settings"].max_entries(ml.MapSizes()) == 1
    # the pins are not in the hashed text: the same build under any bpffs_dir
    assert "MESHD_PIN_" not in prelude
    assert ml.c_pins({"meta": "/x/maps/meta"}) == '#define MESHD_PIN_meta "/x/maps/meta"\n'


def test_connection_maps_never_evict_a_live_entry():
    # an LRU map would silently drop a live connection's original destination
    assert ml.MAPS["cookie_dst"].kind == ml.MAPS["tuple_dst"].kind == "hash"
    assert ml.MAPS["cookie_dst"].size == ml.MAPS["tuple_dst"].size == "MESHD_MAX_CONNS"
