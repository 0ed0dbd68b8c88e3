"""Mount life cycle, multi-mount coherence, fio, dbench, shutdown."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import Mount, wait_for

from shoalfs.cli.cluster import EmbeddedCluster, free_port
from shoalfs.client.mount import is_mounted

pytestmark = pytest.mark.fuse


def shoal(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoalfs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def forget_names() -> None:
    """The kernel forgets names and attributes: the next stat of each is a lookup."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def test_two_mounts_see_each_other(cluster: EmbeddedCluster, mount_factory) -> None:
    cluster.create_volume("shared")
    a = mount_factory(cluster, "shared").path
    b = mount_factory(cluster, "shared").path
    # close-to-open: a write+close in A is read exactly by an open after it in B
    for i in range(5):
        payload = os.urandom(100_000 + i * 4097)
        with open(f"{a}/doc", "wb") as f:
            f.write(payload)
        with open(f"{b}/doc", "rb") as f:
            assert f.read() == payload
    # and back the other way, appending
    with open(f"{b}/doc", "ab") as f:
        f.write(b"tail")
    with open(f"{a}/doc", "rb") as f:
        assert f.read().endswith(b"tail")
    # rename and unlink in one are seen by the other within 1 s
    os.listdir(b)
    os.stat(f"{b}/doc")
    os.rename(f"{a}/doc", f"{a}/renamed")
    t0 = time.monotonic()
    wait_for(lambda: not os.path.exists(f"{b}/doc") and os.path.exists(f"{b}/renamed"), 5, "rename in B")
    assert time.monotonic() - t0 <= 1.5
    os.unlink(f"{b}/renamed")
    t0 = time.monotonic()
    wait_for(lambda: not os.path.exists(f"{a}/renamed"), 5, "unlink in A")
    assert time.monotonic() - t0 <= 1.5
    # attributes at most 1 s stale
    open(f"{a}/attr", "w").close()
    os.stat(f"{b}/attr")
    os.chmod(f"{a}/attr", 0o600)
    t0 = time.monotonic()
    wait_for(lambda: os.stat(f"{b}/attr").st_mode & 0o777 == 0o600, 5, "chmod in B")
    assert time.monotonic() - t0 <= 1.5


def test_a_scanned_directory_stays_within_the_attribute_timeout(cluster: EmbeddedCluster, mount_factory) -> None:
    """A mount answers the lookups of a directory being scanned from one
    listing of it (client/dirscan.py): what another mount changes still shows
    within 1 s, and what this mount changes at once."""
    cluster.create_volume("scan")
    a = mount_factory(cluster, "scan").path
    b = mount_factory(cluster, "scan").path
    os.mkdir(f"{a}/d")
    for i in range(200):
        with open(f"{a}/d/f{i}", "wb") as f:
            f.write(b"x" * i)

    def scan() -> None:
        for i in range(200):
            with contextlib.suppress(FileNotFoundError):
                os.stat(f"{b}/d/f{i}")
    forget_names()
    scan()
    scan()  # the listing answers these
    sizes = [os.stat(f"{b}/d/f{i}").st_size for i in range(200)]
    assert sizes == list(range(200))
    os.chmod(f"{a}/d/f7", 0o600)
    os.unlink(f"{a}/d/f8")
    with open(f"{a}/d/f9", "ab") as f:
        f.write(b"grown")
    t0 = time.monotonic()
    wait_for(lambda: (scan() or True) and os.stat(f"{b}/d/f7").st_mode & 0o777 == 0o600
             and not os.path.exists(f"{b}/d/f8") and os.stat(f"{b}/d/f9").st_size == 9 + 5, 5,
             "another mount's changes seen through a scan")
    assert time.monotonic() - t0 <= 1.5
    # this mount's own change shows at once, whatever it had listed
    scan()
    os.chmod(f"{b}/d/f10", 0o640)
    os.unlink(f"{b}/d/f11")
    forget_names()
    assert os.stat(f"{b}/d/f10").st_mode & 0o777 == 0o640
    assert not os.path.exists(f"{b}/d/f11")


