"""Who Envoy runs as and what it may do: its system user, its capabilities (each
justified here, where they are granted), and the owners and modes of the directories
it reads from and writes to.

Envoy runs as the system user ``meshd-envoy`` (the meshd package creates it;
scripts/setup.sh does for a development checkout) with only the capabilities below,
in both modes: as meshd's child (``setpriv`` drops to the user, keeping exactly these
as ambient capabilities) and as a systemd unit (``User=``, ``AmbientCapabilities=``).

Without that user, or when it could not reach the Envoy binary or the state
directory (a virtualenv under /root, a state directory in a 0700 temporary
directory), Envoy runs as root as before, and meshd logs why once per start.

The files:

- ``<state_dir>/envoy/`` (bootstrap, listeners, clusters; anything else Envoy must
  read, such as key files): root:meshd-envoy 0750, files 0640, written by meshd
  (:func:`envoy_group`). Envoy reads them; no other user can.
- ``<state_dir>/envoy-run/`` (the admin socket, Envoy's log as a child):
  root:meshd-envoy 0770. Envoy writes there, through its group, and nowhere else; the
  directory is the gate: only root and Envoy may enter it, so the admin socket inside
  can be mode 0666 and meshd (root without CAP_DAC_OVERRIDE under systemd) connects.
  No set-group-id bit: meshd.service's RestrictSUIDSGID= refuses to set one.
- ``<state_dir>/flows.sock`` (meshd/flows.py, where Envoy sends its flow records):
  root:meshd-envoy 0660: Envoy may send, no other user may forge a record.

meshd owns all of them and gives them Envoy's group, never its user (CAP_CHOWN, or
without it as a member of that group: SupplementaryGroups=meshd-envoy).
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
from dataclasses import dataclass

ENVOY_USER = "meshd-envoy"

# capability -> (number, why Envoy needs it). Nothing else: no CAP_NET_RAW (CAP_NET_ADMIN
# already allows IP_TRANSPARENT), no CAP_DAC_*, no CAP_SETUID.
CAPABILITIES = {
    # The inbound listener is transparent and connects to the workload from the client's
    # own address (original_src: IP_TRANSPARENT) with meshd's SO_MARK, which the policy
    # routing uses to send the workload's replies back to Envoy.
    "CAP_NET_ADMIN": (12, "IP_TRANSPARENT and SO_MARK for original_src on inbound"),
    # Listeners inside containers' network namespaces (Podman): Envoy opens them with
    # network_namespace_filepath, i.e. setns(CLONE_NEWNET), which needs CAP_SYS_ADMIN.
    # The systemd unit confines it (no mount, no other namespace types, seccomp). The
    # path must be a bind mount (/run/netns/...): other users' /proc/PID/ns/net are
    # closed to Envoy's user (ptrace access rules; ProtectProc=invisible in the unit).
    "CAP_SYS_ADMIN": (21, "setns(CLONE_NEWNET) for listeners in containers' network namespaces"),
}
# Only when a listener port is below net.ipv4.ip_unprivileged_port_start.
CAP_NET_BIND_SERVICE = (10, "a listener port below 1024")


@dataclass(frozen=True)
class EnvoyIdentity:
    user: str
    uid: int
    gid: int
    capabilities: tuple[str, ...]   # names, e.g. ("CAP_NET_ADMIN", "CAP_SYS_ADMIN")
    why_root: str = ""              # set when Envoy falls back to root

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def capability_mask(self) -> int:
        return sum(1 << _number(c) for c in self.capabilities)

    def setpriv(self) -> list[str]:
        """The argv prefix that drops to this identity (empty for root: as before)."""
        if self.is_root:
            return []
        caps = ",".join(["-all"] + [f"+{c[4:].lower()}" for c in self.capabilities])
        return [shutil.which("setpriv") or "/usr/bin/setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}",
                "--no-new-privs", "--"]


def _number(cap: str) -> int:
    return CAP_NET_BIND_SERVICE[0] if cap == "CAP_NET_BIND_SERVICE" else CAPABILITIES[cap][0]


def unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def capabilities_for(ports) -> tuple[str, ...]:
    caps = list(CAPABILITIES)
    if any(p < unprivileged_port_start() for p in ports):
        caps.append("CAP_NET_BIND_SERVICE")
    return tuple(sorted(caps))


def _may(st: os.stat_result, uid: int, gids: set[int], bit: int) -> bool:
    """bit: 1 = x, 4 = r; the owner/group/other class that applies, as the kernel picks it."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == uid:
        return bool(mode & (bit << 6))
    if st.st_gid in gids:
        return bool(mode & (bit << 3))
    return bool(mode & bit)


