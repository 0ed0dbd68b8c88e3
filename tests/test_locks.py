"""Cluster-wide file locks (issue 14): flock and POSIX record locks hold
between two mounts of one volume and the SDK, waiters wake when a lock goes,
a signal interrupts a waiter with EINTR, a dead client's locks lapse, SQLite
stays consistent from two mounts, and a deletion fails a waiter with ESTALE."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import Mount, SyslogListener, fuse_available, wait_for

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.client import connect
from shoalfs.client.core import ClientOptions

pytestmark = pytest.mark.fuse

LOCK_LEASE = 3.0  # the cluster's lock lease: how long a dead client's locks outlive it


class Pair:
    def __init__(self, cluster: EmbeddedCluster, a: Mount, b: Mount) -> None:
        self.cluster, self.a, self.b = cluster, a, b


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    assert fuse_available(), "FUSE is required"
    c = EmbeddedCluster(str(tmp_path_factory.mktemp("cluster")))
    mounts: list[Mount] = []
    try:
        c.up(extra={"metanode": {"lock_lease": LOCK_LEASE}})
        c.create_volume("locks")
        for name in ("a", "b"):
            mounts.append(Mount(c, "locks", str(tmp_path_factory.mktemp("mnt") / name)).start())
        yield Pair(c, *mounts)
    finally:
        for m in mounts:
            m.stop()
        c.down()


class Holder:
    """Another process holding locks through a mount, told what to do on its stdin."""

    SCRIPT = textwrap.dedent("""
        import fcntl, os, sys
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
        print("ready", flush=True)
        for line in sys.stdin:
            kind, *args = line.split()
            try:
                if kind == "flock":
                    fcntl.flock(fd, int(args[0]))
                elif kind == "lockf":
                    fcntl.lockf(fd, *map(int, args))
                elif kind == "write":
                    os.pwrite(fd, args[1].encode(), int(args[0]))
                print("ok", flush=True)
            except OSError as exc:
                print("err", exc.errno, flush=True)
    """)

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def do(self, *words: object) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for h in made:
        h.close()


def free_after_close(h: Holder) -> None:
    """The flock of a closed file is free: the kernel sends its release just
    after close() returns (FUSE releases in the background), so not at once."""
    wait_for(lambda: h.do("flock", fcntl.LOCK_EX | fcntl.LOCK_NB) == "ok", 5, "the closed file's flock released")


def getlk(fd: int, type: int, start: int, length: int) -> tuple[int, int, int, int]:
    """F_GETLK: (type, start, length, pid) of a lock in the way (type F_UNLCK: none)."""
    raw = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi", type, os.SEEK_SET, start, length, 0) + bytes(4))
    t, _, s, n, pid = struct.unpack("hhqqi", raw[:struct.calcsize("hhqqi")])
    return t, s, n, pid


LOCK_SYSCALLS = {"72", "73"}  # fcntl, flock (x86-64)


def in_syscall(pid: int, numbers: set[str]) -> bool:
    """Whether the process is blocked in one of these system calls (/proc/PID/syscall)."""
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[0] in numbers


def in_thread(fn: object, *args: object) -> tuple[threading.Thread, list[object]]:
    """Run fn(*args) in a thread; the list gets its result or its exception."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn(*args))  # type: ignore[operator]
        except Exception as exc:
            out.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_flock_excludes_across_mounts_and_a_waiter_proceeds_on_release(pair: Pair, holders: list[Holder]) -> None:
    holders.append(h := Holder(f"{pair.a.path}/flock"))
    assert h.do("flock", fcntl.LOCK_EX) == "ok"
    fd = os.open(f"{pair.b.path}/flock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError) as err:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert err.value.errno == errno.EWOULDBLOCK
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        waiter, out = in_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        waiter.join(1.0)
        assert waiter.is_alive(), f"granted while held elsewhere: {out}"
        released = time.monotonic()
        assert h.do("flock", fcntl.LOCK_UN) == "ok"
        waiter.join(10)
        assert out == [None] and time.monotonic() - released < 5  # woken, not found by a slow poll
        # now the other way round; and closing the descriptor lets the lock go
        assert h.do("flock", fcntl.LOCK_EX | fcntl.LOCK_NB) == f"err {errno.EWOULDBLOCK}"
    finally:
        os.close(fd)
    free_after_close(h)


def test_shared_flocks_coexist_and_a_failed_upgrade_lets_go_as_on_linux(pair: Pair, holders: list[Holder]) -> None:
    holders.append(h := Holder(f"{pair.a.path}/shared"))
    assert h.do("flock", fcntl.LOCK_SH) == "ok"
    with open(f"{pair.b.path}/shared", "rb") as f:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a read-only descriptor may take a shared lock
        assert h.do("flock", fcntl.LOCK_EX | fcntl.LOCK_NB) == f"err {errno.EWOULDBLOCK}"
        # flock(2): a conversion first lets go of the old lock, so one that fails holds nothing
        # (the other holder's failed attempt above let go of its shared lock too)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert h.do("flock", fcntl.LOCK_SH | fcntl.LOCK_NB) == f"err {errno.EWOULDBLOCK}"
        fcntl.flock(f, fcntl.LOCK_UN)
    free_after_close(h)


def test_record_locks_ranges_conflicts_and_getlk(pair: Pair, holders: list[Holder]) -> None:
    holders.append(h := Holder(f"{pair.a.path}/records"))
    assert h.do("lockf", fcntl.LOCK_EX, 100, 0) == "ok"  # bytes [0, 100)
    fd = os.open(f"{pair.b.path}/records", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 100)  # [100, 200): no overlap
        with pytest.raises(OSError) as err:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 50)  # [50, 150)
        assert err.value.errno in (errno.EAGAIN, errno.EACCES)
        assert getlk(fd, fcntl.F_WRLCK, 50, 10) == (fcntl.F_WRLCK, 0, 100, h.pid)  # POSIX: who holds it
        assert getlk(fd, fcntl.F_RDLCK, 200, 0)[0] == fcntl.F_UNLCK
        # the holder lets go of [0, 50) only: that part is free, [50, 100) is not
        assert h.do("lockf", fcntl.LOCK_UN, 50, 0) == "ok"
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 50, 0)
        with pytest.raises(OSError):
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 60)
        # a downgrade to shared lets our shared lock in, not an exclusive one
        assert h.do("lockf", fcntl.LOCK_SH, 50, 50) == "ok"
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 10, 60)
        with pytest.raises(OSError):
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 60)
        assert getlk(fd, fcntl.F_WRLCK, 60, 1) == (fcntl.F_RDLCK, 50, 50, h.pid)
        # and it conflicts with ours the other way round
        assert h.do("lockf", fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 120) == f"err {errno.EAGAIN}"
    finally:
        os.close(fd)  # a close drops every POSIX lock of this process on the file
    assert h.do("lockf", fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0) == "ok"


