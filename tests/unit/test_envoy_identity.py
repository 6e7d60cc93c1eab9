"""Who Envoy runs as (meshd/envoy/identity.py): its user when it exists and can reach
the binary and the state directory, else root with the reason; its capabilities."""
from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from meshd.envoy import identity

FAKE = pwd.struct_passwd(("meshd-envoy", "x", 54321, 54321, "", "/nonexistent", "/usr/sbin/nologin"))


@pytest.fixture
def tmp_path():
    """A directory every user can search (pytest's own tmp root is 0700)."""
    d = tempfile.mkdtemp(prefix="mtident-")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d)


@pytest.fixture
def user(monkeypatch):
    monkeypatch.setattr(identity.pwd, "getpwnam",
                        lambda n: FAKE if n == identity.ENVOY_USER else pwd.getpwnam(n))


def reachable(tmp_path):
    tmp_path.chmod(0o755)
    binary = tmp_path / "envoy"
    binary.write_text("")
    binary.chmod(0o755)
    return str(binary), str(tmp_path / "run")


def test_runs_as_its_user_with_two_capabilities(tmp_path, user):
    binary, state = reachable(tmp_path)
    ident = identity.resolve(binary, state, (15001, 15006))
    assert (ident.user, ident.uid, ident.gid, ident.why_root) == ("meshd-envoy", 54321, 54321, "")
    assert ident.capabilities == ("CAP_NET_ADMIN", "CAP_SYS_ADMIN")
    assert ident.capability_mask == (1 << 12) | (1 << 21)
    argv = ident.setpriv()
    assert argv[0].endswith("setpriv") and argv[-1] == "--"
    assert "--reuid=54321" in argv and "--no-new-privs" in argv and "--clear-groups" in argv
    assert "--ambient-caps=-all,+net_admin,+sys_admin" in argv
    assert "--bounding-set=-all,+net_admin,+sys_admin" in argv


def test_a_port_below_1024_adds_net_bind_service(tmp_path, user):
    binary, state = reachable(tmp_path)
    assert "CAP_NET_BIND_SERVICE" in identity.resolve(binary, state, (80, 15006)).capabilities


def test_without_the_user_envoy_runs_as_root_and_says_why(tmp_path, monkeypatch):
    def nobody(name):
        raise KeyError(name)
    monkeypatch.setattr(identity.pwd, "getpwnam", nobody)
    ident = identity.resolve(*reachable(tmp_path))
    assert ident.is_root and ident.setpriv() == []
    assert ident.why_root.startswith("there is no user meshd-envoy (useradd --system")


def test_unreachable_state_directory_falls_back_to_root(tmp_path, user):
    binary, _ = reachable(tmp_path)
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)
    ident = identity.resolve(binary, str(private / "run"))
    assert ident.is_root
    assert f"cannot reach the state directory {private}/run: {private} is mode 0700" in ident.why_root


def test_unreachable_binary_falls_back_to_root(tmp_path, user):
    _, state = reachable(tmp_path)
    (tmp_path / "venv").mkdir(mode=0o700)
    binary = tmp_path / "venv" / "envoy"
    binary.write_text("")
    ident = identity.resolve(str(binary), state)
    assert ident.is_root and "cannot reach the Envoy binary" in ident.why_root


def test_a_starter_that_cannot_switch_users_runs_it_as_root(tmp_path, user):
    ident = identity.resolve(*reachable(tmp_path), switch=False)
    assert ident.is_root and "CAP_SETUID" in ident.why_root


def test_run_dir_is_envoys_groups_and_files_left_by_root_are_handed_over(tmp_path):
    """Envoy writes it through its group: meshd needs no CAP_CHOWN, only that group."""
    gid = identity.envoy_group()
    run = tmp_path / "envoy-run"
    run.mkdir()
    (run / "envoy.log").write_text("old root-owned log\n")
    (run / "envoy.log").chmod(0o644)
    identity.prepare_run_dir(str(run))
    st = run.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o770, 0, gid)
    st = (run / "envoy.log").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, gid)
    os.symlink("/etc/passwd", run / "link")
    identity.prepare_run_dir(str(run))   # a symlink is never followed
    st = os.stat("/etc/passwd")
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0o644)


def test_a_child_envoys_log_is_never_opened_through_a_link(tmp_path):
    """Envoy's user may write its run directory: a link it left there as envoy.log must
    not make meshd open (and hand Envoy) the file the link names."""
    from meshd import statefiles
    from meshd.envoy.child import EnvoySupervisor
    ident = identity.EnvoyIdentity("nobody", 65534, 65534, ("CAP_NET_ADMIN",))
    (tmp_path / "envoy-run").mkdir()
    sup = EnvoySupervisor("/bin/true", str(tmp_path), str(tmp_path), "info", lambda s: None,
                          identity=ident)
    assert sup.log_path == str(tmp_path / statefiles.ENVOY_LOG)
    victim = tmp_path / "victim"
    victim.write_text("root's\n")
    victim.chmod(0o600)
    for make in (os.symlink, os.link):
        make(victim, sup.log_path)
        with pytest.raises(OSError):
            sup._open_log()
        os.unlink(sup.log_path)
        st = victim.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    with sup._open_log() as f:   # a plain file: Envoy's group may write it
        f.write(b"x")
    st = os.stat(sup.log_path)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, identity.envoy_group())
