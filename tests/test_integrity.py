"""Integrity under faults and bad input (issue 7, DESIGN.md §8): real processes,
real disks filled to ENOSPC, files lost under a datanode, hostile requests."""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

import pytest
from conftest import RawRpc, fill_disk, volume_cap, wait_for

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import CHUNK, MAX_IO, extent_id
from shoalfs.proto.opcodes import Op
from shoalfs.proto.rpc import RpcConnection

MiB = 1024 * 1024


rpc = RawRpc()  # no capability: enough for a ping; tests on a volume shadow it with one that has


def serving(addr: str) -> bool:
    return rpc(addr, Op.PING, 0, {})[0] == 0 if _port_open(addr) else False


def _port_open(addr: str) -> bool:
    import socket
    host, port = addr.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def extent_path(c: EmbeddedCluster, dp: int, ext: int) -> str:
    for root, _, files in os.walk(os.path.join(c.dir, "data")):
        if root.endswith(f"dp_{dp}") and f"e_{ext}" in files:
            return os.path.join(root, f"e_{ext}")
    raise AssertionError(f"extent {ext} of data partition {dp} not found")


def extents_of(vol: Any, path: str) -> dict[int, list[int]]:
    ino = vol.stat(path).st_ino
    return asyncio.run_coroutine_threadsafe(vol.client.extents(ino), vol._loop.loop).result()


# ----- 1. the metanode journal on a full disk ---------------------------------------------
def test_full_metanode_disk_loses_nothing_acknowledged(cluster_factory, tmpfs) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=1, datanodes=1)
    c.stop("metanode1")
    meta_dir = os.path.join(c.dir, "data", "metanode1")
    tmpfs(meta_dir, 4 * MiB)
    c.start("metanode1")
    c.wait_ready()
    c.create_volume("full")
    with c.connect("full") as vol:
        vol.mkdir("/d")
        for i in range(20):
            vol.open(f"/d/before{i}", "wb").close()
        filler = fill_disk(meta_dir)
        acked: set[str] = set()
        refused = 0
        # records still fit in the space the journal took ahead (PREALLOCATE); then ENOSPC
        for i in range(5000):
            try:
                vol.open(f"/d/full{i}", "wb").close()
                acked.add(f"full{i}")
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                refused += 1
                if refused == 30:
                    break
        assert refused == 30, (refused, len(acked))
        # what was acknowledged is still served, and no failed create shows up
        before = {f"before{i}" for i in range(20)}
        assert set(vol.listdir("/d")) == before | acked
        assert vol.stat("/d/before3").st_size == 0
        os.unlink(filler)  # space is back: writes work again without a restart
        for i in range(50):
            with vol.open(f"/d/after{i}", "wb") as f:
                f.write(b"x")
                f.fsync()
    c.kill("metanode1")
    c.start("metanode1")
    c.wait_ready()
    with c.connect("full") as vol:
        names = set(vol.listdir("/d"))
        assert names == before | acked | {f"after{i}" for i in range(50)}
        assert vol.open("/d/after49", "rb").read() == b"x"


# ----- 2. bytes that were written never read back as zeros ------------------------------------
def test_missing_or_truncated_extent_is_eio_not_zeros(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=1, datanodes=1)
    c.create_volume("lost")
    with c.connect("lost") as vol:
        for name in ("gone", "short", "sparse"):
            with vol.open(f"/{name}", "wb") as f:
                f.write(os.urandom(100_000))
                if name == "sparse":
                    f.seek(3 * MiB)
                    f.write(b"tail")
                f.fsync()
        (dp, ext), = extents_of(vol, "/gone").values()
        gone = extent_path(c, dp, ext)
        os.unlink(gone)
        os.unlink(gone + ".crc")
        (dp, ext), = extents_of(vol, "/short").values()
        os.truncate(extent_path(c, dp, ext), 8192)
        for name in ("gone", "short"):
            with pytest.raises(OSError) as err:
                vol.open(f"/{name}", "rb").read()
            assert err.value.errno == errno.EIO, name
        # the sound part of a truncated extent still reads; a sparse file's hole is zeros
        assert len(vol.open("/short", "rb").read(8192)) == 8192
        with vol.open("/sparse", "rb") as f:
            f.seek(100_000)
            assert f.read(3 * MiB - 100_000) == bytes(3 * MiB - 100_000)
            assert f.read() == b"tail"
    with open(c.log_path("datanode1")) as f:
        assert f"data partition {dp}, extent {ext}:" in f.read()  # the log names partition and extent


