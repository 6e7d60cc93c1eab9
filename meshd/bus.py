"""meshd on D-Bus: a thin, read-mostly view of Daemon.status() plus Reload().

Bus name io.meshd.Mesh1 on the system bus; the manager object /io/meshd/Mesh1
(io.meshd.Mesh1.Manager) and one object per configured workload under
/io/meshd/Mesh1/workload/<escaped name> (io.meshd.Mesh1.Workload).
docs/dbus-api.md is the reference; etc/dbus-1/io.meshd.Mesh1.conf the policy.

No decision lives here (firewalld's split): the daemon calls update(status)
after every status change, this module turns the dict into property values,
emits PropertiesChanged for the values that changed and WorkloadAdded/Removed
for objects that come and go. Get/GetAll are answered from that snapshot, so a
busy client never makes the daemon read the BPF maps.

The service side talks to Gio directly rather than through pydbus's publish():
pydbus names every error "unknown.<ExceptionClass>" (so no
org.freedesktop.DBus.Error.AccessDenied), logs a traceback for each refused
call, requests the name with ALLOW_REPLACEMENT (anyone allowed to own it could
take it over) and shares the process-wide system bus connection, which exits
the process when the bus goes away. The client side (read_status) accepts a
pydbus bus as well as a Gio connection.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from .datapath import COUNTERS

log = logging.getLogger("meshd.bus")

BUS_NAME = "io.meshd.Mesh1"
MANAGER_PATH = "/io/meshd/Mesh1"
WORKLOAD_PREFIX = MANAGER_PATH + "/workload"
MANAGER_IFACE = "io.meshd.Mesh1.Manager"
WORKLOAD_IFACE = "io.meshd.Mesh1.Workload"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
FAILED = "org.freedesktop.DBus.Error.Failed"
RECONNECT_INTERVAL = 10.0  # seconds between attempts to get back on the bus
CALL_TIMEOUT_MS = 5000

# The interfaces, as introspection shows them. Add, never change: a signature
# that changes breaks every client; a new need gets a new member.
_MANAGER_PROPS = (
    ("State", "s"), ("Version", "s", "const"), ("PID", "u", "const"), ("StartedAt", "t", "const"),
    ("ConfigDirectory", "s", "const"), ("ConfigFiles", "as"), ("ConfigErrors", "a(siss)"),
    ("EnvoyState", "s"), ("EnvoyPID", "u"), ("EnvoyRestarts", "u"), ("EnvoyAdopted", "b"),
    ("EnvoyAdminSocket", "s"), ("EnvoyListeners", "a{sb}"),
    ("OutboundPort", "q"), ("InboundPort", "q"),
    ("ExcludeOutboundPorts", "aq"), ("ExcludeOutboundCIDRs", "as"),
    # restart-only settings: a reload keeps the running values
    ("BpffsDirectory", "s", "const"), ("StateDirectory", "s", "const"),
    ("CgroupRoot", "s", "const"), ("DataPathPins", "s", "const"),
    ("DataPathAdopted", "b"), ("DataPathLinks", "as"), ("TrackedConnections", "t"),
    ("Counters", "a{st}"), ("UnattributedCounters", "a{st}"),
)
_WORKLOAD_PROPS = (
    ("Name", "s", "const"), ("Id", "u"), ("Cgroup", "s"), ("CgroupId", "t"), ("State", "s"),
    ("EnrolledSince", "t"), ("InboundPorts", "aq"), ("OtherPrograms", "a{sau}"),
    ("Counters", "a{st}"),
    # from Envoy's per-workload filter chains
    ("Connections", "t"), ("Requests", "t"), ("BytesSent", "t"), ("BytesReceived", "t"),
)


def _props_xml(props) -> str:
    """(name, signature[, "const"]): PropertiesChanged is emitted for all but
    the "const" ones, which cannot change while this meshd runs."""
    return "".join(f'<property name="{p[0]}" type="{p[1]}" access="read">'
                   '<annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" '
                   f'value="{p[2] if len(p) > 2 else "true"}"/></property>' for p in props)


INTROSPECTION_XML = f"""<node>
 <interface name="{MANAGER_IFACE}">
  {_props_xml(_MANAGER_PROPS)}
  <method name="Reload"><arg name="accepted" type="b" direction="out"/></method>
  <method name="ListWorkloads"><arg name="workloads" type="a(so)" direction="out"/></method>
  <signal name="ConfigRejected"><arg name="errors" type="a(siss)"/></signal>
  <signal name="WorkloadAdded"><arg name="name" type="s"/><arg name="path" type="o"/></signal>
  <signal name="WorkloadRemoved"><arg name="name" type="s"/><arg name="path" type="o"/></signal>
 </interface>
 <interface name="{WORKLOAD_IFACE}">
  {_props_xml(_WORKLOAD_PROPS)}
 </interface>
