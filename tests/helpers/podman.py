"""Real Podman for the tests, kept apart from the host's and from other tests'.

Storage (vfs: no mounts to leak) and run root are the session's own, under a
temporary directory; the image is a busybox-static root imported once per
session. Every podman command runs in the network namespace of the test's mesh
(nsenter --net), so the cni-podman0 bridge and the containers' veths live in a
namespace the test made; container cgroups go below the test's /<prefix>/ and
containers carry the test's prefix in their names. The hooks directory is the
test's own, with meshd.json pointing at this checkout's meshd and the test's
config directory.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from helpers.common import cgroup2_root, netns_path
from meshd.cgroups import remove_tree

IMAGE = "localhost/meshd-test/busybox:latest"
ANNOTATION = "io.meshd.workload"
CONTAINERS_CONF = """\
[containers]
# this machine's hard limits are lower than Podman's defaults
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"          # crun refuses the hybrid cgroup layout
cgroup_manager = "cgroupfs"
"""


HELPERS = str(Path(__file__).resolve().parent)
# a server in a container: the host's Python and tests/helpers/echo_server.py
HOST_USR = ("--volume", "/usr:/usr:ro", "--volume", f"{HELPERS}:/helpers:ro")


class PodmanStore:
    """The session's storage, run root and image."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mtpodman-")
        self.conf = os.path.join(self.dir, "containers.conf")
        Path(self.conf).write_text(CONTAINERS_CONF)
        self.base = ["podman", "--root", os.path.join(self.dir, "root"),
                     "--runroot", os.path.join(self.dir, "runroot"),
                     "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"]
        self.env = dict(os.environ, CONTAINERS_CONF=self.conf)
        rootfs = Path(self.dir, "rootfs")
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
        for app in ("sh", "nc", "cat", "sleep", "printf", "echo", "ip", "head", "wc", "true"):
            (rootfs / "bin" / app).symlink_to("busybox")
        # With `--volume /usr:/usr:ro` (HOST_USR) the host's Python runs inside:
        # tests/helpers/echo_server.py as a containerized server.
        for lib in ("lib", "lib64"):
            (rootfs / lib).symlink_to(f"usr/{lib}")
        (rootfs / "tmp").mkdir()
        # a pod's infra container (Podman's own pause image needs a registry)
        (rootfs / "pause").write_text("#!/bin/sh\nexec sleep 100000\n")
        (rootfs / "pause").chmod(0o755)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(self.base + ["import", "-", IMAGE], stdin=tar.stdout, env=self.env,
                       check=True, capture_output=True, timeout=120)
        tar.wait()

    def remove(self):
        subprocess.run(self.base + ["rm", "-af", "-t", "0"], env=self.env, capture_output=True,
                       timeout=120)
        subprocess.run(self.base + ["system", "reset", "-f"], env=self.env, capture_output=True,
                       timeout=120)
        shutil.rmtree(self.dir, ignore_errors=True)


