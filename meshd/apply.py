"""Applying a plan: make the kernel (pinned links, BPF maps) and Envoy's files
match a meshd/plan.py Plan. Idempotent: applying the same plan twice changes
nothing (links to the same cgroup are kept, maps are synced, files are written
only when their content changes).

The kernel side never waits for the state directory: when it cannot be written
(read-only, full) the maps and links are applied anyway, the error is logged once
with the file's path, and the files (Envoy's config, the workload ids) are written
again on every status tick until it works. Until then Envoy keeps its previous
listeners: a new workload's connections take its catch-all chains, still proxied.
"""
from __future__ import annotations

import json
import logging

from . import containers, envoy_config, routing, statefiles
from .datapath import Datapath
from .fsutil import atomic_write
from .plan import Owner, Plan

log = logging.getLogger("meshd")


def load_ids(state_dir: str) -> dict[str, int]:
    """Workload ids index the BPF counters: they are kept across restarts."""
    try:
        with open(statefiles.path(state_dir, statefiles.WORKLOAD_IDS)) as f:
            return {str(k): int(v) for k, v in json.load(f).items()}
    except (OSError, ValueError):
        return {}


class Applier:
    def __init__(self, dp: Datapath, state_dir: str):
        self.dp = dp
        self.state_dir = state_dir
        self.ids = load_ids(state_dir)
        self.foreign: dict[str, dict[str, list[int]]] = {}   # workload -> hook -> prog ids
        self._envoy = None
        self._rendered_ports: dict[int, list[int]] = {}
        self._unsaved: set[str] = set()        # "ids", "envoy": writes still to retry
        self._write_errors: set[str] = set()   # logged once each until writes work
        self._routed: set[str] = set()   # container namespaces with policy routing
        # False while the running Envoy was started from a bootstrap without the
        # flow-record cluster (an older meshd's): listeners naming it would be rejected.
        self.flows_ok = True

    def attach(self, plan: Plan) -> dict[str, str]:
        """Every planned link; returns, by workload, why one could not be
        attached (e.g. its cgroup went away since discovery looked)."""
        failed = {}
        for link in plan.links:
            try:
                self.dp.attach(str(link.owner), link.cgroup_path, link.hooks)
                if link.netns:
                    self.dp.attach_netns(link.netns, str(link.owner))
                    self._container_routing(link.netns, plan.envoy.client_mark)
                self.foreign[link.owner.name] = self.dp.foreign_programs(link.cgroup_path,
                                                                         link.hooks)
            except OSError as e:
                if link.owner.kind == "container":   # keyed "container:<short id>"
                    c = next(c for c in plan.containers if c.short_id == link.owner.name)
                    failed[str(link.owner)] = f"cannot attach to {c.cgroup}: {e.strerror or e}"
                    continue
                w = plan.workload(link.owner.name)
                failed[link.owner.name] = f"cannot attach to {w.cgroup}: {e.strerror or e}"
        return failed

    def _container_routing(self, netns: str, mark: int) -> None:
        """Inside a container's namespace, the policy routing that brings the
        application's replies to the client's address back to Envoy (as in
        the served namespace: routing.py), set once per namespace."""
        if not mark or netns in self._routed:
            return
        containers.in_netns(netns, routing.install_rules)
        self._routed.add(netns)

    def apply(self, plan: Plan) -> dict[str, str]:
        """Make everything match the plan. If a link cannot be attached, stop
        before the maps and return why: the caller plans again without it."""
        failed = self.attach(plan)
        if failed:
            return failed
        planned = {str(link.owner) for link in plan.links}
        for owner in self.dp.owners():
            if Owner.parse(owner).kind in ("workload", "container") and owner not in planned:
                self.dp.detach(owner)
                log.info("detached %s", owner)
        self.foreign = {k: v for k, v in self.foreign.items() if str(Owner.workload(k)) in planned}
        self._routed &= {link.netns for link in plan.links if link.netns}
        if plan.ids != self.ids:
            self.ids = dict(plan.ids)
            self._save_ids()
        self.dp.set_workload_ids(plan.cgroup_ids)
        self.dp.set_containers(plan.container_netns)
        self.dp.set_exclusions(plan.excluded_ports, plan.excluded_cidrs)
        i = plan.inbound
        self.dp.set_inbound(i.explicit, i.auto, i.excluded, i.discovered)
        self._envoy = plan.envoy
        self.render_envoy()
        return {}

    def render_envoy(self, ports: dict[int, list[int]] | None = None) -> None:
        """Envoy's files from the plan and the inbound ports the kernel holds
        (each enrolled workload gets its own filter chains, so Envoy counts it
        separately). Written only when they change; Envoy reloads them in place."""
        e = self._envoy
        if ports is None:
            ports = self.dp.inbound_ports()
        wl_ports = {wid: ports.get(wid, []) for wid in e.workload_ids}
        files = envoy_config.render(e.outbound_port, e.inbound_port, e.state_dir, e.ipv6,
                                    e.client_mark, wl_ports, e.protocols,
                                    e.workload_protocols, e.forwarded_for,
                                    access_log=e.access_log and self.flows_ok,
                                    containers=e.containers, mtls=e.mtls)
        try:
            changed = envoy_config.write_config(e.state_dir, files)
        except OSError as err:
            self._write_failed("envoy", envoy_config.config_dir(e.state_dir), err,
                               "Envoy keeps its previous listeners")
            return
        self._written("envoy")
        if changed:
            log.info("Envoy configuration updated: %s", ", ".join(changed))
        self._rendered_ports = wl_ports

    def refresh_envoy(self) -> None:
        """Re-render if workloads opened or closed listeners since the last render,
        or if a write failed (retried every tick until the state directory works)."""
        if "ids" in self._unsaved:
            self._save_ids()
        ports = self.dp.inbound_ports()
        if ("envoy" in self._unsaved and self._envoy is not None
                or {i: ports.get(i, []) for i in self._rendered_ports} != self._rendered_ports):
            self.render_envoy(ports)

    def _save_ids(self) -> None:
        path = statefiles.path(self.state_dir, statefiles.WORKLOAD_IDS)
        try:
            atomic_write(path, json.dumps(self.ids, indent=1, sort_keys=True))
        except OSError as err:
            self._write_failed("ids", path, err, "the ids are kept in memory")
            return
        self._written("ids")

    def _write_failed(self, what: str, path: str, err: OSError, meanwhile: str) -> None:
        self._unsaved.add(what)
        msg = f"cannot write {path}: {err.strerror or err}"
        if msg not in self._write_errors:
            self._write_errors.add(msg)
            log.error("%s; the data path is applied, %s; retrying every second", msg, meanwhile)

    def _written(self, what: str) -> None:
        if what in self._unsaved:
            self._unsaved.discard(what)
            if not self._unsaved:
                log.info("state directory %s writable again: files written", self.state_dir)
                self._write_errors.clear()