</node>"""


# -- object paths ---------------------------------------------------------------
def escape_label(name: str) -> str:
    """One object-path element, as systemd's bus_label_escape() does it: every
    byte of the UTF-8 form that is not [A-Za-z0-9] becomes _xx (lower-case hex);
    the empty string becomes "_"."""
    if not name:
        return "_"
    out = []
    for b in name.encode():
        c = chr(b)
        out.append(c if c.isascii() and c.isalnum() else f"_{b:02x}")
    return "".join(out)


def unescape_label(label: str) -> str:
    if label == "_":
        return ""
    raw, i = bytearray(), 0
    while i < len(label):
        if label[i] == "_" and _is_hex(label[i + 1:i + 3]):
            raw.append(int(label[i + 1:i + 3], 16))
            i += 3
        else:
            raw += label[i].encode()
            i += 1
    return raw.decode(errors="replace")


def _is_hex(s: str) -> bool:
    return len(s) == 2 and all(c in "0123456789abcdefABCDEF" for c in s)


def workload_path(name: str) -> str:
    return f"{WORKLOAD_PREFIX}/{escape_label(name)}"


# -- status dict -> property values -----------------------------------------------
def _counters(c: dict | None) -> dict[str, int]:
    """Every known counter, zeros included, so the key set never changes."""
    out = {k: 0 for k in COUNTERS}
    for k, v in (c or {}).items():
        out[str(k)] = int(v)
    return out


def _errors(errors) -> list[tuple]:
    out = []
    for e in errors or []:
        if dataclasses.is_dataclass(e):
            e = dataclasses.asdict(e)
        out.append((str(e.get("file", "")), int(e.get("line", 0) or 0),
                    str(e.get("key", "")), str(e.get("message", ""))))
    return out


def _us(seconds) -> int:
    return int(round(float(seconds or 0) * 1_000_000))


def manager_values(st: dict) -> dict:
    mesh, ev, dp = st.get("mesh", {}), st.get("envoy", {}), st.get("datapath", {})
    unattributed = _counters(st.get("counters"))
    total = dict(unattributed)
    for w in st.get("workloads", []):
        for k, v in _counters(w.get("counters")).items():
            total[k] = total.get(k, 0) + v
    return {
        "State": st.get("state", ""), "Version": st.get("version", ""),
        "PID": int(st.get("pid") or 0), "StartedAt": _us(st.get("started")),
        "ConfigDirectory": st.get("config_dir", ""),
        "ConfigFiles": [str(f) for f in st.get("config_files", [])],
        "ConfigErrors": _errors(st.get("config_errors")),
        "EnvoyState": ev.get("state", ""), "EnvoyPID": int(ev.get("pid") or 0),
        "EnvoyRestarts": int(ev.get("restarts") or 0), "EnvoyAdopted": bool(ev.get("adopted")),
        "EnvoyAdminSocket": ev.get("admin_socket", "") or "",
        "EnvoyListeners": {str(k): bool(v) for k, v in (ev.get("listeners") or {}).items()},
        "OutboundPort": int(mesh.get("outbound_port") or 0),
        "InboundPort": int(mesh.get("inbound_port") or 0),
        "ExcludeOutboundPorts": [int(p) for p in mesh.get("exclude_outbound_ports", [])],
        "ExcludeOutboundCIDRs": [str(c) for c in mesh.get("exclude_outbound_cidrs", [])],
        "BpffsDirectory": mesh.get("bpffs_dir", ""), "StateDirectory": mesh.get("state_dir", ""),
        "CgroupRoot": mesh.get("cgroup_root", ""),
        "DataPathPins": dp.get("pins", "") or "", "DataPathAdopted": bool(dp.get("adopted")),
        "DataPathLinks": [str(l) for l in dp.get("links", [])],
        "TrackedConnections": int(dp.get("tracked_connections") or 0),
        "Counters": total, "UnattributedCounters": unattributed,
    }


def workload_values(w: dict) -> dict:
    enrolled = bool(w.get("enrolled_since"))
    return {
        "Name": w["name"], "Id": int(w.get("id") or 0), "Cgroup": w.get("cgroup") or "",
        "CgroupId": int(w.get("cgroup_id") or 0),
        "State": "enrolled" if enrolled else (w.get("error") or "waiting"),
        "EnrolledSince": _us(w.get("enrolled_since")) if enrolled else 0,
        "InboundPorts": [int(p) for p in w.get("inbound_ports", [])],
        "OtherPrograms": {str(h): [int(i) for i in ids]
                          for h, ids in (w.get("other_programs") or {}).items()},
        "Counters": _counters(w.get("counters")),
        **{name: int((w.get("envoy") or {}).get(key, 0)) for name, key in (
            ("Connections", "connections"), ("Requests", "requests"),
            ("BytesSent", "bytes_sent"), ("BytesReceived", "bytes_received"))},
    }


# -- the service --------------------------------------------------------------------
class BusService:
    """The daemon's D-Bus face. Everything runs on the daemon's GLib main loop."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.con = None                 # Gio.DBusConnection while on the bus
        self.manager: dict = {}         # property -> value (last update)
        self.workloads: dict = {}       # workload name -> {property -> value}
        self._reg: dict = {}            # object path -> registration id
        self._closed_handler = 0
        self._want = False              # publish() was called and close() was not
        self._next_try = 0.0
        self._warned = False
        from gi.repository import Gio
        node = Gio.DBusNodeInfo.new_for_xml(INTROSPECTION_XML)
        self._iface = {i.name: i for i in node.interfaces}

    # -- life cycle --
    def publish(self) -> bool:
        """Connect to the system bus, export the objects, claim the name.
        Returns False (with a warning) when that is impossible; never raises."""
        self._want = True
        if not self.manager:
            try:
                self._set_snapshot(self.daemon.status())
            except Exception:
                log.exception("D-Bus: cannot read the daemon's status")
        try:
            return self._connect()
        except Exception:  # a bug here must not take the data path down with it
            log.exception("D-Bus: cannot publish %s", BUS_NAME)
            self._disconnect(release=False)
            return False

    def close(self) -> None:
        self._want = False
        self._disconnect(release=True)

    def _connect(self) -> bool:
        from gi.repository import Gio, GLib
        self._next_try = time.monotonic() + RECONNECT_INTERVAL
        address = ""
        try:
            address = Gio.dbus_address_get_for_bus_sync(Gio.BusType.SYSTEM, None)
            # A private connection: the shared one from g_bus_get() has
            # exit-on-close set, so a restart of dbus-daemon would kill meshd.
            con = Gio.DBusConnection.new_for_address_sync(
                address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
            con.set_exit_on_close(False)
        except GLib.Error as e:
            self._warn(f"no system bus at {address or '?'} ({e.message}); "
                       "meshd runs without its D-Bus API")
            return False
        self.con = con
        self._closed_handler = con.connect("closed", self._on_closed)
        try:
            self._register(MANAGER_PATH, MANAGER_IFACE)
            for name in self.workloads:
                self._register(workload_path(name), WORKLOAD_IFACE)
            # After the objects exist, so whoever sees the name can use them.
            # DO_NOT_QUEUE and no ALLOW_REPLACEMENT: nobody can take it over.
            (res,) = con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                   "org.freedesktop.DBus", "RequestName",
                                   GLib.Variant("(su)", (BUS_NAME, 4)), GLib.VariantType("(u)"),
                                   Gio.DBusCallFlags.NONE, CALL_TIMEOUT_MS, None).unpack()
        except GLib.Error as e:
            self._warn(f"cannot own {BUS_NAME} on the system bus ({e.message}); "
                       "meshd runs without its D-Bus API")
            self._disconnect(release=False)
            return False
        if res != 1:  # 3: exists, 4: already ours (cannot happen on a new connection)
            self._warn(f"{BUS_NAME} is already owned on the system bus (another meshd?); "
                       "this meshd runs without its D-Bus API")
            self._disconnect(release=False)
            return False
        log.info("D-Bus: %s on %s", BUS_NAME, address)
        self._warned = False
        return True

    def _warn(self, msg: str) -> None:
        # Once per outage: update() retries every RECONNECT_INTERVAL seconds.
        if self._warned:
            log.debug("%s", msg)
        else:
            log.warning("%s", msg)
            self._warned = True

    def _disconnect(self, release: bool) -> None:
        from gi.repository import GLib
        con, self.con = self.con, None
        if con is None:
            return
        if self._closed_handler:
            con.disconnect(self._closed_handler)
            self._closed_handler = 0
        if not con.is_closed():
            for rid in self._reg.values():
                con.unregister_object(rid)
            if release:
                try:
                    con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                  "org.freedesktop.DBus", "ReleaseName",
                                  GLib.Variant("(s)", (BUS_NAME,)), None, 0, 1000, None)
                except GLib.Error:
                    pass
            try:
                con.close_sync(None)
            except GLib.Error:
                pass
        self._reg.clear()

    def _on_closed(self, con, remote_peer_vanished, error) -> None:
        log.warning("D-Bus: lost the system bus connection; retrying every %.0fs",
                    RECONNECT_INTERVAL)
        self._warned = True
        self._reg.clear()
        self._disconnect(release=False)

    def _register(self, path: str, iface: str) -> None:
        if path not in self._reg:
            self._reg[path] = self.con.register_object(
                path, self._iface[iface], self._on_method_call, self._on_get_property, None)

    def _unregister(self, path: str) -> None:
        rid = self._reg.pop(path, None)
        if rid is not None and self.con is not None:
            self.con.unregister_object(rid)

    # -- the view --
    def update(self, status: dict) -> None:
        """Take the daemon's latest status; publish only what changed."""
        try:
            if self._want and self.con is None and time.monotonic() >= self._next_try:
                self._connect()
            self._set_snapshot(status)
        except Exception:  # never into the daemon's tick
            log.exception("D-Bus: update failed")

    def _set_snapshot(self, status: dict) -> None:
        new = manager_values(status)
        first = not self.manager  # the first snapshot is not a change
        changed = {k: v for k, v in new.items() if self.manager.get(k) != v}
        self.manager = new
        if changed and not first:
            self._properties_changed(MANAGER_PATH, MANAGER_IFACE, changed)

        seen = {}
        for w in status.get("workloads", []):
            seen[w["name"]] = workload_values(w)
        for name in [n for n in self.workloads if n not in seen]:
            del self.workloads[name]
            path = workload_path(name)
            self._unregister(path)
            self._emit(MANAGER_PATH, MANAGER_IFACE, "WorkloadRemoved", "(so)", (name, path))
        for name, values in seen.items():
            path = workload_path(name)
            old = self.workloads.get(name)
            self.workloads[name] = values
            if old is None:
                if self.con is not None:
                    self._register(path, WORKLOAD_IFACE)
                self._emit(MANAGER_PATH, MANAGER_IFACE, "WorkloadAdded", "(so)", (name, path))
            else:
                diff = {k: v for k, v in values.items() if old.get(k) != v}
                if diff:
                    self._properties_changed(path, WORKLOAD_IFACE, diff)

    def config_rejected(self, errors: list) -> None:
        """The daemon refused a new config: tell subscribers why (file, line, key, message)."""
        self._emit(MANAGER_PATH, MANAGER_IFACE, "ConfigRejected", "(a(siss))", (_errors(errors),))

    # -- wire helpers --
    def _variant(self, iface: str, prop: str, value):
        from gi.repository import GLib
        return GLib.Variant(self._iface[iface].lookup_property(prop).signature, value)

    def _properties_changed(self, path: str, iface: str, changed: dict) -> None:
        from gi.repository import GLib
        if self.con is None:
            return
        body = GLib.Variant("(sa{sv}as)", (iface, {k: self._variant(iface, k, v)
                                                   for k, v in changed.items()}, []))
        self._emit_raw(path, PROPERTIES_IFACE, "PropertiesChanged", body)

    def _emit(self, path, iface, signal, signature, args) -> None:
        from gi.repository import GLib
        if self.con is not None:
            self._emit_raw(path, iface, signal, GLib.Variant(signature, args))

    def _emit_raw(self, path, iface, signal, body) -> None:
        from gi.repository import GLib
        try:
            self.con.emit_signal(None, path, iface, signal, body)
        except GLib.Error as e:
            log.debug("D-Bus: cannot emit %s.%s: %s", iface, signal, e.message)

    # -- incoming calls (GDBus answers Introspect, Peer and Properties itself,
    #    through _on_get_property) --
    def _on_get_property(self, con, sender, path, iface, prop):
        if iface == MANAGER_IFACE:
            values = self.manager
        else:
            values = self.workloads.get(unescape_label(path.rsplit("/", 1)[-1]), {})
        return self._variant(iface, prop, values[prop])

    def _on_method_call(self, con, sender, path, iface, method, params, invocation) -> None:
        from gi.repository import GLib
        try:
            if (iface, method) == (MANAGER_IFACE, "ListWorkloads"):
                invocation.return_value(GLib.Variant("(a(so))", (
                    [(n, workload_path(n)) for n in sorted(self.workloads)],)))
            elif (iface, method) == (MANAGER_IFACE, "Reload"):
                self._reload(con, sender, invocation)
            else:
                invocation.return_dbus_error("org.freedesktop.DBus.Error.UnknownMethod",
                                             f"no method {iface}.{method} at {path}")
        except Exception as e:
            log.exception("D-Bus: %s.%s() failed", iface, method)
            invocation.return_dbus_error(FAILED, f"{method}() failed: {e}")

    def _reload(self, con, sender, invocation) -> None:
        """Root only. The bus policy already says so; this is the second lock."""
        from gi.repository import GLib
        uid = self._caller_uid(con, sender)
        if uid != 0:
            log.warning("D-Bus: Reload() refused for %s (uid %s): only root may reload",
                        sender, "unknown" if uid is None else uid)
            invocation.return_dbus_error(ACCESS_DENIED, "only root may call Reload() "
                                         f"(caller uid {'unknown' if uid is None else uid})")
            return
        ok = bool(self.daemon.reload("D-Bus Reload()"))
        invocation.return_value(GLib.Variant("(b)", (ok,)))

    @staticmethod
    def _caller_uid(con, sender) -> int | None:
        from gi.repository import Gio, GLib
        if not sender:  # a peer-to-peer connection: no bus to vouch for the caller
            return None
        try:
            (uid,) = con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                   "org.freedesktop.DBus", "GetConnectionUnixUser",
                                   GLib.Variant("(s)", (sender,)), GLib.VariantType("(u)"),
                                   Gio.DBusCallFlags.NONE, CALL_TIMEOUT_MS, None).unpack()
            return uid
        except GLib.Error as e:
            log.warning("D-Bus: cannot identify %s: %s", sender, e.message)
            return None


