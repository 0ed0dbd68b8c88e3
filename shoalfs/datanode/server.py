"""The datanode process: hosts data partitions, each a directory of extents."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from typing import Any

from shoalfs.common.files import atomic_write, fsync_dir
from shoalfs.common.service import DELETE_PARTITION, MASTER_STATE, NEW_PARTITION, NodeService
from shoalfs.datanode.extent_locks import WHOLE, ExtentLocks
from shoalfs.datanode.extents import BLOCK, ENTRY, Extent, install_piece, read_raw, write_span
from shoalfs.datanode.extents import digest as extent_digest
from shoalfs.datanode.resync import UNSOUND, ExtentCopier, sound
from shoalfs.proto.capability import Access
from shoalfs.proto.errors import Code, ShoalError, disk_error
from shoalfs.proto.layout import CHUNK, MAX_IO
from shoalfs.proto.opcodes import Op
from shoalfs.proto.rpc import RpcPool
from shoalfs.proto.schema import U64, Bool, Bytes, Int, ListOf, Map, Opt, Raw, Schema, Tuple, validate
from shoalfs.replication.hub import ReplicationHub
from shoalfs.replication.view import View

log = logging.getLogger(__name__)

EXT = Int(0, U64)
OFFSET = Int(0, CHUNK)  # within an extent
EXTENT_SIZE = Int(0, CHUNK)
MAX_PIECES = 1024  # pieces in one DATA_WRITE
MAX_SIDECAR = CHUNK // BLOCK * ENTRY.size
# the changes a leader forwards to its followers, each checked there as here
CHANGES: dict[int, Schema] = {
    # "more": further [offset, data] pieces of the same extent, written after the first and in
    # order (a write-back of scattered small writes is one request per extent, not one per write)
    Op.DATA_WRITE: {"ext": EXT, "offset": OFFSET, "data": Bytes(MAX_IO), "sync": Opt(Bool, False),
                    "more": Opt(ListOf(Tuple(OFFSET, Bytes(MAX_IO)), MAX_PIECES), [])},
    Op.DATA_TRUNCATE: {"ext": EXT, "size": EXTENT_SIZE},
    Op.DATA_DELETE_EXTENT: {"ext": EXT},
    Op.DATA_SYNC: {"ext": EXT},
}



def _pieces(write: dict[str, Any]) -> list[tuple[int, bytes]]:
    """A DATA_WRITE's pieces, in the order they are written."""
    return [(write["offset"], write["data"]), *((offset, data) for offset, data in write["more"])]


def _span(op: Op | int, change: dict[str, Any]) -> tuple[int, int]:
    """The bytes of its extent a change may touch: a write its pieces', the rest all."""
    return write_span(_pieces(change)) if op == Op.DATA_WRITE else WHOLE


class DataPartition:
    def __init__(self, pid: int, info: dict[str, Any], directory: str, hub: ReplicationHub,
                 fresh: bool = False) -> None:
        self.pid = pid
        self.info = info
        self.dir = directory
        self._locks = ExtentLocks()
        self.names_unsynced = False  # an extent was created by a write not yet followed by a sync
        self.replica = hub.replica(View.of_partition(info), self._persist_view, fresh)
        self.copier = ExtentCopier(self, hub.call)
        self.replica.resync = self.copier.resync
        self.replica.scrubber = self.copier.scrub

    def _persist_view(self, view: View) -> None:
        info = dict(self.info, **view.fields())
        atomic_write(os.path.join(self.dir, "partition.json"), json.dumps(info).encode())
        self.info = info

    def digests(self, verify: bool = False) -> dict[int, tuple[int, int]]:
        """ext -> digest of every extent held here (see extents.digest); with
        `verify`, an extent with a block that fails its checksum is UNSOUND."""
        out = {}
        with os.scandir(self.dir) as it:
            names = [e.name for e in it if e.name.startswith("e_") and e.name[2:].isdigit()]
        for name in names:
            extent = self.extent(int(name[2:]))
            d = extent_digest(extent)
            if d is not None:
                out[int(name[2:])] = d if not verify or sound(extent) else UNSOUND
        return out

    def extent_lock(self, ext: int,
                    span: tuple[int, int] = WHOLE) -> contextlib.AbstractAsyncContextManager[None]:
        """Until its end, no other operation on `ext` overlapping `span` runs (extent_locks.py)."""
        return self._locks.hold(ext, span)

    def sync_names(self) -> None:
        """Make the names of new extents durable (one directory fsync for all of them)."""
        if self.names_unsynced:
            self.names_unsynced = False  # before the fsync: a creation meanwhile sets it again
            fsync_dir(self.dir)

    def extent(self, ext: int) -> Extent:
        return Extent(os.path.join(self.dir, f"e_{int(ext)}"))

    def used_bytes(self) -> int:
        total = 0
        with os.scandir(self.dir) as it:
            for entry in it:
                if entry.name.startswith("e_") and not entry.name.endswith(".crc"):
                    total += entry.stat().st_blocks * 512
        return total


