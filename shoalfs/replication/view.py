"""A partition's view: who holds it, who leads it, who is in sync (DESIGN.md §6).

The master owns every view (kept in etcd with the volume) and changes it
only by raising the epoch. `members` lists the nodes holding a copy, the
leader first; `in_sync` is the subset that has persisted every change the
leader acknowledged, so any of them can take over without losing one.
On the wire a view is `[pid, epoch, members, in_sync]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoalfs.proto.errors import Code, ShoalError

MAX_REPLICAS = 5
DEFAULT_REPLICAS = 3  # copies of each partition of a new volume (master config default_replicas)
MAX_ADDR = 256


def _addrs(v: Any) -> tuple[str, ...]:
    if (not isinstance(v, (list, tuple)) or not 1 <= len(v) <= MAX_REPLICAS
            or not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDR for a in v) or len(set(v)) != len(v)):
        raise ShoalError(Code.BAD_REQUEST, "a view lists 1 to 5 distinct node addresses")
    return tuple(v)


@dataclass(frozen=True)
class View:
    pid: int
    epoch: int
    members: tuple[str, ...]  # the leader first
    in_sync: tuple[str, ...]

    @property
    def leader(self) -> str:
        return self.members[0]

    def followers(self) -> list[str]:
        """In-sync members other than the leader: each must persist a change before it is acknowledged."""
        return [a for a in self.in_sync if a != self.leader]

    def lagging(self) -> list[str]:
        """Members that hold a copy but must catch up before they count."""
        return [a for a in self.members if a not in self.in_sync]

    def to_wire(self) -> list[Any]:
        return [self.pid, self.epoch, list(self.members), list(self.in_sync)]

    @classmethod
    def from_wire(cls, v: Any) -> View:
        """A view from a peer or the master, checked field by field."""
        if not isinstance(v, (list, tuple)) or len(v) != 4:  # a tuple: from this process
            raise ShoalError(Code.BAD_REQUEST, "a view is [pid, epoch, members, in_sync]")
        pid, epoch = v[0], v[1]
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 63:
            raise ShoalError(Code.BAD_REQUEST, "a view's pid must be a positive integer")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 < epoch < 1 << 63:
            raise ShoalError(Code.BAD_REQUEST, "a view's epoch must be a positive integer")
        members, in_sync = _addrs(v[2]), _addrs(v[3])
        if members[0] not in in_sync or not set(in_sync) <= set(members):
            raise ShoalError(Code.BAD_REQUEST, "a view's leader must be in sync, and in_sync among its members")
        return cls(pid, epoch, members, in_sync)

    @classmethod
    def of_partition(cls, part: dict[str, Any]) -> View:
        """The view of a partition record (the master's, or a node's partition.json),
        checked; records from before replication have one replica and no epoch."""
        members = part.get("replicas")
        return cls.from_wire([part.get("pid"), part.get("epoch", 1), members, part.get("in_sync", members)])

    @classmethod
    def of_request(cls, pid: int, body: dict[str, Any], me: str) -> View:
        """The view a CREATE_PARTITION names, checked (a master from before
        replication names only the replicas, or none: this node alone)."""
        members = body["replicas"] or [me]
        return cls.from_wire([pid, body["epoch"], members, body["in_sync"] or members])

    def fields(self) -> dict[str, Any]:
        """The view as the fields of a partition record."""
        return {"replicas": list(self.members), "epoch": self.epoch, "in_sync": list(self.in_sync)}