WAIT_THEN_SIGNAL = textwrap.dedent("""
    import ctypes, fcntl, os, signal, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    signal.signal(signal.SIGUSR1, lambda *a: None)  # no SA_RESTART: the call ends with EINTR
    fd = os.open(sys.argv[1], os.O_RDWR)
    print("waiting", flush=True)
    if sys.argv[2] == "flock":
        rc = libc.flock(fd, fcntl.LOCK_EX)
    else:
        lk = ctypes.create_string_buffer(struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0) + bytes(4))
        rc = libc.fcntl(fd, fcntl.F_SETLKW, lk)
    print(rc, ctypes.get_errno(), flush=True)
""")


@pytest.mark.parametrize("how", ["flock", "fcntl"])
def test_a_signal_interrupts_a_waiter_with_eintr(pair: Pair, holders: list[Holder], how: str) -> None:
    holders.append(h := Holder(f"{pair.a.path}/intr-{how}"))
    assert h.do("flock", fcntl.LOCK_EX) if how == "flock" else h.do("lockf", fcntl.LOCK_EX, 0, 0) == "ok"
    waiter = subprocess.Popen([sys.executable, "-c", WAIT_THEN_SIGNAL, f"{pair.b.path}/intr-{how}", how],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert waiter.stdout is not None and waiter.stdout.readline().strip() == "waiting"
        wait_for(lambda: in_syscall(waiter.pid, LOCK_SYSCALLS), 10, "the waiter blocked in its lock call")
        assert waiter.poll() is None
        sent = time.monotonic()
        waiter.send_signal(signal.SIGUSR1)
        assert waiter.stdout.readline().split() == ["-1", str(errno.EINTR)]
        assert time.monotonic() - sent < 3
        assert waiter.wait(10) == 0
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    # the interrupted request left nothing behind: the holder's lock is still the only one
    assert h.do("flock", fcntl.LOCK_UN) if how == "flock" else h.do("lockf", fcntl.LOCK_UN, 0, 0) == "ok"
    fd = os.open(f"{pair.b.path}/intr-{how}", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) if how == "flock" else fcntl.lockf(
            fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_killed_mount_loses_its_locks_within_the_lease(pair: Pair, mount_factory, holders: list[Holder]) -> None:
    doomed = mount_factory(pair.cluster, "locks")
    holders.append(h := Holder(f"{doomed.path}/dead"))
    assert h.do("flock", fcntl.LOCK_EX) == "ok"
    assert h.do("lockf", fcntl.LOCK_EX, 0, 0) == "ok"
    fd = os.open(f"{pair.b.path}/dead", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert doomed.proc is not None
        killed = time.monotonic()
        doomed.proc.kill()  # kill -9: no unlock, no goodbye; its session's locks lapse
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        took = time.monotonic() - killed
        print(f"a killed mount's locks were free after {took:.1f}s (lock lease {LOCK_LEASE:.0f}s)")
        assert took < LOCK_LEASE + 3, took
    finally:
        os.close(fd)
        doomed.stop()


SQLITE_WRITER = textwrap.dedent("""
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
    for i in range(int(sys.argv[3])):
        db.execute("BEGIN IMMEDIATE")
        n = db.execute("SELECT count(*) FROM t").fetchone()[0]
        db.execute("INSERT INTO t (who, seq, seen) VALUES (?, ?, ?)", (sys.argv[2], i, n))
        db.execute("COMMIT")
    db.close()
""")


def test_sqlite_from_two_mounts_at_once(pair: Pair) -> None:
    db = sqlite3.connect(f"{pair.a.path}/app.db")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, who TEXT, seq INTEGER, seen INTEGER)")
    db.commit()
    db.close()
    writers = [subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, f"{m.path}/app.db", name, "500"],
                                stderr=subprocess.PIPE, text=True) for name, m in (("a", pair.a), ("b", pair.b))]
    for w in writers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    for m in (pair.a, pair.b):
        db = sqlite3.connect(f"{m.path}/app.db")
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 1000
            # every transaction saw every row committed before it, from either mount
            assert sorted(r[0] for r in db.execute("SELECT seen FROM t")) == list(range(1000))
        finally:
            db.close()


