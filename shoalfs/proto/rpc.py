"""The one binary RPC layer: a server for nodes, a multiplexing client for
everyone. Many requests may be in flight per connection; responses carry the
request id they answer."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.receiver import FrameReceiver
from shoalfs.proto.wire import (
    FLAG_EVENT,
    FLAG_RESPONSE,
    HEADER_SIZE,
    Frame,
    FrameError,
    Header,
    decode_body,
    parse_header,
)

log = logging.getLogger(__name__)

Handler = Callable[[int, Any, "ServerConnection"], Awaitable[Any]]


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


class ServerConnection:
    """One accepted connection; lets handlers push events back to the peer."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.closed = False
        self.on_close: list[Callable[[ServerConnection], None]] = []

    def send(self, frame: Frame) -> None:
        if not self.closed and not self.writer.is_closing():
            for part in frame.encode_parts():
                self.writer.write(part)

    def push_event(self, opcode: int, body: Any) -> None:
        self.send(Frame(opcode=opcode, request_id=0, flags=FLAG_EVENT, body=body))


class RpcServer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.handlers: dict[int, Handler] = {}
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[ServerConnection] = set()

    def route(self, opcode: int, handler: Handler) -> None:
        self.handlers[int(opcode)] = handler

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=1 << 20)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConnection(writer)
        self._conns.add(conn)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                raw = await reader.readexactly(HEADER_SIZE)
                header = parse_header(raw)
                payload = await reader.readexactly(header.body_len)
                task = asyncio.create_task(self._dispatch(conn, header, payload))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if writer.transport.get_write_buffer_size() > 8 << 20:
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except FrameError as exc:
            log.warning("%s: dropping connection: %s", self.name, exc)
        finally:
            conn.closed = True
            self._conns.discard(conn)
            for cb in conn.on_close:
                cb(conn)
            writer.close()

    async def _dispatch(self, conn: ServerConnection, header: Any, payload: bytes) -> None:
        result = 0
        try:
            body = decode_body(header, payload)
            handler = self.handlers.get(header.opcode)
            if handler is None:
                raise ShoalError(Code.BAD_REQUEST, f"unknown opcode {header.opcode}")
            reply = await handler(header.partition_id, body, conn)
        except ShoalError as exc:
            result = exc.code
            reply = {"msg": exc.msg, "data": exc.data}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # malformed arguments inside a well-formed frame
            result = Code.BAD_REQUEST
            reply = {"msg": f"bad arguments: {exc!r}", "data": None}
        except Exception as exc:
            log.exception("%s: handler for opcode %s failed", self.name, header.opcode)
            result = Code.INTERNAL
            reply = {"msg": f"internal error: {exc!r}", "data": None}
        conn.send(
            Frame(
                opcode=header.opcode,
                request_id=header.request_id,
                partition_id=header.partition_id,
                result=result,
                flags=FLAG_RESPONSE,
                body=reply,
            )
        )


EventCallback = Callable[[int, Any], None]


class RpcConnection:
    """A client connection with many requests in flight."""

    def __init__(self, addr: str, on_event: EventCallback | None = None) -> None:
        self.addr = addr
        self.on_event = on_event
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[int, Any]]] = {}
        self._proto: FrameReceiver | None = None
        self.closed = False

    async def connect(self, timeout: float) -> None:
        host, port = split_addr(self.addr)
        loop = asyncio.get_running_loop()
        try:
            _, self._proto = await asyncio.wait_for(
                loop.create_connection(lambda: FrameReceiver(self._on_frame, self._on_lost), host, port),
                timeout)
        except (TimeoutError, OSError) as exc:
            self.closed = True
            raise ShoalError(Code.NODE_UNREACHABLE, f"{self.addr}: {exc!r}") from None

    def _on_frame(self, header: Header, payload: bytes | bytearray) -> None:
        try:
            body = decode_body(header, payload)
        except ShoalError as exc:
            body, header.result = {"msg": exc.msg}, Code.TRY_AGAIN
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
        for part in frame.encode_parts():
            proto.transport.write(part)
        try:
            await proto.drain()
            result, reply = await asyncio.wait_for(fut, timeout)
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

    def __init__(self, policy: RetryPolicy | None = None, on_event: EventCallback | None = None) -> None:
        self.policy = policy or RetryPolicy()
        self.on_event = on_event
        self._conns: dict[str, RpcConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.closed = False
        self._closed_event = asyncio.Event()

    async def connection(self, addr: str) -> RpcConnection:
        conn = self._conns.get(addr)
        if conn is not None and not conn.closed:
            return conn
        lock = self._locks.setdefault(addr, asyncio.Lock())
        async with lock:
            conn = self._conns.get(addr)
            if conn is None or conn.closed:
                if self.closed:
                    raise ShoalError(Code.UNAVAILABLE, "client is closed")
                conn = RpcConnection(addr, self.on_event)
                await conn.connect(min(3.0, self.policy.attempt_timeout))
                self._conns[addr] = conn
            return conn

    async def call_once(self, addr: str, opcode: int, partition_id: int, body: Any,
                        timeout: float | None = None) -> Any:
        conn = await self.connection(addr)
        return await conn.call(opcode, partition_id, body, timeout or self.policy.attempt_timeout)

    async def call(self, addr: str | Callable[[], str], opcode: int, partition_id: int, body: Any,
                   deadline: float | None = None) -> Any:
        """Call with retries of transient failures until the op's deadline."""
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
                if not exc.transient or self.closed:
                    raise
                delay = self.policy.delay(attempt)
                if time.monotonic() + delay >= end:
                    raise
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
