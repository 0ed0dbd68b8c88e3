"""The one error-code registry (DESIGN.md §2, contract).

Every result code used by the RPC header and the HTTP envelope is defined
here once: its number, name, message, whether it is permanent or transient,
and the errno a FUSE/SDK user sees. Code compares codes, never strings.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Code(IntEnum):
    OK = 0
    # permanent (100xxx mirrors HTTP-ish families so numbers stay readable)
    BAD_REQUEST = 100400
    UNAUTHORIZED = 100401
    FORBIDDEN = 100403
    VOLUME_NOT_EXIST = 100404
    NOT_FOUND = 100405
    EXISTS = 100409
    VOLUME_EXISTS = 100410
    NOT_EMPTY = 100411
    IS_DIR = 100412
    NOT_DIR = 100413
    INVALID = 100414
    NO_SPACE = 100415
    READ_ONLY = 100416
    NAME_TOO_LONG = 100417
    CORRUPTED = 100418
    IO_ERROR = 100419
    NO_DATA = 100420
    NOT_PERMITTED = 100421
    TOO_MANY_LINKS = 100422
    DATA_LOST = 100423
    FILE_TOO_BIG = 100424
    OUT_OF_RANGE = 100425
    TOO_BIG = 100426
    CROSS_QUOTA = 100427  # a rename between directories under different quotas (as XFS project quotas)
    INTERNAL = 100500
    # transient: retried inside the operation's deadline
    TIMEOUT = 100600
    NO_LEADER = 100601
    TRY_AGAIN = 100602
    NODE_UNREACHABLE = 100603
    UNAVAILABLE = 100604
    PARTITION_NOT_EXIST = 100605  # ask the master again: placement may have moved
    EXPIRED = 100606  # the capability is past its time: renew it and retry
    NOT_LEADER = 100607  # this master does not lead (data: {"leader": addr or None}): ask the leader
    NOT_PARTITION_LEADER = 100608  # this node does not lead the partition (data: {"view": ...}): ask the master
    STALE_EPOCH = 100609  # a replication message of an older view of the partition (data: {"view": ...})


@dataclass(frozen=True)
class CodeInfo:
    message: str
    transient: bool
    errno: int


REGISTRY: dict[Code, CodeInfo] = {
    Code.OK: CodeInfo("ok", False, 0),
    Code.BAD_REQUEST: CodeInfo("bad request", False, errno.EINVAL),
    Code.UNAUTHORIZED: CodeInfo("authentication required", False, errno.EACCES),
    Code.FORBIDDEN: CodeInfo("forbidden", False, errno.EACCES),
    Code.VOLUME_NOT_EXIST: CodeInfo("volume does not exist", False, errno.ESTALE),
    Code.NOT_FOUND: CodeInfo("no such file or directory", False, errno.ENOENT),
    Code.EXISTS: CodeInfo("file exists", False, errno.EEXIST),
    Code.VOLUME_EXISTS: CodeInfo("volume already exists", False, errno.EEXIST),
    Code.NOT_EMPTY: CodeInfo("directory not empty", False, errno.ENOTEMPTY),
    Code.IS_DIR: CodeInfo("is a directory", False, errno.EISDIR),
    Code.NOT_DIR: CodeInfo("not a directory", False, errno.ENOTDIR),
    Code.INVALID: CodeInfo("invalid argument", False, errno.EINVAL),
    Code.NO_SPACE: CodeInfo("no space left on device", False, errno.ENOSPC),
    Code.READ_ONLY: CodeInfo("read-only volume", False, errno.EROFS),
    Code.NAME_TOO_LONG: CodeInfo("file name too long", False, errno.ENAMETOOLONG),
    Code.CORRUPTED: CodeInfo("data block checksum mismatch", False, errno.EIO),
    Code.IO_ERROR: CodeInfo("disk I/O error on the server", False, errno.EIO),
    Code.DATA_LOST: CodeInfo("extent missing or shorter than written on the datanode", False, errno.EIO),
    Code.FILE_TOO_BIG: CodeInfo("file would exceed the largest size (64 TiB)", False, errno.EFBIG),
    Code.OUT_OF_RANGE: CodeInfo("name or value out of range", False, errno.ERANGE),
    Code.TOO_BIG: CodeInfo("value too large", False, errno.E2BIG),
    Code.CROSS_QUOTA: CodeInfo("rename across directory quotas: copy, then remove", False, errno.EXDEV),
    Code.PARTITION_NOT_EXIST: CodeInfo("partition not on this node", True, errno.EIO),
    Code.NO_DATA: CodeInfo("no such attribute", False, errno.ENODATA),
    Code.NOT_PERMITTED: CodeInfo("operation not permitted", False, errno.EPERM),
    Code.TOO_MANY_LINKS: CodeInfo("too many links", False, errno.EMLINK),
    Code.INTERNAL: CodeInfo("internal error", False, errno.EIO),
    # a transient code reaches a user only once the operation's deadline has
    # passed: as EIO, whatever it was (DESIGN.md §2), never EAGAIN or ETIMEDOUT
    Code.TIMEOUT: CodeInfo("timed out", True, errno.EIO),
    Code.NO_LEADER: CodeInfo("partition has no leader", True, errno.EIO),
    Code.TRY_AGAIN: CodeInfo("try again", True, errno.EIO),
    Code.NODE_UNREACHABLE: CodeInfo("node unreachable", True, errno.EIO),
    Code.UNAVAILABLE: CodeInfo("service unavailable", True, errno.EIO),
    Code.EXPIRED: CodeInfo("capability expired", True, errno.EIO),  # not renewed in time: the master is away
    Code.NOT_LEADER: CodeInfo("this master is not the leader", True, errno.EIO),
    Code.NOT_PARTITION_LEADER: CodeInfo("this node does not lead the partition", True, errno.EIO),
    Code.STALE_EPOCH: CodeInfo("the partition has a newer view", True, errno.EIO),
}


def info(code: int) -> CodeInfo:
    try:
        return REGISTRY[Code(code)]
    except ValueError:
        return CodeInfo(f"unknown result code {code}", False, errno.EIO)


def is_transient(code: int) -> bool:
    return info(code).transient


class ShoalError(Exception):
    """A failure that carries a registry code (and optional structured data)."""

    def __init__(self, code: int, msg: str | None = None, data: Any = None) -> None:
        self.code = int(code)
        self.msg = msg or info(code).message
        self.data = data
        super().__init__(f"{self.msg} ({self.code})")

    @property
    def transient(self) -> bool:
        return is_transient(self.code)

    @property
    def errno(self) -> int:
        return info(self.code).errno

    def to_oserror(self, path: str | None = None) -> OSError:
        e = info(self.code).errno
        if path is None:
            return OSError(e, self.msg)
        return OSError(e, self.msg, path)


def disk_error(exc: OSError, what: str) -> ShoalError:
    """A server's failed disk operation, as the client should see it."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ShoalError(Code.NO_SPACE, f"{what}: no space left on the server's disk")
    return ShoalError(Code.IO_ERROR, f"{what}: {exc.strerror or exc}")


def check_registry() -> None:
    """Invariants of the registry (also asserted by the unit tests)."""
    assert set(REGISTRY) == set(Code)
    assert Code.VOLUME_NOT_EXIST == 100404
