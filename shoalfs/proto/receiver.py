"""Reading frames off a socket without copying large bodies twice.

A BufferedProtocol: small frames are parsed out of one reusable buffer; a
frame whose body is larger than half of it gets a buffer of its own that the
socket fills directly, so a 4 MiB read answer is copied once (kernel to
buffer) instead of three times as with StreamReader.feed_data/readexactly.

A server passes `reserve`: a large body is allocated only once the server's
memory budget has room for it (until then the connection is not read), so
peers announcing large frames cannot make a server hold more than its budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

from shoalfs.proto.wire import HEADER_SIZE, MAX_BODY, FrameError, Header, parse_header

BUFFER = 256 * 1024
# Send-buffer marks of a server connection (flow control). Above the high
# mark the peer's requests are not read: it is two of the largest answers, so
# a client that reads keeps a request in flight behind the answer being sent.
WRITE_HIGH = 2 * MAX_BODY
WRITE_LOW = 1024 * 1024

FrameHandler = Callable[[Header, bytes | memoryview, int], None]  # header, body, bytes reserved for it


class BufferPool:
    """Large frame buffers, kept for the next frame: a fresh 4 MiB bytearray
    costs a page fault per page and a memset (measured: +10 % datanode CPU
    per MiB written). A few buffers of each size are kept."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._free: dict[int, list[bytearray]] = {}

    @staticmethod
    def _capacity(n: int) -> int:
        """Powers of two up to 1 MiB, then whole MiB: never much more than asked."""
        if n <= 1 << 20:
            return max(1 << 16, 1 << (n - 1).bit_length())
        return -(-n >> 20) << 20

    def take(self, n: int) -> bytearray:
        free = self._free.get(self._capacity(n))
        return free.pop() if free else bytearray(self._capacity(n))

    def give(self, body: bytes | memoryview) -> None:
        """Return a body that on_frame handed out, once it has been decoded."""
        if isinstance(body, memoryview) and isinstance(body.obj, bytearray):
            buf = body.obj
            body.release()
            free = self._free.setdefault(len(buf), [])
            if len(free) < self.keep:
                free.append(buf)


POOL = BufferPool()  # used only from event-loop threads
Reserve = Callable[[int, Callable[[], None]], bool]  # take n bytes now, or call back once taken


class FrameReceiver(asyncio.BufferedProtocol):
    def __init__(self, on_frame: FrameHandler, on_lost: Callable[[BaseException | None], None],
                 buffer_size: int = BUFFER, reserve: Reserve | None = None) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.reserve = reserve
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(buffer_size)
        self._start = 0
        self._end = 0
        self._big: bytearray | None = None
        self._big_pos = 0
        self._big_len = 0
        self._big_header: Header | None = None
        self._granted = 0  # budget held for the large body being received
        self._waiting_budget = False
        self.frame_started: float | None = None  # monotonic time the unfinished frame began
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.lost = asyncio.Event()
        # server hooks: the send buffer fell below its low mark / the budget wait began or ended
        self.on_writable: Callable[[], None] | None = None
        self.on_budget_wait: Callable[[], None] | None = None
        self.accepting: Callable[[], bool] | None = None  # False: leave further frames buffered
        self.refused = False  # over the connection cap: closed as soon as it is made
        self.max_body = MAX_BODY  # a larger announced frame cuts the connection

    # ----- asyncio callbacks ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.refused:
            self.transport.abort()
            return
        if self.on_writable is not None:
            self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()
        self.lost.set()
        self._big = None
        self.on_lost(exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()
        if self.on_writable is not None:
            self.on_writable()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_pos:self._big_len]
        if self._end == len(self._buf):  # make room: move the unparsed tail to the front
            tail = self._end - self._start
            self._buf[:tail] = self._buf[self._start:self._end]
            self._start, self._end = 0, tail
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is None:
            self._end += nbytes
            self.resume_parsing()
            return
        self._big_pos += nbytes
        if self._big_pos == self._big_len:
            header, body, granted = self._big_header, memoryview(self._big)[:self._big_len], self._granted
            self._big, self._big_header, self._granted = None, None, 0
            self.frame_started = None
            assert header is not None
            self.on_frame(header, body, granted)

    @property
    def receiving(self) -> bool:
        """True while a frame has begun but not finished arriving (and we are reading)."""
        return self.frame_started is not None and not self._waiting_budget

    @property
    def waiting_budget(self) -> bool:
        return self._waiting_budget

    def release_reservation(self) -> int:
        """The budget held for a large body still arriving (the connection is gone)."""
        granted, self._granted = self._granted, 0
        return granted

    def resume_parsing(self) -> None:
        """Take the complete frames in the buffer (also those left there while
        the server was not accepting); a stream not speaking our protocol is cut."""
        try:
            self._parse()
        except FrameError:
            if self.transport is not None:
                self.transport.abort()

    # ----- framing ----------------------------------------------------------------
    def _parse(self) -> None:
        if self._big is not None:  # a large body is arriving into its own buffer
            return
        buf = self._buf
        consumed = False
        while self._end - self._start >= HEADER_SIZE:
            if self.accepting is not None and not self.accepting():
                break  # the server has enough in flight from this peer: the rest waits here
            header = parse_header(bytes(buf[self._start:self._start + HEADER_SIZE]))
            if header.body_len > self.max_body:
                raise FrameError(f"frame body of {header.body_len} bytes exceeds {self.max_body} on this connection")
            total = HEADER_SIZE + header.body_len
            have = self._end - self._start
            if have >= total:
                body = bytes(buf[self._start + HEADER_SIZE:self._start + total])
                self._start += total
                consumed = True
                self.on_frame(header, body, 0)
                continue
            if total > len(buf) - self._start and header.body_len > len(buf) // 2:
                if not self._granted and self.reserve is not None:
                    if not self.reserve(header.body_len, self._budget_granted):
                        self._waiting_budget = True
                        self.frame_started = time.monotonic()
                        if self.on_budget_wait is not None:
                            self.on_budget_wait()
                        return
                    self._granted = header.body_len
                # a large body: give it its own buffer and let the socket fill it
                big = POOL.take(header.body_len)
                got = have - HEADER_SIZE
                big[:got] = buf[self._start + HEADER_SIZE:self._end]
                self._start = self._end = 0
                self._big, self._big_pos, self._big_len, self._big_header = big, got, header.body_len, header
                self.frame_started = time.monotonic()
                return
            break
        if self._start == self._end:
            self._start = self._end = 0
            self.frame_started = None
        elif consumed or self.frame_started is None:  # the unfinished frame began now
            self.frame_started = time.monotonic()

    def _budget_granted(self) -> None:
        """The server's budget took the large body's bytes for us: take the frame."""
        self._waiting_budget = False
        assert self._big_header is None
        header = parse_header(bytes(self._buf[self._start:self._start + HEADER_SIZE]))
        self._granted = header.body_len
        self.resume_parsing()
        if self.on_budget_wait is not None:
            self.on_budget_wait()

    @property
    def writable(self) -> bool:
        return self._can_write.is_set()

    async def drain(self) -> None:
        await self._can_write.wait()
