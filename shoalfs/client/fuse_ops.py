"""The FUSE adapter: pyfuse3 operations (asyncio mode) over the async core.

Kernel inode numbers are shoalfs inode numbers (the root is 1 in both).
Attributes and entries are cached by the kernel for ATTR_TIMEOUT seconds, so
another mount's changes show within that time; page cache is kept on open
only if the file did not change since the previous open (close-to-open).
Every handler maps ShoalError to its errno and anything unexpected to EIO,
logged; nothing escapes to the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from shoalfs.client.core import VolumeClient
from shoalfs.client.dirscan import DirectoryScans
from shoalfs.client.handle import FileHandle
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import MAX_NAME

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 1.0
BLOCK = 4096

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")


def guarded(fn: F) -> F:
    """Errors become errnos; the lifecycle fence is checked first."""

    @functools.wraps(fn)
    async def wrapper(self: ShoalOperations, *args: Any) -> Any:
        self.check_fence()
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except ShoalError as exc:
            self.check_fence()  # fenced while we waited: ESTALE, whatever the cause
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("FUSE handler %s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


async def stale_if_gone(call: Awaitable[T], scans: DirectoryScans) -> T:
    """An inode the kernel names that another mount removed is ESTALE, not
    ENOENT: the kernel then looks its name up again and retries once (an
    open(O_CREAT) through a cached name creates the file anew, a stat finds
    it gone), as for NFS. That lookup must reach the metanode: the listings
    go (one may still name the inode)."""
    try:
        return await call
    except ShoalError as exc:
        if exc.code == Code.NOT_FOUND:
            scans.drop()
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        raise


class ShoalOperations(pyfuse3.Operations):  # type: ignore[misc]
    supports_dot_lookup = False

    def __init__(self, client: VolumeClient, writeback_cache: bool = False) -> None:
        super().__init__()
        self.client = client
        self.enable_writeback_cache = writeback_cache
        self.handles: dict[int, FileHandle] = {}
        self.dir_cursors: dict[int, tuple[int, dict[int, str]]] = {}
        self._fh = itertools.count(1)
        self._seen: dict[int, tuple[int, int]] = {}  # ino -> (mtime, size) at last open
        # inodes seen without any xattr, and when: the kernel asks for
        # security.capability before every write, and an RPC each time halves throughput
        self._no_xattrs: dict[int, float] = {}
        # (inode, name) a getxattr found absent, and when: a file written for
        # longer than that keeps asking for security.capability (one RPC per write)
        self._absent_xattrs: dict[tuple[int, bytes], float] = {}
        self._xattr_changes = 0  # bumped as a setxattr or removexattr starts
        self.scans = DirectoryScans(client, ATTR_TIMEOUT)  # lookups of a directory being scanned
        self.initialized = asyncio.Event()  # the kernel has our INIT answer (see init)

    def init(self) -> None:
        """pyfuse3 calls this as the kernel's INIT arrives; the answer goes out
        as it returns, before the event loop runs anything else."""
        self.initialized.set()

    # ----- hooks for the lifecycle guard --------------------------------------
    def check_fence(self) -> None:
        """Once the volume is deleted, every operation fails with ESTALE at once."""
        if self.client.fenced:
            raise pyfuse3.FUSEError(errno.ESTALE)

    def check_writable(self) -> None:
        """Pending deletion: writes fail at once with EROFS, reads go on."""
        if self.client.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    def drop_caches(self) -> None:
        """Forget what was cached. Open handles stay (failed, their buffers and
        read-ahead dropped): the mount lingers until the application closes them."""
        self.dir_cursors.clear()
        self._seen.clear()
        self._no_xattrs.clear()
        self._absent_xattrs.clear()
        self.scans.drop()

    # ----- helpers ------------------------------------------------------------------
    def entry(self, attr: dict[str, Any], valid: float = ATTR_TIMEOUT) -> pyfuse3.EntryAttributes:
        """What the kernel keeps for `valid` seconds at most (less for what is already that much older)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr["ino"]
        e.generation = 0
        e.entry_timeout = min(ENTRY_TIMEOUT, valid)
        e.attr_timeout = min(ATTR_TIMEOUT, valid)
        e.st_mode = attr["mode"]
        e.st_nlink = attr["nlink"]
        e.st_uid = attr["uid"]
        e.st_gid = attr["gid"]
        e.st_rdev = attr.get("rdev", 0)
        size = max([attr["size"]] + [h.size for h in self.open_handles(attr["ino"])])  # our unflushed writes count
        e.st_size = size
        e.st_blksize = BLOCK
        # what the file has allocated (holes are not), plus what we have not flushed yet
        e.st_blocks = int(attr.get("blocks", 0)) + (size - attr["size"] + 511) // 512
        e.st_atime_ns = attr["atime"]
        e.st_mtime_ns = attr["mtime"]
        e.st_ctime_ns = attr["ctime"]
        if attr.get("nxattr") == 0:
            if len(self._no_xattrs) > 100_000:
                self._no_xattrs.clear()
            self._no_xattrs[attr["ino"]] = time.monotonic()
        else:
            self._no_xattrs.pop(attr["ino"], None)
        return e

    @staticmethod
    def name(raw: bytes) -> str:
        """Every call that takes a name says ENAMETOOLONG for one over NAME_MAX
        (a lookup of it would otherwise say ENOENT to stat, chmod, unlink...)."""
        if len(raw) > MAX_NAME:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        return os.fsdecode(raw)

    def _new_handle(self, attr: dict[str, Any], extents: dict[int, list[int]], flags: int) -> int:
        fh = next(self._fh)
        self.handles[fh] = FileHandle(self.client, attr, extents, append=bool(flags & os.O_APPEND))
        self._seen[attr["ino"]] = (attr["mtime"], attr["size"])
        return fh

    def open_handles(self, ino: int) -> list[FileHandle]:
        return [h for h in self.handles.values() if h.ino == ino and not h.closed]

    def handle(self, fh: int) -> FileHandle:
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    # ----- lookups and attributes ------------------------------------------------
    @guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        name_str = self.name(name)
        listed = self.scans.get(parent_inode, name_str)
        if listed is not None:
            attr, left = listed
        else:
            try:
                attr, left = await self.client.lookup_attr(parent_inode, name_str), ATTR_TIMEOUT
            except ShoalError as exc:
                if exc.code != Code.NOT_FOUND:
                    raise
                attr = None  # counted too: the kernel looks a new name up before it creates it
            self.scans.looked_up(parent_inode)
        if attr is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.entry(attr, left)

    @guarded
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        # as fresh as the kernel's own cache would be: a change since is ours (it drops them)
        # or another client's within the attribute timeout
        attr = self.client.fresh_dir_attr(inode, ATTR_TIMEOUT)
        return self.entry(attr if attr is not None else await stale_if_gone(self.client.getattr(inode), self.scans))

    @guarded
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        self.check_writable()
        changes: dict[str, Any] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        now = time.time_ns()
        if fields.update_atime:
            changes["atime"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime"] = attr.st_mtime_ns
        if fields.update_size:
            result = await self._truncate(inode, attr.st_size)
            if not changes:
                return self.entry(result)
            changes.setdefault("mtime", now)
        return self.entry(await self.client.setattr(inode, **changes))

    async def _truncate(self, inode: int, size: int) -> dict[str, Any]:
        open_handles = self.open_handles(inode)
        for h in open_handles:
            await h.flush()
        result = await self.client.truncate(inode, size)
        for h in open_handles:
            await h.refresh()
        return result

    # ----- creation ---------------------------------------------------------------
    async def _make(self, parent: int, name: bytes, mode: int, ctx: Any, target: str | None = None,
                    rdev: int = 0, opening: bool = False) -> dict[str, Any]:
        name_str = self.name(name)
        with self.scans.changing(parent) as change:
            attr = await self.client.create(parent, name_str, mode, ctx.uid, ctx.gid, target, rdev,
                                            opening=opening)
            change.done(name_str, attr)
        return attr

    @guarded
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        self.check_writable()
        return self.entry(await self._make(parent_inode, name, mode & ~ctx.umask, ctx, rdev=rdev))

    @guarded
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        self.check_writable()
        mode = stat.S_IFDIR | (mode & ~ctx.umask & 0o7777)
        return self.entry(await self._make(parent_inode, name, mode, ctx))

    @guarded
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        self.check_writable()
        attr = await self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=os.fsdecode(target))
        return self.entry(attr)

    @guarded
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        self.check_writable()
        mode = stat.S_IFREG | (mode & ~ctx.umask & 0o7777)
        try:
            attr = await self._make(parent_inode, name, mode, ctx, opening=True)
        except ShoalError as exc:
            if exc.code != Code.EXISTS or flags & os.O_EXCL:
                raise
            # another mount created it since the kernel looked (it caches no absent
            # names): ESTALE makes the kernel look again and open what is there, with
            # its permission checks, O_TRUNC and symlinks followed
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        fh = self._new_handle(attr, {}, flags)
        return pyfuse3.FileInfo(fh=fh), self.entry(attr)

    @guarded
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        self.check_writable()
        return self.entry(await self.client.link(inode, new_parent_inode, self.name(new_name)))

    @guarded
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        attr = await self.client.getattr(inode)
        if not stat.S_ISLNK(attr["mode"]):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(attr["target"])

    # ----- removal and rename --------------------------------------------------------
    @guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._remove(parent_inode, name, want_dir=False)

    @guarded
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._remove(parent_inode, name, want_dir=True)

    async def _remove(self, parent: int, name: bytes, want_dir: bool) -> None:
        self.check_writable()
        name_str = self.name(name)
        with self.scans.changing(parent) as change:
            await self.client.unlink(parent, name_str, want_dir=want_dir)
            change.done(name_str, None)

    @guarded
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self.check_writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self.client.rename(parent_inode_old, self.name(name_old), parent_inode_new,
                                 self.name(name_new), noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))

    # ----- files ------------------------------------------------------------------------
    @guarded
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        # one round trip
        attr, extents = await stale_if_gone(self.client.attr_and_extents(inode, opening=True), self.scans)
        if stat.S_ISDIR(attr["mode"]):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            self.check_writable()
        if flags & os.O_TRUNC and attr["size"]:  # libfuse asks for atomic O_TRUNC
            attr, extents = await self._truncate(inode, 0), {}  # truncating to 0 frees every extent
        unchanged = self._seen.get(inode) == (attr["mtime"], attr["size"])
        fh = self._new_handle(attr, extents, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=unchanged)

    @guarded
    # pyfuse3 replies with any buffer (PyObject_GetBuffer); its stub says bytes
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        return await self.handle(fh).read(off, size)

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.check_writable()
        return await self.handle(fh).write(off, buf)

    @guarded
    async def flush(self, fh: int) -> None:
        await self.handle(fh).flush()

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.handle(fh).fsync()

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        try:
            await h.release()
        except Exception as exc:  # the kernel ignores release errors; close(2) got flush's
            log.warning("release of inode %d: %s", h.ino, exc)
        if h.wrote:
            self._seen.pop(h.ino, None)  # our own writes changed it: re-read on next open

    # ----- directories ----------------------------------------------------------------
    @guarded
    async def opendir(self, inode: int, ctx: Any) -> int:
        attr = await self.client.getattr(inode)
        if not stat.S_ISDIR(attr["mode"]):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = next(self._fh)
        self.dir_cursors[fh] = (inode, {})
        return fh

    @guarded
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        inode, cookies = self.dir_cursors[fh]
        after = cookies.get(start_id) if start_id else None
        if start_id and after is None:
            return
        while True:
            page = await self.client.readdir(inode, after, 256)
            entries = page["entries"]
            if not entries:
                return
            attrs = await self.client.batch_attrs([e[1] for e in entries])
            for name, ino, _mode in entries:
                attr = attrs.get(ino)
                if attr is None:  # removed meanwhile
                    after = name
                    continue
                cookie = len(cookies) + 1
                cookies[cookie] = name
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self.entry(attr), cookie):
                    return
                after = name
            if not page["more"]:
                return

    async def releasedir(self, fh: int) -> None:
        self.dir_cursors.pop(fh, None)

    # ----- xattrs, statfs, forget -----------------------------------------------------
    @guarded
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.check_writable()
        self._no_xattrs.pop(inode, None)
        self._absent_xattrs.pop((inode, name), None)
        self._xattr_changes += 1
        await self.client.setxattr(inode, os.fsdecode(name), value)

    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        now = time.monotonic()
        if now - max(self._no_xattrs.get(inode, -1e9), self._absent_xattrs.get((inode, name), -1e9)) < ATTR_TIMEOUT:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)  # as fresh as any cached attribute
        changes = self._xattr_changes
        try:
            return await self.client.getxattr(inode, os.fsdecode(name))
        except ShoalError as exc:
            if exc.code == Code.NO_DATA:
                if changes == self._xattr_changes:  # no setxattr of ours raced with the question
                    if len(self._absent_xattrs) > 100_000:
                        self._absent_xattrs.clear()
                    self._absent_xattrs[(inode, name)] = now
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @guarded
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [os.fsencode(n) for n in await self.client.listxattr(inode)]

    @guarded
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self.check_writable()
        try:
            await self.client.removexattr(inode, os.fsdecode(name))
        except ShoalError as exc:
            if exc.code == Code.NO_DATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @guarded
    async def statfs(self, ctx: Any) -> Any:
        st = await self.client.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK
        s.f_blocks = st["capacity_bytes"] // BLOCK
        s.f_bfree = s.f_bavail = max(0, st["capacity_bytes"] - st["used_bytes"]) // BLOCK
        limit = int(st.get("inode_limit") or 0)
        # without an inode limit, as many more files as free blocks (df -i then means something)
        s.f_ffree = s.f_favail = max(0, limit - st["inodes"]) if limit else s.f_bfree
        s.f_files = limit or st["inodes"] + s.f_ffree
        s.f_namemax = 255
        return s

    async def forget(self, inode_list: Any) -> None:
        return None

    async def flush_all(self) -> None:
        """Push every open file's buffered data (used on a clean shutdown)."""
        for h in list(self.handles.values()):
            try:
                await h.flush()
            except Exception as exc:
                log.warning("could not flush inode %d at shutdown: %s", h.ino, exc)
