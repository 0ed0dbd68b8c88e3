"""Checking a volume's metadata as a whole: `shoal volume fsck NAME [--repair]`.

Every meta partition is scanned page by page; then, across partitions:
- an orphan is an inode no directory entry names (a client that died
  between the steps of a mkdir, a link or a rename's replaced target);
- a dangling entry names an inode that does not exist;
- a wrong link count: a file's must equal the entries naming it, a
  directory's 2 + its subdirectories.
Inodes changed within `grace` seconds are left alone: an operation may be
under way. Unlinked inodes (link count 0) are not orphans but files still
open on some mount, or waiting for the metanodes' reaper. Repair
evicts orphans (freeing their data), removes dangling entries and sets link
counts; each step is an ordinary journaled change on its partition.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field
from typing import Any

from shoalfs.client.core import ROOT_INO, VolumeClient
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op


@dataclass
class Finding:
    kind: str  # orphan | dangling | nlink
    ino: int
    detail: str
    repaired: bool = False


@dataclass
class Report:
    inodes: int = 0
    entries: int = 0
    findings: list[Finding] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"inodes": self.inodes, "entries": self.entries,
                "findings": [vars(f) for f in self.findings]}


async def scan(client: VolumeClient) -> tuple[dict[int, list[Any]], list[list[Any]]]:
    """All inodes (ino -> [mode, nlink, ctime]) and entries ([parent, name, ino, mode])."""
    inodes: dict[int, list[Any]] = {}
    entries: list[list[Any]] = []
    for part in client.vol["meta_partitions"]:
        after = 0
        while True:
            page = await client.call(part, Op.META_SCAN, {"after": after, "limit": 1000})
            for ino, mode, nlink, ctime in page["inodes"]:
                inodes[ino] = [mode, nlink, ctime]
                after = ino
            entries += page["dentries"]
            if not page["more"]:
                break
    return inodes, entries


async def check(client: VolumeClient, repair: bool = False, grace: float = 600.0) -> Report:
    inodes, entries = await scan(client)
    report = Report(len(inodes), len(entries))
    names: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    for parent, _name, ino, mode in entries:
        names[ino] = names.get(ino, 0) + 1
        if stat.S_ISDIR(mode):
            subdirs[parent] = subdirs.get(parent, 0) + 1
    settled = time.time_ns() - int(grace * 1e9)
    for parent, name, ino, _mode in entries:
        if ino not in inodes:
            report.findings.append(Finding("dangling", ino, f"entry {name!r} in directory {parent}"))
            if repair:
                await client.meta(parent, Op.META_DELETE_DENTRY, {"parent": parent, "name": name})
                report.findings[-1].repaired = True
    for ino, (mode, nlink, ctime) in sorted(inodes.items()):
        if ctime > settled or ino == ROOT_INO or (nlink == 0 and ino not in names):
            continue  # recent, the root, or unlinked: held open somewhere, or the reaper's
        if ino not in names:
            report.findings.append(Finding("orphan", ino, f"{'directory' if stat.S_ISDIR(mode) else 'file'}, "
                                                          f"no entry names it"))
            if repair:
                await evict(client, ino)
                report.findings[-1].repaired = True
            continue
        want = 2 + subdirs.get(ino, 0) if stat.S_ISDIR(mode) else names[ino]
        if nlink != want:
            report.findings.append(Finding("nlink", ino, f"link count {nlink}, should be {want}"))
            if repair:
                await client.meta(ino, Op.META_SET_NLINK, {"ino": ino, "nlink": want})
                report.findings[-1].repaired = True
    return report


async def evict(client: VolumeClient, ino: int) -> None:
    """Drop an orphan and free its data."""
    await client.meta(ino, Op.META_SET_NLINK, {"ino": ino, "nlink": 0})
    res = await client.meta(ino, Op.META_EVICT_INODE, {"ino": ino})
    if res.get("kept"):
        raise ShoalError(Code.INTERNAL, f"inode {ino} was linked again while being reaped")
    await client.free_extents(ino, res.get("extents", {}))
