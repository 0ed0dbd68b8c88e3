"""The lifecycle guard: learns that the mounted volume was deleted, three ways.

1. push: a subscription on every metanode that serves the volume;
2. heartbeat: the master's answer for our vol_id (also registers the session);
3. error code: any RPC answered VOLUME_NOT_EXIST.

Only a tombstone that verifies against the master key learned at mount and
names our vol_id counts. Anything else — timeouts, refused connections,
HTTP errors, unsigned, wrongly signed or foreign tombstones — is logged and
at most triggers an immediate extra heartbeat; it never ends the mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoalfs.client.core import VolumeClient
from shoalfs.proto import tombstone
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.proto.rpc import RpcConnection

log = logging.getLogger(__name__)

PUSH, HEARTBEAT, ERROR_CODE = "push", "heartbeat", "error-code"
ALL_PATHS = (PUSH, HEARTBEAT, ERROR_CODE)
VERSION = "0.1.0"


@dataclass
class GuardConfig:
    paths: tuple[str, ...] = ALL_PATHS  # detection paths that may prove a deletion
    heartbeat_interval: float = 5.0  # 0 disables heartbeats (and session registration)
    jitter: float = 0.1  # +-10 % on every interval, so 10,000 mounts do not beat in step
    resubscribe_backoff: tuple[float, float] = (0.1, 2.0)
    session_info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse_paths(cls, spec: str) -> tuple[str, ...]:
        paths = tuple(p.strip() for p in spec.split("+") if p.strip())
        unknown = [p for p in paths if p not in ALL_PATHS]
        if unknown or not paths:
            raise ValueError(f"detect= takes {'+'.join(ALL_PATHS)} (any of them), not {spec!r}")
        return paths


Deleted = Callable[[dict[str, Any], str], None]


class LifecycleGuard:
    def __init__(self, client: VolumeClient, config: GuardConfig, on_deleted: Deleted) -> None:
        self.client = client
        self.config = config
        self.on_deleted = on_deleted
        self.vol_id = client.vol_id
        self.public_key: str = client.vol["master_pubkey"]
        self.deleted = False
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: dict[str, RpcConnection] = {}
        self._check_now = asyncio.Event()
        self.stopping = False
        self._last_warning: dict[str, float] = {}
        client.on_volume_error = self._on_volume_error

    # ----- claims -------------------------------------------------------------
    def claim(self, tomb: Any, path: str) -> bool:
        """A deletion claim from one path; True if it proved the deletion."""
        if self.deleted:
            return True
        why = tombstone.verify(self.public_key, tomb, self.vol_id)
        if why is not None:
            self._warn(path, f"ignoring a deletion claim via {path}: {why}")
            if HEARTBEAT in self.config.paths:
                self._check_now.set()  # ask the master at once; never exit on a claim
            return False
        if path not in self.config.paths:
            log.debug("verified tombstone via disabled path %s ignored", path)
            return False
        self.deleted = True
        log.warning("volume %s (%s) was deleted (proved via %s)", tomb["name"], self.vol_id, path)
        self.on_deleted(tomb, path)
        return True

    def _warn(self, key: str, msg: str) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(key, 0) > 5:  # one line per path per 5 s, not a flood
            log.warning(msg)
            self._last_warning[key] = now

    def _on_volume_error(self, exc: ShoalError) -> None:
        self.claim((exc.data or {}).get("tombstone") if isinstance(exc.data, dict) else None, ERROR_CODE)

    # ----- heartbeat ----------------------------------------------------------
    def heartbeat_body(self) -> dict[str, Any]:
        """What `shoal volume clients` shows; the capability names the session."""
        return dict(self.config.session_info, host=socket.gethostname(), pid=os.getpid(), version=VERSION)

    async def beat(self) -> None:
        """Also renews the session's capability (DESIGN.md §7)."""
        credential = self.client.credential
        try:
            res = await self.client.master.request_once("POST", "/client/heartbeat", body=self.heartbeat_body())
        except ShoalError as exc:
            if exc.code == Code.VOLUME_NOT_EXIST:
                tomb = exc.data.get("tombstone") if isinstance(exc.data, dict) else None
                self.claim(tomb, HEARTBEAT)
            elif exc.code == Code.UNAUTHORIZED:
                credential.refused(exc)
            elif exc.code == Code.EXPIRED:
                with contextlib.suppress(ShoalError):
                    await credential.renew()
            else:
                self._warn("master", f"heartbeat to the master failed (transient): {exc.msg}")
            return
        credential.install(res.get("capability"))
        pending = res.get("status") == "PENDING_DELETE"
        if pending != self.client.pending_delete:
            log.warning("volume %s is %s", self.client.volume_name,
                        "pending deletion: read-only" if pending else "active again: writable")
        self.client.pending_delete = pending

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        while not self.deleted and not self.stopping:
            await self.beat()
            self._check_now.clear()
            wait = interval * (1 + random.uniform(-self.config.jitter, self.config.jitter))
            try:
                await asyncio.wait_for(self._check_now.wait(), wait)
                await asyncio.sleep(0.2)  # extra checks: at most five a second
            except TimeoutError:
                pass

    # ----- push ---------------------------------------------------------------
    def _on_event(self, opcode: int, body: Any) -> None:
        if opcode == Op.EVENT_VOLUME_DELETED:
            self.claim(body.get("tombstone") if isinstance(body, dict) else None, PUSH)

    async def _subscription(self, addr: str) -> None:
        """Stay subscribed on one metanode, across its restarts."""
        first, cap = self.config.resubscribe_backoff
        attempt = 0
        while not self.deleted and not self.stopping:
            conn = RpcConnection(addr, self._on_event, self.client.pool.tls)
            self._subs[addr] = conn  # from now on stop() closes it, wherever this task is
            try:
                await conn.connect(3.0)
                await conn.authenticate(self.client.credential.token() or "", 5.0)
                await conn.call(Op.SUBSCRIBE, 0, {"vol_id": self.vol_id}, 5.0)
                attempt = 0
                if not self.stopping:
                    await conn.wait_closed()
            except ShoalError as exc:
                if exc.code == Code.VOLUME_NOT_EXIST:
                    self.claim((exc.data or {}).get("tombstone"), PUSH)
                else:
                    self._warn(addr, f"subscription on {addr} failed (transient): {exc.msg}")
            finally:
                await conn.close()
                self._subs.pop(addr, None)
            await asyncio.sleep(random.uniform(0, min(cap, first * 2**attempt)))
            attempt += 1

    # ----- life cycle -----------------------------------------------------------
    async def start(self) -> None:
        if self.config.heartbeat_interval > 0:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        if PUSH in self.config.paths:
            for addr in sorted({p["replicas"][0] for p in self.client.vol["meta_partitions"]}):
                self._tasks.append(asyncio.create_task(self._subscription(addr)))

    async def stop(self, goodbye: bool = True) -> None:
        """Cancel, and also close what the tasks wait on: a cancellation that
        lands in the step a reply arrives is lost inside asyncio.wait_for
        (Python 3.11), and the task would then wait for its connection."""
        self.stopping = True
        for t in self._tasks:
            t.cancel()
        for conn in list(self._subs.values()):
            await conn.close()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=5.0)
            for t in stuck:
                log.warning("lifecycle task %s did not stop in 5 s", t.get_name())
        self._tasks.clear()
        if goodbye and not self.deleted and self.config.heartbeat_interval > 0:
            try:
                await self.client.master.request_once("POST", "/client/goodbye", body={})
            except ShoalError:
                pass
