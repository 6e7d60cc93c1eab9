"""meshd on D-Bus: a thin, read-mostly view of the status model plus Reload().

Bus name io.meshd.Mesh1 on the system bus; the manager object /io/meshd/Mesh1
(io.meshd.Mesh1.Manager) and one object per configured workload under
/io/meshd/Mesh1/workload/<escaped name> (io.meshd.Mesh1.Workload).
docs/dbus-api.md is the reference; etc/dbus-1/io.meshd.Mesh1.conf the policy.

No decision lives here (firewalld's split): the daemon calls update(status)
with its meshd.status.Status after every status change; one property table
(MANAGER_PROPERTIES, WORKLOAD_PROPERTIES) turns the model into property values,
and this module emits PropertiesChanged for the values that changed and
WorkloadAdded/Removed for objects that come and go. Get/GetAll are answered
from that snapshot, so a busy client never makes the daemon read the BPF maps.
read_status() decodes the properties back into the model through the same
table.

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
from typing import Any, Callable

from .status import Status, WorkloadStatus

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


# -- the property table -----------------------------------------------------------
# Each D-Bus property is declared once, tying it to the status model as
# systemd's SD_BUS_PROPERTY() lines do: name, signature, where it lives in the
# model (a dotted path through the dataclasses, which is also its key path in
# status.json), how a model value becomes a bus value and back, and whether it
# emits PropertiesChanged. The table makes the introspection XML, the values
# Get/GetAll answer, the change signals and the client's decoding.
#
# Add, never change: a signature that changes breaks every client; a new need
# gets a new member.

@dataclasses.dataclass(frozen=True)
class Codec:
    """A model value -> its bus value, and a bus value -> its status.json value."""
    to_bus: Callable[[Any], Any]
    from_bus: Callable[[Any], Any] = lambda v: v


def _usec_to_bus(seconds) -> int:
    return int(round(float(seconds or 0) * 1_000_000))


_PLAIN = {"s": Codec(lambda v: str(v or "")), "b": Codec(bool),
          **{t: Codec(lambda v: int(v or 0)) for t in "yqutnix"}}
_LIST = Codec(list)
_DICT = Codec(dict)
USEC = Codec(_usec_to_bus, lambda us: us / 1e6)           # time: s (model) <-> µs (bus)
ZERO_IS_NONE = Codec(lambda v: int(v or 0), lambda v: v or None)
EMPTY_IS_NONE = Codec(lambda v: v or "", lambda v: v or None)
CONFIG_ERRORS = Codec(lambda errs: [(e.file, e.line, e.key, e.message) for e in errs],
                      lambda v: [dict(file=f, line=n, key=k, message=m) for f, n, k, m in v])
PROGRAM_IDS = Codec(lambda d: {h: list(ids) for h, ids in d.items()})
# Podman containers: (id, name, workload, cgroup, network, addresses, inbound
# ports, enrolled since (µs, 0 = not meshed), why not, counters of its workload,
# how it was selected: annotation, name, label or unit).
_CTR_FIELDS = ("id", "name", "workload", "cgroup", "network", "addresses", "inbound_ports",
               "enrolled_since", "error", "counters", "selected_by")
CONTAINERS = Codec(
    lambda cs: [(c.id, c.name, c.workload, c.cgroup, c.network, list(c.addresses),
                 list(c.inbound_ports), _usec_to_bus(c.enrolled_since), c.error,
                 dict(c.counters), c.selected_by) for c in cs],
    lambda v: [dict(zip(_CTR_FIELDS, row), enrolled_since=row[7] / 1e6) for row in v])
# A workload's State: "enrolled" or why not; decodes to the model's error.
WORKLOAD_STATE = Codec(str, lambda v: "" if v == "enrolled" else v)


@dataclasses.dataclass(frozen=True)
class Prop:
    name: str
    signature: str
    field: str | None           # dotted path in the model; None: derived, not decoded
    codec: Codec | None = None  # default: by signature (s, b, integers, arrays, dicts)
    get: Callable | None = None  # model object -> value to encode; default: the field
    emits: str = "true"          # EmitsChangedSignal: "true", "const", "invalidates"

    def value(self, obj):
        """The bus value of this property of obj (the Status or a WorkloadStatus)."""
        if self.get is not None:
            v = self.get(obj)
        else:
            v = obj
            for part in self.field.split("."):
                v = getattr(v, part)
        return self._codec().to_bus(v)

    def decode(self, value, into: dict) -> None:
        """Put a bus value where it belongs in a status.json-shaped dict."""
        if self.field is None:
            return
        *parents, last = self.field.split(".")
        for part in parents:
            into = into.setdefault(part, {})
        into[last] = self._codec().from_bus(value)

    def _codec(self) -> Codec:
        if self.codec is not None:
            return self.codec
        return _PLAIN.get(self.signature) or (_DICT if self.signature.startswith("a{") else _LIST)

    def xml(self) -> str:
        return (f'<property name="{self.name}" type="{self.signature}" access="read">'
                '<annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" '
                f'value="{self.emits}"/></property>')


# Derived values: a Prop's `get` by name.
_GETTERS = {"host_counters": Status.host_counters, "workload_state": lambda w: w.state}
_CODECS = {"USEC": USEC, "ZERO_IS_NONE": ZERO_IS_NONE, "EMPTY_IS_NONE": EMPTY_IS_NONE,
           "CONFIG_ERRORS": CONFIG_ERRORS, "PROGRAM_IDS": PROGRAM_IDS,
           "WORKLOAD_STATE": WORKLOAD_STATE, "CONTAINERS": CONTAINERS}


def _properties(table: str) -> tuple[Prop, ...]:
    """One Prop per row: name, D-Bus signature, model field ("-": derived), codec
    ("-": by signature), getter ("-": the field), EmitsChangedSignal ("-": true)."""
    props = []
    for row in table.strip().splitlines():
        if row.startswith("#"):
            continue
        name, sig, field, codec, get, emits = (c if c != "-" else None for c in row.split())
        props.append(Prop(name, sig, field, _CODECS[codec] if codec else None,
                          _GETTERS[get] if get else None, emits or "true"))
    return tuple(props)


MANAGER_PROPERTIES = _properties("""
State                 s        state                        -              -              -
Version               s        version                      -              -              const
PID                   u        pid                          -              -              const
StartedAt             t        started                      USEC           -              const
ConfigDirectory       s        config_dir                   -              -              const
ConfigFiles           as       config_files                 -              -              -
ConfigErrors          a(siss)  config_errors                CONFIG_ERRORS  -              -
EnvoyState            s        envoy.state                  -              -              -
EnvoyPID              u        envoy.pid                    ZERO_IS_NONE   -              -
EnvoyRestarts         u        envoy.restarts               -              -              -
EnvoyAdopted          b        envoy.adopted                -              -              -
EnvoyAdminSocket      s        envoy.admin_socket           -              -              -
EnvoyListeners        a{sb}    envoy.listeners              -              -              -
EnvoyUser             s        envoy.user                   -              -              -
OutboundPort          q        mesh.outbound_port           -              -              -
InboundPort           q        mesh.inbound_port            -              -              -
ExcludeOutboundPorts  aq       mesh.exclude_outbound_ports  -              -              -
ExcludeOutboundCIDRs  as       mesh.exclude_outbound_cidrs  -              -              -
# restart-only settings: a reload keeps the running values
BpffsDirectory        s        mesh.bpffs_dir               -              -              const
StateDirectory        s        mesh.state_dir               -              -              const
CgroupRoot            s        mesh.cgroup_root             -              -              const
DataPathPins          s        datapath.pins                -              -              const
DataPathAdopted       b        datapath.adopted             -              -              -
DataPathLinks         as       datapath.links               -              -              -
TrackedConnections    t        datapath.tracked_connections -              -              -
AccelerationMode      s        acceleration.mode            -              -              -
AccelerationActive    b        acceleration.active          -              -              -
AccelerationKernel    s        acceleration.kernel          -              -              const
AccelerationReason    s        acceleration.reason          -              -              -
AccelerationCounters  a{st}    acceleration.counters        -              -              -
Counters              a{st}    -                            -              host_counters  -
UnattributedCounters  a{st}    counters                     -              -              -
Containers  a(sssssasaqtsa{st}s)   containers                   CONTAINERS     -              -
# identity and catalog (docs/identity.md)
TrustDomain           s        identity.trust_domain        -              -              -
IdentityError         s        identity.error               -              -              -
CatalogState          s        identity.catalog             -              -              -
CatalogEndpoint       s        identity.catalog_endpoint    -              -              -
CatalogError          s        identity.catalog_error       -              -              -
CatalogUpdated        t        identity.catalog_updated     USEC           -              -
CatalogHosts          as       identity.catalog_hosts       -              -              -
""")
WORKLOAD_PROPERTIES = _properties("""
Name                  s        name                         -              -              const
Id                    u        id                           -              -              -
Cgroup                s        cgroup                       EMPTY_IS_NONE  -              -
CgroupId              t        cgroup_id                    -              -              -
State                 s        error                        WORKLOAD_STATE workload_state -
EnrolledSince         t        enrolled_since               USEC           -              -
InboundPorts          aq       inbound_ports                -              -              -
OtherPrograms         a{sau}   other_programs               PROGRAM_IDS    -              -
Counters              a{st}    counters                     -              -              -
# from Envoy's per-workload filter chains
Connections           t        envoy.connections            -              -              -
Requests              t        envoy.requests               -              -              -
BytesSent             t        envoy.bytes_sent             -              -              -
BytesReceived         t        envoy.bytes_received         -              -              -
# identity: SPIFFE ID and certificate validity (µs since the epoch; 0: none)
SpiffeId              s        spiffe_id                    -              -              -
CertificateNotAfter   t        cert_not_after               USEC           -              -
CertificateRenewAt    t        cert_renew_at                USEC           -              -
""")
PROPERTIES = {MANAGER_IFACE: {p.name: p for p in MANAGER_PROPERTIES},
              WORKLOAD_IFACE: {p.name: p for p in WORKLOAD_PROPERTIES}}


def _props_xml(props) -> str:
    return "".join(p.xml() for p in props)


INTROSPECTION_XML = f"""<node>
 <interface name="{MANAGER_IFACE}">
  {_props_xml(MANAGER_PROPERTIES)}
  <method name="Reload"><arg name="accepted" type="b" direction="out"/></method>
  <method name="ListWorkloads"><arg name="workloads" type="a(so)" direction="out"/></method>
  <signal name="ConfigRejected"><arg name="errors" type="a(siss)"/></signal>
  <signal name="WorkloadAdded"><arg name="name" type="s"/><arg name="path" type="o"/></signal>
  <signal name="WorkloadRemoved"><arg name="name" type="s"/><arg name="path" type="o"/></signal>
 </interface>
 <interface name="{WORKLOAD_IFACE}">
  {_props_xml(WORKLOAD_PROPERTIES)}
 </interface>
