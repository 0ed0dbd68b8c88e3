"""The metanode's persistence choice: our effect journal vs SQLite in WAL mode.

    python -m bench.journal [--ops 5000]

Both make every operation durable before it is acknowledged (fdatasync /
synchronous=FULL). A "create" writes an inode and a dentry. Sequential is
one operation at a time; concurrent is 64 in flight, where the journal's
group commit shares one fdatasync among all queued records.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import tempfile
import time

from bench.common import show
from shoalfs.metanode.journal import Journal


def effects(i: int) -> list:
    node = {"ino": i, "mode": 0o100644, "uid": 0, "gid": 0, "size": 0, "nlink": 1, "atime": i,
            "mtime": i, "ctime": i, "target": None, "rdev": 0, "xattrs": {}, "extents": {}}
    return [("C", i + 1), ("I", i, node), ("D", 1, f"file-{i}", i, 0o100644)]


async def journal_run(d: str, ops: int, inflight: int) -> float:
    j = Journal(d)
    j.load()
    sem = asyncio.Semaphore(inflight)

    async def one(i: int) -> None:
        async with sem:
            await j.append(effects(i))
    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(ops)))
    took = time.perf_counter() - t
    await j.close()
    return ops / took


def sqlite_run(d: str, ops: int) -> float:
    db = sqlite3.connect(os.path.join(d, "meta.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE inodes (ino INTEGER PRIMARY KEY, mode INT, uid INT, gid INT, size INT, nlink INT,"
               " atime INT, mtime INT, ctime INT)")
    db.execute("CREATE TABLE dentries (parent INT, name TEXT, ino INT, mode INT, PRIMARY KEY (parent, name))")
    t = time.perf_counter()
    for i in range(ops):
        db.execute("BEGIN")
        db.execute("INSERT INTO inodes VALUES (?,?,?,?,?,?,?,?,?)", (i, 0o100644, 0, 0, 0, 1, i, i, i))
        db.execute("INSERT INTO dentries VALUES (?,?,?,?)", (1, f"file-{i}", i, 0o100644))
        db.execute("COMMIT")
    took = time.perf_counter() - t
    db.close()
    return ops / took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=5000)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2, \
            tempfile.TemporaryDirectory() as d3:
        rows.append(["effect journal, sequential", f"{asyncio.run(journal_run(d1, args.ops, 1)):.0f} creates/s"])
        rows.append(["effect journal, 64 in flight", f"{asyncio.run(journal_run(d2, args.ops, 64)):.0f} creates/s"])
        rows.append(["SQLite WAL synchronous=FULL, sequential", f"{sqlite_run(d3, args.ops):.0f} creates/s"])
    show("durable metadata writes", ["store", "rate"], rows)


if __name__ == "__main__":
    main()
