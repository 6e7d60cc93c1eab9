"""The status model: what meshd knows about itself, as typed, frozen dataclasses.

The daemon fills one Status per tick; status.json is its JSON form
(to_json/from_json), the D-Bus properties are read from it (bus.py's property
table) and `meshd status` prints it (format_text), whether it came over the
bus or from the file. The JSON field names are the status file's format:
add fields, never rename them.

Counter rows are {name: value} with every counter name the data path has
(the daemon fills zeros), so their key set never changes.
"""
from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from . import statefiles
from .config import ConfigError

# Typing spelled with typing's generics, not `int | None`: from_dict resolves
# the annotations at run time, which `X | Y` does not survive before 3.10.
Counters = Dict[str, int]


@dataclass(frozen=True)
class MeshSettings:
    """The [mesh] settings status shows (the restart-only ones as running)."""
    outbound_port: int = 0
    inbound_port: int = 0
    exclude_outbound_ports: Tuple[int, ...] = ()
    exclude_outbound_cidrs: Tuple[str, ...] = ()
    bpffs_dir: str = ""
    state_dir: str = ""
    cgroup_root: str = ""


@dataclass(frozen=True)
class EnvoyStatus:
    state: str = ""
    pid: Optional[int] = None
    adopted: bool = False
    restarts: int = 0
    admin_socket: str = ""
    listeners: Dict[str, bool] = field(default_factory=dict)  # slot -> in the SOCKMAP
    user: str = ""   # the user Envoy's process runs as ("" while there is none)


@dataclass(frozen=True)
class DatapathStatus:
    pins: str = ""
    adopted: bool = False
    links: Tuple[str, ...] = ()          # pinned links, "<owner>:<hook>"
    tracked_connections: int = 0


@dataclass(frozen=True)
class AccelerationStatus:
    """Socket acceleration of local pairs: configured mode, whether it is on
    here and why, and its counters (maplayout.ACCEL_COUNTERS, every name)."""
    mode: str = "off"                    # on, off, force ([mesh] acceleration)
    active: bool = False
    kernel: str = ""
    reason: str = ""
    counters: Counters = field(default_factory=dict)


@dataclass(frozen=True)
class WorkloadEnvoy:
    """A workload's numbers from its own Envoy filter chains; bytes from the
    workload's side (sent = what it wrote)."""
    connections: int = 0
    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class WorkloadStatus:
    name: str = ""
    id: int = 0
    cgroup: Optional[str] = None         # relative to the cgroup2 root, once found
    cgroup_id: int = 0
    enrolled_since: float = 0.0          # 0: not enrolled
    error: str = ""                      # why not enrolled
    other_programs: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # hook -> ids
    counters: Counters = field(default_factory=dict)
    inbound_ports: Tuple[int, ...] = ()
    envoy: WorkloadEnvoy = WorkloadEnvoy()
    # identity (mesh.trust_domain): its SPIFFE ID and its certificate's validity
    spiffe_id: str = ""
    cert_not_after: float = 0.0          # epoch seconds; 0: no certificate
    cert_renew_at: float = 0.0

    @property
    def state(self) -> str:
        """What `meshd status` and the bus show: "enrolled", or why not."""
        return "enrolled" if self.enrolled_since else (self.error or "waiting")


@dataclass(frozen=True)
class ContainerStatus:
    """A Podman container the OCI hook recorded; counters are its workload's."""
    id: str = ""
    name: str = ""
    workload: str = ""
    cgroup: str = ""
    network: str = ""                    # "host", or its namespace's path
    addresses: Tuple[str, ...] = ()
    inbound_ports: Tuple[int, ...] = ()  # its listening ports, steered into Envoy
    enrolled_since: float = 0.0          # 0: not meshed
    error: str = ""                      # why not meshed
    counters: Counters = field(default_factory=dict)
    selected_by: str = "annotation"      # or "name", "label", "unit" (found by discovery)

    @property
    def state(self) -> str:
        return "enrolled" if self.enrolled_since else (self.error or "waiting")


