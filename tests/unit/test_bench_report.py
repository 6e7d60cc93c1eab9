"""bench/report.py and the pure parts of bench/connect_cost.py: medians, ratios against
direct and the iptables anchor, per-rep spread, the targets, the tables."""
import ipaddress
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import connect_cost  # noqa: E402
import report  # noqa: E402


def row(rep, path, mode, **figs):
    r = {k: None for k in report.FIGURE_KEYS}
    r.update(rep=rep, path=path, mode=mode, **figs)
    return r


RESULTS = [
    row(0, "egress", "direct", rps=40000, cpu_us_per_req=30, p99_us=100),
    row(0, "egress", "iptables", rps=10000, cpu_us_per_req=200, p99_us=400),
    row(0, "egress", "meshd", rps=12000, cpu_us_per_req=160, p99_us=300),
    row(1, "egress", "direct", rps=42000, cpu_us_per_req=28, p99_us=120),
    row(1, "egress", "iptables", rps=8000, cpu_us_per_req=220, p99_us=500),
    row(1, "egress", "meshd", rps=12000, cpu_us_per_req=170, p99_us=600),
    row(2, "egress", "direct", rps=41000, cpu_us_per_req=29, p99_us=110),
    row(2, "egress", "iptables", rps=11000, cpu_us_per_req=210, p99_us=450),
    row(2, "egress", "meshd", rps=13000, cpu_us_per_req=150, p99_us=350),
]
PATHS = {"egress": ["direct", "iptables", "meshd"]}


def test_medians_and_spread():
    med = report.summarize(RESULTS, PATHS)["egress"]["medians"]
    assert med["iptables"]["rps"] == 10000
    assert (med["iptables"]["rps_min"], med["iptables"]["rps_max"]) == (8000, 11000)
    assert med["meshd"]["n"] == 3
    assert med["meshd"]["iperf_gbps"] is None   # not measured is not zero


def test_ratios_against_direct_and_anchor_are_ratios_of_medians():
    r = report.summarize(RESULTS, PATHS)["egress"]["ratios"]
    assert set(r) == {"iptables/direct", "meshd/direct", "meshd/iptables"}
    assert r["meshd/iptables"]["rps"] == pytest.approx(12000 / 10000)
    assert r["meshd/direct"]["cpu_us_per_req"] == pytest.approx(160 / 29)
    assert r["meshd/iptables"]["iperf_gbps"] is None
    assert "foreign_cpu_cores" not in r["meshd/iptables"]   # a noise gauge, never divided


def test_paired_ratios_are_per_rep():
    p = report.summarize(RESULTS, PATHS)["egress"]["paired"]
    assert set(p) == {"meshd/iptables"}
    assert p["meshd/iptables"]["rps"] == pytest.approx([1.2, 1.5, 13000 / 11000])


def test_accel_is_compared_with_meshd():
    rows = RESULTS + [row(0, "egress", "meshd-accel", rps=15000, p50_us=80),
                      row(0, "same-host", "meshd", p50_us=100, iperf_gbps=10),
                      row(0, "same-host", "meshd-accel", p50_us=80, iperf_gbps=9)]
    s = report.summarize(rows, {"egress": ["direct", "iptables", "meshd", "meshd-accel"],
                                "same-host": ["meshd", "meshd-accel"]})
    assert s["egress"]["ratios"]["meshd-accel/meshd"]["rps"] == pytest.approx(15000 / 12000)
    t = {x["target"]: x for x in report.targets(s)}
    assert t["same-host meshd-accel/meshd p50 c=1"]["met"] is True     # 0.80 <= 0.85
    assert t["same-host meshd-accel/meshd bulk"]["met"] is False       # 0.90 < 1


def test_ratio_edge_cases():
    assert report.ratio(None, 1) is None and report.ratio(1, None) is None
    assert report.ratio(1, 0) is None
    assert report.ratio(3, 2) == 1.5


