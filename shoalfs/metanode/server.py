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
import contextvars
import json
import logging
import os
import shutil
import uuid
from typing import Any

from shoalfs.common.files import atomic_write, fsync_dir
from shoalfs.common.limits import config_seconds
from shoalfs.common.placement import VolumeMaps
from shoalfs.common.service import DELETE_PARTITION, MASTER_STATE, NEW_PARTITION, NodeService
from shoalfs.metanode.leases import OpenLeases
from shoalfs.metanode.locks import TICK as LOCK_TICK
from shoalfs.metanode.locks import LockTable
from shoalfs.metanode.orphans import OrphanSweeper
from shoalfs.metanode.partition import REQUEST_ID, SCAN_ENTRIES, MetaPartition, public_attr
from shoalfs.metanode.reaper import Reaper
from shoalfs.metanode.usage import limits_of
from shoalfs.proto.capability import READ_WRITE, Access
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import (
    LOCK_LEASE,
    MAX_CHUNK,
    MAX_FILE_SIZE,
    MAX_INO,
    MAX_IO,
    MAX_NAME,
    OPEN_LEASE,
)
from shoalfs.proto.locks import LOCK_CLAIMS, LOCK_TARGET, POSIX, RELEASE_LOCKS, SET_LOCK, WRITE
from shoalfs.proto.opcodes import META_ONCE, Op
from shoalfs.proto.rpc import RetryPolicy, RpcPool
from shoalfs.proto.schema import I64_MAX, I64_MIN, U32, U64, Bool, Bytes, Int, ListOf, Map, Opt, Raw, Schema, Str
from shoalfs.proto.server import ServerConnection
from shoalfs.replication.hub import ReplicationHub
from shoalfs.replication.replica import Replica
from shoalfs.replication.view import View

log = logging.getLogger(__name__)

# Request fields, checked before any handler runs. Names, symlink targets and
# xattrs get a looser bound here so that the partition can answer what Linux
# does for one too long (ENAMETOOLONG, ERANGE, E2BIG), not EINVAL.
LONG_STRING = 1 << 20
INO = Int(1, MAX_INO)
PID = Int(1, U64)
NAME = Str(LONG_STRING)
MODE = Int(0, 0o177777)
ID = Int(0, U32)
TIME_NS = Int(I64_MIN, I64_MAX)
CHUNK_NO = Int(0, MAX_CHUNK)
XATTR_NAME = Str(LONG_STRING)
NEW_INODE: Schema = {"mode": MODE, "uid": Opt(ID, 0), "gid": Opt(ID, 0), "target": Opt(Str(LONG_STRING)),
             "rdev": Opt(Int(0, U32), 0)}
QID = Int(1, U32)
QIDS = ListOf(QID, 64)  # the directory quotas an inode counts toward (usage.py)
SET_ATTR: Schema = {"ino": INO, "mode": Opt(MODE), "uid": Opt(ID), "gid": Opt(ID),
            "size": Opt(Int(0, MAX_FILE_SIZE)), "grow": Opt(Int(0, MAX_FILE_SIZE)),
            "atime": Opt(TIME_NS), "mtime": Opt(TIME_NS), "ctime": Opt(TIME_NS)}
# replace_dir: the directory at the target that the client emptied and marked
# (META_RMDIR_PREPARE); no other directory is ever replaced
RENAME: Schema = {"src_parent": INO, "src_name": NAME, "dst_parent": INO, "dst_name": NAME, "dst_pid": PID,
          "noreplace": Opt(Bool, False), "replace_dir": Opt(Int(0, MAX_INO), 0)}
RENAME_LINK: Schema = {"txid": Str(64), "parent": INO, "name": NAME, "ino": INO, "mode": MODE,
               "noreplace": Opt(Bool, False), "replace_dir": Opt(Int(0, MAX_INO), 0)}
