"""The OCI hook's input (hostile or not), the container records, and what the
plan makes of containers: pure logic, no root."""
from __future__ import annotations

import io
import json
import os

import pytest

from meshd import containers, ocihook
from meshd.config import parse_files
from meshd.containers import OciStateError, Record, parse_oci_state
from meshd.discovery import ContainerFound, Found, World
from meshd.plan import plan

CID = "a" * 64
GOOD = {"ociVersion": "1.0.2-dev", "id": CID, "status": "creating", "pid": 4242,
        "bundle": "/var/lib/containers/x/userdata",
        "annotations": {"io.meshd.workload": "web", "io.container.manager": "libpod"}}


def state(**over) -> bytes:
    doc = dict(GOOD, **over)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def test_a_podman_state_parses():
    s = parse_oci_state(state())
    assert (s.id, s.pid, s.bundle, s.workload) == (CID, 4242, GOOD["bundle"], "web")
    assert parse_oci_state(state(annotations=...)).workload is None


@pytest.mark.parametrize("data, message", [
    (b"", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b"{" * 100000, "not JSON"),
    (b" " * (containers.MAX_STATE_BYTES + 1), "larger than"),
    (state(id=...), "id:"),
    (state(id=""), "id:"),
    (state(id="../../etc/passwd"), "id:"),
    (state(id="a/b"), "id:"),
    (state(id="x" * 129), "id:"),
    (state(id=7), "id:"),
    (state(pid=...), "pid:"),
    (state(pid="4242"), "pid:"),
    (state(pid=True), "pid:"),
    (state(pid=0), "pid:"),
    (state(pid=-1), "pid:"),
    (state(pid=1 << 40), "pid:"),
    (state(pid=1.5), "pid:"),
    (state(bundle="relative/path"), "bundle:"),
    (state(bundle="/a\u0000b"), "bundle:"),
    (state(bundle=None), "bundle:"),
    (state(annotations=["io.meshd.workload=web"]), "annotations:"),
    (state(annotations={"io.meshd.workload": 1}), "annotations:"),
    (state(annotations={"io.meshd.workload": "bad name"}), "invalid workload name"),
    (state(annotations={"io.meshd.workload": ""}), "invalid workload name"),
    (state(annotations={"io.meshd.workload": "w" * 65}), "invalid workload name"),
])
def test_hostile_states_are_refused_precisely(data, message):
    with pytest.raises(OciStateError, match=message):
        parse_oci_state(data)


def test_hook_refuses_malformed_input_with_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ocihook.os, "geteuid", lambda: 0)
    assert ocihook.run(str(tmp_path), io.BytesIO(b"not json")) == 1
    assert "refused: stdin is not an OCI state" in capsys.readouterr().err
    assert not (tmp_path / "containers").exists()    # nothing recorded


def test_hook_run_by_non_root_never_breaks_the_container(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ocihook.os, "geteuid", lambda: 1000)
    assert ocihook.run(str(tmp_path), io.BytesIO(state())) == 0
    err = capsys.readouterr().err
    assert "refused: run by uid 1000, not root" in err and "rootless" in err
    assert not (tmp_path / "containers").exists()


def test_hook_without_annotation_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ocihook.os, "geteuid", lambda: 0)
    assert ocihook.run(str(tmp_path), io.BytesIO(state(annotations=...))) == 0
    assert not (tmp_path / "containers").exists()


def test_hook_fails_open_when_the_container_cannot_be_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ocihook.os, "geteuid", lambda: 0)
    # pid 4242's cgroup or the bundle is not readable here: logged, exit 0
    monkeypatch.setattr(containers, "cgroup_of", lambda pid: (_ for _ in ()).throw(
        OSError(2, "No such file")))
    assert ocihook.run(str(tmp_path), io.BytesIO(state())) == 0
    assert "not meshed" in capsys.readouterr().err


def test_hook_fails_open_when_meshd_is_not_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ocihook.os, "geteuid", lambda: 0)
    monkeypatch.setattr(containers, "cgroup_of", lambda pid: "/libpod_parent/libpod-" + CID)
    monkeypatch.setattr(containers, "netns_of_bundle", lambda b, pid: "/run/netns/x")
    assert ocihook.run(str(tmp_path), io.BytesIO(state()), timeout=0.2) == 0
    assert "starts un-meshed (meshd will enroll it when it runs)" in capsys.readouterr().err
    # recorded, so the daemon enrolls it when it comes back
    assert list(containers.load_all(str(tmp_path))) == [CID]


