"""Typed BPF maps and the map-sync helper, over fake maps (no root, no kernel)."""

import pytest

from meshd import bpfmap, maplayout as ml
from meshd.datapath import Datapath


class FakeMap(dict):
    """A map at the level sync() works on, recording every change."""

    def __init__(self, *a):
        super().__init__(*a)
        self.log = []

    def set(self, k, v):
        self.log.append(("set", k))
        self[k] = v

    def delete(self, k):
        self.log.append(("delete", k))
        del self[k]


class FakeOps:
    """bpfsys's map calls over a dict of bytes, like the kernel's view.
    An array map has every slot from the start."""

    def __init__(self, array_slots=0, value_size=0, ncpu=2):
        self.data = {i.to_bytes(4, "little"): bytes(value_size) for i in range(array_slots)}
        self.ncpu = ncpu

    def possible_cpus(self):
        return self.ncpu

    def map_keys(self, fd, key_size):
        assert all(len(k) == key_size for k in self.data)
        return list(self.data)

    def map_lookup(self, fd, key, value_size):
        v = self.data.get(key)
        assert v is None or len(v) == value_size
        return v

    def map_update(self, fd, key, value):
        self.data[key] = value

    def map_delete(self, fd, key):
        return self.data.pop(key, None) is not None


# -- sync ---------------------------------------------------------------------
def test_sync_adds_missing_deletes_extra_and_leaves_equal_entries_alone():
    m = FakeMap({1: 10, 2: 20, 3: 30})
    bpfmap.sync(m, {2: 20, 3: 31, 4: 40})
    assert dict(m) == {2: 20, 3: 31, 4: 40}
    assert sorted(m.log) == [("delete", 1), ("set", 3), ("set", 4)]   # 2 untouched


def test_sync_never_removes_a_wanted_entry():
    # no flush-and-refill: an entry that is wanted is never deleted on the way
    m = FakeMap({k: 1 for k in range(10)})
    bpfmap.sync(m, {k: 1 for k in range(5, 15)})
    assert all(k not in range(5, 15) for op, k in m.log if op == "delete")
    assert dict(m) == {k: 1 for k in range(5, 15)}


def test_sync_keeps_entries_someone_else_owns():
    m = FakeMap({8080: 1, 9090: 2, 7070: 3})
    bpfmap.sync(m, {}, keep=lambda port, wl: wl == 2)
    assert dict(m) == {9090: 2}


def test_sync_with_struct_keys():
    old = ml.PortKey(workload=0, port=22)
    m = FakeMap({old: 1})
    new = {ml.PortKey(workload=0, port=22): 1, ml.PortKey(workload=3, port=25): 1}
    bpfmap.sync(m, new)
    assert dict(m) == new and m.log == [("set", ml.PortKey(workload=3, port=25))]


def test_sync_an_empty_want_empties_the_map():
    m = FakeMap({1: 1, 2: 2})
    bpfmap.sync(m, {})
    assert m == {}


# -- Map ----------------------------------------------------------------------
def test_map_packs_keys_and_values_as_the_layout_says():
    ops = FakeOps()
    m = bpfmap.Map(7, ml.MapSpec(ml.PortKey, ml.ctypes.c_uint8), ops=ops)
    m.set(ml.PortKey(workload=2, port=443), 1)
    assert ops.data == {bytes([2, 0, 0, 0, 0xbb, 0x01, 0, 0]): b"\x01"}
    assert m.keys() == [ml.PortKey(workload=2, port=443)]
    assert m.get(ml.PortKey(workload=2, port=443)) == 1
    assert m.get(ml.PortKey(workload=2, port=80)) is None
    m.delete(ml.PortKey(workload=2, port=443))
    assert ops.data == {}


def test_map_refuses_a_key_of_another_layout():
    m = bpfmap.Map(7, ml.MAPS["excluded_cidr4"], ops=FakeOps())
    with pytest.raises(TypeError):
        m.set(ml.cidr_key(0, "fd00::/8"), 1)
    with pytest.raises(TypeError):
        m.set(ml.PortKey(workload=0, port=22), 1)


def test_map_struct_values():
    ops = FakeOps()
    m = bpfmap.Map(7, ml.MAPS["settings"], ops=ops)
    m.set(0, ml.MeshSettings(outbound_port=15001, inbound_port=15006))
    assert ops.data[bytes(4)] == (15001).to_bytes(2, "little") + (15006).to_bytes(2, "little") \
        + bytes(4)
    assert m.get(0).inbound_port == 15006


def test_an_array_slot_is_zeroed_not_deleted_and_zero_slots_count_as_empty():
    ops = FakeOps(array_slots=4, value_size=4)
    m = bpfmap.Map(7, ml.MAPS["workload_flags"], ops=ops)
    bpfmap.sync(m, {1: ml.WL_EXPLICIT_PORTS, 3: ml.WL_EXPLICIT_PORTS})
    assert dict(m.items()) == {1: 1, 3: 1}
    bpfmap.sync(m, {3: ml.WL_EXPLICIT_PORTS})
    assert len(ops.data) == 4 and dict(m.items()) == {3: 1} and m.get(1) == 0


