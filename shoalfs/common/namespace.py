"""A volume's namespace seen whole: every meta partition's inodes and
directory entries, and what they say together. Shared by `shoal volume
fsck` (client/fsck.py) and the metanodes' orphan sweeper (metanode/orphans.py).

- an orphan is an inode no directory entry names (a client that died
  between the steps of a mkdir, a link or a rename's replaced target);
- a dangling entry names an inode that does not exist;
- a wrong link count: a file's must equal the entries naming it, a
  directory's 2 + its subdirectories.

Inodes changed after `settled_ns` are left alone (an operation may be under
way); unlinked inodes (link count 0) are not orphans but files still open
somewhere, or waiting for the reaper.
"""

from __future__ import annotations

import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shoalfs.proto.layout import ROOT_INO

# one page of a partition: META_SCAN's answer for (partition, after, limit)
PageFetch = Callable[[Any, int, int], Awaitable[dict[str, Any]]]
PAGE = 1000


@dataclass
class Finding:
    kind: str  # orphan | dangling | nlink
    ino: int
    detail: str
    repaired: bool = False
    parent: int = 0  # of a dangling entry
    name: str = ""
    mode: int = 0  # of an orphan
    want_nlink: int = 0  # of a wrong link count

    def public(self) -> dict[str, Any]:
        return {"kind": self.kind, "ino": self.ino, "detail": self.detail, "repaired": self.repaired}


@dataclass
class Namespace:
    inodes: dict[int, list[Any]] = field(default_factory=dict)  # ino -> [mode, nlink, ctime_ns]
    entries: list[list[Any]] = field(default_factory=list)  # [parent, name, ino, mode]


async def scan(partitions: Iterable[Any], fetch: PageFetch) -> Namespace:
    """Every partition, page by page."""
    ns = Namespace()
    for part in partitions:
        after = 0
        while True:
            page = await fetch(part, after, PAGE)
            for ino, mode, nlink, ctime in page["inodes"]:
                ns.inodes[ino] = [mode, nlink, ctime]
                after = ino
            ns.entries += page["dentries"]
            if not page["more"]:
                break
    return ns


def findings(ns: Namespace, settled_ns: int) -> list[Finding]:
    names: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    for parent, _name, ino, mode in ns.entries:
        names[ino] = names.get(ino, 0) + 1
        if stat.S_ISDIR(mode):
            subdirs[parent] = subdirs.get(parent, 0) + 1
    out = [Finding("dangling", ino, f"entry {name!r} in directory {parent}", parent=parent, name=name)
           for parent, name, ino, _mode in ns.entries if ino not in ns.inodes]
    for ino, (mode, nlink, ctime) in sorted(ns.inodes.items()):
        if ctime > settled_ns or ino == ROOT_INO or (nlink == 0 and ino not in names):
            continue  # recent, the root, or unlinked: held open somewhere, or the reaper's
        if ino not in names:
            out.append(Finding("orphan", ino, f"{'directory' if stat.S_ISDIR(mode) else 'file'}, "
                                              f"no entry names it", mode=mode))
            continue
        want = 2 + subdirs.get(ino, 0) if stat.S_ISDIR(mode) else names[ino]
        if nlink != want:
            out.append(Finding("nlink", ino, f"link count {nlink}, should be {want}", want_nlink=want))
    return out
