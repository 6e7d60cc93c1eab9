"""Podman containers selected by name or by label (no annotation), with real
Podman, eBPF and Envoy: discovery (cgroup inotify, conmon, `podman inspect`)
enrolls them after they start, Envoy counts their connections, and stopping
them, or a configuration that no longer selects them, leaves nothing behind.
"""
from __future__ import annotations

import os
import time

import pytest

from conftest import Cgroups, cgroup2_root, wait_for
from helpers.podman import remove_v1_cgroups
from test_podman import (CX, configure, containers, ctr_links, ctr_listeners, echo,
                         envoy_listeners, http_get)


def enrolled(mesh, how: str) -> list[dict]:
    return [c for c in containers(mesh) if c["enrolled_since"] and c["selected_by"] == how]


def nothing_left(mesh) -> None:
    wait_for(lambda: containers(mesh) == [] and ctr_links(mesh) == [], timeout=30,
             what="the container un-enrolled")
    assert ctr_listeners(mesh) == []
    wait_for(lambda: not any(n.startswith("meshd_ctr_") for n in envoy_listeners(mesh)),
             what="Envoy dropped its listeners")
    assert os.listdir(os.path.join(mesh.state_dir, "containers")) == []


def test_label_selected_container_is_enrolled_and_counted(mesh, server, podman):
    label = f"{podman.prefix}-web"
    configure(mesh, f'[workload.web]\ncontainer_labels = {{ "io.meshd.test/app" = "{label}" }}\n')
    mesh.start()
    other = podman.run("other", "sleep", "300", detach=True,
                       options=["--label", "io.meshd.test/app=something-else"])
    assert other.returncode == 0, other.stderr
    r = podman.run("lbl", "sleep", "300", detach=True,
                   options=["--label", f"io.meshd.test/app={label}"])
    assert r.returncode == 0, r.stderr
    started = time.monotonic()
    wait_for(lambda: enrolled(mesh, "label"), what="the label-selected container enrolled")
    print(f"label-selected container enrolled {time.monotonic() - started:.2f} s after "
          "`podman run -d` returned (status is written every second)")
    (c,) = containers(mesh)                       # the other label is not selected
    assert c["name"] == f"{podman.prefix}-lbl" and c["workload"] == "web"
    assert c["addresses"] and c["cgroup"].endswith(c["id"])
    assert len(ctr_links(mesh)) == 8 and len(ctr_listeners(mesh)) == 2
    wait_for(lambda: any(n.startswith("meshd_ctr_") for n in envoy_listeners(mesh)),
             what="its listener in Envoy")
    cx = mesh.stat(CX)
    seen = echo(podman.exec("lbl", *http_get(server.ip4, "/echo")))
    assert seen["client"] == server.host_ip4
    assert mesh.stat(CX) == cx + 1
    echo(podman.exec("other", *http_get(server.ip4, "/echo")))    # direct
    assert mesh.stat(CX) == cx + 1
    assert "selected by label for workload web" in mesh.log_text()
    status = mesh.cli("status").stdout
    assert "selected by label" in status and c["addresses"][0] in status
    podman.rm("lbl")
    nothing_left(mesh)


def test_name_selected_container_survives_restart_and_follows_the_config(mesh, server, podman):
    configure(mesh, f'[workload.api]\ncontainer_names = ["{podman.prefix}-api-*"]\n')
    mesh.start()
    r = podman.run("api-1", "sleep", "300", detach=True)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: enrolled(mesh, "name"), what="the name-selected container enrolled")
    links = sorted(ctr_links(mesh))
    assert len(links) == 8
    mesh.kill()                                    # SIGKILL: a restart loses nothing
    mesh.start()
    assert sorted(ctr_links(mesh)) == links
    assert [c["selected_by"] for c in enrolled(mesh, "name")] == ["name"]
    cx = mesh.stat(CX)
    echo(podman.exec("api-1", *http_get(server.ip4, "/echo")))
    assert mesh.stat(CX) == cx + 1
    # a configuration that no longer selects it un-enrolls it
    configure(mesh, "[workload.api]\n")
    nothing_left(mesh)
    assert "no longer selected" in mesh.log_text()


