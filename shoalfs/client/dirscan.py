"""Lookups of a directory being scanned, answered from one listing of it.

A program that stats every file of a directory (`find`, `du`, a backup, an
`ls -l` after the kernel forgot its entries) costs one lookup round trip per
file, and so does every create (the kernel looks a new name up before it
creates it) and every removal. Once a directory sees SCAN lookups within a
second, the mount lists it with its attributes (a few round trips for
thousands of entries) and answers the lookups that follow from that
listing, names it does not hold with ENOENT.

The documented staleness holds: a listing is used only while it is younger
than the attribute timeout, and what the kernel is given from it expires at
that same moment (the listing's age is taken off the kernel's timeouts), so
nothing the kernel shows is older than from an ordinary lookup, and a name
another mount created shows within that same time.

This mount's own creates and removals in a listed directory are patched
into its listing (`changing`) and drop every other listing (one of them may
hold the changed directory or inode). Any other change this mount makes
(the client's `dir_changes` not accounted for by a patch), and a patched
change that failed (it may have happened or not), drop every listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoalfs.client.core import OWN_DIR_CHANGES
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
    base: int  # DirectoryScans.base() then: a change of ours not patched in since drops it
    attrs: dict[str, dict[str, Any]]


@dataclass
class Change:
    """A create or removal in a directory: `done` once it happened."""
    name: str | None = None
    attr: dict[str, Any] | None = None  # the new entry's; None: the name went

    def done(self, name: str, attr: dict[str, Any] | None) -> None:
        self.name, self.attr = name, attr


class DirectoryScans:
    def __init__(self, client: VolumeClient, valid: float) -> None:
        self.client = client
        self.valid = valid  # seconds a listing may answer (the attribute timeout)
        self._listings: dict[int, _Listing] = {}
        self._accounted = 0  # the client's dir_changes made by changes patched into listings
        self._active: dict[int, list[int]] = {}  # id -> the dir_changes so far of a change under way
        # dir -> (window start, base() then, lookups in it)
        self._lookups: dict[int, tuple[float, int, int]] = {}
        # dir being listed -> the changes patched in meanwhile (None: another directory's
        # changed since, the listing will not be kept)
        self._loading: dict[int, list[tuple[str, dict[str, Any] | None]] | None] = {}
        self._too_big: dict[int, float] = {}  # dir -> when it was found too large
        self._tasks: set[asyncio.Task[None]] = set()
        self._loaders: dict[int, asyncio.Task[None]] = {}  # dir -> the task taking its listing

    def base(self) -> int:
        """Moves with every change of ours that was not patched into the listings
        (one under way counts once it ends: until then it has not happened)."""
        return self.client.dir_changes - self._accounted - sum(own[0] for own in self._active.values())

    def get(self, parent: int, name: str) -> tuple[dict[str, Any] | None, float] | None:
        """(attributes or None if there is no such name, seconds that answer is
        still good for) from a listing; None if no listing can tell."""
        listing = self._listings.get(parent)
        if listing is None:
            return None
        left = self.valid - (time.monotonic() - listing.asked)
        if left <= 0 or listing.base != self.base():
            del self._listings[parent]
            return None
        return listing.attrs.get(name), left

    def looked_up(self, parent: int) -> None:
        """A lookup in `parent` went to its metanode: a scan lists the directory,
        unless this mount changes things it cannot patch in meanwhile (a
        listing would be dropped by the next change)."""
        now, base = time.monotonic(), self.base()
        start, since, count = self._lookups.get(parent, (now, base, 0))
        if now - start > WINDOW or since != base:
            start, since, count = now, base, 0
        self._lookups[parent] = (start, since, count + 1)
        if len(self._lookups) > 4096:
            self._lookups = {p: v for p, v in self._lookups.items() if now - v[0] <= WINDOW}
        if (count + 1 < SCAN or parent in self._loading or parent in self._listings
                or now - self._too_big.get(parent, -1e9) < TOO_BIG_FOR):
            return
        self._loading[parent] = []
        task = asyncio.create_task(self._list(parent))
        self._loaders[parent] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @contextlib.contextmanager
    def changing(self, parent: int) -> Iterator[Change]:
        """Around a create or removal in `parent`: once it is `done`, the
        client calls it made are accounted for and the change is patched into
        the directory's listing (or the one being taken). Work started in the
        background under it must not change anything else (it would be
        counted as this change)."""
        change, own = Change(), [0]
        token = OWN_DIR_CHANGES.set(own)
        self._active[id(own)] = own
        try:
            yield change
        finally:
            OWN_DIR_CHANGES.reset(token)
            del self._active[id(own)]
        if change.name is None:
            return  # failed: it may have happened or not, its calls stay unaccounted (drop all)
        self._accounted += own[0]
        patch = (change.name, change.attr)
        listing = self._listings.get(parent)
        # another listing may hold the changed directory or inode (their attributes changed)
        self._listings = {parent: listing} if listing is not None else {}
        for p, patches in self._loading.items():
            if p != parent:
                self._loading[p] = None
            elif patches is not None:
                patches.append(patch)
        if listing is not None and not self._patch(listing, [patch]):
            del self._listings[parent]

    @staticmethod
    def _patch(listing: _Listing, patches: list[tuple[str, dict[str, Any] | None]]) -> bool:
        """Apply our own changes; False if the listing cannot be kept: it grew
        too large, or a name went that was one of several links of a file
        (the others' link counts in it are out of date now)."""
        for name, attr in patches:
            if attr is None:
                gone = listing.attrs.pop(name, None)
                if gone is not None and not stat.S_ISDIR(gone["mode"]) and gone["nlink"] > 1:
                    return False
            else:
                listing.attrs[name] = attr
        return len(listing.attrs) <= MAX_ENTRIES

    async def _list(self, parent: int) -> None:
        asked, base = time.monotonic(), self.base()
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
            # only the directory's current loader takes its patches: one dropped (and
            # cancelled) while another started must not take that one's
            patches = None
            if self._loaders.get(parent) is asyncio.current_task():
                del self._loaders[parent]
                patches = self._loading.pop(parent, None)
        now = time.monotonic()
        # listings that can answer nothing any more, and old verdicts, go
        self._listings = {p: v for p, v in self._listings.items() if now - v.asked < self.valid}
        self._too_big = {p: t for p, t in self._too_big.items() if now - t < TOO_BIG_FOR}
        if patches is None or base != self.base() or now - asked >= self.valid:
            return
        listing = _Listing(asked, base, {name: attrs[ino] for name, ino, _ in entries if ino in attrs})
        # our changes that ended while it was taken: whether the listing has them or not,
        # applied again in their order they leave what they made
        if len(entries) == len(listing.attrs) and self._patch(listing, patches):
            self._listings[parent] = listing

    def drop(self) -> None:
        self._listings.clear()
        # a task cancelled before its first step never runs its cleanup: forget them here
        self._loading.clear()
        self._loaders.clear()
        for task in self._tasks:
            task.cancel()
