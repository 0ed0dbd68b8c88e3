"""File locks on the wire: kinds, types, ranges, and the request schemas.

A lock is `[type, start, end, pid]` with `end` exclusive; a lock to the end
of the file, whatever its size, ends at EOF. Two kinds, kept apart as Linux
keeps them: POSIX record locks (fcntl, lockf: byte ranges, one owner per
process and mount) and BSD locks (flock: the whole file, one owner per open
file). An owner is the id its client gives, within the caller's session.
"""

from __future__ import annotations

import fcntl
from typing import Any

from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import MAX_INO
from shoalfs.proto.schema import U64, Bool, Int, ListOf, Number, Opt, Schema, Tuple

POSIX, FLOCK = 0, 1
READ, WRITE, UNLOCK = 0, 1, 2
EOF = 1 << 63  # past the largest offset the kernel passes (OFFSET_MAX = 2**63 - 1)
MAX_WAIT = 30.0  # seconds one blocking request may be held by the metanode; the client asks again
MAX_HELD = 1024  # ranges one owner may hold on one file (each split of a range makes one more)
FLOCK_TYPES = {fcntl.LOCK_SH: READ, fcntl.LOCK_EX: WRITE, fcntl.LOCK_UN: UNLOCK}  # flock and lockf commands
MAX_SESSION_LOCKS = 10_000  # locks one session may hold in one partition (all a renewal carries)

PID = Int(0, (1 << 31) - 1)
LOCK = Tuple(Int(READ, WRITE), Int(0, EOF - 1), Int(1, EOF), PID)  # a held lock: type, start, end, pid
INO, KIND, OWNER = Int(1, MAX_INO), Int(POSIX, FLOCK), Int(0, U64)
LOCK_TARGET: Schema = {"ino": INO, "kind": KIND, "owner": OWNER}
# META_LOCK: set (or with `test`, only report a conflicting lock: F_GETLK);
# `wait` seconds the metanode may hold a request that conflicts, answering as
# soon as it is granted
SET_LOCK: Schema = {**LOCK_TARGET, "type": Int(READ, UNLOCK), "start": Int(0, EOF - 1), "end": Int(1, EOF),
                    "pid": PID, "wait": Opt(Number(0, MAX_WAIT), 0.0), "test": Opt(Bool, False)}
# META_RELEASE_LOCKS: every lock of the caller's session, narrowed by what is given
RELEASE_LOCKS: Schema = {"ino": Opt(INO), "kind": Opt(KIND), "owner": Opt(OWNER)}
CLAIM = Tuple(INO, KIND, OWNER, ListOf(LOCK, MAX_HELD))


def LOCK_CLAIMS(name: str, v: Any) -> list[Any]:
    """What a renewal says the session holds: [ino, kind, owner, the owner's
    locks on that file], at most MAX_SESSION_LOCKS locks in all (counted
    before anything is checked one by one)."""
    if (not isinstance(v, list) or len(v) > MAX_SESSION_LOCKS
            or sum(len(c[3]) for c in v if isinstance(c, list) and len(c) == 4 and isinstance(c[3], list))
            > MAX_SESSION_LOCKS):
        raise ShoalError(Code.BAD_REQUEST, f"field {name!r} must be at most {MAX_SESSION_LOCKS} locks")
    return [CLAIM(f"{name}[]", c) for c in v]


def lock_range(start: int, length: int) -> tuple[int, int]:
    """(start, end) of a lock given as fcntl gives it: length 0 runs to the end of the file."""
    return start, (start + length if length else EOF)


def lock_length(start: int, end: int) -> int:
    return 0 if end >= EOF else end - start
