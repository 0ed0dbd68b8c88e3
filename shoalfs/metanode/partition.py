"""One meta partition: the inodes of an inode range, the dentries of the
directories whose inodes it holds, their xattrs and extent maps.

State lives in memory; every change is a list of idempotent effects. A
change is validated against what the partition will hold once the records
queued before it are durable (metanode/staged.py), written to the journal,
and applied to memory only once it is on disk — a change that fails leaves
memory exactly as it was — then answered.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import functools
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

from sortedcontainers import SortedDict

from shoalfs.metanode.journal import Journal
from shoalfs.metanode.leases import OpenLeases
from shoalfs.metanode.locks import LockTable
from shoalfs.metanode.replicated import Call, ReplicatedPartition
from shoalfs.metanode.staged import Staged
from shoalfs.metanode.usage import Limits, Usage, allocated_of, growth
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import (
    LOCK_LEASE,
    MAX_CHUNK,
    MAX_NAME,
    MAX_SYMLINK,
    MAX_XATTR_NAME,
    MAX_XATTR_TOTAL,
    MAX_XATTR_VALUE,
    ROOT_INO,
    extent_id,
)
from shoalfs.replication.replica import Replica

SCAN_ENTRIES = 10_000
RECOMPUTE_TRIES = 10  # a change whose commit keeps finding the gate shut is given up (TRY_AGAIN)
MAX_ANSWERED = 50_000  # answers kept by request id (metadata changes retried after a failover)


class GateWasShut(ShoalError):
    """A change computed while a catch-up's last round had the partition's
    gate shut: nothing was queued; it is computed again once the gate opens."""


Change = TypeVar("Change", bound=Callable[..., Awaitable[Any]])


def recomputed(method: Change) -> Change:
    """A change method (one commit, at its end) run again from the start when
    its commit found the gate shut: its effects were computed from a state
    that other changes may have moved on from meanwhile."""

    @functools.wraps(method)
    async def run(*args: Any, **kwargs: Any) -> Any:
        for _ in range(RECOMPUTE_TRIES - 1):
            try:
                return await method(*args, **kwargs)
            except GateWasShut:
                continue
        return await method(*args, **kwargs)  # still shut: TRY_AGAIN for the caller

    return run  # type: ignore[return-value]


# the client's id of the request being served (a change it may retry): commit() records
# the answer with the change, so the retry gets that answer and the change applies once
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
NO_ANSWER: Any = object()

DYING_NS = 30 * 10**9  # how long a directory being removed refuses new entries
MAX_LINKS = 65000
INODE_FIELDS = ("uid", "gid", "size", "atime", "mtime", "ctime")
FILE_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK}


def now_ns() -> int:
    return time.time_ns()


def _is_dir(mode: int) -> int:
    return 1 if stat.S_ISDIR(mode) else 0


def public_attr(inode: dict[str, Any]) -> dict[str, Any]:
    """The attributes a client sees (no extent map; only how many xattrs)."""
    attr = {k: v for k, v in inode.items() if k not in ("xattrs", "extents")}
    attr["nxattr"] = len(inode["xattrs"])
    attr["blocks"] = -(-allocated_of(inode) // 512)  # st_blocks: holes are not counted
    return attr


class MetaPartition(ReplicatedPartition):
    def __init__(self, pid: int, info: dict[str, Any], directory: str) -> None:
        self.pid = pid
        self.info = info  # vol_id, start, end, replicas
        self.start: int = info["start"]
        self.end: int = info["end"]
        self.journal = Journal(directory, on_durable=self._on_durable, on_failed=self._on_failed)
        self.inodes: dict[int, dict[str, Any]] = {}
        self.dentries: dict[int, SortedDict] = {}
        self.cursor = self.start
        self.txs: dict[str, dict[str, Any]] = {}  # rename intents this partition coordinates
        self.applied_txs: dict[str, Any] = {}  # rename links this partition applied
        self.staged = Staged(self)  # what memory will hold once queued records are durable
        self.before_commit: Callable[[], None] | None = None  # refuses writes while pending delete
        self.data_partitions: Callable[[], set[int] | None] = lambda: None  # the volume's, from the master
        self.leases = OpenLeases()  # which sessions have which files open
        self.locks = LockTable(LOCK_LEASE, self.serving)  # the files' locks (the leader's; replaced with each term)
        # renames since this partition was loaded (with a token of the load): what the
        # orphan sweeper compares before and after a scan
        self.moves = 0
        self.renaming = 0  # rename steps under way
        self.boot = secrets.token_hex(8)
        self._scan_order: list[int] = []  # inode numbers, sorted when a scan begins
        self.replica: Replica | None = None  # this partition's replication (replicate_with)
        self._call: Call | None = None
        self._incoming: bytearray | None = None  # a snapshot from the leader, arriving piece by piece
        self.leading_appends = 0  # our own changes queued in the journal (as leader)
        self._background: set[asyncio.Task[None]] = set()
        self.requests_in_flight: set[str] = set()  # request ids being served here (not journaled)
        self.usage = Usage()  # inodes and allocated bytes of the committed state (usage.py)
        self.limits: Callable[[], Limits] = dict  # the volume's and its quotas', from the master

    # ----- persistence -------------------------------------------------
    def load(self) -> None:
        snapshot, records = self.journal.load()
        self._load_state(snapshot)
        for effects in records:
            self._apply(effects)

    def _load_state(self, snapshot: dict[str, Any] | None) -> None:
        self.cursor = self.start
        self.inodes, self.dentries, self.txs, self.applied_txs, self.answered = {}, {}, {}, {}, {}
        if snapshot is not None:
            self.cursor = snapshot["cursor"]
            self.inodes = {int(k): v for k, v in snapshot["inodes"].items()}
            for parent, entries in snapshot["dentries"].items():
                self.dentries[int(parent)] = SortedDict({n: tuple(e) for n, e in entries.items()})
            self.txs = snapshot.get("txs", {})
            self.applied_txs = snapshot.get("applied", {})
            self.answered = snapshot.get("answered", {})
        self.usage.recount(self.inodes.values())

    def _state(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "inodes": self.inodes,
            "dentries": {p: dict(d) for p, d in self.dentries.items()},
            "txs": self.txs,
            "applied": self.applied_txs,
            "answered": self.answered,
        }

    def _apply(self, effects: list[Any]) -> None:
        for eff in effects:
            kind = eff[0]
            if kind == "I":
                self.usage.change(self.inodes.get(eff[1]), eff[2])
                self.inodes[eff[1]] = eff[2]
            elif kind == "i":
                self.usage.change(self.inodes.pop(eff[1], None), None)
                self.dentries.pop(eff[1], None)
            elif kind == "D":
                entries = self.dentries.get(eff[1])
                if entries is None:  # not setdefault: a SortedDict costs microseconds to make
                    entries = self.dentries[eff[1]] = SortedDict()
                entries[eff[2]] = (eff[3], eff[4])
            elif kind == "d":
                d = self.dentries.get(eff[1])
                if d is not None:
                    d.pop(eff[2], None)
            elif kind == "C":
                self.cursor = max(self.cursor, eff[1])
            elif kind == "T":
                self.txs[eff[1]] = eff[2]
            elif kind == "t":
                self.txs.pop(eff[1], None)
            elif kind == "A":
                self.applied_txs[eff[1]] = eff[2]
                if len(self.applied_txs) > 10_000:  # bounded memory of applied txids
                    self.applied_txs.pop(next(iter(self.applied_txs)))
            elif kind == "R":
                self.answered[eff[1]] = eff[2]
                if len(self.answered) > MAX_ANSWERED:
                    self.answered.pop(next(iter(self.answered)))

    async def commit(self, effects: list[Any], answer: Any = NO_ANSWER, check_limits: bool = True) -> Any:
        """Make durable (here and on every in-sync replica), then apply to
        memory (the journal calls _on_durable). `answer`: what the change's
        request gets, kept with it under the request's id (REQUEST_ID), so a
        retry is answered the same and changes nothing; returned."""
        if self.before_commit is not None:
            self.before_commit()
        if check_limits:
            self._check_limits(effects)
        rid = REQUEST_ID.get()
        if rid is not None and answer is not NO_ANSWER:
            effects = [*effects, ("R", rid, answer)]
        if self.replica is None:
            await self._append(effects)
        else:
            self.replica.check_serving()
            # a catch-up's snapshot waits for the changes in flight; `effects` were
            # computed against the state as it is now, so they are queued before
            # anything else runs, or not at all (see Gate)
            if not self.replica.gate.enter():
                await self.replica.gate.wait_open()
                raise GateWasShut(Code.TRY_AGAIN, f"partition {self.pid} was catching a member up: ask again")
            self.leading_appends += 1
            try:
                await self._append(effects)
            finally:
                self.leading_appends -= 1
                self.replica.gate.leave()
        if self.journal.wants_snapshot():
            await self.journal.snapshot(self._state)
        return None if answer is NO_ANSWER else answer

    def _check_limits(self, effects: list[Any]) -> None:
        """NO_SPACE for a change that grows the volume past its capacity or
        inode limit, or a directory quota past its own (one that frees space
        always passes)."""
        changes = [(self.staged.inode(eff[1]), eff[2] if eff[0] == "I" else None)
                   for eff in effects if eff[0] in ("I", "i")]
        grow = {b: v for b, v in growth(changes).items() if v[0] > 0 or v[1] > 0}
        if grow:
            # changes queued here, not durable yet, count too (concurrent creates at a limit)
            pending = growth((self.inodes.get(ino), node) for ino, node in self.staged.inodes.items())
            self.usage.check(self.limits(), grow, pending)

    def answer_of(self, rid: str) -> tuple[bool, Any]:
        """(True, answer) if the change of request `rid` was applied."""
        if rid in self.staged.requests:  # not durable yet: no answer may be given for it
            raise ShoalError(Code.TRY_AGAIN, "this request's change is being made")
        if rid in self.answered:
            return True, self.answered[rid]
        return False, None

    async def _append(self, effects: list[Any]) -> None:
        durable = self.journal.append(effects)  # refuses what cannot be stored, before any change
        self.staged.add(effects)
        await durable

    def _on_durable(self, records: list[Any]) -> None:
        for effects in records:
            self._apply(effects)
        self.staged.durable(len(records))

    def _on_failed(self) -> None:
        self.staged.clear()

    def serving(self) -> None:
        """Raise unless this node may answer for the partition now (its leader, lease held)."""
        if self.replica is not None:
            self.replica.check_serving()

    async def close(self) -> None:
        self.locks.close()
        await self.journal.close()

    # ----- helpers -----------------------------------------------------
    def owns(self, ino: int) -> bool:
        return self.start <= ino < self.end

    def inode(self, ino: int, staged: bool = False) -> dict[str, Any]:
        """An inode as committed (reads) or as the queued changes leave it (mutations)."""
        node = self.staged.inode(ino) if staged else self.inodes.get(ino)
        if node is None:
            raise ShoalError(Code.NOT_FOUND, f"inode {ino} not found")
        return node

    def directory(self, ino: int, staged: bool = False) -> dict[str, Any]:
        node = self.inode(ino, staged)
        if not stat.S_ISDIR(node["mode"]):
            raise ShoalError(Code.NOT_DIR, f"inode {ino} is not a directory")
        return node

    def open_directory(self, ino: int) -> dict[str, Any]:
        """A directory that may take a new entry: not one being removed."""
        node = self.directory(ino, staged=True)
        if now_ns() - node.get("dying", -DYING_NS) < DYING_NS:
            raise ShoalError(Code.NOT_FOUND, f"directory {ino} is being removed")
        return node

    @recomputed
    async def prepare_rmdir(self, ino: int) -> None:
        """Check a directory is empty and refuse new entries from now on, in
        one step, so an rmdir cannot race a create. The mark expires after
        DYING_NS, so a client that dies half-way leaves nothing stuck."""
        self.directory(ino, staged=True)
        if self.staged.has_entries(ino):
            raise ShoalError(Code.NOT_EMPTY, f"directory {ino} is not empty")
        await self.commit([("I", ino, self._touched(ino, dying=now_ns()))], answer=None)

    @recomputed
    async def abort_rmdir(self, ino: int) -> None:
        node = self.staged.inode(ino)
        if node is not None and "dying" in node:
            await self.commit([("I", ino, {k: v for k, v in node.items() if k != "dying"})], answer=None)

    @staticmethod
    def check_name(name: str) -> None:
        if not isinstance(name, str):
            raise ShoalError(Code.BAD_REQUEST, "name must be a string")
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise ShoalError(Code.INVALID, f"invalid name {name!r}")
        if len(name.encode()) > MAX_NAME:
            raise ShoalError(Code.NAME_TOO_LONG)

    def _touched(self, ino: int, **changes: Any) -> dict[str, Any]:
        node = dict(self.inode(ino, staged=True))
        node.update(changes)
        return node

    def _dir_changed(self, parent: int, subdirs: int = 0) -> tuple[Any, ...]:
        """The parent's new times, and its link count when `subdirs`
        subdirectories come or go (a directory has 2 + one per subdirectory)."""
        t = now_ns()
        nlink = self.inode(parent, staged=True)["nlink"] + subdirs
        return ("I", parent, self._touched(parent, mtime=t, ctime=t, nlink=max(2, nlink)))

    # ----- inode operations --------------------------------------------
    def new_root(self, uid: int = 0, gid: int = 0, t: int | None = None) -> list[Any]:
        """The root directory's record; every replica makes it with the same time `t`."""
        t = now_ns() if t is None else t
        root: dict[str, Any] = {"ino": ROOT_INO, "mode": stat.S_IFDIR | 0o755, "uid": uid, "gid": gid, "size": 0,
                "nlink": 2, "atime": t, "mtime": t, "ctime": t, "target": None, "rdev": 0,
                "xattrs": {}, "extents": {}}
        return [("I", ROOT_INO, root), ("C", ROOT_INO + 1)]

    def _new_inode(self, mode: int, uid: int, gid: int, target: str | None, rdev: int,
                   qids: Iterable[int] = ()) -> dict[str, Any]:
        ino = self.staged.next_cursor()
        if ino >= self.end:
            raise ShoalError(Code.NO_SPACE, f"meta partition {self.pid} has no free inodes")
        self.check_type(mode)
        if stat.S_ISLNK(mode) != (target is not None):
            raise ShoalError(Code.INVALID, "a symlink, and only a symlink, has a target")
        if target is not None and len(target.encode()) > MAX_SYMLINK:
            raise ShoalError(Code.NAME_TOO_LONG, f"a symlink target has at most {MAX_SYMLINK} bytes")
        t = now_ns()
        node: dict[str, Any] = {"ino": ino, "mode": mode, "uid": uid, "gid": gid,
                "size": len(target.encode()) if target else 0,
                "nlink": 2 if stat.S_ISDIR(mode) else 1, "atime": t, "mtime": t, "ctime": t,
                "target": target, "rdev": rdev, "xattrs": {}, "extents": {}}
        if qids:  # the directory quotas it counts toward: its parent's (usage.py)
            node["qids"] = sorted(set(qids))
        return node

    @recomputed
    async def create_inode(self, mode: int, uid: int, gid: int, target: str | None = None,
                           rdev: int = 0, qids: Iterable[int] = ()) -> dict[str, Any]:
        node = self._new_inode(mode, uid, gid, target, rdev, qids)
        return await self.commit([("C", node["ino"] + 1), ("I", node["ino"], node)], answer=public_attr(node))

    @recomputed
    async def create(self, parent: int, name: str, mode: int, uid: int, gid: int,
                     target: str | None = None, rdev: int = 0, opened_by: str | None = None) -> dict[str, Any]:
        """Inode and dentry together: one journal record, so a create is atomic.
        `opened_by`: the session opens it in the same step (before anyone can unlink it)."""
        self.check_name(name)
        self.open_directory(parent)
        if self.staged.dentry(parent, name) is not None:
            raise ShoalError(Code.EXISTS, f"{name!r} exists")
        node = self._new_inode(mode, uid, gid, target, rdev, self.inode(parent, staged=True).get("qids", ()))
        ino = node["ino"]
        if opened_by is not None:
            self.leases.open(ino, opened_by)
        changed = self._dir_changed(parent, _is_dir(mode))
        # the parent's new attributes too: the kernel asks for them right after
        # (a create invalidates them there), and the client answers from these
        answer = dict(public_attr(node), parent_attr=public_attr(changed[2]))
        try:
            return await self.commit([("C", ino + 1), ("I", ino, node), ("D", parent, name, ino, node["mode"]),
                                      changed], answer=answer)
        except BaseException:
            if opened_by is not None:
                self.leases.release(ino, opened_by)
            raise

    def check_same_quotas(self, src_parent: dict[str, Any] | list[int], dp: int) -> None:
        """CROSS_QUOTA (EXDEV) for a move from a directory under other quotas
        than `dp` (held here): the moved subtree would count toward the wrong
        ones; `mv` copies, then removes, as it does across file systems."""
        qids = set(src_parent if isinstance(src_parent, list) else src_parent.get("qids", []))
        differ = qids ^ set(self.inode(dp, staged=True).get("qids", []))
        limits = self.limits()
        if limits:  # a tag of a deleted quota counts toward nothing (unknown before the first heartbeat)
            differ = {q for q in differ if f"q{q}" in limits}
        if differ:
            raise ShoalError(Code.CROSS_QUOTA, "the directories are under different quotas")

    @recomputed
    async def tag_quota(self, ino: int, qid: int, add: bool) -> dict[str, Any]:
        """Count an inode toward directory quota `qid` (or no longer): what
        `shoal quota set` does to each inode of the subtree. Never refused
        for being over the quota: a quota set on a full directory refuses
        only what grows it from then on."""
        node = dict(self.inode(ino, staged=True))
        qids = set(node.get("qids", ()))
        if (qid in qids) == add:
            return public_attr(node)
        qids = qids | {qid} if add else qids - {qid}
        node["qids"] = sorted(qids)
        return await self.commit([("I", ino, node)], answer=public_attr(node), check_limits=False)

    @recomputed
    async def set_attr(self, ino: int, changes: dict[str, Any]) -> dict[str, Any]:
        node = dict(self.inode(ino, staged=True))
        if (changes.get("size") is not None or changes.get("grow") is not None) and not stat.S_ISREG(node["mode"]):
            raise ShoalError(Code.INVALID, "only a regular file has a size to set")
        for key in INODE_FIELDS:
            if changes.get(key) is not None:
                node[key] = changes[key]
        if changes.get("grow") is not None:  # writers only ever extend the size
            node["size"] = max(node["size"], changes["grow"])
        if changes.get("mode") is not None:
            # the file type bits never change through setattr
            node["mode"] = (node["mode"] & ~0o7777) | (changes["mode"] & 0o7777)
        if changes.get("ctime") is None:
            node["ctime"] = now_ns()
        return await self.commit([("I", ino, node)], answer=public_attr(node))

    async def link_inode(self, ino: int) -> dict[str, Any]:
        node = self.inode(ino, staged=True)
        if stat.S_ISDIR(node["mode"]):
            raise ShoalError(Code.NOT_PERMITTED, "hard links to directories are not allowed")
        if node["nlink"] >= MAX_LINKS:
            raise ShoalError(Code.TOO_MANY_LINKS)
        return await self._relink(ino, node["nlink"] + 1)

    async def unlink_inode(self, ino: int) -> dict[str, Any]:
        node = self.inode(ino, staged=True)
        return await self._relink(ino, 0 if stat.S_ISDIR(node["mode"]) else max(0, node["nlink"] - 1))

    @recomputed
    async def _relink(self, ino: int, nlink: int) -> dict[str, Any]:
        node = self._touched(ino, nlink=nlink, ctime=now_ns())
        return await self.commit([("I", ino, node)], answer=public_attr(node))

    @recomputed
    async def evict_inode(self, ino: int, session: str | None = None) -> dict[str, Any]:
        """Drop an inode with no links left and no other session holding it
        open; returns its extents to free."""
        node = self.staged.inode(ino)
        if node is None:
            return {"extents": {}}
        if node["nlink"] > 0 or self.leases.held(ino, besides=session):
            return {"extents": {}, "kept": True}
        return await self.commit([("i", ino)], answer={"extents": node["extents"]})

    @recomputed
    async def close_inode(self, ino: int, session: str, may_evict: bool) -> dict[str, Any]:
        """A session that unlinked the inode closed its last handle on it: if
        no other session has it open, drop it (extents to free)."""
        self.leases.release(ino, session)
        node = self.staged.inode(ino)
        if (node is None or node["nlink"] > 0 or stat.S_ISDIR(node["mode"]) or not may_evict
                or self.leases.held(ino)):
            return {"extents": {}}
        return await self.commit([("i", ino)], answer={"extents": node["extents"]})

    def reclaimable(self, grace_ns: int) -> list[int]:
        """Unlinked inodes nobody has open, unchanged for grace_ns: left by a
        client that crashed or lost its lease before it could drop them."""
        if not self.leases.settled:
            return []
        cutoff = now_ns() - grace_ns
        return [ino for ino, node in self.inodes.items()
                if node["nlink"] == 0 and not stat.S_ISDIR(node["mode"]) and node["ctime"] < cutoff
                and not self.leases.held(ino)]

    # ----- fsck ------------------------------------------------------------
    def recount_usage(self, repair: bool) -> dict[str, Any]:
        """The partition's counts (usage.py) against a fresh count of its
        inodes; with `repair`, the fresh count is kept if they differ."""
        counted = Usage()
        counted.recount(self.inodes.values())
        kept = {b: list(v) for b, v in self.usage.counts.items()}
        differ = kept != counted.counts
        if differ and repair:
            self.usage = counted
        return {"kept": kept, "counted": counted.counts, "repaired": differ and repair}

    def scan(self, after: int, limit: int) -> dict[str, Any]:
        """Inodes after `after` (at most `limit`, fewer once their directories'
        entries add up to SCAN_ENTRIES) with their directory entries."""
        # the inode numbers are sorted once per scan (at its first page, and again
        # past the end: numbers only grow, so inodes made since come last)
        if limit and (after == 0 or not self._scan_order or after >= self._scan_order[-1]):
            self._scan_order = sorted(self.inodes)  # (not for a counters-only call: limit 0)
        order = self._scan_order
        # the rename counters: a scan during which they moved may have missed a moved entry
        out: dict[str, Any] = {"inodes": [], "dentries": [], "more": False, "boot": self.boot,
                               "moves": self.moves, "renaming": self.renaming}
        i = bisect.bisect_right(order, after)
        while i < len(order) and len(out["inodes"]) < limit and len(out["dentries"]) < SCAN_ENTRIES:
            ino, i = order[i], i + 1
            node = self.inodes.get(ino)
            if node is None:
                continue  # dropped since the scan began
            out["inodes"].append([ino, node["mode"], node["nlink"], node["ctime"]])
            for name, (child, mode) in (self.dentries.get(ino) or {}).items():
                out["dentries"].append([ino, name, child, mode])
        # inodes made since the sort lie past its end (the cursor is above every number given out)
        out["more"] = bool(out["inodes"]) and (i < len(order) or self.cursor - 1 > order[-1])
        return out

    @recomputed
    async def reclaim_orphan(self, ino: int, ctime: int, nlink: int) -> dict[str, Any]:
        """The orphan sweeper's step: only if the inode is as the sweep saw it
        (link count and ctime), a file's link count goes to 0 (the reaper frees
        it once nobody holds it open) and an empty directory is dropped."""
        node = self.staged.inode(ino)
        if node is None:
            return {"reclaimed": False}
        if node["ctime"] != ctime or node["nlink"] != nlink:
            raise ShoalError(Code.TRY_AGAIN, f"inode {ino} changed since the sweep found it nameless")
        if not stat.S_ISDIR(node["mode"]):
            await self._relink(ino, 0)
        elif self.staged.has_entries(ino):
            raise ShoalError(Code.NOT_EMPTY, f"directory {ino} is not empty")
        else:
            await self.commit([("i", ino)])
        return {"reclaimed": True}

    async def set_nlink(self, ino: int, nlink: int) -> dict[str, Any]:
        return await self._relink(ino, nlink)

    # ----- dentries ----------------------------------------------------
    @staticmethod
    def check_type(mode: int) -> None:
        if stat.S_IFMT(mode) not in FILE_TYPES:
            raise ShoalError(Code.INVALID, f"mode {mode:#o} has no valid file type")

    @staticmethod
    def check_xattr(name: str, value: bytes | None = None) -> None:
        if not name or len(name.encode()) > MAX_XATTR_NAME:
            raise ShoalError(Code.OUT_OF_RANGE, f"an xattr name has 1 to {MAX_XATTR_NAME} bytes")
        if value is not None and len(value) > MAX_XATTR_VALUE:
            raise ShoalError(Code.TOO_BIG, f"an xattr value has at most {MAX_XATTR_VALUE} bytes")

    @recomputed
    async def create_dentry(self, parent: int, name: str, ino: int, mode: int, qids: list[int] | None = None) -> None:
        self.check_name(name)
        self.check_type(mode)
        self.open_directory(parent)
        if qids is not None:
            self.check_same_quotas(qids, parent)
        if self.staged.dentry(parent, name) is not None:
            raise ShoalError(Code.EXISTS, f"{name!r} exists")
        await self.commit([("D", parent, name, ino, mode), self._dir_changed(parent, _is_dir(mode))], answer=None)

    def lookup(self, parent: int, name: str, staged: bool = False) -> dict[str, Any]:
        if len(name) > MAX_NAME and len(name.encode()) > MAX_NAME:
            raise ShoalError(Code.NAME_TOO_LONG)
        self.directory(parent, staged)
        if staged:
            entry = self.staged.dentry(parent, name)
        else:
            entries = self.dentries.get(parent)
            entry = entries.get(name) if entries is not None else None
        if entry is None:
            raise ShoalError(Code.NOT_FOUND, f"{name!r} not found")
        found: dict[str, Any] = {"ino": entry[0], "mode": entry[1]}
        node = self.staged.inode(entry[0]) if staged else self.inodes.get(entry[0])
        if node is not None:  # files live with their parent: one round trip for lookup + getattr
            found["attr"] = public_attr(node)
        return found

    @recomputed
    async def delete_dentry(self, parent: int, name: str, want_dir: bool | None,
                            keep: list[int] | None = None, session: str | None = None) -> dict[str, Any]:
        """Remove a name. When the inode is in this partition too (files are),
        its link count drops in the same record, and an inode left with no
        links is dropped unless it is in `keep` (open on the caller, whose
        own leases may be stale) or another session has it open."""
        found = self.lookup(parent, name, staged=True)
        if want_dir is True and not stat.S_ISDIR(found["mode"]):
            raise ShoalError(Code.NOT_DIR, f"{name!r} is not a directory")
        if want_dir is False and stat.S_ISDIR(found["mode"]):
            raise ShoalError(Code.IS_DIR, f"{name!r} is a directory")
        effects: list[Any] = [("d", parent, name), self._dir_changed(parent, -_is_dir(found["mode"]))]
        ino = found["ino"]
        node = self.staged.inode(ino)
        if node is not None and keep is not None and not stat.S_ISDIR(node["mode"]):
            nlink = max(0, node["nlink"] - 1)
            if nlink == 0 and ino not in keep and not self.leases.held(ino, besides=session):
                effects.append(("i", ino))
                found["evicted"] = node["extents"]
            else:
                effects.append(("I", ino, self._touched(ino, nlink=nlink, ctime=now_ns())))
            found["nlink"] = nlink
        found.pop("attr", None)
        return await self.commit(effects, answer=found)

    def readdir(self, parent: int, after: str | None, limit: int) -> dict[str, Any]:
        self.directory(parent)
        entries = self.dentries.get(parent)
        if not entries:
            return {"entries": [], "more": False}
        start = entries.bisect_right(after) if after is not None else 0
        keys = entries.keys()[start : start + limit]
        out = [[k, *entries[k]] for k in keys]
        return {"entries": out, "more": start + limit < len(entries)}

    # ----- rename ------------------------------------------------------
    def _check_replace(self, moving_mode: int, existing: tuple[int, int] | None, noreplace: bool,
                       replace_dir: int) -> None:
        if existing is None:
            return
        if noreplace:
            raise ShoalError(Code.EXISTS, "target exists")
        if stat.S_ISDIR(moving_mode) and not stat.S_ISDIR(existing[1]):
            raise ShoalError(Code.NOT_DIR, "cannot replace a non-directory with a directory")
        if not stat.S_ISDIR(moving_mode) and stat.S_ISDIR(existing[1]):
            raise ShoalError(Code.IS_DIR, "cannot replace a directory with a non-directory")
        if stat.S_ISDIR(existing[1]) and existing[0] != replace_dir:
            # only the directory the client found empty and closed to new
            # entries (META_RMDIR_PREPARE) may go; the name now means another
            raise ShoalError(Code.NOT_EMPTY, "the target directory was not prepared for removal")

    async def rename_local(self, sp: int, sn: str, dp: int, dn: str, noreplace: bool,
                           replace_dir: int = 0) -> dict[str, Any]:
        """Both parents in this partition: one journal record, atomic."""
        with self._moving():
            return await self._rename_local(sp, sn, dp, dn, noreplace, replace_dir)

    @recomputed
    async def _rename_local(self, sp: int, sn: str, dp: int, dn: str, noreplace: bool,
                            replace_dir: int) -> dict[str, Any]:
        self.check_name(dn)
        moving = self.lookup(sp, sn, staged=True)
        self.open_directory(dp)
        existing = self.staged.dentry(dp, dn)
        if sp == dp and sn == dn:
            return {"ino": moving["ino"], "replaced": None}
        if existing is not None and existing[0] == moving["ino"]:
            # rename onto another link of the same inode: POSIX says do nothing
            return {"ino": moving["ino"], "replaced": None}
        self.check_same_quotas(self.inode(sp, staged=True), dp)
        self._check_replace(moving["mode"], existing, noreplace, replace_dir)
        # a directory moving takes a link from its old parent to its new one;
        # a directory it replaces takes one from the new parent
        subdirs = dict.fromkeys((sp, dp), 0)  # one key when both parents are the same
        subdirs[sp] -= _is_dir(moving["mode"])
        subdirs[dp] += _is_dir(moving["mode"]) - (_is_dir(existing[1]) if existing else 0)
        effects: list[Any] = [("d", sp, sn), ("D", dp, dn, moving["ino"], moving["mode"])]
        effects += [self._dir_changed(p, n) for p, n in subdirs.items()]
        return await self.commit(effects, answer={"ino": moving["ino"],
                                                  "replaced": list(existing) if existing else None})

    @contextlib.contextmanager
    def _moving(self) -> Iterator[None]:
        """Counts a rename step when it begins and when it is applied (or fails):
        a scan that saw the counter unchanged saw no entry move."""
        self.moves += 1
        self.renaming += 1
        try:
            yield
        finally:
            self.renaming -= 1
            self.moves += 1

    @recomputed
    async def begin_rename_tx(self, txid: str, sp: int, sn: str, tx: dict[str, Any]) -> dict[str, Any]:
        moving = self.lookup(sp, sn, staged=True)
        if any(t["sp"] == sp and t["sn"] == sn for t in self.staged.all_txs()):
            raise ShoalError(Code.TRY_AGAIN, f"{sn!r} is being renamed")
        # the quotas it leaves: the target refuses a parent under other ones
        tx = dict(tx, sp=sp, sn=sn, ino=moving["ino"], mode=moving["mode"],
                  qids=self.inode(sp, staged=True).get("qids", []))
        with self._moving():
            await self.commit([("T", txid, tx)])
        return tx

    @recomputed
    async def finish_rename_tx(self, txid: str, answer: dict[str, Any]) -> None:
        """The source half, once the target linked the name; the rename's
        request (if the intent names one) gets `answer` kept with it."""
        tx = self.staged.tx(txid)
        if tx is None:
            return
        effects: list[Any] = [("t", txid)]
        if tx.get("rid"):
            effects.append(("R", tx["rid"], answer))
        current = self.staged.dentry(tx["sp"], tx["sn"])
        if current is not None and current[0] == tx["ino"]:
            effects += [("d", tx["sp"], tx["sn"]), self._dir_changed(tx["sp"], -_is_dir(tx["mode"]))]
        with self._moving():
            await self.commit(effects)

    @recomputed
    async def abort_rename_tx(self, txid: str) -> None:
        if self.staged.tx(txid) is not None:
            await self.commit([("t", txid)])

    @recomputed
    async def rename_link_tx(self, txid: str, dp: int, dn: str, ino: int, mode: int,
                             noreplace: bool, replace_dir: int = 0, qids: list[int] | None = None) -> dict[str, Any]:
        """Destination half of a cross-partition rename; idempotent per txid."""
        done, replaced_before = self.staged.applied_tx(txid)
        if done:
            return {"replaced": replaced_before}
        self.check_name(dn)
        self.check_type(mode)
        self.open_directory(dp)
        if qids is not None:
            self.check_same_quotas(qids, dp)
        existing = self.staged.dentry(dp, dn)
        if existing is not None and existing[0] == ino:
            existing = None
        self._check_replace(mode, existing, noreplace, replace_dir)
        replaced = list(existing) if existing else None
        subdirs = _is_dir(mode) - (_is_dir(existing[1]) if existing else 0)
        with self._moving():
            await self.commit([("D", dp, dn, ino, mode), self._dir_changed(dp, subdirs), ("A", txid, replaced)])
        return {"replaced": replaced}

    # ----- extents and xattrs -------------------------------------------
    @recomputed
    async def extent_set(self, ino: int, chunk: int, dp: int, ext: int) -> None:
        node = self.inode(ino, staged=True)
        if not stat.S_ISREG(node["mode"]):
            raise ShoalError(Code.INVALID, f"inode {ino} is not a regular file")
        if not 0 <= chunk <= MAX_CHUNK or ext != extent_id(ino, chunk):
            raise ShoalError(Code.INVALID, f"chunk {chunk} of inode {ino} is extent {extent_id(ino, chunk)}")
        known = self.data_partitions()
        if known is None:
            raise ShoalError(Code.TRY_AGAIN, "the volume's data partitions are not known yet")
        if dp not in known:
            raise ShoalError(Code.INVALID, f"data partition {dp} is not in this volume")
        if node["extents"].get(chunk) == [dp, ext]:
            return
        extents = dict(node["extents"])
        extents[chunk] = [dp, ext]
        await self.commit([("I", ino, self._touched(ino, extents=extents))], answer=None)

    @recomputed
    async def extent_drop(self, ino: int, chunks: list[int]) -> None:
        node = self.inode(ino, staged=True)
        drop = set(chunks)
        extents = {c: e for c, e in node["extents"].items() if c not in drop}
        await self.commit([("I", ino, self._touched(ino, extents=extents))], answer=None)

    @recomputed
    async def set_xattr(self, ino: int, name: str, value: bytes, flags: int) -> None:
        self.check_xattr(name, value)
        node = self.inode(ino, staged=True)
        exists = name in node["xattrs"]
        if flags == 1 and exists:  # XATTR_CREATE
            raise ShoalError(Code.EXISTS, f"xattr {name!r} exists")
        if flags == 2 and not exists:  # XATTR_REPLACE
            raise ShoalError(Code.NO_DATA, f"xattr {name!r} not set")
        xattrs = dict(node["xattrs"])
        xattrs[name] = bytes(value)
        if sum(len(k) + len(v) for k, v in xattrs.items()) > MAX_XATTR_TOTAL:
            raise ShoalError(Code.NO_SPACE, f"xattrs of inode {ino} would exceed {MAX_XATTR_TOTAL} bytes")
        await self.commit([("I", ino, self._touched(ino, xattrs=xattrs, ctime=now_ns()))], answer=None)

    def get_xattr(self, ino: int, name: str) -> bytes:
        value = self.inode(ino)["xattrs"].get(name)
        if value is None:
            raise ShoalError(Code.NO_DATA, f"xattr {name!r} not set")
        return bytes(value)

    @recomputed
    async def remove_xattr(self, ino: int, name: str) -> None:
        node = self.inode(ino, staged=True)
        if name not in node["xattrs"]:
            raise ShoalError(Code.NO_DATA, f"xattr {name!r} not set")
        xattrs = {k: v for k, v in node["xattrs"].items() if k != name}
        await self.commit([("I", ino, self._touched(ino, xattrs=xattrs, ctime=now_ns()))], answer=None)