@dataclass(frozen=True)
class IdentityStatus:
    """Identities and the catalog (docs/identity.md); empty when trust_domain is unset."""
    trust_domain: str = ""
    error: str = ""                      # e.g. the host CA cannot be read
    ca_not_after: float = 0.0            # the host's intermediate
    catalog: str = ""                    # "", "connected", "unreachable"
    catalog_endpoint: str = ""
    catalog_error: str = ""
    catalog_updated: float = 0.0         # when the catalog in use was read from etcd
    catalog_hosts: Tuple[str, ...] = ()  # every host in it, this one included
    remote_destinations: int = 0         # meshed ip:port on other hosts, called with mTLS


@dataclass(frozen=True)
class Status:
    version: str = ""
    pid: int = 0
    state: str = ""                      # starting, running, degraded, stopped
    updated: float = 0.0
    started: float = 0.0
    config_dir: str = ""
    config_files: Tuple[str, ...] = ()
    config_errors: Tuple[ConfigError, ...] = ()
    mesh: MeshSettings = MeshSettings()
    envoy: EnvoyStatus = EnvoyStatus()
    datapath: DatapathStatus = DatapathStatus()
    acceleration: AccelerationStatus = AccelerationStatus()
    counters: Counters = field(default_factory=dict)   # unattributed (slot 0)
    workloads: Tuple[WorkloadStatus, ...] = ()
    containers: Tuple[ContainerStatus, ...] = ()
    identity: IdentityStatus = IdentityStatus()

    def host_counters(self) -> Counters:
        """The whole host: unattributed plus every configured workload's."""
        total = dict(self.counters)
        for w in self.workloads:
            for k, v in w.counters.items():
                total[k] = total.get(k, 0) + v
        return total

    # -- the JSON form (status.json, `meshd status --json`) --
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Status":
        return _from_json_value(cls, d)

    @classmethod
    def from_json(cls, text: str) -> "Status":
        return cls.from_dict(json.loads(text))


