"""What the integrity checks cost: SDK rates of this tree against an earlier
commit, in one run, on one machine, alternating so drift hits both alike.

    python -m bench.checks [--baseline 2c1691e] [--rounds 2]

The earlier commit is checked out into a temporary git worktree; each round
runs the same workload (an embedded cluster, sequential write and read,
creates and stats) in a fresh process importing one tree or the other, in
ABBA order after one uncounted warm-up run. On this VM the same tree against
itself differs by up to ±5 % (`--baseline HEAD` shows the noise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.common import show

MiB = 1024 * 1024
TOTAL = 128 * MiB
FILES = 2000
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def workload() -> dict[str, float]:
    """Runs inside the child process, against whichever shoalfs it imports."""
    from shoalfs.cli.cluster import EmbeddedCluster
    from shoalfs.client import connect

    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as d:
        c = EmbeddedCluster(d)
        try:
            c.up()
            c.create_volume("bench")
            block = os.urandom(4 * MiB)
            with connect(c.master_addr, "bench") as vol:
                t = time.perf_counter()
                with vol.open("/seq", "wb") as f:
                    for _ in range(TOTAL // len(block)):
                        f.write(block)
                    f.fsync()
                rates["write MiB/s"] = TOTAL / MiB / (time.perf_counter() - t)
                t = time.perf_counter()
                with vol.open("/seq", "rb") as f:
                    while f.read(4 * MiB):
                        pass
                rates["read MiB/s"] = TOTAL / MiB / (time.perf_counter() - t)
                vol.mkdir("/meta")
                t = time.perf_counter()
                for i in range(FILES):
                    vol.open(f"/meta/f{i}", "wb").close()
                rates["creates/s"] = FILES / (time.perf_counter() - t)
                t = time.perf_counter()
                for i in range(FILES):
                    vol.stat(f"/meta/f{i}")
                rates["stats/s"] = FILES / (time.perf_counter() - t)
        finally:
            c.down()
    return rates


def run_tree(tree: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env, cwd=tree,
                         check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="2c1691e", help="the commit before the checks")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(workload()))
        return
    with tempfile.TemporaryDirectory(prefix="shoal-baseline-") as base:
        subprocess.run(["git", "-C", HERE, "worktree", "add", "--detach", base, args.baseline],
                       check=True, capture_output=True)
        try:
            trees = {"before": base, "after": HERE}
            runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            run_tree(HERE)  # warm-up, not counted: the first run of a session is always slow
            for i in range(args.rounds):  # ABBA order, so drift and position hit both alike
                for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                    runs[name].append(run_tree(trees[name]))
        finally:
            subprocess.run(["git", "-C", HERE, "worktree", "remove", "--force", base], check=False)
    rows = []
    for metric in runs["after"][0]:
        before = [r[metric] for r in runs["before"]]
        after = [r[metric] for r in runs["after"]]
        change = (sum(after) / len(after)) / (sum(before) / len(before)) - 1
        rows.append([metric, " / ".join(f"{v:,.0f}" for v in before), " / ".join(f"{v:,.0f}" for v in after),
                     f"{change:+.1%}"])
    show(f"cost of the integrity checks (SDK, {args.rounds} rounds, baseline {args.baseline})",
         ["metric", "before (each round)", "after (each round)", "change of the means"], rows)


if __name__ == "__main__":
    main()
