"""Socket acceleration's policy: may it run on this kernel, given the configured mode.

`[mesh] acceleration` is "on" (true), "off" (false) or "force". "on" takes
effect only on a kernel series the acceleration suite
(tests/datapath/test_acceleration.py) has passed on: sockmap redirection has
had data-losing bugs that came and went between releases, so meshd refuses a
kernel it has not been proven on and says which, rather than gamble with
applications' bytes. "force" skips that check.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# Kernel series (major.minor) on which the whole acceleration suite passed.
# None yet: on 6.18 a splice() reader misses redirected bytes and a reader that
# stops does not hold its sender back (README, "Socket acceleration"), so
# acceleration runs only where the operator forces it.
KERNEL_ALLOWLIST: tuple[str, ...] = ()
MODES = ("on", "off", "force")


@dataclass(frozen=True)
class Decision:
    active: bool
    reason: str      # why it is (not) active, for the log and status


def kernel_series(release: str) -> str:
    """'6.18.44-foo' -> '6.18'."""
    parts = release.split("-", 1)[0].split(".")
    return ".".join(parts[:2])


def decide(mode: str, release: str | None = None) -> Decision:
    release = release or os.uname().release
    if mode == "off":
        return Decision(False, "acceleration = false")
    if mode == "force":
        allowed = kernel_series(release) in KERNEL_ALLOWLIST
        return Decision(True, f'acceleration = "force" on kernel {release}'
                        + ("" if allowed else " (not on the allowlist: unproven here)"))
    if kernel_series(release) in KERNEL_ALLOWLIST:
        return Decision(True, f"kernel {release} is on the allowlist")
    listed = ", ".join(KERNEL_ALLOWLIST) or "empty: no kernel has passed the whole suite yet"
    return Decision(False, (
        f"refused: the running kernel {release} is not on meshd's acceleration allowlist "
        f"({listed}); sockmap redirection is only enabled on kernels the acceleration "
        'suite passed on. Set acceleration = "force" to enable it anyway'))
