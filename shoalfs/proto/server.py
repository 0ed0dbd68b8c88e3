"""The RPC server every node runs, and what it bounds.

A peer can make a server hold only so much (DESIGN.md §7):
- frames are at most wire.MAX_BODY bytes;
- request bodies and the answers being produced (a read's size is known
  before it runs) draw on one byte budget per server; a request waits for
  budget, and a large frame is not even received until the budget has room;
- a connection is not read while it has `conn_bytes` in flight or while its
  unsent answers are above the transport's high-water mark (a peer that does
  not read its answers stops being read); answers it never reads for
  `write_timeout` seconds close it;
- a frame begun must finish arriving within `read_timeout`; a connection with
  nothing in flight closes after `idle_timeout`;
- at most `max_connections` connections (bounded by the descriptor limit):
  a new one beyond that evicts the longest-idle one, or is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shoalfs.proto.capability import Access, Capability
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.receiver import POOL, WRITE_HIGH, WRITE_LOW, FrameReceiver
from shoalfs.proto.schema import Schema, validate
from shoalfs.proto.wire import FLAG_EVENT, FLAG_RESPONSE, MAX_BODY, Frame, Header, decode_body

log = logging.getLogger(__name__)

Handler = Callable[[int, Any, "ServerConnection"], Awaitable[Any]]
Cost = Callable[[dict[str, Any]], int]  # bytes an answer will hold, from the checked body
# raises unless the connection's capability grants `access` on the partition
Authorizer = Callable[["ServerConnection", Access, int], None]

SERVER_BUFFER = 64 * 1024
# until a connection has presented a capability its frames are this small: a
# stranger can hold no budget, only a few KiB of buffer until the read timeout
ANONYMOUS_MAX_BODY = 4096
MIN_BUDGET = 2 * MAX_BODY  # the largest request plus its largest answer fits whole
DESCRIPTOR_HEADROOM = 64  # kept for files, the listener and outgoing connections


@dataclass
class ServerLimits:
    max_connections: int = 4096
    budget_bytes: int = 128 * 1024 * 1024
    conn_bytes: int = 32 * 1024 * 1024
    conn_requests: int = 128
    read_timeout: float = 30.0
    idle_timeout: float = 300.0
    write_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.budget_bytes < MIN_BUDGET:  # then a request and its answer always fit whole
            raise ValueError(f"rpc_budget_bytes must be at least {MIN_BUDGET}, got {self.budget_bytes}")


class ByteBudget:
    """Bytes a server may hold for requests in flight; waiters are served in order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, Callable[[], None]]] = deque()

    def try_take(self, n: int) -> bool:
        if self._waiters or self.used + n > self.limit:
            return False
        self.used += n
        return True

    def take_later(self, n: int, granted: Callable[[], None]) -> None:
        self._waiters.append((n, granted))

    async def take(self, n: int) -> None:
        if self.try_take(n):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def granted() -> None:
            if not fut.done():
                fut.set_result(None)
        self.take_later(n, granted)
        await fut

    def give(self, n: int) -> None:
        self.used -= n
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            n, granted = self._waiters.popleft()
            self.used += n
            granted()


