"""Podman containers as meshd sees them: the OCI state an OCI hook reads
(validated strictly), the record kept per container in
<state_dir>/containers/<id>.json, and the facts of a container's network
namespace (its cookie, its IPv4 address).

The record is written by `meshd oci-hook` (as root, before the container's
first instruction) and read by the daemon, so a container started while meshd
is stopped is enrolled when meshd comes back, and a restarted meshd adopts
every container it served. The daemon removes a record when the container's
cgroup is gone.
"""
from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import re
import socket
import threading
from dataclasses import asdict, dataclass, replace

from . import statefiles
from .fsutil import atomic_write

ANNOTATION = "io.meshd.workload"     # podman run --annotation io.meshd.workload=NAME
MAX_STATE_BYTES = 1 << 20            # an OCI state is a few KiB; more is not Podman
ID_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]{0,127}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")   # as config.py's workload names
_NAME_PODMAN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
SO_NETNS_COOKIE = 71
CLONE_NEWNET = 0x40000000


class OciStateError(ValueError):
    pass


@dataclass(frozen=True)
class OciState:
    id: str
    pid: int
    bundle: str
    annotations: dict

    @property
    def workload(self) -> str | None:
        return self.annotations.get(ANNOTATION)


def parse_oci_state(data: bytes) -> OciState:
    """The runtime state an OCI hook gets on stdin, or OciStateError saying
    exactly what is wrong (field and value)."""
    if len(data) > MAX_STATE_BYTES:
        raise OciStateError(f"OCI state larger than {MAX_STATE_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise OciStateError(f"OCI state is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise OciStateError(f"OCI state must be a JSON object, got {type(doc).__name__}")
    cid, pid, bundle = doc.get("id"), doc.get("pid"), doc.get("bundle")
    if not isinstance(cid, str) or not ID_RE.fullmatch(cid):
        raise OciStateError(f"id: expected 1-128 of 0-9 A-Z a-z _ . - , got {cid!r:.80}")
    if type(pid) is not int or not 0 < pid < 1 << 22:
        raise OciStateError(f"pid: expected a process id, got {pid!r:.80}")
    if (not isinstance(bundle, str) or not bundle.startswith("/") or "\0" in bundle
            or len(bundle) > 4096):
        raise OciStateError(f"bundle: expected an absolute path, got {bundle!r:.80}")
    ann = doc.get("annotations", {})
    if not isinstance(ann, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise OciStateError("annotations: expected an object of strings")
    wl = ann.get(ANNOTATION)
    if wl is not None and not _NAME.fullmatch(wl):
        raise OciStateError(f"annotation {ANNOTATION}: invalid workload name {wl!r:.80}: "
                            "use 1-64 of A-Z a-z 0-9 _ . -")
    return OciState(cid, pid, bundle, ann)


@dataclass(frozen=True)
class Record:
    """What meshd keeps about one container (one file per container)."""
    id: str
    workload: str
    cgroup: str          # relative to the cgroup2 root
    netns: str           # a path Envoy can open ("" = the served namespace: --network host)
    pid: int
    name: str = ""
    created: float = 0.0
    selected_by: str = ""   # "" = its annotation (the hook); "name", "label" or "unit"

    @property
    def short_id(self) -> str:
        return self.id[:12]


def cgroup_of(pid: int, proc: str = "/proc") -> str:
    """A process's cgroup2 path (relative to the cgroup2 root)."""
    with open(f"{proc}/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    raise OSError(f"process {pid} has no cgroup2 entry")


def conmon_name(cid: str, pid: int, proc: str = "/proc", depth: int = 5) -> str:
    """The container's name, which the hook's state does not carry: Podman
    starts the runtime (the hook's parent) from conmon, whose command line
    holds `-c <id>` and `-n <name>`. "" when not found (another engine)."""
    for _ in range(depth):
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as f:
                args = f.read(65536).decode(errors="replace").split("\0")
            with open(f"{proc}/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return ""
        if os.path.basename(args[0]) == "conmon":
            opts = dict(zip(args, args[1:]))
            name = opts.get("-n") or opts.get("--name") or ""
            same = opts.get("-c") == cid or opts.get("--cid") == cid
            return name if same and _NAME_PODMAN.fullmatch(name) else ""
        pid = ppid
    return ""


NETNS_DIR = "/run/netns"   # rootful Podman's (and `ip netns`') bind mounts


def named_netns(path: str, netns_dir: str = NETNS_DIR) -> str:
    """A path to the same namespace that an unprivileged Envoy may open. The
    containers of a Podman pod are given the infra container's
    /proc/<pid>/ns/net, which only a process allowed to ptrace <pid> may open;
    the pod's bind mount in /run/netns (same device and inode) anyone may."""
    if not path.startswith("/proc/"):
        return path
    try:
        want = os.stat(path)
        for name in sorted(os.listdir(netns_dir)):
            st = os.stat(os.path.join(netns_dir, name))
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                return os.path.join(netns_dir, name)
    except OSError:
        pass
    return path


def netns_of_bundle(bundle: str, pid: int) -> str | None:
    """The container's network namespace as a path that outlives the hook:
    Podman's bind mount named in the bundle's config.json (or found in
    /run/netns for a pod's container: named_netns). None: the container has no
    namespace of its own (--network host)."""
    path = os.path.join(bundle, "config.json")
    if os.path.getsize(path) > 16 * MAX_STATE_BYTES:
        raise OSError(f"{path} is too large")
    with open(path) as f:
        spec = json.load(f)
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    for ns in namespaces:
        if isinstance(ns, dict) and ns.get("type") == "network":
            p = ns.get("path")
            return named_netns(p if isinstance(p, str) and p.startswith("/")
                               else f"/proc/{pid}/ns/net")
    return None


def record_path(state_dir: str, cid: str) -> str:
    return os.path.join(statefiles.path(state_dir, statefiles.CONTAINERS_DIR), f"{cid}.json")


def save(state_dir: str, rec: Record) -> None:
    d = statefiles.path(state_dir, statefiles.CONTAINERS_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    atomic_write(record_path(state_dir, rec.id), json.dumps(asdict(rec), sort_keys=True))


def remove(state_dir: str, cid: str) -> None:
    try:
        os.unlink(record_path(state_dir, cid))
    except FileNotFoundError:
        pass


def load_all(state_dir: str, netns_dir: str = NETNS_DIR) -> dict[str, Record]:
    """Every container record; unreadable ones are skipped (and removed)."""
    d = statefiles.path(state_dir, statefiles.CONTAINERS_DIR)
    out = {}
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for n in names:
        if not n.endswith(".json"):
            continue
        p = os.path.join(d, n)
        try:
            with open(p) as f:
                doc = json.load(f)
            rec = Record(**{k: doc[k] for k in Record.__dataclass_fields__ if k in doc})
            if ID_RE.fullmatch(rec.id) and f"{rec.id}.json" == n:
                # a record an older hook wrote may name a pod's /proc/<pid>/ns/net,
                # which an unprivileged Envoy cannot open: its /run/netns twin
                out[rec.id] = replace(rec, netns=named_netns(rec.netns, netns_dir))
                continue
        except (OSError, ValueError, TypeError):
            pass
        try:
            os.unlink(p)
        except OSError:
            pass
    return out


@dataclass(frozen=True)
class NetnsFacts:
    cookie: int
    ipv4: str | None    # the container's (first global) IPv4 address
    inode: int


def in_netns(path: str, fn):
    """fn() run inside a network namespace, in a throw-away thread (setns
    changes the calling thread only: the daemon stays where it is)."""
    result: dict = {}

    def probe():
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({path})")
            finally:
                os.close(fd)
            result["value"] = fn()
        except Exception as e:   # reported to the caller
            result["error"] = e

    t = threading.Thread(target=probe, name="in-netns")
    t.start()
    t.join()
    if "error" in result:
        e = result["error"]
        raise e if isinstance(e, OSError) else OSError(str(e))
    return result["value"]


def netns_facts(path: str) -> NetnsFacts:
    """A namespace's cookie (SO_NETNS_COOKIE), IPv4 address and inode."""
    def probe():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8),
                                    "little")
        return cookie, _first_ipv4()
    cookie, ipv4 = in_netns(path, probe)
    return NetnsFacts(cookie, ipv4, os.stat(path).st_ino)


def _first_ipv4() -> str | None:
    """The calling thread's namespace's first global IPv4 address."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=socket.AF_INET):
            addr = a.get_attr("IFA_ADDRESS")
            if addr and not ipaddress.ip_address(addr).is_loopback:
                return addr
    return None


def own_netns_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