MAX_SUBSCRIPTIONS = 64
DENTRY_BYTES = MAX_NAME + 32  # the most one readdir entry takes in an answer
ATTR_BYTES = 256  # about what one inode's attributes take
CREATE_META_PARTITION: Schema = {**NEW_PARTITION, "start": Int(0, U64), "end": Int(1, U64),
                                 "created_ns": Opt(Int(0, I64_MAX))}
RECORDS = Map  # {"records": [...]}, checked by MetaPartition.apply_replicated
MAX_SNAPSHOT = 1 << 32  # bytes of one partition's state sent to a catching-up member



class MetaNode(NodeService):
    role = "metanode"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.partitions: dict[int, MetaPartition] = {}
        self.peers = RpcPool(RetryPolicy(deadline=30.0, attempt_timeout=5.0), credential=self.credential,
                             tls=self.tls_client)
        self._tasks: set[asyncio.Task[None]] = set()
        self.subscribers: dict[str, set[ServerConnection]] = {}
        self._subscriptions: dict[ServerConnection, set[str]] = {}  # the other way round
        self.volume_maps = VolumeMaps(os.path.join(self.data_dir, "volumes.json"))
        self.volume_limits: dict[str, Any] = {}  # vol_id -> limits and totals, from the master
        try:
            self.open_lease = config_seconds(cfg, "open_lease", OPEN_LEASE)
            self.lock_lease = config_seconds(cfg, "lock_lease", LOCK_LEASE)
            sweep = (config_seconds(cfg, "orphan_scan_interval", 300.0, zero=True),
                     config_seconds(cfg, "orphan_grace", 600.0))
        except ValueError as exc:
            raise SystemExit(f"shoal: config: {exc}") from None
        self.reaper = Reaper(lambda: self.partitions, self.volume_maps, self.peers, self.open_lease)
        self.sweeper = OrphanSweeper(lambda: self.partitions, self.volume_maps, self.peers, *sweep)
        self.replication = ReplicationHub(self.listen, self.peers, self.master_api,
                                          lambda: {p: mp.replica for p, mp in self.partitions.items()
                                                   if mp.replica is not None})
        self.replication.register_metrics(self.metrics)
        self.metrics.state("shoal_partition_usage", "Each meta partition's counts (what: bytes, inodes)",
                           ["pid", "what"], lambda: [((str(p), what), float(v)) for p, mp in self.partitions.items()
                                                     for what, v in (("bytes", mp.usage.bytes),
                                                                     ("inodes", mp.usage.inodes))])
        r = self._route
        R, W, M, P = Access.READ, Access.WRITE, Access.MASTER, Access.PEER
        self.replication.register(r)
        r(Op.REPL_FORWARD, self._apply_forwarded,
          {"view": Raw, "op": Int(0, 999), "body": RECORDS}, access=P)
        r(Op.REPL_DIGEST, self._digest, {"view": Raw}, access=P)
        r(Op.REPL_SCRUB, self._scrub, {}, access=M)
        r(Op.REPL_SNAPSHOT, self._receive_snapshot, {"view": Raw, "offset": Int(0, MAX_SNAPSHOT),
                                                     "data": Bytes(MAX_IO), "total": Int(0, MAX_SNAPSHOT)},
          access=P)
        r(Op.HEARTBEAT, self.heartbeat, MASTER_STATE, access=M)
        r(Op.CREATE_PARTITION, self.create_partition, CREATE_META_PARTITION, access=M)
        r(Op.DELETE_PARTITION, self.delete_partition, DELETE_PARTITION, access=M)
        r(Op.SUBSCRIBE, self.subscribe, {"vol_id": Str(64)}, access=Access.OPEN)  # check_watch
        on = self._on
        r(Op.META_CREATE_INODE, on(lambda p, b: p.create_inode(
            b["mode"], b["uid"], b["gid"], b["target"], b["rdev"], b["qids"])),
          {**NEW_INODE, "qids": Opt(QIDS, [])}, access=W)  # the parent's (it is in another partition)
        r(Op.META_TAG_QUOTA, on(lambda p, b: p.tag_quota(b["ino"], b["qid"], b["add"])),
          {"ino": INO, "qid": QID, "add": Opt(Bool, True)}, access=W)
        # `open`: the caller opens the file in the same step (a lease of its session)
        r(Op.META_CREATE, on(lambda p, b, s: p.create(
            b["parent"], b["name"], b["mode"], b["uid"], b["gid"], b["target"], b["rdev"],
            opened_by=s if b["open"] else None), session=True),
          {"parent": INO, "name": NAME, **NEW_INODE, "open": Opt(Bool, False)}, access=W)
        r(Op.META_GET_INODE, on(self._get_inode), {"ino": INO}, access=R)
        # answers that can be large draw their size from the server's budget first
        r(Op.META_BATCH_GET_INODE, on(self._batch_get), {"inos": ListOf(INO, 10_000)},
          cost=lambda b: len(b["inos"]) * ATTR_BYTES, access=R)
        r(Op.META_SET_ATTR, on(lambda p, b: p.set_attr(b["ino"], b)), SET_ATTR, access=W)
        r(Op.META_LINK_INODE, on(lambda p, b: p.link_inode(b["ino"])), {"ino": INO}, access=W)
        r(Op.META_UNLINK_INODE, on(lambda p, b: p.unlink_inode(b["ino"])), {"ino": INO}, access=W)
        r(Op.META_EVICT_INODE, on(lambda p, b, s: p.evict_inode(b["ino"], s), session=True), {"ino": INO},
          access=W)
        # a read-only session holds files open too; only a read-write one drops an unlinked file
        r(Op.META_CLOSE, on(lambda p, b, s, rw: p.close_inode(b["ino"], s, rw), session=True, rights=True),
          {"ino": INO}, access=R)
        r(Op.META_RENEW_LEASES, on(self._renew_leases, session=True, rights=True),
          {"open": ListOf(Int(0, MAX_INO), 100_000), "locks": Opt(LOCK_CLAIMS, [])}, access=R)
        # locks change no file: a read-only session may lock what it can open (the kernel
        # refuses a write lock on a file not opened for writing)
        r(Op.META_LOCK, on(self._lock, session=True, rights=True), SET_LOCK, access=R)
        r(Op.META_LOCK_CANCEL, on(lambda p, b, s: p.locks.cancel(s, b["owner"], b["ino"]), session=True),
          LOCK_TARGET, access=R)
        r(Op.META_RELEASE_LOCKS, on(self._release_locks, session=True), RELEASE_LOCKS, access=R)
        # `qids`: a hard link's file's quotas, which the directory's must match
        r(Op.META_CREATE_DENTRY, on(lambda p, b: p.create_dentry(b["parent"], b["name"], b["ino"], b["mode"],
                                                                 b["qids"])),
          {"parent": INO, "name": NAME, "ino": INO, "mode": MODE, "qids": Opt(QIDS)}, access=W)
        r(Op.META_LOOKUP, on(self._lookup), {"parent": INO, "name": NAME}, access=R)
        r(Op.META_RMDIR_PREPARE, on(lambda p, b: p.prepare_rmdir(b["ino"])), {"ino": INO}, access=W)
        r(Op.META_RMDIR_ABORT, on(lambda p, b: p.abort_rmdir(b["ino"])), {"ino": INO}, access=W)
        r(Op.META_SCAN, on(lambda p, b: p.scan(b["after"], b["limit"])),
          {"after": Opt(Int(0, MAX_INO), 0), "limit": Opt(Int(0, 1000), 1000)},  # 0: the counters only
          cost=lambda b: b["limit"] and b["limit"] * ATTR_BYTES + SCAN_ENTRIES * DENTRY_BYTES,
          access=Access.INSPECT)
        r(Op.META_USAGE, on(lambda p, b: p.recount_usage(b["repair"])), {"repair": Opt(Bool, False)},
          access=Access.INSPECT)
        r(Op.META_SET_NLINK, on(lambda p, b: p.set_nlink(b["ino"], b["nlink"])),
          {"ino": INO, "nlink": Int(0, 1 << 32)}, access=W)
        r(Op.META_RECLAIM_ORPHAN, on(lambda p, b: p.reclaim_orphan(b["ino"], b["ctime"], b["nlink"])),
          {"ino": INO, "ctime": Int(0, I64_MAX), "nlink": Int(0, 1 << 32)}, access=Access.RECLAIM)
        r(Op.META_DELETE_DENTRY, on(lambda p, b, s: p.delete_dentry(
            b["parent"], b["name"], b["dir"], b["keep"], s), session=True),
          {"parent": INO, "name": NAME, "dir": Opt(Bool), "keep": Opt(ListOf(INO, 1_000_000))}, access=W)
        r(Op.META_READDIR, on(self._readdir),
          {"parent": INO, "after": Opt(NAME), "limit": Opt(Int(1, 10_000), 1000)},
          cost=lambda b: b["limit"] * DENTRY_BYTES, access=R)
        r(Op.META_RENAME, on(self.rename), RENAME, access=W)
        r(Op.META_RENAME_LINK_TX, on(lambda p, b: p.rename_link_tx(
            b["txid"], b["parent"], b["name"], b["ino"], b["mode"], b["noreplace"], b["replace_dir"], b["qids"])),
          {**RENAME_LINK, "qids": Opt(QIDS)}, access=P)
        r(Op.META_EXTENT_SET, on(lambda p, b: p.extent_set(b["ino"], b["chunk"], b["dp"], b["ext"])),
          {"ino": INO, "chunk": CHUNK_NO, "dp": PID, "ext": Int(0, U64)}, access=W)
        r(Op.META_EXTENT_DROP, on(lambda p, b: p.extent_drop(b["ino"], b["chunks"])),
          {"ino": INO, "chunks": ListOf(CHUNK_NO, MAX_CHUNK + 1)}, access=W)
        r(Op.META_EXTENT_LIST, on(self._extent_list, session=True), {"ino": INO, "open": Opt(Bool, False)},
          access=R)
        r(Op.META_SET_XATTR, on(lambda p, b: p.set_xattr(b["ino"], b["name"], b["value"], b["flags"])),
          {"ino": INO, "name": XATTR_NAME, "value": Bytes(LONG_STRING), "flags": Opt(Int(0, 2), 0)}, access=W)
        r(Op.META_GET_XATTR, on(self._get_xattr), {"ino": INO, "name": XATTR_NAME}, access=R)
        r(Op.META_LIST_XATTR, on(self._list_xattr), {"ino": INO}, access=R)
        r(Op.META_REMOVE_XATTR, on(lambda p, b: p.remove_xattr(b["ino"], b["name"])),
          {"ino": INO, "name": XATTR_NAME}, access=W)

    def _route(self, op: Op, handler: Any, schema: Schema | None = None, **kw: Any) -> None:
        """A route; a change a client may retry (META_ONCE) also takes its request id."""
        if op in META_ONCE:
            schema = {**(schema or {}), "rid": Opt(Str(64))}
        self.rpc.route(op, handler, schema, **kw)

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
            self._replicate(part)
            self.partitions[part.pid] = part
            if part.replica is not None and part.replica.leading:
                self._resume_txs(part)
        log.info("loaded %d meta partitions", len(self.partitions))
        self._spawn(self._tick_locks())
        self.reaper.start()
        self.sweeper.start()
        self.replication.start()

    async def _tick_locks(self) -> None:
        """Lock leases count only time in which a partition could be served (locks.py)."""
        while True:
            await asyncio.sleep(LOCK_TICK)
            for part in list(self.partitions.values()):
                try:
                    part.locks.tick(self._serving(part))
                except Exception:  # never the end of the ticks: leases would stretch without them
                    log.exception("lock table of partition %d", part.pid)

    @staticmethod
    def _serving(part: MetaPartition) -> bool:
        try:
            part.serving()
        except ShoalError:
            return False
        return True

    def _replicate(self, part: MetaPartition, fresh: bool = False) -> None:
        """Give a partition its replication, as its view in partition.json says
        (`fresh`: just created here)."""
        pdir = self._pdir(part.pid)

        def persist(view: View) -> None:
            part.info = dict(part.info, **view.fields())
            atomic_write(os.path.join(pdir, "partition.json"), json.dumps(part.info).encode())

        replica = self.replication.replica(View.of_partition(part.info), persist, fresh)
        replica.on_leading = lambda: self._took_over(part)
        part.replicate_with(replica, self.replication.call)

    def _took_over(self, part: MetaPartition) -> None:
        """This node now leads the partition: open files are not known here
        yet (every file counts as held for a lease period), and renames the
        old leader began are driven to their end from here."""
        part.leases = OpenLeases(self.open_lease)
        part.locks.close()
        part.locks = LockTable(self.lock_lease, part.serving)
        log.info("leading meta partition %d: granting only reclaimed locks for %.0fs", part.pid, self.lock_lease)
        self._resume_txs(part)

    def _resume_txs(self, part: MetaPartition) -> None:
        for txid in list(part.txs):
            self._spawn(self._resolve_tx(part, txid))

    def _partition(self, info: dict[str, Any], pdir: str) -> MetaPartition:
        part = MetaPartition(info["pid"], info, pdir)
        part.leases = OpenLeases(self.open_lease)
        part.locks = LockTable(self.lock_lease, part.serving)
        part.load()
        vol_id = info["vol_id"]
        part.before_commit = lambda: self.check_writable(vol_id)
        part.limits = lambda: limits_of(self.volume_limits.get(vol_id), info["pid"], {
            p: (mp.usage, mp.replica is None or mp.replica.leading)
            for p, mp in self.partitions.items() if mp.info["vol_id"] == vol_id})
        part.data_partitions = lambda: self.volume_maps.data_partitions(vol_id)
        return part

    async def close(self) -> None:
        await self.replication.stop()
        await self.sweeper.stop()
        await self.reaper.stop()
        for t in list(self._tasks):
            t.cancel()
        await self.peers.close()
        for part in self.partitions.values():
            await part.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro, context=contextvars.Context())  # no request's id
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def heartbeat(self, pid: int, body: Any, conn: Any) -> Any:
        self.apply_master_state(body)
        self.volume_limits = body["limits"]  # read by each partition's limit check (usage.limits_of)
        self.volume_maps.update(body["volumes"], {p.info["vol_id"] for p in self.partitions.values()})
        self.replication.adopt_maps(body["volumes"])
        return {"partitions": {p: {"vol_id": mp.info["vol_id"], "inodes": mp.usage.inodes, "bytes": mp.usage.bytes,
                                   "usage": mp.usage.counts,
                                   "catch_up": mp.replica.progress if mp.replica is not None else {}}
                               for p, mp in self.partitions.items()}}

    async def create_partition(self, pid: int, body: Any, conn: Any) -> Any:
        if pid in self.partitions:
            return {"created": False}
        if body["start"] >= body["end"]:
            raise ShoalError(Code.BAD_REQUEST, "a meta partition's range must not be empty")
        info = {"pid": pid, "vol_id": body["vol_id"], "start": body["start"], "end": body["end"],
                **View.of_request(pid, body, self.listen).fields()}
        self.volume_maps.add(body["vol_id"], body["volume"])  # known before the next heartbeat
        pdir = self._pdir(pid)
        os.makedirs(pdir, mode=0o700, exist_ok=True)
        part = self._partition(info, pdir)
        part.leases.born()
        part.locks.born()
        if part.start <= 1 < part.end and 1 not in part.inodes:
            # every replica makes the same root itself (same time): nothing to send
            await part.commit(part.new_root(t=body["created_ns"]), check_limits=False)  # a copy, not growth
        atomic_write(os.path.join(pdir, "partition.json"), json.dumps(info).encode())
        fsync_dir(self.data_dir)  # the partition's directory name too
        self._replicate(part, fresh=True)
        self.partitions[pid] = part
        log.info("created meta partition %d [%d, %d)", pid, part.start, part.end)
        return {"created": True}

    async def delete_partition(self, pid: int, body: Any, conn: Any) -> Any:
        tomb = body.get("tombstone")
        if tomb is not None and self.tombstones.add(pid, tomb):
            self.push_deleted(tomb)
        part = self.partitions.pop(pid, None)
        if part is not None:
            await part.close()
        await asyncio.to_thread(shutil.rmtree, self._pdir(pid), True)
        return {"deleted": part is not None}

    # ----- replication ------------------------------------------------------
    def _hosted(self, pid: int) -> MetaPartition:
        part = self.partitions.get(pid)
        if part is None:
            raise self.tombstones.missing_partition(pid, self.listen)
        return part

    def _replica(self, pid: int) -> Replica:
        replica = self._hosted(pid).replica
        if replica is None:  # every hosted partition has one (_replicate)
            raise ShoalError(Code.INTERNAL, f"partition {pid} is not replicated")
        return replica

    def _followed(self, pid: int, view: Any) -> MetaPartition:
        self._replica(pid).accept_leader(view)
        return self._hosted(pid)

    async def _apply_forwarded(self, pid: int, body: Any, conn: Any) -> Any:
        if body["op"] != Op.META_RECORDS:
            raise ShoalError(Code.BAD_REQUEST, f"opcode {body['op']} is not forwarded to metanodes")
        records = body["body"].get("records")
        if not isinstance(records, list):
            raise ShoalError(Code.BAD_REQUEST, "forwarded records must be a list")
        await self._followed(pid, body["view"]).apply_replicated(records)
        return {}

    async def _digest(self, pid: int, body: Any, conn: Any) -> Any:
        return {"digest": self._followed(pid, body["view"]).digest()}

    async def _scrub(self, pid: int, body: Any, conn: Any) -> Any:
        return {"members": await self._replica(pid).scrub()}

    async def _receive_snapshot(self, pid: int, body: Any, conn: Any) -> Any:
        part = self._followed(pid, body["view"])
        await part.receive_snapshot(body["offset"], body["data"], body["total"])
        return {}

    # ----- lifecycle events -------------------------------------------------
    async def subscribe(self, pid: int, body: Any, conn: ServerConnection) -> Any:
        vol_id = body["vol_id"]
        self.check_watch(conn.capability, vol_id)
        mine = self._subscriptions.get(conn)
        if mine is None:
            mine = self._subscriptions[conn] = set()
            conn.on_close.append(self._unsubscribe)
            conn.keep = True  # it waits for pushes: not idle
        if vol_id not in mine:
            if len(mine) >= MAX_SUBSCRIPTIONS:  # one mount watches one volume; bound what a peer adds
                raise ShoalError(Code.INVALID, f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
            mine.add(vol_id)
            self.subscribers.setdefault(vol_id, set()).add(conn)
        tomb = self.tombstones.for_volume(vol_id)
        if tomb is not None:  # deleted before the client subscribed: tell it right after the reply
            asyncio.get_running_loop().call_soon(conn.push_event, Op.EVENT_VOLUME_DELETED, {"tombstone": tomb})
        return {"subscribed": vol_id}

    def _unsubscribe(self, conn: ServerConnection) -> None:
        for vol_id in self._subscriptions.pop(conn, set()):
            subs = self.subscribers.get(vol_id)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self.subscribers[vol_id]

    def push_deleted(self, tomb: dict[str, Any]) -> None:
        """Push the tombstone to every subscriber of the volume, at once."""
        subs = self.subscribers.get(tomb["vol_id"], set())
        for conn in list(subs):
            conn.push_event(Op.EVENT_VOLUME_DELETED, {"tombstone": tomb})
        if subs:
            log.info("pushed deletion of %s to %d clients", tomb["vol_id"], len(subs))

    def _on(self, fn: Any, session: bool = False, rights: bool = False) -> Any:
        """A handler calling fn(partition, body), and with `session` the caller's
        session, with `rights` whether it may change the volume."""
        async def handler(pid: int, body: Any, conn: ServerConnection) -> Any:
            part = self._hosted(pid)
            part.serving()  # reads too: only the leader is sure to have every change
            args: list[Any] = [part, body]
            cap = conn.capability
            if session:
                args.append(cap.session if cap is not None else "")
            if rights:
                args.append(cap is not None and cap.rights == READ_WRITE)
            rid = body.get("rid")  # only META_ONCE requests have one; scoped to the session
            if rid:
                rid = f"{cap.session if cap is not None else ''}/{rid}"
                if rid in part.requests_in_flight:
                    raise ShoalError(Code.TRY_AGAIN, "this request is being served already")
                done, answer = part.answer_of(rid)
                if done:  # a retry of a change already made: its answer, nothing changes
                    return answer if answer is not None else {}
                part.requests_in_flight.add(rid)
            token = REQUEST_ID.set(rid or None)
            try:
                result = fn(*args)
                if asyncio.iscoroutine(result):
                    result = await result
            finally:
                REQUEST_ID.reset(token)
                if rid:
                    part.requests_in_flight.discard(rid)
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
        return part.readdir(body["parent"], body["after"], body["limit"])

    @staticmethod
    def _extent_list(part: MetaPartition, body: Any, session: str) -> Any:
        """What an open needs, in one round trip; `open` takes a lease on the file."""
        node = part.inode(body["ino"])
        if not body["open"]:
            return {"extents": node["extents"], "attr": public_attr(node)}
        part.leases.open(body["ino"], session)
        return {"extents": node["extents"], "attr": public_attr(node), "lease": part.leases.lease}

    @staticmethod
    def _renew_leases(part: MetaPartition, body: Any, session: str, may_write: bool) -> Any:
        part.leases.renew(session, body["open"])
        ours = [c for c in body["locks"] if c[0] in part.inodes]
        gone = [[*c[:3], []] for c in body["locks"] if c[0] not in part.inodes]  # not (or no longer) here
        return {"lease": part.leases.lease, "locks": part.locks.renew(session, ours, may_write) + gone,
                "lock_lease": part.locks.lease, "version": part.locks.stamp}

    @staticmethod
    def _release_locks(part: MetaPartition, body: Any, session: str) -> Any:
        part.locks.release(session, body["ino"], body["kind"], body["owner"])
        return {"version": part.locks.stamp}

    @staticmethod
    async def _lock(part: MetaPartition, body: Any, session: str, may_write: bool) -> Any:
        """Set a lock (waiting up to `wait` seconds for it), or with `test` name one in the way."""
        ino, start, end = body["ino"], body["start"], body["end"]
        if start >= end:
            raise ShoalError(Code.BAD_REQUEST, "a lock's range must not be empty")
        if body["kind"] == POSIX and body["type"] == WRITE and not may_write and not body["test"]:
            # as the kernel refuses one on a file not opened for writing (a flock may be exclusive)
            raise ShoalError(Code.READ_ONLY, "a read-only key takes no POSIX write lock")
        part.inode(ino)  # NOT_FOUND for a file that is not here
        key, owner, locks = (ino, body["kind"]), (session, body["owner"]), part.locks
        if body["test"]:
            blocking = locks.test(key, owner, body["type"], start, end)
            return {"conflict": blocking.public() if blocking is not None else None}
        blocking = await locks.acquire(key, owner, body["type"], start, end, body["pid"], body["wait"])
        return {"granted": blocking is None, "conflict": blocking.public() if blocking is not None else None,
                "held": locks.held(key, owner), "version": locks.stamp, "lock_lease": locks.lease}

    @staticmethod
    def _get_xattr(part: MetaPartition, body: Any) -> Any:
        return {"value": part.get_xattr(body["ino"], body["name"])}

    @staticmethod
    def _list_xattr(part: MetaPartition, body: Any) -> Any:
        return {"names": sorted(part.inode(body["ino"])["xattrs"])}

    # ----- rename ----------------------------------------------------------
    async def rename(self, part: MetaPartition, b: Any) -> Any:
        noreplace, replace_dir = b["noreplace"], b["replace_dir"]
        if b["dst_pid"] == part.pid:
            return await part.rename_local(b["src_parent"], b["src_name"], b["dst_parent"],
                                           b["dst_name"], noreplace, replace_dir)
        part.check_name(b["dst_name"])
        target = self._peer_partition(part.info["vol_id"], b["dst_pid"])
        if not target[0] <= b["dst_parent"] < target[1]:
            raise ShoalError(Code.INVALID, f"inode {b['dst_parent']} is not in meta partition {b['dst_pid']}")
        txid = uuid.uuid4().hex
        tx = await part.begin_rename_tx(txid, b["src_parent"], b["src_name"], {
            "dp": b["dst_parent"], "dn": b["dst_name"], "dst_pid": b["dst_pid"], "noreplace": noreplace,
            "replace_dir": replace_dir, "rid": REQUEST_ID.get()})  # its answer is kept when it ends
        replaced = await self._resolve_tx(part, txid)
        return {"ino": tx["ino"], "replaced": replaced}

    def _peer_partition(self, vol_id: str, pid: int) -> tuple[int, int, list[str]]:
        """(start, end, replicas) of a partition of the volume, from the master's map."""
        if vol_id not in self.volume_maps.maps:
            raise ShoalError(Code.TRY_AGAIN, f"the master has not sent the map of volume {vol_id} yet")
        target = self.volume_maps.meta_partition(vol_id, pid)
        if target is None or not target[2]:
            raise ShoalError(Code.INVALID, f"meta partition {pid} is not in volume {vol_id}")
        return target

    def _partition_leader(self, vol_id: str, pid: int) -> str:
        return self._peer_partition(vol_id, pid)[2][0]  # INVALID (the intent aborts) if not in the volume

    async def _resolve_tx(self, part: MetaPartition, txid: str) -> Any:
        """Drive a rename intent to its end: linked at the target, unlinked here.
        A target the master's map does not know (or that refuses the link for
        good) aborts the intent, so no name is left stuck."""
        tx = part.txs[txid]
        body = {"txid": txid, "parent": tx["dp"], "name": tx["dn"], "ino": tx["ino"],
                "mode": tx["mode"], "noreplace": tx["noreplace"], "replace_dir": tx.get("replace_dir", 0),
                "qids": tx.get("qids", [])}
        vol_id = part.info["vol_id"]
        while True:
            try:
                res = await self.peers.call(lambda: self._partition_leader(vol_id, tx["dst_pid"]),
                                            Op.META_RENAME_LINK_TX, tx["dst_pid"], body)
                break
            except ShoalError as exc:
                if not exc.transient:
                    await part.abort_rename_tx(txid)
                    raise
                log.warning("rename %s: target partition unreachable (%s); retrying", txid, exc)
                await asyncio.sleep(1.0)
        await part.finish_rename_tx(txid, {"ino": tx["ino"], "replaced": res["replaced"]})
        return res["replaced"]


def main(config_path: str) -> None:
    from shoalfs.common.service import install_loop_policy, load_config, setup_logging

    cfg = load_config(config_path, ("listen", "data_dir", "master", "token_file"))
    setup_logging(cfg.get("log_level", "INFO"))
    install_loop_policy()
    asyncio.run(MetaNode(cfg).run())