def test_rotation_visits_every_position():
    modes = ["a", "b", "c"]
    firsts = [report.rotated(modes, rep)[0] for rep in range(3)]
    assert firsts == ["a", "b", "c"]
    assert sorted(report.rotated(modes, 7)) == modes
    assert report.rotated([], 3) == []


def test_targets_met_and_missed():
    t = {x["target"]: x for x in report.targets(report.summarize(RESULTS, PATHS))}
    assert t["egress meshd/iptables req/s"]["met"] is True           # 1.20 >= 1.20
    assert t["egress meshd/iptables req/s"]["value"] == pytest.approx(1.2)
    assert t["egress meshd/iptables CPU/req (all CPUs)"]["met"] is True   # 160/210 <= 0.85
    assert t["egress meshd/iptables p99 c=1"]["met"] is True         # 350/450
    assert t["egress meshd/iptables CPU/req (own cgroups)"]["met"] is None


def test_connect_target_uses_the_largest_applied_size():
    connect = {"workloads": {"1": {"applied": True, "bpf_ns_per_connect": 100},
                             "255": {"applied": True, "bpf_ns_per_connect": 104},
                             "10000": {"applied": False, "error": "over the limit"}},
               "excluded ports": {"1": {"bpf_ns_per_connect": 100},
                                  "10000": {"bpf_ns_per_connect": 120}}}
    t = {x["target"]: x for x in report.targets({}, connect)}
    assert t["connect cost workloads: 255 / 1 entries (BPF ns per connect)"]["met"] is True
    assert t["connect cost excluded ports: 10,000 / 1 entries (BPF ns per connect)"]["met"] \
        is False
    table = report.connect_table(connect)
    assert "not applied: over the limit" in table and "| 1 | 255 | 10,000 |" in table


def test_tables_render_every_figure_and_mode():
    s = report.summarize(RESULTS, PATHS)
    md = report.path_table(s["egress"], PATHS["egress"])
    lines = md.splitlines()
    assert len(lines) == 2 + len(report.FIGURES)
    assert "**meshd/iptables**" in lines[0] and "meshd/iptables per rep" in lines[0]
    assert "| req/s (wrk c=16) | 41,000 | 10,000 | 12,000 | 0.24 | 0.29 | 1.20 | 1.18–1.50 |" \
        in md
    assert "| – |" in md   # unmeasured figures are dashes
    tt = report.targets_table(report.targets(s) + [
        {"target": "x", "goal": ">= 1.20", "value": 1.1, "met": False}])
    assert "**no**" in tt and "| yes |" in tt and "not measured" in tt
    assert "| meshd A: meshd | 30.5 |" in report.memory_table({"meshd A: meshd": 30.5})


def test_entries_exclude_the_target_and_are_distinct():
    text = connect_cost.entries_conf("excluded CIDRs", 1000, "10.235.1.2", 8080, [])
    nets = [ipaddress.ip_network(c) for c in text.split("[", 2)[2].split("]")[0]
            .replace('"', "").split(", ")]
    assert len(set(nets)) == 1000 and nets[0] == ipaddress.ip_network("10.235.1.2/32")
    assert not any(n.overlaps(ipaddress.ip_network("127.0.0.0/8")) for n in nets)
    assert not any(n.overlaps(ipaddress.ip_network("10.0.0.0/8")) for n in nets[1:])
    ports = connect_cost.entries_conf("excluded ports", 10000, "x", 8080, [])
    got = [int(p) for p in ports.split("[")[2].split("]")[0].split(", ")]
    assert got[0] == 8080 and len(set(got)) == 10000 and max(got) < 65536
    wl = connect_cost.entries_conf("workloads", 3, "x", 8080, ["/a", "/b", "/c"])
    assert wl.count("[workload.") == 2 and "exclude_outbound_ports = [8080]" in wl
    assert connect_cost.entries_conf("excluded ports", 1, "x", 8080, []).endswith("[8080]\n")
    # Envoy's own ports are never excluded (meshd refuses that config)
    ports = connect_cost.excluded_ports(1000, 8080, avoid=(30005, 30226))
    assert len(set(ports)) == 1000 and not {30005, 30226} & set(ports) and ports[0] == 8080
