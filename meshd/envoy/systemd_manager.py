"""The few calls of systemd's manager D-Bus API (org.freedesktop.systemd1) meshd needs to
run Envoy as a unit: look a unit up, start a transient one, stop it, reset it.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

log = logging.getLogger(__package__)

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
DBUS_TIMEOUT_MS = 25000

# ActiveState values (systemd.unit(5)) in which the unit has, or is getting, a main process.
UP = ("active", "activating", "reloading")


class SystemdError(Exception):
    """A D-Bus call to systemd failed; ``name`` is the D-Bus error name when known."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name


def systemd_booted() -> bool:
    """Is PID 1 systemd?  (sd_booted(3))"""
    from systemd import daemon
    return daemon.booted()


def to_variants(props: list[tuple[str, str, Any]]) -> list:
    """``[(name, GLib.Variant(signature, value))]`` from ``(name, signature, value)``:
    the ``a(sv)`` of StartTransientUnit."""
    from gi.repository import GLib
    return [(name, GLib.Variant(sig, value)) for name, sig, value in props]


class SystemdManager:
    """The calls meshd makes, over pydbus's system bus connection (synchronous: each
    returns in milliseconds)."""

    def __init__(self, bus=None):
        if bus is None:
            import pydbus
            bus = pydbus.SystemBus()
        self.bus = bus
        self.con = bus.con   # the Gio.DBusConnection: explicit signatures, no introspection

    def _call(self, path: str, iface: str, method: str, sig: Optional[str], args,
              reply: Optional[str]):
        from gi.repository import Gio, GLib
        try:
            res = self.con.call_sync(
                SYSTEMD_BUS_NAME, path, iface, method,
                GLib.Variant(sig, args) if sig else None,
                GLib.VariantType.new(reply) if reply else None,
                Gio.DBusCallFlags.NONE, DBUS_TIMEOUT_MS, None)
        except GLib.Error as e:
            name = Gio.DBusError.get_remote_error(e) or ""
            msg = e.message
            if msg.startswith(f"GDBus.Error:{name}: "):
                msg = msg[len(f"GDBus.Error:{name}: "):]
            raise SystemdError(f"{method}: {msg}", name) from None
        return res.unpack() if res is not None else None

    def version(self) -> str:
        return self._call(MANAGER_PATH, PROPERTIES_IFACE, "Get", "(ss)",
                          (MANAGER_IFACE, "Version"), "(v)")[0]

    def unit_path(self, name: str) -> Optional[str]:
        try:
            return self._call(MANAGER_PATH, MANAGER_IFACE, "GetUnit", "(s)", (name,), "(o)")[0]
        except SystemdError as e:
            if e.name.endswith(".NoSuchUnit"):
                return None
            raise

    def unit(self, name: str) -> Optional[tuple[str, int]]:
        """``(ActiveState, MainPID)`` of a loaded unit, or None when there is none."""
        path = self.unit_path(name)
        if path is None:
            return None
        try:
            state = self._call(path, PROPERTIES_IFACE, "Get", "(ss)",
                               (UNIT_IFACE, "ActiveState"), "(v)")[0]
            pid = self._call(path, PROPERTIES_IFACE, "Get", "(ss)",
                             (SERVICE_IFACE, "MainPID"), "(v)")[0]
        except SystemdError as e:
            # garbage-collected between GetUnit and Get
            if e.name.endswith((".UnknownObject", ".UnknownMethod", ".NoSuchUnit")):
                return None
            raise
        return str(state), int(pid)

    def start_transient(self, name: str, props: list[tuple[str, str, Any]]) -> str:
        return self._call(MANAGER_PATH, MANAGER_IFACE, "StartTransientUnit",
                          "(ssa(sv)a(sa(sv)))", (name, "replace", to_variants(props), []),
                          "(o)")[0]

    def stop(self, name: str) -> bool:
        """StopUnit; False if there is no such unit."""
        try:
            self._call(MANAGER_PATH, MANAGER_IFACE, "StopUnit", "(ss)", (name, "replace"), "(o)")
        except SystemdError as e:
            if e.name.endswith(".NoSuchUnit"):
                return False
            raise
        return True

    def reset_failed(self, name: str) -> None:
        try:
            self._call(MANAGER_PATH, MANAGER_IFACE, "ResetFailedUnit", "(s)", (name,), None)
        except SystemdError as e:
            if not e.name.endswith(".NoSuchUnit"):
                raise

    def stop_and_wait(self, name: str, timeout: float) -> bool:
        """Stop a unit and wait until it is down; a failed unit is reset, so nothing is left
        behind.  True if it was running and is stopped now; False without such a unit,
        or on error (logged)."""
        try:
            st = self.unit(name)
            if st is None:
                return False
            was_up = st[0] in UP or st[0] == "deactivating"
            if was_up:
                self.stop(name)
                if not self._wait_down(name, timeout):
                    log.error("%s did not stop within %.0fs", name, timeout)
            self.reset_failed(name)
            return was_up
        except SystemdError as e:
            log.error("cannot stop %s: %s", name, e)
            return False

    def _wait_down(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.unit(name)
            if st is None or st[0] in ("inactive", "failed"):
                return True
            time.sleep(0.05)
        return False


def connect() -> Optional[SystemdManager]:
    """The systemd manager on the system bus, if PID 1 is systemd and it answers."""
    if not systemd_booted():
        return None
    try:
        m = SystemdManager()
        m.version()
        return m
    except Exception as e:  # no bus, no pydbus, systemd not answering
        log.info("systemd's D-Bus API is not reachable (%s)", e)
        return None
