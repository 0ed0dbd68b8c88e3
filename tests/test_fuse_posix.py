"""POSIX behaviour through a real FUSE mount, with exact errnos."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator

import pytest
from conftest import Mount, fuse_available

from shoalfs.cli.cluster import EmbeddedCluster

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def mnt(cluster: EmbeddedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert fuse_available(), "FUSE is required"
    cluster.create_volume("posix", capacity_gib=3)
    # a world-traversable place, so the non-root tests test our permissions, not pytest's
    base = tempfile.mkdtemp(prefix="shoal-posix-", dir="/tmp")
    os.chmod(base, 0o755)
    m = Mount(cluster, "posix", f"{base}/m").start()
    os.chmod(m.path, 0o777)
    try:
        yield m.path
    finally:
        assert m.stop() == 0, m.log()
        shutil.rmtree(base, ignore_errors=True)


def err(fn, *args, **kw) -> int:
    with pytest.raises(OSError) as info:
        fn(*args, **kw)
    return info.value.errno


def test_open_flags(mnt: str) -> None:
    p = f"{mnt}/flags"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"hello world")
    os.close(fd)
    assert err(os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"!")
    os.close(fd)
    assert open(p, "rb").read() == b"hello world!"
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(p).st_size == 0
    assert err(os.open, f"{mnt}/missing", os.O_RDONLY) == errno.ENOENT
    assert err(os.open, f"{mnt}/flags/sub", os.O_RDONLY) == errno.ENOTDIR
    os.mkdir(f"{mnt}/adir")
    assert err(os.open, f"{mnt}/adir", os.O_WRONLY) == errno.EISDIR


def test_pread_pwrite_sparse_past_4gib(mnt: str) -> None:
    p = f"{mnt}/sparse"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        far = 5 * 1024**3 + 123
        assert os.pwrite(fd, b"far away", far) == 8
        assert os.pwrite(fd, b"near", 10) == 4
        assert os.pread(fd, 8, far) == b"far away"
        assert os.pread(fd, 10, far - 10) == bytes(10)
        assert os.pread(fd, 20, 0) == bytes(10) + b"near" + bytes(6)
        assert os.fstat(fd).st_size == far + 8
    finally:
        os.close(fd)


def test_truncate_up_and_down(mnt: str) -> None:
    p = f"{mnt}/trunc"
    with open(p, "wb") as f:
        f.write(b"x" * 10000)
    os.truncate(p, 100)
    assert os.stat(p).st_size == 100
    os.truncate(p, 5000)
    data = open(p, "rb").read()
    assert data == b"x" * 100 + bytes(4900)
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 3)
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    assert open(p, "rb").read() == b"xxx"


def test_rename(mnt: str) -> None:
    os.makedirs(f"{mnt}/r/a/deep")
    open(f"{mnt}/r/f1", "w").write("one")
    open(f"{mnt}/r/f2", "w").write("two")
    os.rename(f"{mnt}/r/f1", f"{mnt}/r/f2")
    assert open(f"{mnt}/r/f2").read() == "one"
    assert not os.path.exists(f"{mnt}/r/f1")
    os.rename(f"{mnt}/r/f2", f"{mnt}/r/a/deep/moved")
    assert open(f"{mnt}/r/a/deep/moved").read() == "one"
    assert err(os.rename, f"{mnt}/r/a", f"{mnt}/r/a/deep/x") == errno.EINVAL
    os.mkdir(f"{mnt}/r/empty")
    assert err(os.rename, f"{mnt}/r/empty", f"{mnt}/r/a") == errno.ENOTEMPTY
    assert err(os.rename, f"{mnt}/r/a/deep/moved", f"{mnt}/r/empty") == errno.EISDIR
    assert err(os.rename, f"{mnt}/r/empty", f"{mnt}/r/a/deep/moved") == errno.ENOTDIR
    assert err(os.rename, f"{mnt}/r/nothing", f"{mnt}/r/x") == errno.ENOENT
    # RENAME_NOREPLACE through renameat2(2)
    open(f"{mnt}/r/keep", "w").write("keep")
    script = textwrap.dedent(f"""
        import ctypes, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        r = libc.renameat2(-100, b"{mnt}/r/empty", -100, b"{mnt}/r/keep", 1)
        sys.exit(ctypes.get_errno() if r else 0)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == errno.EEXIST
    assert open(f"{mnt}/r/keep").read() == "keep"


