"""What a node remembers about deleted volumes: their tombstones and which
partitions they had, so any later request for them is answered with
VOLUME_NOT_EXIST and the tombstone (DESIGN.md §3, detection path 3)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from shoalfs.common.files import atomic_write
from shoalfs.proto.errors import Code, ShoalError

RETENTION = 7 * 24 * 3600.0


class TombstoneStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self.tombstones: dict[str, dict[str, Any]] = {}
        self.partitions: dict[int, str] = {}  # pid -> vol_id of a deleted volume
        if os.path.exists(path):
            with open(path) as f:
                doc = json.load(f)
            self.tombstones = doc.get("tombstones", {})
            self.partitions = {int(k): v for k, v in doc.get("partitions", {}).items()}
        self._forget_old()

    def _forget_old(self) -> None:
        cutoff = time.time() - RETENTION
        gone = {v for v, t in self.tombstones.items() if t.get("deleted_at", 0) < cutoff}
        for vol_id in gone:
            del self.tombstones[vol_id]
        self.partitions = {p: v for p, v in self.partitions.items() if v not in gone}

    def add(self, pid: int, tomb: Any) -> bool:
        """Remember a tombstone (as given; clients verify it). False if malformed."""
        if not isinstance(tomb, dict) or not isinstance(tomb.get("vol_id"), str):
            return False
        self.tombstones[tomb["vol_id"]] = tomb
        self.partitions[pid] = tomb["vol_id"]
        self._forget_old()
        atomic_write(self.path, json.dumps({"tombstones": self.tombstones,
                                            "partitions": self.partitions}).encode())
        return True

    def for_volume(self, vol_id: str) -> dict[str, Any] | None:
        return self.tombstones.get(vol_id)

    def missing_partition(self, pid: int, where: str) -> ShoalError:
        """The error for a request on a partition this node does not hold."""
        vol_id = self.partitions.get(pid)
        if vol_id is not None and vol_id in self.tombstones:
            return ShoalError(Code.VOLUME_NOT_EXIST, f"partition {pid} belonged to a deleted volume",
                              {"tombstone": self.tombstones[vol_id]})
        return ShoalError(Code.PARTITION_NOT_EXIST, f"partition {pid} is not on {where}")
