"""Applying a plan: make the kernel (pinned links, BPF maps) and Envoy's files
match a meshd/plan.py Plan. Idempotent: applying the same plan twice changes
nothing (links to the same cgroup are kept, maps are synced, files are written
only when their content changes).
"""
from __future__ import annotations

import json
import logging

from . import envoy_config, statefiles
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

    def attach(self, plan: Plan) -> dict[str, str]:
        """Every planned link; returns, by workload, why one could not be
        attached (e.g. its cgroup went away since discovery looked)."""
        failed = {}
        for link in plan.links:
            try:
                self.dp.attach(str(link.owner), link.cgroup_path, link.hooks)
                self.foreign[link.owner.name] = self.dp.foreign_programs(link.cgroup_path,
                                                                         link.hooks)
            except OSError as e:
                w = plan.workload(link.owner.name)
                failed[link.owner.name] = f"cannot attach to {w.cgroup}: {e.strerror or e}"
        return failed

    def apply(self, plan: Plan) -> dict[str, str]:
        """Make everything match the plan. If a link cannot be attached, stop
        before the maps and return why: the caller plans again without it."""
        failed = self.attach(plan)
        if failed:
            return failed
        planned = {str(link.owner) for link in plan.links}
        for owner in self.dp.owners():
            if Owner.parse(owner).kind == "workload" and owner not in planned:
                self.dp.detach(owner)
                log.info("detached %s", owner)
        self.foreign = {k: v for k, v in self.foreign.items() if str(Owner.workload(k)) in planned}
        if plan.ids != self.ids:
            atomic_write(statefiles.path(self.state_dir, statefiles.WORKLOAD_IDS),
                         json.dumps(plan.ids, indent=1, sort_keys=True))
            self.ids = dict(plan.ids)
        self.dp.set_workload_ids(plan.cgroup_ids)
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
                                    e.workload_protocols, e.forwarded_for, e.mtls)
        changed = envoy_config.write_config(e.state_dir, files)
        if changed:
            log.info("Envoy configuration updated: %s", ", ".join(changed))
        self._rendered_ports = wl_ports

    def refresh_envoy(self) -> None:
        """Re-render if workloads opened or closed listeners since the last render."""
        ports = self.dp.inbound_ports()
        if {i: ports.get(i, []) for i in self._rendered_ports} != self._rendered_ports:
            self.render_envoy(ports)
