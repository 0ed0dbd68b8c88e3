"""Frame format shared by every role.

A frame is a fixed 34-byte header followed by a msgpack body:

    body_len u32 | magic u16 | version u8 | flags u8 | opcode u16 |
    result u32 | request_id u64 | partition_id u64 | body_crc32 u32

The length comes first so a reader always knows how much to take; the CRC
covers the body so a flipped bit is an error, not a wrong answer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shoalfs.proto.checksum import crc32
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import MAX_IO

HEADER = struct.Struct("!IHBBHIQQI")
HEADER_SIZE = HEADER.size
MAGIC = 0x5348  # "SH"
VERSION = 1
MAX_BODY = MAX_IO + 64 * 1024  # the largest body the protocol needs: one I/O piece and its fields

JOIN_BELOW = 64 * 1024  # bodies up to this are sent in one write with their header

FLAG_RESPONSE = 0x01
FLAG_EVENT = 0x02  # server-initiated push (lifecycle events)


@dataclass(frozen=True)
class Packed:
    """A body packed (and checksummed) once for several frames: a leader's
    forward of a 4 MiB write to each of its followers."""

    payload: bytes
    crc: int

    @classmethod
    def of(cls, body: Any) -> Packed:
        try:
            payload = msgpack.packb(body, use_bin_type=True)
        except (OverflowError, TypeError, ValueError) as exc:
            raise ShoalError(Code.INVALID, f"cannot be sent: {exc}") from None
        return cls(payload, crc32(payload))


@dataclass
class Frame:
    opcode: int
    request_id: int
    partition_id: int = 0
    result: int = 0
    flags: int = 0
    body: Any = field(default_factory=dict)

    def encode(self) -> bytes:
        header, payload = self.encode_parts()
        return header + payload

    def chunks(self) -> tuple[bytes, ...]:
        """What to hand the transport: one write for a small frame (a syscall
        saved per message), header and body apart for a large one (never
        copied to join them)."""
        header, payload = self.encode_parts()
        return (header + payload,) if len(payload) <= JOIN_BELOW else (header, payload)

    def encode_parts(self) -> tuple[bytes, bytes]:
        """Header and body apart, so a large body is never copied to join them."""
        if isinstance(self.body, Packed):
            payload, crc = self.body.payload, self.body.crc
        else:
            payload = msgpack.packb(self.body, use_bin_type=True)
            crc = crc32(payload)
        return (
            HEADER.pack(
                len(payload),
                MAGIC,
                VERSION,
                self.flags,
                self.opcode,
                self.result,
                self.request_id,
                self.partition_id,
                crc,
            ),
            payload,
        )


class FrameError(Exception):
    """The stream is not speaking our protocol; the connection must close."""


@dataclass
class Header:
    body_len: int
    flags: int
    opcode: int
    result: int
    request_id: int
    partition_id: int
    crc: int


def parse_header(raw: bytes) -> Header:
    body_len, magic, version, flags, opcode, result, rid, pid, crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic:#x}")
    if version != VERSION:
        raise FrameError(f"unsupported version {version}")
    if body_len > MAX_BODY:
        raise FrameError(f"frame body of {body_len} bytes exceeds {MAX_BODY}")
    return Header(body_len, flags, opcode, result, rid, pid, crc)


def decode_body(header: Header, payload: bytes | bytearray | memoryview) -> Any:
    """Decode a body; a checksum or msgpack failure is a per-request error."""
    if crc32(payload) != header.crc:
        raise ShoalError(Code.BAD_REQUEST, "frame checksum mismatch")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ShoalError(Code.BAD_REQUEST, f"undecodable body: {exc}") from None
