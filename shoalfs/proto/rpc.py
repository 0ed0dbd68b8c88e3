"""The RPC client everyone uses: a multiplexing connection (many requests in
flight; responses carry the request id they answer) and a pool with retries
of transient faults. The server side is proto/server.py."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.proto.receiver import POOL, FrameReceiver
from shoalfs.proto.wire import FLAG_EVENT, Frame, Header, decode_body

log = logging.getLogger(__name__)

BeforeRetry = Callable[[ShoalError], Awaitable[None]]


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


EventCallback = Callable[[int, Any], None]


class Credential(Protocol):
    """The capability a pool presents on each connection (DESIGN.md §7)."""

    def token(self) -> str | None:
        """The capability to present now; None: none yet (the call fails UNAUTHORIZED)."""

    async def renew(self) -> None:
        """A node found the capability expired: get a new one (or raise why not)."""


class RpcConnection:
    """A client connection with many requests in flight."""

    def __init__(self, addr: str, on_event: EventCallback | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.addr = addr
        self.on_event = on_event
        self.tls = tls  # None: plain TCP
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[int, Any]]] = {}
        self._proto: FrameReceiver | None = None
        self.closed = False
        self.presented: str | None = None  # the capability this connection authenticated with
        self._auth: asyncio.Future[Any] | None = None

    async def connect(self, timeout: float) -> None:
        host, port = split_addr(self.addr)
        loop = asyncio.get_running_loop()
        try:
            _, self._proto = await asyncio.wait_for(
                loop.create_connection(lambda: FrameReceiver(self._on_frame, self._on_lost), host, port,
                                       ssl=self.tls, server_hostname=host if self.tls is not None else None),
                timeout)
        except ssl.SSLError as exc:  # a wrong CA, or a server without TLS: retried, reported at the deadline
            self.closed = True
            raise ShoalError(Code.UNAVAILABLE, f"{self.addr}: TLS handshake failed: {exc}") from None
        except (TimeoutError, OSError) as exc:
            self.closed = True
            # refused: nothing listens there (the process is gone), as opposed to a slow or lost network
            raise ShoalError(Code.NODE_UNREACHABLE, f"{self.addr}: {exc!r}",
                             {"refused": isinstance(exc, ConnectionRefusedError)}) from None

    def _on_frame(self, header: Header, payload: bytes | memoryview, reserved: int) -> None:
        try:
            body = decode_body(header, payload)
        except ShoalError as exc:
            body, header.result = {"msg": exc.msg}, Code.TRY_AGAIN
        finally:
            POOL.give(payload)
        if header.flags & FLAG_EVENT:
            if self.on_event is not None:
                try:
                    self.on_event(header.opcode, body)
                except Exception:
                    log.exception("event callback failed")
            return
        fut = self._pending.pop(header.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result((header.result, body))

    def _on_lost(self, exc: BaseException | None) -> None:
        self._fail_all()

    def _fail_all(self) -> None:
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ShoalError(Code.NODE_UNREACHABLE, f"{self.addr}: connection lost"))
        self._pending.clear()
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()

    async def call(self, opcode: int, partition_id: int, body: Any, timeout: float) -> Any:
        proto = self._proto
        if self.closed or proto is None or proto.transport is None or proto.transport.is_closing():
            raise ShoalError(Code.NODE_UNREACHABLE, f"{self.addr}: not connected")
        rid = next(self._ids)
        fut: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        frame = Frame(opcode=opcode, request_id=rid, partition_id=partition_id, body=body)
        for part in frame.chunks():
            proto.transport.write(part)
        sent = time.monotonic()
        try:
            if not proto.writable:  # the peer is not reading: wait for room, within the timeout
                await asyncio.wait_for(proto.drain(), timeout)
            result, reply = await asyncio.wait_for(fut, max(0.0, timeout - (time.monotonic() - sent)))
        except TimeoutError:
            raise ShoalError(Code.TIMEOUT, f"{self.addr}: no answer in {timeout:.1f}s") from None
        except (ConnectionError, OSError) as exc:
            raise ShoalError(Code.NODE_UNREACHABLE, f"{self.addr}: {exc!r}") from None
        finally:
            self._pending.pop(rid, None)
        if result != 0:
            reply = reply if isinstance(reply, dict) else {}
            raise ShoalError(result, reply.get("msg"), reply.get("data"))
        return reply

    async def authenticate(self, token: str, timeout: float) -> None:
        """Present a capability for every later request on this connection
        (until then the server takes only small frames). Callers that find it
        being presented wait for the same answer."""
        pending = self._auth
        if pending is None or self.presented != token:
            self.presented = token
            pending = self._auth = asyncio.ensure_future(self.call(Op.AUTH, 0, {"cap": token}, timeout))
            pending.add_done_callback(self._auth_done)
        elif pending.done() and not pending.cancelled() and pending.exception() is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(pending), timeout)
        except TimeoutError:
            raise ShoalError(Code.TIMEOUT, f"{self.addr}: no answer to AUTH in {timeout:.1f}s") from None

    def _auth_done(self, fut: asyncio.Future[Any]) -> None:
        if (fut.cancelled() or fut.exception() is not None) and self._auth is fut:
            self._auth, self.presented = None, None  # the next call presents it again

    async def wait_closed(self) -> None:
        if self._proto is not None:
            await self._proto.lost.wait()

    async def close(self) -> None:
        self._fail_all()


class RetryPolicy:
    """Capped exponential backoff with full jitter, bounded by a deadline."""

    def __init__(self, deadline: float = 60.0, first: float = 0.05, cap: float = 2.0,
                 attempt_timeout: float = 10.0) -> None:
        self.deadline = deadline
        self.first = first
        self.cap = cap
        self.attempt_timeout = attempt_timeout

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.first * (2**attempt)))


class RpcPool:
    """Connections by address, reopened on demand, with transient retries."""

    def __init__(self, policy: RetryPolicy | None = None, on_event: EventCallback | None = None,
                 credential: Credential | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.policy = policy or RetryPolicy()
        self.on_event = on_event
        self.credential = credential
        self.tls = tls
        self._conns: dict[str, RpcConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.closed = False
        self._closed_event = asyncio.Event()

    async def connection(self, addr: str, timeout: float | None = None) -> RpcConnection:
        """An open connection to addr; opening one takes at most `timeout` (3 s at most)."""
        conn = self._conns.get(addr)
        if conn is not None and not conn.closed:
            return conn
        timeout = min(3.0, self.policy.attempt_timeout, timeout if timeout is not None else 3.0)
        end = time.monotonic() + timeout  # waiting for the lock and connecting share it
        lock = self._locks.setdefault(addr, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), timeout)
        except TimeoutError:
            raise ShoalError(Code.TIMEOUT, f"{addr}: no connection within {timeout:.1f}s") from None
        try:
            conn = self._conns.get(addr)
            if conn is None or conn.closed:
                if self.closed:
                    raise ShoalError(Code.UNAVAILABLE, "client is closed")
                conn = RpcConnection(addr, self.on_event, self.tls)
                await conn.connect(max(0.01, end - time.monotonic()))
                self._conns[addr] = conn
            return conn
        finally:
            lock.release()

    async def call_once(self, addr: str, opcode: int, partition_id: int, body: Any,
                        timeout: float | None = None) -> Any:
        timeout = timeout or self.policy.attempt_timeout
        end = time.monotonic() + timeout  # one attempt: connecting and the answer share it
        conn = await self.connection(addr, timeout)
        if self.credential is not None:
            await self._authenticate(conn, end)
        return await conn.call(opcode, partition_id, body, max(0.01, end - time.monotonic()))

    async def _authenticate(self, conn: RpcConnection, end: float) -> None:
        """Present the current capability if this connection has not yet: on
        a new connection, and after each renewal (lazily, at the next call)."""
        assert self.credential is not None
        token = self.credential.token()
        if token is None:
            raise ShoalError(Code.UNAUTHORIZED, "no capability to present")
        await conn.authenticate(token, max(0.01, end - time.monotonic()))

    async def call(self, addr: str | Callable[[], str], opcode: int, partition_id: int, body: Any,
                   deadline: float | None = None, before_retry: BeforeRetry | None = None) -> Any:
        """Call with retries of transient failures for the whole deadline (the
        last backoff is cut to what is left, then one last quick try), never
        past it. `before_retry` runs after each transient failure: it may
        refresh where to go, or raise to stop."""
        end = time.monotonic() + (deadline if deadline is not None else self.policy.deadline)
        attempt = 0
        while True:
            target = addr() if callable(addr) else addr
            remaining = end - time.monotonic()
            try:
                return await self.call_once(
                    target, opcode, partition_id, body,
                    timeout=max(0.05, min(self.policy.attempt_timeout, remaining)),
                )
            except ShoalError as exc:
                if not exc.transient or self.closed or time.monotonic() >= end:
                    raise
                if exc.code == Code.EXPIRED and self.credential is not None:
                    try:
                        await self.credential.renew()
                    except ShoalError as failed:  # the master is away too: keep trying
                        if not failed.transient:
                            raise
                if before_retry is not None:
                    await before_retry(exc)
                delay = min(self.policy.delay(attempt), max(0.0, end - time.monotonic()))
                log.debug("transient failure from %s (%s); retry in %.2fs", target, exc, delay)
                attempt += 1
                try:  # a close() ends the wait at once
                    await asyncio.wait_for(self._closed_event.wait(), delay)
                except TimeoutError:
                    pass

    async def close(self) -> None:
        self.closed = True
        self._closed_event.set()
        for conn in list(self._conns.values()):
            await conn.close()
        self._conns.clear()
