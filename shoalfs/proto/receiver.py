"""Reading frames off a socket without copying large bodies twice.

A BufferedProtocol: small frames are parsed out of one reusable 256 KiB
buffer; a frame whose body is larger gets a buffer of its own that the
socket fills directly, so a 4 MiB read answer is copied once (kernel to
buffer) instead of three times as with StreamReader.feed_data/readexactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from shoalfs.proto.wire import HEADER_SIZE, FrameError, Header, parse_header

BUFFER = 256 * 1024

FrameHandler = Callable[[Header, bytes | bytearray], None]


class FrameReceiver(asyncio.BufferedProtocol):
    def __init__(self, on_frame: FrameHandler, on_lost: Callable[[BaseException | None], None]) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(BUFFER)
        self._start = 0
        self._end = 0
        self._big: bytearray | None = None
        self._big_pos = 0
        self._big_header: Header | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.lost = asyncio.Event()

    # ----- asyncio callbacks ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()
        self.lost.set()
        self.on_lost(exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_pos:]
        if self._end == len(self._buf):  # make room: move the unparsed tail to the front
            tail = self._end - self._start
            self._buf[:tail] = self._buf[self._start:self._end]
            self._start, self._end = 0, tail
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._big is not None:
                self._big_pos += nbytes
                if self._big_pos == len(self._big):
                    header, body = self._big_header, self._big
                    self._big, self._big_header = None, None
                    assert header is not None
                    self.on_frame(header, body)
                return
            self._end += nbytes
            self._parse()
        except FrameError:
            if self.transport is not None:
                self.transport.abort()

    # ----- framing ----------------------------------------------------------------
    def _parse(self) -> None:
        buf = self._buf
        while self._end - self._start >= HEADER_SIZE:
            header = parse_header(bytes(buf[self._start:self._start + HEADER_SIZE]))
            total = HEADER_SIZE + header.body_len
            have = self._end - self._start
            if have >= total:
                body = bytes(buf[self._start + HEADER_SIZE:self._start + total])
                self._start += total
                self.on_frame(header, body)
                continue
            if total > len(buf) - self._start and header.body_len > len(buf) // 2:
                # a large body: give it its own buffer and let the socket fill it
                big = bytearray(header.body_len)
                got = have - HEADER_SIZE
                big[:got] = buf[self._start + HEADER_SIZE:self._end]
                self._start = self._end = 0
                self._big, self._big_pos, self._big_header = big, got, header
                return
            break
        if self._start == self._end:
            self._start = self._end = 0

    async def drain(self) -> None:
        await self._can_write.wait()
