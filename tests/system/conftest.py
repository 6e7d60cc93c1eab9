"""The systemd tier: a minimal Debian 12 booted with systemd-nspawn, the built
.debs (meshd, meshd-envoy) installed in it with apt, meshd run by the guest's real
systemd and D-Bus.

The root file system is made once with debootstrap and cached under
/var/cache/meshd-tests (keyed by its package list); every boot is
--volatile=overlay, so the cache is never modified. The guest has its own
network namespace (--private-network) and its own bpffs directory (a
subdirectory of the host's, bound to /sys/fs/bpf), so it touches nothing of
the host's but what the test names with its prefix.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers.common import cgroup2_root, kill_cgroup, reap, wait_for

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("systemd,systemd-sysv,dbus,python3,python3-bpfcc,python3-gi,python3-pydbus,"
            "python3-systemd,python3-pyroute2,libbpf1,iproute2,curl,procps,util-linux,"
            "python3-cryptography,python3-cffi-backend,"   # identities (debootstrap does not
            # resolve the virtual python3-cffi-backend-api-* dependency itself)
            "python3-prometheus-client,python3-msgpack,"   # meshd's Recommends: metrics, flows
            # Podman with the runtime the suite uses, the CNI bridge and its firewall
            # rules, and a static busybox for the test image
            "podman,runc,conmon,containernetworking-plugins,iptables,busybox-static")
CACHE = Path("/var/cache/meshd-tests")
SERVER = "10.240.1.2"    # Guest.add_server_host's address


def debian_mirror() -> str:
    """The mirror this machine already uses (apt's own sources)."""
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        m = re.search(r"^URIs:\s*(\S+)", f.read_text(), re.M)
        if m:
            return m.group(1)
    for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        with contextlib.suppress(OSError):
            m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm", f.read_text(), re.M)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="session")
def rootfs() -> Path:
    key = hashlib.sha256(PACKAGES.encode()).hexdigest()[:10]
    path = CACHE / f"bookworm-{key}"
    if (path / ".complete").exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    try:
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}",
                            "bookworm", str(tmp), debian_mirror()],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"debootstrap failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        (tmp / ".complete").touch()
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# Build B of the upgrade test: the same tree, a newer version, BPF sources whose
# text (so the build hash meshd compares with the pins) differs harmlessly.
UPGRADE_VERSION_SUFFIX = "+mtupgrade"
UPGRADE_DEFINE = "\n/* build B of the system tier's upgrade test */\n#define MESHD_TEST_BUILD_B 1\n"


