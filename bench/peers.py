"""shoalfs side by side with its peers, in one run on this machine.

    python -m bench.peers [--only NAME,...] [--seconds 5]      (as root; needs fio)

Each file system gets the same workloads, one after another: dd of 256 MiB
of random bytes (write with conv=fsync; read after dropping caches), 2,000
empty files created, stat'ed after dropping caches (every stat a lookup) and
unlinked, fio 4 KiB random reads and writes, and 1 MiB sequential writes and
cold reads by 1 and by 8 jobs (fio numjobs, 512 MiB in all). The file
systems: shoalfs with 1 and 3 replicas (one embedded cluster, 3 metanodes
and 3 datanodes), the in-memory pyfuse3 ceiling (bench.memfs), the local
disk, GlusterFS (1 brick and replica 3) and SeaweedFS when installed (peers
are skipped when absent). Numbers are MiB/s as 2^20 bytes per second.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from bench.common import bench_cluster, show
from bench.peerfs import gluster, gluster_available, seaweed, seaweed_available
from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.client.mount import is_mounted, lazy_unmount

FILES = 2000
DD_MIB = 256
STREAM_MIB = 512  # fio sequential: split across the jobs

Target = Callable[[str], contextlib.AbstractContextManager[str]]  # work dir -> a mounted directory


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def dd(args: list[str]) -> float:
    """MB/s as dd reports it."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    m = re.search(r"copied, ([\d.]+) s, ([\d.]+) (\w)B/s", out)
    assert m, out
    secs = float(m.group(1))
    size = int(out.split(" bytes")[0].split()[-1]) if " bytes" in out else 0
    return size / secs / (1 << 20)


def fio_iops(directory: str, rw: str, seconds: int = 10) -> float:
    out = subprocess.run(["fio", "--name=b", f"--directory={directory}", f"--rw={rw}", "--bs=4k",
                          "--size=64m", f"--runtime={seconds}", "--time_based", "--ioengine=psync",
                          "--output-format=terse", "--terse-version=3"], capture_output=True, text=True,
                         check=True).stdout
    fields = out.strip().splitlines()[-1].split(";")
    read_iops, write_iops = float(fields[7]), float(fields[48])
    return read_iops if rw == "randread" else write_iops


@contextlib.contextmanager
def mounted(cmd: list[str], mnt: str) -> Iterator[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 30
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{cmd[2:4]} did not mount")
            time.sleep(0.05)
        yield mnt
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        if is_mounted(mnt):
            lazy_unmount(mnt)


def fio_stream(directory: str, rw: str, jobs: int) -> float:
    """MiB/s of `jobs` fio jobs moving STREAM_MIB in 1 MiB requests together."""
    out = subprocess.run(["fio", "--name=s", f"--directory={directory}", f"--rw={rw}", "--bs=1M",
                          f"--size={STREAM_MIB // jobs}m", f"--numjobs={jobs}", "--ioengine=psync",
                          "--end_fsync=1", "--group_reporting", "--output-format=terse",
                          "--terse-version=3"], capture_output=True, text=True, check=True).stdout
    fields = out.strip().splitlines()[-1].split(";")
    kib_s = float(fields[6]) if rw == "read" else float(fields[47])
    return kib_s / 1024


def measure(path: str, source: str, seconds: int = 5, fio: bool = True) -> dict[str, str]:
    """dd, metadata rates, and (with `fio`) the fio runs, on a mounted directory."""
    res: dict[str, str] = {}
    target = os.path.join(path, "dd.bin")
    res["dd write 256 MiB (fsync), MiB/s"] = f"{dd([f'if={source}', f'of={target}', 'bs=1M', 'conv=fsync']):.0f}"
    drop_caches()
    res["dd cold read 256 MiB, MiB/s"] = f"{dd([f'if={target}', 'of=/dev/null', 'bs=1M']):.0f}"
    os.unlink(target)
    d = os.path.join(path, "meta")
    os.mkdir(d)
    for label, fn in (("creates", lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))),
                      ("stats (cold)", os.stat), ("unlinks", os.unlink)):
        if label.startswith("stats"):
            drop_caches()  # dentries and inodes too: every stat is a lookup
        t = time.perf_counter()
        for i in range(FILES):
            fn(f"{d}/f{i}")
        res[f"{label}/s"] = f"{FILES / (time.perf_counter() - t):.0f}"
    os.rmdir(d)
    if not fio:
        return res
    for rw in ("randwrite", "randread"):
        res[f"fio 4k {rw}, IOPS"] = f"{fio_iops(path, rw, seconds):.0f}"
    for f in os.listdir(path):
        if f.startswith("b."):  # fio's files
            os.unlink(os.path.join(path, f))
    for jobs in (1, 8):
        res[f"fio write 1M x{jobs} jobs, MiB/s"] = f"{fio_stream(path, 'write', jobs):.0f}"
        drop_caches()
        res[f"fio read 1M x{jobs} jobs, MiB/s"] = f"{fio_stream(path, 'read', jobs):.0f}"
        for f in os.listdir(path):
            os.unlink(os.path.join(path, f))
    return res


