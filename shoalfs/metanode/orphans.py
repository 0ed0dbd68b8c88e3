"""The orphan sweeper: reclaims inodes that kept a link count but lost their name.

A client killed between the steps of a mkdir, a cross-partition unlink or a
rename's replaced target leaves an inode that no directory entry names.
Finding one needs every partition of the volume, so the metanode holding a
volume's root partition sweeps it every `orphan_scan_interval` seconds:

1. it reads every partition's rename counter (`moves`, with its boot id),
2. scans every partition (common/namespace.py, as fsck does),
3. reads the counters again. A rename moves an entry between pages or
   partitions, so a scan during which any counter changed, or that began or
   ended with a rename under way, may have missed a name: it proves
   nothing and is thrown away.

An inode is reclaimed only when two such clean sweeps at least
`orphan_grace` apart both found it nameless and it has not changed for
`orphan_grace`; the partition then reclaims it only if its link count and
ctime are still what the sweep saw: a file's link count is set to 0 (the
reaper frees it once nobody holds it open), an empty directory is dropped. Each sweep holds
the volume's inodes and entries in memory for a moment, as fsck does;
`orphan_scan_interval` 0 turns sweeping off.
"""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any

from shoalfs.common.namespace import Finding, findings, scan
from shoalfs.common.placement import VolumeMaps
from shoalfs.common.tasks import Periodic
from shoalfs.metanode.partition import MetaPartition
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.proto.rpc import RpcPool

log = logging.getLogger(__name__)

MetaPart = tuple[int, int, int, list[str]]  # pid, start, end, replicas (placement.VolumeMaps)


class OrphanSweeper(Periodic):
    def __init__(self, partitions: Callable[[], Mapping[int, MetaPartition]], maps: VolumeMaps,
                 peers: RpcPool, interval: float, grace: float) -> None:
        super().__init__(interval)  # 0: off (fsck --repair still finds them)
        self.partitions = partitions
        self.maps = maps
        self.peers = peers
        self.grace = grace
        self.suspects: dict[str, dict[int, float]] = {}  # vol_id -> ino -> when first seen nameless
        self.reclaimed = 0

    async def round(self) -> None:
        for part in list(self.partitions().values()):
            if part.info.get("start") != 1 or (part.replica is not None and not part.replica.leading):
                continue  # the leader of a volume's root partition sweeps it
            vol_id = str(part.info["vol_id"])
            try:
                await self.sweep(vol_id)
            except ShoalError as exc:
                log.info("orphan sweep of volume %s skipped: %s", vol_id, exc.msg)

    async def _call(self, part: MetaPart, op: Op, body: dict[str, Any]) -> Any:
        pid, _start, _end, replicas = part
        if not replicas:
            raise ShoalError(Code.TRY_AGAIN, f"no placement known for meta partition {pid}")
        return await self.peers.call(replicas[0], op, pid, body, deadline=10.0)

    async def _counters(self, parts: list[MetaPart]) -> list[tuple[Any, Any]]:
        out = []
        for part in parts:
            page = await self._call(part, Op.META_SCAN, {"after": 0, "limit": 0})
            if page.get("renaming"):  # a rename step under way: its entry may be in neither place
                raise ShoalError(Code.TRY_AGAIN, f"a rename is under way in meta partition {part[0]}")
            out.append((page.get("boot"), page.get("moves")))
        return out

    async def sweep(self, vol_id: str) -> list[int]:
        """One sweep of a volume; the inodes reclaimed."""
        parts = self.maps.meta_partitions(vol_id)
        if not parts:
            return []
        try:
            before = await self._counters(parts)
        except ShoalError as exc:  # a rename under way, or a partition away: next time
            log.debug("orphan sweep of %s not begun: %s", vol_id, exc.msg)
            return []

        async def fetch(part: MetaPart, after: int, limit: int) -> dict[str, Any]:
            return dict(await self._call(part, Op.META_SCAN, {"after": after, "limit": limit}))
        ns = await scan(parts, fetch)
        try:
            after = await self._counters(parts)
        except ShoalError:
            after = []
        if after != before:
            log.debug("orphan sweep of %s: renames during the scan, nothing concluded", vol_id)
            return []
        now = time.monotonic()
        settled = time.time_ns() - int(self.grace * 1e9)
        parents = {entry[0] for entry in ns.entries}
        # a directory that still holds entries is fsck's to judge, not ours to drop
        orphans = {f.ino: f for f in findings(ns, settled)
                   if f.kind == "orphan" and not (stat.S_ISDIR(f.mode) and f.ino in parents)}
        seen = self.suspects.get(vol_id, {})
        self.suspects[vol_id] = {ino: seen.get(ino, now) for ino in orphans}
        reclaimed = []
        for ino, finding in orphans.items():
            if now - self.suspects[vol_id][ino] < self.grace:
                continue  # seen once so far: confirmed by a later clean sweep, or forgotten
            part = next((p for p in parts if p[1] <= ino < p[2]), None)
            if part is None:
                continue
            try:
                await self.reclaim(part, finding, ns.inodes[ino])
            except ShoalError as exc:
                log.warning("could not reclaim orphan inode %d of volume %s yet: %s", ino, vol_id, exc.msg)
                continue
            del self.suspects[vol_id][ino]
            reclaimed.append(ino)
        return reclaimed

    async def reclaim(self, part: MetaPart, orphan: Finding, seen: list[Any]) -> None:
        """Only if the inode is still as the sweep saw it (the partition checks)."""
        _mode, nlink, ctime = seen
        res = await self._call(part, Op.META_RECLAIM_ORPHAN, {"ino": orphan.ino, "ctime": ctime, "nlink": nlink})
        if not res.get("reclaimed"):
            return  # gone meanwhile
        self.reclaimed += 1
        log.info("orphan inode %d (no name for %.0fs): %s", orphan.ino, self.grace,
                 "directory dropped" if stat.S_ISDIR(orphan.mode) else "file handed to the reaper")