def test_percpu_values_are_one_per_cpu():
    ops = FakeOps(array_slots=2, value_size=8 * 3, ncpu=3)
    m = bpfmap.Map(7, ml.MAPS["counters"], ops=ops)
    assert m.value_size == 24
    ops.data[(1).to_bytes(4, "little")] = b"".join(n.to_bytes(8, "little") for n in (1, 0, 5))
    assert m.get(1) == [1, 0, 5] and m.get(0) == [0, 0, 0]
    assert dict(m.items()) == {1: [1, 0, 5]}


# -- the Datapath's decisions over fake maps ----------------------------------
@pytest.fixture
def dp(monkeypatch):
    maps = {name: FakeMap() for name in ml.MAPS}
    d = Datapath("/nonexistent")
    monkeypatch.setattr(d, "_map", lambda name: maps[name])
    d.fake = maps
    return d


def test_inbound_keeps_auto_ports_and_replaces_a_changed_explicit_list(dp):
    ports = dp.fake["inbound_ports"]
    ports.update({8080: 1, 9000: 2, 9001: 2, 7000: 5})   # 1 auto (sockops), 2 explicit, 5 gone
    dp.set_inbound(explicit={2: {9001, 9002}}, auto={1}, excluded={0: {22}, 2: {9002}},
                   discovered={1: {8081}, 3: {6000}})
    assert dict(ports) == {8080: 1, 8081: 1, 9001: 2, 9002: 2}
    assert ("delete", 9001) not in ports.log            # unchanged: never missing
    assert dict(dp.fake["workload_flags"]) == {2: ml.WL_EXPLICIT_PORTS}
    assert set(dp.fake["excluded_in_ports"]) == {ml.PortKey(workload=0, port=22),
                                                 ml.PortKey(workload=2, port=9002)}


def test_exclusions_go_to_the_map_of_their_family(dp):
    dp.set_exclusions({0: {22}}, {0: {"10.0.0.0/8"}, 4: {"fd00::/8", "192.168.1.7"}})
    assert set(dp.fake["excluded_ports"]) == {ml.PortKey(workload=0, port=22)}
    assert set(dp.fake["excluded_cidr4"]) == {ml.cidr_key(0, "10.0.0.0/8"),
                                              ml.cidr_key(4, "192.168.1.7/32")}
    assert set(dp.fake["excluded_cidr6"]) == {ml.cidr_key(4, "fd00::/8")}
    dp.set_exclusions({}, {})
    assert not any(dp.fake[n] for n in ("excluded_ports", "excluded_cidr4", "excluded_cidr6"))


def test_workload_ids_and_inbound_port_listing(dp):
    dp.set_workload_ids({1234: 1, 5678: 2})
    dp.set_workload_ids({5678: 2})
    assert dict(dp.fake["workload_ids"]) == {5678: 2}
    dp.fake["inbound_ports"].update({8081: 1, 8080: 1, 9000: 2})
    assert dp.inbound_ports() == {1: [8080, 8081], 2: [9000]}


def test_open_refuses_a_map_whose_sizes_differ_from_the_layout(monkeypatch):
    import ctypes

    from meshd import bpfsys
    from meshd.datapath import DatapathError

    d = Datapath("/nonexistent")
    d.maps = {name: i for i, name in enumerate(ml.MAPS)}
    sizes = {i: (ctypes.sizeof(s.key), ctypes.sizeof(s.value))
             for i, s in enumerate(ml.MAPS.values())}
    monkeypatch.setattr(bpfsys, "possible_cpus", lambda: 4)
    specs = list(ml.MAPS.values())
    monkeypatch.setattr(bpfsys, "map_info", lambda fd: bpfsys.MapInfo(
        key_size=sizes[fd][0], value_size=sizes[fd][1], type=ml.MAP_TYPES[specs[fd].kind],
        max_entries=specs[fd].max_entries(ml.MapSizes()), map_flags=specs[fd].flags))
    d._check_maps()   # per-CPU values: the kernel reports one CPU's size
    sizes[d.maps["tuple_dst"]] = (36, 24)
    with pytest.raises(DatapathError, match="tuple_dst: key/value sizes 36/24 in the kernel, 40/24"):
        d._check_maps()
    sizes[d.maps["tuple_dst"]] = (40, 24)
    d.sizes = ml.MapSizes(connections=1024)   # an LRU map of 65536 where 1024 are wanted
    with pytest.raises(DatapathError, match="cookie_dst: type/max_entries/flags 1/65536/0 in "
                                            "the kernel, 1/1024/0"):
        d._check_maps()


def test_route_sources_go_to_the_map_of_their_family(dp):
    import ipaddress as ip
    dp.set_route_sources({ip.ip_network("10.0.0.0/8"): ip.ip_address("10.1.1.1"),
                          ip.ip_network("fd00::/8"): ip.ip_address("fd00::1")})
    assert dict(dp.fake["route_src4"]) == {ml.route_key("10.0.0.0/8"): ml.route_source("10.1.1.1")}
    assert dict(dp.fake["route_src6"]) == {ml.route_key("fd00::/8"): ml.route_source("fd00::1")}
    dp.set_route_sources({})
    assert not dp.fake["route_src4"] and not dp.fake["route_src6"]
