"""Which running Podman containers the workloads select by name, by label or
by unit (`container_names`, `container_labels`, `unit`), turned into the same
per-container records the OCI hook writes, so the plan treats both alike.

Seen by discovery rather than by the hook (hooks cannot see names or labels),
so such a container is enrolled within about a second of starting and its
first connections may go direct. Each container is looked up once: its conmon
gives the name, the bundle (annotations, network namespace) and the cgroup of
the process that runs it; `podman inspect` (off the main loop, in a worker
thread) gives the labels, and only when some workload selects by label.

Rootless containers (their conmon is not root's) are detected and reported,
never touched. A container carrying the io.meshd.workload annotation is the
hook's: discovery does not write its record.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import cgroups, containers, podmanlookup
from .config import Config, Workload
from .podmanlookup import Conmon, Info

log = logging.getLogger("meshd")
LOOKUP_WORKERS = 2


@dataclass(frozen=True)
class Bundle:
    """The parts of a container's config.json discovery needs."""
    annotation: str | None     # io.meshd.workload, if set
    netns: str                 # "" = the host's (--network host)


@dataclass(frozen=True)
class Rootless:
    """A rootless container a workload would select: reported, not meshed."""
    id: str
    name: str
    uid: int
    workload: str

    @property
    def error(self) -> str:
        return (f"rootless Podman (uid {self.uid}): not meshed (meshd meshes rootful "
                "containers only)")


def _bundle(c: Conmon, pid: int) -> Bundle:
    path = os.path.join(c.bundle, "config.json")
    if os.path.getsize(path) > 16 * containers.MAX_STATE_BYTES:
        raise OSError(f"{path} is too large")
    with open(path) as f:
        spec = json.load(f)
    ann = (spec.get("annotations") or {}).get(containers.ANNOTATION)
    return Bundle(ann if isinstance(ann, str) else None,
                  containers.netns_of_bundle(c.bundle, pid) or "")


def _within(rel: str, parent: str) -> bool:
    return rel == parent or rel.startswith(parent.rstrip("/") + "/")


def select(workloads: tuple[Workload, ...], name: str, labels: dict | None,
           cgroups_of: tuple[str, ...], units: dict[str, str]) -> tuple[str, str] | None:
    """(workload, how) for the first workload, in name order, selecting this
    container by name, then by label, then by the unit its processes run in;
    labels None = not looked up yet (no label match possible yet)."""
    for w in workloads:
        if name and any(fnmatch.fnmatchcase(name, p) for p in w.container_names):
            return w.name, "name"
    for w in workloads:
        if labels is not None and w.container_labels and all(
                labels.get(k) == v for k, v in w.container_labels):
            return w.name, "label"
    for w in workloads:
        unit_cg = units.get(w.name)
        if unit_cg and any(_within(cg, unit_cg) for cg in cgroups_of if cg):
            return w.name, "unit"
    return None


