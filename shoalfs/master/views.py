"""The master's side of replication: each partition's view (DESIGN.md §6).

A view lives in its partition's record (`replicas` = members, leader first;
`epoch`; `in_sync`), saved to etcd with the volume before anyone hears of
it. It changes only here, each change one epoch up:

- a leader reports a follower that failed a change or a ping: it leaves
  in_sync, so the leader goes on without it;
- a leader reports a lagging member it caught up: it joins in_sync;
- a leader that has not answered the master's heartbeats for
  `failover_after` seconds (at once if its node refuses connections: no
  process listens there; or if it lost its copy) is replaced by a live in-sync
  member, which then leads alone until the others catch up from it (their
  copies may hold a change the old leader never acknowledged). A partition
  whose only in-sync member is down waits for it: no other copy is known to
  hold every acknowledged change;
- a follower that lost its copy leaves in_sync before it is made again;
- a member silent for `replace_after` seconds is swapped for another node,
  which gets an empty copy and is caught up by the leader.

Every change is pushed to the members at once (heartbeats repeat it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from shoalfs.master.nodes import NodeMonitor
from shoalfs.master.state import ACTIVE, DELETED, MasterState
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.replication.replica import LEASE
from shoalfs.replication.view import View

log = logging.getLogger(__name__)

EVENTS = ("failed", "joined")
SCRUB_TIMEOUT = 600.0  # a leader compares (and repairs) its whole partition
REPLACE_AFTER = 900.0  # seconds a member may be silent before its copy is made again elsewhere


class PartitionViews:
    def __init__(self, state: MasterState, nodes: NodeMonitor, failover_after: float = 2.0,
                 replace_after: float = REPLACE_AFTER) -> None:
        self.state = state
        self.nodes = nodes
        self.failover_after = failover_after
        self.replace_after = replace_after
        self.lock = asyncio.Lock()
        self.leading_since = 0.0  # monotonic time this master began to lead (set at election)
        self._pushes: set[asyncio.Task[None]] = set()
        self.on_change: Callable[[str], None] | None = None  # an event for the metrics, per new view

    def find(self, pid: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(partition record, volume) of a live volume's partition."""
        if isinstance(pid, int) and not isinstance(pid, bool):
            for vol in self.state.volumes.values():
                if vol["status"] == DELETED:
                    continue
                for key in ("meta_partitions", "data_partitions"):
                    for part in vol[key]:
                        if part["pid"] == pid:
                            return part, vol
        raise ShoalError(Code.PARTITION_NOT_EXIST, f"partition {pid!r} is not in any live volume")

    async def report(self, body: dict[str, Any]) -> dict[str, Any]:
        """A partition leader asks for a view change; the answer is the view now."""
        event, member, epoch = body.get("event"), body.get("member"), body.get("epoch")
        if event not in EVENTS or not isinstance(member, str) or not isinstance(epoch, int):
            raise ShoalError(Code.BAD_REQUEST, "a report names pid, epoch, member and event (failed|joined)")
        async with self.lock:
            part, vol = self.find(body.get("pid"))
            view = View.of_partition(part)
            if epoch == view.epoch:
                if event == "failed" and member in view.members and member != view.leader:
                    # also for a lagging member: the new epoch voids a join it may have in flight
                    await self._change(part, vol, view.members, [a for a in view.in_sync if a != member],
                                       f"{member} failed")
                elif event == "joined" and member in view.lagging():
                    await self._change(part, vol, view.members,
                                       [a for a in view.members if a in view.in_sync or a == member],
                                       f"{member} caught up")
            return {"view": View.of_partition(part).to_wire()}

    async def lost(self, part: dict[str, Any], vol: dict[str, Any], addr: str) -> None:
        """`addr` no longer holds its copy (a new disk?): it leaves in_sync, so
        it is made again empty and caught up. Its only copy lost, a partition
        is made again empty: what it held is gone."""
        async with self.lock:
            view = View.of_partition(part)
            if addr in view.followers():
                await self._change(part, vol, view.members, [a for a in view.in_sync if a != addr],
                                   f"{addr} lost its copy")
            elif addr == view.leader and view.followers():
                new = view.followers()[0]
                await self._change(part, vol, [new, *(a for a in view.members if a != new)], [new],
                                   f"leader {addr} lost its copy")

    async def _change(self, part: dict[str, Any], vol: dict[str, Any], members: Any, in_sync: Any,
                      why: str) -> None:
        """Record a new view (durable in etcd first), then tell its members."""
        old = View.of_partition(part)
        view = View(old.pid, old.epoch + 1, tuple(members), tuple(in_sync))
        part.update(view.fields())
        try:
            await self.state.save()
        except BaseException:
            part.update(old.fields())  # memory stays what etcd holds (a failed save also resigns)
            raise
        log.info("partition %d: epoch %d, leader %s, in sync %s (%s)", view.pid, view.epoch, view.leader,
                 ",".join(view.in_sync), why)
        if self.on_change is not None:
            self.on_change("partition_failover" if view.leader != old.leader else "partition_view_change")
        task = asyncio.create_task(self._push(view))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    async def _push(self, view: View) -> None:
        async def one(addr: str) -> None:
            try:
                await self.nodes.command(addr, Op.PARTITION_VIEW, view.pid, {"view": view.to_wire()}, timeout=1.0)
            except ShoalError as exc:
                log.debug("view of partition %d not pushed to %s: %s", view.pid, addr, exc.msg)
        await asyncio.gather(*(one(a) for a in view.members))

    def _silent_for(self, addr: str, now: float) -> float:
        return now - max(self.nodes.last_ok.get(addr, self.leading_since), self.leading_since)

    async def fail_over(self) -> None:
        """Replace every leader the master has not heard from for failover_after
        seconds with a live in-sync member (after each heartbeat round)."""
        now = time.monotonic()
        # a new master gives nodes a round, and old leaders their lease, before judging them
        if now - self.leading_since < max(self.failover_after, LEASE) or not self.nodes.first_round.is_set():
            return
        def answered(addr: str) -> bool:  # in the last round (a round waits for its slowest node)
            return self.nodes.last_ok.get(addr, -1.0) >= self.nodes.round_started

        async with self.lock:
            for vol in list(self.state.volumes.values()):
                if vol["status"] == DELETED:
                    continue
                for part in vol["meta_partitions"] + vol["data_partitions"]:
                    view = View.of_partition(part)
                    # a leader whose node refuses connections is gone (killed, crashed, restarting):
                    # no need to wait failover_after for it
                    if (len(view.members) < 2 or answered(view.leader)
                            or (view.leader not in self.nodes.refused
                                and self._silent_for(view.leader, now) < self.failover_after)):
                        continue
                    live = [a for a in view.followers() if answered(a)]
                    if not live:
                        continue  # only the silent leader is known to hold everything: wait for it
                    new = live[0]
                    members = [new, *(a for a in view.members if a != new)]
                    try:
                        await self._change(part, vol, members, [new], f"leader {view.leader} silent")
                    except ShoalError as exc:
                        log.warning("failover of partition %d not recorded: %s", view.pid, exc.msg)
                        return
            await self._replace_gone(now, answered)

    def catch_up(self, part: dict[str, Any]) -> dict[str, str]:
        """Lagging member -> how far its catch-up is, as its leader last reported."""
        view = View.of_partition(part)
        held = self.nodes.reports.get(view.leader, {}).get("partitions", {})
        report = held.get(view.pid, held.get(str(view.pid), {}))
        progress = report.get("catch_up") if isinstance(report, dict) else None
        return {m: str(progress.get(m, "waiting")) if isinstance(progress, dict) else "waiting"
                for m in view.lagging()}

    def _holds(self, addr: str, pid: int) -> bool:
        """Whether the node's last heartbeat listed a copy of `pid` (one it
        has not dropped yet: not a spare for it)."""
        held = self.nodes.reports.get(addr, {}).get("partitions", {})
        return pid in held or str(pid) in held

    async def _replace_gone(self, now: float, answered: Callable[[str], bool]) -> None:
        """A member silent for replace_after (out of in_sync by then) is swapped
        for a live node of the same role holding no copy, the one with the
        fewest partitions; it gets the partition (the node monitor makes it)
        and the leader catches it up. The old node, if it returns, drops its
        copy as an orphan."""
        load = {addr: len(parts) for addr, parts in self.state.placements().items()}
        for vol in list(self.state.volumes.values()):
            if vol["status"] != ACTIVE:
                continue
            for kind in ("meta", "data"):
                for part in vol[f"{kind}_partitions"]:
                    view = View.of_partition(part)
                    for gone in view.lagging():
                        if self._silent_for(gone, now) < self.replace_after:
                            continue
                        spare = sorted((load.get(a, 0), a) for a, node in self.state.nodes.items()
                                       if node["role"] == f"{kind}node" and a not in view.members and answered(a)
                                       and not self._holds(a, view.pid))
                        if not spare:
                            continue
                        new = spare[0][1]
                        load[new] = load.get(new, 0) + 1
                        try:
                            await self._change(part, vol, [new if a == gone else a for a in view.members],
                                               view.in_sync, f"{gone} gone for {self.replace_after:.0f}s: "
                                                             f"a copy on {new}")
                        except ShoalError as exc:
                            log.warning("replacement in partition %d not recorded: %s", view.pid, exc.msg)
                            return
                        break

    async def scrub(self, vol: dict[str, Any]) -> list[dict[str, Any]]:
        """Each partition's leader compares its followers' copies with its own
        and repairs what differs; one row per partition."""
        async def one(kind: str, part: dict[str, Any]) -> dict[str, Any]:
            view = View.of_partition(part)
            row: dict[str, Any] = {"kind": kind, "pid": view.pid, "leader": view.leader, "members": {}}
            if len(view.in_sync) < 2:
                row["error"] = "no other in-sync copy to compare"
                return row
            try:
                row["members"] = (await self.nodes.command(view.leader, Op.REPL_SCRUB, view.pid, {},
                                                           timeout=SCRUB_TIMEOUT))["members"]
            except ShoalError as exc:
                row["error"] = exc.msg
            return row
        return list(await asyncio.gather(*(one(kind, p) for kind in ("meta", "data")
                                           for p in vol[f"{kind}_partitions"])))