def test_sdk_locks_hold_against_a_mount(pair: Pair, holders: list[Holder]) -> None:
    holders.append(h := Holder(f"{pair.a.path}/sdk"))
    # a short op deadline: it bounds each call, never how long a blocking lock may wait
    with connect(pair.cluster.master_addr, "locks", ClientOptions(op_deadline=2, attempt_timeout=2),
                 key_file=pair.cluster.key_file("locks")) as vol:
        f = vol.open("/sdk", "r+b")
        g = vol.open("/sdk", "r+b")
        try:
            f.flock(fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert h.do("flock", fcntl.LOCK_SH | fcntl.LOCK_NB) == f"err {errno.EWOULDBLOCK}"
            with pytest.raises(BlockingIOError):
                g.flock(fcntl.LOCK_EX | fcntl.LOCK_NB)  # another file object is another owner
            vol.lockf(f, fcntl.LOCK_EX, 10, 0)
            assert h.do("lockf", fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 10) == "ok"
            assert h.do("lockf", fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 5) == f"err {errno.EAGAIN}"
            # a blocking SDK lock waits for the mount's holder (past the op deadline), and gets it once it goes
            waiter, out = in_thread(g.lockf, fcntl.LOCK_EX, 5, 15)
            waiter.join(3.0)
            assert waiter.is_alive(), out
            assert h.do("lockf", fcntl.LOCK_UN, 10, 10) == "ok"
            waiter.join(10)
            assert out == [None]
        finally:
            f.close()  # its locks go with it
            g.close()
        assert h.do("flock", fcntl.LOCK_EX | fcntl.LOCK_NB) == "ok"


def test_deleting_the_volume_fails_a_lock_waiter_with_estale(
        pair: Pair, mount_factory, syslog: SyslogListener, tmp_path: object) -> None:
    c = pair.cluster
    vol = c.create_volume("doomed-locks")
    audit = f"{tmp_path}/audit.log"
    one = mount_factory(c, "doomed-locks")
    two = mount_factory(c, "doomed-locks", [f"syslog=unix:{syslog.path},audit_log={audit},heartbeat=1"])
    holder = Holder(f"{one.path}/f")
    try:
        assert holder.do("flock", fcntl.LOCK_EX) == "ok"
        fd = os.open(f"{two.path}/f", os.O_RDWR)
        waiter, out = in_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        waiter.join(1.0)
        assert waiter.is_alive()
        c.admin("/volume/delete", {"name": "doomed-locks"})
        waiter.join(20)
        assert len(out) == 1 and isinstance(out[0], OSError) and out[0].errno == errno.ESTALE, out
        with pytest.raises(OSError) as err:
            os.close(fd)  # the close's flush: ESTALE too, as every call on the deleted volume
        assert err.value.errno == errno.ESTALE
        assert two.proc is not None
        two.proc.wait(30)
        assert two.proc.returncode == 143, two.log()[-2000:]
        wait_for(lambda: syslog.records, 5, "the syslog record")
        assert vol["vol_id"] in syslog.records[0]
    finally:
        holder.close()


def partition_leader(c: EmbeddedCluster, volume: str, path: str) -> tuple[dict, str]:
    """The meta partition of a file (through a mount) and the node that leads it."""
    ino = os.stat(path).st_ino
    info = c.http_get(f"/volume/info?name={volume}")
    assert info is not None
    part = next(p for p in info["meta_partitions"] if p["start"] <= ino < p["end"])
    return part, next(n for n, spec in c.layout["nodes"].items() if spec["listen"] == part["replicas"][0])


def test_a_failover_keeps_the_locks_of_live_sessions(pair: Pair, holders: list[Holder]) -> None:
    """The metanode leading the file's partition is killed -9: the new leader
    knows no locks, and grants nothing until the holders reclaimed theirs."""
    c = pair.cluster
    holders.append(h := Holder(f"{pair.a.path}/failover"))
    assert h.do("flock", fcntl.LOCK_EX) == "ok"
    assert h.do("lockf", fcntl.LOCK_EX, 10, 0) == "ok"
    part, victim = partition_leader(c, "locks", f"{pair.a.path}/failover")
    assert len(part["replicas"]) == 3, part
    fd = os.open(f"{pair.b.path}/failover", os.O_RDWR)
    try:
        c.kill(victim)
        killed = time.monotonic()
        # asked during the failover and the grace: refused (after waiting them out), never granted
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OSError) as err:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 5)
        assert err.value.errno == errno.EAGAIN
        print(f"first answer after the kill: {time.monotonic() - killed:.1f}s")
        info = c.http_get("/volume/info?name=locks")
        assert info is not None
        assert next(p for p in info["meta_partitions"] if p["pid"] == part["pid"])["replicas"][0] != \
            part["replicas"][0], "another member leads now"
        assert h.do("flock", fcntl.LOCK_UN) == "ok" and h.do("lockf", fcntl.LOCK_UN, 10, 0) == "ok"
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    finally:
        os.close(fd)
        c.start(victim)


def test_a_restarted_metanode_keeps_the_locks_of_live_sessions(pair: Pair, mount_factory,
                                                               holders: list[Holder]) -> None:
    """One copy of each partition: its metanode is killed -9 and started again,
    knows no locks, and takes back the holders' locks before granting any."""
    c = pair.cluster
    c.create_volume("solo-locks", replicas=1)
    one, two = mount_factory(c, "solo-locks"), mount_factory(c, "solo-locks")
    holders.append(h := Holder(f"{one.path}/f"))
    assert h.do("flock", fcntl.LOCK_EX) == "ok"
    assert h.do("lockf", fcntl.LOCK_SH, 100, 0) == "ok"
    _, node = partition_leader(c, "solo-locks", f"{one.path}/f")
    fd = os.open(f"{two.path}/f", os.O_RDWR)
    try:
        c.kill(node)
        c.start(node)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OSError) as err:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)
        assert err.value.errno == errno.EAGAIN
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 10, 50)  # a shared lock beside the reclaimed one
        assert h.do("flock", fcntl.LOCK_UN) == "ok"
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
