"""Extents as plain files with a CRC per 4 KiB block.

Each extent `e_<id>` has a sidecar `e_<id>.crc` holding one u64 per block:
0 means "never written, must read as zeros", otherwise (1 << 32) | crc32 of
the block with bytes past the end of the extent taken as zeros. Every read
verifies every block it touches; a mismatch is CORRUPTED, never wrong bytes,
and a block the sidecar says was written but the extent file lacks (a lost
or truncated file) is DATA_LOST, never zeros. Space is reserved with
fallocate before any byte is written, so a full disk fails a write whole.
These functions block; the datanode calls them from worker threads.

The whole blocks of a large write go around the page cache (O_DIRECT, from
a buffer each worker thread keeps): filling fresh page cache pages was half
the CPU of a sequential write on a VM whose free memory the host has taken
back, and the data is on its way to the disk anyway. Where the file system
cannot (tmpfs), every write is buffered.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import struct
import threading
from collections.abc import Callable

from shoalfs.common.files import fsync_dir, pwrite_all
from shoalfs.proto.checksum import crc32
from shoalfs.proto.errors import Code, ShoalError, disk_error

BLOCK = 4096
ENTRY = struct.Struct("!Q")
DIRECT_MIN = 256 * 1024  # whole blocks of a write spanning this much go around the page cache
_direct = threading.local()  # each worker thread's aligned buffer for them
_no_direct: set[int] = set()  # devices that refused O_DIRECT: buffered there from now on


def _aligned(view: memoryview) -> memoryview:
    """`view` copied into this thread's page-aligned buffer (kept for the next write)."""
    buf: mmap.mmap | None = getattr(_direct, "buf", None)
    if buf is None or len(buf) < len(view):
        buf = _direct.buf = mmap.mmap(-1, max(len(view), 4 << 20))
    out = memoryview(buf)[: len(view)]
    out[:] = view
    return out