def _from_json_value(tp, v):
    """A JSON value as type tp, by the dataclasses' annotations. Keys a class
    does not know are ignored and missing ones take the default, so a status
    file from another meshd version still reads."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise ValueError(f"{tp.__name__}: expected an object, got {v!r}")
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _from_json_value(hints[f.name], v[f.name])
                     for f in dataclasses.fields(tp) if f.name in v})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        return None if v is None else _from_json_value(args[0], v)
    if origin is tuple:
        return tuple(_from_json_value(args[0], x) for x in v)
    if origin is dict:
        return {str(k): _from_json_value(args[1], x) for k, x in v.items()}
    return tp(v)  # str, int, float, bool


# -- status.json ------------------------------------------------------------------
def status_path(state_dir: str) -> str:
    return statefiles.path(state_dir, statefiles.STATUS)


def read_file(state_dir: str) -> Optional[Status]:
    """The last status the daemon wrote, or None without a readable one."""
    try:
        with open(status_path(state_dir)) as f:
            return Status.from_json(f.read())
    except (OSError, ValueError, TypeError):
        return None


# -- text (`meshd status`) ----------------------------------------------------------
def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _identity_lines(i: IdentityStatus) -> list:
    if not i.trust_domain:
        return []
    out = [f"  identity:  trust domain {i.trust_domain}" +
           (f", host CA expires {_utc(i.ca_not_after)}" if i.ca_not_after else "")]
    if i.error:
        out.append(f"             ERROR: {i.error}")
    if i.catalog == "connected":
        out.append(f"  catalog:   etcd {i.catalog_endpoint}: {len(i.catalog_hosts)} host(s) "
                   f"{list(i.catalog_hosts)}, {i.remote_destinations} remote destination(s) via mTLS")
    elif i.catalog:
        age = f"read {_utc(i.catalog_updated)}" if i.catalog_updated else "none yet"
        out.append(f"  catalog:   etcd UNREACHABLE ({i.catalog_error}); serving the last "
                   f"catalog ({age}): {len(i.catalog_hosts)} host(s), "
                   f"{i.remote_destinations} remote destination(s)")
    else:
        out.append("  catalog:   none (single host)")
    return out



def format_text(st: Status, running: bool, source: str) -> str:
    """What `meshd status` prints. source: where st was read (D-Bus or the file)."""
    out = []
    head = f"meshd {st.version}: {st.state if running else 'NOT RUNNING'}"
    out.append(head + (f" (pid {st.pid})" if running
                       else f" (last status {time.time() - st.updated:.0f}s ago)"))
    out.append(f"  source:    {source}")
    out.append(f"  config:    {st.config_dir} ({len(st.config_files)} file(s))")
    if st.config_errors:
        out.append("  config:    LAST CHANGE REJECTED; the last good config stays in force:")
        out += [f"    {e}" for e in st.config_errors]
    ev, mesh, dp = st.envoy, st.mesh, st.datapath
    listeners = ", ".join(f"{k} {'up' if v else 'DOWN'}" for k, v in ev.listeners.items())
    user = f", user {ev.user}" if ev.user else ""
    out.append(f"  envoy:     {ev.state} (pid {ev.pid}{user}, restarts {ev.restarts}); "
               f"outbound :{mesh.outbound_port}, inbound :{mesh.inbound_port}")
    out.append(f"             listeners: {listeners}")
    down = [k for k, v in ev.listeners.items() if not v]
    if down and ev.state == "running":
        out.append(f"             not in the data path: {', '.join(down)} "
                   "(those connections fail open)")
    if ev.state != "running":
        out.append("             workloads FAIL OPEN (connect directly) until Envoy is back")
    out.append(f"  datapath:  {dp.pins} ({'adopted' if dp.adopted else 'loaded'}), "
               f"{len(dp.links)} links, {dp.tracked_connections} tracked connections")
    ac = st.acceleration
    out.append(f"  accel:     {'active' if ac.active else 'inactive'} (mode {ac.mode}; "
               f"{ac.reason})")
    if any(ac.counters.values()):
        out.append("             " + " ".join(f"{k}={v}" for k, v in ac.counters.items()))
    out.append(f"  excluded:  ports {list(mesh.exclude_outbound_ports)} "
               f"cidrs {list(mesh.exclude_outbound_cidrs)}")
    out += _identity_lines(st.identity)
    out.append(f"  workloads: {len(st.workloads)}")
    for w in st.workloads:
        out.append(f"    {w.name:<16} {w.state:<10} {w.cgroup or '-'}")
        if w.inbound_ports:
            out.append(f"      inbound ports via Envoy: {list(w.inbound_ports)}")
        for hook, ids in w.other_programs.items():
            out.append(f"      also attached on {hook} (not meshd's): program id(s) {list(ids)}")
        e = w.envoy
        if any(dataclasses.astuple(e)):
            out.append(f"      envoy: connections={e.connections} requests={e.requests} "
                       f"bytes_sent={e.bytes_sent} bytes_received={e.bytes_received}")
        if any(w.counters.values()):
            out.append("      " + " ".join(f"{k}={v}" for k, v in w.counters.items()))
        if w.spiffe_id:
            out.append(f"      identity: {w.spiffe_id}, certificate " + (
                f"expires {_utc(w.cert_not_after)} (in {w.cert_not_after - time.time():.0f}s), "
                f"renewed at {_utc(w.cert_renew_at)}" if w.cert_not_after else "NONE"))
    if st.containers:
        out.append(f"  containers: {len(st.containers)}")
    for c in st.containers:
        out.append(f"    {c.id[:12]} {c.name or '-':<16} workload {c.workload:<12} "
                   f"{'enrolled' if c.enrolled_since else 'NOT MESHED: ' + c.error}")
        out.append(f"      cgroup {c.cgroup or '-'}; network {c.network}; addresses "
                   f"{', '.join(c.addresses) or '-'}; selected by {c.selected_by}")
        if c.inbound_ports:
            out.append(f"      inbound ports via Envoy: {list(c.inbound_ports)}")
        if any(c.counters.values()):
            out.append(f"      workload {c.workload} counters: " +
                       " ".join(f"{k}={v}" for k, v in c.counters.items() if v))
    if st.counters.get("miss"):
        out.append(f"  misses:    {st.counters['miss']} connections reached Envoy without an "
                   "original destination (failed, not forwarded)")
    if full := st.host_counters().get("table_full"):
        out.append(f"  full:      {full} connections went direct because the connection maps "
                   "were full (raise mesh.max_connections)")
    return "\n".join(out)
