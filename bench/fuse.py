"""FUSE benchmark: a shoal mount vs the in-memory pyfuse3 ceiling vs a local dir.

    python -m bench.fuse            (as root; needs fio)

Prints one table: 256 MiB dd write (conv=fsync) and cold read (caches
dropped), create/stat/unlink of 2,000 files, fio 4 KiB random read/write IOPS.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from bench.common import bench_cluster, show
from shoalfs.client.mount import is_mounted, lazy_unmount

FILES = 2000


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


def measure(path: str, source: str = "/dev/zero", fio: bool = True) -> dict[str, str]:
    """dd of 256 MiB from `source`, metadata rates, and (with `fio`) fio IOPS."""
    res: dict[str, str] = {}
    target = os.path.join(path, "dd.bin")
    write = dd([f"if={source}", f"of={target}", "bs=1M", "count=256", "conv=fsync"])
    res["dd write 256 MiB (fsync)"] = f"{write:.0f} MiB/s"
    drop_caches()
    res["dd cold read 256 MiB"] = f"{dd([f'if={target}', 'of=/dev/null', 'bs=1M']):.0f} MiB/s"
    os.unlink(target)
    d = os.path.join(path, "meta")
    os.mkdir(d)
    for label, fn in (("create", lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))),
                      ("stat", os.stat), ("unlink", os.unlink)):
        t = time.perf_counter()
        for i in range(FILES):
            fn(f"{d}/f{i}")
        res[f"{label} {FILES} files"] = f"{FILES / (time.perf_counter() - t):.0f} /s"
    if fio:
        res["fio 4k randwrite"] = f"{fio_iops(path, 'randwrite'):.0f} IOPS"
        res["fio 4k randread"] = f"{fio_iops(path, 'randread'):.0f} IOPS"
    shutil.rmtree(d, ignore_errors=True)
    return res


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


def main() -> None:
    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-fuse-bench-") as work:
        mnt = os.path.join(work, "mnt")
        os.makedirs(mnt)
        with bench_cluster() as c:
            c.create_volume("bench")
            with mounted([sys.executable, "-m", "shoalfs.cli", "mount", "bench", mnt, "--master",
                          c.master_addr, "--key-file", c.key_file("bench"), "--foreground"], mnt):
                results["shoal mount"] = measure(mnt)
        with mounted([sys.executable, "-m", "bench.memfs", mnt], mnt):
            results["in-memory pyfuse3"] = measure(mnt)
        local = os.path.join(work, "local")
        os.makedirs(local)
        results["local directory"] = measure(local)
    names = list(results)
    rows = [[metric] + [results[n][metric] for n in names] for metric in results[names[0]]]
    show("FUSE benchmark", ["metric", *names], rows)


if __name__ == "__main__":
    main()
