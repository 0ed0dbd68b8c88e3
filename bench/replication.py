"""Replication benchmark: 1 vs 3 replicas in one run, and the longest write
stall when a node is killed -9 mid-workload.

    python -m bench.replication [--kills N]     (as root; a FUSE mount)

Prints two tables: FUSE throughput of 256 MiB of random bytes and metadata
rates for replicas=1 and replicas=3 on the same cluster (3 metanodes, 3
datanodes); then, with 3
replicas, the longest write of an SDK workload around each kill -9 of the
datanode leading a data partition and (separately) of the metanode leading
the root partition, p50/p99 over N kills (each node restarted and caught up
before the next).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

from bench.common import bench_cluster, show
from bench.peers import measure, mounted
from shoalfs.cli.cluster import EmbeddedCluster


def view_of(c: EmbeddedCluster, volume: str, kind: str) -> list[dict[str, Any]]:
    info = c.http_get(f"/volume/info?name={volume}")
    assert info is not None
    return list(info[f"{kind}_partitions"])


def in_sync(c: EmbeddedCluster, volume: str) -> bool:
    return all(sorted(p["in_sync"]) == sorted(p["replicas"]) for k in ("meta", "data") for p in view_of(c, volume, k))


def wait(cond: Any, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError("timed out")
        time.sleep(0.1)


def longest_write_around_kill(c: EmbeddedCluster, volume: str, kind: str) -> tuple[float, int]:
    """Kill -9 the leader of the first partition of `kind` while a writer
    runs; the longest single file write (create + write + close) seen, and
    how many writes failed (there should be none)."""
    vol = c.connect(volume)
    stop = threading.Event()
    longest = [0.0]
    errors: list[BaseException] = []
    done = [0]

    def writer() -> None:
        i = 0
        while not stop.is_set():
            start = time.monotonic()
            try:
                with vol.open(f"/k{kind}{time.time_ns()}_{i}", "wb") as f:
                    f.write(os.urandom(64 * 1024))
            except OSError as exc:
                errors.append(exc)
            longest[0] = max(longest[0], time.monotonic() - start)
            done[0] += 1
            i += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        wait(lambda: done[0] >= 10)
        addr = view_of(c, volume, kind)[0]["replicas"][0]
        name = next(n for n, spec in c.layout["nodes"].items() if spec["listen"] == addr)
        c.kill(name)
        after = done[0]
        wait(lambda: done[0] >= after + 30)
    finally:
        stop.set()
        thread.join(60)
        vol.close()
    c.start(name)
    wait(lambda: in_sync(c, volume))
    for exc in errors[:3]:
        print(f"workload error around a {kind} kill: {exc}", file=sys.stderr)
    return longest[0], len(errors)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=5)
    args = ap.parse_args()
    results: dict[str, dict[str, str]] = {}
    stalls: dict[str, list[float]] = {"datanode": [], "metanode": []}
    failed: dict[str, int] = {"datanode": 0, "metanode": 0}
    with tempfile.TemporaryDirectory(prefix="shoal-repl-bench-") as work, bench_cluster() as c:
        source = os.path.join(work, "random.bin")
        with open(source, "wb") as f:
            for _ in range(256):
                f.write(os.urandom(1 << 20))
        for replicas in (1, 3):
            name = f"r{replicas}"
            c.create_volume(name, replicas=replicas)
            mnt = os.path.join(work, name)
            os.makedirs(mnt)
            with mounted([sys.executable, "-m", "shoalfs.cli", "mount", name, mnt, "--master", c.master_addr,
                          "--key-file", c.key_file(name), "--foreground"], mnt):
                results[f"{replicas} replica{'s' if replicas > 1 else ''}"] = measure(mnt, source, fio=False)
        for _ in range(args.kills):
            for role, kind in (("datanode", "data"), ("metanode", "meta")):
                longest, errors = longest_write_around_kill(c, "r3", kind)
                stalls[role].append(longest)
                failed[role] += errors
    names = list(results)
    show("FUSE, replicas 1 vs 3 (same cluster, same run)", ["metric", *names],
         [[metric] + [results[n][metric] for n in names] for metric in results[names[0]]])

    def pct(values: list[float], q: float) -> str:
        ordered = sorted(values)
        return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.2f} s"
    show(f"longest write around a kill -9 (3 replicas, {args.kills} kills each)",
         ["node killed (a partition leader)", "p50", "p99", "max", "failed writes"],
         [[role, f"{statistics.median(v):.2f} s", pct(v, 0.99), f"{max(v):.2f} s", str(failed[role])]
          for role, v in stalls.items()])


if __name__ == "__main__":
    main()
