"""The flow log: one entry per flow record (meshd/flows.py), in the journal with
one field per value, or as JSON lines in <state_dir>/flows.log without systemd;
`[mesh] flow_logs` chooses or turns it off, `flow_log_sample` samples it.

Journal entries are sent by meshd on Envoy's behalf: OBJECT_SYSTEMD_UNIT names
Envoy's unit, which `journalctl -u <unit>` matches for entries sent by root, so
`journalctl -u meshd-envoy WORKLOAD=web` lists who talked to web.
"""
from __future__ import annotations

import json
import logging
import os
import random

from . import statefiles

log = logging.getLogger("meshd")

MODES = ("auto", "journal", "file", "off")
FILE_MAX = 16 << 20   # then flows.log becomes flows.log.1 (one old file kept)
IDENTIFIER = "meshd-flow"
# record key -> journal field
FIELDS = (("workload", "WORKLOAD"), ("direction", "DIRECTION"), ("peer", "PEER"),
          ("destination", "DESTINATION"), ("source", "SOURCE"), ("protocol", "PROTOCOL"),
          ("status", "STATUS"), ("method", "HTTP_METHOD"), ("path", "HTTP_PATH"),
          ("flags", "ENVOY_FLAGS"), ("bytes_sent", "BYTES_SENT"),
          ("bytes_received", "BYTES_RECEIVED"), ("duration_ms", "DURATION_MS"),
          ("peer_id", "PEER_ID"), ("denied", "DENIED"), ("tls_failure", "TLS_FAILURE"))


def resolve(mode: str) -> str:
    """auto: the journal when meshd itself runs under systemd (as its own log
    does), else the file."""
    if mode != "auto":
        return mode
    return "journal" if os.environ.get("JOURNAL_STREAM") else "file"


def message(r: dict) -> str:
    """The one-line summary, as `meshd observe` prints it."""
    arrow = "->" if r["direction"] == "outbound" else "<-"
    who = r["workload"] or "(unattributed)"
    what = f"{r['method']} {r['path']} " if r["method"] else ""
    return (f"{who} {arrow} {r['peer']} {r['protocol']} {what}{r['status']} "
            f"sent={r['bytes_sent']} received={r['bytes_received']} {r['duration_ms']}ms")


class FlowLog:
    def __init__(self, mode: str, sample: float, state_dir: str, unit: str = ""):
        self.mode, self.sample, self.unit = resolve(mode), sample, unit
        self.path = statefiles.path(state_dir, statefiles.FLOWS_LOG)
        self.written = 0
        self.failed = 0
        self._file = None
        self._send = None
        if self.mode == "journal":
            try:
                from systemd.journal import send
                self._send = send
            except ImportError:
                log.warning("flow logs: python3-systemd is missing; writing %s", self.path)
                self.mode = "file"

    def write(self, records: list[dict]) -> None:
        if self.mode == "off":
            return
        if self.sample < 1.0:
            records = [r for r in records if random.random() < self.sample]
        try:
            if self.mode == "journal":
                for r in records:
                    self._journal(r)
            else:
                self._write_file(records)
            self.written += len(records)
        except OSError as e:
            self.failed += len(records)
            log.debug("flow log: %s", e)

    def _journal(self, r: dict) -> None:
        fields = {f: str(r[k]) for k, f in FIELDS if r.get(k, "") != ""}
        if self.unit:
            fields["OBJECT_SYSTEMD_UNIT"] = self.unit
        self._send(message(r), SYSLOG_IDENTIFIER=IDENTIFIER, PRIORITY="6", **fields)

    def _write_file(self, records: list[dict]) -> None:
        if not records:
            return
        if self._file is None:
            # who talked to whom is root's, as `meshd observe` and the system journal are
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)   # a file an older meshd left readable
            self._file = open(fd, "a", encoding="utf-8")
        self._file.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        self._file.flush()
        if self._file.tell() > FILE_MAX:
            self._file.close()
            self._file = None
            os.replace(self.path, statefiles.path(os.path.dirname(self.path),
                                                  statefiles.FLOWS_LOG_OLD))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
