"""Envoy as meshd's child process, the way to run it without systemd (development, the
tests, any cgroup root that is not a systemd slice).

Envoy is started in its own session (so that meshd dying, even by SIGKILL, leaves it
running) and in its own cgroup (so the egress hooks never steer its upstream
connections).  Its PID goes to ``{state_dir}/envoy.pid``; a restarted meshd adopts the
Envoy named there instead of starting a new one.  Its log is ``{state_dir}/envoy-run/envoy.log``.
"""
from __future__ import annotations

import logging
import os
import stat
import subprocess
from typing import Callable, Optional

from .. import statefiles
from . import identity as envoy_identity, process
from .supervisor import STARTING, PidfdSupervisor

log = logging.getLogger(__package__)


class EnvoySupervisor(PidfdSupervisor):
    """Start or adopt Envoy as our child process, watch it on the GLib main loop and restart
    it when it dies."""

    restart_phrase = "restarting Envoy"

    def __init__(self, binary: str, state_dir: str, cgroup_dir: str, log_level: str,
                 on_state_change: Callable[[str], None],
                 identity: Optional[envoy_identity.EnvoyIdentity] = None):
        super().__init__(binary, state_dir, log_level, on_state_change)
        self.cgroup_dir = cgroup_dir
        self.log_path = self.log_hint = statefiles.path(self.state_dir, statefiles.ENVOY_LOG)
        # None: as meshd (root), as before identities existed (tests of the lifecycle)
        self.identity = identity

    def command(self) -> list[str]:
        # setpriv execs Envoy as its user with only its capabilities: same PID, and
        # /proc/PID/exe is Envoy's (adoption recognises it)
        drop = self.identity.setpriv() if self.identity else []
        return drop + process.command(self.binary, self.state_dir, self.log_level, self.log_path)

    def adopt_or_spawn(self) -> None:
        """Adopt the Envoy named in the PID file if it is ours and alive; else spawn one."""
        if not self._adopt():
            self.spawn()

    def stop_process(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; the PID file goes."""
        pid, pidfd = self.pid, self.pidfd
        if pid is not None and pidfd is not None:
            process.terminate(pid, pidfd)
        elif pid is None:
            process.stop_from_pidfile(self.state_dir)
        process.remove_pid_file(self.state_dir, pid)

    def reap(self, pid: Optional[int]) -> str:
        # Only a child we spawned can be waited for; an adopted Envoy is not ours to reap.
        status = None if self.adopted else process.try_reap(pid)
        process.remove_pid_file(self.state_dir, pid)
        return process.describe_status(status)

    def spawn(self) -> None:
        self.adopted = False
        self.set_state(STARTING)
        procs = os.path.join(self.cgroup_dir, "cgroup.procs")
        if not os.path.exists(procs):
            # Never start Envoy outside its cgroup: its own connections would be steered
            # back to itself.
            log.error("cannot start Envoy: its cgroup %s does not exist", self.cgroup_dir)
            self.schedule_restart()
            return
        try:
            logf = self._open_log()
        except OSError as e:
            log.error("cannot open %s: %s", self.log_path, e)
            self.schedule_restart()
            return
        try:
            proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                close_fds=True, start_new_session=True, preexec_fn=self._preexec,
                cwd="/",
            )
        except (OSError, subprocess.SubprocessError) as e:
            log.error("cannot start Envoy (%s): %s", self.binary, e)
            self.schedule_restart()
            return
        finally:
            logf.close()
        pid = proc.pid
        # We reap it ourselves (pidfd + waitpid), and it must outlive us when detached:
        # keep subprocess from warning about, or reaping, a "still running" child.
        proc.returncode = 0
        pidfd = process.pidfd_open(pid)
        if pidfd is None:  # already dead and reaped? cannot be, it is our zombie at worst
            log.error("Envoy (pid %d) vanished right after start", pid)
            self.schedule_restart()
            return
        try:
            process.write_pid_file(self.state_dir, pid)
        except OSError as e:
            log.error("cannot write %s: %s", process.pid_file_path(self.state_dir), e)
        log.info("started Envoy (pid %d): %s", pid, " ".join(self.command()))
        self.watch(pid, pidfd)

    def _adopt(self) -> bool:
        pid = process.read_pid_file(self.state_dir)
        if pid is None:
            return False
        pidfd = process.pidfd_open(pid)
        if pidfd is None:
            log.info("stale Envoy PID file (pid %d is gone)", pid)
            return False
        if not process.is_our_envoy(pid, self.bootstrap):
            os.close(pidfd)
            log.warning("Envoy PID file names pid %d, which is not our Envoy: starting a new one",
                        pid)
            return False
        self._place_in_cgroup(pid)
        log.info("adopting running Envoy (pid %d)", pid)
        self.adopted = True
        self.watch(pid, pidfd)
        return True

    def _place_in_cgroup(self, pid: int) -> None:
        """Make sure an adopted Envoy sits in our cgroup (a no-op when it already does)."""
        try:
            with open(os.path.join(self.cgroup_dir, "cgroup.procs"), "w") as f:
                f.write(f"{pid}\n")
        except OSError as e:
            log.error("cannot move Envoy (pid %d) into %s: %s", pid, self.cgroup_dir, e)

    def _open_log(self):
        """Envoy's log, in the directory Envoy's user may write: never through a link
        it planted there (meshd would hand it the file the link names)."""
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise OSError(f"{self.log_path} is not a plain file")
            # Envoy reopens it (--log-path): its group may write it
            if self.identity and not self.identity.is_root and st.st_uid == os.geteuid():
                os.fchown(fd, -1, envoy_identity.envoy_group())
                os.fchmod(fd, 0o660)
        except OSError:
            os.close(fd)
            raise
        return os.fdopen(fd, "ab")

    def _preexec(self) -> None:
        # Runs in the child between fork and exec: move ourselves into Envoy's cgroup
        # *before* exec, so not one of Envoy's connections is ever steered back to itself.
        # What Envoy creates is not for other users.
        os.umask(0o027)
        fd = os.open(os.path.join(self.cgroup_dir, "cgroup.procs"), os.O_WRONLY)
        try:
            os.write(fd, b"0\n")
        finally:
            os.close(fd)
