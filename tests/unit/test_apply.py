"""apply.Applier against a recording stand-in for Datapath: what it asks the kernel
for, what it writes, and that applying the same plan twice changes nothing."""
from __future__ import annotations

import os

from meshd import statefiles
from meshd.apply import Applier, load_ids
from meshd.config import parse_files
from meshd.discovery import Found, World
from meshd.plan import plan


class FakeDatapath:
    def __init__(self, owners=(), fail=()):
        self.links = {o: None for o in owners}   # owner -> cgroup path
        self.fail = set(fail)
        self.maps = {}
        self.calls = []

    def attach(self, owner, path, hooks):
        self.calls.append(("attach", owner))
        if path in self.fail:
            raise FileNotFoundError(2, "No such file or directory")
        self.links[owner] = path

    def foreign_programs(self, path, hooks):
        return {}

    def owners(self):
        return set(self.links)

    def detach(self, owner):
        self.calls.append(("detach", owner))
        del self.links[owner]

    def set_workload_ids(self, ids):
        self.maps["workload_ids"] = dict(ids)

    def set_containers(self, netns):
        self.maps["container_netns"] = dict(netns)

    def set_exclusions(self, ports, cidrs):
        self.maps["exclusions"] = (dict(ports), dict(cidrs))

    def set_inbound(self, explicit, auto, excluded, discovered):
        self.maps["inbound"] = (dict(explicit), set(auto), dict(excluded), dict(discovered))

    def inbound_ports(self):
        return {1: [8000]}


def setup(tmp_path):
    cfg = parse_files({"a.toml": f'[mesh]\nstate_dir = "{tmp_path}"\n'
                                 '[workload.api]\nunit = "api.service"\n'})
    world = World({"api": Found("/a", "/sys/fs/cgroup/a", 3)}, {}, ipv6_loopback=False)
    return cfg, world


def files(d):
    return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
            for r, _, fs in os.walk(d) for f in fs}


def test_apply_twice_changes_nothing_and_detaches_stale_owners(tmp_path):
    cfg, world = setup(tmp_path)
    dp = FakeDatapath(owners=["envoy", "netns", "workload:gone"])
    ap = Applier(dp, str(tmp_path))
    p = plan(cfg, world, ap.ids, now=1.0)
    assert ap.apply(p) == {}
    assert dp.links == {"envoy": None, "netns": None, "workload:api": "/sys/fs/cgroup/a"}
    assert dp.maps["workload_ids"] == {3: 1}
    assert load_ids(str(tmp_path)) == {"api": 1}
    assert os.path.isfile(tmp_path / statefiles.ENVOY_CONFIG_DIR / "lds.json")
    before, maps = files(tmp_path), dict(dp.maps)
    dp.calls.clear()
    assert ap.apply(plan(cfg, world, ap.ids, p, now=2.0)) == {}
    assert files(tmp_path) == before
    # the same maps; ports found listening are only added when a workload enrolls
    # (sockops keeps the auto ports from then on)
    assert dp.maps["inbound"][:3] == maps["inbound"][:3] and dp.maps["inbound"][3] == {}
    assert {k: v for k, v in dp.maps.items() if k != "inbound"} == {
        k: v for k, v in maps.items() if k != "inbound"}
    assert dp.calls == [("attach", "workload:api")]   # kept by Datapath.attach


def test_a_failed_attach_stops_before_the_maps(tmp_path):
    cfg, world = setup(tmp_path)
    dp = FakeDatapath(fail=["/sys/fs/cgroup/a"])
    ap = Applier(dp, str(tmp_path))
    failed = ap.apply(plan(cfg, world, ap.ids))
    assert failed == {"api": "cannot attach to /a: No such file or directory"}
    assert dp.maps == {}
    again = plan(cfg, world, ap.ids, failed=failed)
    assert ap.apply(again) == {} and dp.maps["workload_ids"] == {}


def test_an_unwritable_state_dir_does_not_stop_the_maps_and_is_retried(tmp_path, monkeypatch, caplog):
    """Read-only or full: the kernel side is applied at once, the error is logged once
    with the file's path, and refresh_envoy() writes the files once it works again."""
    from meshd import apply as apply_mod
    cfg, world = setup(tmp_path)
    dp = FakeDatapath()
    ap = Applier(dp, str(tmp_path))
    real = apply_mod.atomic_write
    broken = [True]

    def write(path, data, mode=0o644, gid=None):
        if broken[0]:
            raise OSError(28, "No space left on device", path + ".tmp")
        real(path, data, mode, gid)
    monkeypatch.setattr(apply_mod, "atomic_write", write)
    monkeypatch.setattr(apply_mod.envoy_config.fsutil, "atomic_write", write)
    caplog.set_level("INFO", logger="meshd")
    assert ap.apply(plan(cfg, world, ap.ids, now=1.0)) == {}      # no exception
    assert dp.maps["workload_ids"] == {3: 1}                        # the maps: applied
    assert ap.ids == {"api": 1} and load_ids(str(tmp_path)) == {}
    ids_path = os.path.join(tmp_path, statefiles.WORKLOAD_IDS)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(m.startswith(f"cannot write {ids_path}: No space left on device") for m in errors)
    assert len(errors) == 2                                         # ids + Envoy's files
    ap.refresh_envoy()
    ap.refresh_envoy()
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 2   # logged once
    broken[0] = False
    ap.refresh_envoy()                                              # a status tick
    assert load_ids(str(tmp_path)) == {"api": 1}
    assert os.path.isfile(tmp_path / statefiles.ENVOY_CONFIG_DIR / "lds.json")
    assert any("writable again" in r.getMessage() for r in caplog.records)