class Podman:
    """One test's view: its mesh's namespace, its hooks dir, its prefixed names."""

    def __init__(self, store: PodmanStore, prefix: str, netns: str, config_dir: str,
                 meshd: str, tmp: str):
        self.store, self.prefix, self.netns = store, prefix, netns
        self.hooks_dir = os.path.join(tmp, "hooks.d")
        os.makedirs(self.hooks_dir, exist_ok=True)
        self.write_hook(meshd, config_dir)
        self.names: list[str] = []
        self.pods: list[str] = []

    def write_hook(self, meshd: str, config_dir: str, timeout: int = 10) -> None:
        Path(self.hooks_dir, "meshd.json").write_text(json.dumps({
            "version": "1.0.0",
            "hook": {"path": meshd, "args": ["meshd", "oci-hook", "--config-dir", config_dir],
                     "timeout": timeout},
            "when": {"annotations": {"^io\\.meshd\\.workload$": ".+"}},
            "stages": ["createRuntime"]}))

    def cmd(self, *args, timeout=60, check=False, netns=True) -> subprocess.CompletedProcess:
        pre = ["nsenter", f"--net={netns_path(self.netns)}"] if netns else []
        r = subprocess.run(pre + self.store.base + ["--hooks-dir", self.hooks_dir] +
                           [str(a) for a in args], env=self.store.env, capture_output=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(map(str, args))}: {r.returncode}\n"
                                 f"{r.stderr.decode(errors='replace')}")
        return r

    def name(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        self.names.append(full)
        return full

    def run(self, name: str, *command, workload: str | None = None, detach=False,
            options=(), timeout=60) -> subprocess.CompletedProcess:
        """podman run --rm (or -d) a container of the test image, in the test's cgroup
        tree, annotated with `workload` if given."""
        args = ["run", "--name", self.name(name), "--cgroup-parent", f"/{self.prefix}/ctr",
                *options]
        if workload is not None:
            args += ["--annotation", f"{ANNOTATION}={workload}"]
        args += ["-d"] if detach else ["--rm"]
        return self.cmd(*args, IMAGE, *command, timeout=timeout)

    def pod_create(self, name: str) -> str:
        """A pod (one network namespace for its containers) in the test's cgroup
        tree; its infra container is the test image's /pause."""
        full = f"{self.prefix}-{name}"
        self.pods.append(full)
        self.cmd("pod", "create", "--name", full, "--cgroup-parent", f"/{self.prefix}/pod",
                 "--infra-image", IMAGE, "--infra-command", "/pause", "--infra-name",
                 f"{full}-infra", check=True)
        return full

    def run_in_pod(self, pod: str, name: str, *command, workload: str | None = None
                   ) -> subprocess.CompletedProcess:
        """podman run -d a container of the test image in a pod (its cgroup is the pod's)."""
        args = ["run", "-d", "--pod", pod, "--name", self.name(name)]
        if workload is not None:
            args += ["--annotation", f"{ANNOTATION}={workload}"]
        return self.cmd(*args, IMAGE, *command)

    def exec(self, name: str, *command, timeout=30) -> subprocess.CompletedProcess:
        return self.cmd("exec", f"{self.prefix}-{name}", *command, timeout=timeout)

    def inspect(self, name: str) -> dict:
        r = self.cmd("inspect", f"{self.prefix}-{name}", check=True)
        return json.loads(r.stdout)[0]

    def rm(self, name: str) -> None:
        self.cmd("rm", "-f", "-t", "0", f"{self.prefix}-{name}", check=True)

    def cleanup(self) -> None:
        for i in range(0, len(self.names), 50):
            self.cmd("rm", "-f", "-t", "0", "--ignore", *self.names[i:i + 50], timeout=120)
        if self.pods:
            self.cmd("pod", "rm", "-f", "-t", "0", "--ignore", *self.pods, timeout=120)
        remove_v1_cgroups(f"/{self.prefix}")
        # the cgroup2 parent too: a Podman named after the test's prefix plus a
        # suffix (a second host's) has it outside the test's own cgroup tree
        root = os.path.join(cgroup2_root(), self.prefix)
        for parent in ("ctr", "pod"):
            _rmdir_retrying(lambda: remove_tree(os.path.join(root, parent)))
        with contextlib.suppress(OSError):
            os.rmdir(root)   # only if nothing else is there (the test's own cgroups)


def _rmdir_retrying(remove) -> None:
    for _ in range(50):   # a conmon may still be exiting (EBUSY) for a moment
        try:
            remove()
            return
        except OSError:
            time.sleep(0.1)


def remove_v1_cgroups(rel: str) -> None:
    """On a hybrid host Podman's cgroupfs manager also makes a container's cgroup
    parents in every v1 controller hierarchy (/sys/fs/cgroup/<controller>/...):
    remove the test's own (empty once its containers are gone), deepest first."""
    for hierarchy in glob.glob("/sys/fs/cgroup/*/"):
        if hierarchy.rstrip("/").endswith("/unified"):
            continue
        _rmdir_retrying(lambda: remove_tree(os.path.join(hierarchy, rel.lstrip("/"))))


class RootlessPodman:
    """Podman run by an unprivileged user (nobody: one uid mapped, no subuids,
    vfs storage, --network none), with the test's hooks dir; its files live
    in a prefixed temporary directory and its pause process is killed at the end."""

    UID = 65534

    def __init__(self, prefix: str, hooks_dir: str):
        self.prefix = prefix
        self.dir = tempfile.mkdtemp(prefix=f"{prefix}-rootless-")
        for d in ("home", "run"):
            os.mkdir(os.path.join(self.dir, d), 0o700)
        # the test's hook file, where the user can read it (as /usr/share/containers/oci/hooks.d)
        self.hooks_dir = os.path.join(self.dir, "hooks.d")
        shutil.copytree(hooks_dir, self.hooks_dir)
        Path(self.dir, "containers.conf").write_text(CONTAINERS_CONF)
        Path(self.dir, "storage.conf").write_text('[storage]\ndriver = "vfs"\n')
        rootfs = Path(self.dir, "rootfs")
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
        for app in ("sh", "sleep", "echo"):
            (rootfs / "bin" / app).symlink_to("busybox")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", os.path.join(self.dir, "rootfs.tar"),
                        "."], check=True)
        subprocess.run(["chown", "-R", f"{self.UID}:{self.UID}", self.dir], check=True)
        os.chmod(self.dir, 0o755)
        self.cmd("import", os.path.join(self.dir, "rootfs.tar"), "localhost/rootless/bb",
                 check=True, timeout=120)

    def cmd(self, *args, check=False, timeout=60) -> subprocess.CompletedProcess:
        d = self.dir
        r = subprocess.run(
            ["setpriv", "--reuid", str(self.UID), "--regid", str(self.UID), "--clear-groups",
             "env", f"HOME={d}/home", f"XDG_RUNTIME_DIR={d}/run",
             f"CONTAINERS_CONF={d}/containers.conf", f"CONTAINERS_STORAGE_CONF={d}/storage.conf",
             "podman", "--hooks-dir", self.hooks_dir, *map(str, args)],
            capture_output=True, timeout=timeout, cwd="/")
        if check and r.returncode != 0:
            raise AssertionError(f"rootless podman {' '.join(map(str, args))}: "
                                 f"{r.returncode}\n{r.stderr.decode(errors='replace')}")
        return r

    def cleanup(self) -> None:
        self.cmd("rm", "-af", "-t", "0", timeout=120)
        pause = Path(self.dir, "run", "libpod", "tmp", "pause.pid")
        try:
            os.kill(int(pause.read_text()), 9)
        except (OSError, ValueError):
            pass
        subprocess.run(["rm", "-rf", self.dir])
