"""Deletion detection latency per path, and time from detection to exit.

    python -m bench.lifecycle [--rounds 20]      (as root)

For each path (the other two disabled) it mounts a fresh volume, deletes it
and reads the audit record: detection latency = detected_at - deleted_at
(the tombstone's time); exit = process exit - detected_at.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

from bench.common import bench_cluster, pct, show
from shoalfs.client.mount import is_mounted


def one_round(c, path: str, i: int, work: str, heartbeat: float) -> tuple[float, float]:
    name = f"b-{path}-{i}"
    c.create_volume(name)
    mnt = os.path.join(work, name)
    os.makedirs(mnt)
    audit = os.path.join(work, f"{name}.audit")
    opts = f"detect={path},heartbeat={heartbeat},audit_log={audit},syslog=off"
    proc = subprocess.Popen([sys.executable, "-m", "shoalfs.cli", "mount", name, mnt, "--master", c.master_addr,
                             "--foreground", "-o", opts], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not is_mounted(mnt):
        if proc.poll() is not None:
            raise RuntimeError("mount failed")
        time.sleep(0.02)
    time.sleep(0.3)  # let the push subscriptions settle
    stop = threading.Event()

    def poke() -> None:
        k = 0
        while not stop.is_set():
            try:
                os.stat(f"{mnt}/p{k}")
            except OSError:
                pass
            k += 1
            time.sleep(0.01)
    poker = threading.Thread(target=poke, daemon=True)
    if path == "error-code":
        poker.start()
    c.admin("/volume/delete", {"name": name})
    proc.wait(60)
    exited = time.time()
    stop.set()
    with open(audit) as f:
        rec = json.loads(f.readline())
    assert proc.returncode == 143 and rec["detection"] == path, (proc.returncode, rec)
    detected = datetime.fromisoformat(rec["detected_at"].replace("Z", "+00:00")).timestamp()
    return rec["detection_latency_ms"], (exited - detected) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--heartbeat", type=float, default=5.0)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="shoal-lc-bench-") as work, bench_cluster() as c:
        for path in ("push", "heartbeat", "error-code"):
            det, ext = [], []
            for i in range(args.rounds):
                d, e = one_round(c, path, i, work, args.heartbeat)
                det.append(d)
                ext.append(e)
            rows.append([path, str(args.rounds), f"{statistics.median(det):.1f}", f"{pct(det, 0.99):.1f}",
                         f"{statistics.median(ext):.1f}", f"{pct(ext, 0.99):.1f}"])
    show(f"deletion detection (heartbeat interval {args.heartbeat:g} s)",
         ["path", "deletions", "detect p50 ms", "detect p99 ms", "exit p50 ms", "exit p99 ms"], rows)


if __name__ == "__main__":
    main()
