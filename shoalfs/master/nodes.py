"""Node liveness and placement reconciliation.

The master heartbeats every registered node over RPC. A node that has not
answered for `node_timeout` seconds is down. Each answer lists the
partitions the node holds: missing ones that placement says it should hold
are created, and ones that belong to no live volume are dropped — so a node
that was down during a create or delete converges when it comes back.

Only the leader runs it (start at election, stop at deposition); its
commands present a capability of the leader's term, which nodes that have
obeyed a later leader refuse. After a failover every node counts as down
until the new leader's first heartbeat round (one interval).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shoalfs.common.tasks import BackgroundTask
from shoalfs.master.state import MasterState
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.proto.rpc import Credential, RetryPolicy, RpcPool
from shoalfs.replication.view import View

log = logging.getLogger(__name__)


async def _nothing() -> None:
    return None


class NodeMonitor:
    def __init__(self, state: MasterState, interval: float = 1.0,
                 node_timeout: float = 5.0, tls: ssl.SSLContext | None = None) -> None:
        self.state = state
        self.interval = interval
        self.node_timeout = node_timeout
        # how long one heartbeat may take: a round waits for its slowest node, and
        # failover waits for the round, so a silent leader is judged after this
        self.beat_timeout = 3.0
        self.tls = tls
        self.pool: RpcPool | None = None  # while leading
        self.creating: set[int] = set()  # partitions of volumes being created: not orphans
        self.last_ok: dict[str, float] = {}
        self.round_started = 0.0  # when the last heartbeat round began
        self.refused: set[str] = set()  # nodes whose last heartbeat found no process listening
        self.reports: dict[str, dict[str, Any]] = {}
        self._background = BackgroundTask(self._loop)
        self.first_round = asyncio.Event()  # set once every node has been asked since start()
        # whether this master still leads: checked before every round and command
        self.leading: Callable[[], bool] = lambda: True
        # a node refused our term, having obeyed the later one given (etcd restored from a backup?)
        self.fenced_off: Callable[[int], None] = lambda term: None
        # fields of every node's heartbeat, computed once per round
        self.round_state: Callable[[], dict[str, Any]] = lambda: {}
        # extra fields sent when dropping a partition of a volume that is gone
        self.orphan_context: Callable[[int, dict[str, Any]], dict[str, Any]] = lambda pid, report: {}
        # fields of one node's heartbeat (its node capability)
        self.node_state: Callable[[str], dict[str, Any]] = lambda addr: {}
        # what runs after each round (partition failover)
        self.after_round: Callable[[], Awaitable[None]] = _nothing
        # before a partition a node lost is made again there (it leaves in_sync)
        self.before_recreate: Callable[[dict[str, Any], dict[str, Any], str], Awaitable[None]] = \
            lambda part, vol, addr: _nothing()

    def is_up(self, addr: str) -> bool:
        return time.monotonic() - self.last_ok.get(addr, -1e9) < self.node_timeout

    def live(self, role: str) -> list[str]:
        return sorted(a for a, n in self.state.nodes.items() if n["role"] == role and self.is_up(a))

    def node_table(self) -> list[dict[str, Any]]:
        rows = []
        for addr, node in sorted(self.state.nodes.items()):
            report = self.reports.get(addr, {})
            rows.append({"addr": addr, "role": node["role"],
                         "status": "up" if self.is_up(addr) else "down",
                         "partitions": len(report.get("partitions", {})),
                         "disk_free": report.get("disk_free")})
        return rows

    def mark_seen(self, addr: str) -> None:
        self.last_ok[addr] = time.monotonic()

    def _pool(self) -> RpcPool:
        if self.pool is None or not self.leading():
            raise ShoalError(Code.NOT_LEADER, "this master no longer leads", {"leader": None})
        return self.pool

    async def command(self, addr: str, op: Op, pid: int, body: dict[str, Any], timeout: float = 5.0) -> Any:
        return await self._pool().call(addr, op, pid, body, deadline=timeout)

    async def create_partition(self, addr: str, kind: str, part: dict[str, Any], vol: dict[str, Any]) -> None:
        body: dict[str, Any] = {"vol_id": vol["vol_id"], "kind": kind, "volume": self.state.volume_map(vol),
                                **View.of_partition(part).fields()}
        if kind == "meta":  # every replica makes the root with the volume's creation time
            body.update(start=part["start"], end=part["end"], created_ns=int(vol["created_at"] * 1e9))
        await self.command(addr, Op.CREATE_PARTITION, part["pid"], body)

    async def delete_partition(self, addr: str, pid: int, extra: dict[str, Any] | None = None) -> None:
        await self.command(addr, Op.DELETE_PARTITION, pid, extra or {})

    async def start(self, credential: Credential) -> None:
        """Begin heartbeating, every connection presenting `credential` (the
        leader's capability: nodes obey no one else)."""
        await self.stop()  # whatever a failed stop left behind
        self.pool = RpcPool(RetryPolicy(deadline=5.0, attempt_timeout=3.0), credential=credential, tls=self.tls)
        self.last_ok.clear()
        self.refused.clear()
        self.reports.clear()
        self.first_round.clear()
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close()

    async def _loop(self) -> None:
        while True:
            await self.beat_all()
            self.first_round.set()
            try:
                await self.after_round()
            except Exception:
                log.exception("after a heartbeat round")
            await asyncio.sleep(self.interval)

    async def settled(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the first heartbeat round after start: a leader
        fresh from a failover knows no node as live before it."""
        try:
            await asyncio.wait_for(self.first_round.wait(), timeout)
        except TimeoutError:
            pass

    async def beat_all(self) -> None:
        """One heartbeat round; also carries volume states (read-only while pending delete)."""
        nodes = list(self.state.nodes)
        self.round_started = time.monotonic()
        placements, shared = self.state.placements(), self.round_state()  # once per round
        await asyncio.gather(*(self._beat(a, placements.get(a, {}), shared) for a in nodes),
                             return_exceptions=True)

    async def _beat(self, addr: str, placed: dict[int, tuple[str, dict[str, Any], dict[str, Any]]],
                    shared: dict[str, Any]) -> None:
        vols = {vol["vol_id"]: vol for _, _, vol in placed.values()}
        body = {**shared, **self.node_state(addr),
                "volumes": {vol_id: self.state.volume_map(vol) for vol_id, vol in vols.items()}}
        try:
            report = await self._pool().call_once(addr, Op.HEARTBEAT, 0, body, timeout=self.beat_timeout)
        except ShoalError as exc:
            if isinstance(exc.data, dict) and exc.data.get("refused"):  # no process listens there now
                self.refused.add(addr)
            else:
                self.refused.discard(addr)
            if self.is_up(addr) or addr not in self.last_ok:
                log.debug("heartbeat to %s failed: %s", addr, exc)
            obeyed = exc.data.get("term") if exc.code == Code.NOT_LEADER and isinstance(exc.data, dict) else None
            if isinstance(obeyed, int):
                self.fenced_off(obeyed)
            return
        was_up = self.is_up(addr)
        self.refused.discard(addr)
        self.mark_seen(addr)
        self.reports[addr] = report
        if not was_up:
            log.info("node %s is up", addr)
        await self._reconcile(addr, report, placed)

    async def _reconcile(self, addr: str, report: dict[str, Any],
                         placed: dict[int, tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
        want = self.state.placements().get(addr, {})
        have = {int(p) for p in report.get("partitions", {})}
        for pid, (kind, part, vol) in want.items():
            # placed when the round began too: a partition made during the round is not
            # "lost" by a node whose answer predates it
            if pid not in have and pid in placed:
                log.info("re-creating %s partition %d on %s", kind, pid, addr)
                try:
                    # an empty copy holds none of the changes: it must catch up first
                    await self.before_recreate(part, vol, addr)
                    await self.create_partition(addr, kind, part, vol)
                except ShoalError as exc:
                    log.warning("re-create of partition %d on %s failed: %s", pid, addr, exc)
        for pid in have - set(want) - self.creating:
            if pid >= self.state.doc["next_pid"]:
                # never allocated by this state: etcd wiped, restored or another cluster's prefix
                log.error("node %s holds partition %d, newer than any this cluster's state knows "
                          "(next pid %d): kept; check the masters' etcd and etcd_prefix",
                          addr, pid, self.state.doc["next_pid"])
                continue
            log.info("dropping orphan partition %d on %s", pid, addr)
            try:
                await self.delete_partition(addr, pid, self.orphan_context(pid, report))
            except ShoalError as exc:
                log.warning("drop of partition %d on %s failed: %s", pid, addr, exc)