# -- the client: `meshd status` -------------------------------------------------------
def _connection(bus):
    """A Gio.DBusConnection from None (the system bus), a pydbus bus, an address
    string or a Gio.DBusConnection."""
    from gi.repository import Gio
    if bus is None:
        return Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    if isinstance(bus, str):
        return Gio.DBusConnection.new_for_address_sync(
            bus, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
            | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
    return getattr(bus, "con", bus)


def _call(con, path, iface, method, args=None, reply="(a{sv})", dest=BUS_NAME):
    from gi.repository import Gio, GLib
    return con.call_sync(dest, path, iface, method, args, GLib.VariantType(reply),
                         Gio.DBusCallFlags.NONE, CALL_TIMEOUT_MS, None).unpack()[0]


def read_status(bus=None) -> dict | None:
    """The running daemon's status over D-Bus, shaped like Daemon.status() (so
    cli.format_status prints it), or None when io.meshd.Mesh1 is not on the bus
    (or there is no bus). Keys the bus does not carry: "updated" is now."""
    from gi.repository import GLib
    try:
        con = _connection(bus)
        if not _call(con, "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameHasOwner",
                     GLib.Variant("(s)", (BUS_NAME,)), "(b)", dest="org.freedesktop.DBus"):
            return None
        m = _call(con, MANAGER_PATH, PROPERTIES_IFACE, "GetAll",
                  GLib.Variant("(s)", (MANAGER_IFACE,)))
        listed = _call(con, MANAGER_PATH, MANAGER_IFACE, "ListWorkloads", None, "(a(so))")
    except GLib.Error as e:
        log.debug("read_status: %s", e.message)
        return None
    workloads = []
    for _name, path in listed:
        try:
            w = _call(con, path, PROPERTIES_IFACE, "GetAll",
                      GLib.Variant("(s)", (WORKLOAD_IFACE,)))
        except GLib.Error:
            continue  # removed between the list and now
        enrolled = w["State"] == "enrolled"
        workloads.append({
            "name": w["Name"], "id": w["Id"], "cgroup": w["Cgroup"] or None,
            "cgroup_id": w["CgroupId"], "enrolled_since": w["EnrolledSince"] / 1e6,
            "error": "" if enrolled else w["State"], "other_programs": w["OtherPrograms"],
            "counters": w["Counters"], "inbound_ports": w["InboundPorts"],
            "envoy": {"connections": w["Connections"], "requests": w["Requests"],
                      "bytes_sent": w["BytesSent"], "bytes_received": w["BytesReceived"]}})
    return {
        "version": m["Version"], "pid": m["PID"], "state": m["State"],
        "updated": time.time(), "started": m["StartedAt"] / 1e6,
        "config_dir": m["ConfigDirectory"], "config_files": m["ConfigFiles"],
        "config_errors": [{"file": f, "line": l, "key": k, "message": msg}
                          for f, l, k, msg in m["ConfigErrors"]],
        "mesh": {"outbound_port": m["OutboundPort"], "inbound_port": m["InboundPort"],
                 "exclude_outbound_ports": m["ExcludeOutboundPorts"],
                 "exclude_outbound_cidrs": m["ExcludeOutboundCIDRs"],
                 "bpffs_dir": m["BpffsDirectory"], "state_dir": m["StateDirectory"],
                 "cgroup_root": m["CgroupRoot"]},
        "envoy": {"state": m["EnvoyState"], "pid": m["EnvoyPID"] or None,
                  "adopted": m["EnvoyAdopted"], "restarts": m["EnvoyRestarts"],
                  "admin_socket": m["EnvoyAdminSocket"], "listeners": m["EnvoyListeners"]},
        "datapath": {"pins": m["DataPathPins"], "adopted": m["DataPathAdopted"],
                     "links": m["DataPathLinks"], "tracked_connections": m["TrackedConnections"]},
        "counters": m["UnattributedCounters"],
        "workloads": workloads,
    }
