"""Selecting Podman containers by name, label or unit: the configuration keys,
what a conmon's command line says, and which workload wins. Pure logic, no root."""
from __future__ import annotations

import pytest

from meshd.config import ConfigInvalid, parse_files
from meshd.podmanlookup import container_id_of, parse_conmon
from meshd.podmanselect import select

CID = "0123456789abcdef" * 4
ARGV = ["/usr/bin/conmon", "--api-version", "1", "-c", CID, "-u", CID, "-r", "/usr/bin/runc",
        "-b", f"/var/lib/containers/storage/overlay-containers/{CID}/userdata", "-n", "web-1",
        "--exit-command", "/usr/bin/podman", "--exit-command-arg", "--root",
        "--exit-command-arg", "/srv/store", "--exit-command-arg", "--runroot",
        "--exit-command-arg", "/run/store", "--exit-command-arg", "--storage-driver",
        "--exit-command-arg", "vfs", "--exit-command-arg", "container",
        "--exit-command-arg", "cleanup", "--exit-command-arg", CID]


def workloads(text: str):
    return parse_files({"a.toml": text}).workloads


def test_keys_parse():
    (w,) = workloads('[workload.web]\ncontainer_names = ["web-*", "api"]\n'
                     'container_labels = { app = "web", "io.x/tier" = "front" }\n')
    assert w.container_names == ("api", "web-*")
    assert w.container_labels == (("app", "web"), ("io.x/tier", "front"))


@pytest.mark.parametrize("text, message", [
    ('container_names = "web"', "expected array"),
    ('container_names = ["we b"]', "element 1: expected a container name or pattern"),
    ("container_labels = {}", "at least one label"),
    ('container_labels = { app = 1 }', "label app: expected a string value"),
    ('container_labels = { "-x" = "1" }', "label '-x'"),
])
def test_bad_keys_name_file_line_and_key(text, message):
    with pytest.raises(ConfigInvalid) as e:
        parse_files({"a.toml": f"[workload.web]\n{text}\n"})
    (err,) = e.value.errors
    assert str(err).startswith("a.toml:2: workload.web.container_") and message in str(err)


def test_one_name_selected_by_two_workloads_is_refused():
    with pytest.raises(ConfigInvalid) as e:
        parse_files({"a.toml": '[workload.a]\ncontainer_names = ["web"]\n'
                               '[workload.b]\ncontainer_names = ["web"]\n'})
    assert "container name 'web' is already selected by workload 'a'" in str(e.value)


def test_conmon_command_line():
    c = parse_conmon(77, ARGV, 0, "/system.slice/container-web.service",
                     {"CONTAINERS_CONF": "/etc/x.conf", "PATH": "/bin"})
    assert (c.id, c.name, c.rootless) == (CID, "web-1", False)
    assert c.bundle.endswith("/userdata")
    # the Podman that started it, with its own storage, without `container cleanup`
    assert c.podman == ("/usr/bin/podman", "--root", "/srv/store", "--runroot", "/run/store",
                        "--storage-driver", "vfs")
    assert dict(c.env) == {"CONTAINERS_CONF": "/etc/x.conf"}
    assert parse_conmon(78, ARGV, 1000, "", {}).rootless
    assert parse_conmon(79, ["/usr/bin/conmon", "-c", "not-an-id"], 0, "", {}) is None


def test_container_cgroup_names():
    assert container_id_of(f"libpod-{CID}") == CID                 # cgroupfs
    assert container_id_of(f"libpod-{CID}.scope") == CID           # systemd
    assert container_id_of(f"libpod-payload-{CID}") == CID         # --cgroups=split
    assert container_id_of(f"libpod-conmon-{CID}.scope") is None   # conmon's, not the container's
    assert container_id_of("machine-libpod_pod_x.slice") is None


def test_which_workload_selects():
    ws = workloads('[workload.a]\ncontainer_labels = { app = "web" }\n'
                   '[workload.b]\ncontainer_names = ["web-*"]\n'
                   '[workload.c]\nunit = "container-web.service"\n')
    units = {"c": "/system.slice/container-web.service"}
    assert select(ws, "web-1", {"app": "web"}, ("",), units) == ("b", "name")   # name first
    assert select(ws, "x", {"app": "web", "more": "1"}, ("",), units) == ("a", "label")
    assert select(ws, "x", None, ("",), units) is None                        # labels unknown yet
    assert select(ws, "x", {}, ("/machine.slice/libpod-1.scope",
                                "/system.slice/container-web.service"), units) == ("c", "unit")
    assert select(ws, "x", {}, ("/system.slice/container-web.service/libpod-payload-1",),
                  units) == ("c", "unit")
    assert select(ws, "x", {}, ("/system.slice/container-web.service2",), units) is None


def test_conmons_read_from_proc(tmp_path):
    """A fake /proc: conmon found by comm, its uid, cgroup; other processes ignored."""
    from meshd.podmanlookup import conmons
    for pid, comm, argv, uid in ((10, "conmon", ARGV, 0), (11, "sleep", ["sleep", "1"], 0)):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "comm").write_text(comm + "\n")
        (d / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
        (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        (d / "cgroup").write_text("1:cpu:/x\n0::/system.slice/container-web.service\n")
    (tmp_path / "self").mkdir()
    (c,) = conmons(str(tmp_path)).values()           # environ unreadable: still found
    assert (c.pid, c.id, c.cgroup, c.env) == (10, CID, "/system.slice/container-web.service", ())


def test_rootless_report_carries_the_container_journal_fields(caplog, tmp_path):
    from meshd.discovery import Discovery
    from meshd.podmanselect import Selector
    s = Selector(Discovery(str(tmp_path)), str(tmp_path))
    c = parse_conmon(77, ARGV, 1000, "", {})
    with caplog.at_level("WARNING", logger="meshd"):
        s._report_rootless(c, ("web", "name"))
        s._report_rootless(c, ("web", "name"))       # once per container
    (rec,) = caplog.records
    assert (rec.CONTAINER_ID, rec.CONTAINER_NAME, rec.WORKLOAD) == (CID, "web-1", "web")
    assert "rootless Podman (uid 1000): not meshed" in rec.getMessage()
    assert s.rootless[CID].workload == "web"
