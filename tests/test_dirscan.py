"""DirectoryScans (client/dirscan.py) against a directory held in memory:
when a listing answers, which of this mount's changes it takes in, and
when it must go. The FUSE tests run it against real mounts; these reach
the orderings a mount makes rare."""

from __future__ import annotations

import asyncio
import stat
from typing import Any

from shoalfs.client.core import OWN_DIR_CHANGES
from shoalfs.client.dirscan import SCAN, DirectoryScans

DIR = 1


class Directory:
    """The client calls DirectoryScans makes, over one directory; every change
    bumps dir_changes as VolumeClient.call does (+1 as it starts, +1 as it ends)."""

    def __init__(self) -> None:
        self.dir_changes = 0
        self.names: dict[str, int] = {}
        self.attrs: dict[int, dict[str, Any]] = {}
        self._next = 100

    def _bump(self) -> None:
        self.dir_changes += 1
        own = OWN_DIR_CHANGES.get()
        if own is not None:
            own[0] += 1

    async def change(self, fn: Any) -> Any:
        self._bump()
        try:
            await asyncio.sleep(0)
            return fn()
        finally:
            self._bump()

    def create(self, name: str, nlink: int = 1) -> dict[str, Any]:
        self._next += 1
        self.names[name] = self._next
        self.attrs[self._next] = {"ino": self._next, "mode": stat.S_IFREG | 0o644, "nlink": nlink}
        return self.attrs[self._next]

    async def readdir(self, ino: int, after: str | None, limit: int) -> dict[str, Any]:
        names = sorted(n for n in self.names if after is None or n > after)[:limit]
        entries = [[n, self.names[n], 0] for n in names]
        await asyncio.sleep(0)  # the answer comes later: changes may happen meanwhile
        return {"entries": entries, "more": False}

    async def batch_attrs(self, inos: list[int]) -> dict[int, dict[str, Any]]:
        return {i: dict(self.attrs[i]) for i in inos if i in self.attrs}


def scan(scans: DirectoryScans) -> None:
    for _ in range(SCAN):
        scans.looked_up(DIR)


async def listed(scans: DirectoryScans) -> None:
    """Until every listing being taken has landed (or gone); 5 s at most."""
    await asyncio.wait_for(asyncio.gather(*[t for t in scans._tasks if not t.done()], return_exceptions=True), 5)


async def own_create(scans: DirectoryScans, d: Directory, name: str) -> dict[str, Any]:
    """This mount creates `name`, patched into the listings."""
    with scans.changing(DIR) as change:
        attr: dict[str, Any] = await d.change(lambda: d.create(name))
        change.done(name, attr)
    return attr


async def own_remove(scans: DirectoryScans, d: Directory, name: str) -> None:
    """This mount removes `name`, patched into the listings."""
    with scans.changing(DIR) as change:
        await d.change(lambda: d.names.pop(name))
        change.done(name, None)


def test_a_listing_takes_in_own_creates_and_removals_and_goes_on_anything_else() -> None:
    async def main() -> None:
        d = Directory()
        for i in range(5):
            d.create(f"f{i}")
        scans = DirectoryScans(d, valid=5.0)  # type: ignore[arg-type]
        scan(scans)
        await listed(scans)
        assert scans.get(DIR, "f1") is not None and scans.get(DIR, "f1")[0]["ino"] == d.names["f1"]
        absent = scans.get(DIR, "new")
        assert absent is not None and absent[0] is None  # known not to be there: ENOENT
        attr = await own_create(scans, d, "new")
        assert scans.get(DIR, "new")[0] == attr  # our own create shows at once
        await own_remove(scans, d, "f2")
        assert scans.get(DIR, "f2")[0] is None  # and our own removal
        try:
            with scans.changing(DIR):
                await d.change(lambda: d.create("maybe"))
                raise TimeoutError  # the answer was lost: it may have happened
        except TimeoutError:
            pass
        assert scans.get(DIR, "maybe") is None  # no listing answers any more

        scan(scans)
        await listed(scans)
        assert scans.get(DIR, "maybe")[0] is not None
        await d.change(lambda: None)  # a change not patched in (a chmod, a rename...)
        assert scans.get(DIR, "maybe") is None

    asyncio.run(main())


def test_removing_one_of_several_links_drops_the_listing() -> None:
    async def main() -> None:
        d = Directory()
        d.create("a", nlink=2)
        d.names["b"] = d.names["a"]
        scans = DirectoryScans(d, valid=5.0)  # type: ignore[arg-type]
        scan(scans)
        await listed(scans)
        assert scans.get(DIR, "b")[0]["nlink"] == 2
        await own_remove(scans, d, "a")
        assert scans.get(DIR, "b") is None  # its listed link count is out of date: asked again

    asyncio.run(main())


def test_changes_during_a_listing_are_replayed_on_it() -> None:
    async def main() -> None:
        d = Directory()
        d.create("old")
        scans = DirectoryScans(d, valid=5.0)  # type: ignore[arg-type]
        scan(scans)  # the listing is being taken
        await own_remove(scans, d, "old")
        attr = await own_create(scans, d, "new")
        await listed(scans)
        assert scans.get(DIR, "old")[0] is None and scans.get(DIR, "new")[0] == attr

    asyncio.run(main())


def test_a_listing_dropped_before_it_started_does_not_stop_the_next() -> None:
    async def main() -> None:
        d = Directory()
        d.create("x")
        scans = DirectoryScans(d, valid=5.0)  # type: ignore[arg-type]
        scan(scans)
        scans.drop()  # before the listing's task ran at all (an inode found gone meanwhile)
        await listed(scans)
        attr = await own_create(scans, d, "y")  # nothing piles up for a listing that is not coming
        scan(scans)
        await listed(scans)
        assert scans.get(DIR, "x") is not None and scans.get(DIR, "y")[0] == attr

    asyncio.run(main())


def test_a_dropped_listing_does_not_take_the_patches_of_the_next() -> None:
    class Held(Directory):
        """Each readdir reads the directory at once and answers once `answer` is set."""

        def __init__(self) -> None:
            super().__init__()
            self.answer = asyncio.Event()

        async def readdir(self, ino: int, after: str | None, limit: int) -> dict[str, Any]:
            entries = await super().readdir(ino, after, limit)
            await self.answer.wait()
            return entries

    async def main() -> None:
        d = Held()
        for i in range(3):
            d.create(f"f{i}")
        scans = DirectoryScans(d, valid=5.0)  # type: ignore[arg-type]
        scan(scans)  # listing A
        await asyncio.sleep(0)  # A waits for its answer
        scans.drop()  # A is cancelled (an inode found gone); its cancellation has not run yet
        scans.looked_up(DIR)  # a lookup that ran first in the same turn: listing B
        await asyncio.sleep(0)  # A's cleanup runs; B has read the directory, f1 in it
        await asyncio.sleep(0)
        await own_remove(scans, d, "f1")  # must reach B
        scans.looked_up(DIR)  # the next lookup
        d.answer.set()
        await listed(scans)
        answer = scans.get(DIR, "f1")
        assert answer is None or answer[0] is None  # never the name this mount removed

    asyncio.run(main())
