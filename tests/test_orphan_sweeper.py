"""The metanodes' orphan sweeper (issue 11, item 4): inodes that kept a link
count but lost their name are reclaimed by themselves, and a rename storm
during its sweeps never costs a named file."""

from __future__ import annotations

import json
import threading

from conftest import RawRpc, volume_cap, wait_for
from test_fsck import fsck, leak_directory

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.proto.errors import Code
from shoalfs.proto.opcodes import Op

FAST_SWEEPS = {"orphan_scan_interval": 0.3, "orphan_grace": 1, "open_lease": 2}


def metanode_logs(c: EmbeddedCluster) -> str:
    out = ""
    for name in c.layout["nodes"]:
        if name.startswith("metanode"):
            with open(c.log_path(name), errors="replace") as f:
                out += f.read()
    return out


def test_nameless_inodes_are_reclaimed(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=2, datanodes=1, metanode=FAST_SWEEPS)
    info = c.create_volume("fs")
    with c.connect("fs") as vol:
        vol.makedirs("/a/b")
        with vol.open("/a/file", "wb") as f:
            f.write(b"keep me")
    leaked_dir = leak_directory(c, "fs")
    # a file inode with a link count and no name (a crashed cross-partition unlink)
    part = info["meta_partitions"][-1]
    code, inode = RawRpc(volume_cap(c, "fs"))(part["replicas"][0], Op.META_CREATE_INODE, part["pid"],
                                             {"mode": 0o100644})
    assert code == 0
    leaked_file = inode["ino"]
    found = {(f["kind"], f["ino"]) for f in fsck(c)[1]["findings"]}
    assert found == {("orphan", leaked_dir), ("orphan", leaked_file)}
    # nobody runs fsck: the sweeper (two clean sweeps a grace apart) and the reaper free both
    wait_for(lambda: fsck(c) == (0, {"inodes": 4, "entries": 3, "findings": [], "usage": []}), 30,
             "the orphans to be reclaimed")
    logs = metanode_logs(c)
    assert f"orphan inode {leaked_dir} " in logs and "directory dropped" in logs
    assert f"orphan inode {leaked_file} " in logs and "file handed to the reaper" in logs
    with c.connect("fs") as vol:
        assert vol.open("/a/file", "rb").read() == b"keep me"
        assert sorted(vol.listdir("/a")) == ["b", "file"]


def test_a_rename_storm_during_sweeps_loses_no_file(cluster_factory) -> None:
    """With next to no grace (1 ms), only the rename counters stand between a sweep
    that missed a moving entry and a named file reclaimed."""
    c: EmbeddedCluster = cluster_factory(metanodes=3, datanodes=1,
                                         metanode=dict(FAST_SWEEPS, orphan_scan_interval=0.05, orphan_grace=0.001))
    c.create_volume("fs")
    dirs = [f"/d{i}" for i in range(6)]  # directories are spread over the partitions
    names = [f"f{i}" for i in range(20)]
    with c.connect("fs") as vol:
        for d in dirs:
            vol.mkdir(d)
        for n in names:
            with vol.open(f"{dirs[0]}/{n}", "wb") as f:
                f.write(n.encode())
        where = dict.fromkeys(names, dirs[0])
        stop = threading.Event()
        moved = 0

        def storm() -> None:
            nonlocal moved
            i = 0
            while not stop.is_set():
                n = names[i % len(names)]
                target = dirs[(dirs.index(where[n]) + 1 + i % 3) % len(dirs)]
                vol.rename(f"{where[n]}/{n}", f"{target}/{n}")
                where[n] = target
                moved += 1
                i += 1
        t = threading.Thread(target=storm, daemon=True)
        t.start()
        try:
            wait_for(lambda: moved >= 1500 or not t.is_alive(), 120, "1,500 renames")
        finally:
            stop.set()
            t.join(30)
        assert moved >= 1500
        for n in names:
            st = vol.stat(f"{where[n]}/{n}")
            assert st.st_nlink == 1, (n, st)
            with vol.open(f"{where[n]}/{n}", "rb") as f:
                assert f.read() == n.encode()
    assert "orphan inode" not in metanode_logs(c)
    code, report = fsck(c)
    assert code == 0 and report["findings"] == [], json.dumps(report)


def test_a_reclaim_takes_only_what_the_sweep_saw(cluster_factory) -> None:
    """The partition reclaims an inode only if its link count and ctime are
    still those the sweep saw, and never a directory that holds entries."""
    c: EmbeddedCluster = cluster_factory(metanodes=1, datanodes=1)
    info = c.create_volume("fs")
    part = info["meta_partitions"][0]
    addr, pid = part["replicas"][0], part["pid"]
    rpc = RawRpc(volume_cap(c, "fs"))

    def seen(ino: int) -> list:
        code, page = rpc(addr, Op.META_SCAN, pid, {"after": 0, "limit": 1000})
        assert code == 0
        return next(i for i in page["inodes"] if i[0] == ino)
    code, made = rpc(addr, Op.META_CREATE_INODE, pid, {"mode": 0o100644})
    assert code == 0
    ino, _mode, nlink, ctime = seen(made["ino"])
    assert rpc(addr, Op.META_RECLAIM_ORPHAN, pid, {"ino": ino, "ctime": ctime - 1, "nlink": nlink})[0] \
        == Code.TRY_AGAIN
    assert rpc(addr, Op.META_RECLAIM_ORPHAN, pid, {"ino": ino, "ctime": ctime, "nlink": nlink + 1})[0] \
        == Code.TRY_AGAIN
    assert rpc(addr, Op.META_RECLAIM_ORPHAN, pid, {"ino": ino, "ctime": ctime, "nlink": nlink}) \
        == (0, {"reclaimed": True})
    assert seen(ino)[2] == 0  # the reaper's now
    code, made = rpc(addr, Op.META_CREATE_INODE, pid, {"mode": 0o040755})
    assert code == 0
    d, _mode, nlink, ctime = seen(made["ino"])
    assert rpc(addr, Op.META_CREATE_DENTRY, pid, {"parent": d, "name": "x", "ino": ino, "mode": 0o100644})[0] == 0
    d, _mode, nlink, ctime = seen(d)
    assert rpc(addr, Op.META_RECLAIM_ORPHAN, pid, {"ino": d, "ctime": ctime, "nlink": nlink})[0] == Code.NOT_EMPTY
