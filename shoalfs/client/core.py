"""The async client core shared by the SDK and the FUSE mount.

Works on inodes: every metadata call is routed to the meta partition that
owns the inode range, every data call to the data partition chosen for the
(inode, chunk). Transient faults are retried inside the operation's deadline
(proto.rpc.RpcPool); permanent ones surface as ShoalError.

File data is cut into CHUNK-sized pieces; chunk k of inode i lives in extent
(i << 20 | k) on data partition dps[(i + k) % len(dps)], recorded in the
inode's extent map once written.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import logging
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from shoalfs.client.credential import ClientCredential
from shoalfs.client.leases import SessionLeases
from shoalfs.client.locks import FileLocks
from shoalfs.common.master_client import MasterClient
from shoalfs.common.metrics import Metrics
from shoalfs.common.tls import client_context
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import CHUNK, MAX_FILE_SIZE, extent_id
from shoalfs.proto.opcodes import META_ONCE, Op
from shoalfs.proto.rpc import EventCallback, RetryPolicy, RpcPool
from shoalfs.replication.replica import newer_view
from shoalfs.replication.view import View

log = logging.getLogger(__name__)

IO_PIECE = 4 * 1024 * 1024  # data per RPC (the servers take up to layout.MAX_IO)
MAX_PIECES = 1024  # pieces in one DATA_WRITE (the datanode takes as many)
REFRESH_ON_TRY_AGAIN = 1.0  # a leader that keeps answering TRY_AGAIN: ask the master this often
# calls that change no directory: they leave a create's parent attributes fresh
KEEPS_DIRS = frozenset({
    Op.META_GET_INODE, Op.META_BATCH_GET_INODE, Op.META_LOOKUP, Op.META_READDIR, Op.META_EXTENT_LIST,
    Op.META_GET_XATTR, Op.META_LIST_XATTR, Op.META_RENEW_LEASES, Op.META_LOCK, Op.META_LOCK_CANCEL,
    Op.META_RELEASE_LOCKS,
    Op.DATA_READ, Op.DATA_WRITE, Op.DATA_SYNC, Op.DATA_TRUNCATE, Op.DATA_DELETE_EXTENT,
})
# the dir_changes of the calls made under it, for whoever set it (client/dirscan.py
# accounts a change it patched into its listings); tasks started meanwhile share it
OWN_DIR_CHANGES: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("own_dir_changes",
                                                                                   default=None)
CALL_GRACE = 0.1  # how far past its deadline a call may run (the pool's last attempt lasts >= 0.05 s)


@dataclass
class ClientOptions:
    op_deadline: float = 60.0  # a transient fault is retried this long, then EIO
    attempt_timeout: float = 10.0
    backoff_first: float = 0.05
    backoff_cap: float = 0.5  # a partition failover ends within about 2 s: look again often
    watch: bool = True  # SDK: run the lifecycle guard (deletion fences the handle)
    heartbeat_interval: float = 5.0
    tls_ca: str | None = None  # a TLS cluster's CA (default $SHOAL_TLS_CA): TLS to the master and every node


class VolumeClient:
    def __init__(self, master: str, volume: str, options: ClientOptions | None = None,
                 on_event: EventCallback | None = None, key: str | None = None, key_file: str | None = None,
                 admin_token: str | None = None) -> None:
        """A key (`key`, `key_file`, or found as client/keys.py says) buys the
        capability; with `admin_token` instead, none is looked for."""
        self.options = options or ClientOptions()
        tls = client_context(self.options.tls_ca or os.environ.get("SHOAL_TLS_CA"))
        self.master = MasterClient(master, admin_token, tls=tls)
        self.volume_name = volume
        self.credential = ClientCredential(self.master, volume, key, key_file, find=admin_token is None)
        self.pool = RpcPool(RetryPolicy(self.options.op_deadline, self.options.backoff_first,
                                        self.options.backoff_cap, self.options.attempt_timeout),
                            on_event=on_event, credential=self.credential, tls=tls)
        self.vol: dict[str, Any] = {}
        self._mp_starts: list[int] = []
        self._mps: list[dict[str, Any]] = []
        self._dps: list[dict[str, Any]] = []
        self._rr = 0
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = -1e9  # when placement was last asked for
        self.metrics: Metrics | None = None  # a mount's, with -o metrics=HOST:PORT
        self.open_counts: dict[int, int] = {}
        self.dir_changes = 0  # +1 as each call that may change a directory starts, +1 as it ends
        # (parent, asked at, dir_changes after, attributes) of our last create: see fresh_dir_attr
        self._created_in: tuple[int, float, int, dict[str, Any]] | None = None
        self.pending_evict: set[int] = set()  # unlinked by us while we have them open
        self.leases = SessionLeases(self)
        self.locks = FileLocks(self)
        self.closing = False  # close() has begun: nothing is retried from now on
        # lifecycle: set by the guard (client/lifecycle.py)
        self.fenced = False  # the volume is deleted: every call fails at once
        self.pending_delete = False  # the volume is pending deletion: read-only for now
        self._on_volume_error: Callable[[ShoalError], None] | None = None

    @property
    def read_only(self) -> bool:
        """Writes fail with EROFS: a read-only key, or a volume pending deletion."""
        return self.pending_delete or self.credential.read_only

    @property
    def on_volume_error(self) -> Callable[[ShoalError], None] | None:
        """Told of every VOLUME_NOT_EXIST, from a node or from the master."""
        return self._on_volume_error

    @on_volume_error.setter
    def on_volume_error(self, callback: Callable[[ShoalError], None] | None) -> None:
        self._on_volume_error = self.credential.on_volume_error = callback

    # ----- volume and routing ------------------------------------------------
    async def open(self) -> None:
        """Buy a capability with the key; learn where the volume lives. A key
        the master refuses is PermissionError-worthy: UNAUTHORIZED."""
        self._install(await self.credential.open(deadline=self.options.op_deadline))
        self.credential.start()
        self.leases.start()

    def _install(self, vol: dict[str, Any]) -> None:
        if self.vol and vol["vol_id"] != self.vol["vol_id"]:
            # the name now means another volume; ours is gone. Keep our table.
            log.warning("volume name %s now refers to another volume", self.volume_name)
            return
        self.vol = vol
        self._mps = sorted(vol["meta_partitions"], key=lambda p: p["start"])
        self._mp_starts = [p["start"] for p in self._mps]
        self._dps = list(vol["data_partitions"])

    @property
    def vol_id(self) -> str:
        return str(self.vol["vol_id"])

    def meta_partition(self, ino: int) -> dict[str, Any]:
        i = bisect.bisect_right(self._mp_starts, ino) - 1
        if i < 0 or ino >= self._mps[i]["end"]:
            raise ShoalError(Code.NOT_FOUND, f"inode {ino} is outside every meta partition")
        return self._mps[i]

    def data_partition(self, ino: int, chunk: int) -> dict[str, Any]:
        return self._dps[(ino + chunk) % len(self._dps)]

    def _dp_by_pid(self, pid: int) -> dict[str, Any]:
        for p in self._dps:
            if p["pid"] == pid:
                return p
        raise ShoalError(Code.PARTITION_NOT_EXIST, f"data partition {pid} is not in this volume")

    def _current(self, part: dict[str, Any]) -> dict[str, Any]:
        """The latest record of a partition (a refresh replaces the tables)."""
        for p in (self._dps if "start" not in part else self._mps):
            if p["pid"] == part["pid"]:
                return p
        return part

    def _learn_view(self, exc: ShoalError) -> bool:
        """Take a newer view of a partition that a node sent with its refusal."""
        view = newer_view(exc)
        if view is None:
            return False
        for p in (*self._dps, *self._mps):
            if p["pid"] == view.pid and view.epoch > View.of_partition(p).epoch:
                p.update(view.fields())
                return True
        return False

    async def refresh(self) -> None:
        """Ask the master for placement again (at most one request at a time)."""
        await asyncio.shield(self._start_refresh())

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._refreshing is None or self._refreshing.done():
            async def go() -> None:
                self._refreshed_at = time.monotonic()
                try:
                    self._install(await self.master.volume_info(self.volume_name, deadline=5.0))
                except ShoalError as exc:
                    log.info("placement refresh failed: %s", exc)
            self._refreshing = asyncio.create_task(go())
        return self._refreshing

    async def call(self, part: dict[str, Any], op: int, body: dict[str, Any],
                   end: float | None = None) -> Any:
        """One RPC to a partition's leader; the single choke point for all node calls.

        `end` is the user operation's absolute deadline on time.monotonic()
        (op_deadline from now if None): transient faults are retried until
        then and the call never runs past it, however many calls the
        operation makes."""
        if end is None:
            end = time.monotonic() + self.options.op_deadline
        if op not in KEEPS_DIRS:
            own = OWN_DIR_CHANGES.get()
            self.dir_changes += 1
            if own is not None:
                own[0] += 1
            try:
                return await self._call(part, op, body, end)
            finally:
                self.dir_changes += 1
                if own is not None:
                    own[0] += 1
        return await self._call(part, op, body, end)

    async def _call(self, part: dict[str, Any], op: int, body: dict[str, Any], end: float) -> Any:
        until = end
        if op in META_ONCE and "rid" not in body:
            # every attempt of this change carries one id: one that reached the
            # partition before a failover is answered, not made twice
            body = {**body, "rid": secrets.token_hex(8)}

        async def before_retry(exc: ShoalError) -> None:
            self.check_fence()  # deleted while we waited: ESTALE now, not at the deadline
            if exc.code in (Code.NOT_PARTITION_LEADER, Code.STALE_EPOCH) and self._learn_view(exc):
                return  # the node named the partition's newer view
            moved = exc.code in (Code.PARTITION_NOT_EXIST, Code.NOT_PARTITION_LEADER, Code.STALE_EPOCH)
            # a leader that does not answer, or cannot serve (a leader cut off from the master
            # and its followers answers TRY_AGAIN), may have been replaced by another member
            replicated = len(self._current(part)["replicas"]) > 1
            if (replicated and exc.code == Code.TRY_AGAIN
                    and time.monotonic() - self._refreshed_at >= REFRESH_ON_TRY_AGAIN):
                self._start_refresh()  # not waited for: a slow master must not slow a retry
                return
            silent = replicated and exc.code in (Code.NODE_UNREACHABLE, Code.TIMEOUT)
            if moved or silent:
                # placement may have moved, or a failover made another leader: ask the master
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.refresh(), max(0.0, until - time.monotonic()))

        self.check_fence()
        started = time.perf_counter()
        code = 0
        try:
            # the pool bounds each attempt, its connect and its send by what is
            # left, so no call outlives the deadline
            return await self.pool.call(lambda: self._current(part)["replicas"][0], op, part["pid"], body,
                                        deadline=max(0.01, end - time.monotonic()), before_retry=before_retry)
        except ShoalError as exc:
            code = exc.code
            self.check_fence()
            if exc.code == Code.VOLUME_NOT_EXIST and self.on_volume_error is not None:
                self.on_volume_error(exc)
                self.check_fence()
            elif exc.code == Code.READ_ONLY and not self.credential.read_only:
                self.pending_delete = True
            elif exc.code == Code.UNAUTHORIZED:  # a node refuses the key: it was revoked
                self.credential.refused(exc)
            raise
        finally:
            if self.metrics is not None:
                self.metrics.client_request(op, code, started)

    def check_fence(self) -> None:
        if self.fenced:
            raise ShoalError(Code.VOLUME_NOT_EXIST, f"volume {self.volume_name} was deleted")
        self.credential.check()

    async def meta(self, ino: int, op: int, body: dict[str, Any]) -> Any:
        return await self.call(self.meta_partition(ino), op, body)

    # ----- inode operations ---------------------------------------------------
    def fresh_dir_attr(self, ino: int, max_age: float) -> dict[str, Any] | None:
        """A directory's attributes as our own last create left them, if no
        change of ours ran since (nor during it: it may have come after ours at
        the metanode) and they are younger than max_age: the kernel asks for
        them after every create in the directory."""
        last = self._created_in
        if last is None or last[0] != ino or last[2] != self.dir_changes or time.monotonic() - last[1] >= max_age:
            return None
        return last[3]

    async def getattr(self, ino: int) -> dict[str, Any]:
        res: dict[str, Any] = await self.meta(ino, Op.META_GET_INODE, {"ino": ino})
        return res

    async def lookup(self, parent: int, name: str) -> dict[str, Any]:
        res: dict[str, Any] = await self.meta(parent, Op.META_LOOKUP, {"parent": parent, "name": name})
        return res

    async def lookup_attr(self, parent: int, name: str) -> dict[str, Any]:
        """Lookup and getattr, in one round trip when the inode lives with its parent."""
        found = await self.lookup(parent, name)
        return found.get("attr") or await self.getattr(found["ino"])

    async def setattr(self, ino: int, **changes: Any) -> dict[str, Any]:
        res: dict[str, Any] = await self.meta(ino, Op.META_SET_ATTR, dict(changes, ino=ino))
        return res

    async def _new_inode(self, mode: int, uid: int, gid: int, target: str | None = None,
                         rdev: int = 0, qids: list[int] | None = None) -> dict[str, Any]:
        self._rr = (self._rr + 1) % len(self._mps)
        last: ShoalError | None = None
        for i in range(len(self._mps)):
            part = self._mps[(self._rr + i) % len(self._mps)]
            try:
                res: dict[str, Any] = await self.call(part, Op.META_CREATE_INODE,
                                                      {"mode": mode, "uid": uid, "gid": gid,
                                                       "target": target, "rdev": rdev, "qids": qids or []})
                return res
            except ShoalError as exc:
                if exc.code != Code.NO_SPACE or at_limit(exc):
                    raise
                last = exc  # this partition is out of inode numbers: another may have some
        assert last is not None
        raise last

    async def create(self, parent: int, name: str, mode: int, uid: int = 0, gid: int = 0,
                     target: str | None = None, rdev: int = 0, opening: bool = False) -> dict[str, Any]:
        """Create an inode and link it under parent. Files go into the parent's
        partition in one atomic step (`opening`: and held open by this session,
        see open_leases); directories are spread over partitions (inode
        first, then the name; the inode is dropped if the name exists)."""
        if not stat.S_ISDIR(mode):
            try:
                asked, changes = time.monotonic(), self.dir_changes
                res: dict[str, Any] = await self.meta(parent, Op.META_CREATE, {
                    "parent": parent, "name": name, "mode": mode, "uid": uid, "gid": gid,
                    "target": target, "rdev": rdev, "open": opening})
                parent_attr = res.pop("parent_attr", None)
                if parent_attr is not None and self.dir_changes == changes + 2:  # as old as the question
                    self._created_in = (parent, asked, self.dir_changes, parent_attr)
                return res
            except ShoalError as exc:
                if exc.code != Code.NO_SPACE or at_limit(exc):
                    raise
        # in another partition than its parent: it takes the parent's directory quotas from us
        qids = (await self.getattr(parent)).get("qids", [])
        attr = await self._new_inode(mode, uid, gid, target, rdev, qids)
        try:
            await self.meta(parent, Op.META_CREATE_DENTRY,
                            {"parent": parent, "name": name, "ino": attr["ino"], "mode": attr["mode"]})
        except ShoalError:
            await self.meta(attr["ino"], Op.META_UNLINK_INODE, {"ino": attr["ino"]})
            await self.meta(attr["ino"], Op.META_EVICT_INODE, {"ino": attr["ino"]})
            raise
        return attr

    async def link(self, ino: int, parent: int, name: str) -> dict[str, Any]:
        """The link count first (a crash before the name leaves one too many,
        which fsck repairs, never one too few), then the name. A file counts
        toward the quotas it was created under: the name's partition refuses
        it under other ones (EXDEV, as XFS), else it would grow uncounted."""
        attr = await self.meta(ino, Op.META_LINK_INODE, {"ino": ino})
        try:
            await self.meta(parent, Op.META_CREATE_DENTRY, {"parent": parent, "name": name, "ino": ino,
                                                            "mode": attr["mode"], "qids": attr.get("qids", [])})
        except ShoalError:
            await self.meta(ino, Op.META_UNLINK_INODE, {"ino": ino})
            raise
        res: dict[str, Any] = attr
        return res

    async def readdir(self, ino: int, after: str | None = None, limit: int = 1000) -> dict[str, Any]:
        res: dict[str, Any] = await self.meta(ino, Op.META_READDIR,
                                              {"parent": ino, "after": after, "limit": limit})
        return res

    async def batch_attrs(self, inos: list[int]) -> dict[int, dict[str, Any]]:
        """The attributes of many inodes, one round trip per partition (all at once)."""
        by_part: dict[int, tuple[dict[str, Any], list[int]]] = {}
        for ino in inos:
            part = self.meta_partition(ino)
            by_part.setdefault(part["pid"], (part, []))[1].append(ino)
        answers = await asyncio.gather(*(self.call(part, Op.META_BATCH_GET_INODE, {"inos": group})
                                         for part, group in by_part.values()))
        return {attr["ino"]: attr for res in answers for attr in res["inodes"]}

    async def iterdir(self, ino: int, page: int = 1000) -> AsyncIterator[tuple[str, int, int]]:
        after: str | None = None
        while True:
            res = await self.readdir(ino, after, page)
            for name, child, mode in res["entries"]:
                yield name, child, mode
            if not res["more"] or not res["entries"]:
                return
            after = res["entries"][-1][0]

    async def is_empty_dir(self, ino: int) -> bool:
        return not (await self.readdir(ino, None, 1))["entries"]

    async def unlink(self, parent: int, name: str, want_dir: bool) -> int:
        """Remove a name; drops the inode when its last link and handle go."""
        dying = None
        if want_dir:
            found = await self.lookup(parent, name)
            dying = found["ino"] if stat.S_ISDIR(found["mode"]) else None
        async with self._removing_dir(dying) as removal:
            found = await self.meta(parent, Op.META_DELETE_DENTRY,
                                    {"parent": parent, "name": name, "dir": want_dir,
                                     "keep": None if want_dir else list(self.open_counts)})
            removal.done = True
        if "nlink" not in found:  # the inode lives elsewhere: a second step
            await self.drop_link(found["ino"])
        elif found["nlink"] == 0:
            if "evicted" in found:
                await self.free_extents(found["ino"], found["evicted"])
            elif found["ino"] in self.open_counts:  # dropped at our last close (or another mount's)
                self.pending_evict.add(found["ino"])
        return int(found["ino"])

    @contextlib.asynccontextmanager
    async def _removing_dir(self, ino: int | None) -> AsyncIterator[_Removal]:
        """Around the removal of directory `ino` (rmdir, or a rename replacing
        it; None: no directory): it is checked empty and closed to new entries
        in one step at its partition, so no create lands in it meanwhile.
        Unless the block marks the removal done, it is opened again."""
        removal = _Removal()
        if ino is not None:
            await self.meta(ino, Op.META_RMDIR_PREPARE, {"ino": ino})
        try:
            yield removal
        finally:
            if ino is not None and not removal.done:
                with contextlib.suppress(ShoalError):
                    await self.meta(ino, Op.META_RMDIR_ABORT, {"ino": ino})

    async def drop_link(self, ino: int) -> None:
        attr = await self.meta(ino, Op.META_UNLINK_INODE, {"ino": ino})
        if attr["nlink"] == 0:
            if self.open_counts.get(ino):
                self.pending_evict.add(ino)
            else:
                await self.evict(ino)

    async def evict(self, ino: int) -> None:
        """Forget an unlinked inode and free its extents (best effort)."""
        self.pending_evict.discard(ino)
        res = await self.meta(ino, Op.META_EVICT_INODE, {"ino": ino})
        await self.free_extents(ino, res.get("extents", {}))

    async def free_extents(self, ino: int, extents: dict[Any, list[int]]) -> None:
        jobs = [self.call(self._dp_by_pid(dp), Op.DATA_DELETE_EXTENT, {"ext": ext})
                for dp, ext in extents.values()]
        for r in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(r, BaseException):
                log.warning("could not free an extent of inode %d: %s", ino, r)

    async def rename(self, sp: int, sn: str, dp: int, dn: str, noreplace: bool = False) -> None:
        src_part = self.meta_partition(sp)
        dst_part = self.meta_partition(dp)
        try:
            target = await self.lookup(dp, dn)
        except ShoalError as exc:
            if exc.code != Code.NOT_FOUND:
                raise
            target = None
        dying = None
        if target is not None and stat.S_ISDIR(target["mode"]) and not noreplace:
            moving = await self.lookup(sp, sn)
            if moving["ino"] != target["ino"] and stat.S_ISDIR(moving["mode"]):
                dying = target["ino"]  # replaced as rmdir removes it
        async with self._removing_dir(dying) as removal:
            res = await self.call(src_part, Op.META_RENAME, {
                "src_parent": sp, "src_name": sn, "dst_parent": dp, "dst_name": dn,
                "dst_pid": dst_part["pid"], "noreplace": noreplace, "replace_dir": dying or 0})
            removal.done = bool(res.get("replaced"))  # else the name had moved on: the directory stays
        if res.get("replaced"):
            await self.drop_link(res["replaced"][0])

    # ----- xattrs --------------------------------------------------------------
    async def setxattr(self, ino: int, name: str, value: bytes, flags: int = 0) -> None:
        await self.meta(ino, Op.META_SET_XATTR, {"ino": ino, "name": name, "value": value, "flags": flags})

    async def getxattr(self, ino: int, name: str) -> bytes:
        return bytes((await self.meta(ino, Op.META_GET_XATTR, {"ino": ino, "name": name}))["value"])

    async def listxattr(self, ino: int) -> list[str]:
        return list((await self.meta(ino, Op.META_LIST_XATTR, {"ino": ino}))["names"])

    async def removexattr(self, ino: int, name: str) -> None:
        await self.meta(ino, Op.META_REMOVE_XATTR, {"ino": ino, "name": name})

    # ----- data ----------------------------------------------------------------
    async def extents(self, ino: int) -> dict[int, list[int]]:
        return (await self.attr_and_extents(ino))[1]

    async def attr_and_extents(self, ino: int, opening: bool = False) -> tuple[dict[str, Any], dict[int, list[int]]]:
        """Attributes and extent map in one round trip (what an open needs;
        `opening`: the file is held open by this session from now on)."""
        res = await self.meta(ino, Op.META_EXTENT_LIST, {"ino": ino, "open": opening})
        self.leases.learn(res)
        return res["attr"], {int(k): v for k, v in res["extents"].items()}

    # ----- files held open (other mounts keep an unlinked file's data for us) ------
    async def closed(self, ino: int) -> None:
        """This client's last handle on `ino` closed. If we unlinked it, give
        up the lease now: the file goes unless another client has it open.
        Otherwise the lease just lapses (no round trip per close): a file
        another client unlinked meanwhile goes with the metanode's reaper."""
        if ino not in self.pending_evict:
            return
        self.pending_evict.discard(ino)
        try:
            res = await self.meta(ino, Op.META_CLOSE, {"ino": ino})
            await self.free_extents(ino, res.get("extents", {}))
        except ShoalError as exc:  # the lease lapses, and the metanode's reaper takes over
            log.info("close of inode %d at its metanode: %s", ino, exc.msg)

    async def write_data(self, ino: int, segments: list[tuple[int, bytes | memoryview]],
                         known: dict[int, list[int]], end: float | None = None) -> set[int]:
        """Write (offset, bytes) segments that do not overlap; returns the chunks
        touched. One request per extent carries up to IO_PIECE bytes in up to
        MAX_PIECES pieces, so scattered small writes cost one round trip per
        extent, not one each. `known` is the caller's extent map, extended
        with newly recorded extents. `end`: the operation's deadline (see
        call), shared by every request."""
        if end is None:
            end = time.monotonic() + self.options.op_deadline
        by_chunk: dict[int, list[tuple[int, memoryview]]] = {}
        for offset, data in segments:
            view = memoryview(data)
            pos = 0
            while pos < len(view):
                chunk, within = divmod(offset + pos, CHUNK)
                n = min(len(view) - pos, CHUNK - within, IO_PIECE)
                by_chunk.setdefault(chunk, []).append((within, view[pos:pos + n]))
                pos += n
        jobs = []
        for chunk, pieces in by_chunk.items():
            group: list[tuple[int, memoryview]] = []
            size = 0
            for within, piece in pieces:
                if group and (size + len(piece) > IO_PIECE or len(group) >= MAX_PIECES):
                    jobs.append(self._write_pieces(ino, chunk, group, known, end))
                    group, size = [], 0
                group.append((within, piece))
                size += len(piece)
            jobs.append(self._write_pieces(ino, chunk, group, known, end))
        await all_or_none(jobs)
        return set(by_chunk)

    async def _write_pieces(self, ino: int, chunk: int, pieces: list[tuple[int, memoryview]],
                            known: dict[int, list[int]], end: float) -> None:
        entry = known.get(chunk)
        if entry is None:
            part = self.data_partition(ino, chunk)
            entry = [part["pid"], extent_id(ino, chunk)]
        body: dict[str, Any] = {"ext": entry[1], "offset": pieces[0][0], "data": pieces[0][1]}
        if len(pieces) > 1:
            body["more"] = [[within, piece] for within, piece in pieces[1:]]
        res = await self.call(self._dp_by_pid(entry[0]), Op.DATA_WRITE, body, end)
        total = sum(len(piece) for _, piece in pieces)
        if res.get("written") != total:  # a datanode that predates "more" writes the first piece only
            raise ShoalError(Code.INTERNAL, f"datanode wrote {res.get('written')} of {total} bytes")
        if chunk not in known:
            await self.call(self.meta_partition(ino), Op.META_EXTENT_SET,
                            {"ino": ino, "chunk": chunk, "dp": entry[0], "ext": entry[1]}, end)
            known[chunk] = entry

    async def read_data(self, ino: int, offset: int, size: int, file_size: int,
                        known: dict[int, list[int]], end: float | None = None) -> bytes:
        """Read up to `size` bytes at offset (not past file_size); `end`: the
        operation's deadline (see call), shared by every piece."""
        stop = min(offset + size, file_size)
        if stop <= offset:
            return b""
        if end is None:
            end = time.monotonic() + self.options.op_deadline
        pieces = []
        pos = offset
        while pos < stop:
            chunk, within = divmod(pos, CHUNK)
            n = min(stop - pos, CHUNK - within, IO_PIECE)
            pieces.append((chunk, within, n))
            pos += n

        async def one(chunk: int, within: int, n: int) -> bytes:
            entry = known.get(chunk)
            if entry is None:
                return bytes(n)
            res = await self.call(self._dp_by_pid(entry[0]), Op.DATA_READ,
                                  {"ext": entry[1], "offset": within, "size": n}, end)
            data: bytes = res["data"]
            return data + bytes(n - len(data)) if len(data) < n else data

        return b"".join(await asyncio.gather(*(one(*p) for p in pieces)))

    async def sync_chunks(self, ino: int, chunks: set[int], known: dict[int, list[int]],
                          end: float | None = None) -> None:
        jobs = [self.call(self._dp_by_pid(known[c][0]), Op.DATA_SYNC, {"ext": known[c][1]}, end)
                for c in chunks if c in known]
        await asyncio.gather(*jobs)

    async def truncate(self, ino: int, size: int) -> dict[str, Any]:
        """Set the size; data past it is freed so a later extension reads zeros."""
        if size < 0:
            raise ShoalError(Code.INVALID, "negative size")
        check_file_size(size)
        known = await self.extents(ino)
        keep_chunk, within = divmod(size, CHUNK)
        drop = [c for c in known if c > keep_chunk or (c == keep_chunk and within == 0)]
        # data first, then the map: a failure in between leaves map entries whose
        # data is gone, which read as EIO (the truncate reported its error), never
        # an extent that a later write to the same chunk would find with old bytes
        jobs = [self.call(self._dp_by_pid(known[c][0]), Op.DATA_DELETE_EXTENT, {"ext": known[c][1]})
                for c in drop]
        if within and keep_chunk in known:
            dp, ext = known[keep_chunk]
            jobs.append(self.call(self._dp_by_pid(dp), Op.DATA_TRUNCATE, {"ext": ext, "size": within}))
        await asyncio.gather(*jobs)
        if drop:
            await self.meta(ino, Op.META_EXTENT_DROP, {"ino": ino, "chunks": drop})
        return await self.setattr(ino, size=size, mtime=time.time_ns())

    async def statfs(self) -> dict[str, Any]:
        res: dict[str, Any] = await self.master.request("GET", "/volume/stat", {"name": self.volume_name})
        return res

    async def close(self) -> None:
        self.closing = True
        self.leases.stop()
        if self.locks.held and not self.fenced:
            await self.locks.release_all(deadline=min(2.0, self.options.op_deadline))
        await self.credential.stop()
        await self.pool.close()
        await self.master.close()


@dataclass
class _Removal:
    done: bool = False


def check_file_size(end: int) -> None:
    if end > MAX_FILE_SIZE:
        raise ShoalError(Code.FILE_TOO_BIG, f"a file ends at {MAX_FILE_SIZE} bytes at most")


async def all_or_none(coros: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Run together; on the first failure cancel the rest and wait for them,
    so no piece of a failed write lands later, behind newer data."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def at_limit(exc: ShoalError) -> bool:
    """NO_SPACE because a capacity, inode limit or quota is reached (not a
    partition out of inode numbers)."""
    return isinstance(exc.data, dict) and bool(exc.data.get("limit"))


def split_path(path: str) -> list[str]:
    parts = [p for p in os.path.normpath("/" + path).split("/") if p]
    return parts
