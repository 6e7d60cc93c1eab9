"""The config parser against hostile files (hypothesis): arbitrary text and TOML,
deep nesting, huge files, invalid UTF-8, symlinks, FIFOs, directories and files that
vanish while being read. It never crashes or hangs, and every rejection names the
file, the line (and column for a bad byte) and the key.

Short and derandomized for CI; MESHD_TEST_FULL=1 runs many more examples."""
from __future__ import annotations

import json
import os
import signal
import string
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshd import config as cfgmod
from meshd.config import MAX_FILE_BYTES, MAX_NESTING, ConfigInvalid, load_config, parse_files

FULL = bool(os.environ.get("MESHD_TEST_FULL"))
settings.register_profile("meshd-hostile", max_examples=2000 if FULL else 120, deadline=None,
                          derandomize=not FULL, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
HOSTILE = settings.get_profile("meshd-hostile")


@contextmanager
def no_hang(seconds=20):
    """A hang fails the test instead of blocking the suite forever."""
    def expired(*_):
        raise AssertionError(f"hung for {seconds}s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def rejected(files: dict[str, str]) -> list:
    """parse_files either accepts, or raises ConfigInvalid; nothing else."""
    try:
        parse_files(files)
        return []
    except ConfigInvalid as e:
        return e.errors


def assert_located(errors, files: dict[str, str]):
    for e in errors:
        assert e.file in files, e
        n = files[e.file].count("\n") + 1
        assert 1 <= e.line <= n, e          # a real line of that file
        assert e.message and "\n" not in str(e), e


# ---------------------------------------------------------------- generated input

def toml(v) -> str:
    """A TOML inline value (strings through JSON: its escapes are TOML's too)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


keys = st.one_of(st.sampled_from(sorted(cfgmod._MESH_SCHEMA) + sorted(cfgmod._WORKLOAD_SCHEMA)),
                 st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12))
scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.text(string.printable.replace("\x0b", "").replace("\x0c", ""), max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
tables = st.dictionaries(keys, values, max_size=6)
docs = st.fixed_dictionaries({}, optional={
    "mesh": tables,
    "workload": st.dictionaries(st.text(string.ascii_letters + ".-_é ", min_size=1, max_size=8),
                                tables, max_size=3),
    "other": tables})


def render(doc: dict) -> str:
    out = []
    for top, body in doc.items():
        if top == "workload":
            for name, t in body.items():
                out.append(f"[workload.{json.dumps(name)}]")
                out += [f"{json.dumps(k)} = {toml(v)}" for k, v in t.items()]
        else:
            out.append(f"[{top}]")
            out += [f"{json.dumps(k)} = {toml(v)}" for k, v in body.items()]
    return "\n".join(out) + "\n"


@HOSTILE
@given(st.text(max_size=400))
def test_any_text_is_accepted_or_rejected_with_a_line(text):
    assert_located(rejected({"a.toml": text}), {"a.toml": text})


@HOSTILE
@given(docs)
def test_any_toml_document_is_rejected_with_file_line_and_key(doc):
    text = render(doc)
    errors = rejected({"a.toml": text})
    assert_located(errors, {"a.toml": text})
    for e in errors:
        if not e.message.startswith("invalid TOML"):   # JSON/TOML escapes differ rarely
            assert e.key, e                            # a rule broken by some key
            # the key (its last part) is on the line named, or its table is
            first = e.key.split(".")[0]
            line = text.split("\n")[e.line - 1]
            assert first in line or e.key.split(".")[-1] in line or "[" in line, (e, line)


@HOSTILE
@given(st.integers(1, 30_000), st.sampled_from(["[", "{ a = "]),
       st.sampled_from(["mesh.x", "workload.w.cgroup", "top"]))
def test_deep_nesting_is_an_error_on_its_line_never_a_recursion_error(depth, opener, key):
    closer = "]" if opener == "[" else "}"
    table, _, name = key.rpartition(".")
    text = (f"[{table}]\n" if table else "") + f"\n{name} = " + opener * depth + "1" + closer * depth + "\n"
    errors = rejected({"a.toml": text})
    assert errors, "no meshd key takes such a value"
    assert_located(errors, {"a.toml": text})
    if depth > MAX_NESTING:
        assert [(e.line, e.key) for e in errors] == [(text.count("\n", 0, text.index(f"{name} = ")) + 1, key)]


@HOSTILE
@given(st.binary(min_size=1, max_size=200), st.integers(0, 200))
def test_invalid_utf8_names_line_column_and_key(tmp_path_factory, junk, at):
    good = b'[mesh]\n# comment\nenvoy_log_level = "info"\n\n[workload.web]\ncgroup = "/web"\n'
    at = min(at, len(good))
    data = good[:at] + junk + good[at:]
    try:
        data.decode("utf-8")
        assume(False)
    except UnicodeDecodeError as ude:
        bad = ude.start
    d = tmp_path_factory.mktemp("utf")
    (d / "a.toml").write_bytes(data)
    with pytest.raises(ConfigInvalid) as exc:
        load_config(str(d))
    (e,) = exc.value.errors
    line = data.count(b"\n", 0, bad) + 1
    col = bad - (data.rfind(b"\n", 0, bad) + 1) + 1
    assert (e.file, e.line) == (str(d / "a.toml"), line)
    assert f"line {line}, column {col}" in e.message and f"0x{data[bad]:02x}" in e.message


def test_invalid_utf8_names_the_key_on_its_line(tmp_path):
    (tmp_path / "a.toml").write_bytes(b'[mesh]\n\nenvoy_log_level = "in\xff\xfefo"\n')
    with pytest.raises(ConfigInvalid) as exc:
        load_config(str(tmp_path))
    assert str(exc.value) == (f"{tmp_path}/a.toml:3: mesh.envoy_log_level: not UTF-8: byte 0xff "
                              "at line 3, column 22 (offset 29); TOML files must be UTF-8")


# ---------------------------------------------------------------- the file system

def test_huge_file_is_refused_without_reading_it_all(tmp_path):
    with open(tmp_path / "big.toml", "wb") as f:
        f.truncate(64 << 30)   # sparse: 64 GiB of zeros
    (tmp_path / "ok.toml").write_text("[mesh]\n")
    with no_hang(), pytest.raises(ConfigInvalid) as exc:
        load_config(str(tmp_path))
    assert [str(e) for e in exc.value.errors] == [
        f"{tmp_path}/big.toml: larger than {MAX_FILE_BYTES >> 20} MiB"]


def test_a_file_just_below_the_limit_is_parsed(tmp_path):
    line = "# " + "x" * 1000 + "\n"
    (tmp_path / "a.toml").write_text("[mesh]\n" + line * ((MAX_FILE_BYTES - 100) // len(line)))
    with no_hang(60):
        assert load_config(str(tmp_path)).files == (str(tmp_path / "a.toml"),)


@pytest.mark.parametrize("make, message", [
    (lambda d: os.symlink(d / "nowhere", d / "a.toml"), "symbolic link to '{d}/nowhere', which does not exist"),
    (lambda d: (os.symlink(d / "b.toml", d / "a.toml"), os.symlink(d / "a.toml", d / "b.toml")),
     "symbolic link loop"),
    (lambda d: os.mkfifo(d / "a.toml"), "not a regular file"),
    (lambda d: os.symlink("/dev/zero", d / "a.toml"), "not a regular file"),
])
def test_odd_files_are_errors_that_never_hang(tmp_path, make, message):
    make(tmp_path)
    (tmp_path / "ok.toml").write_text("[mesh]\noutbound_port = 15002\n")
    with no_hang(), pytest.raises(ConfigInvalid) as exc:
        load_config(str(tmp_path))
    errors = exc.value.errors
    assert errors and all(e.file.startswith(str(tmp_path)) for e in errors)
    assert message.format(d=tmp_path) in errors[0].message, errors
    assert str(errors[0]).startswith(f"{tmp_path}/a.toml: ")   # no line: it is the file


def test_directories_named_toml_are_not_read(tmp_path):
    (tmp_path / "d.toml").mkdir()
    os.symlink(tmp_path / "d.toml", tmp_path / "e.toml")
    (tmp_path / "ok.toml").write_text("[mesh]\noutbound_port = 15002\n")
    assert load_config(str(tmp_path)).files == (str(tmp_path / "ok.toml"),)


def test_symlink_to_a_file_elsewhere_is_read(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x").write_text("[mesh]\noutbound_port = 15002\n")
    (tmp_path / "etc").mkdir()
    os.symlink(tmp_path / "real" / "x", tmp_path / "etc" / "a.toml")
    assert load_config(str(tmp_path / "etc")).mesh.outbound_port == 15002


@HOSTILE
@given(st.integers(0, 4), st.sampled_from(["before-open", "after-open", "shrunk", "grown"]))
def test_files_vanishing_or_changing_mid_read(tmp_path_factory, which, when):
    """An editor replaces or removes files while meshd reads the directory: a file
    gone before it is opened is skipped; one opened is read as it was (the fd holds
    it); one that shrinks or grows is read as it is now, never half-decoded."""
    d = tmp_path_factory.mktemp("vanish")
    names = [f"{i}.toml" for i in range(5)]
    for i, n in enumerate(names):
        (d / n).write_text(f"[workload.w{i}]\ncgroup = \"/w{i}\"\n")
    victim = str(d / names[which])
    real_open, real_fstat = os.open, os.fstat

    def fake_open(path, *a, **kw):
        if path == victim and when == "before-open":
            os.unlink(path)
        fd = real_open(path, *a, **kw)
        if path == victim and when == "after-open":
            os.unlink(path)
        if path == victim and when in ("shrunk", "grown"):
            with open(path, "r+b") as f:
                f.truncate(10) if when == "shrunk" else f.write(b"\n" * 40 + b"[mesh]\n\xff")
        return fd

    with no_hang(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(cfgmod.os, "open", fake_open)
        mp.setattr(cfgmod.os, "fstat", real_fstat)
        try:
            cfg = load_config(str(d))
            errors = []
        except ConfigInvalid as e:
            cfg, errors = None, e.errors
    if when == "before-open":
        assert cfg is not None and len(cfg.workloads) == 4
    elif when == "after-open":
        assert cfg is not None and len(cfg.workloads) == 5
    else:
        assert errors and all(e.file == victim and e.line >= 1 for e in errors), errors