def test_hard_links_and_symlinks(mnt: str) -> None:
    p = f"{mnt}/orig"
    open(p, "w").write("linked")
    os.link(p, f"{mnt}/hard")
    assert os.stat(p).st_nlink == 2
    assert os.stat(f"{mnt}/hard").st_ino == os.stat(p).st_ino
    os.unlink(p)
    assert os.stat(f"{mnt}/hard").st_nlink == 1
    assert open(f"{mnt}/hard").read() == "linked"
    assert err(os.link, f"{mnt}/hard", f"{mnt}/hard") == errno.EEXIST
    os.symlink("hard", f"{mnt}/soft")
    assert os.readlink(f"{mnt}/soft") == "hard"
    assert stat.S_ISLNK(os.lstat(f"{mnt}/soft").st_mode)
    assert open(f"{mnt}/soft").read() == "linked"
    os.symlink("/nonexistent/target", f"{mnt}/dangling")
    assert err(os.stat, f"{mnt}/dangling") == errno.ENOENT
    assert err(os.readlink, f"{mnt}/hard") == errno.EINVAL


def test_mkdir_rmdir_readdir(mnt: str) -> None:
    os.mkdir(f"{mnt}/dir")
    assert err(os.mkdir, f"{mnt}/dir") == errno.EEXIST
    open(f"{mnt}/dir/file", "w").close()
    assert err(os.rmdir, f"{mnt}/dir") == errno.ENOTEMPTY
    assert err(os.rmdir, f"{mnt}/dir/file") == errno.ENOTDIR
    assert err(os.unlink, f"{mnt}/dir") == errno.EISDIR
    os.unlink(f"{mnt}/dir/file")
    os.rmdir(f"{mnt}/dir")
    assert err(os.rmdir, f"{mnt}/dir") == errno.ENOENT
    os.mkdir(f"{mnt}/many")
    names = {f"n{i:04d}" for i in range(3000)}
    for n in names:
        os.close(os.open(f"{mnt}/many/{n}", os.O_CREAT | os.O_WRONLY))
    listed = os.listdir(f"{mnt}/many")
    assert len(listed) == 3000 and set(listed) == names
    assert len(list(os.scandir(f"{mnt}/many"))) == 3000


def test_chmod_chown_utimens(mnt: str) -> None:
    p = f"{mnt}/attrs"
    open(p, "w").close()
    os.chmod(p, 0o640)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(p, ns=(1_000_000_000_123, 2_000_000_000_456))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_123, 2_000_000_000_456)


def test_statfs_reports_capacity_and_usage(mnt: str, cluster: EmbeddedCluster) -> None:
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == 3 * 1024**3
    with open(f"{mnt}/fill", "wb") as f:
        f.write(os.urandom(8 * 1024 * 1024))
    before = st.f_bfree

    def used() -> bool:
        return os.statvfs(mnt).f_bfree < before - 1024  # 4 MiB less free at least
    from conftest import wait_for
    wait_for(used, 15, "usage to show in statfs")


def test_xattrs(mnt: str) -> None:
    p = f"{mnt}/xa"
    open(p, "w").close()
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "user.size", b"XL")
    assert os.getxattr(p, "user.color") == b"blue"
    assert sorted(os.listxattr(p)) == ["user.color", "user.size"]
    os.removexattr(p, "user.size")
    assert os.listxattr(p) == ["user.color"]
    assert err(os.getxattr, p, "user.size") == errno.ENODATA
    assert err(os.removexattr, p, "user.size") == errno.ENODATA


def test_unlinked_open_file_stays_readable(mnt: str) -> None:
    p = f"{mnt}/ghost"
    with open(p, "wb") as f:
        f.write(b"still here" * 1000)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.unlink(p)
        assert not os.path.exists(p)
        assert os.pread(fd, 10, 0) == b"still here"
        assert os.pread(fd, 10, 9990) == b"still here"
    finally:
        os.close(fd)


