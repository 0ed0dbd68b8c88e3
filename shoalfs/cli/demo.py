"""`shoal demo`: the main job end to end on an embedded cluster."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from rich.console import Console
from rich.table import Table

from shoalfs.cli.cluster import ClusterError, EmbeddedCluster
from shoalfs.client import connect

console = Console()


def run_demo(data_dir: str | None) -> int:
    own_dir = data_dir is None
    path = data_dir or tempfile.mkdtemp(prefix="shoal-demo-")
    cluster = EmbeddedCluster(path)
    ok = True
    try:
        console.print(f"[bold]1.[/] starting an embedded cluster in {path}")
        cluster.up()
        console.print(f"   master at {cluster.master_addr}; "
                      f"{len(cluster.layout['nodes'])} nodes up")
        vol = cluster.create_volume("demo", owner="demo-user", capacity_gib=1)
        console.print(f"[bold]2.[/] created volume demo (vol_id {vol['vol_id']}) with "
                      f"{len(vol['meta_partitions'])} meta and {len(vol['data_partitions'])} data partitions")
        table = Table(title="files written and read back through the SDK")
        for col in ("path", "bytes", "sha256", "read back"):
            table.add_column(col)
        with connect(cluster.master_addr, "demo") as v:
            v.makedirs("/photos/2026")
            files = {"/hello.txt": b"hello, shoalfs\n", "/photos/2026/raw.bin": os.urandom(3 * 1024 * 1024 + 7),
                     "/empty": b""}
            for p, data in files.items():
                with v.open(p, "wb") as f:
                    f.write(data)
                    f.fsync()
            for p, data in files.items():
                with v.open(p, "rb") as f:
                    same = f.read() == data
                ok &= same
                table.add_row(p, str(len(data)), hashlib.sha256(data).hexdigest()[:16],
                              "[green]identical[/]" if same else "[red]DIFFERENT[/]")
            console.print(table)
            console.print(f"[bold]3.[/] tree: {list(v.walk('/'))}")
    except (ClusterError, OSError) as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        ok = False
    finally:
        console.print("[bold]4.[/] stopping the cluster")
        cluster.down()
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)
    console.print("[green]demo passed[/]" if ok else "[red]demo FAILED[/]")
    return 0 if ok else 1
