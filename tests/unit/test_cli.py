"""The CLI's user-facing behaviour that needs no root: help, check, status without a daemon.
(The status text itself: tests/unit/test_status.py.)"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from meshd.cli import build_parser

MESHD = [sys.executable, "-m", "meshd.cli"]


def run(*args):
    return subprocess.run(MESHD + list(args), capture_output=True, text=True)


def test_help_names_every_command():
    out = build_parser().format_help()
    # each command on its own line of the command list, with its one-line help
    # (a bare substring would also be found in "exit status" or the description)
    for cmd in ("run", "check", "status", "cleanup"):
        assert re.search(rf"^ {{4}}{cmd} +\S", out, re.M), (cmd, out)
    assert "exit status" in out


def test_each_subcommand_has_help():
    for cmd in ("run", "check", "status", "cleanup"):
        r = run(cmd, "--help")
        assert r.returncode == 0
        assert "--config-dir" in r.stdout


def test_check_reports_every_error_with_file_and_line(tmp_path: Path):
    bad = tmp_path / "a.toml"
    bad.write_text('[mesh]\noutbound_port = "x"\n\n[workload.web]\ncgroup = "/a"\nfoo = 1\n')
    r = run("check", "--config-dir", str(tmp_path))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert any(l.startswith(f"{bad}:2: mesh.outbound_port:") for l in lines), r.stderr
    assert any(l.startswith(f"{bad}:6: workload.web.foo:") for l in lines), r.stderr


def test_check_accepts_the_shipped_config():
    etc = Path(__file__).resolve().parents[2] / "etc" / "meshd"
    r = run("check", "--config-dir", str(etc))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_status_without_a_daemon_exits_3(tmp_path: Path, monkeypatch):
    """No daemon on the bus and no status file: "not running", exit 3."""
    state = tmp_path / "state"
    (tmp_path / "meshd.toml").write_text(f'[mesh]\nstate_dir = "{state}"\n')
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    r = run("status", "--config-dir", str(tmp_path))
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"meshd is not running (no status in {state})" in r.stdout


def test_status_reads_the_status_file_and_says_so(tmp_path: Path, monkeypatch):
    """Off the bus, `meshd status` prints the status file, names it as its
    source, and (its pid gone) says NOT RUNNING; --json prints the model's JSON."""
    from meshd.status import Status, WorkloadStatus
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "meshd.toml").write_text(f'[mesh]\nstate_dir = "{state}"\n')
    no_such_pid = 4 * 1024 * 1024 + 1   # above the kernel's PID_MAX_LIMIT
    st = Status(version="9.9", pid=no_such_pid, state="running", config_dir=str(tmp_path),
                workloads=(WorkloadStatus(name="web", id=1, error="waiting for cgroup /w"),))
    (state / "status.json").write_text(st.to_json())
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")

    r = run("status", "--config-dir", str(tmp_path))
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.startswith("meshd 9.9: NOT RUNNING"), r.stdout
    assert f"source:    status file {state / 'status.json'}" in r.stdout
    assert "waiting for cgroup /w" in r.stdout

    r = run("status", "--json", "--config-dir", str(tmp_path))
    assert r.returncode == 3
    assert Status.from_json(r.stdout) == st


def _no_traceback(r):
    assert "Traceback" not in r.stderr + r.stdout, r.stderr


def test_check_and_status_locate_a_deeply_nested_file(tmp_path: Path, monkeypatch):
    """5,000 nested arrays: one located error line, no RecursionError traceback."""
    bad = tmp_path / "a.toml"
    bad.write_text(f'[mesh]\nstate_dir = "{tmp_path}/state"\nx = ' + "[" * 5000 + "]" * 5000 + "\n")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    r = run("check", "--config-dir", str(tmp_path))
    _no_traceback(r)
    assert (r.returncode, r.stderr) == (1, f"{bad}:3: mesh.x: nested more than 64 arrays/inline "
                                           "tables deep\n")
    r = run("status", "--config-dir", str(tmp_path))
    _no_traceback(r)
    assert r.returncode == 3 and f"  {bad}:3: mesh.x: nested more than 64" in r.stderr


def test_check_names_line_column_and_key_of_invalid_utf8(tmp_path: Path):
    bad = tmp_path / "a.toml"
    bad.write_bytes(b'[mesh]\n# caf\xc3\xa9\nenvoy_log_level = "\xe9"\n')
    r = run("check", "--config-dir", str(tmp_path))
    _no_traceback(r)
    assert (r.returncode, r.stderr) == (1, f"{bad}:3: mesh.envoy_log_level: not UTF-8: byte 0xe9 "
                                           "at line 3, column 20 (offset 34); TOML files must be UTF-8\n")


def test_cleanup_refuses_a_config_dir_that_does_not_exist(tmp_path: Path):
    """A typo must not clean up the default instance."""
    r = run("cleanup", "--config-dir", str(tmp_path / "typo"))
    _no_traceback(r)
    assert r.returncode == 1 and r.stderr.strip().endswith("no such config directory")


def test_run_and_cleanup_as_non_root_say_so_in_one_line(tmp_path: Path):
    tmp_path.chmod(0o755)
    for cmd in ("run", "cleanup"):
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            *MESHD, cmd, "--config-dir", str(tmp_path)],
                           capture_output=True, text=True)
        _no_traceback(r)
        assert r.returncode == 1, r
        assert r.stderr.startswith(f"meshd {cmd}: must run as root") and r.stderr.count("\n") == 1
