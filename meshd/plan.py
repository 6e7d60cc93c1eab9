"""The plan: what the kernel and Envoy should hold, decided from the config,
what discovery found and the workload ids in use. A pure function: no I/O, so
every decision reconcile makes is unit-tested without root (tests/unit/test_plan.py).

Decides: which owner gets which links on which cgroup, workload ids (kept
across restarts, recycled when full), cgroup id -> workload id, exclusions,
inbound port settings, Envoy's render input, and each workload's state text.
meshd/apply.py makes the kernel and Envoy's files match it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import maplayout, routing
from .config import Config
from .envoy_mtls import LocalPolicy, MtlsInput, Remote
from .identity import spiffe_id
from .datapath import WORKLOAD_HOOKS
from .discovery import World


class PlanError(Exception):
    pass


@dataclass(frozen=True)
class Owner:
    """Who a pinned link belongs to: "envoy", "netns" or a workload by name.
    str() is the pin name's prefix (datapath pins links/<owner>:<hook>)."""
    kind: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind

    @classmethod
    def parse(cls, text: str) -> "Owner":
        kind, _, name = text.partition(":")
        return cls(kind, name)

    @classmethod
    def workload(cls, name: str) -> "Owner":
        return cls("workload", name)


ENVOY_OWNER = Owner("envoy")   # the Envoy cgroup tree's hooks (set up at start)


@dataclass(frozen=True)
class Links:
    owner: Owner
    cgroup_path: str
    hooks: tuple[str, ...] = WORKLOAD_HOOKS
    netns: str = ""     # a container's own namespace: sk_lookup is linked there too


@dataclass(frozen=True)
class WorkloadPlan:
    name: str
    id: int
    cgroup: str | None = None       # relative to the cgroup2 root, once found
    cgroup_path: str | None = None
    cgroup_id: int = 0
    enrolled: bool = False          # else waiting (no cgroup yet, or its links failed)
    enrolled_since: float = 0.0     # time.time() when enrolled on this cgroup
    error: str = ""


@dataclass(frozen=True)
class ContainerPlan:
    """A Podman container recorded by the OCI hook, and whether it is meshed."""
    id: str
    workload: str
    workload_id: int = 0
    name: str = ""
    cgroup: str = ""
    cgroup_path: str = ""
    cgroup_id: int = 0
    netns: str = ""                 # its own namespace's path; "" = the served one
    netns_cookie: int = 0
    index: int = 0                  # connect4 binds CONTAINER_NET4 | index there
    ipv4: str = ""
    enrolled: bool = False
    enrolled_since: float = 0.0
    error: str = ""
    selected_by: str = ""           # "" = its annotation (the hook); "name", "label", "unit"

    @property
    def short_id(self) -> str:
        return self.id[:12]