@pytest.fixture(scope="session")
def deb_b(tmp_path_factory) -> Path:
    """meshd's .deb of build B, built from a copy of the tree the way
    scripts/build-deb.sh builds any (--meshd-only: meshd-envoy stays build A's)."""
    tree = tmp_path_factory.mktemp("build-b") / "meshd"
    tree.mkdir()
    for part in ("README.md", "pyproject.toml", "meshd", "bpf", "etc", "units", "packaging",
                 "scripts"):
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, tree / part)
    with open(tree / "bpf" / "meshd.h", "a") as f:
        f.write(UPGRADE_DEFINE)
    init = tree / "meshd" / "__init__.py"
    text, n = re.subn(r'^__version__ = "(.*)"$', rf'__version__ = "\1{UPGRADE_VERSION_SUFFIX}"',
                      init.read_text(), flags=re.M)
    assert n == 1, init
    init.write_text(text)
    out = tmp_path_factory.mktemp("deb-b")
    r = subprocess.run([str(tree / "scripts" / "build-deb.sh"), "--meshd-only", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = [Path(p) for p in r.stdout.split()]
    return path


class Guest:
    """A booted systemd-nspawn machine; commands run in all its namespaces."""

    def __init__(self, rootfs: Path, name: str, share: Path):
        self.rootfs, self.name, self.share = rootfs, name, share
        self.cgroup = os.path.join(cgroup2_root(), name)
        self.bpffs = f"/sys/fs/bpf/{name}"
        self.proc: subprocess.Popen | None = None
        self.leader = 0
        self.log = open(share / "nspawn.log", "w")

    def boot(self) -> "Guest":
        os.makedirs(self.cgroup, exist_ok=True)
        os.makedirs(self.bpffs, exist_ok=True)
        procs = os.path.join(self.cgroup, "cgroup.procs")
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.rootfs), "-b", "-M", self.name,
             "--register=no", "--keep-unit", "--console=pipe", "--capability=all",
             "--system-call-filter=bpf perf_event_open", "--private-network",
             "--volatile=overlay", f"--bind={self.bpffs}:/sys/fs/bpf",
             "--bind-ro=/lib/modules", "--bind-ro=/usr/src", f"--bind-ro={self.share}:/mnt/meshd"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=lambda: Path(procs).write_text("0"))

        def leader():
            if self.proc.poll() is not None:
                raise AssertionError(f"nspawn exited {self.proc.returncode}: {self.log_text()}")
            # nspawn forks helpers first; the guest's PID 1 is the child running systemd
            for kid in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{kid}/comm").read_text().strip() == "systemd":
                        return int(kid)
            return 0
        self.leader = wait_for(leader, 30, what="guest init")
        # systemd's own socket appears a moment after PID 1 starts
        wait_for(lambda: self.sh("test -S /run/systemd/private", check=False).returncode == 0,
                 30, what="guest systemd socket")
        state = self.sh("systemctl is-system-running --wait", check=False, timeout=90).stdout
        assert state.strip() in ("running", "degraded"), state + self.sh(
            "systemctl --failed --no-pager", check=False).stdout
        return self

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def sh(self, script: str, check=True, timeout=60, user: int | None = None):
        """Run a shell script inside the guest (all its namespaces)."""
        cmd = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--"]
        if user is not None:
            cmd += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        r = subprocess.run(cmd + ["/bin/sh", "-c", script], capture_output=True, text=True,
                           timeout=timeout)
        if check:
            assert r.returncode == 0, f"guest: {script}\n{r.stdout}\n{r.stderr}"
        return r

    def in_unit(self, unit: str, script: str, check=True, timeout=60):
        """Run a script as a process of a guest unit's cgroup (as that unit's workload)."""
        return self.sh(f"echo $$ > /sys/fs/cgroup/system.slice/{unit}/cgroup.procs && {script}",
                       check=check, timeout=timeout)

    def add_server_host(self) -> None:
        """A server host behind a veth (namespace srv, SERVER), answering HTTP on 8080
        and 2222 (tests/helpers/echo_server.py as the unit mtsrv.service)."""
        self.sh("ip netns add srv && ip link add mv0 type veth peer name mv1 && "
                "ip link set mv1 netns srv && ip addr add 10.240.1.1/24 dev mv0 && "
                f"ip link set mv0 up && ip -n srv addr add {SERVER}/24 dev mv1 && "
                "ip -n srv link set mv1 up && ip -n srv link set lo up")
        self.sh("systemd-run --unit=mtsrv.service ip netns exec srv "
                "python3 /mnt/meshd/echo_server.py --http 8080 --http 2222")
        wait_for(lambda: self.sh(f"curl -s -m 2 http://{SERVER}:8080/echo",
                                 check=False).returncode == 0, what="test server")

    def install_debs(self) -> str:
        """The README's route: the two packages, with apt (--no-install-recommends:
        the guest has no network for the other recommendations). Returns apt's output."""
        return self.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y "
                       "--no-install-recommends /mnt/meshd/meshd_*_all.deb "
                       "/mnt/meshd/meshd-envoy_*.deb 2>&1", timeout=300).stdout

    def shutdown(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGRTMIN + 4)   # systemd: poweroff
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        reap()
        kill_cgroup(self.cgroup)
        self.log.close()
        if os.path.isdir(self.bpffs):
            shutil.rmtree(self.bpffs, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(rootfs, debs, tmp_path_factory):
    """A booted guest with the two .debs and the test scripts (echo_server.py, load.py)
    at /mnt/meshd.
    Nothing else: no Envoy, no pip; the guest gets Envoy from meshd-envoy."""
    name = "mt" + os.urandom(3).hex() + "g"
    share = tmp_path_factory.mktemp(name)
    os.chmod(share, 0o755)
    for deb in debs:
        shutil.copy(deb, share / deb.name)
        os.chmod(share / deb.name, 0o644)   # readable by apt's _apt sandbox user
    shutil.copy(REPO / "tests" / "helpers" / "echo_server.py", share / "echo_server.py")
    shutil.copy(REPO / "tests" / "helpers" / "load.py", share / "load.py")   # the load harness
    g = Guest(rootfs, name, share)
    try:
        yield g.boot()
    finally:
        g.shutdown()
