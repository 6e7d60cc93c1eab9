"""What Podman knows about a running container that the OCI hook cannot see:
its name, its labels, whether it is rootless, and the cgroup of the process
that runs it (a systemd unit's, for `podman generate systemd --new`).

Read from the container's `conmon` (every Podman container has one; its
command line holds `-c <id> -n <name> -b <bundle>` and, as `--exit-command-arg`s,
the global options of the Podman that started it: --root, --runroot,
--storage-driver...) and, for labels only, from `podman inspect` run with
those same options and conmon's CONTAINERS_CONF, so a Podman with its own
storage is asked about its own containers. Measured on Podman 4.3: `podman
inspect` or `podman ps --filter id=` run from the container's own
createRuntime hook waits on the container's lock until the hook times out,
so this is only ever called from the daemon, never from the hook.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field

# libpod-<id> (cgroupfs), libpod-<id>.scope (systemd), libpod-payload-<id> (--cgroups=split)
CGROUP_RE = re.compile(r"libpod-(?:payload-)?([0-9a-f]{64})(?:\.scope)?")
ID_RE = re.compile(r"[0-9a-f]{64}")
INSPECT_TIMEOUT = 10.0
MAX_LABELS_BYTES = 1 << 20


def container_id_of(cgroup_dir_name: str) -> str | None:
    m = CGROUP_RE.fullmatch(cgroup_dir_name)
    return m.group(1) if m else None


@dataclass(frozen=True)
class Conmon:
    """One container's conmon, as its /proc entry says."""
    pid: int
    uid: int                     # != 0: a rootless Podman's container
    id: str
    name: str
    bundle: str                  # holds config.json (annotations, the netns path)
    cgroup: str                  # conmon's own cgroup (a unit's, under systemd)
    podman: tuple[str, ...] = ()   # the Podman binary and its global options
    env: tuple[tuple[str, str], ...] = ()   # CONTAINERS_CONF and friends

    @property
    def rootless(self) -> bool:
        return self.uid != 0


def _read(path: str, limit: int = 1 << 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def parse_conmon(pid: int, argv: list[str], uid: int, cgroup: str,
                 environ: dict[str, str]) -> Conmon | None:
    """A Conmon from its command line, or None when it is not one (no `-c <id>`)."""
    opts = dict(zip(argv, argv[1:]))
    cid = opts.get("-c") or opts.get("--cid") or ""
    if not ID_RE.fullmatch(cid):
        return None
    exit_cmd = opts.get("--exit-command", "")
    extra = [v for k, v in zip(argv, argv[1:]) if k == "--exit-command-arg"]
    # the exit command is `podman <global options> container cleanup <id>`
    if "container" in extra:
        extra = extra[:extra.index("container")]
    podman = (exit_cmd, *extra) if os.path.basename(exit_cmd) == "podman" else ()
    env = tuple((k, v) for k, v in sorted(environ.items())
                if k.startswith(("CONTAINERS_", "XDG_RUNTIME_DIR", "HOME")))
    return Conmon(pid, uid, cid, opts.get("-n") or opts.get("--name") or "",
                  opts.get("-b") or opts.get("--bundle") or "", cgroup, podman, env)


def conmon_of(pid: int, proc: str = "/proc") -> Conmon | None:
    try:
        if _read(f"{proc}/{pid}/comm").strip() != b"conmon":
            return None
        argv = _read(f"{proc}/{pid}/cmdline").decode(errors="replace").split("\0")
        with open(f"{proc}/{pid}/status") as f:
            uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        cgroup = next((line[3:].strip() for line in
                       _read(f"{proc}/{pid}/cgroup").decode().splitlines()
                       if line.startswith("0::")), "")
    except (OSError, ValueError, StopIteration):
        return None   # gone meanwhile, or not readable
    try:   # another user's (rootless) environment needs CAP_SYS_PTRACE: optional
        environ = dict(kv.split("=", 1) for kv in
                       _read(f"{proc}/{pid}/environ").decode(errors="replace").split("\0")
                       if "=" in kv)
    except OSError:
        environ = {}
    return parse_conmon(pid, argv, uid, cgroup, environ)


def conmons(proc: str = "/proc") -> dict[str, Conmon]:
    """Every Podman container's conmon on the host, by container id."""
    out = {}
    for name in os.listdir(proc):
        if name.isdigit():
            c = conmon_of(int(name), proc)
            if c is not None:
                out[c.id] = c
    return out


@dataclass(frozen=True)
class Info:
    """What a lookup found; error says why labels are unknown."""
    name: str = ""
    labels: dict = field(default_factory=dict)
    error: str = ""


def inspect(c: Conmon, timeout: float = INSPECT_TIMEOUT) -> Info:
    """The container's name and labels from `podman inspect` (blocking: call it
    off the main loop). Rootless containers are not inspected (not meshed)."""
    if not c.podman:
        return Info(c.name, error="its conmon names no podman exit command")
    try:
        r = subprocess.run([*c.podman, "inspect", "--type", "container", c.id],
                           capture_output=True, timeout=timeout, env=dict(
                               os.environ, **dict(c.env)))
    except (OSError, subprocess.TimeoutExpired) as e:
        return Info(c.name, error=f"podman inspect: {e}")
    if r.returncode != 0:
        return Info(c.name, error=f"podman inspect: exit {r.returncode}: "
                    f"{r.stderr.decode(errors='replace').strip()[:200]}")
    try:
        doc = json.loads(r.stdout[:MAX_LABELS_BYTES])[0]
        labels = (doc.get("Config") or {}).get("Labels") or {}
        name = doc.get("Name") or c.name
    except (ValueError, IndexError, TypeError, AttributeError) as e:
        return Info(c.name, error=f"podman inspect: unexpected output: {e}")
    return Info(name, {str(k): str(v) for k, v in labels.items()})
