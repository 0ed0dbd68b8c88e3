"""A meta partition's side of replication (shoalfs/replication): each
journal batch the leader writes goes to the in-sync followers in the same
step, and is acknowledged once all have it; a lagging member gets the
leader's whole state (taken with no change in flight) and the batches after
it; a scrub compares a hash of each copy's state.

Records are effects (whole values put or deleted), so a follower applies
them as the leader did and holds the same state.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from sortedcontainers import SortedDict

from shoalfs.metanode.journal import Journal
from shoalfs.metanode.staged import Staged
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.replication.replica import Replica

SNAPSHOT_PIECE = 4 * 1024 * 1024
Call = Callable[[str, Op, int, dict[str, Any]], Awaitable[Any]]


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _map(v: Any) -> bool:
    return isinstance(v, dict)


def _any(v: Any) -> bool:
    return True


# kind -> checks of its fields (partition.MetaPartition._apply)
EFFECT_FIELDS: dict[str, tuple[Callable[[Any], bool], ...]] = {
    "I": (_int, _map), "i": (_int,), "D": (_int, _str, _int, _int), "d": (_int, _str), "C": (_int,),
    "T": (_str, _map), "t": (_str,), "A": (_str, _any), "R": (_str, _any)}


def check_effects(effects: Any) -> None:
    """A record from the leader: a list of effects of known kinds, each field of its type."""
    def sound(e: Any) -> bool:
        checks = EFFECT_FIELDS.get(e[0]) if isinstance(e, (list, tuple)) and e and isinstance(e[0], str) else None
        return (checks is not None and len(e) == len(checks) + 1
                and all(c(v) for c, v in zip(checks, e[1:], strict=True)))
    if not isinstance(effects, list) or not all(sound(e) for e in effects):
        raise ShoalError(Code.BAD_REQUEST, "a replicated record must be a list of well-formed effects")


def decode_state(blob: bytes) -> dict[str, Any]:
    try:
        state = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except ValueError:
        raise ShoalError(Code.BAD_REQUEST, "the snapshot does not decode") from None
    check_state(state)
    return state  # type: ignore[no-any-return]


def check_state(state: Any) -> None:
    """A leader's whole state (a catch-up), checked before it replaces ours."""
    try:
        ok = (isinstance(state, dict) and _int(state["cursor"])
              and all(_int(k) and _map(v) for k, v in state["inodes"].items())
              and all(_int(p) and _map(d) and all(_str(n) and isinstance(e, (list, tuple)) and len(e) == 2
                                                  and _int(e[0]) and _int(e[1]) for n, e in d.items())
                      for p, d in state["dentries"].items())
              and all(_str(k) and _map(v) for k, v in state.get("txs", {}).items())
              and _map(state.get("applied", {})) and _map(state.get("answered", {})))
    except (KeyError, AttributeError, TypeError):
        ok = False
    if not ok:
        raise ShoalError(Code.BAD_REQUEST, "the snapshot is not a partition's state")


class ReplicatedPartition:
    """Mixed into MetaPartition, which holds the state and journal named here."""

    pid: int
    journal: Journal
    staged: Staged
    cursor: int
    inodes: dict[int, dict[str, Any]]
    dentries: dict[int, SortedDict]
    txs: dict[str, dict[str, Any]]
    replica: Replica | None
    leading_appends: int
    _call: Call | None
    _incoming: bytearray | None
    _background: set[asyncio.Task[None]]

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_state(self, snapshot: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def replicate_with(self, replica: Replica, call: Call) -> None:
        """Replicate every journal batch through `replica` from now on."""
        self.replica = replica
        self._call = call
        self.journal.replicate = self._replicate_batch
        replica.resync = self._resync
        replica.scrubber = self._scrub

    async def _replicate_batch(self, records: list[Any], write: Awaitable[None]) -> None:
        rep = self.replica
        if rep is not None and not rep.leading and self.leading_appends:
            # deposed with our own changes queued: none of them may count
            if asyncio.iscoroutine(write):
                write.close()
            raise ShoalError(Code.NOT_PARTITION_LEADER, f"no longer leading partition {self.pid}",
                             {"view": rep.view.to_wire()})
        if rep is None or not rep.leading or not (rep.view.followers() or rep.joining):
            await write
            return
        await rep.replicate(Op.META_RECORDS, {"records": records}, write)

    async def apply_replicated(self, records: list[Any]) -> None:
        """Records the leader made durable, made durable and applied here in its order."""
        for effects in records:
            check_effects(effects)
        pending = []
        for effects in records:
            pending.append(self.journal.append(effects))
            self.staged.add(effects)
        await asyncio.gather(*pending)
        if self.journal.wants_snapshot() and not self._background:
            # in the background: the leader's forward must not wait for it
            task = asyncio.create_task(self.journal.snapshot(self._state))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _resync(self, member: str, view: Any, final: bool) -> None:
        """Catch a member up: our whole state, sent once no change is in flight."""
        if not final:
            return
        # in a thread (a large state takes a while): with the gate shut nothing changes it
        blob = await asyncio.to_thread(msgpack.packb, self._state(), use_bin_type=True)
        assert self._call is not None  # set with the replica
        for offset in range(0, max(1, len(blob)), SNAPSHOT_PIECE):
            if self.replica is not None:
                self.replica.progress[member] = f"state: {offset >> 20}/{len(blob) >> 20} MiB"
            await self._call(member, Op.REPL_SNAPSHOT, self.pid, {
                "view": view.to_wire(), "offset": offset, "data": blob[offset:offset + SNAPSHOT_PIECE],
                "total": len(blob)})

    def digest(self) -> str:
        """A hash of the whole state, the same on replicas that hold the same."""
        h = hashlib.sha256(msgpack.packb([self.cursor, sorted(self.txs.items())], use_bin_type=True))
        for ino in sorted(self.inodes):
            h.update(msgpack.packb([ino, self.inodes[ino]], use_bin_type=True))
        for parent in sorted(self.dentries):
            h.update(msgpack.packb([parent, list(self.dentries[parent].items())], use_bin_type=True))
        return h.hexdigest()

    async def _scrub(self, member: str, view: Any) -> str:
        """Compare a follower's state with ours (no change in flight); one that
        differs leaves in_sync and is caught up from ours."""
        assert self._call is not None and self.replica is not None  # set with the replica
        async with self.replica.gate.closed():
            ours = self.digest()
            theirs = (await self._call(member, Op.REPL_DIGEST, self.pid, {"view": view.to_wire()}))["digest"]
        if theirs == ours:
            return "same"
        self.replica.diverged.add(member)
        await self.replica.drop_diverged()
        return "differed: dropped from in_sync and caught up from the leader"

    async def receive_snapshot(self, offset: int, data: bytes, total: int) -> None:
        """A piece of the leader's state; the last one replaces ours."""
        if offset == 0:
            self._incoming = bytearray()
        if self._incoming is None or offset != len(self._incoming) or offset + len(data) > total:
            self._incoming = None
            raise ShoalError(Code.BAD_REQUEST, "snapshot pieces out of order")
        self._incoming += data
        if len(self._incoming) < total:
            return
        blob, self._incoming = bytes(self._incoming), None
        state = await asyncio.to_thread(decode_state, blob)  # a large state takes a while
        await self.journal.replace(blob)
        self._load_state(state)
        self.staged.clear()

