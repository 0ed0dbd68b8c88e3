"""Where each volume's partitions live, as the master last told this node.

Nodes talk to peers only at addresses from this map (never at one named in
a request), and a metanode accepts an extent only on a data partition of
the inode's own volume. The map is kept on disk so a restarted node serves
before the master's next heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from shoalfs.common.files import atomic_write
from shoalfs.proto.errors import Code, ShoalError

log = logging.getLogger(__name__)


def _is_addr_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(a, str) for a in v)


def _valid(vmap: Any) -> bool:
    if not isinstance(vmap, dict) or not isinstance(vmap.get("meta"), list) or not isinstance(vmap.get("data"), list):
        return False
    # entries may end with the view's epoch and in-sync members (replication/view.py)
    meta_ok = all(isinstance(m, list) and len(m) in (4, 6) and all(isinstance(x, int) for x in m[:3])
                  and _is_addr_list(m[3]) for m in vmap["meta"])
    data_ok = all(isinstance(d, list) and len(d) in (2, 4) and isinstance(d[0], int) and _is_addr_list(d[1])
                  for d in vmap["data"])
    return meta_ok and data_ok


def views_of(vmap: Any) -> list[list[Any]]:
    """The views ([pid, epoch, members, in_sync]) a volume map's entries carry."""
    if not _valid(vmap):
        return []
    return [[m[0], m[4], m[3], m[5]] for m in vmap["meta"] if len(m) == 6] + \
           [[d[0], d[2], d[1], d[3]] for d in vmap["data"] if len(d) == 4]


class VolumeMaps:
    def __init__(self, path: str) -> None:
        self.path = path
        self.maps: dict[str, dict[str, Any]] = {}
        if os.path.exists(path):
            with open(path) as f:
                self.maps = {k: v for k, v in json.load(f).items() if _valid(v)}

    def update(self, maps: Any, hosted: set[str]) -> None:
        """Take the master's maps (all volumes with a partition here, from a
        heartbeat); the map of a hosted volume the master did not list yet (a
        heartbeat racing a create) is kept. Written to disk when it changes."""
        if not isinstance(maps, dict):
            return
        fresh = {k: v for k, v in maps.items() if isinstance(k, str) and _valid(v)}
        fresh.update({k: v for k, v in self.maps.items() if k in hosted and k not in fresh})
        self._save(fresh)

    def add(self, vol_id: str, vmap: Any) -> None:
        """The map of a volume a partition is being created for."""
        if _valid(vmap):
            self._save(dict(self.maps, **{vol_id: vmap}))

    def _save(self, fresh: dict[str, dict[str, Any]]) -> None:
        if fresh == self.maps:
            return
        self.maps = fresh
        try:
            atomic_write(self.path, json.dumps(fresh).encode())
        except OSError as exc:  # kept in memory; written with the next change
            log.warning("cannot save the volume map: %s", exc)

    def data_partitions(self, vol_id: str) -> set[int] | None:
        vmap = self.maps.get(vol_id)
        return None if vmap is None else {d[0] for d in vmap["data"]}

    def leader(self, vol_id: str, pid: int) -> str:
        """Where to ask partition `pid` of the volume now: its leader, first in
        the map (read on every attempt, so a retry follows a failover)."""
        vmap = self.maps.get(vol_id) or {}
        found = [m[3] for m in vmap.get("meta", []) if m[0] == pid] + \
                [d[1] for d in vmap.get("data", []) if d[0] == pid]
        if found and found[0]:
            return str(found[0][0])
        raise ShoalError(Code.TRY_AGAIN, f"no placement known for partition {pid} of volume {vol_id}")

    def meta_partitions(self, vol_id: str) -> list[tuple[int, int, int, list[str]]]:
        """(pid, start, end, replicas) of each of the volume's meta partitions."""
        return [(pid, start, end, list(replicas))
                for pid, start, end, replicas, *_view in (self.maps.get(vol_id) or {}).get("meta", [])]

    def meta_partition(self, vol_id: str, pid: int) -> tuple[int, int, list[str]] | None:
        """(start, end, replicas) of one of the volume's meta partitions."""
        return next(((start, end, replicas) for m_pid, start, end, replicas in self.meta_partitions(vol_id)
                     if m_pid == pid), None)