@contextlib.contextmanager
def shoal_mount(c: EmbeddedCluster, replicas: int, work: str) -> Iterator[str]:
    name = f"r{replicas}"
    c.create_volume(name, replicas=replicas)
    mnt = os.path.join(work, name)
    os.makedirs(mnt)
    with mounted([sys.executable, "-m", "shoalfs.cli", "mount", name, mnt, "--master",
                  c.master_addr, "--key-file", c.key_file(name), "--foreground"], mnt):
        yield mnt


@contextlib.contextmanager
def memfs(work: str) -> Iterator[str]:
    mnt = os.path.join(work, "memfs")
    os.makedirs(mnt)
    with mounted([sys.executable, "-m", "bench.memfs", mnt], mnt):
        yield mnt


@contextlib.contextmanager
def local(work: str) -> Iterator[str]:
    d = os.path.join(work, "local")
    os.makedirs(d)
    yield d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated column names to run (default: all available): "
                    "shoal 1 replica, shoal 3 replicas, in-memory pyfuse3, local disk, GlusterFS 1 brick, "
                    "GlusterFS replica 3, SeaweedFS")
    ap.add_argument("--seconds", type=int, default=5, help="fio random I/O run time per test")
    args = ap.parse_args()
    shoal = {"shoal 1 replica": 1, "shoal 3 replicas": 3}
    targets: dict[str, Target] = {"in-memory pyfuse3": memfs, "local disk": local}
    if gluster_available():
        targets["GlusterFS 1 brick"] = lambda w: gluster(w, os.path.join(w, "g1"), 1)
        targets["GlusterFS replica 3"] = lambda w: gluster(w, os.path.join(w, "g3"), 3)
    if seaweed_available():
        targets["SeaweedFS"] = lambda w: seaweed(w, os.path.join(w, "sw"))
    wanted = args.only.split(",") if args.only else [*shoal, *targets]
    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-peers-") as work:
        source = os.path.join(work, "random.bin")
        with open(source, "wb") as f:
            for _ in range(DD_MIB):
                f.write(os.urandom(1 << 20))

        def run(name: str, target: contextlib.AbstractContextManager[str]) -> None:
            with target as path:
                results[name] = measure(path, source, args.seconds)
            print(name, results[name], flush=True)

        if any(n in shoal for n in wanted):
            with bench_cluster() as c:  # up only while shoal runs: its heartbeats cost the others nothing
                for name in (n for n in wanted if n in shoal):
                    run(name, shoal_mount(c, shoal[name], work))
        for name in (n for n in wanted if n not in shoal):
            run(name, targets[name](work))
    names = list(results)
    rows = [[metric] + [results[n][metric] for n in names] for metric in results[names[0]]]
    show("shoalfs and its peers", ["metric", *names], rows)


if __name__ == "__main__":
    main()
