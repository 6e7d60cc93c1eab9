"""Envoy's process helpers without root: the PID file, recognising our Envoy (a copy of
`tail` named envoy, following the bootstrap file, stands in for it), stopping it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from helpers import fake_envoy
from meshd.envoy import process
from meshd.envoy_config import bootstrap_path


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "run"
    os.makedirs(os.path.dirname(bootstrap_path(str(d))))
    open(bootstrap_path(str(d)), "w").write("{}\n")
    return str(d)


@pytest.fixture
def spawn(tmp_path):
    """Start a process (killed and reaped at the end); ``spawn(name, *args)`` runs a copy
    of `tail` called ``name``."""
    procs = []

    def run(name, *args):
        p = fake_envoy.start([fake_envoy.binary(tmp_path, name), *args])
        procs.append(p)
        return p
    yield run
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def gone(pid: int) -> bool:
    return process.pidfd_open(pid) is None


def test_command_logs_to_a_file_only_when_asked():
    assert process.command("/e/envoy", "/run/meshd", "info", "/run/meshd/envoy.log") == [
        "/e/envoy", "-c", "/run/meshd/envoy/bootstrap.json", "-l", "info",
        "--log-path", "/run/meshd/envoy.log", "--disable-hot-restart"]
    assert "--log-path" not in process.command("/e/envoy", "/run/meshd", "info")


def test_pid_file_round_trip_and_guarded_removal(tmp_path):
    d = str(tmp_path)
    assert process.read_pid_file(d) is None
    process.write_pid_file(d, 1234)
    assert process.read_pid_file(d) == 1234
    assert os.listdir(d) == ["envoy.pid"]   # no temporary file left
    process.remove_pid_file(d, 99)          # names another Envoy: kept
    assert process.read_pid_file(d) == 1234
    process.remove_pid_file(d, 1234)
    assert not os.path.exists(process.pid_file_path(d))
    open(process.pid_file_path(d), "w").write("-5\n")
    assert process.read_pid_file(d) is None


def test_only_an_envoy_on_our_bootstrap_is_ours(state, spawn):
    ours = spawn("envoy", "-f", bootstrap_path(state))
    other_file = spawn("envoy", "-f", "/dev/null")
    not_envoy = spawn("tail", "-f", bootstrap_path(state))
    assert process.is_our_envoy(ours.pid, bootstrap_path(state))
    assert not process.is_our_envoy(other_file.pid, bootstrap_path(state))
    assert not process.is_our_envoy(not_envoy.pid, bootstrap_path(state))
    pidfd = process.open_our_envoy(ours.pid, bootstrap_path(state))
    assert pidfd is not None
    os.close(pidfd)
    assert process.open_our_envoy(not_envoy.pid, bootstrap_path(state)) is None


def test_stop_from_pidfile_stops_our_envoy(state, spawn):
    envoy = spawn("envoy", "-f", bootstrap_path(state))
    process.write_pid_file(state, envoy.pid)
    assert process.stop_from_pidfile(state) is True
    assert gone(envoy.pid)   # terminated and reaped
    assert process.read_pid_file(state) is None
    assert process.stop_from_pidfile(state) is False


def test_stop_from_pidfile_leaves_another_process_alone(state, spawn):
    other = spawn("tail", "-f", bootstrap_path(state))
    process.write_pid_file(state, other.pid)
    assert process.stop_from_pidfile(state) is False
    assert other.poll() is None
    assert process.read_pid_file(state) is None   # the stale file goes


def test_terminate_kills_what_ignores_sigterm():
    p = subprocess.Popen([sys.executable, "-c",
                          "import signal, sys, time\n"
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                          "print('ready', flush=True)\n"
                          "time.sleep(600)\n"], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        pidfd = process.pidfd_open(p.pid)
        try:
            process.terminate(p.pid, pidfd, timeout=0.2)
        finally:
            os.close(pidfd)
        assert gone(p.pid)   # SIGKILLed and reaped
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()


def test_describe_status():
    assert process.describe_status(None) == "exited"
    assert process.describe_status(signal.SIGKILL) == "killed by SIGKILL"
    assert process.describe_status(3 << 8) == "exited with status 3"