class ServerConnection:
    """One accepted connection; lets handlers push events back to the peer."""

    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self.receiver = FrameReceiver(self._on_frame, self._on_lost, SERVER_BUFFER, self._reserve)
        self.receiver.on_writable = self.flow
        self.receiver.on_budget_wait = self.flow
        self.receiver.accepting = self._accepting
        self.closed = False
        self.on_close: list[Callable[[ServerConnection], None]] = []
        self.last_active = time.monotonic()
        self.requests = 0
        self.bytes = 0  # budget held by this connection's requests in flight
        self.unsent_held = 0  # budget held by answers still in the send buffer
        self.unsent_since: float | None = None  # since when answers wait on a peer that takes none
        self._unsent_last = 0
        self.keep = False  # a subscriber: never closed for being idle
        self.capability: Capability | None = None  # what the peer proved with Op.AUTH
        if server.authorize is not None:
            self.receiver.max_body = ANONYMOUS_MAX_BODY
        self._paused = False

    # ----- receiving --------------------------------------------------------
    def _reserve(self, n: int, granted: Callable[[], None]) -> bool:
        if self.server.budget.try_take(n):
            return True

        def on_grant() -> None:
            transport = self.receiver.transport
            if self.closed or transport is None or transport.is_closing():
                self.server.budget.give(n)  # nobody left to take the frame
            else:
                granted()
        self.server.budget.take_later(n, on_grant)
        return False

    def _on_frame(self, header: Header, payload: bytes | memoryview, reserved: int) -> None:
        self.last_active = time.monotonic()
        self.requests += 1
        self.bytes += reserved
        self.flow()
        task = asyncio.ensure_future(self.server.dispatch(self, header, payload, reserved))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    def request_done(self, held: int) -> None:
        """The answer is sent: its budget is given back once the peer has taken it."""
        self.requests -= 1
        self.bytes -= held
        if self.closed:  # nobody will take it: give it back now
            self.server.budget.give(held)
            return
        self.unsent_held += held
        self.last_active = time.monotonic()
        self.flow()

    def _on_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.server.forget(self)
        held, self.unsent_held = self.unsent_held + self.receiver.release_reservation(), 0
        self.server.budget.give(held)
        for cb in self.on_close:
            cb(self)

    # ----- flow control -------------------------------------------------------
    def _busy(self, unsent: int) -> bool:
        limits = self.server.limits
        return (self.requests >= limits.conn_requests or self.bytes >= limits.conn_bytes
                or unsent > WRITE_HIGH)

    def _accepting(self) -> bool:
        transport = self.receiver.transport
        return transport is not None and not self._busy(transport.get_write_buffer_size())

    def flow(self) -> None:
        """The one place that pauses and resumes reading from the peer: only
        while it has room for more in flight and no large frame waits for budget."""
        transport = self.receiver.transport
        if transport is None or self.closed:
            return
        unsent = transport.get_write_buffer_size()
        if unsent <= WRITE_LOW:
            if self.unsent_held:
                held, self.unsent_held = self.unsent_held, 0
                self.server.budget.give(held)
            self.unsent_since = None
        elif self.unsent_since is None or unsent < self._unsent_last:  # the peer is taking answers
            self.unsent_since = time.monotonic()
        self._unsent_last = unsent
        busy = self._busy(unsent)
        if (busy or self.receiver.waiting_budget) and not self._paused:
            self._paused = True
            transport.pause_reading()
        elif not busy and not self.receiver.waiting_budget and self._paused:
            self._paused = False
            self.receiver.resume_parsing()  # frames left buffered while it was busy
            if not self.closed and not self._paused:
                transport.resume_reading()

    def grant(self, cap: Capability) -> None:
        """The peer proved `cap`: it applies to every later request, and frames may be large."""
        self.capability = cap
        self.receiver.max_body = MAX_BODY

    @property
    def paused(self) -> bool:
        return self._paused

    def send(self, frame: Frame) -> None:
        transport = self.receiver.transport
        if self.closed or transport is None or transport.is_closing():
            return
        for part in frame.chunks():
            transport.write(part)

    def push_event(self, opcode: int, body: Any) -> None:
        self.send(Frame(opcode=opcode, request_id=0, flags=FLAG_EVENT, body=body))
        self.flow()  # an answer's request_done does this for requests

    @property
    def idle(self) -> bool:
        """Nothing in flight either way: the connection may be closed for room or age."""
        return (self.requests == 0 and self.receiver.frame_started is None and self.unsent_since is None
                and not self.keep)

    def close(self) -> None:
        """Reset the connection: the kernel drops whatever the peer never read
        (a plain close would keep it queued behind a FIN the peer never takes)."""
        transport = self.receiver.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


