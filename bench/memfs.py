"""A minimal in-memory pyfuse3 file system: the Python-FUSE ceiling.

Same stack as the shoal mount (pyfuse3 in asyncio mode on uvloop), no
network, no disks: whatever shoal reaches relative to this is the cost of
being distributed.

    python -m bench.memfs MOUNTPOINT
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import stat
import sys
import time
from typing import Any

import pyfuse3
import pyfuse3.asyncio


class Node:
    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.data = bytearray()
        self.children: dict[bytes, int] = {}
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.mtime = time.time_ns()


class MemFS(pyfuse3.Operations):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.nodes = {pyfuse3.ROOT_INODE: Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755)}
        self.next_ino = pyfuse3.ROOT_INODE + 1

    def attr(self, n: Node) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = n.ino
        e.st_mode = n.mode
        e.st_nlink = n.nlink
        e.st_size = len(n.data)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = n.mtime
        e.st_blksize = 4096
        e.st_blocks = (len(n.data) + 511) // 512
        e.attr_timeout = e.entry_timeout = 1.0
        return e

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        ino = self.node(parent_inode).children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attr(self.nodes[ino])

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self.attr(self.node(inode))

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        n = self.node(inode)
        if fields.update_size:
            if attr.st_size < len(n.data):
                del n.data[attr.st_size:]
            else:
                n.data.extend(bytes(attr.st_size - len(n.data)))
        if fields.update_mode:
            n.mode = (n.mode & ~0o7777) | (attr.st_mode & 0o7777)
        return self.attr(n)

    def _new(self, parent: int, name: bytes, mode: int) -> Node:
        p = self.node(parent)
        if name in p.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        n = Node(self.next_ino, mode)
        self.next_ino += 1
        self.nodes[n.ino] = n
        p.children[name] = n.ino
        return n

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return self.attr(self._new(parent_inode, name, stat.S_IFDIR | (mode & 0o7777)))

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        n = self._new(parent_inode, name, stat.S_IFREG | (mode & 0o7777))
        return pyfuse3.FileInfo(fh=n.ino), self.attr(n)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        n = self.node(inode)
        if flags & os.O_TRUNC:
            n.data.clear()
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.node(fh).data[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        data = self.node(fh).data
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off:off + len(buf)] = buf
        return len(buf)

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    async def release(self, fh: int) -> None:
        return None

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        p = self.node(parent_inode)
        ino = p.children.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self.nodes.pop(ino, None)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.unlink(parent_inode, name, ctx)

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        items = sorted(self.node(fh).children.items())
        for i, (name, ino) in enumerate(items[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self.attr(self.nodes[ino]), i):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: Any) -> Any:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 24
        s.f_files = s.f_ffree = s.f_favail = 1 << 24
        s.f_namemax = 255
        return s


async def main(mountpoint: str) -> None:
    pyfuse3.asyncio.enable()
    pyfuse3.init(MemFS(), mountpoint, set(pyfuse3.default_options) | {"fsname=memfs", "allow_other"})
    task = asyncio.ensure_future(pyfuse3.main())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pyfuse3.terminate)
    try:
        await task
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    from shoalfs.common.service import install_loop_policy

    install_loop_policy()
    asyncio.run(main(sys.argv[1]))
