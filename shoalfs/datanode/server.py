"""The datanode process: hosts data partitions, each a directory of extents."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

from shoalfs.common.files import atomic_write, fsync_dir
from shoalfs.common.service import DELETE_PARTITION, MASTER_STATE, NEW_PARTITION, NodeService
from shoalfs.datanode.extents import Extent
from shoalfs.proto.capability import Access
from shoalfs.proto.errors import Code, ShoalError, disk_error
from shoalfs.proto.layout import CHUNK, MAX_IO
from shoalfs.proto.opcodes import Op
from shoalfs.proto.schema import U64, Bool, Bytes, Int, Opt

log = logging.getLogger(__name__)

EXT = Int(0, U64)
OFFSET = Int(0, CHUNK)  # within an extent
EXTENT_SIZE = Int(0, CHUNK)


class DataPartition:
    def __init__(self, pid: int, info: dict[str, Any], directory: str) -> None:
        self.pid = pid
        self.info = info
        self.dir = directory
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}  # ext -> (lock, users)
        self.names_unsynced = False  # an extent was created by a write not yet followed by a sync

    @contextlib.asynccontextmanager
    async def extent_lock(self, ext: int) -> AsyncIterator[None]:
        """One operation at a time on an extent; the lock is dropped when
        nobody holds or waits for it, so a peer naming many extents leaves nothing."""
        lock, users = self._locks.get(ext, (asyncio.Lock(), 0))
        self._locks[ext] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[ext]
            if users == 1:
                del self._locks[ext]
            else:
                self._locks[ext] = (lock, users - 1)

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
        r = self.rpc.route
        r(Op.HEARTBEAT, self.heartbeat, MASTER_STATE, access=Access.MASTER)
        r(Op.CREATE_PARTITION, self.create_partition, NEW_PARTITION, access=Access.MASTER)
        r(Op.DELETE_PARTITION, self.delete_partition, DELETE_PARTITION, access=Access.MASTER)
        r(Op.DATA_WRITE, self.write, {"ext": EXT, "offset": OFFSET, "data": Bytes(MAX_IO), "sync": Opt(Bool, False)},
          access=Access.WRITE)
        # a read's answer is held in memory: it draws its size from the server's budget first
        r(Op.DATA_READ, self.read, {"ext": EXT, "offset": OFFSET, "size": Int(0, MAX_IO)},
          cost=lambda b: int(b["size"]), access=Access.READ)
        r(Op.DATA_TRUNCATE, self.truncate, {"ext": EXT, "size": EXTENT_SIZE}, access=Access.WRITE)
        r(Op.DATA_DELETE_EXTENT, self.delete_extent, {"ext": EXT}, access=Access.RECLAIM)
        r(Op.DATA_SYNC, self.sync, {"ext": EXT}, access=Access.WRITE)

    def _pdir(self, pid: int) -> str:
        return os.path.join(self.data_dir, f"dp_{pid}")

    async def open(self) -> None:
        for entry in sorted(os.listdir(self.data_dir)):
            path = os.path.join(self.data_dir, entry, "partition.json")
            if entry.startswith("dp_") and os.path.exists(path):
                with open(path) as f:
                    info = json.load(f)
                self.partitions[info["pid"]] = DataPartition(info["pid"], info, os.path.dirname(path))
        log.info("loaded %d data partitions", len(self.partitions))

    def part(self, pid: int, writing: bool = False) -> DataPartition:
        part = self.partitions.get(pid)
        if part is None:
            raise self.tombstones.missing_partition(pid, self.listen)
        if writing:
            self.check_writable(part.info["vol_id"])
        return part

    async def heartbeat(self, pid: int, body: Any, conn: Any) -> Any:
        self.apply_master_state(body)
        usage = shutil.disk_usage(self.data_dir)
        used = await asyncio.to_thread(
            lambda: {p: dp.used_bytes() for p, dp in list(self.partitions.items())})
        return {"partitions": {p: {"vol_id": dp.info["vol_id"], "used": used.get(p, 0)}
                               for p, dp in self.partitions.items()},
                "disk_total": usage.total, "disk_free": usage.free}

    async def create_partition(self, pid: int, body: Any, conn: Any) -> Any:
        if pid in self.partitions:
            return {"created": False}
        info = {"pid": pid, "vol_id": body["vol_id"], "replicas": body["replicas"]}
        pdir = self._pdir(pid)
        os.makedirs(pdir, mode=0o700, exist_ok=True)
        atomic_write(os.path.join(pdir, "partition.json"), json.dumps(info).encode())
        fsync_dir(self.data_dir)  # the partition's directory name too
        self.partitions[pid] = DataPartition(pid, info, pdir)
        log.info("created data partition %d", pid)
        return {"created": True}

    async def delete_partition(self, pid: int, body: Any, conn: Any) -> Any:
        if body.get("tombstone") is not None:
            self.tombstones.add(pid, body["tombstone"])
        part = self.partitions.pop(pid, None)
        await asyncio.to_thread(shutil.rmtree, self._pdir(pid), True)
        return {"deleted": part is not None}

    async def write(self, pid: int, body: Any, conn: Any) -> Any:
        part = self.part(pid, writing=True)
        data, offset = body["data"], body["offset"]
        if offset + len(data) > CHUNK:
            raise ShoalError(Code.BAD_REQUEST, f"a write must end within the extent's {CHUNK} bytes")
        if shutil.disk_usage(part.dir).free < len(data) + self.reserve:
            raise ShoalError(Code.NO_SPACE, f"datanode {self.listen} is out of space")
        ext = part.extent(body["ext"])
        async with part.extent_lock(body["ext"]):
            if await asyncio.to_thread(ext.write, offset, data, body["sync"]) and not body["sync"]:
                part.names_unsynced = True
        return {"written": len(data)}

    async def read(self, pid: int, body: Any, conn: Any) -> Any:
        part = self.part(pid)
        ext = part.extent(body["ext"])
        async with part.extent_lock(body["ext"]):
            try:
                data = await asyncio.to_thread(ext.read, body["offset"], body["size"])
            except ShoalError as exc:
                if exc.code in (Code.DATA_LOST, Code.CORRUPTED):
                    log.error("data partition %d, extent %d: %s", pid, body["ext"], exc.msg)
                raise
        return {"data": data}

    async def truncate(self, pid: int, body: Any, conn: Any) -> Any:
        part = self.part(pid, writing=True)
        async with part.extent_lock(body["ext"]):
            await asyncio.to_thread(part.extent(body["ext"]).truncate, body["size"])
        return {}

    async def delete_extent(self, pid: int, body: Any, conn: Any) -> Any:
        part = self.part(pid, writing=True)
        async with part.extent_lock(body["ext"]):
            await asyncio.to_thread(part.extent(body["ext"]).delete)
        return {}

    async def sync(self, pid: int, body: Any, conn: Any) -> Any:
        part = self.part(pid)

        def sync() -> None:
            part.extent(body["ext"]).sync()
            part.sync_names()
        try:
            await asyncio.to_thread(sync)
        except OSError as exc:
            part.names_unsynced = True
            raise disk_error(exc, f"sync of data partition {pid}") from None
        return {}


def main(config_path: str) -> None:
    from shoalfs.common.service import install_loop_policy, load_config, setup_logging

    cfg = load_config(config_path, ("listen", "data_dir", "master", "token_file"))
    setup_logging(cfg.get("log_level", "INFO"))
    install_loop_policy()
    asyncio.run(DataNode(cfg).run())
