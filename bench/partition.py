"""Leaders cut from etcd and the masters (issue 13, scenario 1): how long
until a new leader acknowledges, and the longest write clients see.

    python -m bench.partition [--runs 5]     (as root: namespaces, nftables, FUSE)

One cluster from tests/netcluster.py (3 etcd members, 2 masters, 3+3 nodes,
each process in its own network namespace), a 3-replica volume, an SDK
writer and a mount's writer (64 KiB files, each in its own namespace). Each
run cuts the metanode leading the root partition and the datanode leading
the first data partition from every etcd member and master (clients and
followers still reach them), then heals and waits for the copies to be in
sync before the next run; then the same with the leaders cut from their
followers too (only clients reach them). Measured from the cut:

- new views: the master has published a new leader for both partitions;
- first ack by a new leader: the first write that started after both new
  views were published is acknowledged (every write creates a file in the
  root directory, so it needs the root partition's new leader);
- longest write: the longest single write (create, write, close) of each
  writer that overlapped the cut.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

from bench.common import pct, show

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from conftest import Mount  # noqa: E402
from netcluster import AckedWriter, Net, NetCluster  # noqa: E402

ETCDS, MASTERS = ["etcd1", "etcd2", "etcd3"], ["master", "master2"]
NODES = [f"{role}{i}" for role in ("metanode", "datanode") for i in (1, 2, 3)]


def parts(c: NetCluster, volume: str) -> dict[str, dict[str, Any]]:
    info = c.http_get(f"/volume/info?name={volume}")
    assert info is not None
    return {"meta": info["meta_partitions"][0], "data": info["data_partitions"][0]}


def in_sync(c: NetCluster, volume: str) -> bool:
    info = c.http_get(f"/volume/info?name={volume}")
    return info is not None and all(sorted(p["in_sync"]) == sorted(p["replicas"])
                                    for k in ("meta_partitions", "data_partitions") for p in info[k])


def until(cond: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def one_cut(c: NetCluster, writers: list[AckedWriter], isolate: bool) -> dict[str, float]:
    before = parts(c, "b")
    leaders = {c.node_name(p["replicas"][0]) for p in before.values()}
    count = {w.prefix: len(w.acked()) for w in writers}
    until(lambda: all(len(w.acked()) >= count[w.prefix] + 10 for w in writers), 60, "writes before the cut")
    cut = time.monotonic()
    for name in leaders:
        peers = [n for n in NODES if n != name and n[:4] == name[:4]] if isolate else []
        c.net.cut(name, ETCDS + MASTERS + peers)
    until(lambda: all(parts(c, "b")[k]["replicas"][0] != before[k]["replicas"][0] for k in before), 60,
          "new leaders")
    views = time.monotonic()
    until(lambda: all(any(r["t0"] >= views for r in w.acked()) for w in writers), 60, "a write after the new views")
    time.sleep(3)  # the stall, if any, is over: writes are flowing again
    row = {"new views": views - cut,
           "first ack by a new leader": min(r["t1"] for w in writers for r in w.acked() if r["t0"] >= views) - cut}
    for w in writers:
        row[f"longest write ({w.prefix})"] = max(r["t1"] - r["t0"] for r in w.records() if r["t1"] >= cut)
        row[f"failed ({w.prefix})"] = len([r for r in w.errors() if r["t1"] >= cut])
    c.net.heal()
    until(lambda: in_sync(c, "b"), 120, "copies back in sync")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    net = Net(ETCDS + MASTERS + NODES + ["sdk", "mount"])
    modes = {"followers reachable": False, "followers cut too": True}
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as d:
        try:
            net.up()
            c = NetCluster(os.path.join(d, "cluster"), net)
            mount: Mount | None = None
            writers: list[AckedWriter] = []
            try:
                c.up(3, 3, masters=2, extra={"master": {"failover_after": 1.5}})
                c.create_volume("b", replicas=3)
                mount = Mount(c, "b", os.path.join(d, "mnt"), wrap=net.wrap("mount")).start()
                writers = [AckedWriter(net, "sdk", os.path.join(d, "sdk.log"),
                                       ["--master", c.master_addr, "--volume", "b", "--key-file", c.key_file("b")],
                                       "sdk"),
                           AckedWriter(net, "mount", os.path.join(d, "mount.log"), ["--dir", mount.path], "mount")]
                for mode, isolate in modes.items():
                    for i in range(args.runs):
                        rows[mode].append(one_cut(c, writers, isolate))
                        print(f"{mode}, run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[mode][-1].items()),
                              flush=True)
            finally:
                for w in writers:
                    w.stop()
                if mount is not None:
                    mount.stop()
                c.down()
        finally:
            net.down()
    for mode, measured in rows.items():
        keys = list(measured[0])
        table = [[f"run {i + 1}"] + [fmt(k, r[k]) for k in keys] for i, r in enumerate(measured)]
        for q in (0.5, 0.99):
            table.append([f"p{int(q * 100)}"] + [fmt(k, pct([r[k] for r in measured], q)) if not k.startswith("failed")
                                                else str(int(sum(r[k] for r in measured))) for k in keys])
        show(f"leaders of a meta and a data partition cut from etcd and the masters, {mode} (3 replicas)",
             ["", *keys], table)


def fmt(key: str, value: float) -> str:
    return str(int(value)) if key.startswith("failed") else f"{value:.2f} s"

if __name__ == "__main__":
    main()
