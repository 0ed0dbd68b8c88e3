"""A node's replication work across its partitions: lease pings (one message
per follower node for all the partitions it follows), catching lagging
members up, and the node's side of the protocol's messages.

Every partition kind (meta, data) uses this through Replica; only what a
catch-up copies differs (Replica.resync).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from shoalfs.common.master_client import MasterClient
from shoalfs.common.metrics import Metrics
from shoalfs.common.placement import views_of
from shoalfs.common.tasks import BackgroundTask
from shoalfs.proto.capability import Access
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.proto.rpc import RpcPool
from shoalfs.proto.schema import ListOf, Raw, Schema
from shoalfs.proto.wire import Packed
from shoalfs.replication.replica import FORWARD_TIMEOUT, LEASE, Replica, newer_view
from shoalfs.replication.view import View

log = logging.getLogger(__name__)

PING_EVERY = LEASE / 5
PINGS_MISSED = 2  # pings in a row a follower misses before it is reported
CATCH_UP_EVERY = 1.0
CATCH_UP_BACKOFF = (1.0, 10.0)  # first and longest pause after a failed catch-up

PING: Schema = {"views": ListOf(Raw, 1_000_000)}  # each checked by View.from_wire
VIEW_CHANGE: Schema = {"view": Raw}  # checked by View.from_wire


class ReplicationHub:
    def __init__(self, me: str, peers: RpcPool, master: MasterClient,
                 replicas: Callable[[], Mapping[int, Replica]]) -> None:
        self.me = me
        self.peers = peers
        self.master = master
        self.replicas = replicas
        self._background = BackgroundTask(self._loop)
        self._tasks: dict[tuple[int, str], asyncio.Task[None]] = {}  # catch-ups and reports under way
        self._retry_at: dict[tuple[int, str], tuple[float, float]] = {}  # -> (when, pause)
        self._missed: dict[str, int] = {}  # follower node -> pings in a row it did not answer

    def register_metrics(self, metrics: Metrics) -> None:
        """What this node's replication looks like, read when Prometheus scrapes."""
        def partitions() -> list[tuple[tuple[str, ...], float]]:
            reps = list(self.replicas().values())
            led = sum(1 for r in reps if r.leading)
            return [(("yes",), float(led)), (("no",), float(len(reps) - led))]
        metrics.state("shoal_partitions", "Partitions held here, by whether this node leads them", ["leading"],
                      partitions)
        metrics.state("shoal_replicas_lagging", "Members of partitions led here that are not in sync "
                      "(catching up, or away)", [],
                      lambda: [((), float(sum(len(r.view.lagging()) for r in self.replicas().values()
                                              if r.leading)))])
        metrics.state("shoal_catch_ups_running", "Catch-ups of lagging members this node runs now", [],
                      lambda: [((), float(sum(1 for r in self.replicas().values() for _ in r.progress)))])

    def replica(self, view: View, persist: Callable[[View], None], fresh: bool = False) -> Replica:
        """A partition's replication; `fresh`: just created, so no other node
        ever led it (otherwise, loaded after a restart, see Replica)."""
        rep = Replica(self.me, view, persist, self.call, self._report)
        if fresh:
            rep.promised_until = 0.0
        return rep

    async def call(self, target: str, op: Op, pid: int, body: dict[str, Any] | Packed,
                   timeout: float = FORWARD_TIMEOUT) -> Any:
        """One message to another member of a partition (no retry: the caller decides)."""
        return await self.peers.call_once(target, op, pid, body, timeout=timeout)

    def register(self, route: Callable[..., None]) -> None:
        """The node's routes for the master's view pushes and leaders' pings."""
        route(Op.PARTITION_VIEW, self._view_pushed, VIEW_CHANGE, access=Access.MASTER)
        route(Op.REPL_PING, self._pinged, PING, access=Access.PEER)

    async def _view_pushed(self, pid: int, body: Any, conn: Any) -> Any:
        view = View.from_wire(body["view"])
        rep = self.replicas().get(view.pid)
        if rep is not None:
            rep.adopt(view)
        return {}

    async def _pinged(self, pid: int, body: Any, conn: Any) -> Any:
        return self.answer_ping(body)

    def adopt_maps(self, volumes: Any) -> None:
        """Views of our partitions in the volume maps of a master heartbeat."""
        replicas = self.replicas()
        for vmap in volumes.values() if isinstance(volumes, dict) else ():
            for wire in views_of(vmap):
                rep = replicas.get(wire[0])
                if rep is None:
                    continue
                try:
                    rep.adopt(View.from_wire(wire))
                except ShoalError as exc:
                    log.warning("partition %d: the master's view is invalid: %s", wire[0], exc.msg)

    async def _report(self, view: View, member: str, event: str) -> View:
        data = await self.master.request("POST", "/partition/report", deadline=5.0, body={
            "pid": view.pid, "epoch": view.epoch, "member": member, "event": event})
        return View.from_wire(data.get("view") if isinstance(data, dict) else None)

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        last_catch_up = 0.0
        while True:
            start = time.monotonic()
            try:
                await self.ping_round()
                if start - last_catch_up >= CATCH_UP_EVERY:
                    last_catch_up = start
                    self.start_catch_ups()
            except Exception:
                log.exception("replication round failed")
            await asyncio.sleep(max(0.0, PING_EVERY - (time.monotonic() - start)))

    # ----- the leader's lease -------------------------------------------------
    async def ping_round(self) -> None:
        """Renew the lease of every partition led here with its followers: one
        REPL_PING per follower node. A follower that does not answer is reported."""
        by_node: dict[str, list[Replica]] = {}
        for rep in list(self.replicas().values()):
            if rep.leading:
                for follower in {*rep.view.followers(), *rep.joining}:  # both renew the lease
                    by_node.setdefault(follower, []).append(rep)
                for member in rep.diverged:  # a failed drop: ask the master again
                    self._spawn_report(rep, member, "failed")
                for member in rep.joining - set(rep.view.in_sync):  # a join whose answer was lost
                    self._spawn_report(rep, member, "joined")
        await asyncio.gather(*(self._ping(addr, reps) for addr, reps in by_node.items()))

    async def _ping(self, addr: str, reps: list[Replica]) -> None:
        sent = time.monotonic()
        views = {rep.pid: rep.view for rep in reps}
        try:
            answer = await self.peers.call_once(addr, Op.REPL_PING, 0,
                                                {"views": [v.to_wire() for v in views.values()]},
                                                timeout=min(1.0, LEASE / 2))
        except ShoalError as exc:
            self._missed[addr] = self._missed.get(addr, 0) + 1
            if self._missed[addr] < PINGS_MISSED:
                return  # one late answer (a busy node) is not yet a failure; the lease may lapse meanwhile
            for rep in reps:
                if rep.view is views[rep.pid] and (addr in rep.view.followers() or addr in rep.joining):
                    log.warning("partition %d: follower %s does not answer (%s); asking the master to drop it",
                                rep.pid, addr, exc.msg)
                    # it may miss changes from now on (and a joining one may be in sync already)
                    rep.joining.discard(addr)
                    rep.diverged.add(addr)
                    self._spawn_report(rep, addr, "failed")
            return
        self._missed.pop(addr, None)
        refused = answer.get("refused", {}) if isinstance(answer, dict) else {}
        for rep in reps:
            why = refused.get(rep.pid)
            if why is None:
                if rep.view is views[rep.pid]:
                    rep.grant(addr, sent)
                continue
            newer = newer_view(ShoalError(Code.STALE_EPOCH, "", why))
            if newer is not None and rep.adopt(newer):
                continue
            if addr in rep.view.followers():
                rep.diverged.add(addr)
                self._spawn_report(rep, addr, "failed")

    def _spawn_report(self, rep: Replica, member: str, event: str) -> None:
        async def go() -> None:
            try:
                if event == "failed":
                    await rep.drop_diverged()
                else:
                    await rep.report(member, event)
            except ShoalError as exc:
                log.warning("partition %d: cannot report %s %s to the master: %s", rep.pid, member, event,
                            exc.msg)
        key = (rep.pid, f"{event}:{member}")
        if key in self._tasks:
            return
        task = self._tasks[key] = asyncio.create_task(go())
        task.add_done_callback(lambda t: self._tasks.pop(key, None))

    def answer_ping(self, body: dict[str, Any]) -> dict[str, Any]:
        """A leader's ping: accept each view we follow it in (renewing our
        promise); the others are refused with the view we know."""
        refused: dict[int, Any] = {}
        replicas = self.replicas()
        for wire in body["views"]:
            try:
                view = View.from_wire(wire)
            except ShoalError:
                continue
            rep = replicas.get(view.pid)
            if rep is None:
                refused[view.pid] = {"msg": "partition not here"}
                continue
            try:
                rep.accept_leader(wire)
            except ShoalError as exc:
                refused[view.pid] = exc.data
        return {"refused": refused}

    # ----- catching lagging members up ------------------------------------------
    def start_catch_ups(self) -> None:
        now = time.monotonic()
        for rep in list(self.replicas().values()):
            if not rep.leading or rep.resync is None:
                continue
            for member in rep.view.lagging():
                key = (rep.pid, member)
                task = self._tasks.get(key)
                if (task is not None and not task.done()) or member in rep.joining:
                    continue
                if self._retry_at.get(key, (0.0, 0.0))[0] > now:
                    continue
                self._tasks[key] = asyncio.create_task(self._catch_up(rep, member))

    async def _catch_up(self, rep: Replica, member: str) -> None:
        key = (rep.pid, member)
        try:
            # a member we cannot reach would hold the partition's gate shut for a
            # whole call timeout in the last round: ask it first, briefly
            await self.peers.call_once(member, Op.REPL_PING, 0, {"views": []}, timeout=min(1.0, LEASE / 2))
            await rep.catch_up(member)
            self._retry_at.pop(key, None)
        except Exception as exc:  # noqa: BLE001 - whatever a peer answered, back off and try again
            pause = min(CATCH_UP_BACKOFF[1], self._retry_at.get(key, (0.0, CATCH_UP_BACKOFF[0] / 2))[1] * 2)
            self._retry_at[key] = (time.monotonic() + pause, pause)
            log.info("partition %d: catching %s up failed (%s); again in %.0fs", rep.pid, member,
                     exc.msg if isinstance(exc, ShoalError) else exc, pause)
        finally:
            with contextlib.suppress(KeyError):
                if self._tasks[key] is asyncio.current_task():
                    del self._tasks[key]