def as_nobody(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", code], capture_output=True, text=True)


def test_permissions_as_non_root(mnt: str) -> None:
    os.mkdir(f"{mnt}/private", 0o700)
    open(f"{mnt}/private/secret", "w").write("s")
    open(f"{mnt}/readonly", "w").write("r")
    os.chmod(f"{mnt}/readonly", 0o644)
    probe = textwrap.dedent(f"""
        import errno, os, sys
        out = []
        for fn in (lambda: os.listdir("{mnt}/private"),
                   lambda: open("{mnt}/private/secret").read(),
                   lambda: open("{mnt}/readonly", "a").write("x"),
                   lambda: os.chmod("{mnt}/readonly", 0o777),
                   lambda: os.unlink("{mnt}/readonly")):
            try:
                fn(); out.append(0)
            except OSError as e:
                out.append(e.errno)
        print(out)
    """)
    proc = as_nobody(probe)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert not os.path.exists(f"{mnt}/readonly")
    # the mount root is 0777, so unlinking someone else's file there is allowed
    assert lines[0] == str([errno.EACCES, errno.EACCES, errno.EACCES, errno.EPERM, 0])


def test_mtime_changes_on_write(mnt: str) -> None:
    p = f"{mnt}/mt"
    open(p, "w").write("a")
    t1 = os.stat(p).st_mtime_ns  # nanosecond clock: the append's mtime is later without waiting
    with open(p, "a") as f:
        f.write("b")
    assert os.stat(p).st_mtime_ns > t1


def test_directory_times_and_links_follow_each_change_at_once(mnt: str) -> None:
    """A create answers with its directory's new attributes, which the mount
    serves to the kernel's next getattr: they must never hide a later change."""
    d = f"{mnt}/dtimes"
    os.mkdir(d)
    seen = [os.stat(d)]
    for change in (lambda: open(f"{d}/a", "w").close(), lambda: os.mkdir(f"{d}/sub"),
                   lambda: open(f"{d}/b", "w").close(), lambda: os.unlink(f"{d}/a"),
                   lambda: open(f"{d}/c", "w").close(), lambda: os.rename(f"{d}/c", f"{d}/c2"),
                   lambda: os.chmod(d, 0o700), lambda: open(f"{d}/e", "w").close(), lambda: os.rmdir(f"{d}/sub")):
        change()
        st = os.stat(d)
        assert st.st_ctime_ns > seen[-1].st_ctime_ns, f"change {len(seen)} did not show"
        seen.append(st)
    assert stat.S_IMODE(seen[-1].st_mode) == 0o700
    assert [s.st_nlink for s in seen] == [2, 2, 3, 3, 3, 3, 3, 3, 3, 2]
    assert sorted(os.listdir(d)) == ["b", "c2", "e"]


def test_every_call_says_enametoolong_past_name_max(mnt: str) -> None:
    os.mkdir(f"{mnt}/names")
    ok, long = "a" * 255, "b" * 256
    open(f"{mnt}/names/{ok}", "w").close()
    assert os.stat(f"{mnt}/names/{ok}").st_size == 0  # 255 bytes work
    p = f"{mnt}/names/{long}"
    calls = {
        "stat": lambda: os.stat(p), "lstat": lambda: os.lstat(p), "open": lambda: open(p),
        "create": lambda: open(p, "w"), "mkdir": lambda: os.mkdir(p), "chmod": lambda: os.chmod(p, 0o600),
        "chown": lambda: os.chown(p, 1, 1), "truncate": lambda: os.truncate(p, 0), "unlink": lambda: os.unlink(p),
        "rmdir": lambda: os.rmdir(p), "link": lambda: os.link(f"{mnt}/names/{ok}", p),
        "symlink": lambda: os.symlink("x", p), "rename to": lambda: os.rename(f"{mnt}/names/{ok}", p),
        "rename from": lambda: os.rename(p, f"{mnt}/names/x"), "utime": lambda: os.utime(p),
        "listxattr": lambda: os.listxattr(p),
    }
    for what, call in calls.items():
        assert err(call) == errno.ENAMETOOLONG, what
    assert os.listdir(f"{mnt}/names") == [ok]  # nothing changed


def test_directory_link_counts(mnt: str) -> None:
    base = f"{mnt}/links"
    os.mkdir(base)
    assert os.stat(base).st_nlink == 2
    for i in range(3):
        os.mkdir(f"{base}/d{i}")
    open(f"{base}/file", "w").close()  # files do not count
    assert os.stat(base).st_nlink == 5
    os.rmdir(f"{base}/d2")
    assert os.stat(base).st_nlink == 4
    os.mkdir(f"{mnt}/links2")
    os.rename(f"{base}/d1", f"{mnt}/links2/moved")  # across directories (and partitions, often)
    assert (os.stat(base).st_nlink, os.stat(f"{mnt}/links2").st_nlink) == (3, 3)
    os.mkdir(f"{base}/target")
    os.rename(f"{mnt}/links2/moved", f"{base}/target")  # replaces an empty directory
    assert (os.stat(base).st_nlink, os.stat(f"{mnt}/links2").st_nlink) == (4, 2)
    os.rename(f"{base}/target", f"{base}/renamed")  # within one directory: no change
    assert os.stat(base).st_nlink == 4
    found = subprocess.run(["find", base, "-type", "d"], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(found) == sorted([base, f"{base}/d0", f"{base}/renamed"])


def test_past_the_largest_file_is_efbig_and_touches_no_other_file(mnt: str) -> None:
    from shoalfs.proto.layout import MAX_FILE_SIZE

    with open(f"{mnt}/neighbour", "wb") as f:
        f.write(b"mine")
    fd = os.open(f"{mnt}/huge", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"z", MAX_FILE_SIZE - 1)  # the last byte a file can hold
        assert os.fstat(fd).st_size == MAX_FILE_SIZE
        assert err(os.pwrite, fd, b"spill", MAX_FILE_SIZE) == errno.EFBIG
        assert err(os.ftruncate, fd, MAX_FILE_SIZE + 1) == errno.EFBIG
    finally:
        os.close(fd)
    assert open(f"{mnt}/neighbour", "rb").read() == b"mine"
    os.unlink(f"{mnt}/huge")
