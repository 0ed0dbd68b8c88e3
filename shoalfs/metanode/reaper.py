"""The reaper: reclaims unlinked files that nobody has open any more.

An unlinked file stays while some session has it open (leases.py); the last
session to close it drops it. A session that never closes it (a client
killed, or cut off until its lease lapsed) leaves it behind: every
`interval` seconds the reaper takes such inodes, unchanged for two lease
periods, frees their extents on the datanodes (with this node's
capability), then drops the inode: data first, so a failure in between
leaves an inode with missing extents, never extents nobody can find.
(Inodes that kept a link but lost their name are fsck's: finding them
needs every partition of the volume.)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping

from shoalfs.common.placement import VolumeMaps
from shoalfs.common.tasks import Periodic
from shoalfs.metanode.partition import MetaPartition
from shoalfs.proto.errors import ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.proto.rpc import RpcPool

log = logging.getLogger(__name__)

BATCH = 100  # inodes per partition per round: a backlog is worked off, never all at once


class Reaper(Periodic):
    def __init__(self, partitions: Callable[[], Mapping[int, MetaPartition]], maps: VolumeMaps,
                 peers: RpcPool, lease: float) -> None:
        super().__init__(max(0.5, lease / 4))
        self.partitions = partitions
        self.maps = maps
        self.peers = peers
        self.grace_ns = int(2 * lease * 1e9)
        self.reclaimed = 0

    async def round(self) -> None:
        for part in list(self.partitions().values()):
            if part.replica is not None and not part.replica.leading:
                continue  # the leader reaps; its changes reach us
            for ino in part.reclaimable(self.grace_ns)[:BATCH]:
                try:
                    await self.reclaim(part, ino)
                except ShoalError as exc:
                    log.warning("could not reclaim inode %d of partition %d yet: %s", ino, part.pid, exc.msg)

    async def reclaim(self, part: MetaPartition, ino: int) -> None:
        node = part.inodes.get(ino)
        if node is None:
            return
        vol_id = part.info["vol_id"]
        for dp, ext in list(node["extents"].values()):
            self.maps.leader(vol_id, dp)  # TRY_AGAIN (kept for the next round) if not placed yet
            # the partition's leader deletes it on every copy
            await self.peers.call(functools.partial(self.maps.leader, vol_id, dp), Op.DATA_DELETE_EXTENT, dp,
                                  {"ext": ext}, deadline=10.0)
        res = await part.evict_inode(ino)
        if not res.get("kept"):
            self.reclaimed += 1
            log.info("reclaimed unlinked inode %d of partition %d (%d extents)", ino, part.pid,
                     len(node["extents"]))
