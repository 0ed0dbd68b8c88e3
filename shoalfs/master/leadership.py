"""Which master leads (DESIGN.md §6): a leader key on an etcd lease.

Every master campaigns: it creates `leader` on a lease of `leader_lease`
seconds if the key is absent (one transaction), else learns the leader's
address from it. The winner's term is the key's create revision. It keeps
the lease alive every quarter of its life and believes it leads only until
the time it last renewed plus 90 % of the lease: a leader that cannot renew
(etcd gone, the process stopped) stops serving before etcd can elect
another, and every write it attempts is conditional on its key (store.Guard).

Followers read the key every `poll` seconds; when the leader's lease
expires (killed, stopped, cut off) one of them wins the next campaign.

Times are CLOCK_BOOTTIME, which keeps counting while the machine is
suspended: a leader whose VM was paused past its lease knows it on waking.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from shoalfs.master.store import LEADER, EtcdStore, Guard
from shoalfs.proto.errors import Code, ShoalError

log = logging.getLogger(__name__)

VALID_FRACTION = 0.9  # of the lease: margin for the clocks of etcd and this master


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Leadership:
    def __init__(self, store: EtcdStore, advertise: str, lease_ttl: int,
                 on_elected: Callable[[int], Awaitable[None]], on_deposed: Callable[[], Awaitable[None]],
                 poll: float = 0.25) -> None:
        self.store = store
        self.advertise = advertise
        self.lease_ttl = lease_ttl
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.poll = poll
        self.id = uuid.uuid4().hex  # this process: a restarted master is a new candidate
        self.term = 0  # the leader key's create revision while we hold it
        self.leader: str | None = None  # the leader's address, as last read
        self.etcd_error: str | None = None  # why etcd did not answer last time, if it did not
        self._lease: int | None = None
        self._valid_until = float("-inf")
        self._ready = False  # elected and the state loaded

    @property
    def holds_lease(self) -> bool:
        """Elected, and the lease surely not expired (also while taking over)."""
        return self._lease is not None and now() < self._valid_until

    @property
    def leading(self) -> bool:
        """Elected and serving: the state is loaded."""
        return self._ready and self.holds_lease

    def guard(self) -> Guard:
        """The condition of a write; NOT_LEADER if we do not hold the lease now."""
        if not self.holds_lease:
            raise self.not_leader()
        return self.store.guard(self.term)

    def not_leader(self) -> ShoalError:
        leader = None if self.leader == self.advertise else self.leader
        why = f"the leader is {leader}" if leader else \
            f"no leader known (etcd: {self.etcd_error})" if self.etcd_error else "no master leads yet"
        return ShoalError(Code.NOT_LEADER, f"master {self.advertise} is not the leader: {why}", {"leader": leader})

    def resign(self, why: str) -> None:
        """Stop leading at once (a write failed); the campaign loop cleans up."""
        if self._ready:
            log.warning("master %s stops leading: %s", self.advertise, why)
        self._ready = False
        self._valid_until = float("-inf")

    def status(self) -> dict[str, Any]:
        return {"addr": self.advertise, "leading": self.leading, "leader": self.leader,
                "etcd": self.store.endpoint, "etcd_error": self.etcd_error}

    # ----- the campaign loop -------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                try:
                    if self._lease is None:
                        await self._campaign()
                    elif not self.leading:
                        await self._step_down("its lease was not renewed in time")
                        continue
                    else:
                        await self._renew()
                    self.etcd_error = None
                except ShoalError as exc:
                    self.etcd_error = exc.msg
                    if not self.leading:
                        self.leader = None  # whoever it was may have lost its lease since
                    log.debug("leadership: %s", exc.msg)
                except Exception as exc:  # never let the campaign die: this master would never lead again
                    self.etcd_error = repr(exc)
                    log.exception("leadership loop")
                    if self._lease is not None:
                        self.resign(f"unexpected error: {exc!r}")
                await asyncio.sleep(self.lease_ttl / 4 if self.leading else self.poll)
        finally:
            if self._lease is not None:
                await self._step_down("the master is stopping")

    async def _campaign(self) -> None:
        current = await self.store.get(LEADER)
        if current is not None:
            self.leader = self._addr_of(current[0])
            return
        started = now()
        lease = await self.store.grant_lease(self.lease_ttl)
        value = json.dumps({"addr": self.advertise, "id": self.id}).encode()
        try:
            won, holder, term = await self.store.campaign(value, lease)
        except ShoalError:
            await self._forget_lease(lease)
            raise
        self.leader = self._addr_of(holder)
        if not won:
            await self._forget_lease(lease)
            return
        self._lease, self.term = lease, term
        self._valid_until = started + self.lease_ttl * VALID_FRACTION
        log.info("master %s elected leader (term %d); loading the cluster state", self.advertise, term)
        try:
            await self._renewing(self.on_elected(term))
        except Exception as exc:
            log.error("master %s could not take over: %s", self.advertise, exc)
            await self._step_down(f"taking over failed: {exc}")
            raise ShoalError(Code.UNAVAILABLE, f"taking over failed: {exc}") from None
        self._ready = True
        log.info("master %s leads (term %d)", self.advertise, term)

    async def _renewing(self, work: Awaitable[None]) -> None:
        """Run `work` (taking over: loading the state) while the lease is kept
        alive: a large state on a slow etcd must not outlast the lease."""
        async def keep_alive() -> None:
            while True:
                await asyncio.sleep(self.lease_ttl / 4)
                await self._renew()
        renewer = asyncio.create_task(keep_alive())
        try:
            await work
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    async def _renew(self) -> None:
        assert self._lease is not None
        started = now()
        ttl = await self.store.refresh_lease(self._lease)
        if ttl <= 0:
            self.resign("its lease expired")
        elif now() >= self._valid_until:  # lapsed before the renewal came back: others may have led
            self.resign("its lease was renewed too late")
        else:
            self._valid_until = max(self._valid_until, started + min(ttl, self.lease_ttl) * VALID_FRACTION)

    async def _step_down(self, why: str) -> None:
        self.resign(why)
        lease, self._lease = self._lease, None
        self.leader = None
        self.term = 0
        try:
            await self.on_deposed()
        finally:
            if lease is not None:
                await self._forget_lease(lease)  # the others need not wait for it to expire

    async def _forget_lease(self, lease: int) -> None:
        try:
            await self.store.revoke_lease(lease)
        except ShoalError as exc:
            log.debug("revoking lease %x: %s (it expires by itself)", lease, exc.msg)

    @staticmethod
    def _addr_of(value: bytes) -> str | None:
        try:
            addr = json.loads(value)["addr"]
        except (ValueError, KeyError, TypeError):
            return None
        return addr if isinstance(addr, str) else None
