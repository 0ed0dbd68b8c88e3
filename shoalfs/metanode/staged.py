"""What a meta partition will hold once its queued journal records are durable.

A change is validated against this view, made durable, and only then
applied to the partition's committed state (DESIGN.md §8). Mutations read
the view, so two changes of one inode in flight together compose (each
effect is a whole value); reads answer from the committed state only, so
nobody ever sees a change that may still fail to reach the disk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

from sortedcontainers import SortedDict


class Committed(Protocol):
    inodes: dict[int, dict[str, Any]]
    dentries: dict[int, SortedDict]
    cursor: int
    txs: dict[str, dict[str, Any]]
    applied_txs: dict[str, Any]


class Staged:
    def __init__(self, base: Committed) -> None:
        self.base = base
        self.records: deque[list[Any]] = deque()
        self._clear_overlay()

    def _clear_overlay(self) -> None:
        self.inodes: dict[int, dict[str, Any] | None] = {}
        self.dentries: dict[tuple[int, str], tuple[int, int] | None] = {}
        self.dropped_dirs: set[int] = set()  # directories whose entries an eviction removed
        self.txs: dict[str, dict[str, Any] | None] = {}
        self.applied: dict[str, Any] = {}
        self.requests: set[str] = set()  # request ids whose change is queued, not yet durable
        self.cursor = 0

    # ----- the view ----------------------------------------------------------
    def inode(self, ino: int) -> dict[str, Any] | None:
        return self.inodes[ino] if ino in self.inodes else self.base.inodes.get(ino)

    def dentry(self, parent: int, name: str) -> tuple[int, int] | None:
        key = (parent, name)
        if key in self.dentries:
            return self.dentries[key]
        if parent in self.dropped_dirs:
            return None
        entries = self.base.dentries.get(parent)
        return entries.get(name) if entries is not None else None

    def has_entries(self, parent: int) -> bool:
        """Whether a directory will hold any entry once the queued records land."""
        if any(k[0] == parent and v is not None for k, v in self.dentries.items()):
            return True
        if parent in self.dropped_dirs:
            return False
        entries = self.base.dentries.get(parent) or {}
        return any(self.dentries.get((parent, name), True) is not None for name in entries)

    def next_cursor(self) -> int:
        return max(self.base.cursor, self.cursor)

    def tx(self, txid: str) -> dict[str, Any] | None:
        return self.txs[txid] if txid in self.txs else self.base.txs.get(txid)

    def all_txs(self) -> Iterator[dict[str, Any]]:
        for txid, tx in self.base.txs.items():
            if txid not in self.txs:
                yield tx
        for staged in self.txs.values():
            if staged is not None:
                yield staged

    def applied_tx(self, txid: str) -> tuple[bool, Any]:
        if txid in self.applied:
            return True, self.applied[txid]
        if txid in self.base.applied_txs:
            return True, self.base.applied_txs[txid]
        return False, None

    # ----- keeping it current ------------------------------------------------
    def add(self, effects: list[Any]) -> None:
        self.records.append(effects)
        self._overlay(effects)

    def durable(self, count: int) -> None:
        """The oldest `count` records reached the committed state."""
        for _ in range(count):
            self.records.popleft()
        self._clear_overlay()
        for effects in self.records:
            self._overlay(effects)

    def clear(self) -> None:
        """Every queued record failed: the view is the committed state again."""
        self.records.clear()
        self._clear_overlay()

    def _overlay(self, effects: list[Any]) -> None:
        for eff in effects:
            kind = eff[0]
            if kind == "I":
                self.inodes[eff[1]] = eff[2]
            elif kind == "i":
                self.inodes[eff[1]] = None
                self.dropped_dirs.add(eff[1])
                for key in [k for k in self.dentries if k[0] == eff[1]]:
                    del self.dentries[key]
            elif kind == "D":
                self.dentries[(eff[1], eff[2])] = (eff[3], eff[4])
            elif kind == "d":
                self.dentries[(eff[1], eff[2])] = None
            elif kind == "C":
                self.cursor = max(self.cursor, eff[1])
            elif kind == "T":
                self.txs[eff[1]] = eff[2]
            elif kind == "t":
                self.txs[eff[1]] = None
            elif kind == "A":
                self.applied[eff[1]] = eff[2]
            elif kind == "R":
                self.requests.add(eff[1])