def test_creates_and_removals_keep_a_listing_current(cluster: EmbeddedCluster, mount_factory) -> None:
    """The kernel looks every new name up before it creates it: in a
    directory being filled, the mount answers those from a listing kept up
    to date with its own creates and removals (client/dirscan.py), not one
    round trip each. Its own changes show at once, another mount's new names
    within 1 s, and a create of a name another mount made meanwhile opens
    that file (O_CREAT) or fails (O_EXCL)."""
    import urllib.request

    def lookups_sent() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("shoal_client_requests_total{") and 'op="META_LOOKUP"' in line)

    port = free_port()
    cluster.create_volume("fill")
    a = mount_factory(cluster, "fill", [f"metrics=127.0.0.1:{port}"]).path
    b = mount_factory(cluster, "fill").path
    os.mkdir(f"{a}/d")
    before = lookups_sent()
    for i in range(600):
        os.close(os.open(f"{a}/d/f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    sent = lookups_sent() - before
    assert sent < 400, f"{sent:.0f} of 600 lookups of new names went to the metanode"

    def names_in_a() -> list[bool]:
        forget_names()  # every check is a lookup (from the listing)
        return [os.path.exists(f"{a}/d/f{i}") for i in range(600)]
    assert names_in_a() == [True] * 600
    for i in range(0, 600, 2):
        os.unlink(f"{a}/d/f{i}")
    assert names_in_a() == [i % 2 == 1 for i in range(600)]
    os.rename(f"{a}/d/f1", f"{a}/d/r1")
    assert os.path.exists(f"{a}/d/r1") and not os.path.exists(f"{a}/d/f1")
    assert sorted(os.listdir(f"{b}/d")) == sorted(["r1", *(f"f{i}" for i in range(3, 600, 2))])
    # another mount's names, while this one's listing may still say they are not there
    for i in range(40):
        os.stat(f"{a}/d/f{2 * i + 3}")
    with open(f"{b}/d/y", "wb") as f:
        f.write(b"from b")
    open(f"{b}/d/z", "wb").close()
    with open(f"{a}/d/y", "ab") as f:  # O_CREAT: opens b's file, does not make another
        f.write(b"+a")
    with pytest.raises(FileExistsError):
        os.open(f"{a}/d/z", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert open(f"{b}/d/y", "rb").read() == b"from b+a"
    open(f"{b}/d/x", "wb").close()
    t0 = time.monotonic()
    wait_for(lambda: os.path.exists(f"{a}/d/x"), 5, "another mount's new name")
    assert time.monotonic() - t0 <= 1.5
    # a link removed while the directory is listed: the other link's count is not the listed one
    os.link(f"{a}/d/f3", f"{a}/d/h3")
    forget_names()
    assert [os.path.exists(f"{a}/d/f{i}") for i in range(5, 101, 2)] == [True] * 48  # listed again
    os.unlink(f"{a}/d/f3")
    forget_names()
    assert os.stat(f"{a}/d/h3").st_nlink == 1
    # a name another mount replaced shows within 1 s through a listing that named the old file
    forget_names()
    assert [os.path.exists(f"{a}/d/f{i}") for i in range(5, 101, 2)] == [True] * 48  # listed again
    with open(f"{b}/d/new", "wb") as f:
        f.write(b"replaced")
    os.rename(f"{b}/d/new", f"{b}/d/f5")
    t0 = time.monotonic()
    wait_for(lambda: open(f"{a}/d/f5", "rb").read() == b"replaced", 5, "the replaced name")
    assert time.monotonic() - t0 <= 1.5


def test_mounts_of_different_volumes_at_once(cluster: EmbeddedCluster, mount_factory) -> None:
    for name in ("multi-a", "multi-b", "multi-c"):
        cluster.create_volume(name)
    mounts = {name: mount_factory(cluster, name).path for name in ("multi-a", "multi-b", "multi-c")}
    for name, path in mounts.items():
        open(f"{path}/who", "w").write(name)
    for name, path in mounts.items():
        assert open(f"{path}/who").read() == name
        assert os.listdir(path) == ["who"]


def fio(directory: str, rw: str, size: str) -> None:
    proc = subprocess.run(
        ["fio", "--name=verify", f"--directory={directory}", f"--rw={rw}", "--bs=4k", f"--size={size}",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--ioengine=psync", "--numjobs=1",
         "--output-format=terse", "--end_fsync=1"],
        capture_output=True, text=True, timeout=600, cwd=directory)  # fio saves its verify state in cwd
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify:" not in proc.stderr, proc.stderr


def test_fio_verify(cluster: EmbeddedCluster, mount_factory) -> None:
    if not shutil.which("fio"):
        pytest.fail("fio is required (./scripts/test installs it)")
    cluster.create_volume("fio")
    path = mount_factory(cluster, "fio").path
    fio(path, "write", "32m")
    fio(path, "randwrite", "16m")
    fio(path, "read", "32m")
    fio(path, "randrw", "16m")


def test_dbench_60s(cluster: EmbeddedCluster, mount_factory) -> None:
    if not shutil.which("dbench"):
        pytest.fail("dbench is required (./scripts/test installs it)")
    cluster.create_volume("dbench")
    path = mount_factory(cluster, "dbench").path
    loadfile = next((p for p in ("/usr/share/dbench/client.txt", "/usr/share/doc/dbench/client.txt")
                     if os.path.exists(p)), None)
    args = ["dbench", "-D", path, "-t", "60", "2"]
    if loadfile:
        args[1:1] = ["-c", loadfile]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Throughput" in out, out[-3000:]
    # dbench reports a failed file operation as a line with ERROR or "failed";
    # its barrier-semaphore notice is about SysV IPC, not the file system
    bad = [line for line in out.splitlines()
           if ("ERROR" in line or "failed" in line.lower()) and "barrier semaphore" not in line]
    assert not bad, "\n".join(bad[:20])


def test_sigterm_during_large_write(cluster: EmbeddedCluster, mount_factory, tmp_path) -> None:
    cluster.create_volume("sigterm")
    m: Mount = mount_factory(cluster, "sigterm")
    durable = os.urandom(8 * 1024 * 1024)
    with open(f"{m.path}/durable", "wb") as f:
        f.write(durable)
        f.flush()
        os.fsync(f.fileno())
    writer = subprocess.Popen(["dd", "if=/dev/zero", f"of={m.path}/big", "bs=1M", "count=100000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(f"{m.path}/big") and os.stat(f"{m.path}/big").st_size > 8 << 20, 30,
             "the writer to get going")
    t0 = time.monotonic()
    code = m.stop(signal.SIGTERM, timeout=30)
    assert code == 0, m.log()[-3000:]
    assert time.monotonic() - t0 < 10
    assert not is_mounted(m.path)
    writer.kill()
    writer.wait()
    again = Mount(cluster, "sigterm", m.path).start()
    try:
        with open(f"{again.path}/durable", "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(durable).digest()
    finally:
        assert again.stop() == 0


def test_umount_stops_the_process(cluster: EmbeddedCluster, mount_factory) -> None:
    cluster.create_volume("umount")
    m: Mount = mount_factory(cluster, "umount")
    open(f"{m.path}/f", "w").write("x")
    assert subprocess.run(["fusermount3", "-u", m.path]).returncode == 0
    assert m.proc is not None
    assert m.proc.wait(10) == 0
    assert not is_mounted(m.path)


def test_daemon_mount_and_errors(cluster: EmbeddedCluster, tmp_path) -> None:
    cluster.create_volume("daemon")
    mp = tmp_path / "mp"
    mp.mkdir()
    addr = cluster.master_addr
    key = ["--key-file", cluster.key_file("daemon")]
    proc = shoal("mount", "daemon", str(mp), "--master", addr, *key, "--log-file", str(tmp_path / "log"))
    try:
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(str(mp))  # live when the command returns
        open(f"{mp}/hello", "w").write("hi")
        busy = shoal("mount", "daemon", str(mp), "--master", addr, *key)
        assert busy.returncode == 1 and "busy" in busy.stderr
    finally:
        subprocess.run(["umount", str(mp)])
    wait_for(lambda: "unmounted" in (tmp_path / "log").read_text(), 10, "the daemon to log its exit")
    missing = shoal("mount", "nope-volume", str(mp), "--master", addr)
    assert missing.returncode == 1 and "does not exist" in missing.stderr, missing.stderr
    nodir = shoal("mount", "daemon", str(tmp_path / "absent"), "--master", addr, *key)
    assert nodir.returncode == 1 and "does not exist" in nodir.stderr
    unreachable = shoal("mount", "daemon", str(mp), "--master", f"127.0.0.1:{free_port()}", *key,
                        "-o", "op_deadline=3")
    assert unreachable.returncode == 1 and "unreachable" in unreachable.stderr, unreachable.stderr
    badopt = shoal("mount", "daemon", str(mp), "--master", addr, "-o", "frobnicate")
    assert badopt.returncode == 2 and "unknown mount option" in badopt.stderr
    for p in (missing, nodir, unreachable, badopt):
        assert "Traceback" not in p.stderr
    assert not is_mounted(str(mp))


def test_mount_helper_for_fstab(cluster: EmbeddedCluster, tmp_path) -> None:
    cluster.create_volume("fstab")
    mp = tmp_path / "fs"
    mp.mkdir()
    helper = shutil.which("mount.fuse.shoal")
    assert helper, "pip install puts mount.fuse.shoal on PATH"
    # what mount(8) runs for `mount -t fuse.shoal fstab MP -o master=ADDR,_netdev`
    key = f"key_file={cluster.key_file('fstab')}"
    proc = subprocess.run([helper, "fstab", str(mp), "-o", f"rw,_netdev,master={cluster.master_addr},{key}"],
                          capture_output=True, text=True, timeout=60)
    try:
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(str(mp))
    finally:
        subprocess.run(["umount", str(mp)])
    # mount(8) looks for /sbin/mount.fuse.shoal (README: the install step links it)
    if not os.path.exists("/sbin/mount.fuse.shoal"):
        os.symlink(helper, "/sbin/mount.fuse.shoal")
    proc = subprocess.run(["mount", "-t", "fuse.shoal", "fstab", str(mp), "-o",
                           f"master={cluster.master_addr},_netdev,{key}"], capture_output=True, text=True, timeout=60)
    try:
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(str(mp))
        assert open(f"{mp}/hello-fstab", "w").write("ok") == 2
    finally:
        subprocess.run(["umount", str(mp)])
