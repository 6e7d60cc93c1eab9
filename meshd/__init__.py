"""meshd: a minimal transparent service mesh built from eBPF and Envoy."""

__version__ = "0.1.0"
