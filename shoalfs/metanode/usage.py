"""What a meta partition holds, and the limits on it (issue 15): the
volume's capacity and inode limit, and directory quotas.

Each partition counts its inodes and the bytes they have allocated: for a
file, every chunk that has an extent, up to the file's size (a chunk never
written is a hole and costs nothing; a hole inside a written chunk is
counted — the metanode knows chunks, not blocks). The counts are derived
from the inodes, so they are kept by every replica from the same journal,
survive a restart by being recounted on load, and `volume fsck` can check
them against a fresh count.

The master sums the partitions' counts from their heartbeat reports and
sends every metanode each volume's limits with the counts it saw. A change
that would raise the volume's bytes past its capacity, or its inodes past
its inode limit, is refused with NO_SPACE (ENOSPC) before it is queued;
one that frees space is never refused. The volume's total is the counts of
its partitions on this node as they are now, plus what the master last saw
of the others: exact when this node holds a copy of every partition (three
metanodes and three replicas, or one metanode), otherwise over by at most
what the other partitions grew since the last heartbeat round (about a
second).

Directory quotas count the same way, per quota: an inode counts toward
every quota of the directories above it, which it carries as `qids` (a new
inode takes its parent's; `shoal quota set` tags a directory's existing
subtree). Each count is a bucket: "v" for the volume, "q<id>" per quota.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import VOLUME_BUCKET, allocated


def allocated_of(node: dict[str, Any] | None) -> int:
    """Bytes an inode has allocated (0 for none, a directory, a symlink)."""
    if node is None or not stat.S_ISREG(node["mode"]):
        return 0
    return allocated(node["size"], (int(c) for c in node["extents"]))


def buckets(node: dict[str, Any] | None) -> list[str]:
    """What an inode counts toward: the volume, and each quota above it."""
    if node is None:
        return []
    return [VOLUME_BUCKET, *(f"q{q}" for q in node.get("qids", ()))]


def growth(changes: Iterable[tuple[dict[str, Any] | None, dict[str, Any] | None]]) -> dict[str, list[int]]:
    """bucket -> [bytes, inodes] that (old, new) inode pairs add (negative: free)."""
    out: dict[str, list[int]] = {}
    for old, new in changes:
        for sign, node in ((-1, old), (1, new)):
            size = allocated_of(node)
            for b in buckets(node):
                entry = out.setdefault(b, [0, 0])
                entry[0] += sign * size
                entry[1] += sign
    return out


@dataclass
class Limit:
    """One bucket's limits (0: none), and what the partitions other than
    the one checking hold of it."""

    max_bytes: int
    max_inodes: int
    others_bytes: int
    others_inodes: int


Limits = dict[str, Limit]


def limits_of(wire: Any, pid: int, here: Mapping[int, tuple[Usage, bool]]) -> Limits:
    """From the master's round state for one volume (`wire`: bucket -> limits
    and each partition's counts as the master saw them) for partition `pid`,
    what the other partitions hold: those this node leads (`here`: pid ->
    (usage, leads)) as they are now; a follower's copy may lag, so those
    count as the master saw them or as they are now, whichever is more."""
    out: Limits = {}
    for bucket, w in (wire.items() if isinstance(wire, dict) else ()):
        try:
            seen = {int(p): (int(v[0]), int(v[1])) for p, v in (w.get("parts") or {}).items()}
            others = [0, 0]
            for p in set(seen) | set(here):
                if p == pid:
                    continue
                counted = seen.get(p, (0, 0))
                if p in here:
                    usage, leads = here[p]
                    now = usage.of(str(bucket))
                    counted = now if leads else (max(now[0], counted[0]), max(now[1], counted[1]))
                others[0] += counted[0]
                others[1] += counted[1]
            out[str(bucket)] = Limit(int(w.get("max_bytes") or 0), int(w.get("max_inodes") or 0), *others)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError):
            continue  # a malformed entry limits nothing (the master validates what it sends)
    return out


class Usage:
    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}  # bucket -> [bytes, inodes]

    @property
    def bytes(self) -> int:
        return self.of(VOLUME_BUCKET)[0]

    @property
    def inodes(self) -> int:
        return self.of(VOLUME_BUCKET)[1]

    def of(self, bucket: str) -> tuple[int, int]:
        b, n = self.counts.get(bucket, (0, 0))
        return b, n

    def recount(self, inodes: Iterable[dict[str, Any]]) -> None:
        self.counts = {}
        for node in inodes:
            self.change(None, node)

    def change(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        """An inode was written (new) or dropped (None) in the committed state."""
        for bucket, (b, n) in growth([(old, new)]).items():
            entry = self.counts.setdefault(bucket, [0, 0])
            entry[0] += b
            entry[1] += n
            if entry == [0, 0]:  # an empty partition counts nothing, as a fresh count of it
                del self.counts[bucket]

    def check(self, limits: Limits, grow: dict[str, list[int]], pending: dict[str, list[int]]) -> None:
        """Refuse a change that grows a bucket past its limit (NO_SPACE);
        `pending`: what changes queued here, not yet durable, add."""
        for bucket, (b, n) in grow.items():
            limit = limits.get(bucket)
            if limit is None:
                continue
            held_b, held_n = self.of(bucket)
            queued = pending.get(bucket, (0, 0))
            held_b, held_n = held_b + max(0, queued[0]), held_n + max(0, queued[1])
            what = "the volume" if bucket == VOLUME_BUCKET else f"directory quota {bucket[1:]}"
            # `limit`: not a partition out of inode numbers (the client tries another for that)
            if b > 0 and limit.max_bytes and limit.others_bytes + held_b + b > limit.max_bytes:
                raise ShoalError(Code.NO_SPACE, f"{what} is full: {limit.max_bytes} bytes", {"limit": bucket})
            if n > 0 and limit.max_inodes and limit.others_inodes + held_n + n > limit.max_inodes:
                raise ShoalError(Code.NO_SPACE, f"{what} holds its limit of {limit.max_inodes} inodes",
                                 {"limit": bucket})
