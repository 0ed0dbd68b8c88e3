"""How file data maps onto extents: constants every role must agree on.

Chunk k of inode i is extent `i << CHUNK_BITS | k`; an extent holds at most
CHUNK bytes; one RPC moves at most MAX_IO bytes of data. The datanode and
the metanode check requests against these, so a client cannot make an
extent grow past a chunk or name a chunk that no file can have.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable

CHUNK = 64 * 1024 * 1024
CHUNK_BITS = 20  # chunks per file: 2^20, so a file holds at most 64 TiB
MAX_CHUNK = (1 << CHUNK_BITS) - 1
MAX_FILE_SIZE = CHUNK << CHUNK_BITS
MAX_IO = 8 * 1024 * 1024  # data bytes in one DATA_WRITE or DATA_READ
MAX_INO = (1 << (64 - CHUNK_BITS)) - 1  # extent ids must fit in 64 bits
ROOT_INO = 1  # a volume's root directory
MAX_NAME = 255  # bytes of one path component (NAME_MAX)
MAX_SYMLINK = 4095  # bytes of a symlink target (PATH_MAX - 1)
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 * 1024  # as ext4
MAX_XATTR_TOTAL = 256 * 1024  # all xattrs of one inode
OPEN_LEASE = 60.0  # seconds a metanode keeps a file open for a session that stopped renewing (default)
LOCK_LEASE = 15.0  # seconds a metanode keeps the locks of a session that stopped renewing (default)


def extent_id(ino: int, chunk: int) -> int:
    # a chunk past MAX_CHUNK would spill into the inode bits: another file's extent
    if not 0 <= chunk <= MAX_CHUNK or not 0 < ino <= MAX_INO:
        raise ValueError(f"no extent for chunk {chunk} of inode {ino}")
    return (ino << CHUNK_BITS) | chunk


VOLUME_BUCKET = "v"  # usage counts: the whole volume's bucket; a directory quota's is "q<id>"


def allocated(size: int, chunks: Iterable[int], block: int = 4096) -> int:
    """Bytes a file of `size` allocates: each chunk that has an extent, up to
    the size, in whole blocks (chunks without one are holes)."""
    total = 0
    for chunk in chunks:
        part = min(CHUNK, size - chunk * CHUNK)
        if part > 0:
            total += -(-part // block) * block
    return total


def normal_path(path: str) -> str:
    """An absolute path as quotas are named, the same everywhere: /a/b (no
    trailing slash, no dots, no doubled slashes)."""
    return posixpath.normpath(path).replace("//", "/")
