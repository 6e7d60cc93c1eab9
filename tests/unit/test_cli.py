"""The CLI's user-facing behaviour that needs no root: help, check, status formatting."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meshd.cli import build_parser, format_status

MESHD = [sys.executable, "-m", "meshd.cli"]


def run(*args):
    return subprocess.run(MESHD + list(args), capture_output=True, text=True)


def test_help_names_every_command():
    out = build_parser().format_help()
    for cmd in ("run", "check", "status", "cleanup"):
        assert cmd in out
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


def test_status_format_shows_rejection_and_fail_open():
    st = {"version": "0.1.0", "pid": 1, "state": "degraded", "updated": 0,
          "config_dir": "/etc/meshd", "config_files": ["/etc/meshd/a.toml"],
          "config_errors": [{"file": "/etc/meshd/b.toml", "line": 3, "key": "mesh.outbound_port",
                             "message": "expected integer"}],
          "mesh": {"outbound_port": 15001, "inbound_port": 15006, "exclude_outbound_ports": [22],
                   "exclude_outbound_cidrs": []},
          "envoy": {"state": "restarting", "pid": None, "restarts": 2,
                    "listeners": {"ipv4": False, "ipv6": False}},
          "datapath": {"pins": "/sys/fs/bpf/meshd/v1", "adopted": True, "links": [],
                       "tracked_connections": 0},
          "counters": {"miss": 2},
          "workloads": [{"name": "web", "cgroup": "/web", "enrolled_since": 1.0, "error": "",
                         "other_programs": {"connect4": [7]},
                         "counters": {"redirected": 5}}]}
    text = format_status(st, running=True)
    assert "/etc/meshd/b.toml:3: mesh.outbound_port: expected integer" in text
    assert "REJECTED" in text
    assert "FAIL OPEN" in text
    assert "redirected=5" in text
    assert "not meshd's" in text
    assert "2 connections reached Envoy without an original destination" in text