def _write_direct(path: str, dfd: int, data: memoryview, offset: int) -> bool:
    """Write whole blocks (`offset` and `len(data)` multiples of BLOCK) with
    O_DIRECT; False where the file system cannot (whatever it took is
    written again by the caller). Not where a page holds several blocks: a
    buffered neighbour's page would cover direct bytes."""
    dev = os.fstat(dfd).st_dev
    if mmap.PAGESIZE != BLOCK or dev in _no_direct:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _no_direct.add(dev)
        return False
    try:
        aligned = _aligned(data)
        while aligned:
            try:
                n = os.pwrite(fd, aligned, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _no_direct.add(dev)  # opened, but refused to write so
                return False
            if n <= 0 or n % BLOCK:
                raise OSError(errno.EIO, "direct write made no progress")
            aligned, offset = aligned[n:], offset + n
    finally:
        os.close(fd)
    return True


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn  # type: ignore[no-any-return]


_sync_file_range = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing the range's dirty pages to disk, without waiting (or
    flushing the disk's cache): a hint, so a failure is ignored."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def write_span(pieces: list[tuple[int, bytes]]) -> tuple[int, int]:
    """The bytes [lo, hi) a write's (offset, data) pieces cover; one that
    carries nothing covers none, at its first offset."""
    written = [(offset, len(data)) for offset, data in pieces if data] or [(pieces[0][0], 0)]
    return min(offset for offset, _ in written), max(offset + size for offset, size in written)


def _reserve(fd: int, offset: int, length: int) -> None:
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def _block_entries(buf: bytes | bytearray | memoryview, count: int) -> list[int]:
    """The entries of `count` whole blocks of buf (padded with zeros to
    count * BLOCK), without copying a block: one crc32 per block is the
    whole cost of verifying 4 MiB (measured: 4x faster than per-block bytes)."""
    view = memoryview(buf)
    crc = crc32
    whole = min(count, len(view) // BLOCK)
    entries = [(1 << 32) | crc(view[i * BLOCK : (i + 1) * BLOCK]) for i in range(whole)]
    for i in range(whole, count):  # a short last block: its tail counts as zeros
        part = view[i * BLOCK : (i + 1) * BLOCK]
        entries.append((1 << 32) | crc(bytes(BLOCK - len(part)), crc(part)))
    return entries


def _crc_entry(block: bytes | bytearray) -> int:
    """The entry of one block (up to BLOCK bytes; the rest counts as zeros)."""
    return _block_entries(block, 1)[0]


ZERO_ENTRY = _crc_entry(b"")  # what a never-written block's bytes (zeros) checksum to


class Extent:
    def __init__(self, path: str) -> None:
        self.path = path
        self.crc_path = path + ".crc"

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def _entries(self, fd: int, first: int, count: int) -> list[int]:
        raw = os.pread(fd, count * ENTRY.size, first * ENTRY.size)
        return list(struct.unpack(f"!{count}Q", raw.ljust(count * ENTRY.size, b"\0")))

    @staticmethod
    def _verify(block: bytes, entry: int, index: int) -> None:
        if entry == 0:
            if block.strip(b"\0"):
                raise ShoalError(Code.CORRUPTED, f"block {index} should be empty but holds data")
        elif _crc_entry(block) != entry:
            raise ShoalError(Code.CORRUPTED, f"checksum mismatch in block {index}")

    def read(self, offset: int, size: int) -> bytes:
        """Bytes of [offset, offset + size) that the extent holds; the caller
        pads past its end with zeros (a sparse tail). A block the checksums
        say was written but the file no longer holds is DATA_LOST, a block
        whose bytes do not match is CORRUPTED — never zeros in their place."""
        try:
            df = open(self.path, "rb")
        except FileNotFoundError:
            raise ShoalError(Code.DATA_LOST, f"extent {self.path} is missing") from None
        with df:
            try:
                cf = open(self.crc_path, "rb")
            except FileNotFoundError:
                raise ShoalError(Code.DATA_LOST, f"checksums of extent {self.path} are missing") from None
            with cf:
                data_size = os.fstat(df.fileno()).st_size
                crc_blocks = os.fstat(cf.fileno()).st_size // ENTRY.size
                end = min(offset + size, max(data_size, crc_blocks * BLOCK))
                if end <= offset:
                    return b""
                first, last = offset // BLOCK, (end - 1) // BLOCK
                count = last - first + 1
                data = os.pread(df.fileno(), count * BLOCK, first * BLOCK)
                entries = self._entries(cf.fileno(), first, count)
                held = max(0, -(-data_size // BLOCK) - first)  # blocks the file holds a byte of
                lost = next((i for i in range(held, count) if entries[i]), None)
                if lost is not None:
                    raise ShoalError(Code.DATA_LOST, f"extent {self.path} ends at {data_size} bytes but "
                                                     f"block {first + lost} was written")
                padded = data.ljust(count * BLOCK, b"\0")
                if _block_entries(padded, count) != [e or ZERO_ENTRY for e in entries]:
                    for i, entry in enumerate(entries):  # name the first bad block
                        self._verify(padded[i * BLOCK : (i + 1) * BLOCK], entry, first + i)
                start, length = offset - first * BLOCK, min(end, data_size) - offset
                return data if start == 0 and length == len(data) else data[start : start + length]

    def write(self, offset: int, payload: bytes, sync: bool) -> bool:
        """Returns True if this write created the extent: its name is durable
        only once the directory is fsync'ed (at once if `sync`, else by the
        caller before it answers a sync)."""
        return self.write_many([(offset, payload)], sync)

    def write_many(self, pieces: list[tuple[int, bytes]], sync: bool) -> bool:
        """Several writes in order, with the files opened once and made durable
        together (one sync) if `sync`; True if they created the extent (see write)."""
        if not any(payload for _, payload in pieces):
            return False
        try:
            return self._write_many(pieces, sync)
        except OSError as exc:
            raise disk_error(exc, f"write to extent {self.path}") from None

    def _write_many(self, pieces: list[tuple[int, bytes]], sync: bool) -> bool:
        created = not os.path.exists(self.path)
        dfd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            cfd = os.open(self.crc_path, os.O_RDWR | os.O_CREAT, 0o600)
        except BaseException:
            os.close(dfd)
            raise
        try:
            direct = False
            for offset, payload in pieces:
                if payload:
                    direct |= self._write_at(dfd, cfd, offset, payload)
            if sync:
                os.fdatasync(dfd)
                os.fdatasync(cfd)
            elif direct:
                # direct bytes go to the disk at once: the rest of the data, then the
                # checksums, are sent after them now, not after the page cache's
                # writeback delay (a crash between leaves blocks that read as EIO)
                lo, hi = write_span(pieces)
                start_writeback(dfd, lo, hi - lo)
                first, end = lo // BLOCK, -(-hi // BLOCK)
                start_writeback(cfd, first * ENTRY.size, (end - first) * ENTRY.size)
        finally:
            os.close(dfd)
            os.close(cfd)
        if created and sync:  # the new names must survive a crash too
            fsync_dir(os.path.dirname(self.path))
        return created

    def _write_at(self, dfd: int, cfd: int, offset: int, payload: bytes) -> bool:
        """True if part of it went around the page cache."""
        old_size = os.fstat(dfd).st_size
        end = offset + len(payload)
        first, last = offset // BLOCK, (end - 1) // BLOCK
        count = last - first + 1
        view = memoryview(payload)
        crcs: list[int] = []
        # blocks the payload covers whole are checksummed straight from it
        # (no copy of the payload); only a partly covered first or last
        # block is merged with what the extent holds there
        head = offset % BLOCK != 0 or (count == 1 and end % BLOCK != 0 and end < old_size)
        tail = count > 1 and end % BLOCK != 0 and end < old_size
        if head:
            crcs.append(self._merged_entry(cfd, dfd, first, offset, view, old_size))
        whole_from, whole_to = first + head, last + 1 - tail
        if whole_to > whole_from:
            # the last block may end past the payload: past the extent's end, so zeros
            whole = view[whole_from * BLOCK - offset : whole_to * BLOCK - offset]
            crcs += _block_entries(whole, whole_to - whole_from)
        if tail:
            crcs.append(self._merged_entry(cfd, dfd, last, offset, view, old_size))
        new_entries = struct.pack(f"!{count}Q", *crcs)
        # take the space first: a disk that is full fails here, before any byte changes
        _reserve(dfd, offset, len(payload))
        _reserve(cfd, first * ENTRY.size, len(new_entries))
        lo, hi = -(-offset // BLOCK) * BLOCK, end // BLOCK * BLOCK  # the whole blocks
        direct = hi - lo >= DIRECT_MIN and _write_direct(self.path, dfd, view[lo - offset : hi - offset], lo)
        if direct:
            pwrite_all(dfd, view[: lo - offset], offset)
            pwrite_all(dfd, view[hi - offset :], hi)
        else:
            pwrite_all(dfd, payload, offset)
        pwrite_all(cfd, new_entries, first * ENTRY.size)
        return direct

    def _merged_entry(self, cfd: int, dfd: int, index: int, offset: int, payload: memoryview,
                      old_size: int) -> int:
        """The entry of block `index` once the payload (written at offset) is
        merged into it; what it held must be sound before anything merges into it."""
        b_start = index * BLOCK
        old = os.pread(dfd, BLOCK, b_start)
        if b_start < old_size:
            self._verify(old, self._entries(cfd, index, 1)[0], index)
        block = bytearray(old.ljust(BLOCK, b"\0"))
        lo, hi = max(offset, b_start), min(offset + len(payload), b_start + BLOCK)
        block[lo - b_start : hi - b_start] = payload[lo - offset : hi - offset]
        return _crc_entry(block)

    def truncate(self, size: int) -> None:
        try:
            self._truncate(size)
        except OSError as exc:
            raise disk_error(exc, f"truncate of extent {self.path}") from None

    def _truncate(self, size: int) -> None:
        if not self.exists():
            return
        with open(self.path, "r+b") as df, open(self.crc_path, "r+b") as cf:
            old = os.fstat(df.fileno()).st_size
            if size >= old:
                os.ftruncate(df.fileno(), size)
                return
            blocks = (size + BLOCK - 1) // BLOCK
            if size % BLOCK:
                last = blocks - 1
                block = os.pread(df.fileno(), BLOCK, last * BLOCK)
                self._verify(block, self._entries(cf.fileno(), last, 1)[0], last)
                tail = block[: size % BLOCK]
                os.pwrite(cf.fileno(), ENTRY.pack(_crc_entry(tail)), last * ENTRY.size)
            os.ftruncate(df.fileno(), size)
            os.ftruncate(cf.fileno(), blocks * ENTRY.size)

    def sync(self) -> None:
        for path in (self.path, self.crc_path):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def delete(self) -> None:
        for path in (self.path, self.crc_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


# ----- whole-extent copies between replicas (datanode/resync.py) ---------------
def digest(extent: Extent) -> tuple[int, int] | None:
    """(size, crc32 of the checksum sidecar) — equal digests mean equal
    extents, since the sidecar holds a CRC of every block; None if absent."""
    try:
        with open(extent.crc_path, "rb") as cf:
            sidecar = cf.read()
        size = os.stat(extent.path).st_size
    except FileNotFoundError:
        return None
    return size, crc32(sidecar)


def read_raw(extent: Extent, sidecar: bool, offset: int, size: int) -> tuple[bytes, int]:
    """Bytes of the extent file (or its checksum sidecar) as they are on
    disk, and the file's whole size."""
    try:
        with open(extent.crc_path if sidecar else extent.path, "rb") as f:
            return os.pread(f.fileno(), size, offset), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise ShoalError(Code.DATA_LOST, f"extent {extent.path} is missing") from None


def install_piece(extent: Extent, offset: int, data: bytes, total: int, sidecar: bytes | None) -> None:
    """One piece of a whole extent copied from another replica, into a
    temporary file; the last piece (with the sidecar) puts both in place."""
    tmp = extent.path + ".copy"
    try:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0)
        fd = os.open(tmp, flags, 0o600)
        try:
            pwrite_all(fd, data, offset)
            if sidecar is not None:
                os.ftruncate(fd, total)
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if sidecar is None:
            return
        if os.stat(tmp).st_size != total:
            raise ShoalError(Code.IO_ERROR, f"copy of extent {extent.path} is incomplete")
        ctmp = extent.crc_path + ".copy"
        fd = os.open(ctmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            pwrite_all(fd, sidecar, 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        # a crash between the renames leaves data and checksums that disagree:
        # read as CORRUPTED (and copied again), never as wrong bytes
        os.replace(ctmp, extent.crc_path)
        os.replace(tmp, extent.path)
        fsync_dir(os.path.dirname(extent.path))
    except OSError as exc:
        raise disk_error(exc, f"copy of extent {extent.path}") from None
