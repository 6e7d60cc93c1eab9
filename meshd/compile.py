"""Installing a build of the data path under the pins: the only module that imports BCC.

It runs as a short-lived child (`python -m meshd.compile`, started by
Datapath.open), so BCC's compiler (some 150 MB resident) never stays in the
daemon, which adopts what this pinned through libbpf.

The same steps serve a first install and an upgrade (pins of another build):
- a pinned map whose type, sizes and flags are what this build declares is
  reused as it is (BCC opens the pin), contents and all;
- a missing map is created and pinned by BCC;
- a map whose layout changed (a new size, say) is created beside the old one
  and the old one's entries are copied in, before and again after the swap;
- every pinned link is switched to its hook's new program with BPF_LINK_UPDATE:
  the hook is never without a program, and both builds share the reused maps;
- the program pins are replaced, and the build's hash goes into `meta` last,
  so an upgrade interrupted anywhere is done again at the next start.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import sys

from . import bpfsys, maplayout
from .bpfmap import Map
from .datapath import HOOKS, DatapathError, check_kernel, link_hook, program_text, source_hash

log = logging.getLogger("meshd.compile")

# Maps only the programs fill: entries made by the old build between the first
# copy and the swap are copied again afterwards (without overwriting newer ones).
KERNEL_FILLED = ("cookie_dst", "tuple_dst", "envoy_upstreams", "inbound_ports", "accel_state")


def layout_matches(info: bpfsys.MapInfo, spec: maplayout.MapSpec, sizes) -> bool:
    m = Map(-1, spec)
    value = m.value_size // bpfsys.possible_cpus() if spec.percpu else m.value_size
    return (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags) == (
        maplayout.MAP_TYPES[spec.kind], m.key_size, value, spec.max_entries(sizes), spec.flags)


def copy_entries(name: str, old_fd: int, new_fd: int, flags: int = bpfsys.BPF_ANY) -> int:
    """Copy a map's entries into its successor; returns how many did not fit."""
    spec = maplayout.MAPS[name]
    old, new = bpfsys.map_info(old_fd), bpfsys.map_info(new_fd)
    if (old.key_size, old.value_size) != (new.key_size, new.value_size) or spec.kind in (
            "sockmap", "sockhash"):
        log.warning("map %s: layout changed, its entries are not carried over", name)
        return 0
    m = Map(old_fd, spec)   # the sizes as the kernel wants them in a lookup (per-CPU: all)
    lost = 0
    for key in bpfsys.map_keys(old_fd, m.key_size):
        value = bpfsys.map_lookup(old_fd, key, m.value_size)
        if value is None:
            continue   # gone since the walk began
        try:
            bpfsys.map_update(new_fd, key, value, flags)
        except OSError as e:
            if e.errno != errno.EEXIST:   # EEXIST: the new build has a newer entry
                lost += 1
    return lost


class Installer:
    def __init__(self, root: str, bpf_dir: str, sizes: maplayout.MapSizes):
        self.root, self.bpf_dir, self.sizes = root, bpf_dir, sizes
        self.next = os.path.join(root, "next")   # a changed map and new programs, until the swap

    def pin(self, kind: str, name: str) -> str:
        return os.path.join(self.root, kind, name)

    def plan_maps(self) -> tuple[dict[str, str], dict[str, int]]:
        """Where each map of the new build is pinned, and the old maps to migrate."""
        paths, old = {}, {}
        for name, spec in maplayout.MAPS.items():
            pin = self.pin("maps", name)
            if not os.path.exists(pin):
                paths[name] = pin
                continue
            fd = bpfsys.obj_get(pin)
            if layout_matches(bpfsys.map_info(fd), spec, self.sizes):
                paths[name] = pin
                os.close(fd)
            else:
                paths[name] = os.path.join(self.next, "maps", name)
                old[name] = fd
        return paths, old

    def run(self) -> str:
        check_kernel()
        from bcc import BPF  # only here: the compiler stays in this short-lived process

        text = program_text(self.bpf_dir, self.sizes)
        upgrade = os.path.isdir(self.pin("progs", ""))
        shutil.rmtree(self.next, ignore_errors=True)   # what an interrupted upgrade left
        for d in ("maps", "progs", "links", "next/maps", "next/progs"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        paths, old = self.plan_maps()
        try:
            b = BPF(text=maplayout.c_pins(paths) + text,
                    cflags=["-Wno-unused-function", "-Wno-incompatible-pointer-types"])
        except Exception as e:
            raise DatapathError(f"compiling bpf/*.c failed: {e}") from e
        progs = {}
        for name, hook in HOOKS.items():
            try:
                progs[name] = b.load_func(hook.prog, hook.prog_type,
                                          attach_type=hook.attach_type).fd
            except Exception as e:
                raise DatapathError(f"the kernel refused {hook.prog}: {e}") from e
        new = {name: bpfsys.obj_get(paths[name]) for name in old}
        for name, fd in old.items():
            log.info("map %s: layout changed (size or type); migrating its entries", name)
            if lost := copy_entries(name, fd, new[name]):
                log.warning("map %s: %d entries did not fit in the new map", name, lost)
        for name, fd in progs.items():
            bpfsys.obj_pin(fd, os.path.join(self.next, "progs", name))
        self.swap_links(progs)
        for name in progs:
            os.replace(os.path.join(self.next, "progs", name), self.pin("progs", name))
        for name, fd in old.items():
            os.replace(paths[name], self.pin("maps", name))
            if name in KERNEL_FILLED:   # made by the old programs since the first copy
                copy_entries(name, fd, new[name], bpfsys.BPF_NOEXIST)
            os.close(fd)
            os.close(new[name])
        Map(bpfsys.obj_get(self.pin("maps", "meta")), maplayout.MAPS["meta"]).set(
            0, source_hash(text))
        shutil.rmtree(self.next, ignore_errors=True)
        b.cleanup()
        return "upgraded" if upgrade else "loaded"

    def swap_links(self, progs: dict[str, int]) -> None:
        """Every pinned link now runs its hook's new program (BPF_LINK_UPDATE)."""
        links_dir = self.pin("links", "")
        for name in sorted(os.listdir(links_dir)):
            fd = bpfsys.obj_get(os.path.join(links_dir, name))
            try:
                hook = link_hook(name)
                if hook in progs:
                    bpfsys.link_update(fd, progs[hook])
                    continue
                log.warning("link %s: no hook %r in this build; detached", name, hook)
                bpfsys.link_detach(fd)
                os.unlink(os.path.join(links_dir, name))
            finally:
                os.close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshd.compile",
                                 description="compile the eBPF data path and install it under "
                                             "its pins (meshd runs this; it exits when done)")
    ap.add_argument("--root", required=True, help="<bpffs_dir>/<layout>")
    ap.add_argument("--bpf-dir", required=True)
    ap.add_argument("--sizes", default="{}", help="MapSizes as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        how = Installer(args.root, args.bpf_dir,
                        maplayout.MapSizes(**json.loads(args.sizes))).run()
    except (DatapathError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(how)
    return 0


if __name__ == "__main__":
    sys.exit(main())
