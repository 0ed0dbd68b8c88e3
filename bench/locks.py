"""Lock latency: uncontended lock+unlock, and the hand-off between two mounts.

    python -m bench.locks [--rounds 1000]      (as root)

One embedded cluster, one volume mounted twice. Uncontended: a process takes
and drops an exclusive lock on a file over and over (flock, and a POSIX
lockf of the whole file), each pair timed. Hand-off: two threads, each with
the file open through its own mount, pass an exclusive flock back and forth;
the waiter is already blocked when the holder lets go, and the time from
the unlock to the waiter's return is the hand-off. The local disk (kernel
locks, one machine) runs the same in the same run as the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from bench.common import bench_cluster, pct, show
from bench.peers import mounted


def uncontended(path: str, rounds: int, posix: bool) -> list[float]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    took = []
    try:
        for _ in range(rounds):
            t = time.perf_counter()
            if posix:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                fcntl.lockf(fd, fcntl.LOCK_UN)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX)
                fcntl.flock(fd, fcntl.LOCK_UN)
            took.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return took


FLOCK_SYSCALL = "73"  # x86-64


def blocked_in_flock(tid: int) -> bool:
    with open(f"/proc/self/task/{tid}/syscall") as f:
        return f.read().split()[0] == FLOCK_SYSCALL


def hand_off(first: str, second: str, rounds: int) -> list[float]:
    """Time from an unlock to the other side's blocked flock returning."""
    fds = [os.open(first, os.O_RDWR | os.O_CREAT, 0o644), os.open(second, os.O_RDWR)]
    released = [0.0, -1.0]  # when, by whom (a side re-taking its own lock is no hand-off)
    took: list[float] = []
    tids = [0, 0]

    def side(me: int) -> None:
        tids[me] = threading.get_native_id()
        while True:
            fcntl.flock(fds[me], fcntl.LOCK_EX)  # blocks until the other side lets go
            if len(took) >= rounds:
                fcntl.flock(fds[me], fcntl.LOCK_UN)
                return
            if released[1] == 1 - me:
                took.append(time.perf_counter() - released[0])
            # let go once the other side is blocked waiting for it
            while len(took) < rounds and (not tids[1 - me] or not blocked_in_flock(tids[1 - me])):
                time.sleep(0.0002)
            released[:] = [time.perf_counter(), me]
            fcntl.flock(fds[me], fcntl.LOCK_UN)

    try:
        threads = [threading.Thread(target=side, args=(me,)) for me in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for fd in fds:
            os.close(fd)
    return took


def measure(a: str, b: str, rounds: int) -> dict[str, str]:
    def us(values: list[float]) -> str:
        return f"{pct(values, 0.5) * 1e6:,.0f} / {pct(values, 0.99) * 1e6:,.0f}"
    return {
        "flock lock+unlock, uncontended (µs p50 / p99)": us(uncontended(f"{a}/u-flock", rounds, posix=False)),
        "lockf lock+unlock, uncontended (µs p50 / p99)": us(uncontended(f"{a}/u-lockf", rounds, posix=True)),
        "flock hand-off between two openers (µs p50 / p99)": us(hand_off(f"{a}/h", f"{b}/h", rounds // 4)),
    }


@contextlib.contextmanager
def two_mounts(work: str) -> Iterator[tuple[str, str]]:
    with bench_cluster() as c:
        c.create_volume("locks")
        paths = [os.path.join(work, name) for name in ("a", "b")]
        for p in paths:
            os.makedirs(p)
        cmd = [sys.executable, "-m", "shoalfs.cli", "mount", "locks"]
        opts = ["--master", c.master_addr, "--key-file", c.key_file("locks"), "--foreground"]
        with mounted([*cmd, paths[0], *opts], paths[0]), mounted([*cmd, paths[1], *opts], paths[1]):
            yield paths[0], paths[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1000)
    args = ap.parse_args()
    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-locks-") as work:
        local = os.path.join(work, "local")
        os.makedirs(local)
        results["local disk (kernel locks)"] = measure(local, local, args.rounds)
        with two_mounts(work) as (a, b):
            results["shoalfs, two mounts"] = measure(a, b, args.rounds)
    names = list(results)
    show("file locks", ["metric", *names], [[m] + [results[n][m] for n in names] for m in results[names[0]]])


if __name__ == "__main__":
    main()
