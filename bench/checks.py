"""What a change costs: SDK and FUSE rates of this tree against an earlier
commit, in one run, on one machine, alternating so drift hits both alike.

    python -m bench.checks [--baseline 2c1691e] [--rounds 4] [--no-fuse]

The earlier commit is checked out into a temporary git worktree; each round
runs the same workload (an embedded cluster; through the SDK sequential
write and read, creates and stats; through a `shoal mount` the same) in a
fresh process importing one tree or the other, in ABBA order after an
uncounted warm-up run of each. On this VM the same tree against itself
differs by up to ±5 % (`--baseline HEAD` shows the noise). Used for the
integrity checks (baseline 2c1691e) and access control (baseline 9889318).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

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


def fuse_phases(c: Any, d: str, phase: Callable[[str, str, float, Callable[[], None]], None],
                pids: list[int]) -> None:
    """The same workload through a FUSE mount of the volume (its process counted too)."""
    from shoalfs.client.mount import is_mounted

    mnt = os.path.join(d, "mnt")
    os.makedirs(mnt)
    args = [sys.executable, "-m", "shoalfs.cli", "mount", "bench", mnt, "--master", c.master_addr, "--foreground"]
    if hasattr(c, "key_file"):  # a tree with access keys
        args += ["--key-file", c.key_file("bench")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 30
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("the mount did not come up")
            time.sleep(0.05)
        pids.append(proc.pid)
        block = os.urandom(4 * MiB)
        total = TOTAL // 2

        def write() -> None:
            with open(f"{mnt}/fuse-seq", "wb") as f:
                for _ in range(total // len(block)):
                    f.write(block)
                os.fsync(f.fileno())

        def read() -> None:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")  # the page cache would serve it otherwise
            with open(f"{mnt}/fuse-seq", "rb") as f:
                while f.read(4 * MiB):
                    pass

        phase("fuse write", "MiB/s", total / MiB, write)
        phase("fuse read", "MiB/s", total / MiB, read)
        meta = f"{mnt}/fuse-meta"
        os.mkdir(meta)
        phase("fuse create", "ops/s", FILES, lambda: [open(f"{meta}/f{i}", "wb").close() for i in range(FILES)])
        phase("fuse stat", "ops/s", FILES, lambda: [os.stat(f"{meta}/f{i}") for i in range(FILES)])
    finally:
        if proc.pid in pids:
            pids.remove(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def workload(fuse: bool) -> dict[str, float]:
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

            if hasattr(c, "connect"):  # a tree with access keys: the owner key from the key store
                opened = c.connect("bench")
            else:
                from shoalfs.client import connect
                opened = connect(c.master_addr, "bench")
            with opened as vol:
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
            if fuse:
                fuse_phases(c, d, phase, pids)
        finally:
            c.down()
    return rates


def run_tree(tree: str, fuse: bool) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *([] if fuse else ["--no-fuse"])],
                         env=env, cwd=tree,
                         check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="2c1691e", help="the commit before the checks")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-fuse", action="store_true", help="the SDK only")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    fuse = not args.no_fuse
    if args.child:
        print(json.dumps(workload(fuse)))
        return
    with tempfile.TemporaryDirectory(prefix="shoal-baseline-") as base:
        subprocess.run(["git", "-C", HERE, "worktree", "add", "--detach", base, args.baseline],
                       check=True, capture_output=True)
        try:
            trees = {"before": base, "after": HERE}
            runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for tree in (base, HERE):  # warm-up, not counted: a first run compiles and caches
                run_tree(tree, fuse)
            for i in range(args.rounds):  # ABBA order, so drift and position hit both alike
                for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                    runs[name].append(run_tree(trees[name], fuse))
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
    show(f"this tree against {args.baseline} ({args.rounds} rounds, ABBA)",
         ["metric", "before (each round)", "after (each round)", "change of the means"], rows)


if __name__ == "__main__":
    main()