def test_rootless_container_is_reported_not_meshed_and_works(mesh, server, podman, prefix):
    """A rootless Podman (here the user nobody) runs the hook as that user: the
    container starts un-meshed, and meshd reports it in the log and in status."""
    from helpers.podman import RootlessPodman
    configure(mesh)
    mesh.start()
    rl = RootlessPodman(prefix, podman.hooks_dir)
    try:
        r = rl.cmd("run", "-d", "--name", f"{prefix}-rl", "--network", "none",
                   "--annotation", "io.meshd.workload=web", "localhost/rootless/bb",
                   "sleep", "300")
        assert r.returncode == 0, r.stderr                  # never broken
        assert rl.cmd("exec", f"{prefix}-rl", "echo", "ok").stdout == b"ok\n"
        wait_for(lambda: [c["network"] for c in containers(mesh)] == ["rootless"],
                 what="the rootless container in the status")
        (c,) = containers(mesh)
        assert c["name"] == f"{prefix}-rl" and c["workload"] == "web"
        assert not c["enrolled_since"] and "rootless Podman (uid 65534)" in c["error"]
        assert "NOT MESHED: rootless Podman" in mesh.cli("status").stdout
        assert "rootless Podman (uid 65534): not meshed" in mesh.log_text()
        assert ctr_links(mesh) == [] and ctr_listeners(mesh) == []
        rl.cmd("rm", "-f", "-t", "0", f"{prefix}-rl", check=True)
        wait_for(lambda: containers(mesh) == [], what="the report gone with the container")
    finally:
        rl.cleanup()


@pytest.mark.parametrize("cgroups_mode", ["no-conmon", "split"])
def test_container_run_by_a_unit_is_selected_by_unit(mesh, server, podman, prefix, cgroups_mode):
    """As `podman generate systemd --new` runs it: `podman run --cgroups=no-conmon`
    from the unit's cgroup, so conmon stays in the unit's cgroup and the container
    gets its own; or --cgroups=split, the container's cgroup below the unit's.
    Without systemd as PID 1 here, the unit's cgroup is made by hand where
    systemd puts one (a .service below a .slice)."""
    unit = f"{prefix}-web.service"
    slice_cg = Cgroups.__new__(Cgroups)   # /<prefix>.slice: where find_unit looks
    slice_cg.root, slice_cg.base, slice_cg.netns = cgroup2_root(), f"/{prefix}.slice", mesh.netns
    try:
        unit_cg = slice_cg.make(unit)
        configure(mesh, f'[workload.svc]\nunit = "{unit}"\n')
        mesh.start()
        r = slice_cg.run(unit_cg, *podman.store.base, "--hooks-dir", podman.hooks_dir, "run",
                         "-d", f"--cgroups={cgroups_mode}", "--name", podman.name("unit"),
                         *(["--cgroup-parent", f"/{prefix}/ctr"] if cgroups_mode == "no-conmon"
                           else []), "localhost/meshd-test/busybox",
                         "sleep", "300", env=podman.store.env, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: enrolled(mesh, "unit"), what="the unit's container enrolled")
        (c,) = containers(mesh)
        assert c["workload"] == "svc" and c["cgroup"].startswith(
            f"/{prefix}/ctr/libpod-" if cgroups_mode == "no-conmon"
            else f"{unit_cg}/libpod-payload-")
        cx = mesh.stat(CX)
        echo(podman.exec("unit", *http_get(server.ip4, "/echo")))
        assert mesh.stat(CX) == cx + 1
        podman.rm("unit")
        nothing_left(mesh)
    finally:
        podman.cleanup()   # before the cgroups: no container process left in them
        slice_cg.cleanup()
        remove_v1_cgroups(slice_cg.base)
