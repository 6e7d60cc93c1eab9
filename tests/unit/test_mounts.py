"""mountinfo parsing: mount points (escaped), types, the filesystem holding a path."""

import pytest

from meshd import cgroups, mounts

MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
31 25 0:27 / /sys/fs/bpf rw,nosuid shared:10 - bpf bpf rw,mode=700
40 22 0:40 / /mnt/my\\040disk rw - tmpfs tmpfs rw
41 31 0:41 / /sys/fs/bpf/meshd-a rw - tmpfs tmpfs rw
42 41 0:42 / /sys/fs/bpf/meshd-a rw - bpf bpf rw
"""


@pytest.fixture
def info(tmp_path):
    p = tmp_path / "mountinfo"
    p.write_text(MOUNTINFO)
    return str(p)


def test_parse_unescapes_mount_points():
    ms = mounts.parse(MOUNTINFO)
    assert mounts.Mount("/mnt/my disk", "tmpfs") in ms and len(ms) == 7


def test_first_of_type(info):
    assert mounts.first_of_type("cgroup2", info) == "/sys/fs/cgroup"
    assert mounts.first_of_type("nfs", info) is None


def test_fstype_at_takes_the_deepest_and_last_stacked_mount(info):
    assert mounts.fstype_at("/sys/fs/bpf/v1/maps", info) == "bpf"
    assert mounts.fstype_at("/sys/fs/bpfother", info) == "sysfs"   # a prefix, not a parent
    assert mounts.fstype_at("/sys/fs/bpf/meshd-a/v1", info) == "bpf"   # bpf over tmpfs
    assert mounts.fstype_at("/mnt/my disk/x", info) == "tmpfs"
    assert mounts.fstype_at("/home", info) == "ext4"


def test_cgroup2_mount_is_read_not_assumed(info, tmp_path):
    assert cgroups.cgroup2_mount(info) == "/sys/fs/cgroup"
    none = tmp_path / "none"
    none.write_text(MOUNTINFO.replace("cgroup2", "cgroup"))
    with pytest.raises(cgroups.CgroupError):
        cgroups.cgroup2_mount(str(none))