class RpcServer:
    def __init__(self, name: str, limits: ServerLimits | None = None) -> None:
        self.name = name
        self.limits = limits or ServerLimits()
        self.budget = ByteBudget(self.limits.budget_bytes)
        self.handlers: dict[int, tuple[Handler, Schema | None, Cost | None, Access]] = {}
        self.authorize: Authorizer | None = None  # None: no checks (a server of tests only)
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[ServerConnection, None] = {}  # in order of last activity, roughly
        self._sweeper: asyncio.Task[None] | None = None
        # observers of every request (common/metrics.py): started() -> token; answered(op, result, token)
        self.started: Callable[[], float] | None = None
        self.answered: Callable[[int, int, float], None] | None = None

    def route(self, opcode: int, handler: Handler, schema: Schema | None = None, cost: Cost | None = None,
              *, access: Access) -> None:
        """`access` is checked first, then `schema` checks the body before
        `handler` runs; `cost` is the size of its answer."""
        self.handlers[int(opcode)] = (handler, schema, cost, access)

    def max_connections(self) -> int:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return self.limits.max_connections
        return max(1, min(self.limits.max_connections, soft - DESCRIPTOR_HEADROOM))

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port, backlog=1024, ssl=tls,
                                                ssl_handshake_timeout=None if tls is None else self.limits.read_timeout)
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()

    # ----- connections ---------------------------------------------------------
    def _accept(self) -> FrameReceiver:
        if len(self._conns) >= self.max_connections():
            victim = next((c for c in self._conns if c.idle), None)
            if victim is not None:
                log.warning("%s: %d connections: closing the longest idle one", self.name, len(self._conns))
                self.forget(victim)
                victim.close()
        conn = ServerConnection(self)
        if len(self._conns) >= self.max_connections():
            log.warning("%s: %d connections, none idle: refusing a new one", self.name, len(self._conns))
            conn.closed = True
            conn.receiver.refused = True  # aborted as soon as the transport exists
            return conn.receiver
        self._conns[conn] = None
        return conn.receiver

    def forget(self, conn: ServerConnection) -> None:
        self._conns.pop(conn, None)

    async def _sweep(self) -> None:
        """Close connections that hold a half frame, sit idle, or never read."""
        while True:
            await asyncio.sleep(min(1.0, self.limits.read_timeout / 4))
            now = time.monotonic()
            lim = self.limits
            for conn in list(self._conns):
                r = conn.receiver
                why = None
                if (r.receiving and not conn.paused and r.frame_started is not None
                        and now - r.frame_started > lim.read_timeout):
                    why = f"a frame unfinished after {lim.read_timeout:g}s"
                elif conn.unsent_since is not None and now - conn.unsent_since > lim.write_timeout:
                    why = f"answers unread for {lim.write_timeout:g}s"
                elif conn.idle and now - conn.last_active > lim.idle_timeout:
                    why = f"idle for {lim.idle_timeout:g}s"
                else:
                    conn.flow()  # answers drained since: maybe read again
                if why is not None:
                    log.info("%s: closing a connection: %s", self.name, why)
                    self.forget(conn)
                    conn.close()

    # ----- requests ------------------------------------------------------------
    async def dispatch(self, conn: ServerConnection, header: Header, payload: bytes | memoryview,
                       reserved: int) -> None:
        held = reserved
        result = 0
        token = self.started() if self.started is not None else 0.0
        try:
            try:
                body = decode_body(header, payload)
            finally:
                POOL.give(payload)  # decoded: msgpack copied what it needs
            del payload
            route = self.handlers.get(header.opcode)
            if route is None:
                raise ShoalError(Code.BAD_REQUEST, f"unknown opcode {header.opcode}")
            handler, schema, cost, access = route
            if self.authorize is not None:
                self.authorize(conn, access, header.partition_id)
            if schema is not None:
                body = validate(schema, body)
            if cost is not None:
                need = cost(body)
                await self.budget.take(need)
                held += need
                conn.bytes += need
            if conn.closed:
                raise ShoalError(Code.UNAVAILABLE, "the connection is gone")  # answered to nobody
            # the connection is now known to be in use: most recently active last
            self._conns.pop(conn, None)
            self._conns[conn] = None
            reply = await handler(header.partition_id, body, conn)
        except ShoalError as exc:
            result = exc.code
            reply = {"msg": exc.msg, "data": exc.data}
        except Exception as exc:
            log.exception("%s: handler for opcode %s failed", self.name, header.opcode)
            result = Code.INTERNAL
            reply = {"msg": f"internal error: {exc!r}", "data": None}
        try:
            conn.send(Frame(opcode=header.opcode, request_id=header.request_id,
                            partition_id=header.partition_id, result=result, flags=FLAG_RESPONSE, body=reply))
        finally:
            conn.request_done(held)
            if self.answered is not None:
                self.answered(header.opcode, int(result), token)