</node>"""


def values(props, obj) -> dict:
    """Every property's bus value for a model object."""
    return {p.name: p.value(obj) for p in props}


def manager_values(st: Status) -> dict:
    return values(MANAGER_PROPERTIES, st)


def workload_values(w: WorkloadStatus) -> dict:
    return values(WORKLOAD_PROPERTIES, w)


def decode(props, got: dict) -> dict:
    """GetAll's answer -> the status.json-shaped dict it came from (fields the
    bus does not carry are left out: the model's defaults)."""
    out: dict = {}
    for p in props:
        if p.name in got:
            p.decode(got[p.name], out)
    return out


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
    def update(self, status: Status) -> None:
        """Take the daemon's latest status; publish only what changed."""
        try:
            if self._want and self.con is None and time.monotonic() >= self._next_try:
                self._connect()
            self._set_snapshot(status)
        except Exception:  # never into the daemon's tick
            log.exception("D-Bus: update failed")

    def _set_snapshot(self, status: Status) -> None:
        new = manager_values(status)
        first = not self.manager  # the first snapshot is not a change
        changed = {k: v for k, v in new.items() if self.manager.get(k) != v}
        self.manager = new
        if changed and not first:
            self._properties_changed(MANAGER_PATH, MANAGER_IFACE, changed)

        seen = {w.name: workload_values(w) for w in status.workloads}
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

    def config_rejected(self, errors) -> None:
        """The daemon refused a new config: tell subscribers why (file, line, key, message)."""
        self._emit(MANAGER_PATH, MANAGER_IFACE, "ConfigRejected", "(a(siss))",
                   (CONFIG_ERRORS.to_bus(errors),))

    # -- wire helpers --
    @staticmethod
    def _variant(iface: str, prop: str, value):
        from gi.repository import GLib
        return GLib.Variant(PROPERTIES[iface][prop].signature, value)

    def _properties_changed(self, path: str, iface: str, changed: dict) -> None:
        """PropertiesChanged as each property's table line says: the new value,
        only its name ("invalidates"), or nothing ("const", "false")."""
        from gi.repository import GLib
        if self.con is None:
            return
        table = PROPERTIES[iface]
        new = {k: self._variant(iface, k, v) for k, v in changed.items()
               if table[k].emits == "true"}
        invalidated = [k for k in changed if table[k].emits == "invalidates"]
        if new or invalidated:
            body = GLib.Variant("(sa{sv}as)", (iface, new, invalidated))
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


