"""`shoal volume fsck`: finds and repairs what a client killed mid-operation
leaves behind, dangling entries and wrong link counts (issue 11, item 4)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

from conftest import RawRpc, shoal_env, volume_cap
from test_cli import shoal

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.proto.opcodes import Op

HALF_MKDIR = textwrap.dedent("""
    import asyncio, stat, sys, time
    from shoalfs.client.core import ClientOptions, VolumeClient
    async def go():
        key = open(sys.argv[3]).read().strip()
        client = VolumeClient(sys.argv[1], sys.argv[2], ClientOptions(watch=False), key=key)
        await client.open()
        attr = await client._new_inode(stat.S_IFDIR | 0o755, 0, 0)  # the first of mkdir's two steps
        print(attr["ino"], flush=True)
        await asyncio.sleep(3600)  # killed here, before the entry is made
    asyncio.run(go())
""")


def leak_directory(c: EmbeddedCluster, volume: str) -> int:
    """A directory inode leaked by a client killed between mkdir's two steps."""
    half = subprocess.Popen([sys.executable, "-c", HALF_MKDIR, c.master_addr, volume, c.key_file(volume)],
                            stdout=subprocess.PIPE, text=True)
    try:
        return int(half.stdout.readline())
    finally:
        half.send_signal(signal.SIGKILL)
        half.wait()


def fsck(c: EmbeddedCluster, *extra: str) -> tuple[int, dict]:
    proc = shoal("volume", "fsck", "fs", "--grace", "0", "--json", *extra, env=shoal_env(c))
    return proc.returncode, json.loads(proc.stdout)


def test_fsck_finds_and_repairs(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=2, datanodes=1)
    info = c.create_volume("fs")
    with c.connect("fs") as vol:
        vol.makedirs("/a/b")
        with vol.open("/a/file", "wb") as f:
            f.write(b"keep me")
        ino = vol.stat("/a/file").st_ino
        a_ino = vol.stat("/a").st_ino
    assert fsck(c) == (0, {"inodes": 4, "entries": 3, "findings": [], "usage": []})
    leaked = leak_directory(c, "fs")
    # a dangling entry, and a link count one too high
    rpc = RawRpc(volume_cap(c, "fs"))
    a_part = next(p for p in info["meta_partitions"] if p["start"] <= a_ino < p["end"])
    missing = a_part["end"] - 7
    assert rpc(a_part["replicas"][0], Op.META_CREATE_DENTRY, a_part["pid"],
               {"parent": a_ino, "name": "ghost", "ino": missing, "mode": 0o100644})[0] == 0
    f_part = next(p for p in info["meta_partitions"] if p["start"] <= ino < p["end"])
    assert rpc(f_part["replicas"][0], Op.META_LINK_INODE, f_part["pid"], {"ino": ino})[0] == 0

    code, report = fsck(c)
    assert code == 1
    found = {(f["kind"], f["ino"]) for f in report["findings"]}
    assert found == {("orphan", leaked), ("dangling", missing), ("nlink", ino)}, report
    assert not any(f["repaired"] for f in report["findings"])
    code, report = fsck(c, "--repair")
    assert code == 0 and all(f["repaired"] for f in report["findings"]) and len(report["findings"]) == 3
    assert fsck(c) == (0, {"inodes": 4, "entries": 3, "findings": [], "usage": []})
    with c.connect("fs") as vol:
        assert sorted(vol.listdir("/a")) == ["b", "file"]
        assert vol.open("/a/file", "rb").read() == b"keep me"
        assert vol.stat("/a/file").st_nlink == 1


def test_fsck_leaves_recent_changes_alone(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=1, datanodes=1)
    info = c.create_volume("fs")
    part = info["meta_partitions"][0]
    rpc = RawRpc(volume_cap(c, "fs"))
    code, inode = rpc(part["replicas"][0], Op.META_CREATE_INODE, part["pid"], {"mode": 0o100644})
    assert code == 0
    proc = shoal("volume", "fsck", "fs", "--json", env=shoal_env(c))  # the default grace: 10 minutes
    assert proc.returncode == 0 and json.loads(proc.stdout)["findings"] == [], proc.stdout