class DataNode(NodeService):
    role = "datanode"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.reserve = int(cfg.get("reserve_bytes", 32 * 1024 * 1024))
        self.partitions: dict[int, DataPartition] = {}
        self.peers = RpcPool(credential=self.credential, tls=self.tls_client)
        r = self.rpc.route
        r(Op.HEARTBEAT, self.heartbeat, MASTER_STATE, access=Access.MASTER)
        r(Op.CREATE_PARTITION, self.create_partition, NEW_PARTITION, access=Access.MASTER)
        r(Op.DELETE_PARTITION, self.delete_partition, DELETE_PARTITION, access=Access.MASTER)
        r(Op.DATA_WRITE, self.write, CHANGES[Op.DATA_WRITE], access=Access.WRITE)
        # a read's answer is held in memory: it draws its size from the server's budget first
        r(Op.DATA_READ, self.read, {"ext": EXT, "offset": OFFSET, "size": Int(0, MAX_IO)},
          cost=lambda b: int(b["size"]), access=Access.READ)
        r(Op.DATA_TRUNCATE, self.truncate, CHANGES[Op.DATA_TRUNCATE], access=Access.WRITE)
        r(Op.DATA_DELETE_EXTENT, self.delete_extent, CHANGES[Op.DATA_DELETE_EXTENT], access=Access.RECLAIM)
        r(Op.DATA_SYNC, self.sync, CHANGES[Op.DATA_SYNC], access=Access.WRITE)
        # between the replicas of a partition
        self.replication = ReplicationHub(self.listen, self.peers, self.master_api,
                                          lambda: {p: dp.replica for p, dp in self.partitions.items()})
        self.replication.register_metrics(self.metrics)
        self.replication.register(r)
        P = Access.PEER
        r(Op.REPL_FORWARD, self.apply_forwarded, {"view": Raw, "op": Int(0, 999), "body": Map}, access=P)
        # verify: every block is read and checked (a scrub): a rotten extent's digest is UNSOUND
        r(Op.REPL_DIGEST, self.digest, {"view": Raw, "ext": Opt(EXT), "verify": Opt(Bool, False)}, access=P)
        r(Op.REPL_SCRUB, self.scrub, {}, access=Access.MASTER)
        r(Op.REPL_EXTENT_READ, self.read_raw, {"ext": EXT, "sidecar": Bool, "offset": Int(0, CHUNK),
                                               "size": Int(0, MAX_IO)}, cost=lambda b: int(b["size"]), access=P)
        r(Op.REPL_EXTENT_INSTALL, self.install, {"view": Raw, "ext": EXT, "offset": OFFSET, "data": Bytes(MAX_IO),
                                                 "total": EXTENT_SIZE, "sidecar": Opt(Bytes(MAX_SIDECAR))},
          access=P)
        r(Op.REPL_EXTENT_DROP, self.drop_extent, {"view": Raw, "ext": EXT}, access=P)

    def _pdir(self, pid: int) -> str:
        return os.path.join(self.data_dir, f"dp_{pid}")

    async def open(self) -> None:
        for entry in sorted(os.listdir(self.data_dir)):
            path = os.path.join(self.data_dir, entry, "partition.json")
            if entry.startswith("dp_") and os.path.exists(path):
                with open(path) as f:
                    info = json.load(f)
                self.partitions[info["pid"]] = DataPartition(info["pid"], info, os.path.dirname(path),
                                                             self.replication)
        log.info("loaded %d data partitions", len(self.partitions))
        self.replication.start()

    async def close(self) -> None:
        await self.replication.stop()
        await self.peers.close()

    def part(self, pid: int, writing: bool = False) -> DataPartition:
        part = self.partitions.get(pid)
        if part is None:
            raise self.tombstones.missing_partition(pid, self.listen)
        if writing:
            self.check_writable(part.info["vol_id"])
        return part

    def led(self, pid: int, writing: bool = False) -> DataPartition:
        """A partition this node may answer clients for now (it leads, under its lease)."""
        part = self.part(pid, writing)
        part.replica.check_serving()
        return part

    def followed(self, pid: int, view: Any) -> DataPartition:
        """A partition whose leader sent this (fenced by the view it sent)."""
        part = self.part(pid)
        part.replica.accept_leader(view)
        return part

    async def heartbeat(self, pid: int, body: Any, conn: Any) -> Any:
        self.apply_master_state(body)
        self.replication.adopt_maps(body["volumes"])
        usage = shutil.disk_usage(self.data_dir)
        used = await asyncio.to_thread(
            lambda: {p: dp.used_bytes() for p, dp in list(self.partitions.items())})
        return {"partitions": {p: {"vol_id": dp.info["vol_id"], "used": used.get(p, 0),
                                   "catch_up": dp.replica.progress}
                               for p, dp in self.partitions.items()},
                "disk_total": usage.total, "disk_free": usage.free}

    async def create_partition(self, pid: int, body: Any, conn: Any) -> Any:
        if pid in self.partitions:
            return {"created": False}
        info = {"pid": pid, "vol_id": body["vol_id"], **View.of_request(pid, body, self.listen).fields()}
        pdir = self._pdir(pid)
        os.makedirs(pdir, mode=0o700, exist_ok=True)
        atomic_write(os.path.join(pdir, "partition.json"), json.dumps(info).encode())
        fsync_dir(self.data_dir)  # the partition's directory name too
        self.partitions[pid] = DataPartition(pid, info, pdir, self.replication, fresh=True)
        log.info("created data partition %d", pid)
        return {"created": True}

    async def delete_partition(self, pid: int, body: Any, conn: Any) -> Any:
        if body.get("tombstone") is not None:
            self.tombstones.add(pid, body["tombstone"])
        part = self.partitions.pop(pid, None)
        await asyncio.to_thread(shutil.rmtree, self._pdir(pid), True)
        return {"deleted": part is not None}

    # ----- client requests: at the leader, applied here and on every in-sync follower -----
    async def _change(self, pid: int, op: Op, body: dict[str, Any]) -> Any:
        part = self.led(pid, writing=True)
        if op == Op.DATA_WRITE:  # refused here before any copy changes
            self._check_write(part, body)
        async with part.replica.gate.change(), part.extent_lock(body["ext"], _span(op, body)):
            part.replica.check_serving()  # the view may have changed while we waited
            return await part.replica.replicate(op, body, self._apply(part, op, body))

    async def write(self, pid: int, body: Any, conn: Any) -> Any:
        return await self._change(pid, Op.DATA_WRITE, body)

    async def truncate(self, pid: int, body: Any, conn: Any) -> Any:
        return await self._change(pid, Op.DATA_TRUNCATE, body)

    async def delete_extent(self, pid: int, body: Any, conn: Any) -> Any:
        return await self._change(pid, Op.DATA_DELETE_EXTENT, body)

    async def sync(self, pid: int, body: Any, conn: Any) -> Any:
        return await self._change(pid, Op.DATA_SYNC, body)

    async def apply_forwarded(self, pid: int, body: Any, conn: Any) -> Any:
        """A change from the partition's leader, applied here as it was there."""
        op = body["op"]
        if op not in CHANGES:
            raise ShoalError(Code.BAD_REQUEST, f"opcode {op} is not a data change")
        change = validate(CHANGES[op], body["body"])
        part = self.followed(pid, body["view"])
        if op == Op.DATA_WRITE:
            self._check_write(part, change)
        async with part.extent_lock(change["ext"], _span(op, change)):
            part.replica.accept_leader(body["view"])  # a catch-up may have run while we waited
            return await self._apply(part, Op(op), change)

    def _check_write(self, part: DataPartition, body: dict[str, Any]) -> None:
        pieces = _pieces(body)
        if any(offset + len(data) > CHUNK for offset, data in pieces):
            raise ShoalError(Code.BAD_REQUEST, f"a write must end within the extent's {CHUNK} bytes")
        total = sum(len(data) for _, data in pieces)
        if total > MAX_IO:
            raise ShoalError(Code.BAD_REQUEST, f"a write carries {MAX_IO} bytes at most")
        if shutil.disk_usage(part.dir).free < total + self.reserve:
            raise ShoalError(Code.NO_SPACE, f"datanode {self.listen} is out of space")

    async def _apply(self, part: DataPartition, op: Op, body: dict[str, Any]) -> Any:
        """One change to this node's copy (a write already checked: _check_write)."""
        ext = part.extent(body["ext"])
        if op == Op.DATA_WRITE:
            pieces = _pieces(body)
            try:
                created = await asyncio.to_thread(ext.write_many, pieces, body["sync"])
            except ShoalError:
                # it may have created the extent's files: the next write would not know
                part.names_unsynced = True
                raise
            if created and not body["sync"]:
                part.names_unsynced = True
            return {"written": sum(len(data) for _, data in pieces)}
        if op == Op.DATA_TRUNCATE:
            await asyncio.to_thread(ext.truncate, body["size"])
        elif op == Op.DATA_DELETE_EXTENT:
            await asyncio.to_thread(ext.delete)
        elif op == Op.DATA_SYNC:
            def sync() -> None:
                ext.sync()
                part.sync_names()
            try:
                await asyncio.to_thread(sync)
            except OSError as exc:
                part.names_unsynced = True
                raise disk_error(exc, f"sync of data partition {part.pid}") from None
        return {}

    async def read(self, pid: int, body: Any, conn: Any) -> Any:
        part = self.led(pid)
        ext_id = body["ext"]
        async with part.extent_lock(ext_id):
            try:
                data = await asyncio.to_thread(part.extent(ext_id).read, body["offset"], body["size"])
            except ShoalError as exc:
                if exc.code not in (Code.DATA_LOST, Code.CORRUPTED):
                    raise
                log.error("data partition %d, extent %d: %s", pid, ext_id, exc.msg)
                data = await self._read_repaired(part, ext_id, body, exc)
        return {"data": data}

    async def _read_repaired(self, part: DataPartition, ext_id: int, body: dict[str, Any],
                             error: ShoalError) -> bytes:
        """Our copy is bad: take an in-sync follower's, then read again (the
        caller holds the extent lock). The original error if none is good."""
        for source in part.replica.view.followers():
            try:
                await part.copier.pull(source, part.replica.view, ext_id)
                return await asyncio.to_thread(part.extent(ext_id).read, body["offset"], body["size"])
            except ShoalError as exc:
                log.warning("data partition %d, extent %d: no good copy from %s: %s", part.pid, ext_id,
                            source, exc.msg)
        raise error

    # ----- between replicas ----------------------------------------------------
    async def digest(self, pid: int, body: Any, conn: Any) -> Any:
        part = self.followed(pid, body["view"])
        if body["ext"] is None:
            return {"extents": await asyncio.to_thread(part.digests, body["verify"])}
        one = await asyncio.to_thread(extent_digest, part.extent(body["ext"]))
        return {"extents": {} if one is None else {body["ext"]: one}}

    async def scrub(self, pid: int, body: Any, conn: Any) -> Any:
        return {"members": await self.part(pid).replica.scrub()}

    async def read_raw(self, pid: int, body: Any, conn: Any) -> Any:
        data, size = await asyncio.to_thread(read_raw, self.part(pid).extent(body["ext"]), body["sidecar"],
                                             body["offset"], body["size"])
        return {"data": data, "size": size}

    async def install(self, pid: int, body: Any, conn: Any) -> Any:
        part = self.followed(pid, body["view"])
        async with part.extent_lock(body["ext"]):
            await asyncio.to_thread(install_piece, part.extent(body["ext"]), body["offset"], body["data"],
                                    body["total"], body["sidecar"])
        return {}

    async def drop_extent(self, pid: int, body: Any, conn: Any) -> Any:
        part = self.followed(pid, body["view"])
        async with part.extent_lock(body["ext"]):
            await asyncio.to_thread(part.extent(body["ext"]).delete)
        return {}


def main(config_path: str) -> None:
    from shoalfs.common.service import install_loop_policy, load_config, setup_logging

    cfg = load_config(config_path, ("listen", "data_dir", "master", "token_file"))
    setup_logging(cfg.get("log_level", "INFO"))
    install_loop_policy()
    asyncio.run(DataNode(cfg).run())
