"""Unit tests of the shared pieces: registry, frames, journal, extents."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os

import pytest

from shoalfs.datanode.extents import BLOCK, Extent
from shoalfs.metanode.journal import Journal
from shoalfs.proto.errors import REGISTRY, Code, ShoalError, check_registry, info
from shoalfs.proto.opcodes import Op
from shoalfs.proto.wire import HEADER_SIZE, MAX_BODY, Frame, FrameError, decode_body, parse_header


def test_registry_is_complete_and_disjoint_from_opcodes() -> None:
    check_registry()
    assert Code.VOLUME_NOT_EXIST == 100404
    assert info(Code.VOLUME_NOT_EXIST).errno == errno.ESTALE
    assert not info(Code.VOLUME_NOT_EXIST).transient
    assert {int(c) for c in Code}.isdisjoint({int(o) for o in Op})
    for code in (Code.TIMEOUT, Code.NO_LEADER, Code.TRY_AGAIN, Code.NODE_UNREACHABLE):
        assert REGISTRY[code].transient
    for code, entry in REGISTRY.items():  # given up on at the deadline: EIO (DESIGN.md §2)
        assert not entry.transient or entry.errno == errno.EIO, code
    assert ShoalError(Code.NOT_FOUND).to_oserror("/x").errno == errno.ENOENT
    assert info(999999).errno == errno.EIO  # unknown codes are errors, never success


def test_frame_roundtrip_and_rejections() -> None:
    raw = Frame(opcode=Op.PING, request_id=7, partition_id=3, body={"a": b"x" * 10}).encode()
    header = parse_header(raw[:HEADER_SIZE])
    assert (header.opcode, header.request_id, header.partition_id) == (Op.PING, 7, 3)
    assert decode_body(header, raw[HEADER_SIZE:]) == {"a": b"x" * 10}
    flipped = bytearray(raw)
    flipped[-1] ^= 0xFF
    with pytest.raises(ShoalError) as err:
        decode_body(header, bytes(flipped[HEADER_SIZE:]))
    assert err.value.code == Code.BAD_REQUEST
    with pytest.raises(FrameError):
        parse_header(b"\x00" * HEADER_SIZE)
    big = bytearray(raw[:HEADER_SIZE])
    big[0:4] = (MAX_BODY + 1).to_bytes(4, "big")
    with pytest.raises(FrameError):
        parse_header(bytes(big))


def test_journal_replays_and_drops_torn_tail(tmp_path) -> None:
    async def write() -> None:
        j = Journal(str(tmp_path))
        j.load()
        await asyncio.gather(*(j.append([("I", i, {"v": i})]) for i in range(100)))
        await j.snapshot(lambda: {"upto": 50})
        await j.append([("I", 100, {"v": 100})])
        await j.close()

    asyncio.run(write())
    with open(tmp_path / "journal.log", "ab") as f:
        f.write(b"\x00\x00\x00\x10garbage")  # a torn record
    j = Journal(str(tmp_path))
    snap, records = j.load()
    assert snap == {"upto": 50}
    assert records == [[["I", 100, {"v": 100}]]]
    assert os.path.getsize(tmp_path / "journal.log") < 40  # tail truncated


def test_extent_checksums_sparse_and_truncate(tmp_path) -> None:
    ext = Extent(str(tmp_path / "e_1"))
    ext.write(BLOCK * 3 + 5, b"hello", sync=True)
    assert ext.read(0, BLOCK) == bytes(BLOCK)  # hole reads zeros
    assert ext.read(BLOCK * 3, 10) == bytes(5) + b"hello"
    ext.write(2, b"ab", sync=False)
    assert ext.read(0, 4) == b"\0\0ab"
    ext.truncate(BLOCK * 3 + 7)
    assert ext.read(BLOCK * 3, 100) == bytes(5) + b"he"
    ext.write(BLOCK * 3 + 20, b"z", sync=False)
    assert ext.read(BLOCK * 3, 21) == bytes(5) + b"he" + bytes(13) + b"z"
    with open(tmp_path / "e_1", "r+b") as f:  # corrupt one byte on disk
        f.seek(3)
        f.write(b"X")
    with pytest.raises(ShoalError) as err:
        ext.read(0, 10)
    assert err.value.code == Code.CORRUPTED
    with pytest.raises(ShoalError):
        ext.write(1, b"q", sync=False)  # never merges into a corrupted block
    assert ext.read(BLOCK * 3, 7) == bytes(5) + b"he"  # other blocks unaffected


def test_frame_receiver_reassembles_any_split() -> None:
    import random

    from shoalfs.proto.receiver import BUFFER, FrameReceiver

    frames = [Frame(opcode=Op.PING, request_id=i, body={"i": i, "d": os.urandom(n)})
              for i, n in enumerate([0, 10, 5000, BUFFER * 3 + 17, 3, BUFFER // 2 + 1, 64 * 1024])]
    stream = b"".join(f.encode() for f in frames)
    for seed in range(5):
        rng = random.Random(seed)
        got: list = []
        recv = FrameReceiver(lambda h, p, r, into=got: into.append(decode_body(h, p)), lambda exc: None)
        pos = 0
        while pos < len(stream):
            buf = recv.get_buffer(-1)
            n = min(len(buf), rng.choice([1, 7, 34, 1000, 70000, 1 << 20]), len(stream) - pos)
            buf[:n] = stream[pos:pos + n]
            recv.buffer_updated(n)
            pos += n
        assert [g["i"] for g in got] == list(range(len(frames)))
        assert [g["d"] for g in got] == [f.body["d"] for f in frames]


def test_rpc_limits_from_config_refuse_what_would_break_them() -> None:
    import math

    import pytest

    from shoalfs.common.limits import server_limits
    from shoalfs.proto.server import MIN_BUDGET

    assert server_limits({}).budget_bytes == 128 * 1024 * 1024
    assert server_limits({"rpc_read_timeout": 2}).read_timeout == 2.0
    for bad in ({"rpc_read_timeout": math.nan}, {"rpc_idle_timeout": 0}, {"rpc_conn_requests": 1.5},
                {"rpc_max_connections": True}, {"rpc_budget_bytes": MIN_BUDGET - 1}):
        with pytest.raises(ValueError):
            server_limits(bad)


def test_gate_counts_changes_and_a_shut_gate_refuses_at_once() -> None:
    """Gate (replication/replica.py): a change enters without a pause or not at
    all; closing waits for changes in flight; a cancelled close opens it again."""
    from shoalfs.replication.replica import Gate

    async def go() -> None:
        gate = Gate()
        assert gate.enter()  # a change in flight
        shut = gate.closed()
        closing = asyncio.create_task(shut.__aenter__())
        await asyncio.sleep(0.01)
        assert not closing.done()  # waits for the change in flight
        assert not gate.enter()  # shut: refused at once, nothing counted
        gate.leave()
        await asyncio.wait_for(closing, 1)
        opened = asyncio.create_task(gate.wait_open())
        await asyncio.sleep(0.01)
        assert not opened.done()
        await shut.__aexit__(None, None, None)  # the catch-up's last round ends: open again
        await asyncio.wait_for(opened, 1)
        assert gate.enter()
        gate.leave()
        # a close cancelled while changes drain leaves the gate open
        assert gate.enter()
        task = asyncio.create_task(gate.closed().__aenter__())
        await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gate.leave()
        assert gate.enter()
        gate.leave()

    asyncio.run(go())
