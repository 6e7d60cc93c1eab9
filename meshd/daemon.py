"""The daemon: one GLib main loop whose events end in discover -> plan -> apply.

Event sources on the loop: inotify (config directory, workload cgroups),
signals, the Envoy supervisor's pidfd, and timers (status, rescan, watchdog).
Every change ends in reconcile(): meshd/discovery.py looks, meshd/plan.py
decides, meshd/apply.py makes the kernel and Envoy's files match (idempotent),
and the status (meshd/status.py) is written from the result.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

from . import (__version__, acceleration, cgroups, containers, envoy_config, flows, maplayout,
               notify, routing, sources, statefiles)
from .apply import Applier
from .config import Config, ConfigError, ConfigInvalid, load_config
from .datapath import ENVOY_HOOKS, DatapathError
from .discovery import Discovery
from .envoy import admin as envoy_admin
from .envoy import identity as envoy_identity
from .envoy import systemd_manager, systemd_unit
from .envoy.child import EnvoySupervisor
from .envoy.supervisor import RUNNING as ENVOY_RUNNING
from .footprint import NETNS_SELF, Footprint, FootprintError
from .fsutil import atomic_write
from .inotify import Inotify
from .plan import EMPTY, ENVOY_OWNER, Plan, PlanError, plan
from .status import (AccelerationStatus, ContainerStatus, DatapathStatus, EnvoyStatus,
                     MeshSettings, Status,
                     WorkloadEnvoy, WorkloadStatus, status_path)
from .ca import CAError
from .meshidentity import IdentityService

log = logging.getLogger("meshd")

# Keys that name where an instance lives: changing them live would orphan pins,
# cgroups or files, so a reload keeps the running values and says so.
RESTART_ONLY = ("bpffs_dir", "state_dir", "cgroup_root", "netns", "envoy_binary",
                "metrics_address", "max_connections", "max_exclusions", "max_inbound_ports")
STATUS_INTERVAL_MS = 1000
RESCAN_INTERVAL_MS = 5000
SELECT_INTERVAL_MS = 1000   # containers selected by name, label or unit: seen within a second
HOOK_WAIT_MS = 4000      # the hook fails open after this (its own timeout is longer)
HOOK_POLL_MS = 5


class StartupError(Exception):
    pass


def _user_of(pid) -> str:
    """Who a process runs as (its /proc directory belongs to its effective uid)."""
    import pwd
    try:
        uid = os.stat(f"/proc/{int(pid)}").st_uid
    except (OSError, TypeError, ValueError):
        return ""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def workload_envoy_stats(stats: dict[str, int], wid: int) -> WorkloadEnvoy:
    """A workload's numbers from its own filter chains (envoy_config.py names
    them <direction>_<http|tcp>_<id>). Bytes are from the workload's side:
    sent = what it wrote (outbound requests, inbound responses)."""
    out = dict(connections=0, requests=0, bytes_sent=0, bytes_received=0)
    for d in ("outbound", "inbound"):
        for kind in ("http", "tcp"):
            p = f"{kind}.{d}_{kind}_{wid}."
            out["connections"] += stats.get(p + "downstream_cx_total", 0)
            out["requests"] += stats.get(p + "downstream_rq_total", 0)
            rx, tx = stats.get(p + "downstream_cx_rx_bytes_total", 0), stats.get(
                p + "downstream_cx_tx_bytes_total", 0)
            out["bytes_sent"] += rx if d == "outbound" else tx
            out["bytes_received"] += tx if d == "outbound" else rx
    return WorkloadEnvoy(**out)


class Daemon:
    def __init__(self, config_dir: str):
        self.config_dir = os.path.abspath(config_dir)
        self.config: Config | None = None
        self.config_errors: list[ConfigError] = []
        self.cg_root = cgroups.cgroup2_mount()
        self.plan: Plan = EMPTY
        self.discovery = Discovery(self.cg_root)
        self.state = "starting"
        self.started = time.time()
        self.ready = False
        self._timers: dict[str, int] = {}
        self._route_sources: dict = {}
        self._netlink = None
        self.accel = acceleration.Decision(False, "not applied yet")
        self._cgroup_watches: dict[str, int] = {}
        self.bus = None  # meshd.bus.BusService once the main loop runs
        self._status_error = ""
        self.hooks = None  # meshd.hookserver.HookServer once the main loop runs
        self._enroll_waiting: list = []   # (container id, reply) from the hook
        self.selector = None  # meshd.podmanselect.Selector, made at the first reconcile
        # observability (meshd/flows.py, flowlog.py, observe.py, metrics.py)
        self.reloads = {"ok": 0, "rejected": 0}
        self.flow_receiver = self.flowlog = self.observer = self.metrics = None
        self._workload_names: dict[int, str] = {}
        self._last_stats: dict[str, int] = {}
        self._snapshot = None
        self._restarts_without_flows = 0
        self.identity: IdentityService | None = None   # mesh.trust_domain set
        self._table_full = 0   # the table_full counter when last logged

    # -- start-up -------------------------------------------------------------
    def start(self) -> None:
        try:
            self.config = load_config(self.config_dir)
        except ConfigInvalid as e:
            raise StartupError("the configuration is invalid:\n" +
                               "\n".join(f"  {err}" for err in e.errors)) from None
        mesh = self.config.mesh
        self.footprint = fp = Footprint(mesh)
        fp.enter_netns()   # first: Envoy, the links and every socket live there
        fp.lock()
        # a container whose namespace is this one (--network host) is a host process
        self.discovery.own_netns_inode = os.stat(NETNS_SELF).st_ino
        binary = fp.envoy_binary()

        self.dp = fp.datapath()
        try:
            how = self.dp.open()
        except (DatapathError, OSError) as e:
            raise StartupError(f"cannot set up the eBPF data path: {e}") from None
        log.info("data path %s at %s", how, self.dp.root)
        # Before touching anything: one instance per network namespace.
        others = self.dp.other_meshd_in_netns(NETNS_SELF)
        if others:
            raise StartupError(
                f"another meshd instance already serves this network namespace (its sk_lookup "
                f"program id {others[0]}); run one instance per namespace (mesh.netns)")

        # Envoy's cgroup tree: its sockets get the getsockopt and listener hooks,
        # and its upstream connections are never steered (not a workload cgroup).
        # The hooks sit on the root of the tree, before Envoy starts below it (as
        # a child in <root>/envoy, or as a systemd unit in the slice), so its very
        # first listen() is seen.
        own_root = fp.cgroup_tree(self.cg_root)
        # Under systemd (PID 1, bus reachable, cgroup_root a slice such as
        # /meshd.slice) Envoy is the transient unit meshd-envoy.service in that
        # slice; otherwise a child process in <cgroup_root>/envoy.
        slice_name = systemd_unit.slice_for_cgroup_root(mesh.cgroup_root)
        systemd = systemd_manager.connect() if slice_name else None
        # As a unit, systemd switches Envoy's user; as a child, setpriv does, with ours.
        self.envoy_identity = ident = envoy_identity.resolve(
            binary, mesh.state_dir, (mesh.outbound_port, mesh.inbound_port),
            switch=systemd is not None or envoy_identity.can_switch_user())
        if ident.is_root:
            log.warning("Envoy runs as root: %s", ident.why_root)
        else:
            log.info("Envoy runs as %s with %s only", ident.user, " ".join(ident.capabilities))
        envoy_identity.prepare_run_dir(statefiles.path(mesh.state_dir, statefiles.ENVOY_RUN_DIR))
        cgroups.ensure(own_root)
        self.dp.attach(str(ENVOY_OWNER), own_root, ENVOY_HOOKS)
        self.envoy_cgroup = os.path.join(own_root, "envoy")
        if systemd is None:   # systemd creates the unit's cgroup itself
            cgroups.ensure(self.envoy_cgroup)
        # Inbound steering for the network namespace this instance serves.
        try:
            self.dp.attach_netns(NETNS_SELF)
        except OSError as e:
            raise StartupError(f"cannot attach sk_lookup to the network namespace: {e} "
                               "(needs Linux >= 5.9 with CONFIG_BPF_SYSCALL)") from None
        self.applier = Applier(self.dp, mesh.state_dir)
        envoy_knows_flows = envoy_config.bootstrap_has_flows(mesh.state_dir)
        if mesh.trust_domain:
            # GLib's first import happens here, before the catalog thread can
            # race it: a concurrent first import in two threads leaves one of
            # them a GLib without its overrides (no GLib.IO_IN, seen at start).
            from gi.repository import GLib  # noqa: F401
            self.identity = IdentityService(self.config, self._on_catalog_change)
            try:
                self.identity.start()
            except CAError as e:
                raise StartupError(f"mesh.trust_domain is set but {e} "
                                   "(docs/identity.md: meshd ca issue-intermediate)") from None
        try:
            self.apply()
        except routing.RoutingError as e:
            raise StartupError(f"{e} (or set mesh.preserve_client_address = false)") from None

        if systemd is not None:
            self.envoy = systemd_unit.SystemdEnvoySupervisor(
                binary, mesh.state_dir, slice_name, mesh.envoy_log_level, self._on_envoy_state,
                unit_name=systemd_unit.unit_name_for(mesh.state_dir), netns=mesh.netns,
                manager=systemd, identity=ident)
            log.info("Envoy runs as %s in %s", self.envoy.unit_name, slice_name)
        else:
            self.envoy = EnvoySupervisor(binary, mesh.state_dir, self.envoy_cgroup,
                                         mesh.envoy_log_level, self._on_envoy_state,
                                         identity=ident)
        self.envoy.start()
        if self.envoy.adopted and not envoy_knows_flows:
            log.warning("Envoy was started by an older meshd: no flow records until it restarts")
            self.applier.flows_ok = False
            self.applier.render_envoy()
            self._restarts_without_flows = self.envoy.restarts

    # -- applying the config --------------------------------------------------
    def apply(self) -> None:
        """The mesh-wide settings, then the workloads (reconcile)."""
        mesh = self.config.mesh
        self.footprint.policy_routing(mesh.preserve_client_address)
        self._decide_acceleration(mesh.acceleration)
        self.dp.set_settings(mesh.outbound_port, mesh.inbound_port, self.accel.active)
        self._update_route_sources()
        self.reconcile()

    def _decide_acceleration(self, mode: str) -> None:
        """Whether sockops/sk_msg accelerate local pairs from now on. Turning it
        off or on touches no established connection's data (sk_msg.c's latch);
        a refusal (kernel not on the allowlist) is logged as an error."""
        new = acceleration.decide(mode)
        if new != self.accel:
            if mode == "on" and not new.active:
                log.error("socket acceleration %s", new.reason)
            else:
                log.info("socket acceleration %s (%s)", "on" if new.active else "off", new.reason)
        self.accel = new

    def _update_route_sources(self) -> None:
        """The source addresses getsockname shows steered sockets follow the
        namespace's routes (checked every status tick)."""
        if self._netlink is None:   # one socket for the daemon's life, in the served netns
            self._netlink = sources.netlink()
        table = sources.route_sources(self._netlink)
        if table != self._route_sources:
            self.dp.set_route_sources(table)
            self._route_sources = table

    def reconcile(self) -> None:
        """discover -> plan -> apply: make links, workload ids, exclusions,
        inbound ports and Envoy's files match config + existing cgroups."""
        cfg, previous = self.config, self.plan
        self._select_containers(cfg)
        self.records = containers.load_all(cfg.mesh.state_dir)
        world = self.discovery.scan(
            cfg.workloads, lambda name, cgid: not previous.enrolled_on(name, cgid),
            self.records.values())
        now, failed = time.time(), {}
        remotes = self.identity.remotes() if self.identity else ()
        for _ in range(len(cfg.workloads) + 1):   # each round drops >= 1 failed workload
            p = plan(cfg, world, self.applier.ids, previous, now, failed, remotes)
            if self.identity:   # the certificates exist before Envoy's files name them
                self.identity.sync_certificates(_enrolled(p))
            more = self.applier.apply(p)
            if not more:
                break
            for name, error in more.items():
                if name.startswith("container:"):
                    c = p.container(next(i for i in world.containers if i[:12] == name[10:]))
                    log.warning("container %s: %s", c.short_id, error, extra=_ctr_fields(c))
                    continue
                log.warning("workload %s: %s", name, error,
                            extra={"WORKLOAD": name, "CGROUP": world.cgroups[name].rel})
            failed.update(more)
        self._log_changes(previous, p)
        self._forget_stopped(previous, p)
        self.plan = p
        self._workload_names = {w.id: w.name for w in p.workloads if w.id}
        if hasattr(self, "inotify"):
            self._update_cgroup_watches()

    @staticmethod
    def _log_changes(old: Plan, new: Plan) -> None:
        for w in new.workloads:
            before = old.workload(w.name)
            was = bool(before and before.enrolled)
            if w.enrolled and not was:
                log.info("workload %s enrolled (cgroup %s)", w.name, w.cgroup,
                         extra={"WORKLOAD": w.name, "CGROUP": w.cgroup})
            if was and not w.enrolled:
                log.info("workload %s no longer enrolled: %s", w.name, w.error,
                         extra={"WORKLOAD": w.name, "CGROUP": before.cgroup})

    def _forget_stopped(self, old: Plan, new: Plan) -> None:
        """Log container changes; a recorded container whose cgroup is gone has
        stopped: its record goes (its links, map entries and listener went with
        the plan that no longer has it)."""
        for c in new.containers:
            before = old.container(c.id)
            if c.enrolled and not (before and before.enrolled):
                log.info("container %s enrolled into workload %s (cgroup %s%s)", c.short_id,
                         c.workload, c.cgroup, f", address {c.ipv4}" if c.ipv4 else "",
                         extra=_ctr_fields(c))
            elif not c.enrolled and (before is None or before.error != c.error):
                log.warning("container %s: %s", c.short_id, c.error, extra=_ctr_fields(c))
        for cid, rec in self.records.items():
            if new.container(cid) is None:
                containers.remove(self.config.mesh.state_dir, cid)
                log.info("container %s stopped: un-enrolled from workload %s", cid[:12],
                         rec.workload, extra={"CONTAINER_ID": cid, "CONTAINER_NAME": rec.name,
                                              "WORKLOAD": rec.workload})

    # -- containers selected by name, label or unit (meshd/podmanselect.py) ----
    def _select_containers(self, cfg) -> bool:
        """Write the records of containers the workloads select; True if any changed."""
        if self.selector is None:
            from .podmanselect import Selector
            self.selector = Selector(self.discovery, cfg.mesh.state_dir, self._looked_up)
        units = {w.name: f.rel for w in cfg.workloads if w.unit
                 for f in (self.discovery.find(w),) if f is not None}
        try:
            return self.selector.scan(cfg, containers.load_all(cfg.mesh.state_dir), units)
        except OSError as e:
            log.warning("Podman container discovery: %s", e)
            return False

    def _looked_up(self) -> None:
        """A label lookup ended (worker thread): reconcile on the main loop."""
        from gi.repository import GLib
        GLib.idle_add(lambda: self._debounce("reconcile", 10, self._reconcile_logged) or False)

    def _select_tick(self) -> bool:
        """Discovery's safety net for selected containers: within a second."""
        cfg = self.config
        if any(w.container_names or w.container_labels or w.unit for w in cfg.workloads):
            if self._select_containers(cfg):
                self._debounce("reconcile", 10, self._reconcile_logged)
        return True

    # -- the OCI hook -----------------------------------------------------------
    def enroll_container(self, cid: str, reply) -> None:
        """The hook recorded a container: enroll it (batched with others that
        arrive within a few ms) and answer once Envoy listens inside it."""
        self._enroll_waiting.append((cid, reply, time.monotonic()))
        self._debounce("enroll", HOOK_POLL_MS, self._enroll_batch)

    def _enroll_batch(self) -> None:
        self._reconcile_logged()
        self._answer_hooks()

    def _answer_hooks(self) -> bool:
        from gi.repository import GLib
        waiting = []
        for cid, reply, since in self._enroll_waiting:
            c = self.plan.container(cid)
            if c is None:
                reply(False, "meshd has no record of it, or its cgroup is gone")
            elif not c.enrolled:
                reply(False, c.error)
            elif not c.netns or (self.dp.container_listening(c.netns_cookie, "OUT_V4") and
                                 self.dp.container_listening(c.netns_cookie, "IN_V4")):
                reply(True, "meshed")
            elif time.monotonic() - since > HOOK_WAIT_MS / 1000:
                log.warning("container %s: Envoy's listeners inside it are not up after %d ms; "
                            "it starts failing open (direct) until it is", c.short_id,
                            HOOK_WAIT_MS, extra=_ctr_fields(c))
                reply(False, "Envoy's listener in its namespace is not up yet (fails open)")
            else:
                waiting.append((cid, reply, since))
        self._enroll_waiting = waiting
        if waiting and "hook-poll" not in self._timers:
            self._debounce("hook-poll", HOOK_POLL_MS, self._answer_hooks)
        return False

    def reload(self, why: str) -> bool:
        try:
            cfg = load_config(self.config_dir)
        except ConfigInvalid as e:
            self.config_errors = e.errors
            self.reloads["rejected"] += 1
            for err in e.errors:
                log.error("config rejected, last good config stays: %s", err,
                          extra={"CONFIG_FILE": err.file, "CONFIG_LINE": err.line,
                                 "CONFIG_KEY": err.key})
            notify.status(self._status_line())
            if self.bus is not None:
                self.bus.config_rejected(e.errors)
            self.write_status()
            return False
        old = self.config.mesh
        kept = {k: getattr(old, k) for k in RESTART_ONLY if getattr(cfg.mesh, k) != getattr(old, k)}
        for k, v in kept.items():
            log.warning("mesh.%s changed; it takes effect when meshd restarts (keeping %r)", k, v)
        if kept:
            cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **kept))
        self.config, self.config_errors = cfg, []
        self.reloads["ok"] += 1
        if (cfg.mesh.flow_logs, cfg.mesh.flow_log_sample) != (old.flow_logs, old.flow_log_sample):
            self._open_flowlog()
        self._reload_identity(cfg)
        log.info("configuration reloaded (%s): %d workload(s)", why, len(cfg.workloads))
        self.apply()
        self.write_status()
        return True

    def _reload_identity(self, cfg: Config) -> None:
        """Identities follow the config; the catalog's endpoints and a trust
        domain switched on or off take effect at restart (as said in the log)."""
        if self.identity is None:
            if cfg.mesh.trust_domain:
                log.warning("mesh.trust_domain set; identities start when meshd restarts")
            return
        if cfg.catalog != self.identity.config.catalog or not cfg.mesh.trust_domain:
            log.warning("[catalog] or mesh.trust_domain changed; this takes effect when meshd "
                        "restarts (keeping the running ones)")
            cfg = dataclasses.replace(
                cfg, catalog=self.identity.config.catalog,
                mesh=dataclasses.replace(cfg.mesh, trust_domain=self.identity.config.mesh.trust_domain))
            self.config = cfg
        self.identity.reload(cfg)

    def _on_catalog_change(self) -> None:
        """From the catalog's thread: re-plan on the main loop."""
        from gi.repository import GLib
        GLib.idle_add(lambda: self._debounce("catalog", 50, self._reconcile_logged) and False)

    # -- main loop ------------------------------------------------------------
    def run(self) -> int:
        from gi.repository import GLib

        self.loop = GLib.MainLoop()
        self.inotify = Inotify()
        self.inotify.watch(self.config_dir)
        self._update_cgroup_watches()
        GLib.io_add_watch(self.inotify.fd, GLib.PRIORITY_DEFAULT, GLib.IO_IN, self._on_inotify)
        for sig in (signal.SIGTERM, signal.SIGINT):
            GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, self._on_stop_signal)
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGHUP, self._on_hup)
        GLib.timeout_add(STATUS_INTERVAL_MS, self._tick)
        GLib.timeout_add(RESCAN_INTERVAL_MS, self._rescan)
        GLib.timeout_add(SELECT_INTERVAL_MS, self._select_tick)
        wd_ms = notify.watchdog_interval_ms()
        if wd_ms:
            GLib.timeout_add(wd_ms, lambda: notify.send("WATCHDOG=1") or True)
        self._start_observability()
        from .bus import BusService
        self.bus = BusService(self)
        self.bus.publish()  # False (and a warning) without a system bus: meshd works without
        from .hookserver import HookServer
        from .ocihook import socket_path
        self.hooks = HookServer(socket_path(self.config.mesh.state_dir), self.enroll_container)
        self.write_status()
        self.loop.run()
        return 0

    # -- observability ----------------------------------------------------------
    def _start_observability(self) -> None:
        """Flow records from Envoy (journal/file, `meshd observe`) and the
        metrics endpoint. Each part that cannot start is logged and left off:
        traffic and the rest of meshd do not depend on them."""
        mesh = self.config.mesh
        from .observe import ObserveServer
        try:
            self.observer = ObserveServer(statefiles.path(mesh.state_dir,
                                                          statefiles.OBSERVE_SOCKET))
            self._open_flowlog()
            self.flow_receiver = flows.FlowReceiver(
                envoy_config.flows_socket_path(mesh.state_dir), self._on_flow_records)
        except (OSError, ImportError) as e:
            log.warning("flow records are off: %s", e)
        if mesh.metrics_address:
            try:
                from .metrics import MetricsServer
                self.metrics = MetricsServer(mesh.metrics_address, lambda: self._snapshot,
                                             envoy_config.admin_socket_path(mesh.state_dir))
                log.info("metrics on %s", mesh.metrics_address)
            except (OSError, ImportError) as e:
                log.warning("metrics are off: cannot serve %s: %s", mesh.metrics_address, e)

    def _open_flowlog(self) -> None:
        from .flowlog import FlowLog
        if self.flowlog is not None:
            self.flowlog.close()
        mesh = self.config.mesh
        self.flowlog = FlowLog(mesh.flow_logs, mesh.flow_log_sample, mesh.state_dir,
                               unit=getattr(self.envoy, "unit_name", ""))

    def _on_flow_records(self, batch: list) -> None:
        name = self._workload_names.get
        try:
            records = [r for r in (flows.record(raw, name) for raw in batch) if r is not None]
            self.observer.publish(records)
            self.flowlog.write(records)
        except Exception:   # never lose the receiver's watch to one bad record
            log.exception("flow records: a batch was dropped")

    def _stop_observability(self) -> None:
        for part in (self.flow_receiver, self.observer, self.flowlog, self.metrics):
            if part is not None:
                part.close()

    def _debounce(self, name: str, ms: int, fn) -> None:
        from gi.repository import GLib
        if name in self._timers:
            return

        def fire():
            del self._timers[name]
            fn()
            return False
        self._timers[name] = GLib.timeout_add(ms, fire)

    def _on_inotify(self, fd, cond) -> bool:
        config_changed = cgroups_changed = False
        for path, _mask, name in self.inotify.read():
            if path == self.config_dir:
                config_changed = config_changed or name.endswith(".toml") or not name
            else:
                cgroups_changed = True
        if config_changed:  # editors write in bursts: apply once it settles
            self._debounce("reload", 100, lambda: self.reload("config directory changed"))
        if cgroups_changed:
            self._debounce("reconcile", 50, self._reconcile_logged)
        return True

    def _reconcile_logged(self) -> None:
        try:
            self.reconcile()
        except Exception:
            log.exception("reconcile failed; will retry on the next event or rescan")

    def _update_cgroup_watches(self) -> None:
        """Watch where each configured cgroup is (or will appear), then rescan:
        a cgroup created between the scan and the watch is not missed."""
        want = (self.discovery.watch_dirs(self.config.workloads)
                | self.discovery.container_watch_dirs(getattr(self, "records", {}).values())
                | (self.selector.parents if self.selector is not None else set()))
        added = False
        for d in set(self._cgroup_watches) - want:
            self.inotify.unwatch(self._cgroup_watches.pop(d))
        for d in want - set(self._cgroup_watches):
            try:
                self._cgroup_watches[d] = self.inotify.watch(d)
                added = True
            except OSError as e:
                log.debug("cannot watch %s: %s", d, e)
        if added:
            self._debounce("reconcile", 10, self._reconcile_logged)

    def _rescan(self) -> bool:
        self._reconcile_logged()  # a safety net for events inotify cannot see
        return True

    def _tick(self) -> bool:
        self.applier.refresh_envoy()   # workloads opened or closed listeners
        if self.identity:
            try:
                self.identity.tick(_enrolled(self.plan), self.dp.inbound_ports())
            except Exception:
                log.exception("identity: renewal/registration failed; retried next second")
        self._update_route_sources()
        self._check_ready()
        self.write_status()
        return True

    def _on_hup(self) -> bool:
        self.reload("SIGHUP")
        return True

    def _on_stop_signal(self) -> bool:
        """Exit, leaving the pinned data path and Envoy serving for the next meshd."""
        log.info("stopping; the data path and Envoy stay up for the next meshd")
        notify.send("STOPPING=1")
        self.envoy.detach()
        if self.identity:
            self.identity.stop()
        self.state = "stopped"
        self.write_status()
        if self.bus is not None:
            self.bus.close()
        if self.hooks is not None:
            self.hooks.close()
        if self.selector is not None:
            self.selector.close()
        self._stop_observability()
        self.dp.close()
        self.loop.quit()
        return False

    def _on_envoy_state(self, state: str) -> None:
        log.info("Envoy is %s", state)
        if (not self.applier.flows_ok and state == ENVOY_RUNNING
                and self.envoy.restarts > self._restarts_without_flows):
            self.applier.flows_ok = True    # restarted from the current bootstrap
            self.applier.render_envoy()
        self._check_ready()
        self.write_status()

    def _check_ready(self) -> None:
        up = self.envoy.state == ENVOY_RUNNING and self.dp.envoy_listening()["ipv4"]
        self.state = "running" if up else "degraded"
        if up and not self.ready:
            self.ready = True
            notify.send("READY=1")
        notify.status(self._status_line())

    def _status_line(self) -> str:
        n = sum(1 for w in self.plan.workloads if w.enrolled)
        line = f"{n}/{len(self.plan.workloads)} workloads enrolled; Envoy {self.envoy.state}"
        if self.envoy.state != ENVOY_RUNNING:
            line += " (workloads fail open: direct connections)"
        if self.config_errors:
            line += f"; config REJECTED ({len(self.config_errors)} errors), last good config in force"
        return line

    # -- status ---------------------------------------------------------------
    def status(self) -> Status:
        """What this meshd knows now, as the status model (meshd/status.py)."""
        live = bool(self.dp.maps)   # the maps are closed once meshd is stopping
        ids = [0] + [w.id for w in self.plan.workloads]
        counters = self.dp.counters(ids) if live else {}

        def row(wid: int) -> dict[str, int]:  # every name, zeros included
            return {name: counters.get(wid, {}).get(name, 0) for name in maplayout.COUNTERS}
        stats = self._envoy_stats()
        inbound = self.dp.inbound_ports() if live else {}
        ctr_ports = self.dp.container_ports() if live else {}
        mesh = self.config.mesh
        return Status(
            version=__version__, pid=os.getpid(), state=self.state, updated=time.time(),
            started=self.started, config_dir=self.config_dir,
            config_files=tuple(self.config.files), config_errors=tuple(self.config_errors),
            mesh=MeshSettings(
                outbound_port=mesh.outbound_port, inbound_port=mesh.inbound_port,
                exclude_outbound_ports=tuple(mesh.exclude_outbound_ports),
                exclude_outbound_cidrs=tuple(str(c) for c in mesh.exclude_outbound_cidrs),
                bpffs_dir=mesh.bpffs_dir, state_dir=mesh.state_dir,
                cgroup_root=mesh.cgroup_root),
            envoy=EnvoyStatus(
                state=self.envoy.state, pid=self.envoy.pid, adopted=self.envoy.adopted,
                restarts=self.envoy.restarts, user=_user_of(self.envoy.pid),
                admin_socket=envoy_config.admin_socket_in_use(mesh.state_dir),
                listeners=self.dp.envoy_listening() if live else {}),
            datapath=DatapathStatus(
                pins=self.dp.root, adopted=self.dp.adopted,
                links=tuple(self.dp.pinned_links()) if live else (),
                tracked_connections=self.dp.tracked_connections() if live else 0),
            acceleration=AccelerationStatus(
                mode=mesh.acceleration, active=self.accel.active, kernel=os.uname().release,
                reason=self.accel.reason,
                counters=self.dp.accel_counters() if live else
                {n: 0 for n in maplayout.ACCEL_COUNTERS}),
            counters=row(0),
            workloads=tuple(WorkloadStatus(
                name=w.name, id=w.id, cgroup=w.cgroup, cgroup_id=w.cgroup_id,
                enrolled_since=w.enrolled_since, error=w.error,
                other_programs={h: tuple(ids) for h, ids in
                                self.applier.foreign.get(w.name, {}).items()} if w.enrolled else {},
                counters=row(w.id), inbound_ports=tuple(inbound.get(w.id, ())),
                envoy=workload_envoy_stats(stats, w.id),
                **(self.identity.workload_fields(w.name) if self.identity else {}))
                for w in self.plan.workloads),
            containers=tuple(ContainerStatus(
                id=c.id, name=c.name, workload=c.workload, cgroup=c.cgroup,
                network="host" if not c.netns else c.netns, addresses=(c.ipv4,) if c.ipv4 else (),
                inbound_ports=tuple(ctr_ports.get(c.ipv4, ())) if c.enrolled else (),
                enrolled_since=c.enrolled_since, error=c.error,
                counters=row(c.workload_id) if c.workload_id else {},
                selected_by=c.selected_by or "annotation")
                for c in self.plan.containers) + tuple(ContainerStatus(
                    id=r.id, name=r.name, workload=r.workload, network="rootless",
                    error=r.error)
                    for r in (self.selector.rootless.values() if self.selector else ())),
            **({"identity": self.identity.status()} if self.identity else {}))

    def _envoy_stats(self) -> dict[str, int]:
        if self.envoy.state != ENVOY_RUNNING:
            self._last_stats = {}
            return {}
        try:
            self._last_stats = envoy_admin.stats(
                envoy_config.admin_socket_in_use(self.config.mesh.state_dir), timeout=0.5)
        except (OSError, ValueError) as e:
            log.debug("Envoy stats: %s", e)
            self._last_stats = {}
        return self._last_stats

    def write_status(self) -> None:
        """status.json and the D-Bus properties, from one Status."""
        st = self.status()
        self._log_table_full(st.host_counters().get("table_full", 0))
        try:
            atomic_write(status_path(self.config.mesh.state_dir), st.to_json())
        except OSError as e:
            if str(e.strerror) != self._status_error:   # once, not every second
                log.warning("cannot write status: %s", e)
            self._status_error = str(e.strerror)
        else:
            self._status_error = ""
        if self.bus is not None:
            self.bus.update(st)
        from .metrics import Snapshot
        fl, rx = self.flowlog, self.flow_receiver
        self._snapshot = Snapshot(   # one reference swap: the scrape thread reads it whole
            status=st, envoy_stats=self._last_stats, reloads=dict(self.reloads),
            maps=self.dp.map_fill(st.datapath.tracked_connections) if self.dp.maps else {},
            flows={"received": rx.received if rx else 0, "logged": fl.written if fl else 0,
                   "log_failed": fl.failed if fl else 0})


    def _log_table_full(self, total: int) -> None:
        """The connection maps' fallback is counted in BPF; say it in the log too."""
        if total > self._table_full:
            log.warning("%d more connection(s) went direct, not through Envoy: the connection "
                        "maps are full (mesh.max_connections = %d; counter table_full = %d)",
                        total - self._table_full, self.config.mesh.max_connections, total)
        self._table_full = total


def _ctr_fields(c) -> dict:
    """Journal fields of a log line about a container."""
    return {"CONTAINER_ID": c.id, "CONTAINER_NAME": c.name, "WORKLOAD": c.workload,
            "CGROUP": c.cgroup}
def _enrolled(p: Plan) -> dict[str, int]:
    return {w.name: w.id for w in p.workloads if w.enrolled}


def run(config_dir: str) -> int:
    try:
        d = Daemon(config_dir)
        d.start()
    except (StartupError, FootprintError, PlanError, cgroups.CgroupError) as e:
        log.error("%s", e)
        return 1
    return d.run()
