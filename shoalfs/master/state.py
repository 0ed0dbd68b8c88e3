"""The master's durable state: nodes, volumes and partition placement.

The leader holds the whole state in memory as one document and keeps it in
etcd as one key per node, volume and tombstone (store.py). `save()` writes
what changed since the last save in one transaction conditional on still
leading, and returns only once etcd has it: a handler saves before it
answers. A failed save leaves memory ahead of etcd, so the leader resigns
(`on_write_failed`) and whoever leads next loads the state from etcd.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from shoalfs.master.store import STATE, EtcdStore, Guard
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import MAX_INO
from shoalfs.replication.view import DEFAULT_REPLICAS, MAX_REPLICAS, View

INODE_RANGE = 1 << 40  # inodes per meta partition
MIN_META_PARTITIONS = 3
MIN_DATA_PARTITIONS = 3
MAX_META_PARTITIONS = (MAX_INO + 1) // INODE_RANGE
SECTIONS = ("nodes", "volumes", "graveyard")  # one etcd key per entry
RETRY_WINDOW = 120.0  # a create's request id is honoured this long: clients retry within their deadline
log = logging.getLogger(__name__)
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


def empty_doc() -> dict[str, Any]:
    return {"next_pid": 1, "epoch": 0, "term_floor": 0, "revoked": {}, **{section: {} for section in SECTIONS}}


def _encode(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def flatten(doc: dict[str, Any]) -> dict[str, bytes]:
    """The document as etcd keys (relative to state/) and values."""
    out = {"meta": _encode({"next_pid": doc["next_pid"], "epoch": doc.get("epoch", 0),
                            "term_floor": doc.get("term_floor", 0)}),
           "revoked": _encode(doc.get("revoked", {}))}
    for section in SECTIONS:
        for name, value in doc.get(section, {}).items():
            out[f"{section}/{name}"] = _encode(value)
    return out


def unflatten(flat: dict[str, bytes]) -> dict[str, Any]:
    doc = empty_doc()
    for name, raw in flat.items():
        value = json.loads(raw)
        section, _, entry = name.partition("/")
        if name == "meta":
            doc["next_pid"], doc["epoch"] = int(value["next_pid"]), int(value.get("epoch", 0))
            doc["term_floor"] = int(value.get("term_floor", 0))
        elif name == "revoked":
            doc["revoked"] = dict(value)
        elif section in SECTIONS and entry:
            doc[section][entry] = value
        else:
            log.warning("ignoring unknown key state/%s in etcd", name)
    return doc


def _view_tail(part: dict[str, Any]) -> list[Any]:
    """A partition's epoch and in-sync members, as the volume map carries them."""
    view = View.of_partition(part)
    return [view.epoch, list(view.in_sync)]


