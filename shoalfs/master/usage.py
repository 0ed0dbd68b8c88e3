"""A volume's usage and limits, as the master sums them (issue 15).

Each metanode reports, per partition, its inodes and allocated bytes
(metanode/usage.py); each datanode the bytes its copy of a partition holds
on disk. A volume's used bytes and inodes are the sums over its meta
partitions (one report per partition, the leader's when it has one:
logical bytes, counted once however many replicas); its raw bytes the sum
over every copy of every data partition. Each heartbeat round sends the
metanodes every volume's limits with those sums, and they refuse a change
that would go past them.
"""

from __future__ import annotations

from typing import Any

from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import VOLUME_BUCKET, normal_path

GIB = 1 << 30
MAX_INODE_LIMIT = 1 << 40

Reports = dict[str, dict[str, Any]]  # node addr -> its last heartbeat answer


def _report(reports: Reports, addr: str, pid: int) -> dict[str, Any] | None:
    held = reports.get(addr, {}).get("partitions", {})
    found = held.get(pid, held.get(str(pid)))
    return found if isinstance(found, dict) else None


def _part_counts(found: dict[str, Any]) -> dict[str, list[int]]:
    """bucket -> [bytes, inodes] of one partition's report."""
    counts = found.get("usage")
    if isinstance(counts, dict):
        return {str(b): [int(v[0]), int(v[1])] for b, v in counts.items()}
    return {VOLUME_BUCKET: [int(found.get("bytes", 0)), int(found.get("inodes", 0))]}


def bucket_sums(vol: dict[str, Any], reports: Reports) -> dict[str, dict[str, Any]]:
    """bucket -> {used, inodes, parts: {pid: [bytes, inodes]}} over the
    volume's meta partitions (each from one report: its leader's if it has one)."""
    out: dict[str, dict[str, Any]] = {VOLUME_BUCKET: {"used": 0, "inodes": 0, "parts": {}}}
    for part in vol["meta_partitions"]:
        found = next((r for r in (_report(reports, a, part["pid"]) for a in part["replicas"]) if r), None)
        if found is None:
            # no report yet (a new partition, or a master that just took over): left out of
            # "parts", so a metanode holding it counts it as it is now, not as 0
            continue
        for bucket, (b, n) in _part_counts(found).items():
            entry = out.setdefault(bucket, {"used": 0, "inodes": 0, "parts": {}})
            entry["used"] += b
            entry["inodes"] += n
            entry["parts"][part["pid"]] = [b, n]
    return out


def volume_usage(vol: dict[str, Any], reports: Reports) -> dict[str, Any]:
    """capacity_bytes, inode_limit (0: none), used_bytes, inodes and raw_bytes."""
    total = bucket_sums(vol, reports)[VOLUME_BUCKET]
    raw = sum(int((_report(reports, addr, part["pid"]) or {}).get("used", 0))
              for part in vol["data_partitions"] for addr in part["replicas"])
    return {"capacity_bytes": int(vol["capacity_gib"] * GIB), "inode_limit": int(vol.get("inode_limit", 0)),
            "used_bytes": total["used"], "inodes": total["inodes"], "raw_bytes": raw}


def limits_state(volumes: list[dict[str, Any]], reports: Reports) -> dict[str, Any]:
    """What every metanode hears each round: vol_id -> bucket -> limits
    (0: none) and the sums the master saw (metanode/usage.py)."""
    out = {}
    for vol in volumes:
        sums = bucket_sums(vol, reports)
        empty = {"used": 0, "inodes": 0, "parts": {}}
        buckets = {VOLUME_BUCKET: dict(sums[VOLUME_BUCKET], max_bytes=int(vol["capacity_gib"] * GIB),
                                max_inodes=int(vol.get("inode_limit", 0)))}
        for qid, quota in vol.get("quotas", {}).items():
            buckets[f"q{qid}"] = dict(sums.get(f"q{qid}", empty), max_bytes=quota["max_bytes"],
                                      max_inodes=quota["max_inodes"])
        out[vol["vol_id"]] = buckets
    return out


def set_limits(vol: dict[str, Any], body: dict[str, Any]) -> None:
    """`shoal volume set`: a new capacity (GiB) and/or inode limit (0: none).
    Shrinking below what the volume holds is allowed: it only refuses growth."""
    capacity, inodes = body.get("capacity_gib"), body.get("inode_limit")
    if capacity is None and inodes is None:
        raise ShoalError(Code.BAD_REQUEST, "nothing to set: give capacity_gib and/or inode_limit")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, (int, float))
                                 or not 0 < capacity <= 1 << 30):
        raise ShoalError(Code.BAD_REQUEST, "capacity_gib must be a positive number of GiB")
    _check_count(inodes, "inode_limit")
    if capacity is not None:
        vol["capacity_gib"] = capacity
    if inodes is not None:
        vol["inode_limit"] = inodes


def _check_count(value: Any, what: str, top: int = MAX_INODE_LIMIT) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top):
        raise ShoalError(Code.BAD_REQUEST, f"{what} must be an integer from 0 (none) to {top}")


# ----- directory quotas ---------------------------------------------------------
def set_quota(vol: dict[str, Any], body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A quota on a directory (path and inode, as the caller resolved them),
    or new limits for the one it has; (qid, quota). The caller then tags the
    directory's subtree (`shoal quota set` does)."""
    path, ino = quota_path(body.get("path")), body.get("ino")
    if isinstance(ino, bool) or not isinstance(ino, int) or ino < 1:
        raise ShoalError(Code.BAD_REQUEST, "ino must be the directory's inode number")
    max_bytes, max_inodes = body.get("max_bytes", 0), body.get("max_inodes", 0)
    _check_count(max_bytes, "max_bytes", 1 << 62)
    _check_count(max_inodes, "max_inodes")
    quotas = vol.setdefault("quotas", {})
    qid = next((int(q) for q, v in quotas.items() if v["ino"] == ino), None)
    if qid is None:
        qid = int(vol.get("next_qid", 1))
        vol["next_qid"] = qid + 1
    quotas[str(qid)] = {"path": path, "ino": ino, "max_bytes": max_bytes, "max_inodes": max_inodes}
    return qid, quotas[str(qid)]


def delete_quota(vol: dict[str, Any], path: Any) -> None:
    """Drop a directory's quota (`shoal quota delete` untags the subtree
    first; a tag left behind counts toward nothing)."""
    path = quota_path(path)
    quotas = vol.get("quotas", {})
    qid = next((q for q, v in quotas.items() if v["path"] == path), None)
    if qid is None:
        raise ShoalError(Code.NOT_FOUND, f"no quota on {path!r}")
    del quotas[qid]


def quota_path(path: Any) -> str:
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 4096:
        raise ShoalError(Code.BAD_REQUEST, "path must be an absolute path in the volume")
    return normal_path(path)


def quota_list(vol: dict[str, Any], reports: Reports) -> list[dict[str, Any]]:
    sums = bucket_sums(vol, reports)
    return [dict(quota, qid=int(qid), used_bytes=sums.get(f"q{qid}", {}).get("used", 0),
                 inodes=sums.get(f"q{qid}", {}).get("inodes", 0))
            for qid, quota in sorted(vol.get("quotas", {}).items(), key=lambda kv: kv[1]["path"])]
