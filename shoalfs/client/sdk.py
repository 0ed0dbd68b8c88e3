"""The synchronous Python SDK: a path-based file API over the async core.

    from shoalfs.client import connect
    with connect("127.0.0.1:17010", "photos", key_file="photos.key") as vol:
        with vol.open("/a.txt", "wb") as f:
            f.write(b"hello")

The async core runs on its own event loop in a background thread; every
call submits a coroutine there and waits. Errors are OSError with the errno
from the registry (DESIGN.md §2).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import itertools
import logging
import os
import stat as stat_mod
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from shoalfs.client.core import ClientOptions, VolumeClient, split_path
from shoalfs.client.handle import FileHandle, coherent_lock
from shoalfs.client.lifecycle import GuardConfig, LifecycleGuard
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import ROOT_INO
from shoalfs.proto.locks import EOF, FLOCK, FLOCK_TYPES, POSIX, lock_range

log = logging.getLogger(__name__)

T = TypeVar("T")
_LOCK_OWNERS = itertools.count(1)  # each file object owns its locks
MAX_SYMLINKS = 40


@dataclass(frozen=True)
class StatResult:
    st_ino: int
    st_mode: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_blocks: int = 0  # 512-byte units allocated (holes are not)

    @property
    def st_mtime(self) -> float:
        return self.st_mtime_ns / 1e9

    @classmethod
    def from_attr(cls, a: dict[str, Any]) -> StatResult:
        return cls(a["ino"], a["mode"], a["nlink"], a["uid"], a["gid"], a["size"],
                   a["atime"], a["mtime"], a["ctime"], int(a.get("blocks", 0)))


class _Loop:
    """An event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="shoalfs-io", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.on_loop_thread():  # waiting here would wait on ourselves for ever
            coro.close()
            raise RuntimeError("a blocking SDK call on the SDK's own I/O thread")
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result()

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def run_later(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        """From the I/O thread itself: start it and do not wait; a failure is logged."""
        def done(task: asyncio.Task[Any]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.warning("%s failed: %s", what, task.exception())
        self.loop.create_task(coro).add_done_callback(done)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _oserror(exc: ShoalError, path: str | None) -> OSError:
    return exc.to_oserror(path)


class Volume:
    def __init__(self, master: str, volume: str, options: ClientOptions | None = None,
                 key: str | None = None, key_file: str | None = None) -> None:
        self._loop = _Loop()
        self.client = VolumeClient(master, volume, options, key=key, key_file=key_file)
        self.guard: LifecycleGuard | None = None
        self.deleted_by: str | None = None  # detection path, once the volume is deleted
        try:
            self._run(self.client.open())  # no, a wrong or a revoked key: PermissionError
            if self.client.options.watch:
                self._run(self._start_guard())
        except BaseException:
            self._loop.run(self.client.close())
            self._loop.stop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T], path: str | None = None) -> T:
        try:
            return self._loop.run(coro)
        except ShoalError as exc:
            raise _oserror(exc, path) from None

    async def _start_guard(self) -> None:
        def fence(tomb: dict[str, Any], path: str) -> None:
            self.deleted_by = path
            self.client.fenced = True  # every later call raises ESTALE

        config = GuardConfig(heartbeat_interval=self.client.options.heartbeat_interval,
                             session_info={"mountpoint": "(sdk)", "mounted_at": time.time()})
        self.guard = LifecycleGuard(self.client, config, fence)
        await self.guard.start()

    closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.guard is not None:
            self._loop.run(self.guard.stop())
        self._loop.run(self.client.close())
        self._loop.stop()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----- path resolution ------------------------------------------------------
    async def _resolve(self, path: str, follow: bool = True) -> dict[str, Any]:
        """Attributes of the inode at path (symlinks followed as asked)."""
        parts = split_path(path)
        hops = 0
        ino = ROOT_INO
        attr: dict[str, Any] | None = None
        i = 0
        while i < len(parts):
            name = parts[i]
            found = await self.client.lookup(ino, name)
            last = i == len(parts) - 1
            attr = found.get("attr")
            if stat_mod.S_ISLNK(found["mode"]) and (follow or not last):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise ShoalError(Code.INVALID, "too many levels of symbolic links")
                target = (attr or await self.client.getattr(found["ino"]))["target"]
                attr = None
                rest = split_path(target)
                if target.startswith("/"):
                    ino = ROOT_INO
                parts = rest + parts[i + 1:]
                i = 0
                continue
            ino = found["ino"]
            i += 1
        return attr if attr is not None and attr["ino"] == ino else await self.client.getattr(ino)

    async def _parent(self, path: str) -> tuple[int, str]:
        parts = split_path(path)
        if not parts:
            raise ShoalError(Code.INVALID, "the root has no parent")
        parent = await self._resolve("/" + "/".join(parts[:-1]))
        if not stat_mod.S_ISDIR(parent["mode"]):
            raise ShoalError(Code.NOT_DIR, f"{os.path.dirname(path)} is not a directory")
        return parent["ino"], parts[-1]

    # ----- metadata --------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        """The volume's capacity_bytes, used_bytes, inodes, inode_limit (0:
        none) and raw_bytes (on datanodes, every copy), as the master last
        summed them (within a heartbeat round, about a second)."""
        return dict(self._run(self.client.statfs(), "/"))

    def stat(self, path: str) -> StatResult:
        return StatResult.from_attr(self._run(self._resolve(path), path))

    def lstat(self, path: str) -> StatResult:
        return StatResult.from_attr(self._run(self._resolve(path, follow=False), path))

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
            return True
        except FileNotFoundError:
            return False

    def listdir(self, path: str = "/") -> list[str]:
        async def go() -> list[str]:
            attr = await self._resolve(path)
            if not stat_mod.S_ISDIR(attr["mode"]):
                raise ShoalError(Code.NOT_DIR, f"{path} is not a directory")
            return [name async for name, _, _ in self.client.iterdir(attr["ino"])]
        return self._run(go(), path)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        async def go() -> None:
            parent, name = await self._parent(path)
            await self.client.create(parent, name, stat_mod.S_IFDIR | (mode & 0o7777), os.getuid(), os.getgid())
        self._run(go(), path)

    def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = False) -> None:
        parts = split_path(path)
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            try:
                self.mkdir(sub, mode)
            except FileExistsError:
                if i == len(parts) and not exist_ok:
                    raise
                if not stat_mod.S_ISDIR(self.stat(sub).st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", sub) from None

    def remove(self, path: str) -> None:
        async def go() -> None:
            parent, name = await self._parent(path)
            await self.client.unlink(parent, name, want_dir=False)
        self._run(go(), path)

    unlink = remove

    def rmdir(self, path: str) -> None:
        async def go() -> None:
            parent, name = await self._parent(path)
            await self.client.unlink(parent, name, want_dir=True)
        self._run(go(), path)

    def rename(self, src: str, dst: str) -> None:
        s, d = "/" + "/".join(split_path(src)), "/" + "/".join(split_path(dst))
        if d.startswith(s + "/"):
            raise OSError(errno.EINVAL, "cannot move a directory into itself", src)

        async def go() -> None:
            sp, sn = await self._parent(src)
            dp, dn = await self._parent(dst)
            await self.client.rename(sp, sn, dp, dn)
        self._run(go(), src)

    replace = rename

    def link(self, src: str, dst: str) -> None:
        async def go() -> None:
            attr = await self._resolve(src, follow=False)
            dp, dn = await self._parent(dst)
            await self.client.link(attr["ino"], dp, dn)
        self._run(go(), dst)

    def symlink(self, target: str, path: str) -> None:
        async def go() -> None:
            parent, name = await self._parent(path)
            await self.client.create(parent, name, stat_mod.S_IFLNK | 0o777, os.getuid(), os.getgid(),
                                     target=target)
        self._run(go(), path)

    def readlink(self, path: str) -> str:
        attr = self._run(self._resolve(path, follow=False), path)
        if not stat_mod.S_ISLNK(attr["mode"]):
            raise OSError(errno.EINVAL, "not a symbolic link", path)
        return str(attr["target"])

    def chmod(self, path: str, mode: int) -> None:
        self._run(self._setattr(path, mode=mode), path)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._run(self._setattr(path, uid=uid if uid >= 0 else None, gid=gid if gid >= 0 else None), path)

    def utime(self, path: str, ns: tuple[int, int]) -> None:
        self._run(self._setattr(path, atime=ns[0], mtime=ns[1]), path)

    async def _setattr(self, path: str, **changes: Any) -> None:
        attr = await self._resolve(path)
        await self.client.setattr(attr["ino"], **changes)

    def walk(self, top: str = "/") -> Iterator[tuple[str, list[str], list[str]]]:
        dirs: list[str] = []
        files: list[str] = []
        for name in self.listdir(top):
            full = top.rstrip("/") + "/" + name
            (dirs if stat_mod.S_ISDIR(self.lstat(full).st_mode) else files).append(name)
        yield top, dirs, files
        for d in dirs:
            yield from self.walk(top.rstrip("/") + "/" + d)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self._run(self._on_inode(path, lambda ino: self.client.setxattr(ino, name, value)), path)

    def getxattr(self, path: str, name: str) -> bytes:
        return self._run(self._on_inode(path, lambda ino: self.client.getxattr(ino, name)), path)

    async def _on_inode(self, path: str, fn: Any) -> Any:
        attr = await self._resolve(path)
        return await fn(attr["ino"])

    # ----- files -------------------------------------------------------------------
    def open(self, path: str, mode: str = "r", encoding: str | None = None) -> Any:
        flags = set(mode)
        if not flags <= set("rwaxb+t") or len(flags & set("rwax")) != 1:
            raise ValueError(f"invalid mode {mode!r}")
        readable = "r" in flags or "+" in flags
        writable = bool(flags & set("wax")) or "+" in flags
        raw = ShoalFile(self, path, mode, readable, writable)
        if "b" in flags:
            return raw
        return io.TextIOWrapper(io.BufferedRandom(raw) if readable and writable
                                else io.BufferedReader(raw) if readable else io.BufferedWriter(raw),
                                encoding=encoding or "utf-8")

    def flock(self, file: Any, operation: int) -> None:
        """fcntl.flock on a file this volume opened (text or binary): see ShoalFile.flock."""
        _raw_file(file).flock(operation)

    def lockf(self, file: Any, cmd: int, len: int = 0, start: int = 0, whence: int = io.SEEK_SET) -> None:
        """fcntl.lockf on a file this volume opened (text or binary): see ShoalFile.lockf."""
        _raw_file(file).lockf(cmd, len, start, whence)

    async def _open(self, path: str, mode: str) -> FileHandle:
        creating = bool(set(mode) & set("wax"))
        try:
            attr = await self._resolve(path)
            if "x" in mode:
                raise ShoalError(Code.EXISTS, f"{path} exists")
        except ShoalError as exc:
            if exc.code != Code.NOT_FOUND or not creating:
                raise
            parent, name = await self._parent(path)
            attr = await self.client.create(parent, name, stat_mod.S_IFREG | 0o644, os.getuid(), os.getgid())
        if stat_mod.S_ISDIR(attr["mode"]):
            raise ShoalError(Code.IS_DIR, f"{path} is a directory")
        if "w" in mode and attr["size"]:
            attr = await self.client.truncate(attr["ino"], 0)
        _, extents = await self.client.attr_and_extents(attr["ino"], opening=True)
        return FileHandle(self.client, attr, extents, append="a" in mode)


class ShoalFile(io.RawIOBase):
    """A binary file on a shoalfs volume (io.RawIOBase semantics)."""

    def __init__(self, vol: Volume, path: str, mode: str, readable: bool, writable: bool) -> None:
        super().__init__()
        self.name = path
        self.mode = mode
        self._vol = vol
        self._readable = readable
        self._writable = writable
        self._handle: FileHandle = vol._run(vol._open(path, mode), path)
        self._owner = next(_LOCK_OWNERS)
        self._pos = self._handle.size if "a" in mode else 0

    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._readable:
            raise io.UnsupportedOperation("not readable")
        data = self._vol._run(self._handle.read(self._pos, len(b)), self.name)
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            data = self.read(8 * 1024 * 1024)
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    def write(self, b: Any) -> int:
        if not self._writable:
            raise io.UnsupportedOperation("not writable")
        data = bytes(b)
        self._vol._run(self._handle.write(self._pos, data), self.name)
        self._pos = self._handle.size if self._handle.append else self._pos + len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._handle.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(errno.EINVAL, "negative seek position", self.name)
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        self._vol._run(self._handle.truncate(size), self.name)
        return size

    def flush(self) -> None:
        if not self.closed and self._writable and not self._handle.closed:
            self._vol._run(self._handle.flush(), self.name)

    def fsync(self) -> None:
        self._vol._run(self._handle.fsync(), self.name)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("shoalfs files have no OS file descriptor")

    # ----- locks: held across every mount and handle of the volume; owned by this
    # file object (as Linux's open file description locks), released when it closes
    def flock(self, operation: int) -> None:
        """As fcntl.flock: LOCK_SH, LOCK_EX or LOCK_UN, with LOCK_NB not to wait (BlockingIOError)."""
        type = FLOCK_TYPES.get(operation & ~fcntl.LOCK_NB)
        if type is None:
            raise ValueError(f"invalid flock operation {operation}")
        self._lock(FLOCK, type, 0, EOF, not operation & fcntl.LOCK_NB)

    def lockf(self, cmd: int, len: int = 0, start: int = 0, whence: int = io.SEEK_SET) -> None:
        """As fcntl.lockf: a byte range from `start` (relative to `whence`), `len`
        bytes (0: to the end of the file, whatever its size; negative: before `start`)."""
        type = FLOCK_TYPES.get(cmd & ~fcntl.LOCK_NB)
        if type is None:
            raise ValueError(f"invalid lockf command {cmd}")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._handle.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        first = base + start + min(len, 0)
        if first < 0 or first + abs(len) >= EOF:
            raise OSError(errno.EINVAL, "lock range out of bounds", self.name)
        self._lock(POSIX, type, *lock_range(first, abs(len)), not cmd & fcntl.LOCK_NB)

    def _lock(self, kind: int, type: int, start: int, end: int, wait: bool) -> None:
        vol, ino = self._vol, self._handle.ino
        interrupted = asyncio.Event()
        try:
            conflict = vol._run(coherent_lock([self._handle], type, lambda: vol.client.locks.lock(
                ino, kind, self._owner, type, start, end, os.getpid(), wait, interrupted)), self.name)
        except BaseException:  # KeyboardInterrupt while waiting: the request is answered at once
            vol._loop.loop.call_soon_threadsafe(interrupted.set)
            raise
        if conflict is not None:
            raise BlockingIOError(errno.EAGAIN, "locked by another owner", self.name)

    def close(self) -> None:
        if self.closed:
            return
        if self._vol.closed:  # the volume went first: nothing left to flush to
            super().close()
            return
        if self._vol._loop.on_loop_thread():
            # a file never closed, collected by the garbage collector on the I/O thread
            self._vol._loop.run_later(self._release(), f"closing {self.name}")
            super().close()
            return
        try:
            self._vol._run(self._release(), self.name)
        finally:
            super().close()

    async def _release(self) -> None:
        try:
            await self._handle.release()
        finally:
            try:
                await self._vol.client.locks.release(self._handle.ino, POSIX, self._owner)
            finally:
                await self._vol.client.locks.release(self._handle.ino, FLOCK, self._owner)


def _raw_file(file: Any) -> ShoalFile:
    raw = file
    for layer in ("buffer", "raw"):  # text -> buffered -> raw, from wherever `file` is
        raw = getattr(raw, layer, raw)
    if not isinstance(raw, ShoalFile):
        raise TypeError("not a file opened by a shoalfs Volume")
    return raw


def connect(master: str, volume: str, options: ClientOptions | None = None, *,
            key: str | None = None, key_file: str | None = None) -> Volume:
    """Open a volume by master address and name with one of its keys: `key`,
    `key_file`, $SHOAL_KEY_FILE, or the embedded cluster's key store
    (client/keys.py). No key, or one the master refuses: PermissionError."""
    return Volume(master, volume, options, key, key_file)
