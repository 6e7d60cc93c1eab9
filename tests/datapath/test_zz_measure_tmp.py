import json, time, statistics
from test_acceleration import Accel, MB, accel  # noqa

def test_measure(accel):
    res = {"on": {"p50": [], "p99": [], "mbps": []}, "off": {"p50": [], "p99": [], "mbps": []}}
    order = ["on", "off"]
    for rep in range(5):
        for mode in (order if rep % 2 == 0 else order[::-1]):
            accel.set_acceleration(mode == "on")
            r = accel.client("rtt", 3000)
            res[mode]["p50"].append(r["p50_us"]); res[mode]["p99"].append(r["p99_us"])
            t0 = time.perf_counter()
            out = accel.client("source", 512 * MB, timeout=300)
            dt = time.perf_counter() - t0
            assert out["n"] == 512 * MB
            res[mode]["mbps"].append(512 * 8 / dt)
    summary = {m: {k: (round(statistics.median(v), 1), [round(x, 1) for x in v]) for k, v in d.items()} for m, d in res.items()}
    out = accel.client("pause", 3, 24 * MB, timeout=120)
    summary["sent_during_pause"] = out.get("sent_during_pause")
    summary["counters"] = accel.counters()
    open("/tmp/h-accel-measure.json", "w").write(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
