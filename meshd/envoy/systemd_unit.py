"""Envoy as a transient systemd unit, started, adopted and watched through systemd's D-Bus
API: the unit's name and properties, and its supervisor.

Under systemd Envoy is not meshd's child: meshd asks the manager for a *transient*
service (``StartTransientUnit``), ``meshd-envoy.service`` in ``meshd.slice``.  So:

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
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from typing import Any, Callable, Optional

from .. import statefiles
from . import identity as envoy_identity, process
from .supervisor import STARTING, PidfdSupervisor
from .systemd_manager import UP, SystemdError, SystemdManager, connect

log = logging.getLogger(__package__)

DEFAULT_UNIT = "meshd-envoy.service"
DEFAULT_STATE_DIR = "/run/meshd"

MAIN_PID_POLL_MS = 50       # after StartTransientUnit, until the unit has a MainPID
MAIN_PID_TIMEOUT = 10.0
UNIT_STOP_TIMEOUT = process.STOP_TIMEOUT + 5.0   # systemd SIGKILLs after TimeoutStopUSec

# Envoy's open-file limit: a proxy holds two sockets per connection.  systemd's own
# default hard limit (>= v240), so setrlimit() cannot fail on any host.
ENVOY_NOFILE = 524288

CLONE_NEWNET = 0x40000000
# Where a virtualenv's Envoy may live: ProtectHome=read-only then, else yes.
HOMES = ("/home/", "/root/", "/run/user/")


# ------------------------------------------------------------------------------------------
# The unit (pure: unit-tested without systemd)


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


def unit_properties(binary: str, state_dir: str, log_level: str, slice_name: str,
                    unit_name: str = DEFAULT_UNIT, netns: str = "",
                    identity: Optional[envoy_identity.EnvoyIdentity] = None
                    ) -> list[tuple[str, str, Any]]:
    """The transient unit's properties as ``(name, D-Bus signature, value)``.

    Kept as plain data so it can be tested without systemd;
    :func:`meshd.envoy.systemd_manager.to_variants` turns it into the ``a(sv)``
    StartTransientUnit takes."""
    argv = process.command(binary, state_dir, log_level)   # no --log-path: the journal
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
        ("TimeoutStopUSec", "t", int(process.STOP_TIMEOUT * 1_000_000)),
        # A failed unit is garbage-collected at once, so the same name can be started again.
        ("CollectMode", "s", "inactive-or-failed"),
        ("StandardOutput", "s", "journal"),
        ("StandardError", "s", "journal"),
        ("SyslogIdentifier", "s", ident),
        ("LimitNOFILE", "t", ENVOY_NOFILE),
        ("LimitNOFILESoft", "t", ENVOY_NOFILE),
    ]
    props += sandbox(binary, state_dir, identity or envoy_identity.resolve(binary, state_dir))
    if netns:
        # The network namespace this instance serves (mesh.netns): a child Envoy inherits
        # meshd's, a unit must be told.
        props.append(("NetworkNamespacePath", "s", netns))
    return props


def sandbox(binary: str, state_dir: str,
            identity: envoy_identity.EnvoyIdentity) -> list[tuple[str, str, Any]]:
    """Envoy's user, capabilities and sandbox; each exposure left is justified here
    (``systemd-analyze security meshd-envoy`` rates it: see README "Security")."""
    caps = identity.capability_mask   # justified in meshd/envoy/identity.py
    props: list[tuple[str, str, Any]] = []
    if not identity.is_root:
        props.append(("User", "s", identity.user))
    props += [
        ("AmbientCapabilities", "t", 0 if identity.is_root else caps),
        ("CapabilityBoundingSet", "t", caps),
        ("NoNewPrivileges", "b", True),
        # Read-only everything; it writes only <state_dir>/envoy-run (admin socket, log).
        ("ProtectSystem", "s", "strict"),
        ("ReadWritePaths", "as", [statefiles.path(os.path.abspath(state_dir),
                                                  statefiles.ENVOY_RUN_DIR)]),
        ("ProtectHome", "s", "read-only" if binary.startswith(HOMES) else "yes"),
        ("PrivateTmp", "b", True),
        ("PrivateDevices", "b", True),
        ("ProtectKernelTunables", "b", True),
        ("ProtectKernelModules", "b", True),
        ("ProtectKernelLogs", "b", True),
        ("ProtectControlGroups", "b", True),
        ("ProtectClock", "b", True),
        ("ProtectHostname", "b", True),
        ("ProtectProc", "s", "invisible"),
        # setns() into network namespaces only (containers' listeners, CAP_SYS_ADMIN):
        # no other namespace type, and no mount(2) (not in @system-service).
        ("RestrictNamespaces", "t", CLONE_NEWNET),
        # AF_NETLINK: getifaddrs() (Envoy resolves local addresses with it).
        ("RestrictAddressFamilies", "(bas)", (True, ["AF_UNIX", "AF_INET", "AF_INET6",
                                                     "AF_NETLINK"])),
        ("SystemCallArchitectures", "as", ["native"]),
        ("SystemCallFilter", "(bas)", (True, ["@system-service"])),
        ("SystemCallErrorNumber", "i", 1),   # EPERM, not a kill, for anything else
        ("RestrictRealtime", "b", True),
        ("RestrictSUIDSGID", "b", True),
        ("LockPersonality", "b", True),
        ("MemoryDenyWriteExecute", "b", True),
        ("RemoveIPC", "b", True),
        ("UMask", "u", 0o027),
        # Not PrivateNetwork/IPAddressDeny: Envoy connects to every destination of the
        # workloads. Not PrivateUsers: its capabilities must count in the host's
        # network namespaces.
    ]
    return props


def stop_unit(unit_name: str = DEFAULT_UNIT, timeout: float = UNIT_STOP_TIMEOUT,
              manager: Optional[SystemdManager] = None) -> bool:
    """Stop Envoy's unit and wait until it is down (for ``meshd cleanup``).

    True if a unit was running and is stopped now; False without systemd, without such a
    unit, or on error (logged)."""
    if manager is None:
        manager = connect()
        if manager is None:
            return False
    return manager.stop_and_wait(unit_name, timeout)


# ------------------------------------------------------------------------------------------
# The supervisor


class SystemdEnvoySupervisor(PidfdSupervisor):
    """Start or adopt Envoy's unit, watch its main process on the GLib main loop and start
    it again (with backoff) when it dies.  Same interface as the child-process
    :class:`meshd.envoy.child.EnvoySupervisor`, so the daemon can use either."""

    def __init__(self, binary: str, state_dir: str, slice_name: str, log_level: str,
                 on_state_change: Callable[[str], None], unit_name: str = DEFAULT_UNIT,
                 netns: str = "", manager: Optional[SystemdManager] = None,
                 identity: Optional[envoy_identity.EnvoyIdentity] = None):
        super().__init__(binary, state_dir, log_level, on_state_change)
        self.identity = identity
        self.slice_name = slice_name
        self.unit_name = unit_name
        self.netns = netns
        self._manager = manager
        self.log_hint = f"journalctl -u {unit_name}"
        self.restart_phrase = f"starting {unit_name} again"
        self._await_deadline = 0.0
        self._await_id = 0

    @property
    def manager(self) -> SystemdManager:
        if self._manager is None:
            self._manager = SystemdManager()
        return self._manager

    def command(self) -> list[str]:
        return process.command(self.binary, self.state_dir, self.log_level)

    def properties(self) -> list[tuple[str, str, Any]]:
        return unit_properties(self.binary, self.state_dir, self.log_level, self.slice_name,
                               self.unit_name, self.netns, self.identity)

    # -- the supervisor's hooks ----------------------------------------------------------

    def label(self, pid: Optional[int]) -> str:
        return f"{self.unit_name}, pid {pid}"

    def stop_process(self) -> None:
        """Stop the unit (SIGTERM, SIGKILL after 5 s) and wait for it."""
        stop_unit(self.unit_name, manager=self.manager)

    def cancel_pending(self) -> None:
        if self._await_id:
            from gi.repository import GLib
            GLib.source_remove(self._await_id)
            self._await_id = 0

    def adopt_or_spawn(self) -> None:
        """An Envoy left by a meshd that ran without systemd (child-process mode, named by
        ``envoy.pid``) would serve next to the unit's: stop it first.  Then adopt the unit
        if it runs our Envoy, else start it."""
        pid = process.read_pid_file(self.state_dir)
        if pid is not None and process.is_our_envoy(pid, self.bootstrap):
            log.warning("replacing the child-process Envoy (pid %d) with %s", pid,
                        self.unit_name)
            process.stop_from_pidfile(self.state_dir)
        self.spawn()

    def spawn(self) -> None:
        """Adopt the unit if it is up, else (re)create it."""
        self.set_state(STARTING)
        try:
            st = self.manager.unit(self.unit_name)
            if st is not None and st[0] in UP:
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
                self.schedule_restart()
                return
            if st is not None:
                # inactive/failed but not yet garbage-collected: reset, or the name is taken
                self.manager.reset_failed(self.unit_name)
            self.adopted = False
            self.manager.start_transient(self.unit_name, self.properties())
        except SystemdError as e:
            log.error("cannot start Envoy as %s: %s", self.unit_name, e)
            self.schedule_restart()
            return
        log.info("started %s: %s", self.unit_name, " ".join(self.command()))
        self._await_main_pid_from(time.monotonic())

    # -- internals -----------------------------------------------------------------------

    def _await_main_pid_from(self, now: float) -> None:
        from gi.repository import GLib
        self.started_at = now   # uptime, even of a start that fails, counts from here
        self._await_deadline = now + MAIN_PID_TIMEOUT
        self._await_id = GLib.timeout_add(MAIN_PID_POLL_MS, self._await_main_pid)

    def _await_main_pid(self) -> bool:
        if not self.active:
            self._await_id = 0
            return False
        try:
            st = self.manager.unit(self.unit_name)
        except SystemdError as e:
            log.warning("cannot query %s: %s", self.unit_name, e)
            st = ("unknown", 0)
        if st is not None and st[0] in UP and st[1] > 0:
            self._await_id = 0
            pidfd = process.pidfd_open(st[1])
            if pidfd is None:
                self.exited(st[1], "exited right after start")
            else:
                self.watch(st[1], pidfd, since=self.started_at)   # from the start request
            return False
        if st is None or st[0] in ("inactive", "failed"):
            self._await_id = 0
            self.exited(None, f"failed to start (unit {st[0] if st else 'gone'})")
            return False
        if time.monotonic() > self._await_deadline:
            self._await_id = 0
            stop_unit(self.unit_name, manager=self.manager)
            self.exited(None, f"had no main process {MAIN_PID_TIMEOUT:.0f}s after start")
            return False
        return True

    def _adopt(self, pid: int) -> bool:
        pidfd = process.open_our_envoy(pid, self.bootstrap)
        if pidfd is None:
            return False
        log.info("adopting running Envoy (%s, pid %d)", self.unit_name, pid)
        self.adopted = True
        self.watch(pid, pidfd)
        return True
