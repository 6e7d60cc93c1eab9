"""The lifecycle both ways of running Envoy share (a child process: :mod:`.child`; a
systemd unit: :mod:`.systemd_unit`): watch its process through a pidfd, poll the admin
``/ready``, report state changes, and start it again with exponential backoff when it
dies.  Everything runs on the GLib main loop.

Shutting meshd down *detaches* (Envoy keeps serving for the next meshd to adopt, which
makes a meshd restart hitless); only ``meshd cleanup`` stops Envoy.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

from ..envoy_config import admin_socket_in_use, admin_socket_path, bootstrap_path
from .admin import is_ready

log = logging.getLogger(__package__)

STARTING = "starting"
RUNNING = "running"
RESTARTING = "restarting"
STOPPED = "stopped"

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 10.0
BACKOFF_RESET_AFTER = 30.0        # s of uptime: it ran for a while, not a crash loop
BACKOFF_RESET_AFTER_READY = 0.25  # s ready: it came up and served; its death is no crash loop
READY_POLL_MS = 100


class PidfdSupervisor:
    """Supervise one Envoy.  Public interface (what the daemon uses): :meth:`start`,
    :meth:`stop`, :meth:`detach`, and ``state pid adopted restarts``.

    What a subclass provides (how Envoy is adopted, started, reaped and stopped):
    :meth:`adopt_or_spawn`, :meth:`spawn`, :meth:`stop_process`, optionally :meth:`reap`,
    :meth:`label`, :meth:`cancel_pending`, ``log_hint`` and ``restart_phrase``.
    What it reports back with: :meth:`watch` (Envoy's process is known),
    :meth:`exited` (it is gone), :meth:`schedule_restart` (starting it failed), and
    :meth:`set_state`; ``started_at`` is when the current start was asked for."""

    log_hint = ""          # where to read Envoy's own log
    restart_phrase = ""    # "<phrase> in 0.2s"

    def __init__(self, binary: str, state_dir: str, log_level: str,
                 on_state_change: Callable[[str], None]):
        self.binary = binary
        self.state_dir = state_dir = os.path.abspath(state_dir)
        self.log_level = log_level
        self.on_state_change = on_state_change
        self.bootstrap = bootstrap_path(state_dir)
        self.admin_socket = admin_socket_path(state_dir)
        self.state = STOPPED
        self.adopted = False
        self.restarts = 0
        self.started_at = 0.0
        self._pid: Optional[int] = None
        self._pidfd: Optional[int] = None
        self._backoff = BACKOFF_INITIAL
        self._ready_at: Optional[float] = None   # when the watched Envoy answered /ready
        self._active = False
        self._watch_id = 0
        self._ready_id = 0
        self._restart_id = 0

    # -- what a subclass provides ------------------------------------------------------------

    def adopt_or_spawn(self) -> None:
        """On :meth:`start`: adopt a running Envoy of ours, else :meth:`spawn` one."""
        raise NotImplementedError

    def spawn(self) -> None:
        """Start Envoy (or adopt it) and :meth:`watch` it; on failure,
        :meth:`schedule_restart`."""
        raise NotImplementedError

    def stop_process(self) -> None:
        """End Envoy for good (SIGTERM, SIGKILL after a timeout), watched or not."""
        raise NotImplementedError

    def reap(self, pid: Optional[int]) -> str:
        """Clean up after Envoy's exit; how it ended, for the log."""
        return "exited"

    def label(self, pid: Optional[int]) -> str:
        """Which Envoy, for log lines: ``Envoy running (<label>)``."""
        return f"pid {pid}"

    def cancel_pending(self) -> None:
        """Remove the subclass's own GLib sources (on stop and detach)."""

    # -- public ------------------------------------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        return self._pid

    @property
    def pidfd(self) -> Optional[int]:
        """The pidfd of the watched Envoy (owned by the supervisor: do not close it)."""
        return self._pidfd

    @property
    def active(self) -> bool:
        """Between :meth:`start` and :meth:`stop`/:meth:`detach`."""
        return self._active

    def start(self) -> None:
        if self._active:
            return
        self._active = True
        self.adopt_or_spawn()

    def stop(self) -> None:
        """Stop Envoy for good (``meshd cleanup``); daemon shutdown uses :meth:`detach` so
        Envoy keeps serving."""
        self._active = False
        self._unwatch_all()
        self.stop_process()
        self._close_pidfd()
        self._pid = None
        self.set_state(STOPPED)

    def detach(self) -> None:
        """Stop watching without killing: Envoy keeps running for the next meshd to adopt."""
        self._active = False
        self._unwatch_all()
        self._close_pidfd()

    # -- for subclasses ----------------------------------------------------------------------

    def set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        log.info("Envoy %s (%s)", state, self.label(self._pid))
        try:
            self.on_state_change(state)
        except Exception:
            log.exception("Envoy on_state_change callback failed")

    def watch(self, pid: int, pidfd: int, since: Optional[float] = None) -> None:
        """Watch ``pid`` (the supervisor owns ``pidfd`` from now on) for exit and
        readiness; its uptime counts from ``since`` (default: now)."""
        from gi.repository import GLib
        self._pid, self._pidfd = pid, pidfd
        self.started_at = time.monotonic() if since is None else since
        self._ready_at = None
        self.set_state(STARTING)
        self._watch_id = GLib.io_add_watch(
            pidfd, GLib.PRIORITY_DEFAULT, GLib.IO_IN | GLib.IO_HUP | GLib.IO_ERR, self._on_exit)
        self._ready_id = GLib.timeout_add(READY_POLL_MS, self._poll_ready)

    def exited(self, pid: Optional[int], what: str) -> None:
        """Envoy (``pid``, None if it never had one) is gone: ``what`` happened to it.
        Logged with its uptime since ``started_at``; restarted with backoff while active."""
        self._unwatch("_ready_id")
        self._close_pidfd()
        self._pid = None
        if not self._active:
            return
        uptime = time.monotonic() - self.started_at
        log.error("Envoy (%s) %s after %.1fs; see %s", self.label(pid), what, uptime,
                  self.log_hint)
        # The backoff guards against a crash loop (an Envoy that cannot start or dies at
        # once). One that ran a while, or was ready for a moment, was killed or crashed on
        # its own: start the next at once, so kills in a row cost no growing gap.
        served = time.monotonic() - self._ready_at if self._ready_at is not None else 0.0
        if uptime >= BACKOFF_RESET_AFTER or served >= BACKOFF_RESET_AFTER_READY:
            self._backoff = BACKOFF_INITIAL
        self.schedule_restart()

    def schedule_restart(self) -> None:
        """:meth:`spawn` again after the current backoff, which then doubles."""
        from gi.repository import GLib
        if not self._active:
            return
        delay = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self.restarts += 1
        self.set_state(RESTARTING)
        log.info("%s in %.1fs", self.restart_phrase, delay)
        self._restart_id = GLib.timeout_add(int(delay * 1000), self._respawn)

    # -- internals ---------------------------------------------------------------------------

    def _unwatch(self, *sources: str) -> None:
        from gi.repository import GLib
        for attr in sources:
            sid = getattr(self, attr)
            if sid:
                GLib.source_remove(sid)
                setattr(self, attr, 0)

    def _unwatch_all(self) -> None:
        self._unwatch("_watch_id", "_ready_id", "_restart_id")
        self.cancel_pending()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _poll_ready(self) -> bool:
        if not self._active or self._pid is None:
            self._ready_id = 0
            return False
        if is_ready(admin_socket_in_use(self.state_dir)):
            self._ready_id = 0
            self._ready_at = time.monotonic()
            self.set_state(RUNNING)
            return False
        return True

    def _on_exit(self, fd, condition) -> bool:
        self._watch_id = 0
        self.exited(self._pid, self.reap(self._pid))
        return False

    def _respawn(self) -> bool:
        self._restart_id = 0
        if self._active:
            self.spawn()
        return False   # one-shot GLib timeout