class Selector:
    def __init__(self, discovery, state_dir: str, on_looked_up=lambda: None):
        """discovery: meshd.discovery.Discovery; on_looked_up() is called from a
        worker thread when a label lookup ends."""
        self.discovery, self.state_dir, self.on_looked_up = discovery, state_dir, on_looked_up
        self.cg_root = discovery.cg_root
        self.info: dict[str, Info] = {}          # container id -> looked up once
        self._pending: set[str] = set()
        self._bundles: dict[str, Bundle | None] = {}
        self.rootless: dict[str, Rootless] = {}
        self.parents: set[str] = set()           # where Podman's container cgroups are
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def scan(self, cfg: Config, records: dict[str, containers.Record],
             units: dict[str, str]) -> bool:
        """Write or remove the records of containers selected by name, label or
        unit; True if any changed. units: workload -> its unit's cgroup now."""
        selecting = [w for w in cfg.workloads
                     if w.container_names or w.container_labels or w.name in units]
        conmons = podmanlookup.conmons()   # every container, rootless ones too
        cgs = {}
        if selecting or any(r.selected_by for r in records.values()):
            cgs, self.parents = self.discovery.podman_cgroups()
        wants_labels = any(w.container_labels for w in selecting)
        changed = False
        for cid, cm in conmons.items():
            rec = records.get(cid)
            if rec is not None and not rec.selected_by:
                continue   # the hook's (annotated)
            cg = cgs.get(cid, "")
            with self._lock:
                info = self.info.get(cid)
            labels = info.labels if info is not None else None
            hit = select(tuple(selecting), cm.name, labels, (cg, cm.cgroup), units)
            if hit is None and labels is None and wants_labels and not cm.rootless:
                self._look_up(cm)
            if cm.rootless:
                self._report_rootless(cm, hit)
                continue
            if hit is None and labels is None and rec is not None and rec.selected_by == "label":
                continue   # kept until its labels are known again (after a restart)
            if hit is None or not cg:
                if rec is not None:
                    containers.remove(self.state_dir, cid)
                    log.info("container %s is no longer selected by a workload", cid[:12],
                             extra={"CONTAINER_ID": cid, "CONTAINER_NAME": cm.name,
                                    "WORKLOAD": rec.workload})
                    changed = True
                continue
            workload, how = hit
            if rec is not None and (rec.workload, rec.selected_by) == hit:
                continue
            b = self._bundle_of(cm, cg)
            if b is None or b.annotation is not None:
                continue   # unreadable, or the hook's to enroll
            pid = _first_pid(cgroups.path_of(self.cg_root, cg)) or cm.pid
            containers.save(self.state_dir, containers.Record(
                cid, workload, cg, b.netns, pid, name=cm.name, created=time.time(),
                selected_by=how))
            log.info("container %s (%s) selected by %s for workload %s", cid[:12], cm.name,
                     how, workload, extra={"CONTAINER_ID": cid, "CONTAINER_NAME": cm.name,
                                           "WORKLOAD": workload})
            changed = True
        gone = set(self.info) | set(self._bundles) | set(self.rootless)
        for cid in gone - set(conmons):
            with self._lock:
                self.info.pop(cid, None)
            self._bundles.pop(cid, None)
            self.rootless.pop(cid, None)
        return changed

    def _bundle_of(self, cm: Conmon, cg: str) -> Bundle | None:
        if cm.id not in self._bundles:
            try:
                pid = _first_pid(cgroups.path_of(self.cg_root, cg)) if cg else 0
                self._bundles[cm.id] = _bundle(cm, pid or cm.pid)
            except (OSError, ValueError) as e:
                log.warning("container %s: cannot read its bundle %s: %s", cm.id[:12],
                            cm.bundle, e, extra={"CONTAINER_ID": cm.id,
                                                 "CONTAINER_NAME": cm.name})
                self._bundles[cm.id] = None
        return self._bundles[cm.id]

    def _report_rootless(self, cm: Conmon, hit: tuple[str, str] | None) -> None:
        """Rootless containers a workload names (by annotation or name) are
        reported once in the log, and in status while they run."""
        if cm.id in self.rootless:
            return
        workload = hit[0] if hit else None
        if workload is None:
            b = self._bundle_of(cm, "")
            workload = b.annotation if b is not None else None
        if workload is None:
            return
        r = self.rootless[cm.id] = Rootless(cm.id, cm.name, cm.uid, workload)
        log.warning("container %s (%s): %s", cm.id[:12], cm.name, r.error,
                    extra={"CONTAINER_ID": cm.id, "CONTAINER_NAME": cm.name,
                           "WORKLOAD": workload})

    # -- labels, looked up once per container, off the main loop ---------------
    def _look_up(self, cm: Conmon) -> None:
        with self._lock:
            if cm.id in self._pending or cm.id in self.info:
                return
            self._pending.add(cm.id)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(LOOKUP_WORKERS, thread_name_prefix="podman-lookup")
        self._pool.submit(self._run_lookup, cm)

    def _run_lookup(self, cm: Conmon) -> None:
        info = podmanlookup.inspect(cm)
        if info.error:
            log.warning("container %s (%s): labels unknown, not selected by label: %s",
                        cm.id[:12], cm.name, info.error,
                        extra={"CONTAINER_ID": cm.id, "CONTAINER_NAME": cm.name})
        with self._lock:
            self.info[cm.id] = info
            self._pending.discard(cm.id)
        self.on_looked_up()


def _first_pid(cgroup_path: str) -> int:
    try:
        with open(os.path.join(cgroup_path, "cgroup.procs")) as f:
            line = f.readline().strip()
        return int(line) if line else 0
    except (OSError, ValueError):
        return 0