class MasterState:
    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.doc: dict[str, Any] = empty_doc()
        self._saved: dict[str, bytes] = {}  # what etcd holds, as last loaded or written
        self._save_lock = asyncio.Lock()  # one transaction at a time, each diffed after the last
        # set by the master: the condition of a write (raises NOT_LEADER), and what a failed write does
        self.guard: Callable[[], Guard] = lambda: Guard(b"", -1)
        self.on_write_failed: Callable[[str], None] = lambda why: None

    async def load(self, legacy_file: str | None = None) -> None:
        """The state from etcd. `state/meta` marks it initialized and is written
        last: without it, the state of an older master (`legacy_file`) is
        imported (again, if an import was cut short), or a new cluster begins."""
        flat = await self.store.load(STATE)
        if "meta" in flat:
            self.doc = unflatten(flat)
            self._saved = flatten(self.doc)
            return
        self.doc, imported = empty_doc(), False
        if legacy_file and os.path.exists(legacy_file):
            with open(legacy_file) as f:
                self.doc = dict(empty_doc(), **json.load(f))
            imported = True
        self._saved = {k: v for k, v in flat.items()}  # a partial import is overwritten, leftovers deleted
        await self.save()
        if imported and legacy_file:
            os.replace(legacy_file, legacy_file + ".imported")
            log.info("imported %s into etcd (%d volumes)", legacy_file, len(self.volumes))

    def clear(self) -> None:
        """Forget everything (no longer the leader)."""
        self.doc = empty_doc()
        self._saved = {}

    async def save(self) -> None:
        """Write what changed to etcd; NOT_LEADER or UNAVAILABLE if it could not.
        On failure memory is ahead of etcd: the leader resigns."""
        async with self._save_lock:
            flat = flatten(self.doc)
            puts = {k: v for k, v in flat.items() if self._saved.get(k) != v}
            deletes = [k for k in self._saved if k not in flat]
            if not puts and not deletes:
                return
            if "meta" in puts:  # the marker of an initialized state goes last (store.commit keeps order)
                puts["meta"] = puts.pop("meta")
            try:
                written = await self.store.commit({STATE + k: v for k, v in puts.items()},
                                                  [STATE + k for k in deletes], self.guard())
            except ShoalError as exc:
                self.on_write_failed(f"a write to etcd failed: {exc.msg}")
                raise
            if not written:
                self.on_write_failed("another master leads")
                raise ShoalError(Code.NOT_LEADER, "this master lost the leadership; the change was not made",
                                 {"leader": None})
            self._saved = flat

    # ----- nodes ---------------------------------------------------------
    @property
    def nodes(self) -> dict[str, dict[str, Any]]:
        return self.doc["nodes"]  # type: ignore[no-any-return]

    async def register_node(self, role: str, addr: str) -> bool:
        if role not in ("metanode", "datanode"):
            raise ShoalError(Code.BAD_REQUEST, f"unknown role {role!r}")
        if not isinstance(addr, str) or ":" not in addr:
            raise ShoalError(Code.BAD_REQUEST, f"bad node address {addr!r}")
        known = self.nodes.get(addr)
        if known is not None and known["role"] == role:
            return False
        self.nodes[addr] = {"role": role, "addr": addr, "registered_at": time.time()}
        await self.save()
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

    def made_by(self, request_id: str | None, field: str) -> dict[str, Any] | None:
        """The volume a request with this id created or deleted (`field`
        created_by or deleted_by), if any: the master made the change and a
        failover lost its answer."""
        if not request_id:
            return None
        return next((v for v in self.volumes.values() if v.get(field) == request_id
                     and (v["status"] in (PENDING_DELETE, DELETED) if field == "deleted_by" else
                          v["status"] != DELETED and time.time() - v["created_at"] < RETRY_WINDOW)), None)

    def by_name(self, name: str) -> dict[str, Any]:
        for vol in self.volumes.values():
            if vol["name"] == name and vol["status"] != DELETED:
                return vol
        raise ShoalError(Code.VOLUME_NOT_EXIST, f"volume {name!r} does not exist")

    def plan_volume(self, name: str, owner: str, capacity_gib: float, metanodes: list[str],
                    datanodes: list[str], replicas: Any = DEFAULT_REPLICAS) -> dict[str, Any]:
        """A new volume with partitions spread over the given live nodes; each
        partition has `replicas` copies on distinct nodes."""
        validate_volume_name(name)
        if not isinstance(owner, str) or not owner:
            raise ShoalError(Code.BAD_REQUEST, "owner is required")
        if not isinstance(capacity_gib, (int, float)) or capacity_gib <= 0:
            raise ShoalError(Code.BAD_REQUEST, "capacity must be a positive number of GiB")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= MAX_REPLICAS:
            raise ShoalError(Code.BAD_REQUEST, f"replicas must be an integer from 1 to {MAX_REPLICAS}")
        if any(v["name"] == name and v["status"] != DELETED for v in self.volumes.values()):
            raise ShoalError(Code.VOLUME_EXISTS, f"volume {name!r} already exists")
        if not metanodes or not datanodes:
            raise ShoalError(Code.UNAVAILABLE, "no live metanodes or datanodes to place the volume on")
        for role, live in (("metanodes", metanodes), ("datanodes", datanodes)):
            if len(live) < replicas:
                raise ShoalError(Code.UNAVAILABLE, f"{replicas} replicas need {replicas} live {role}; "
                                                   f"{len(live)} are up")
        # rotate the starting node so consecutive volumes spread their load
        shift = len(self.volumes)
        mps, dps = [], []
        # extent ids hold inode numbers below 2^44: at most 16 ranges of 2^40
        for i in range(min(MAX_META_PARTITIONS, max(MIN_META_PARTITIONS, len(metanodes)))):
            start = 1 if i == 0 else i * INODE_RANGE
            members = [metanodes[(i + shift + k) % len(metanodes)] for k in range(replicas)]
            mps.append({"pid": self._next_pid(), "start": start, "end": (i + 1) * INODE_RANGE,
                        "replicas": members, "epoch": 1, "in_sync": members})
        for i in range(max(MIN_DATA_PARTITIONS, len(datanodes))):
            members = [datanodes[(i + shift + k) % len(datanodes)] for k in range(replicas)]
            dps.append({"pid": self._next_pid(), "replicas": members, "epoch": 1, "in_sync": members})
        return {"name": name, "vol_id": str(uuid.uuid4()), "owner": owner, "replicas": replicas,
                "capacity_gib": capacity_gib, "status": ACTIVE, "created_at": time.time(),
                "meta_partitions": mps, "data_partitions": dps}

    def _next_pid(self) -> int:
        pid = int(self.doc["next_pid"])
        self.doc["next_pid"] = pid + 1
        return pid

    async def add_volume(self, vol: dict[str, Any]) -> None:
        self.volumes[vol["vol_id"]] = vol
        await self.save()

    async def remove_volume(self, vol_id: str) -> None:
        """Forget a volume; a deleted one leaves its signed tombstone behind, for
        ever (about 200 bytes), so a mount back after any absence can prove it."""
        vol = self.volumes.pop(vol_id, None)
        if vol is not None and vol.get("tombstone"):
            self.graveyard[vol_id] = vol["tombstone"]
        await self.save()

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
        return {"meta": [[p["pid"], p["start"], p["end"], p["replicas"], *_view_tail(p)]
                         for p in vol["meta_partitions"]],
                "data": [[p["pid"], p["replicas"], *_view_tail(p)] for p in vol["data_partitions"]]}

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
