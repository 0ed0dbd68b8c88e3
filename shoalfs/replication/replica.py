"""One partition's replication on one node: fencing, the leader's lease, and
forwarding each change to the in-sync followers (DESIGN.md §6).

Primary/backup under an external configuration manager (PacificA): the
master owns the view; the leader orders changes, applies each locally and
on every in-sync follower, and acknowledges only when all have persisted
it. A follower that fails is reported to the master, which drops it from
`in_sync` (a new epoch); the change then completes without it.

Fencing: every message carries the sender's view; a node refuses an older
epoch and adopts a newer one (persisted before it is used).

Reads are served by the leader alone, under a lease its followers grant:
a follower that accepts a message from the leader promises to follow no
other leader for LEASE seconds, and the leader counts the lease from when
it *sent* that message (its own clock), so it expires before the promise.
A node that becomes leader waits for its own last promise to run out, so
an old leader that does not know it was replaced has stopped serving by
then. A node starting up makes that promise for every partition, since it
cannot remember the ones it made before a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.proto.wire import Packed
from shoalfs.replication.view import View

log = logging.getLogger(__name__)

T = TypeVar("T")
LEASE = 1.5  # seconds a follower promises to follow only the leader it last heard from
LEASE_SAFETY = 0.8  # the leader trusts its lease for this share of LEASE (clock rates differ)
FORWARD_TIMEOUT = 1.5  # a follower that does not confirm a change within this is reported
REPORT_WAIT = 1.0  # how long a change waits for the master to drop a follower that missed it (it answers in ms)

# (member, view) -> the view the master answers; raises if the master cannot be asked
Reporter = Callable[[View, str, str], Coroutine[Any, Any, View]]
Forwarder = Callable[[str, Op, int, dict[str, Any] | Packed], Awaitable[Any]]
# the partition's own catch-up: make `member` hold what the leader holds; `final` runs with no change in flight
Resync = Callable[[str, View, bool], Awaitable[None]]
# the partition's own comparison with one follower's copy: what it found (and repaired)
Scrub = Callable[[str, View], Awaitable[str]]


def stale(view: View) -> ShoalError:
    return ShoalError(Code.STALE_EPOCH, f"partition {view.pid} is at epoch {view.epoch}", {"view": view.to_wire()})


def newer_view(exc: ShoalError) -> View | None:
    """The view an answer of STALE_EPOCH or NOT_PARTITION_LEADER carries, if valid."""
    wire = exc.data.get("view") if isinstance(exc.data, dict) else None
    try:
        return View.from_wire(wire) if wire is not None else None
    except ShoalError:
        return None


class Gate:
    """Changes in flight on a partition; a catch-up's last round closes the
    gate, waits for those in flight and lets no new one start until it is done.

    `enter` counts a change at once, without a pause: a metadata change is
    computed against the partition's state and must be queued before any
    other change runs, so it may not wait at the gate in between (two creates
    waiting there would both take the same inode number). One that finds the
    gate shut is computed again once it opens."""

    def __init__(self) -> None:
        self._active = 0
        self._open = asyncio.Event()
        self._open.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = asyncio.Lock()  # one catch-up's last round at a time

    def enter(self) -> bool:
        """Count a change in flight now, unless the gate is shut (False)."""
        if not self._open.is_set():
            return False
        self._active += 1
        self._drained.clear()
        return True

    def leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._drained.set()

    async def wait_open(self) -> None:
        await self._open.wait()

    @contextlib.asynccontextmanager
    async def change(self) -> AsyncIterator[None]:
        """A change that may wait for the gate (it is computed after it enters)."""
        while not self.enter():
            await self._open.wait()
        try:
            yield
        finally:
            self.leave()

    @contextlib.asynccontextmanager
    async def closed(self) -> AsyncIterator[None]:
        async with self._closing:
            self._open.clear()
            try:  # a cancel while changes drain opens the gate again too
                await self._drained.wait()
                yield
            finally:
                self._open.set()


class Replica:
    def __init__(self, me: str, view: View, persist: Callable[[View], None],
                 forward: Forwarder, reporter: Reporter) -> None:
        self.me = me
        self.view = view
        self._persist = persist
        self._forward_rpc = forward
        self._reporter = reporter
        self.resync: Resync | None = None  # set by the partition kind; None: it cannot catch members up
        self.scrubber: Scrub | None = None  # likewise: compares a follower's copy with ours
        self.grants: dict[str, float] = {}  # follower -> when the last message it accepted was sent
        self.promised_until = time.monotonic() + LEASE  # see the module comment
        self.joining: set[str] = set()  # lagging members caught up and sent every change, not yet in_sync
        self.progress: dict[str, str] = {}  # lagging member -> how far its catch-up is (volume info shows it)
        self.diverged: set[str] = set()  # in-sync followers whose copy differs: to drop before going on
        self.on_leading: Callable[[], None] = lambda: None  # this node became the leader
        self.gate = Gate()
        self._reports: dict[tuple[str, str, int], asyncio.Task[None]] = {}

    @property
    def pid(self) -> int:
        return self.view.pid

    @property
    def leading(self) -> bool:
        return self.view.leader == self.me

    # ----- views -------------------------------------------------------------
    def adopt(self, view: View) -> bool:
        """Take a newer view (from the master or a peer); persisted before it counts."""
        if view.pid != self.view.pid or view.epoch <= self.view.epoch:
            return False
        self._persist(view)
        was_leading = self.leading
        self.view = view
        self.joining &= set(view.lagging())
        self.diverged &= set(view.followers())
        if self.leading and not was_leading:
            self.grants.clear()
            self.on_leading()
            log.info("partition %d: leading at epoch %d (in sync: %s)", view.pid, view.epoch, ",".join(view.in_sync))
        return True

    def accept_leader(self, wire: Any) -> None:
        """A message from the partition's leader: refused unless its view is
        current; renews our promise to follow that leader only."""
        view = View.from_wire(wire)
        if view.pid != self.pid:
            raise ShoalError(Code.BAD_REQUEST, "the view is of another partition")
        if view.epoch < self.view.epoch:
            raise stale(self.view)
        self.adopt(view)
        if self.leading or self.me not in self.view.members:
            raise stale(self.view)
        self.promised_until = max(self.promised_until, time.monotonic() + LEASE)

    # ----- serving -----------------------------------------------------------
    def check_serving(self) -> None:
        """Raise unless this node may answer for the partition now: it leads,
        the previous leader's lease has run out, and its own holds."""
        view = self.view
        if not self.leading:
            raise ShoalError(Code.NOT_PARTITION_LEADER, f"{self.me} does not lead partition {view.pid}",
                             {"view": view.to_wire()})
        if len(view.members) == 1:
            return  # nobody else can lead it (and no copy can differ)
        now = time.monotonic()
        if now < self.promised_until:
            raise ShoalError(Code.TRY_AGAIN, f"partition {view.pid}: the previous leader's lease has "
                                             f"{self.promised_until - now:.1f}s to run")
        if self.diverged:
            raise ShoalError(Code.TRY_AGAIN, f"partition {view.pid}: waiting for the master to drop "
                                             f"{', '.join(sorted(self.diverged))}")
        # a joining member may be in sync already (its join's answer lost): it must renew too
        for follower in {*view.followers(), *self.joining}:
            if now >= self.grants.get(follower, -1e9) + LEASE * LEASE_SAFETY:
                raise ShoalError(Code.TRY_AGAIN, f"partition {view.pid}: follower {follower} has not "
                                                 "renewed the leader's lease")

    async def replicate(self, op: Op, body: dict[str, Any], local: Awaitable[T]) -> T:
        """Apply a change here (`local`) and on every in-sync or joining
        follower; return once all have it.

        A follower whose copy now differs from ours is dropped from in_sync
        before anything else is acknowledged: one that failed the change if
        we applied it, one that applied it if we failed. Until the master has
        dropped it, this raises (transient) and check_serving refuses."""
        view = self.view
        targets = [*view.followers(), *sorted(self.joining - set(view.followers()))]
        # the forwards first: they are on the wire before our own write (perhaps an
        # inline fdatasync) holds the loop, so the followers work while we do
        forwards = []
        if targets:
            try:  # packed once for all of them
                packed = Packed.of({"view": view.to_wire(), "op": int(op), "body": body})
            except ShoalError:
                if asyncio.iscoroutine(local):
                    local.close()  # nothing was applied anywhere
                raise
            forwards = [self._forward(t, view, packed) for t in targets]
        outcomes = await asyncio.gather(*forwards, local, return_exceptions=True)
        theirs, ours = outcomes[:-1], outcomes[-1]
        failed = [(t, o) for t, o in zip(targets, theirs, strict=True) if isinstance(o, BaseException)]
        if isinstance(ours, BaseException):  # whoever applied it is ahead of us
            self._diverged([t for t, o in zip(targets, theirs, strict=True) if o is None], ours)
        elif failed:
            self._diverged([t for t, _ in failed], failed[0][1])
        for _target, exc in failed:
            newer = newer_view(exc) if isinstance(exc, ShoalError) else None
            if newer is not None:
                try:
                    self.adopt(newer)
                except OSError as err:  # not persisted: not adopted; the master's push repeats it
                    log.warning("partition %d: cannot keep view %d: %s", self.pid, newer.epoch, err)
        await self.drop_diverged()
        if isinstance(ours, BaseException):
            raise ours
        return ours  # type: ignore[return-value]

    async def _forward(self, target: str, view: View, forward: Packed) -> BaseException | None:
        sent = time.monotonic()
        try:
            await self._forward_rpc(target, Op.REPL_FORWARD, view.pid, forward)
        except ShoalError as exc:
            return exc
        self.grant(target, sent)
        return None

    def grant(self, follower: str, sent: float) -> None:
        self.grants[follower] = max(self.grants.get(follower, -1e9), sent)

    def _diverged(self, targets: list[str], why: BaseException) -> None:
        for target in targets:
            if target in self.joining:
                # caught up again later; dropped first, in case its join landed unanswered
                self.joining.discard(target)
                self.diverged.add(target)
                log.info("partition %d: joining member %s left behind (%s)", self.pid, target, why)
            elif target in self.view.followers():
                log.warning("partition %d: follower %s differs from the leader now (%s); dropping it",
                            self.pid, target, why)
                self.diverged.add(target)

    async def drop_diverged(self) -> None:
        """Have the master drop every follower whose copy differs from ours;
        until it has, nothing more is acknowledged (check_serving refuses)."""
        for target in sorted(self.diverged):
            # asked at least once (a joining member may be in sync already without our
            # knowing); the master acts on the current epoch only: ask again at a newer one
            for attempt in range(3):
                if attempt and target not in self.view.followers():
                    break
                try:  # not long: a leader cut off from the master must not hold its callers
                    await asyncio.wait_for(self.report(target, "failed"), REPORT_WAIT)
                except TimeoutError:
                    raise ShoalError(Code.TRY_AGAIN, f"partition {self.pid}: the master has not answered "
                                                     f"about {target} yet") from None
            if target in self.view.followers():
                raise ShoalError(Code.TRY_AGAIN, f"partition {self.pid}: the master has not dropped {target} yet")
            self.diverged.discard(target)
        if not self.leading:
            raise ShoalError(Code.NOT_PARTITION_LEADER, f"{self.me} no longer leads partition {self.pid}",
                             {"view": self.view.to_wire()})

    async def report(self, member: str, event: str) -> None:
        """Ask the master to change the view (`failed`: drop `member` from
        in_sync; `joined`: add it); concurrent asks for the same are one."""
        key = (member, event, self.view.epoch)
        task = self._reports.get(key)
        if task is None or task.done():
            self._reports = {k: t for k, t in self._reports.items() if not t.done()}
            task = asyncio.create_task(self._report_and_adopt(self.view, member, event),
                                       context=contextvars.Context())
            self._reports[key] = task
        await asyncio.shield(task)  # a caller that stops waiting leaves the report (and its answer) going

    async def _report_and_adopt(self, view: View, member: str, event: str) -> None:
        self.adopt(await self._reporter(view, member, event))

    # ----- catching a member up ------------------------------------------------
    async def catch_up(self, member: str) -> None:
        """Bring a lagging member level (in bulk while changes go on, then the
        rest with the gate closed), send it every change from then on, and
        ask the master to count it in sync."""
        if self.resync is None:
            raise ShoalError(Code.UNAVAILABLE, f"partition {self.pid} cannot catch members up")
        try:
            await self.resync(member, self.view, False)
            async with self.gate.closed():
                view = self.view
                if not self.leading or member not in view.lagging():
                    return
                await self.resync(member, view, True)
                self.joining.add(member)
                # still closed: no change can miss the member before the master counts it;
                # not for long (changes wait): it gets every change as joining meanwhile,
                # and the ping round asks the master again
                await asyncio.wait_for(self.report(member, "joined"), REPORT_WAIT)
        finally:
            self.progress.pop(member, None)
        log.info("partition %d: %s caught up and is in sync (epoch %d)", self.pid, member, self.view.epoch)

    async def scrub(self) -> dict[str, str]:
        """Compare every in-sync follower's copy with ours (the partition kind
        repairs what differs); member -> what was found."""
        self.check_serving()
        if self.scrubber is None:
            raise ShoalError(Code.UNAVAILABLE, f"partition {self.pid} cannot be scrubbed")
        found: dict[str, str] = {}
        for member in self.view.followers():
            try:
                found[member] = await self.scrubber(member, self.view)
            except ShoalError as exc:
                found[member] = f"not compared: {exc.msg}"
        return found
