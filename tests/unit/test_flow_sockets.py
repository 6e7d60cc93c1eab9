"""flows.sock and observe.sock on a real GLib loop (no root, no Envoy): Fluentd
forward batches in, flow records out to a following `meshd observe` client."""
from __future__ import annotations

import socket
import threading
import time

import msgpack
import pytest

from meshd import flows, observe
from meshd.envoy.identity import envoy_group


@pytest.fixture
def loop():
    from gi.repository import GLib
    ml = GLib.MainLoop()
    t = threading.Thread(target=ml.run, daemon=True)
    t.start()
    yield ml
    ml.quit()
    t.join(5)


def wait(pred, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_envoy_batches_reach_a_following_observer(tmp_path, loop):
    obs = observe.ObserveServer(str(tmp_path / "observe.sock"))
    got = []

    def on_records(batch):
        recs = [r for r in (flows.record(raw, {3: "web"}.get) for raw in batch) if r]
        got.extend(recs)
        obs.publish(recs)
    rx = flows.FlowReceiver(str(tmp_path / "flows.sock"), on_records)
    try:
        # Envoy's group may send records, no other user (meshd/envoy/identity.py)
        st = (tmp_path / "flows.sock").stat()
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, envoy_group())
        follower = observe.stream(str(tmp_path / "observe.sock"), 0, follow=True)
        seen = []
        reader = threading.Thread(target=lambda: seen.extend(
            r for r, _ in zip(follower, range(3))), daemon=True)
        reader.start()
        time.sleep(0.2)   # the follower has asked
        rec = {"t": "1.5", "chain": "outbound_wl3", "client": "127.77.0.3:1",
               "local": "10.0.0.5:5432", "proto": "-", "method": "-", "code": 0,
               "flags": "-", "rx": 1, "tx": 2, "ms": 3}
        envoy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        envoy.connect(str(tmp_path / "flows.sock"))
        data = msgpack.packb(["meshd", [[1, rec], [1, dict(rec, chain="inbound_wl9")]]])
        envoy.sendall(data[:7])           # a batch split across reads
        time.sleep(0.05)
        envoy.sendall(data[7:] + msgpack.packb(["meshd", [[1, dict(rec, rx=10)]]]))
        assert wait(lambda: len(got) == 2) and rx.received == 3   # wl9 is nobody's
        reader.join(0.1)
        assert wait(lambda: len(seen) == 2)
        assert [r["bytes_sent"] for r in seen] == [1, 10] and seen[0]["workload"] == "web"
        # a later non-following client gets the ring
        assert [r["bytes_sent"] for r in observe.stream(str(tmp_path / "observe.sock"), 0,
                                                        follow=False)] == [1, 10]
        # garbage from the Envoy side: that connection is dropped, the receiver lives on
        envoy.sendall(b"\xc1" * 10)
        assert wait(lambda: rx.errors == 1)
        again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        again.connect(str(tmp_path / "flows.sock"))
        again.sendall(msgpack.packb(["meshd", [[1, rec]]]))
        assert wait(lambda: len(got) == 3)
        envoy.close()
        again.close()
    finally:
        rx.close()
        obs.close()
    assert not (tmp_path / "flows.sock").exists() and not (tmp_path / "observe.sock").exists()
