"""The start latency meshd's OCI hook adds to `podman run`.

    sudo .venv/bin/python bench/podman_hook.py [--starts 50]

One meshd serving a network namespace this script makes (as the tests do),
real Podman (runc, CNI bridge in that namespace, the session storage of
tests/helpers/podman.py). Interleaved: `podman run --rm IMAGE true` annotated
io.meshd.workload=web (the hook enrolls it: Envoy opens a listener inside the
container's namespace before the hook returns), then the same unannotated (the
hook does not run). The hook itself is timed by a wrapper around
`meshd oci-hook`. Prints median and p99 of each, as Markdown.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import MESHD, Cgroups, Mesh  # noqa: E402
from helpers.common import netns_add, netns_del  # noqa: E402
from helpers.podman import IMAGE, Podman, PodmanStore  # noqa: E402


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=50)
    args = ap.parse_args()
    prefix = "mb" + uuid.uuid4().hex[:6]
    netns = netns_add(f"{prefix}h")
    cg = Cgroups(prefix, netns)
    store = mesh = podman = None
    try:
        store = PodmanStore()
        mesh = Mesh(prefix, cg, netns=netns)
        mesh.configure_mesh(protocols={})
        mesh.write("10-workloads.toml", "[workload.web]\n")
        mesh.start()
        podman = Podman(store, prefix, netns, mesh.config_dir, MESHD[0], mesh.tmp)
        timings = Path(mesh.tmp, "hook-ns")
        wrapper = Path(mesh.tmp, "timed-hook")
        wrapper.write_text(f"#!/bin/sh\nt0=$(date +%s%N)\n{MESHD[0]} \"$@\"\nrc=$?\n"
                           f"echo $(( $(date +%s%N) - t0 )) >> {timings}\nexit $rc\n")
        wrapper.chmod(0o755)
        podman.write_hook(str(wrapper), mesh.config_dir)
        with_hook, without = [], []
        for i in range(args.starts):
            for annotated, out in ((True, with_hook), (False, without)):
                t0 = time.monotonic()
                r = podman.run(f"b{i}{'a' if annotated else 'p'}", "true",
                               workload="web" if annotated else None)
                out.append((time.monotonic() - t0) * 1000)
                if r.returncode != 0:
                    raise SystemExit(r.stderr.decode())
        hook = [int(x) / 1e6 for x in timings.read_text().split()]
        st = mesh.status()
        assert len(hook) == args.starts, "the hook did not run for every annotated start"
        assert not st.get("containers"), "containers left enrolled"
        print(f"| {args.starts} starts, interleaved | median (ms) | p99 (ms) |")
        print("|---|---:|---:|")
        for name, xs in (("`podman run --rm` annotated (hook runs)", with_hook),
                         ("`podman run --rm` not annotated", without),
                         ("the hook alone (`meshd oci-hook`)", hook)):
            print(f"| {name} | {statistics.median(xs):.0f} | {p99(xs):.0f} |")
        print(f"| added by the hook (difference of medians) | "
              f"{statistics.median(with_hook) - statistics.median(without):.0f} | |")
        return 0
    finally:
        if podman:
            podman.cleanup()
        if mesh:
            mesh.teardown()
        if store:
            store.remove()
        cg.cleanup()
        netns_del(netns)


if __name__ == "__main__":
    sys.exit(main())
