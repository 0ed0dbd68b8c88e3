"""A client's capability (DESIGN.md §7): bought with a key when the volume
is opened, renewed before it expires, presented on every node connection.

Renewal normally rides on the lifecycle guard's heartbeats (each answer
carries a fresh capability); the keeper renews on its own only when half
the capability's life has passed without one. A capability that expired
anyway (the client was stopped, the master away) is bought again with the
key. A key the master no longer accepts marks the client revoked: every
operation then fails with EACCES — revocation is not deletion, the mount
stays.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from shoalfs.client.keys import KeyFileError, find_key
from shoalfs.common.master_client import MasterClient
from shoalfs.proto.capability import READ_ONLY
from shoalfs.proto.errors import Code, ShoalError

log = logging.getLogger(__name__)


NO_KEY = "no key (key=/key_file=, --key-file/-o key_file=, SHOAL_KEY_FILE, or the embedded cluster's key store)"


class ClientCredential:
    def __init__(self, master: MasterClient, volume: str, key: str | None, key_file: str | None = None,
                 find: bool = True) -> None:
        """The key is `key`, else found (`find`) as client/keys.py says; without
        one, the master client's admin token must stand in."""
        self.master = master
        self.volume = volume
        self.key = key
        self.key_file = key_file
        self.find = find
        self.capability: str | None = None
        self.rights = ""
        self.ttl = 60.0
        self.renewed_at = 0.0
        self.revoked = False
        self.on_volume_error: Callable[[ShoalError], None] | None = None
        self._renewing: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def read_only(self) -> bool:
        return self.rights == READ_ONLY

    def token(self) -> str | None:
        return self.capability

    def install(self, capability: Any) -> None:
        """A capability from the master (a session opened, a heartbeat's answer)."""
        if isinstance(capability, str) and capability:
            self.capability = capability
            self.renewed_at = time.monotonic()
            self.master.authorization = f"Capability {capability}"

    def check(self) -> None:
        if self.revoked:
            raise ShoalError(Code.UNAUTHORIZED, f"access denied to volume {self.volume}: its key was revoked")

    def refused(self, exc: ShoalError) -> None:
        """The master refused this session for good: the key is revoked."""
        if not self.revoked:
            log.error("access to volume %s revoked: %s", self.volume, exc.msg)
        self.revoked = True

    async def open(self, deadline: float) -> dict[str, Any]:
        """Buy a capability with the key; the volume's description. Without a
        key too: the master says whether the volume exists. A missing, wrong
        or revoked key: UNAUTHORIZED, `access denied to volume NAME`."""
        denied = f"access denied to volume {self.volume}"
        if self.key is None and self.find:
            try:
                self.key = find_key(self.master.spec, self.volume, key_file=self.key_file)
            except KeyFileError as exc:
                raise ShoalError(Code.UNAUTHORIZED, f"{denied}: {exc}") from None
        body: dict[str, Any] = {"volume": self.volume}
        if self.key is not None:
            body["key"] = self.key
        try:
            res = await self.master.request("POST", "/client/session", body=body, deadline=deadline)
        except ShoalError as exc:
            if exc.code in (Code.UNAUTHORIZED, Code.FORBIDDEN):
                raise ShoalError(exc.code, denied if self.key else f"{denied}: {NO_KEY}") from None
            raise
        self.rights = str(res["rights"])
        self.ttl = float(res["ttl"])
        self.install(res["capability"])
        return dict(res["volume"])

    async def renew(self) -> None:
        """Renew now (one renewal at a time; callers share it)."""
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._renew())
        await asyncio.shield(self._renewing)

    async def _renew(self) -> None:
        self.check()
        try:
            res = await self.master.request("POST", "/client/renew", deadline=5.0)
            self.install(res["capability"])
            return
        except ShoalError as exc:
            if exc.code == Code.VOLUME_NOT_EXIST:
                if self.on_volume_error is not None:
                    self.on_volume_error(exc)
                raise
            if exc.code == Code.UNAUTHORIZED:
                self.refused(exc)
                raise
            if exc.code != Code.EXPIRED:
                raise
        try:  # too old to renew: buy a new one with the key
            await self.open(deadline=5.0)
        except ShoalError as exc:
            if exc.code == Code.UNAUTHORIZED:
                self.refused(exc)
            raise

    # ----- background renewal ---------------------------------------------------
    def start(self) -> None:
        self._keeper = asyncio.create_task(self._keep())

    async def _keep(self) -> None:
        failures = 0
        while not self.revoked and not self._stopping:
            due = self.renewed_at + self.ttl / 2 - time.monotonic()
            if due > 0:
                await asyncio.sleep(min(due, self.ttl / 2) + 0.01)
                continue
            try:
                await self.renew()
                failures = 0
            except ShoalError as exc:
                if exc.code == Code.VOLUME_NOT_EXIST:
                    return
                failures += 1
                log.warning("capability renewal failed (%s); retrying", exc.msg)
                await asyncio.sleep(random.uniform(0, min(5.0, 0.2 * 2 ** failures)))

    async def stop(self) -> None:
        self._stopping = True  # a cancellation lost in a wait_for still ends the loop
        tasks = [t for t in (self._keeper, self._renewing) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