def unreachable(path: str, uid: int, gids: set[int], bit: int = 1) -> str:
    """Why ``uid`` cannot search every directory down to ``path`` and use ``path``
    (bit 1: execute/search, 4: read), or ""."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(1, len(parts)):
        d = "/".join(parts[:i]) or "/"
        try:
            st = os.stat(d)
        except OSError:
            return ""   # created later by meshd, with modes that let Envoy in
        if not _may(st, uid, gids, 1):
            return f"{d} is mode {stat.S_IMODE(st.st_mode):04o} owned by {st.st_uid}:{st.st_gid}"
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return "" if _may(st, uid, gids, bit) else f"{path} is mode {stat.S_IMODE(st.st_mode):04o}"


def can_switch_user() -> bool:
    """May this process start a child as another user with chosen capabilities
    (CAP_SETUID, CAP_SETGID, CAP_SETPCAP effective)?"""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(l.split()[1], 16) for l in f if l.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return all(eff & (1 << n) for n in (6, 7, 8))


def resolve(binary: str, state_dir: str, ports=(), switch: bool = True) -> EnvoyIdentity:
    """The identity Envoy runs as on this host, for this binary and state directory.
    switch: whoever starts Envoy can make it another user."""
    caps = capabilities_for(ports)
    if not switch:
        return EnvoyIdentity("root", 0, 0, caps, "meshd lacks CAP_SETUID/CAP_SETGID/"
                             "CAP_SETPCAP to start it as another user")
    try:
        pw = pwd.getpwnam(ENVOY_USER)
    except KeyError:
        return EnvoyIdentity("root", 0, 0, caps, f"there is no user {ENVOY_USER} "
                             f"(useradd --system --no-create-home --shell /usr/sbin/nologin "
                             f"{ENVOY_USER})")
    gids = {pw.pw_gid}
    for what, path, bit in (("the Envoy binary", binary, 1), ("the state directory", state_dir, 1)):
        why = unreachable(path, pw.pw_uid, gids, bit)
        if why:
            return EnvoyIdentity("root", 0, 0, caps, f"{ENVOY_USER} cannot reach {what} "
                                 f"{path}: {why}")
    return EnvoyIdentity(ENVOY_USER, pw.pw_uid, pw.pw_gid, caps)


def envoy_group() -> int:
    """The group whose members may read Envoy's configuration (and key files): the
    ``meshd-envoy`` group, or root's without it."""
    try:
        return grp.getgrnam(ENVOY_USER).gr_gid
    except KeyError:
        return 0


def make_dir(path: str, uid: int, gid: int, mode: int) -> None:
    """A directory with exactly this owner and mode."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a directory")
    if stat.S_IMODE(st.st_mode) != mode or (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, 0, 0)
        os.chmod(path, mode)
        os.chown(path, uid, gid)


def prepare_run_dir(path: str) -> None:
    """``<state_dir>/envoy-run``, Envoy's through its group; a file a root Envoy left
    there (its log, from before its user existed) is given that group too, so Envoy
    can reopen it. Never through a link."""
    gid = envoy_group()
    make_dir(path, 0, gid, 0o770)
    for name in os.listdir(path):
        try:
            fd = os.open(os.path.join(path, name),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue   # a socket, a link: Envoy makes its own anew
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and (
                    st.st_gid != gid or st.st_mode & 0o060 != 0o060):
                os.fchown(fd, -1, gid)
                os.fchmod(fd, (stat.S_IMODE(st.st_mode) | 0o060) & ~0o007)
        finally:
            os.close(fd)
