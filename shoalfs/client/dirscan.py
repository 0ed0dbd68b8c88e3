"""Lookups of a directory being scanned, answered from one listing of it.

A program that stats every file of a directory (`find`, `du`, a backup, an
`ls -l` after the kernel forgot its entries) costs one lookup round trip per
file. Once a directory sees SCAN lookups within a second, the mount lists
it with its attributes (a few round trips for thousands of entries) and
answers the lookups that follow from that listing.

The documented staleness holds: a listing is used only while it is younger
than the attribute timeout, and what the kernel is given from it expires at
that same moment (the listing's age is taken off the kernel's timeouts), so
nothing the kernel shows is older than from an ordinary lookup. Any change
this mount makes (the client's `dir_changes`) drops every listing; a name
the listing does not have is looked up as usual (no absence is assumed).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoalfs.proto.errors import ShoalError

if TYPE_CHECKING:
    from shoalfs.client.core import VolumeClient

SCAN = 32  # lookups in one directory within WINDOW seconds: a scan
WINDOW = 1.0
PAGE = 1000
MAX_ENTRIES = 8 * PAGE  # a larger directory is not listed (a scan of it still works, a lookup at a time)
TOO_BIG_FOR = 30.0  # seconds a directory found too large is not listed again


@dataclass
class _Listing:
    asked: float  # when the listing was asked for (its age counts from then)
    changes: int  # the client's dir_changes then: any change of ours since drops it
    attrs: dict[str, dict[str, Any]]


class DirectoryScans:
    def __init__(self, client: VolumeClient, valid: float) -> None:
        self.client = client
        self.valid = valid  # seconds a listing may answer (the attribute timeout)
        self._listings: dict[int, _Listing] = {}
        # dir -> (window start, the client's dir_changes then, lookups in it)
        self._lookups: dict[int, tuple[float, int, int]] = {}
        self._loading: set[int] = set()
        self._too_big: dict[int, float] = {}  # dir -> when it was found too large
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, parent: int, name: str) -> tuple[dict[str, Any], float] | None:
        """(attributes, seconds they are still good for) from a listing, or None."""
        listing = self._listings.get(parent)
        if listing is None:
            return None
        left = self.valid - (time.monotonic() - listing.asked)
        if left <= 0 or listing.changes != self.client.dir_changes:
            del self._listings[parent]
            return None
        attr = listing.attrs.get(name)
        if attr is None:
            return None
        return attr, left

    def looked_up(self, parent: int) -> None:
        """A lookup in `parent` went to its metanode: a scan lists the directory,
        unless this mount changes things meanwhile (`rm -r` looks up and
        removes: a listing would be dropped by the next removal)."""
        now, changes = time.monotonic(), self.client.dir_changes
        start, since, count = self._lookups.get(parent, (now, changes, 0))
        if now - start > WINDOW or since != changes:
            start, since, count = now, changes, 0
        self._lookups[parent] = (start, since, count + 1)
        if len(self._lookups) > 4096:
            self._lookups = {p: v for p, v in self._lookups.items() if now - v[0] <= WINDOW}
        if (count + 1 < SCAN or parent in self._loading or parent in self._listings
                or now - self._too_big.get(parent, -1e9) < TOO_BIG_FOR):
            return
        self._loading.add(parent)
        task = asyncio.create_task(self._list(parent))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _list(self, parent: int) -> None:
        asked, changes = time.monotonic(), self.client.dir_changes
        try:
            entries: list[list[Any]] = []
            after = None
            while True:
                page = await self.client.readdir(parent, after, PAGE)
                entries += page["entries"]
                if not page["more"] or not page["entries"]:
                    break
                if len(entries) >= MAX_ENTRIES:
                    self._too_big[parent] = time.monotonic()
                    return
                after = page["entries"][-1][0]
            attrs = await self.client.batch_attrs([e[1] for e in entries])
        except ShoalError:
            return  # the lookups go on one at a time
        finally:
            self._loading.discard(parent)
        now = time.monotonic()
        # listings that can answer nothing any more, and old verdicts, go
        self._listings = {p: v for p, v in self._listings.items() if now - v.asked < self.valid}
        self._too_big = {p: t for p, t in self._too_big.items() if now - t < TOO_BIG_FOR}
        if changes == self.client.dir_changes and now - asked < self.valid:
            self._listings[parent] = _Listing(asked, changes, {name: attrs[ino] for name, ino, _ in entries
                                                               if ino in attrs})

    def drop(self) -> None:
        self._listings.clear()
        for task in self._tasks:
            task.cancel()
