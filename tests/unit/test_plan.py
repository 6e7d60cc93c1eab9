"""The plan (meshd/plan.py): every decision reconcile makes, without root."""
from __future__ import annotations

import ipaddress

import pytest

from meshd import maplayout, routing
from meshd.config import parse_files
from meshd.discovery import Found, World
from meshd.plan import EMPTY, Owner, PlanError, allocate_ids, plan

CONFIG = """
[mesh]
outbound_port = 15001
inbound_port = 15006
exclude_outbound_ports = [22, 25]
exclude_outbound_cidrs = ["10.0.0.0/8"]
exclude_inbound_ports = [22]
protocols = { 80 = "http" }
state_dir = "/run/meshd-test"

[workload.api]
unit = "api.service"
exclude_outbound_ports = [5432]
exclude_outbound_cidrs = ["192.168.0.0/16"]
exclude_inbound_ports = [9100]

[workload.web]
cgroup = "/system.slice/web.service"
inbound_ports = [8080, 8443]
protocols = { 8080 = "http" }
"""


def config(text: str = CONFIG):
    return parse_files({"a.toml": text})


def found(name: str, cgid: int) -> Found:
    return Found(f"/system.slice/{name}.service", f"/sys/fs/cgroup/system.slice/{name}.service",
                 cgid)


def world(listening=None, **cgroups) -> World:
    return World({n: found(n, cgid) for n, cgid in cgroups.items()}, listening or {})


def test_enrolled_and_waiting():
    p = plan(config(), world(web=7), {}, now=100.0)
    api, web = p.workloads
    assert (api.name, api.enrolled, api.error) == ("api", False, "waiting for unit api.service "
                                                   "to start")
    assert (web.name, web.enrolled_since, web.cgroup_id, web.error) == ("web", 100.0, 7, "")
    assert [(ln.owner, ln.cgroup_path) for ln in p.links] == [
        (Owner("workload", "web"), "/sys/fs/cgroup/system.slice/web.service")]
    assert p.cgroup_ids == {7: web.id}
    assert p.envoy.workload_ids == (web.id,)


def test_waiting_for_a_cgroup_path():
    p = plan(config(), world(api=3), {})
    assert p.workload("web").error == "waiting for cgroup /system.slice/web.service"
    assert not p.workload("web").enrolled


def test_owner_round_trips_as_the_pin_prefix():
    assert str(Owner.workload("a.b")) == "workload:a.b"
    assert Owner.parse("workload:a:b") == Owner("workload", "a:b")
    assert Owner.parse("envoy") == Owner("envoy")


def test_enrolment_time_kept_while_on_the_same_cgroup_reset_when_it_moves():
    first = plan(config(), world(web=7), {}, now=100.0)
    same = plan(config(), world(web=7), first.ids, first, now=200.0)
    assert same.workload("web").enrolled_since == 100.0
    moved = plan(config(), world(web=8), same.ids, same, now=300.0)
    assert moved.workload("web").enrolled_since == 300.0
    assert moved.cgroup_ids == {8: moved.workload("web").id}


def test_ids_are_reused_across_restarts():
    saved = {"web": 5, "api": 9}
    p = plan(config(), world(), saved)
    assert (p.workload("api").id, p.workload("web").id) == (9, 5)
    assert p.ids == saved


def test_new_names_get_the_lowest_free_id():
    assert allocate_ids(["a", "b", "c"], {"b": 1}) == {"b": 1, "a": 2, "c": 3}


def test_ids_of_removed_workloads_recycled_only_when_full():
    full = {f"old{i}": i for i in range(1, maplayout.MAX_WORKLOADS)}
    ids = allocate_ids(["new", "old7"], full)
    assert ids == {"old7": 7, "new": 1}
    # with room left, ids of removed workloads stay (their counters keep meaning)
    assert allocate_ids(["new"], {"gone": 1}) == {"gone": 1, "new": 2}


def test_too_many_workloads():
    names = [f"w{i}" for i in range(maplayout.MAX_WORKLOADS)]
    with pytest.raises(PlanError):
        allocate_ids(names, {})


def test_exclusions_merge_global_and_per_workload():
    p = plan(config(), world(), {"api": 1, "web": 2})
    assert p.excluded_ports == {0: {22, 25}, 1: {5432}, 2: set()}
    assert p.excluded_cidrs == {0: {ipaddress.ip_network("10.0.0.0/8")},
                                1: {ipaddress.ip_network("192.168.0.0/16")}, 2: set()}


def test_explicit_vs_auto_inbound_ports_and_envoy_ports_never_steered():
    p = plan(config(), world({"api": frozenset({8000})}, api=3, web=7), {"api": 1, "web": 2})
    i = p.inbound
    assert i.explicit == {2: {8080, 8443}}
    assert i.auto == {1}
    assert i.excluded == {0: {22, 15001, 15006}, 1: {9100}, 2: set()}
    assert i.discovered == {1: {8000}}


def test_only_newly_enrolled_workloads_get_discovered_ports():
    first = plan(config(), world({"api": frozenset({8000})}, api=3), {})
    assert first.inbound.discovered == {first.workload("api").id: {8000}}
    again = plan(config(), world({"api": frozenset({8000, 9000})}, api=3), first.ids, first)
    assert again.inbound.discovered == {}
    moved = plan(config(), world({"api": frozenset({9000})}, api=4), again.ids, again)
    assert moved.inbound.discovered == {moved.workload("api").id: {9000}}


def test_waiting_workloads_get_no_inbound_settings():
    p = plan(config(), world(), {"api": 1, "web": 2})
    assert (p.inbound.explicit, p.inbound.auto, p.inbound.discovered) == ({}, set(), {})
    assert p.inbound.excluded == {0: {22, 15001, 15006}}


def test_a_workload_whose_links_failed_waits_with_the_reason():
    p = plan(config(), world(api=3, web=7), {}, failed={"web": "cannot attach to x: gone"})
    assert p.workload("web").error == "cannot attach to x: gone"
    assert not p.workload("web").enrolled
    assert [ln.owner.name for ln in p.links] == ["api"]
    assert list(p.cgroup_ids) == [3]


def test_envoy_render_input():
    p = plan(config(), world(api=3, web=7), {"api": 1, "web": 2})
    e = p.envoy
    assert (e.outbound_port, e.inbound_port, e.state_dir) == (15001, 15006, "/run/meshd-test")
    assert e.client_mark == routing.MARK
    assert e.protocols == {80: "http"}
    assert e.workload_protocols == {1: {}, 2: {8080: "http"}}
    assert e.workload_ids == (1, 2) and not e.forwarded_for
    off = plan(config(CONFIG.replace("[mesh]", "[mesh]\npreserve_client_address = false\n"
                                     "http_forwarded_for = true")), world(), {})
    assert off.envoy.client_mark == 0 and off.envoy.forwarded_for


def test_same_inputs_same_plan():
    args = (config(), world({"api": frozenset({1})}, api=3), {"api": 1})
    assert plan(*args, EMPTY, 5.0) == plan(*args, EMPTY, 5.0)
