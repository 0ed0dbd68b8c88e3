"""`shoal demo`: the main job end to end on an embedded cluster.

Creates a volume, mounts it, writes files, starts a writer, deletes the
volume, and narrates what happened: how and how fast the mount found out,
what the writer saw, the exit code, the audit record, and that the
mountpoint is clean. Exits 0 only if all of it behaved.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from shoalfs.cli.cluster import ClusterError, EmbeddedCluster
from shoalfs.client.mount import is_mounted, lazy_unmount
from shoalfs.common.files import open_private_log
from shoalfs.proto.errors import ShoalError

console = Console()


class Writer(threading.Thread):
    """Appends to a file on the mount, fsyncing now and then, until it fails."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.ok_writes = 0
        self.errno: int | None = None
        self.longest_call = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            self.errno = exc.errno
            return
        try:
            while not self.stop.is_set():
                t = time.monotonic()
                try:
                    os.write(fd, b"tick %d\n" % self.ok_writes)
                    if self.ok_writes % 20 == 19:
                        os.fsync(fd)
                    self.ok_writes += 1
                except OSError as exc:
                    self.errno = exc.errno
                    return
                finally:
                    self.longest_call = max(self.longest_call, time.monotonic() - t)
                time.sleep(0.005)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


class Check:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, bool]] = []

    def __call__(self, what: str, detail: str, ok: bool) -> bool:
        self.rows.append((what, detail, ok))
        console.print(f"   {'[green]✓[/]' if ok else '[red]✗[/]'} {what}: {detail}")
        return ok

    @property
    def ok(self) -> bool:
        return all(r[2] for r in self.rows)


def _listen_syslog(path: str) -> tuple[socket.socket, list[str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    records: list[str] = []

    def loop() -> None:
        while True:
            try:
                records.append(sock.recv(65536).decode(errors="replace"))
            except TimeoutError:
                continue
            except OSError:
                return
    threading.Thread(target=loop, daemon=True).start()
    return sock, records


def run_demo(data_dir: str | None) -> int:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        console.print("[red]the demo mounts through FUSE: run it as root on a machine with /dev/fuse[/]")
        return 1
    work = tempfile.mkdtemp(prefix="shoal-demo-")
    os.chmod(work, 0o755)
    cluster = EmbeddedCluster(data_dir or os.path.join(work, "cluster"))
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    audit_log = os.path.join(work, "audit.log")
    sock, records = _listen_syslog(os.path.join(work, "syslog.sock"))
    check = Check()
    mount: subprocess.Popen[bytes] | None = None
    try:
        console.rule("[bold]shoalfs demo: deleting a mounted volume")
        console.print("[bold]1.[/] starting an embedded cluster (master, 3 metanodes, 3 datanodes)")
        cluster.up()
        vol = cluster.create_volume("demo", owner="demo-user", capacity_gib=1)
        console.print(f"   master {cluster.master_addr}; volume demo, vol_id {vol['vol_id']}")

        console.print(f"[bold]2.[/] mounting it on {mnt}")
        opts = f"syslog=unix:{sock.getsockname()},audit_log={audit_log}"
        mount = subprocess.Popen([sys.executable, "-m", "shoalfs.cli", "mount", "demo", mnt, "--master",
                                  cluster.master_addr, "--key-file", cluster.key_file("demo"),
                                  "--foreground", "-o", opts],
                                 stdout=subprocess.DEVNULL, stderr=open_private_log(os.path.join(work, "mount.log")))
        end = time.monotonic() + 30
        while not is_mounted(mnt) and mount.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        if not check("mounted", mnt, is_mounted(mnt)):
            return 1

        console.print("[bold]3.[/] writing files through the mount")
        os.makedirs(f"{mnt}/photos/2026")
        for name, size in (("hello.txt", 15), ("photos/2026/raw.bin", 3 << 20)):
            with open(f"{mnt}/{name}", "wb") as f:
                f.write(os.urandom(size))
        table = Table()
        table.add_column("path")
        table.add_column("bytes", justify="right")
        for root, _, files in os.walk(mnt):
            for name in files:
                full = os.path.join(root, name)
                table.add_row(os.path.relpath(full, mnt), str(os.path.getsize(full)))
        console.print(table)

        console.print("[bold]4.[/] starting a writer that appends to a file and fsyncs every 20 writes")
        writer = Writer(f"{mnt}/journal.log")
        writer.start()
        while writer.ok_writes < 50 and writer.errno is None:
            time.sleep(0.01)

        console.print("[bold]5.[/] an administrator deletes the volume (shoal volume delete demo --yes)")
        deleted_at = time.time()
        cluster.admin("/volume/delete", {"name": "demo"})
        try:
            code = mount.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        exited_after = time.time() - deleted_at
        writer.stop.set()
        writer.join(10)

        console.print("[bold]6.[/] what happened")
        record: dict[str, Any] = {}
        if os.path.exists(audit_log):
            with open(audit_log) as f:
                record = json.loads(f.readline())
        check("detected", f"via {record.get('detection')} in {record.get('detection_latency_ms')} ms "
              "after the delete", bool(record))
        check("exit code", f"{code} (143 means: volume deleted)", code == 143)
        check("exit time", f"{exited_after * 1000:.0f} ms from the delete to the process exit", exited_after < 5)
        errname = errno.errorcode.get(writer.errno or 0, str(writer.errno))
        check("writer", f"{writer.ok_writes} writes succeeded, then {errname} "
              f"({os.strerror(writer.errno) if writer.errno else 'no error'})", writer.errno == errno.ESTALE)
        check("no blocked call", f"the writer's longest call took {writer.longest_call * 1000:.0f} ms",
              writer.longest_call < 5)
        end = time.monotonic() + 5
        while not records and time.monotonic() < end:
            time.sleep(0.05)
        check("syslog record", records[0][:160] + "…" if records else "none received", bool(records))
        check("audit log", f"{audit_log}: {json.dumps(record)[:120]}…", bool(record))
        clean = not is_mounted(mnt) and os.listdir(mnt) == []
        check("mountpoint", f"{mnt} is unmounted and empty (no 'Transport endpoint is not connected')", clean)
    except (ClusterError, ShoalError, OSError) as exc:
        check("demo", f"failed: {exc}", False)
    finally:
        if mount is not None and mount.poll() is None:
            mount.send_signal(signal.SIGTERM)
            mount.wait(10)
        if is_mounted(mnt):
            lazy_unmount(mnt)
        console.print("[bold]7.[/] stopping the cluster")
        cluster.down()
        sock.close()
        if data_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    console.rule("[green]demo passed: found out, told the writer, cleaned up, exited 143[/]"
                 if check.ok else "[red]demo FAILED[/]")
    return 0 if check.ok else 1
