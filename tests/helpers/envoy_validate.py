"""``envoy --mode validate`` on the configuration meshd renders, LDS and CDS included.

A test helper, not part of meshd: meshd never validates at run time (a rendered file is
only as good as the renderer, which these tests hold to Envoy's own validator)."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile


def static_equivalent(bootstrap: dict) -> dict:
    """The bootstrap with its filesystem LDS/CDS inlined as static resources.

    ``envoy --mode validate`` does not read filesystem xDS files at all (it reports OK even
    when they are missing), so to validate what Envoy will really load we inline them."""
    out = dict(bootstrap)
    dyn = dict(out.pop("dynamic_resources", {}) or {})
    static = dict(out.get("static_resources") or {})
    for key, kind in (("lds_config", "listeners"), ("cds_config", "clusters")):
        src = dyn.pop(key, None)
        if src is None:
            continue
        pcs = src.get("path_config_source")
        path = pcs.get("path") if pcs else src.get("path")
        if not path:
            raise ValueError(f"{key}: only filesystem config sources can be validated")
        with open(path) as f:
            doc = json.load(f)
        resources = [{k: v for k, v in r.items() if k != "@type"}
                     for r in doc.get("resources", [])]
        static[kind] = list(static.get(kind, [])) + resources
    if dyn:
        out["dynamic_resources"] = dyn
    if static:
        out["static_resources"] = static
    return out


def validate(binary: str, bootstrap_path: str, timeout: float = 60.0) -> tuple[bool, str]:
    """Run ``envoy --mode validate`` on the bootstrap *and* the LDS/CDS files it names;
    (passed, Envoy's output)."""
    try:
        with open(bootstrap_path) as f:
            combined = static_equivalent(json.load(f))
    except (OSError, ValueError) as e:
        return False, f"{bootstrap_path}: {e}"
    with tempfile.TemporaryDirectory(prefix="meshd-validate-") as tmp:
        path = os.path.join(tmp, "validate.json")
        with open(path, "w") as f:
            json.dump(combined, f)
        try:
            proc = subprocess.run(
                [binary, "--mode", "validate", "-c", path, "-l", "warning",
                 "--disable-hot-restart"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"{binary}: {e}"
    out = proc.stdout.decode(errors="replace").replace(path, bootstrap_path)
    return proc.returncode == 0, out
