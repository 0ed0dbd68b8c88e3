"""Checking a volume's metadata as a whole: `shoal volume fsck NAME [--repair]`.

Every meta partition is scanned page by page and the whole is checked
(common/namespace.py: orphans, dangling entries, wrong link counts; inodes
changed within `grace` seconds are left alone). Repair evicts orphans
(freeing their data), removes dangling entries and sets link counts; each
step is an ordinary journaled change on its partition. Each partition's
usage counts (bytes and inodes, what df and the volume's limits use) are
compared with a fresh count of its inodes and, with --repair, replaced by
it (on the leader; every replica counts afresh when it starts). (The metanodes'
orphan sweeper reclaims orphans by itself; fsck finds them at once.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shoalfs.client.core import VolumeClient
from shoalfs.common.namespace import Finding, findings, scan
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op


@dataclass
class Report:
    inodes: int = 0
    entries: int = 0
    findings: list[Finding] = field(default_factory=list)
    usage: list[dict[str, Any]] = field(default_factory=list)  # partitions whose counts were off

    def as_dict(self) -> dict[str, Any]:
        return {"inodes": self.inodes, "entries": self.entries,
                "findings": [f.public() for f in self.findings], "usage": self.usage}

    @property
    def unrepaired(self) -> bool:
        return any(not f.repaired for f in self.findings) or any(not u["repaired"] for u in self.usage)


async def check(client: VolumeClient, repair: bool = False, grace: float = 600.0) -> Report:
    async def fetch(part: dict[str, Any], after: int, limit: int) -> dict[str, Any]:
        return dict(await client.call(part, Op.META_SCAN, {"after": after, "limit": limit}))
    ns = await scan(client.vol["meta_partitions"], fetch)
    report = Report(len(ns.inodes), len(ns.entries), findings(ns, time.time_ns() - int(grace * 1e9)))
    if repair:
        for finding in report.findings:
            await fix(client, finding)
            finding.repaired = True
    # each partition's usage counts (what df and the limits use) against a fresh count
    for part in client.vol["meta_partitions"]:
        res = await client.call(part, Op.META_USAGE, {"repair": repair})
        if res["kept"] != res["counted"]:
            report.usage.append({"pid": part["pid"], "kept": res["kept"], "counted": res["counted"],
                                 "repaired": res["repaired"]})
    return report


async def fix(client: VolumeClient, finding: Finding) -> None:
    if finding.kind == "dangling":
        await client.meta(finding.parent, Op.META_DELETE_DENTRY, {"parent": finding.parent, "name": finding.name})
    elif finding.kind == "orphan":
        await evict(client, finding.ino)
    elif finding.kind == "nlink":
        await client.meta(finding.ino, Op.META_SET_NLINK, {"ino": finding.ino, "nlink": finding.want_nlink})


async def evict(client: VolumeClient, ino: int) -> None:
    """Drop an orphan and free its data."""
    await client.meta(ino, Op.META_SET_NLINK, {"ino": ino, "nlink": 0})
    res = await client.meta(ino, Op.META_EVICT_INODE, {"ino": ino})
    if res.get("kept"):
        raise ShoalError(Code.INTERNAL, f"inode {ino} was linked again while being reaped")
    await client.free_extents(ino, res.get("extents", {}))
