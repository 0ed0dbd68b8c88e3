"""Unit tests of the shared pieces: registry, frames, journal, extents."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from typing import Any

import pytest

from shoalfs.client.readahead import DEPTH, MAX_WINDOW, ReadAhead
from shoalfs.datanode.extents import BLOCK, Extent
from shoalfs.metanode.journal import Journal
from shoalfs.proto.errors import REGISTRY, Code, ShoalError, check_registry, info
from shoalfs.proto.opcodes import Op
from shoalfs.proto.wire import HEADER_SIZE, MAX_BODY, Frame, FrameError, Packed, decode_body, parse_header


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
    # a body packed once for several frames is sent as if packed for each
    packed = Packed.of({"a": b"x" * 10})
    assert Frame(opcode=Op.PING, request_id=7, partition_id=3, body=packed).encode() == raw


def test_journal_replays_and_drops_torn_tail(tmp_path) -> None:
    async def write() -> None:
        j = Journal(str(tmp_path))
        j.load()
        await asyncio.gather(*(j.append([("I", i, {"v": i})]) for i in range(100)))
        await j.snapshot(lambda: {"upto": 50})
        await j.append([("I", 100, {"v": 100})])
        await j.close()

    asyncio.run(write())
    with open(tmp_path / "journal.log", "r+b") as f:
        data = f.read()
        end = len(data.rstrip(b"\0"))  # the file runs on in zeros past its records
        assert len(data) > end
        f.seek(end)
        f.write(b"\x00\x00\x00\x10garbage")  # a torn record
    j = Journal(str(tmp_path))
    snap, records = j.load()
    assert snap == {"upto": 50}
    assert records == [[["I", 100, {"v": 100}]]]
    assert os.path.getsize(tmp_path / "journal.log") == end  # tail truncated


def test_journal_after_a_failed_replace_appends_from_the_start(tmp_path, monkeypatch) -> None:
    """A catch-up's replace empties the log; if its sync fails, the next
    record still goes at the start of the file, not after a gap of zeros
    (replay stops at the first zero length and would lose it)."""
    import shoalfs.metanode.journal as journal

    async def run() -> None:
        j = Journal(str(tmp_path))
        j.load()
        await asyncio.gather(*(j.append([("I", i, {"v": i})]) for i in range(20)))
        real_fsync = os.fsync

        def failing_fsync(fd: int) -> None:
            monkeypatch.setattr(journal.os, "fsync", real_fsync)
            raise OSError(errno.EIO, "sync failed")
        monkeypatch.setattr(journal.os, "fsync", failing_fsync)
        with pytest.raises(ShoalError):
            await j.replace(b"\x80")
        await j.append([("I", 99, {"v": 99})])
        await j.close()

    asyncio.run(run())
    _, records = Journal(str(tmp_path)).load()
    assert records == [[["I", 99, {"v": 99}]]]


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
    with open(tmp_path / "e_1", "r+b") as f:  # block 1 was never written: it must hold zeros
        f.seek(BLOCK + 9)
        f.write(b"Y")
    with pytest.raises(ShoalError, match="should be empty") as err:
        ext.read(BLOCK, 10)
    assert err.value.code == Code.CORRUPTED


def test_extent_large_reads_and_writes_round_trip(tmp_path) -> None:
    ext = Extent(str(tmp_path / "e_2"))
    data = os.urandom(4 * 1024 * 1024 + 100)
    ext.write(7, data, sync=False)
    assert ext.read(7, len(data)) == data
    assert ext.read(0, 2 * len(data)) == bytes(7) + data  # the caller pads past the end
    assert ext.read(BLOCK * 5 + 1, 3 * BLOCK) == data[BLOCK * 5 + 1 - 7 : BLOCK * 8 + 1 - 7]
    os.truncate(tmp_path / "e_2", BLOCK * 10)  # the extent file lost its tail
    with pytest.raises(ShoalError) as err:
        ext.read(BLOCK * 9, 2 * BLOCK)
    assert err.value.code == Code.DATA_LOST


def test_extent_direct_writes_agree_with_buffered_ones(tmp_path, monkeypatch) -> None:
    """The whole blocks of a large write go around the page cache (O_DIRECT);
    its unaligned head and tail, small writes and pages cached before all
    come out as one model of the file says, checksums included, and so
    they do where direct writes are refused."""
    import fcntl

    import shoalfs.datanode.extents as extents

    real_pwrite = os.pwrite

    def pwrite_refusing_direct(fd: int, data: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "no direct writes here")
        return real_pwrite(fd, data, offset)

    for mode in ("direct", "refused at open", "refused at write"):
        monkeypatch.setattr(extents, "_no_direct", set())
        if mode == "refused at open":
            monkeypatch.setattr(extents, "_no_direct", {os.stat(tmp_path).st_dev})
        elif mode == "refused at write":
            monkeypatch.setattr(os, "pwrite", pwrite_refusing_direct)
        ext = Extent(str(tmp_path / f"e_{mode.replace(' ', '_')}"))
        model = bytearray()
        writes = [(0, 3 * BLOCK), (100, 2 * extents.DIRECT_MIN + 5), (BLOCK * 3 + 7, 10),
                  (BLOCK * 10, extents.DIRECT_MIN), (BLOCK * 10 + 1, 1), (5, 4 * extents.DIRECT_MIN)]
        for offset, length in writes:
            data = os.urandom(length)
            ext.write(offset, data, sync=False)
            model[len(model):] = bytes(max(0, offset + length - len(model)))
            model[offset : offset + length] = data
            assert ext.read(0, len(model)) == bytes(model)  # pages cached here meet the next direct write
        ext.sync()
        assert ext.read(0, len(model) + BLOCK) == bytes(model)
        assert os.path.getsize(ext.path) == len(model)
        assert bool(extents._no_direct) == (mode != "direct"), mode  # a refusal is remembered


def test_extent_locks_order_overlapping_operations_and_let_disjoint_ones_run() -> None:
    from shoalfs.datanode.extent_locks import ExtentLocks

    async def main() -> None:
        locks = ExtentLocks()
        log: list[str] = []
        release = {name: asyncio.Event() for name in "abcdef"}

        async def op(name: str, ext: int, span: tuple[int, int] | None) -> None:
            async with locks.hold(ext, span) if span else locks.hold(ext):
                log.append(f"+{name}")
                await release[name].wait()
            log.append(f"-{name}")

        tasks = [asyncio.create_task(op("a", 1, (0, BLOCK))),
                 asyncio.create_task(op("b", 1, (BLOCK, 3 * BLOCK))),  # disjoint from a: runs with it
                 asyncio.create_task(op("c", 1, (BLOCK - 1, BLOCK + 1))),  # touches both blocks: after both
                 asyncio.create_task(op("d", 2, None)),  # another extent
                 asyncio.create_task(op("e", 1, None)),  # the whole extent: after all of the above
                 asyncio.create_task(op("f", 1, (5 * BLOCK, 6 * BLOCK)))]  # after e, which came first
        async def until(entry: str) -> None:
            for _ in range(1000):  # a few loop turns are enough
                if entry in log:
                    return
                await asyncio.sleep(0)
            raise AssertionError(f"{entry} never came: {log}")

        await asyncio.sleep(0)
        assert sorted(log) == ["+a", "+b", "+d"]
        tasks[1].cancel()  # a waiter or holder that goes lets the others on
        release["a"].set()
        await until("+c")
        assert log[-1] == "+c" and "-a" in log
        for name, then in (("c", "+e"), ("d", "-d"), ("e", "+f")):
            release[name].set()
            await until(then)
        assert log.index("-c") < log.index("+e") < log.index("-e") < log.index("+f")
        release["f"].set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert len(locks) == 0  # nothing left behind

    asyncio.run(main())


def test_extent_write_many_applies_pieces_in_order(tmp_path) -> None:
    ext = Extent(str(tmp_path / "e_3"))
    pieces = [(5, b"abc"), (BLOCK * 2 - 1, b"xy"), (6, b"Z"), (BLOCK * 7, os.urandom(BLOCK))]
    assert ext.write_many(pieces, sync=True) is True  # created the extent
    model = bytearray(BLOCK * 8)
    for offset, data in pieces:
        model[offset : offset + len(data)] = data
    assert ext.read(0, len(model)) == bytes(model)
    assert ext.write_many([(0, b"q")], sync=False) is False


def test_read_ahead_pipelines_sequential_reads_and_survives_a_bad_window() -> None:
    size = 40 * 1024 * 1024
    content = os.urandom(1024) * (size // 1024)
    calls: list[tuple[int, int]] = []
    bad_from = size  # fetches that reach past here fail, as a corrupted block would

    async def fetch(offset: int, n: int, end: float | None) -> bytes:
        calls.append((offset, n))
        await asyncio.sleep(0.001)
        if offset + n > bad_from:
            raise ShoalError(Code.CORRUPTED, "bad block")
        return content[offset : offset + n]

    async def scenario() -> None:
        nonlocal bad_from
        ra = ReadAhead(fetch)
        end = time.monotonic() + 10
        piece = 128 * 1024
        for off in range(0, size, piece):
            assert bytes(await ra.read(off, off + piece, size, end)) == content[off : off + piece]
            assert sum(1 for w in ra._windows if not w.task.done()) <= DEPTH
        assert len(calls) < size // MAX_WINDOW + DEPTH + 8, "sequential reads fetch whole windows"
        assert max(n for _, n in calls) == MAX_WINDOW
        calls.clear()
        assert bytes(await ra.read(12345, 12345 + 100, size, end)) == content[12345:12445]
        assert calls == [(12345, 100)], "a random read fetches only what it asks for"
        ra.drop()
        bad_from = 3 * 1024 * 1024  # a permanent error past what is read must not fail the read
        ra = ReadAhead(fetch)
        for off in range(0, bad_from, piece):
            assert bytes(await ra.read(off, off + piece, size, end)) == content[off : off + piece]
        with pytest.raises(ShoalError):
            await ra.read(bad_from, bad_from + piece, size, end)
        ra.drop()

    asyncio.run(scenario())


def test_read_ahead_read_ends_by_its_deadline_when_a_window_hangs() -> None:
    hang = asyncio.Event()

    async def fetch(offset: int, n: int, end: float | None) -> bytes:
        if offset > 0:
            await hang.wait()  # a datanode that never answers
        return bytes(n)

    async def scenario() -> None:
        ra = ReadAhead(fetch)
        size = 64 * 1024 * 1024
        start = time.monotonic()
        assert len(await ra.read(0, 128 * 1024, size, start + 5)) == 128 * 1024
        t0 = time.monotonic()
        with pytest.raises(ShoalError) as err:  # the window ahead hangs: this read waits for it
            await ra.read(256 * 1024, 384 * 1024, size, t0 + 0.3)
        assert err.value.code == Code.TIMEOUT
        assert time.monotonic() - t0 < 1.0, "a read must end by its own deadline"
        ra.drop()

    asyncio.run(scenario())


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
