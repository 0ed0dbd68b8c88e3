"""Crash-safe file helpers."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import BinaryIO


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of it at offset: a short write is continued, one that makes
    no progress is an error (never a silently shorter file)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view, offset = view[n:], offset + n


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write a file so that a crash leaves either the old or the new one; a
    failure (a full disk) leaves the old one and no temporary file."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            pwrite_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def open_private_log(path: str) -> BinaryIO:
    """A log to append to, readable by its owner only (logs name volumes,
    paths and addresses): 0600 in a directory made 0700 if new."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")