# ----- 3. a datanode disk that fills between the check and the write ----------------------------
def test_full_datanode_disk_never_acknowledges_a_partial_write(cluster_factory, tmpfs) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=1, datanodes=1, datanode={"reserve_bytes": 0})
    vol = c.create_volume("dfull")
    c.stop("datanode1")
    tmpfs(os.path.join(c.dir, "data", "datanode1"), 3 * MiB + MiB // 2)
    c.start("datanode1")
    c.wait_ready()
    dp = vol["data_partitions"][0]
    addr, pid = dp["replicas"][0], dp["pid"]
    wait_for(lambda: serving(addr), 30, "the datanode to serve")
    payloads = {extent_id(1000 + i, 0): os.urandom(MiB) for i in range(8)}

    cap = volume_cap(c, "dfull")

    async def write_all() -> dict[int, int]:
        conn = RpcConnection(addr)
        await conn.connect(5)
        await conn.authenticate(cap, 5)

        async def one(ext: int, data: bytes) -> int:
            try:
                await conn.call(Op.DATA_WRITE, pid, {"ext": ext, "offset": 0, "data": data, "sync": True}, 30)
                return 0
            except ShoalError as exc:
                return exc.code
        try:  # all in flight at once: each passes the free-space check before any lands
            codes = await asyncio.gather(*(one(e, d) for e, d in payloads.items()))
        finally:
            await conn.close()
        return dict(zip(payloads, codes, strict=True))

    codes = asyncio.run(write_all())
    rpc = RawRpc(cap)
    assert set(codes.values()) <= {0, Code.NO_SPACE}, codes
    assert Code.NO_SPACE in codes.values() and 0 in codes.values(), codes
    for ext, code in codes.items():
        if code == 0:  # every acknowledged write reads back whole
            assert rpc(addr, Op.DATA_READ, pid, {"ext": ext, "offset": 0, "size": MiB}) == (0, {"data": payloads[ext]})


# ----- 4. out-of-range and wrong-typed fields on every opcode family ------------------------------
def test_bad_fields_change_nothing(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=1, datanodes=1)
    vol_info = c.create_volume("fields")
    with c.connect("fields") as vol:
        with vol.open("/f", "wb") as f:
            f.write(b"hello")
        ino = vol.stat("/f").st_ino
    root_part = next(p for p in vol_info["meta_partitions"] if p["start"] <= 1 < p["end"])
    maddr, mpid = root_part["replicas"][0], root_part["pid"]
    dp = vol_info["data_partitions"][0]
    daddr, dpid = dp["replicas"][0], dp["pid"]
    rpc = RawRpc(volume_cap(c, "fields"))

    def state() -> Any:
        return (rpc(maddr, Op.META_GET_INODE, mpid, {"ino": 1}), rpc(maddr, Op.META_EXTENT_LIST, mpid, {"ino": ino}),
                rpc(maddr, Op.META_READDIR, mpid, {"parent": 1}))

    before = state()
    assert before[0][0] == 0
    huge = (1 << 64) - 1
    meta_cases: list[tuple[int, dict[str, Any]]] = [
        (Op.META_SET_ATTR, {"ino": 1, "atime": 1e30}),
        (Op.META_SET_ATTR, {"ino": 1, "atime": (1 << 64) - 1}),
        (Op.META_SET_ATTR, {"ino": ino, "size": -1}),
        (Op.META_SET_ATTR, {"ino": ino, "uid": -3}),
        (Op.META_SET_ATTR, {"ino": ino, "mode": "0777"}),
        (Op.META_SET_ATTR, {"ino": 1, "size": 5}),  # a directory has no size to set
        (Op.META_CREATE, {"parent": 1, "name": "x", "mode": 0o100644, "uid": 1 << 40}),
        (Op.META_CREATE, {"parent": 1, "name": b"bytes", "mode": 0o100644}),
        (Op.META_CREATE, {"parent": 1, "name": "x", "mode": 0o644}),  # no file type
        (Op.META_CREATE, {"parent": 1, "name": "x", "mode": 0o100644, "target": "t" * 5000}),
        (Op.META_CREATE, {"parent": True, "name": "x", "mode": 0o100644}),
        (Op.META_CREATE_DENTRY, {"parent": 1, "name": "y", "ino": 0, "mode": 0o100644}),
        (Op.META_EXTENT_SET, {"ino": ino, "chunk": 0, "dp": 987654, "ext": extent_id(ino, 0)}),
        (Op.META_EXTENT_SET, {"ino": ino, "chunk": 1, "dp": dpid, "ext": extent_id(ino + 1, 1)}),
        (Op.META_EXTENT_SET, {"ino": ino, "chunk": 1 << 21, "dp": dpid, "ext": 5}),
        (Op.META_EXTENT_SET, {"ino": 1, "chunk": 0, "dp": dpid, "ext": extent_id(1, 0)}),
        (Op.META_EXTENT_DROP, {"ino": ino, "chunks": "all"}),
        (Op.META_SET_XATTR, {"ino": ino, "name": "user.a", "value": b"v" * (65 * 1024)}),
        (Op.META_SET_XATTR, {"ino": ino, "name": "user.a", "value": "str"}),
        (Op.META_DELETE_DENTRY, {"parent": 1, "name": "f", "keep": [huge]}),
        (Op.META_READDIR, {"parent": 1, "limit": 0}),
        (Op.META_BATCH_GET_INODE, {"inos": list(range(1, 20_000))}),
        (Op.META_RENAME, {"src_parent": 1, "src_name": "f", "dst_parent": 1, "dst_name": "g", "dst_pid": -1}),
        (Op.META_RENAME_LINK_TX, {"txid": "t" * 100, "parent": 1, "name": "z", "ino": ino, "mode": 0o100644}),
        (Op.SUBSCRIBE, {"vol_id": 7}),
        (Op.META_GET_INODE, [1, 2]),
    ]
    for op, body in meta_cases:
        code, msg = rpc(maddr, op, mpid, body)
        expected = {Code.BAD_REQUEST, Code.INVALID, Code.NAME_TOO_LONG, Code.TOO_BIG}
        if op == Op.META_RENAME_LINK_TX:  # a metanode's call: refused to a client before anything else
            expected = {Code.FORBIDDEN}
        assert code in expected, (op, body, code, msg)
        assert state() == before, (op, body)  # memory exactly as before
    data_cases: list[tuple[int, dict[str, Any]]] = [
        (Op.DATA_WRITE, {"ext": 1, "offset": -5, "data": b"x"}),
        (Op.DATA_WRITE, {"ext": 1, "offset": CHUNK - 1, "data": b"xy"}),  # past the extent's end
        (Op.DATA_WRITE, {"ext": 1, "offset": 0, "data": "str"}),
        (Op.DATA_WRITE, {"ext": -1, "offset": 0, "data": b"x"}),
        # a later piece that is bad refuses the whole write, the good first piece too
        (Op.DATA_WRITE, {"ext": 1, "offset": 0, "data": b"x", "more": [[CHUNK - 1, b"xy"]]}),
        (Op.DATA_WRITE, {"ext": 1, "offset": 0, "data": b"x", "more": [[5]]}),
        (Op.DATA_WRITE, {"ext": 1, "offset": 0, "data": b"x", "more": [[5, "str"]]}),
        (Op.DATA_WRITE, {"ext": 1, "offset": 0, "data": b"x", "more": [[i, b"y"] for i in range(1025)]}),
        (Op.DATA_WRITE, {"ext": 1, "offset": 0, "data": bytes(MAX_IO), "more": [[MAX_IO, b"y"]]}),
        (Op.DATA_READ, {"ext": 1, "offset": 0, "size": MAX_IO + 1}),
        (Op.DATA_READ, {"ext": 1, "offset": 0.5, "size": 10}),
        (Op.DATA_TRUNCATE, {"ext": 1, "size": -1}),
        (Op.DATA_SYNC, {"ext": "1"}),
    ]
    for op, body in data_cases:
        code, msg = rpc(daddr, op, dpid, body)
        assert code == Code.BAD_REQUEST, (op, body, code, msg)
    assert not os.path.exists(os.path.join(c.dir, "data", "datanode1", f"dp_{dpid}", "e_1"))
    # the partitions keep serving: stat /, create in /, read the file
    with c.connect("fields") as vol:
        vol.open("/after", "wb").close()
        assert sorted(vol.listdir("/")) == ["after", "f"]
        assert vol.open("/f", "rb").read() == b"hello"
        assert vol.stat("/").st_mtime > 0


# ----- 5. a rename's target comes from the master's map, never from the request -------------------
def test_rename_never_follows_an_address_from_the_request(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=2, datanodes=1)
    info = c.create_volume("ren")
    with c.connect("ren") as vol:
        vol.open("/f", "wb").close()
        for i in range(6):  # directories are spread: find one in another partition than /
            vol.mkdir(f"/d{i}")
        root_part = next(p for p in info["meta_partitions"] if p["start"] <= 1 < p["end"])
        other = next(p for p in info["meta_partitions"]
                     for i in range(6) if p is not root_part and p["start"] <= vol.stat(f"/d{i}").st_ino < p["end"])
        d_name = next(f"d{i}" for i in range(6) if other["start"] <= vol.stat(f"/d{i}").st_ino < other["end"])
        d_ino = vol.stat(f"/{d_name}").st_ino
        addr, pid = root_part["replicas"][0], root_part["pid"]
        rpc = RawRpc(volume_cap(c, "ren"))
        base = {"src_parent": 1, "src_name": "f", "dst_parent": d_ino, "dst_name": "f"}
        # a partition that is not in the volume: refused, nothing stuck behind it
        code, _ = rpc(addr, Op.META_RENAME, pid, dict(base, dst_pid=987654, dst_addr="127.0.0.1:1"))
        assert code == Code.INVALID
        code, _ = rpc(addr, Op.META_RENAME, pid, dict(base, dst_pid=root_part["pid"] + 10**6))
        assert code == Code.INVALID
        # a bogus address beside the right partition is ignored: the rename completes at once
        code, reply = rpc(addr, Op.META_RENAME, pid, dict(base, dst_pid=other["pid"], dst_addr="10.255.255.1:9"),
                          timeout=10)
        assert code == 0, reply
        assert vol.listdir(f"/{d_name}") == ["f"] and "f" not in vol.listdir("/")
        vol.rename(f"/{d_name}/f", "/f")  # and the name is free to move again
        assert "f" in vol.listdir("/")


# ----- the partition map survives a metanode restart without the master -----------------------------
def test_metanode_serves_extents_before_the_master_returns(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=1, datanodes=1)
    c.create_volume("nomaster")
    with c.connect("nomaster") as vol:
        wait_for(lambda: os.path.exists(os.path.join(c.dir, "data", "metanode1", "volumes.json")), 10,
                 "the metanode to save the volume map")
        c.stop("master")
        c.kill("metanode1")
        c.start("metanode1")
        with vol.open("/f", "wb") as f:  # extent_set needs the map: it came from disk
            f.write(b"data")
        assert vol.open("/f", "rb").read() == b"data"
    assert os.stat(os.path.join(c.dir, "data", "metanode1")).st_mode & 0o777 == 0o700


# ----- a directory is replaced by a rename only if the client prepared it (empty, closed) --------------
def test_rename_replaces_only_a_prepared_directory(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=1, datanodes=1)
    info = c.create_volume("prep")
    with c.connect("prep") as vol:
        vol.makedirs("/full")
        vol.open("/full/f", "wb").close()
        vol.mkdir("/empty")
        full = vol.stat("/full").st_ino
    part = info["meta_partitions"][0]
    rpc = RawRpc(volume_cap(c, "prep"))
    body = {"src_parent": 1, "src_name": "empty", "dst_parent": 1, "dst_name": "full", "dst_pid": part["pid"]}
    code, _ = rpc(part["replicas"][0], Op.META_RENAME, part["pid"], body)
    assert code == Code.NOT_EMPTY  # no claim of a prepared directory: refused
    code, _ = rpc(part["replicas"][0], Op.META_RENAME, part["pid"], dict(body, replace_dir=full + 1))
    assert code == Code.NOT_EMPTY  # a claim about another directory: refused
    with c.connect("prep") as vol:
        assert vol.listdir("/full") == ["f"] and sorted(vol.listdir("/")) == ["empty", "full"]