def test_netns_of_bundle(tmp_path):
    spec = {"linux": {"namespaces": [{"type": "pid"},
                                     {"type": "network", "path": "/run/netns/netns-1"}]}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert containers.netns_of_bundle(str(tmp_path), 5) == "/run/netns/netns-1"
    spec["linux"]["namespaces"][1] = {"type": "network"}           # new, unnamed
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert containers.netns_of_bundle(str(tmp_path), 5) == "/proc/5/ns/net"
    spec["linux"]["namespaces"].pop()                               # --network host
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert containers.netns_of_bundle(str(tmp_path), 5) is None


def test_named_netns_finds_the_bind_mount_of_a_proc_path(tmp_path):
    """A pod's containers get the infra container's /proc/<pid>/ns/net: the
    entry of the netns directory with the same device and inode replaces it (a
    symlink stands in for Podman's bind mount here)."""
    (tmp_path / "another").write_text("")
    assert containers.named_netns("/proc/self/ns/net", str(tmp_path)) == "/proc/self/ns/net"
    (tmp_path / "pod-ns").symlink_to(f"/proc/{os.getpid()}/ns/net")
    assert containers.named_netns("/proc/self/ns/net", str(tmp_path)) == str(tmp_path / "pod-ns")
    assert containers.named_netns("/run/netns/x", str(tmp_path)) == "/run/netns/x"   # as given
    assert containers.named_netns("/proc/self/ns/net", str(tmp_path / "none")) == (
        "/proc/self/ns/net")                                                   # no such dir


def test_records_round_trip_and_junk_is_dropped(tmp_path):
    rec = Record(CID, "web", "/libpod_parent/libpod-" + CID, "/run/netns/n", 42)
    containers.save(str(tmp_path), rec)
    d = tmp_path / "containers"
    (d / "junk.json").write_text("{")
    (d / "b.json").write_text(json.dumps({"id": "c", "workload": "w", "cgroup": "/x",
                                          "netns": "", "pid": 1}))   # name/id mismatch
    assert containers.load_all(str(tmp_path)) == {CID: rec}
    assert sorted(p.name for p in d.iterdir()) == [f"{CID}.json"]
    containers.remove(str(tmp_path), CID)
    assert containers.load_all(str(tmp_path)) == {}


def test_an_older_records_proc_path_is_read_as_its_netns_twin(tmp_path):
    """Records written before the hook looked for a pod's bind mount name the
    infra container's /proc/<pid>/ns/net: loading reads it as the /run/netns
    entry (a symlink stands in for the bind mount), so an unprivileged Envoy
    can still open it after an upgrade."""
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    (netns_dir / "pod-ns").symlink_to(f"/proc/{os.getpid()}/ns/net")
    containers.save(str(tmp_path), Record(CID, "web", "/x", f"/proc/{os.getpid()}/ns/net", 42))
    (rec,) = containers.load_all(str(tmp_path), str(netns_dir)).values()
    assert rec.netns == str(netns_dir / "pod-ns")


# -- the plan -----------------------------------------------------------------------
CONFIG = parse_files({"a.toml": "[workload.web]\n[workload.api]\nunit = 'api.service'\n"})


def found(cid: str, workload: str, netns: str = "/run/netns/n", cgid: int = 100,
          ipv4: str = "10.88.0.2", cookie: int = 7, created: float = 0.0) -> ContainerFound:
    rec = Record(cid, workload, f"/libpod_parent/libpod-{cid}", netns, 42, created=created)
    facts = containers.NetnsFacts(cookie, ipv4, 1) if netns else None
    return ContainerFound(rec, Found(rec.cgroup, "/sys/fs/cgroup" + rec.cgroup, cgid), facts)


def test_bare_workload_selects_containers_only():
    p = plan(CONFIG, World(), {})
    assert p.workload("web").error == "selects containers only"
    assert p.workload("api").error == "waiting for unit api.service to start"


def test_containers_are_enrolled_into_their_workload():
    w = World(containers={"a" * 64: found("a" * 64, "web"),
                          "b" * 64: found("b" * 64, "web", cgid=101, ipv4="10.88.0.3", cookie=8),
                          "c" * 64: found("c" * 64, "web", netns="", cgid=102)})
    p = plan(CONFIG, w, {}, now=5.0)
    wid = p.ids["web"]
    a, b, c = p.containers
    assert [x.enrolled for x in p.containers] == [True, True, True]
    assert (a.index, b.index, c.index) == (1, 2, 0)      # host network: no index, no listener
    assert p.cgroup_ids == {100: wid, 101: wid, 102: wid}
    assert p.container_netns == {7: (1, "10.88.0.2"), 8: (2, "10.88.0.3")}
    assert p.envoy.containers == (("ns7", "/run/netns/n", wid), ("ns8", "/run/netns/n", wid))
    assert {str(link.owner) for link in p.links} == {"container:" + "a" * 12,
                                                      "container:" + "b" * 12,
                                                      "container:" + "c" * 12}
    # a later plan keeps indices and enrolment times; a new container takes a free index
    w2 = World(containers={"b" * 64: w.containers["b" * 64],
                           "d" * 64: found("d" * 64, "web", cgid=103, cookie=9)})
    p2 = plan(CONFIG, w2, p.ids, p, now=9.0)
    b2, d2 = p2.containers
    assert (b2.index, b2.enrolled_since, d2.index, d2.enrolled_since) == (2, 5.0, 1, 9.0)


def test_a_pods_containers_share_one_namespace_entry():
    """A pod: one network namespace (cookie 7) for two containers. One index,
    one listener pair, sk_lookup linked by one of them; the namespace outlives
    either container."""
    w = World(containers={"a" * 64: found("a" * 64, "web"),
                          "b" * 64: found("b" * 64, "web", cgid=101)})
    p = plan(CONFIG, w, {}, now=5.0)
    a, b = p.containers
    assert a.enrolled and b.enrolled and a.index == b.index == 1
    assert p.container_netns == {7: (1, "10.88.0.2")}
    assert p.envoy.containers == (("ns7", "/run/netns/n", p.ids["web"]),)
    assert {str(link.owner): link.netns for link in p.links} == {
        "container:" + "a" * 12: "/run/netns/n", "container:" + "b" * 12: ""}
    # a lower id joining does not take the namespace's link over, nor after a
    # restart (no previous plan): the one recorded first keeps it
    w1 = World(containers={**w.containers, "0" * 64: found("0" * 64, "web", cgid=102,
                                                              created=1.0)})
    p1 = plan(CONFIG, w1, p.ids, p, now=6.0)
    assert [link.netns for link in p1.links] == ["", "/run/netns/n", ""]
    assert [link.netns for link in plan(CONFIG, w1, p.ids, now=6.0).links] == [
        "", "/run/netns/n", ""]
    # a goes: b keeps the index and the namespace's listeners, and links sk_lookup
    p2 = plan(CONFIG, World(containers={"b" * 64: w.containers["b" * 64]}), p.ids, p, now=9.0)
    (b2,) = p2.containers
    assert (b2.index, b2.enrolled_since) == (1, 5.0)
    assert p2.envoy.containers == p.envoy.containers
    assert [(str(link.owner), link.netns) for link in p2.links] == [
        ("container:" + "b" * 12, "/run/netns/n")]


def test_a_pod_is_meshed_into_one_workload():
    """A container of another workload in an enrolled container's pod is not
    meshed; the one enrolled first keeps the namespace, whatever the ids."""
    cfg = parse_files({"a.toml": "[workload.web]\n[workload.db]\n"})
    first = World(containers={"b" * 64: found("b" * 64, "db", cgid=101)})
    p = plan(cfg, first, {}, now=5.0)
    w = World(containers={"a" * 64: found("a" * 64, "web"), **first.containers})
    p2 = plan(cfg, w, p.ids, p, now=6.0)
    a, b = p2.containers
    assert b.enrolled and not a.enrolled
    assert a.error == ("shares its network namespace with container bbbbbbbbbbbb of "
                       "workload db (a pod's containers are meshed into one workload): "
                       "not meshed")
    assert p2.envoy.containers == (("ns7", "/run/netns/n", p.ids["db"]),)
    assert [str(link.owner) for link in p2.links] == ["container:" + "b" * 12]
    # after a restart (no previous plan) the earliest recorded one keeps it
    w3 = World(containers={"a" * 64: found("a" * 64, "web", created=2.0),
                           "b" * 64: found("b" * 64, "db", cgid=101, created=1.0)})
    a3, b3 = plan(cfg, w3, p.ids, now=7.0).containers
    assert b3.enrolled and not a3.enrolled


def test_undeclared_workload_is_not_meshed_and_says_why():
    p = plan(CONFIG, World(containers={"a" * 64: found("a" * 64, "nosuch")}), {})
    (c,) = p.containers
    assert not c.enrolled and c.error == "workload nosuch is not declared: not meshed"
    assert p.links == () and p.container_netns == {} and p.cgroup_ids == {}


def test_container_without_ipv4_is_not_meshed():
    p = plan(CONFIG, World(containers={"a" * 64: found("a" * 64, "web", ipv4=None)}), {})
    assert "no IPv4 address" in p.containers[0].error and p.links == ()


def test_conmon_name_from_the_hooks_ancestors(tmp_path):
    def proc(pid, ppid, *args):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "cmdline").write_bytes("\0".join(args).encode() + b"\0")
        (d / "stat").write_text(f"{pid} ({args[0]}) S {ppid} 0 0")
    proc(30, 20, "/usr/bin/runc", "create", "--bundle", "/b")
    proc(20, 1, "/usr/bin/conmon", "--api-version", "1", "-c", CID, "-n", "web-1", "-r", "runc")
    proc(1, 0, "/sbin/init")
    assert containers.conmon_name(CID, 30, str(tmp_path)) == "web-1"
    assert containers.conmon_name("b" * 64, 30, str(tmp_path)) == ""     # another container
    assert containers.conmon_name(CID, 1, str(tmp_path)) == ""           # no conmon above
    assert containers.conmon_name(CID, 99, str(tmp_path)) == ""          # gone