@dataclass(frozen=True)
class Inbound:
    """Datapath.set_inbound's arguments, by workload id (0 = all)."""
    explicit: dict[int, frozenset[int]] = field(default_factory=dict)
    auto: frozenset[int] = frozenset()
    excluded: dict[int, frozenset[int]] = field(default_factory=dict)
    discovered: dict[int, frozenset[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvoyInput:
    """envoy_config.render's arguments but the per-workload ports, which the
    kernel's inbound_ports map holds (sockops adds them on listen())."""
    outbound_port: int
    inbound_port: int
    state_dir: str
    ipv6: bool
    client_mark: int
    workload_ids: tuple[int, ...]                     # enrolled: each gets its filter chains
    protocols: dict[int, str] = field(default_factory=dict)
    workload_protocols: dict[int, dict[int, str]] = field(default_factory=dict)
    forwarded_for: bool = False
    # container namespaces: (listener key, namespace path, workload id), one a pod
    containers: tuple[tuple[str, str, int], ...] = ()
    access_log: bool = True   # Envoy streams flow records to meshd (off: flow_logs = "off")
    mtls: MtlsInput | None = None    # identities on (mesh.trust_domain)


@dataclass(frozen=True)
class Plan:
    workloads: tuple[WorkloadPlan, ...] = ()
    links: tuple[Links, ...] = ()
    ids: dict[str, int] = field(default_factory=dict)          # name -> id, to persist
    cgroup_ids: dict[int, int] = field(default_factory=dict)   # cgroup id -> workload id
    excluded_ports: dict[int, frozenset[int]] = field(default_factory=dict)
    excluded_cidrs: dict[int, frozenset] = field(default_factory=dict)
    inbound: Inbound = Inbound()
    envoy: EnvoyInput | None = None
    containers: tuple[ContainerPlan, ...] = ()
    container_netns: dict[int, tuple[int, str]] = field(default_factory=dict)  # cookie -> (index, ipv4)

    def workload(self, name: str) -> WorkloadPlan | None:
        return next((w for w in self.workloads if w.name == name), None)

    def container(self, cid: str) -> ContainerPlan | None:
        return next((c for c in self.containers if c.id == cid), None)

    def enrolled_on(self, name: str, cgroup_id: int) -> bool:
        """Was this workload enrolled on this very cgroup?"""
        w = self.workload(name)
        return bool(w and w.enrolled and w.cgroup_id == cgroup_id)


EMPTY = Plan()


def allocate_ids(names: list[str], ids: dict[str, int]) -> dict[str, int]:
    """An id per name: kept if it has one, else the lowest free one. When none
    is free, ids of names no longer configured are recycled."""
    ids = dict(ids)
    for name in names:
        if name in ids:
            continue
        free = _lowest_free(ids)
        if free is None:
            ids = {k: v for k, v in ids.items() if k in names}
            free = _lowest_free(ids)
            if free is None:
                raise PlanError(f"more than {maplayout.MAX_WORKLOADS - 1} workloads")
        ids[name] = free
    return ids


def _lowest_free(ids: dict[str, int]) -> int | None:
    used = set(ids.values())
    return next((i for i in range(1, maplayout.MAX_WORKLOADS) if i not in used), None)


def plan(config: Config, world: World, ids: dict[str, int], previous: Plan = EMPTY,
         now: float = 0.0, failed: dict[str, str] | None = None,
         remotes: tuple[Remote, ...] = ()) -> Plan:
    """What to apply. `previous` is the plan applied last (enrolment times, and
    which workloads are newly enrolled); `failed` maps a workload to why its
    links could not be attached (it then waits, like one without a cgroup);
    `remotes`: meshed workloads on other hosts (the catalog), called with mTLS."""
    failed = failed or {}
    mesh = config.mesh
    ids = allocate_ids([w.name for w in config.workloads], ids)

    workloads, links = [], []
    for w in config.workloads:
        found = world.cgroups.get(w.name)
        wid = ids[w.name]
        if found is None:
            workloads.append(WorkloadPlan(
                w.name, wid, error=(f"waiting for cgroup {w.cgroup}" if w.cgroup
                                    else f"waiting for unit {w.unit} to start" if w.unit
                                    else "selects containers only")))
            continue
        if w.name in failed:
            workloads.append(WorkloadPlan(w.name, wid, error=failed[w.name]))
            continue
        old = previous.workload(w.name)
        since = (old.enrolled_since if previous.enrolled_on(w.name, found.id) else now)
        workloads.append(WorkloadPlan(w.name, wid, found.rel, found.path, found.id, True, since))
        links.append(Links(Owner.workload(w.name), found.path))
    by_name = {p.name: p for p in workloads}
    ctrs = _containers(config, world, ids, previous, now, failed)
    namespaces = _namespaces(ctrs, world, previous)
    links += [Links(Owner("container", c.short_id), c.cgroup_path,
                    netns=c.netns if namespaces.get(c.netns_cookie) is c else "")
              for c in ctrs if c.enrolled]

    excluded_ports = {0: frozenset(mesh.exclude_outbound_ports)}
    excluded_cidrs = {0: frozenset(mesh.exclude_outbound_cidrs)}
    for w in config.workloads:
        excluded_ports[ids[w.name]] = frozenset(w.exclude_outbound_ports)
        excluded_cidrs[ids[w.name]] = frozenset(w.exclude_outbound_cidrs)

    return Plan(
        workloads=tuple(workloads), links=tuple(links), ids=ids,
        cgroup_ids={**{p.cgroup_id: p.id for p in workloads if p.enrolled},
                    **{c.cgroup_id: c.workload_id for c in ctrs if c.enrolled}},
        excluded_ports=excluded_ports, excluded_cidrs=excluded_cidrs,
        inbound=_inbound(config, world, by_name, previous),
        envoy=EnvoyInput(
            mesh.outbound_port, mesh.inbound_port, mesh.state_dir, world.ipv6_loopback,
            routing.MARK if mesh.preserve_client_address else 0,
            tuple(p.id for p in workloads if p.enrolled), dict(mesh.protocols),
            {ids[w.name]: dict(w.protocols) for w in config.workloads},
            mesh.http_forwarded_for,
            tuple((f"ns{cookie}", c.netns, c.workload_id)
                  for cookie, c in namespaces.items()),
            mesh.flow_logs != "off", _mtls(config, workloads, remotes)),
        containers=ctrs,
        container_netns={c.netns_cookie: (c.index, c.ipv4) for c in ctrs
                         if c.enrolled and c.netns})


MAX_CONTAINER_INDEX = 0xFFFF


def _containers(config: Config, world: World, ids: dict[str, int], previous: Plan,
                now: float, failed: dict[str, str]) -> tuple[ContainerPlan, ...]:
    """Each recorded container that exists: enrolled into its declared
    workload, or why not. The containers of one Podman pod share a network
    namespace, hence one index (kept while any of them lives) and one workload
    (that of the ones already enrolled there, else of the earliest recorded)."""
    declared = {w.name for w in config.workloads}
    live = [c for c in previous.containers if c.id in world.containers and c.netns_cookie]
    index_of = {c.netns_cookie: c.index for c in live if c.index}
    used = set(index_of.values())
    owner_of = {c.netns_cookie: c for c in live if c.enrolled and c.workload in declared}
    # else the earliest recorded (its record's time: the same after a restart)
    for cid, cf in sorted(world.containers.items(), key=lambda i: (i[1].record.created, i[0])):
        if cf.netns is not None and cf.netns.ipv4 and cf.record.workload in declared:
            owner_of.setdefault(cf.netns.cookie, ContainerPlan(cid, cf.record.workload))
    out = []
    for cid, cf in sorted(world.containers.items()):
        rec, old = cf.record, previous.container(cid)
        cookie = cf.netns.cookie if cf.netns else 0
        index = index_of.get(cookie, 0) if cf.netns is not None else 0
        if not index and cf.netns is not None:
            index = next((i for i in range(1, MAX_CONTAINER_INDEX + 1) if i not in used), 0)
            if index:
                used.add(index)
                index_of[cookie] = index
        base = dict(id=cid, workload=rec.workload, name=rec.name, cgroup=cf.cgroup.rel,
                    selected_by=rec.selected_by,
                    cgroup_path=cf.cgroup.path, cgroup_id=cf.cgroup.id, index=index,
                    netns=rec.netns if cf.netns else "", netns_cookie=cookie,
                    ipv4=(cf.netns.ipv4 or "") if cf.netns else "")
        error = cf.error or failed.get(f"container:{cid[:12]}", "")
        if rec.workload not in declared:
            error = f"workload {rec.workload} is not declared: not meshed"
        elif cf.netns is not None and not cf.netns.ipv4:
            error = "its network namespace has no IPv4 address: not meshed"
        elif cf.netns is not None and not index:
            error = f"more than {MAX_CONTAINER_INDEX} containers: not meshed"
        elif cf.netns is not None and not error:
            first = owner_of.setdefault(cookie, ContainerPlan(cid, rec.workload))
            if first.workload != rec.workload:
                error = (f"shares its network namespace with container {first.short_id} "
                         f"of workload {first.workload} (a pod's containers are meshed "
                         "into one workload): not meshed")
        if error:
            out.append(ContainerPlan(**base, error=error))
            continue
        since = old.enrolled_since if old and old.enrolled and old.cgroup_id == cf.cgroup.id else now
        out.append(ContainerPlan(**base, workload_id=ids[rec.workload], enrolled=True,
                                 enrolled_since=since))
    return tuple(out)


def _namespaces(ctrs: tuple[ContainerPlan, ...], world: World,
                previous: Plan) -> dict[int, ContainerPlan]:
    """By network namespace cookie, the enrolled container whose path names
    it to Envoy and whose link holds its sk_lookup: a pod's containers share
    one namespace, one listener pair, one sk_lookup link. The holder stays
    while it lives; else the container recorded first (the same choice after
    a meshd restart, so the adopted links stay as they are)."""
    held = {link.owner.name for link in previous.links if link.netns}
    out: dict[int, ContainerPlan] = {}
    for c in sorted(ctrs, key=lambda c: (c.short_id not in held,
                                         world.containers[c.id].record.created, c.id)):
        if c.enrolled and c.netns:
            out.setdefault(c.netns_cookie, c)
    return out


def _mtls(config: Config, workloads: list[WorkloadPlan],
          remotes: tuple[Remote, ...]) -> MtlsInput | None:
    """Identities for the enrolled workloads, their inbound policies (allow_from
    names resolved to SPIFFE IDs) and the remote destinations to call with mTLS."""
    mesh = config.mesh
    if not mesh.trust_domain:
        return None
    td = mesh.trust_domain
    enrolled = {p.name: p.id for p in workloads if p.enrolled}
    policies = {}
    for w in config.workloads:
        if w.name not in enrolled:
            continue
        allow = None if w.allow_from is None else tuple(sorted(
            {a if a.startswith("spiffe://") else spiffe_id(td, a) for a in w.allow_from}))
        policies[enrolled[w.name]] = LocalPolicy(
            (w.inbound_mode or mesh.inbound_mode) == "strict", allow)
    return MtlsInput(td, mesh.mtls_port, mesh.state_dir,
                     {wid: name for name, wid in enrolled.items()}, policies,
                     tuple(sorted(set(remotes), key=lambda r: (r.ip, r.port))))


def _inbound(config: Config, world: World, by_name: dict[str, WorkloadPlan],
             previous: Plan) -> Inbound:
    mesh = config.mesh
    explicit, auto, discovered = {}, set(), {}
    # Envoy's own ports are never steered inbound.
    excluded = {0: frozenset(mesh.exclude_inbound_ports)
                | {mesh.outbound_port, mesh.inbound_port}
                | ({mesh.mtls_port} if mesh.trust_domain else set())}
    for w in config.workloads:
        p = by_name[w.name]
        if not p.enrolled:
            continue
        excluded[p.id] = frozenset(w.exclude_inbound_ports)
        if w.inbound_ports is not None:
            explicit[p.id] = frozenset(w.inbound_ports)
            continue
        auto.add(p.id)
        if not previous.enrolled_on(w.name, p.cgroup_id):
            # newly enrolled: ports opened before now were not seen by sockops
            discovered[p.id] = world.listening.get(w.name, frozenset())
    return Inbound(explicit, frozenset(auto), excluded, discovered)
