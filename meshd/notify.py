"""sd_notify(3) for systemd's Type=notify; every call is a no-op without systemd."""
from __future__ import annotations

import os

try:
    from systemd import daemon as _sd
except ImportError:  # python3-systemd missing: behave as if not under systemd
    _sd = None

_last_status = None


def send(msg: str) -> None:
    if _sd is not None and os.environ.get("NOTIFY_SOCKET"):
        _sd.notify(msg)


def status(line: str) -> None:
    """STATUS= shows in `systemctl status`; only send it when it changes."""
    global _last_status
    if line != _last_status:
        _last_status = line
        send(f"STATUS={line}")


def watchdog_interval_ms() -> int:
    """Half of WatchdogSec (as systemd recommends), or 0 when there is none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return 0
    return max(int(usec) // 2000, 1)
