"""The highly available master: failover time, and what etcd costs a volume create/delete.

    python -m bench.failover [--kills 12] [--ops 40] [--baseline 454cc9a]

1. Failover: an embedded cluster with etcd and 3 masters; the leader is
   killed -9 `--kills` times (restarted as a follower each time). Measured
   from the kill: until a follower leads (its /master/status), and until an
   admin call through the master list succeeds (what an operator sees).
2. Volume create and delete latency, `--ops` of each, on this tree (state
   in etcd, one master) against `--baseline` (the commit before etcd: state
   in a JSON file), each in a fresh process importing its tree, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import machine, pct, show

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def failovers(kills: int) -> dict[str, list[float]]:
    from shoalfs.cli.cluster import EmbeddedCluster
    from shoalfs.proto.errors import ShoalError

    out: dict[str, list[float]] = {"a follower leads": [], "an admin call succeeds": []}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as d:
        c = EmbeddedCluster(d)
        try:
            c.up(metanodes=1, datanodes=1, masters=3)
            for _ in range(kills):
                old = c.leader()
                while old is None:
                    time.sleep(0.05)
                    old = c.leader()
                c.kill(old)
                t0 = time.monotonic()
                led = called = None
                while led is None or called is None:
                    if led is None and c.leader() not in (None, old):
                        led = time.monotonic() - t0
                    if called is None:
                        try:
                            c.admin("/volume/undelete", {"name": "nonexistent"})
                        except ShoalError as exc:
                            if exc.code == 100404:  # answered by a leader: the volume does not exist
                                called = time.monotonic() - t0
                    time.sleep(0.02)
                out["a follower leads"].append(led)
                out["an admin call succeeds"].append(called)
                c.start(old)
                new_addr = c.masters[str(c.leader())]
                while (c.master_status()[old] or {}).get("leader") != new_addr:
                    time.sleep(0.05)
        finally:
            c.down()
    return out


def create_delete(ops: int) -> dict[str, list[float]]:
    """Runs in a child process, against whichever shoalfs it imports."""
    from shoalfs.cli.cluster import EmbeddedCluster

    out: dict[str, list[float]] = {"volume create": [], "volume delete": []}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as d:
        c = EmbeddedCluster(d)
        try:
            c.up(metanodes=1, datanodes=1)
            for i in range(ops):
                t = time.perf_counter()
                c.admin("/volume/create", {"name": f"b{i}", "owner": "bench"})
                out["volume create"].append(time.perf_counter() - t)
                t = time.perf_counter()
                c.admin("/volume/delete", {"name": f"b{i}"})
                out["volume delete"].append(time.perf_counter() - t)
        finally:
            c.down()
    return out


def run_tree(tree: str, ops: int) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, os.path.join(HERE, "bench", "failover.py"), "--child", str(ops)],
                         env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    result: dict[str, list[float]] = json.loads(out.strip().splitlines()[-1])
    return result


def row(what: str, values: list[float]) -> list[str]:
    return [what, str(len(values)), f"{statistics.median(values) * 1000:,.0f}", f"{pct(values, 0.99) * 1000:,.0f}",
            f"{max(values) * 1000:,.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--ops", type=int, default=40)
    ap.add_argument("--baseline", default="454cc9a", help="the commit before etcd")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(create_delete(args.child)))
        return
    cols = ["measure", "n", "p50 ms", "p99 ms", "max ms"]
    times = failovers(args.kills)
    show(f"master failover: kill -9 of the leader of 3 ({machine()})", cols,
         [row(f"kill → {k}", v) for k, v in times.items()])
    with tempfile.TemporaryDirectory(prefix="shoal-baseline-") as base:
        subprocess.run(["git", "-C", HERE, "worktree", "add", "--detach", base, args.baseline],
                       check=True, capture_output=True)
        try:
            before = run_tree(base, args.ops)
            after = run_tree(HERE, args.ops)
        finally:
            subprocess.run(["git", "-C", HERE, "worktree", "remove", "--force", base], check=False)
    rows = [row(f"{k}: JSON file ({args.baseline})", before[k]) for k in before]
    rows += [row(f"{k}: etcd (this tree)", after[k]) for k in after]
    show("volume create/delete latency, one master", cols, sorted(rows))


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
