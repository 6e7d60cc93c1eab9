"""Helpers shared by every test tier (plain functions, no fixtures)."""
from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import time


def reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def sh(*cmd, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, **kw)


def cgroup2_root() -> str:
    from meshd.cgroups import cgroup2_mount
    return cgroup2_mount()


def free_port() -> int:
    while True:
        p = random.randint(20000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return p
            except OSError:
                continue


def wait_for(pred, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def kill_cgroup(path: str) -> None:
    """Kill every process in a cgroup tree and remove it (reaping our children)."""
    from meshd.cgroups import kill_tree
    kill_tree(path, on_wait=reap)
