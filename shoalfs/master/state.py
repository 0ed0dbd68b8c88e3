"""The master's durable state: nodes, volumes and partition placement.

The whole state is one small JSON document rewritten atomically on every
change (volumes and nodes number in the thousands at most, so this stays
cheap and is trivially crash-safe).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from shoalfs.common.files import atomic_write
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import MAX_INO

INODE_RANGE = 1 << 40  # inodes per meta partition
MIN_META_PARTITIONS = 3
MIN_DATA_PARTITIONS = 3
MAX_META_PARTITIONS = (MAX_INO + 1) // INODE_RANGE
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

ACTIVE = "ACTIVE"
PENDING_DELETE = "PENDING_DELETE"
DELETED = "DELETED"


def validate_volume_name(name: Any) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 63 or not set(name) <= NAME_CHARS \
            or name[0] in "-.":
        raise ShoalError(Code.BAD_REQUEST,
                         "volume name must be 1-63 characters of letters, digits, '-', '_' or '.'")
    return name


class MasterState:
    def __init__(self, path: str) -> None:
        self.path = path
        self.doc: dict[str, Any] = {"next_pid": 1, "nodes": {}, "volumes": {}}
        if os.path.exists(path):
            with open(path) as f:
                self.doc = json.load(f)

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.doc, indent=1, sort_keys=True).encode())

    # ----- nodes ---------------------------------------------------------
    @property
    def nodes(self) -> dict[str, dict[str, Any]]:
        return self.doc["nodes"]  # type: ignore[no-any-return]

    def register_node(self, role: str, addr: str) -> bool:
        if role not in ("metanode", "datanode"):
            raise ShoalError(Code.BAD_REQUEST, f"unknown role {role!r}")
        if not isinstance(addr, str) or ":" not in addr:
            raise ShoalError(Code.BAD_REQUEST, f"bad node address {addr!r}")
        known = self.nodes.get(addr)
        if known is not None and known["role"] == role:
            return False
        self.nodes[addr] = {"role": role, "addr": addr, "registered_at": time.time()}
        self.save()
        return True

    # ----- volumes -------------------------------------------------------
    @property
    def volumes(self) -> dict[str, dict[str, Any]]:
        return self.doc["volumes"]  # type: ignore[no-any-return]

    def by_id(self, vol_id: str) -> dict[str, Any] | None:
        return self.volumes.get(vol_id) if isinstance(vol_id, str) else None

    def next_epoch(self) -> int:
        epoch = int(self.doc.get("epoch", 0)) + 1
        self.doc["epoch"] = epoch
        return epoch

    def read_only_volumes(self) -> list[str]:
        return sorted(v["vol_id"] for v in self.volumes.values() if v["status"] == PENDING_DELETE)

    def tombstone_of_partition(self, pid: int) -> dict[str, Any] | None:
        for vol in self.volumes.values():
            if vol["status"] == DELETED and any(
                    p["pid"] == pid for p in vol["meta_partitions"] + vol["data_partitions"]):
                return vol.get("tombstone")  # type: ignore[no-any-return]
        return None

    def by_name(self, name: str) -> dict[str, Any]:
        for vol in self.volumes.values():
            if vol["name"] == name and vol["status"] != DELETED:
                return vol
        raise ShoalError(Code.VOLUME_NOT_EXIST, f"volume {name!r} does not exist")

    def plan_volume(self, name: str, owner: str, capacity_gib: float, metanodes: list[str],
                    datanodes: list[str]) -> dict[str, Any]:
        """A new volume with partitions spread over the given live nodes."""
        validate_volume_name(name)
        if not isinstance(owner, str) or not owner:
            raise ShoalError(Code.BAD_REQUEST, "owner is required")
        if not isinstance(capacity_gib, (int, float)) or capacity_gib <= 0:
            raise ShoalError(Code.BAD_REQUEST, "capacity must be a positive number of GiB")
        if any(v["name"] == name and v["status"] != DELETED for v in self.volumes.values()):
            raise ShoalError(Code.VOLUME_EXISTS, f"volume {name!r} already exists")
        if not metanodes or not datanodes:
            raise ShoalError(Code.UNAVAILABLE, "no live metanodes or datanodes to place the volume on")
        # rotate the starting node so consecutive volumes spread their load
        shift = len(self.volumes)
        mps, dps = [], []
        # extent ids hold inode numbers below 2^44: at most 16 ranges of 2^40
        for i in range(min(MAX_META_PARTITIONS, max(MIN_META_PARTITIONS, len(metanodes)))):
            start = 1 if i == 0 else i * INODE_RANGE
            mps.append({"pid": self._next_pid(), "start": start, "end": (i + 1) * INODE_RANGE,
                        "replicas": [metanodes[(i + shift) % len(metanodes)]]})
        for i in range(max(MIN_DATA_PARTITIONS, len(datanodes))):
            dps.append({"pid": self._next_pid(), "replicas": [datanodes[(i + shift) % len(datanodes)]]})
        return {"name": name, "vol_id": str(uuid.uuid4()), "owner": owner,
                "capacity_gib": capacity_gib, "status": ACTIVE, "created_at": time.time(),
                "meta_partitions": mps, "data_partitions": dps}

    def _next_pid(self) -> int:
        pid = int(self.doc["next_pid"])
        self.doc["next_pid"] = pid + 1
        return pid

    def add_volume(self, vol: dict[str, Any]) -> None:
        self.volumes[vol["vol_id"]] = vol
        self.save()

    def remove_volume(self, vol_id: str) -> None:
        """Forget a volume; a deleted one leaves its signed tombstone behind, for
        ever (about 200 bytes), so a mount back after any absence can prove it."""
        vol = self.volumes.pop(vol_id, None)
        if vol is not None and vol.get("tombstone"):
            self.graveyard[vol_id] = vol["tombstone"]
        self.save()

    @property
    def graveyard(self) -> dict[str, dict[str, Any]]:
        return self.doc.setdefault("graveyard", {})  # type: ignore[no-any-return]

    def tombstone_of(self, vol_id: Any) -> dict[str, Any] | None:
        """The signed tombstone of a deleted volume, however long ago; None if
        the vol_id is live or was never known here."""
        vol = self.by_id(vol_id)
        if vol is not None:
            return vol.get("tombstone") if vol["status"] == DELETED else None
        return self.graveyard.get(vol_id) if isinstance(vol_id, str) else None

    @staticmethod
    def volume_map(vol: dict[str, Any]) -> dict[str, Any]:
        """Where a volume's partitions live, as nodes need it: a metanode talks
        only to addresses from here, never to one named in a request."""
        return {"meta": [[p["pid"], p["start"], p["end"], p["replicas"]] for p in vol["meta_partitions"]],
                "data": [[p["pid"], p["replicas"]] for p in vol["data_partitions"]]}

    def placements(self) -> dict[str, dict[int, tuple[str, dict[str, Any], dict[str, Any]]]]:
        """node addr -> pid -> (kind, partition, volume) for live volumes."""
        out: dict[str, dict[int, tuple[str, dict[str, Any], dict[str, Any]]]] = {}
        for vol in self.volumes.values():
            if vol["status"] == DELETED:
                continue
            for kind, key in (("meta", "meta_partitions"), ("data", "data_partitions")):
                for part in vol[key]:
                    for addr in part["replicas"]:
                        out.setdefault(addr, {})[part["pid"]] = (kind, part, vol)
        return out
