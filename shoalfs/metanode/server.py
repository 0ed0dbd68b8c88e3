"""The metanode process: hosts meta partitions and answers metadata RPCs.

Cross-partition rename: the partition holding the source directory
coordinates. It first journals an intent (txid, source dentry, target), then
asks the target partition to link the name (idempotent per txid, journaled
there), then removes the source dentry and the intent in one record. A crash
at any point leaves the intent in the journal and the metanode rolls it
forward on restart, so a rename is never half-done for good; between the
two steps a reader may briefly see the entry under both names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import uuid
from typing import Any

from shoalfs.common.files import atomic_write
from shoalfs.common.service import NodeService
from shoalfs.metanode.partition import MetaPartition, public_attr
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.proto.rpc import RetryPolicy, RpcPool, ServerConnection

log = logging.getLogger(__name__)


class MetaNode(NodeService):
    role = "metanode"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.partitions: dict[int, MetaPartition] = {}
        self.peers = RpcPool(RetryPolicy(deadline=30.0, attempt_timeout=5.0))
        self._tasks: set[asyncio.Task[None]] = set()
        self.subscribers: dict[str, set[ServerConnection]] = {}
        r = self.rpc.route
        r(Op.HEARTBEAT, self.heartbeat)
        r(Op.CREATE_PARTITION, self.create_partition)
        r(Op.DELETE_PARTITION, self.delete_partition)
        r(Op.SUBSCRIBE, self.subscribe)
        r(Op.META_CREATE_INODE, self._on(lambda p, b: p.create_inode(
            b["mode"], b.get("uid", 0), b.get("gid", 0), b.get("target"), b.get("rdev", 0))))
        r(Op.META_CREATE, self._on(lambda p, b: p.create(
            b["parent"], b["name"], b["mode"], b.get("uid", 0), b.get("gid", 0), b.get("target"),
            b.get("rdev", 0))))
        r(Op.META_GET_INODE, self._on(self._get_inode))
        r(Op.META_BATCH_GET_INODE, self._on(self._batch_get))
        r(Op.META_SET_ATTR, self._on(lambda p, b: p.set_attr(b["ino"], b)))
        r(Op.META_LINK_INODE, self._on(lambda p, b: p.link_inode(b["ino"])))
        r(Op.META_UNLINK_INODE, self._on(lambda p, b: p.unlink_inode(b["ino"])))
        r(Op.META_EVICT_INODE, self._on(lambda p, b: p.evict_inode(b["ino"])))
        r(Op.META_CREATE_DENTRY, self._on(lambda p, b: p.create_dentry(
            b["parent"], b["name"], b["ino"], b["mode"])))
        r(Op.META_LOOKUP, self._on(self._lookup))
        r(Op.META_DELETE_DENTRY, self._on(lambda p, b: p.delete_dentry(
            b["parent"], b["name"], b.get("dir"), b.get("keep"))))
        r(Op.META_READDIR, self._on(self._readdir))
        r(Op.META_RENAME, self._on(self.rename))
        r(Op.META_RENAME_LINK_TX, self._on(lambda p, b: p.rename_link_tx(
            b["txid"], b["parent"], b["name"], b["ino"], b["mode"], bool(b.get("noreplace")))))
        r(Op.META_EXTENT_SET, self._on(lambda p, b: p.extent_set(b["ino"], b["chunk"], b["dp"], b["ext"])))
        r(Op.META_EXTENT_DROP, self._on(lambda p, b: p.extent_drop(b["ino"], b["chunks"])))
        r(Op.META_EXTENT_LIST, self._on(self._extent_list))
        r(Op.META_SET_XATTR, self._on(lambda p, b: p.set_xattr(
            b["ino"], b["name"], b["value"], b.get("flags", 0))))
        r(Op.META_GET_XATTR, self._on(self._get_xattr))
        r(Op.META_LIST_XATTR, self._on(self._list_xattr))
        r(Op.META_REMOVE_XATTR, self._on(lambda p, b: p.remove_xattr(b["ino"], b["name"])))

    # ----- partition management -----------------------------------------
    def _pdir(self, pid: int) -> str:
        return os.path.join(self.data_dir, f"mp_{pid}")

    async def open(self) -> None:
        for entry in sorted(os.listdir(self.data_dir)):
            if not entry.startswith("mp_"):
                continue
            path = os.path.join(self.data_dir, entry, "partition.json")
            if not os.path.exists(path):
                continue  # a creation that never finished
            with open(path) as f:
                info = json.load(f)
            part = self._partition(info, os.path.join(self.data_dir, entry))
            self.partitions[part.pid] = part
            for txid in list(part.txs):
                self._spawn(self._resolve_tx(part, txid))
        log.info("loaded %d meta partitions", len(self.partitions))

    def _partition(self, info: dict[str, Any], pdir: str) -> MetaPartition:
        part = MetaPartition(info["pid"], info, pdir)
        part.load()
        vol_id = info["vol_id"]
        part.before_commit = lambda: self.check_writable(vol_id)
        return part

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await self.peers.close()
        for part in self.partitions.values():
            await part.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def heartbeat(self, pid: int, body: Any, conn: Any) -> Any:
        self.check_master(body)
        self.apply_master_state(body)
        return {"partitions": {p: {"vol_id": mp.info["vol_id"], "inodes": len(mp.inodes)}
                               for p, mp in self.partitions.items()}}

    async def create_partition(self, pid: int, body: Any, conn: Any) -> Any:
        self.check_master(body)
        if pid in self.partitions:
            return {"created": False}
        info = {"pid": pid, "vol_id": body["vol_id"], "start": int(body["start"]),
                "end": int(body["end"]), "replicas": body.get("replicas", [])}
        pdir = self._pdir(pid)
        os.makedirs(pdir, exist_ok=True)
        part = self._partition(info, pdir)
        if part.start <= 1 < part.end and 1 not in part.inodes:
            await part.commit(part.new_root())
        atomic_write(os.path.join(pdir, "partition.json"), json.dumps(info).encode())
        self.partitions[pid] = part
        log.info("created meta partition %d [%d, %d)", pid, part.start, part.end)
        return {"created": True}

    async def delete_partition(self, pid: int, body: Any, conn: Any) -> Any:
        self.check_master(body)
        tomb = body.get("tombstone")
        if tomb is not None and self.tombstones.add(pid, tomb):
            self.push_deleted(tomb)
        part = self.partitions.pop(pid, None)
        if part is not None:
            await part.close()
        await asyncio.to_thread(shutil.rmtree, self._pdir(pid), True)
        return {"deleted": part is not None}

    # ----- lifecycle events -------------------------------------------------
    async def subscribe(self, pid: int, body: Any, conn: ServerConnection) -> Any:
        vol_id = body.get("vol_id") if isinstance(body, dict) else None
        if not isinstance(vol_id, str):
            raise ShoalError(Code.BAD_REQUEST, "subscribe needs a vol_id")
        subs = self.subscribers.setdefault(vol_id, set())
        if conn not in subs:
            subs.add(conn)
            conn.on_close.append(lambda c: subs.discard(c))
        tomb = self.tombstones.for_volume(vol_id)
        if tomb is not None:  # deleted before the client subscribed: tell it right after the reply
            asyncio.get_running_loop().call_soon(conn.push_event, Op.EVENT_VOLUME_DELETED, {"tombstone": tomb})
        return {"subscribed": vol_id}

    def push_deleted(self, tomb: dict[str, Any]) -> None:
        """Push the tombstone to every subscriber of the volume, at once."""
        subs = self.subscribers.get(tomb["vol_id"], set())
        for conn in list(subs):
            conn.push_event(Op.EVENT_VOLUME_DELETED, {"tombstone": tomb})
        if subs:
            log.info("pushed deletion of %s to %d clients", tomb["vol_id"], len(subs))

    def _on(self, fn: Any) -> Any:
        async def handler(pid: int, body: Any, conn: Any) -> Any:
            part = self.partitions.get(pid)
            if part is None:
                raise self.tombstones.missing_partition(pid, self.listen)
            if not isinstance(body, dict):
                raise ShoalError(Code.BAD_REQUEST, "request body must be a map")
            result = fn(part, body)
            if asyncio.iscoroutine(result):
                result = await result
            return result if result is not None else {}
        return handler

    # ----- reads ----------------------------------------------------------
    @staticmethod
    def _get_inode(part: MetaPartition, body: Any) -> Any:
        return public_attr(part.inode(body["ino"]))

    @staticmethod
    def _batch_get(part: MetaPartition, body: Any) -> Any:
        return {"inodes": [public_attr(part.inodes[i]) for i in body["inos"] if i in part.inodes]}

    @staticmethod
    def _lookup(part: MetaPartition, body: Any) -> Any:
        return part.lookup(body["parent"], body["name"])

    @staticmethod
    def _readdir(part: MetaPartition, body: Any) -> Any:
        return part.readdir(body["parent"], body.get("after"), body.get("limit", 1000))

    @staticmethod
    def _extent_list(part: MetaPartition, body: Any) -> Any:
        node = part.inode(body["ino"])
        return {"extents": node["extents"], "attr": public_attr(node)}

    @staticmethod
    def _get_xattr(part: MetaPartition, body: Any) -> Any:
        return {"value": part.get_xattr(body["ino"], body["name"])}

    @staticmethod
    def _list_xattr(part: MetaPartition, body: Any) -> Any:
        return {"names": sorted(part.inode(body["ino"])["xattrs"])}

    # ----- rename ----------------------------------------------------------
    async def rename(self, part: MetaPartition, b: Any) -> Any:
        noreplace = bool(b.get("noreplace"))
        if b["dst_pid"] == part.pid:
            return await part.rename_local(b["src_parent"], b["src_name"], b["dst_parent"],
                                           b["dst_name"], noreplace)
        part.check_name(b["dst_name"])
        txid = uuid.uuid4().hex
        tx = await part.begin_rename_tx(txid, b["src_parent"], b["src_name"], {
            "dp": b["dst_parent"], "dn": b["dst_name"], "dst_pid": b["dst_pid"],
            "dst_addr": b["dst_addr"], "noreplace": noreplace})
        replaced = await self._resolve_tx(part, txid)
        return {"ino": tx["ino"], "replaced": replaced}

    async def _resolve_tx(self, part: MetaPartition, txid: str) -> Any:
        """Drive a rename intent to its end: linked at the target, unlinked here."""
        tx = part.txs[txid]
        body = {"txid": txid, "parent": tx["dp"], "name": tx["dn"], "ino": tx["ino"],
                "mode": tx["mode"], "noreplace": tx["noreplace"]}
        while True:
            try:
                res = await self.peers.call(tx["dst_addr"], Op.META_RENAME_LINK_TX, tx["dst_pid"], body)
                break
            except ShoalError as exc:
                if not exc.transient:
                    await part.abort_rename_tx(txid)
                    raise
                log.warning("rename %s: target partition unreachable (%s); retrying", txid, exc)
                await asyncio.sleep(1.0)
        await part.finish_rename_tx(txid)
        return res["replaced"]


def main(config_path: str) -> None:
    from shoalfs.common.service import install_loop_policy, load_config, setup_logging

    cfg = load_config(config_path, ("listen", "data_dir", "master", "token_file"))
    setup_logging(cfg.get("log_level", "INFO"))
    install_loop_policy()
    asyncio.run(MetaNode(cfg).run())
