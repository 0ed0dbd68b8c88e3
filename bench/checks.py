"""What the integrity checks cost: SDK rates of this tree against an earlier
commit, in one run, on one machine, alternating so drift hits both alike.

    python -m bench.checks [--baseline 2c1691e] [--rounds 2]

The earlier commit is checked out into a temporary git worktree; each round
runs the same workload (an embedded cluster, sequential write and read,
creates and stats) in a fresh process importing one tree or the other, in
ABBA order after an uncounted warm-up run of each. On this VM the same tree against
itself differs by up to ±5 % (`--baseline HEAD` shows the noise).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from bench.common import show

MiB = 1024 * 1024
TOTAL = 512 * MiB  # long enough that a heartbeat round or a GC pass is noise
FILES = 2000
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of this process and the cluster's processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def workload() -> dict[str, float]:
    """Runs inside the child process, against whichever shoalfs it imports.
    Each phase gives a rate and the CPU it cost across all processes (less
    noisy than the rate on a shared 2-core VM)."""
    from shoalfs.cli.cluster import EmbeddedCluster

    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as d:
        c = EmbeddedCluster(d)
        try:
            c.up()
            c.create_volume("bench")
            pids = [p for p in (c.pid(n) for n in c.names()) if p is not None]
            block = os.urandom(4 * MiB)

            def phase(name: str, unit: str, amount: float, fn: Callable[[], None]) -> None:
                cpu, t = cpu_seconds(pids), time.perf_counter()
                fn()
                took, used = time.perf_counter() - t, cpu_seconds(pids) - cpu
                rates[f"{name} {unit}"] = amount / took
                rates[f"{name} CPU ms per {'MiB' if unit == 'MiB/s' else 'op'}"] = used * 1000 / amount

            with c.connect("bench") as vol:
                def write() -> None:
                    with vol.open("/seq", "wb") as f:
                        for _ in range(TOTAL // len(block)):
                            f.write(block)
                        f.fsync()

                def read() -> None:
                    with vol.open("/seq", "rb") as f:
                        while f.read(4 * MiB):
                            pass

                phase("write", "MiB/s", TOTAL / MiB, write)
                phase("read", "MiB/s", TOTAL / MiB, read)
                vol.mkdir("/meta")
                phase("create", "ops/s", FILES, lambda: [vol.open(f"/meta/f{i}", "wb").close() for i in range(FILES)])
                phase("stat", "ops/s", FILES, lambda: [vol.stat(f"/meta/f{i}") for i in range(FILES)])
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
            for tree in (base, HERE):  # warm-up, not counted: a first run compiles and caches
                run_tree(tree)
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
        fmt = "{:,.2f}" if "CPU" in metric else "{:,.0f}"
        rows.append([metric, " / ".join(fmt.format(v) for v in before), " / ".join(fmt.format(v) for v in after),
                     f"{change:+.1%}"])
    show(f"cost of the integrity checks (SDK, {args.rounds} rounds, baseline {args.baseline})",
         ["metric", "before (each round)", "after (each round)", "change of the means"], rows)


if __name__ == "__main__":
    main()
