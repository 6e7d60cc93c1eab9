"""The Debian package: built once per session with scripts/build-deb.sh, then inspected
with dpkg-deb (contents, control fields, conffiles, maintainer scripts).  It is never
installed here (that would touch the host); the nspawn tier installs it in a guest."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import meshd

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("needs root (installs the build dependencies if missing)", allow_module_level=True)
if not shutil.which("dpkg-deb") or not shutil.which("apt-get"):
    pytest.skip("not a Debian system", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
BUILD_DEPS = ("dpkg-dev", "debhelper", "dh-python")


def _installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return "install ok installed" in r.stdout


@pytest.fixture(scope="session")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    env = dict(os.environ)
    env.pop("DEB_BUILD_OPTIONS", None)
    if not all(_installed(p) for p in BUILD_DEPS):  # not the package build: not timed
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        *BUILD_DEPS], check=False, capture_output=True,
                       env=dict(env, DEBIAN_FRONTEND="noninteractive"))
    t0 = time.monotonic()
    r = subprocess.run([str(REPO / "scripts" / "build-deb.sh"), str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path == out / f"meshd_{meshd.__version__}_all.deb"
    assert path.is_file()
    assert took < 90, f"the package build took {took:.0f}s"
    return path


@pytest.fixture(scope="session")
def contents(deb) -> dict[str, str]:
    """path -> mode string, as `dpkg-deb -c` lists them."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True,
                         text=True).stdout
    files = {}
    for line in out.splitlines():
        cols = line.split()
        files[cols[5].lstrip(".")] = cols[0]
    return files


@pytest.fixture(scope="session")
def unpacked(deb, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(d)], check=True)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(d / "DEBIAN")], check=True)
    return d


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_ships_the_program_units_bpf_sources_and_config(contents):
    for path in ("/usr/bin/meshd",
                 "/lib/systemd/system/meshd.service",
                 "/lib/systemd/system/meshd.slice",
                 "/usr/share/meshd/bpf/meshd.h",
                 "/etc/meshd/meshd.toml",
                 "/usr/lib/python3/dist-packages/meshd/__init__.py",
                 "/usr/lib/python3/dist-packages/meshd/cli.py",
                 "/usr/lib/python3/dist-packages/meshd/envoy/systemd_unit.py"):
        assert path in contents, path
    assert contents["/usr/bin/meshd"].startswith("-rwxr-xr-x")


def test_every_module_and_bpf_source_is_shipped(contents):
    for py in (REPO / "meshd").rglob("*.py"):
        rel = py.relative_to(REPO / "meshd")
        assert f"/usr/lib/python3/dist-packages/meshd/{rel}" in contents, str(rel)
    for src in (REPO / "bpf").iterdir():
        if src.suffix in (".c", ".h"):
            assert f"/usr/share/meshd/bpf/{src.name}" in contents, src.name
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in contents)


def test_dbus_policy_is_shipped_when_the_tree_has_one(contents):
    if not (REPO / "etc" / "dbus-1" / "io.meshd.Mesh1.conf").exists():
        pytest.skip("no D-Bus policy in the tree yet")
    assert "/usr/share/dbus-1/system.d/io.meshd.Mesh1.conf" in contents


def test_control_fields(deb):
    assert field(deb, "Package") == "meshd"
    assert field(deb, "Version") == meshd.__version__
    assert field(deb, "Architecture") == "all"
    depends = field(deb, "Depends")
    for dep in ("python3 (>= 3.9)", "python3-bpfcc", "python3-gi", "python3-pydbus",
                "python3-systemd", "python3-pyroute2", "libbpf1", "iproute2"):
        assert re.search(rf"(^|, ){re.escape(dep)}(,|$| \|)", depends), (dep, depends)
    # Kernel headers are recommended, not required (as Debian's bpfcc-tools does not).
    assert "linux-headers" not in depends
    assert "linux-headers-generic" in field(deb, "Recommends")
    assert "envoy" in field(deb, "Description").lower()


def test_config_is_a_conffile(unpacked):
    conffiles = (unpacked / "DEBIAN" / "conffiles").read_text().split()
    assert "/etc/meshd/meshd.toml" in conffiles


def test_shipped_files_are_the_trees(unpacked):
    for rel, shipped in (("units/meshd.service", "lib/systemd/system/meshd.service"),
                         ("units/meshd.slice", "lib/systemd/system/meshd.slice"),
                         ("etc/meshd/meshd.toml", "etc/meshd/meshd.toml"),
                         ("bpf/meshd.h", "usr/share/meshd/bpf/meshd.h")):
        assert (unpacked / shipped).read_bytes() == (REPO / rel).read_bytes(), rel
    unit = (unpacked / "lib/systemd/system/meshd.service").read_text()
    assert "ExecStart=/usr/bin/meshd run\n" in unit
    assert "Type=notify\n" in unit


def test_installed_layout_runs_and_finds_the_bpf_sources(unpacked):
    """/usr/bin/meshd on the unpacked package's module (Debian's python3, as installed)."""
    env = dict(os.environ, PYTHONPATH=str(unpacked / "usr/lib/python3/dist-packages"))
    env.pop("MESHD_BPF_DIR", None)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    r = subprocess.run([python, str(unpacked / "usr/bin/meshd"), "--version"],
                       capture_output=True, text=True, env=env, cwd=str(unpacked))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"meshd {meshd.__version__}"
    r = subprocess.run([python, "-c", "import meshd.datapath as d; print(d.__file__); "
                        "print(d.default_bpf_dir())"], capture_output=True, text=True, env=env,
                       cwd=str(unpacked))  # not the checkout: it has bpf/ and meshd/
    assert r.returncode == 0, r.stderr
    where, bpf_dir = r.stdout.split()
    assert where.startswith(str(unpacked))
    assert bpf_dir == "/usr/share/meshd/bpf"


def test_maintainer_scripts(unpacked):
    ctl = unpacked / "DEBIAN"
    for name in ("postinst", "prerm", "postrm"):
        subprocess.run(["sh", "-n", str(ctl / name)], check=True)
    postinst = (ctl / "postinst").read_text()
    assert "deb-systemd-helper enable 'meshd.service'" in postinst
    assert "daemon-reload" in postinst
    assert "ischroot" in postinst and "meshd check" in postinst
    prerm = (ctl / "prerm").read_text()
    # stop the service, then clean up, while /usr/bin/meshd still exists
    assert prerm.index("stop meshd.service") < prerm.index("/usr/bin/meshd cleanup")
    postrm = (ctl / "postrm").read_text()
    assert "rm -rf /sys/fs/bpf/meshd" in postrm
    assert '"$1" = purge' in postrm
