"""A stand-in for Envoy's process in the root-free tests: a copy of `tail` named envoy,
run as ``envoy -f <bootstrap>``, so meshd's check "an envoy binary with our bootstrap on
its command line" accepts it."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers.common import wait_for


def binary(directory, name: str = "envoy") -> str:
    """A copy of `tail` called ``name`` in ``directory`` (skips the test without tail)."""
    tail = shutil.which("tail")
    if tail is None:
        pytest.skip("no tail")
    path = os.path.join(str(directory), name)
    if not os.path.exists(path):
        shutil.copy(tail, path)
    return path


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def start(argv: list[str]) -> subprocess.Popen:
    """Run ``argv`` and return once its command line shows in /proc: Popen returns as soon
    as exec closed the child's close-on-exec fds, before the kernel has set up the new
    argv, and meshd identifies Envoy by that argv."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _cmdline(p.pid) == argv or p.poll() is not None,
             what=f"{argv[0]} to exec")
    return p
