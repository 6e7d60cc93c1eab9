"""atomic_write: whole content, mode, no temp files left, old content kept on failure."""

import os
import stat

import pytest

from meshd.fsutil import atomic_write


def test_writes_bytes_or_text_with_the_mode(tmp_path):
    p = tmp_path / "status.json"
    atomic_write(str(p), "{}\n")
    assert p.read_text() == "{}\n" and stat.S_IMODE(p.stat().st_mode) == 0o644
    atomic_write(str(p), b"new", mode=0o600)
    assert p.read_bytes() == b"new" and stat.S_IMODE(p.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["status.json"]


def test_replaces_by_rename_so_an_open_reader_keeps_the_old_file(tmp_path):
    p = tmp_path / "ids.json"
    p.write_text("old")
    with open(p) as reader:
        atomic_write(str(p), "new")
        assert reader.read() == "old"
    assert p.read_text() == "new"


def test_a_failed_write_leaves_the_old_content_and_no_temp_file(tmp_path):
    p = tmp_path / "lds.json"
    p.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(str(p), 42)   # not bytes: fails after the temp file exists
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["lds.json"]