def read_status(bus=None) -> Status | None:
    """The running daemon's status over D-Bus, decoded into the model by the
    property table, or None when io.meshd.Mesh1 is not on the bus (or there is
    no bus). What the bus does not carry: "updated" is now."""
    from gi.repository import GLib
    try:
        con = _connection(bus)
        if not _call(con, "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameHasOwner",
                     GLib.Variant("(s)", (BUS_NAME,)), "(b)", dest="org.freedesktop.DBus"):
            return None
        manager = _call(con, MANAGER_PATH, PROPERTIES_IFACE, "GetAll",
                        GLib.Variant("(s)", (MANAGER_IFACE,)))
        listed = _call(con, MANAGER_PATH, MANAGER_IFACE, "ListWorkloads", None, "(a(so))")
    except GLib.Error as e:
        log.debug("read_status: %s", e.message)
        return None
    workloads = []
    for _name, path in listed:
        try:
            workloads.append(decode(WORKLOAD_PROPERTIES, _call(
                con, path, PROPERTIES_IFACE, "GetAll", GLib.Variant("(s)", (WORKLOAD_IFACE,)))))
        except GLib.Error:
            continue  # removed between the list and now
    return Status.from_dict(dict(decode(MANAGER_PROPERTIES, manager), updated=time.time(),
                                 workloads=workloads))
