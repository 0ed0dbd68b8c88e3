"""Directory quotas from the operator's side: `shoal quota set|list|delete`.

The master keeps each quota (its directory, limits and id) and sums what
counts toward it; the inodes carry which quotas they count toward. Setting
a quota on a directory that already holds files therefore walks its
subtree once and tags every inode (a directory before its entries, so
anything created meanwhile under a tagged directory inherits the tag).
"""

from __future__ import annotations

import stat
from typing import Any

from shoalfs.client.core import VolumeClient, split_path
from shoalfs.common.master_client import MasterClient
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.layout import ROOT_INO, normal_path
from shoalfs.proto.opcodes import Op


async def resolve_dir(client: VolumeClient, path: str) -> dict[str, Any]:
    """The attributes of the directory at `path` (no symlinks followed)."""
    attr = await client.getattr(ROOT_INO)
    for name in split_path(path):
        if not stat.S_ISDIR(attr["mode"]):
            raise ShoalError(Code.NOT_DIR, f"{path}: {name!r} is under a non-directory")
        attr = await client.lookup_attr(attr["ino"], name)
    if not stat.S_ISDIR(attr["mode"]):
        raise ShoalError(Code.NOT_DIR, f"{path} is not a directory")
    return attr


async def tag_subtree(client: VolumeClient, top: int, qid: int, add: bool = True) -> int:
    """Tag (or untag) every inode under directory `top`, itself included;
    returns how many were visited."""
    seen: set[int] = set()
    dirs = [top]
    while dirs:
        ino = dirs.pop()
        await client.meta(ino, Op.META_TAG_QUOTA, {"ino": ino, "qid": qid, "add": add})
        seen.add(ino)
        async for _, child, mode in client.iterdir(ino):
            if stat.S_ISDIR(mode):
                dirs.append(child)
            elif child not in seen:  # a file with several names is tagged once
                seen.add(child)
                await client.meta(child, Op.META_TAG_QUOTA, {"ino": child, "qid": qid, "add": add})
    return len(seen)


async def set_quota(client: VolumeClient, admin: MasterClient, path: str, max_bytes: int,
                    max_inodes: int) -> dict[str, Any]:
    """Record the quota at the master (`admin`: a master client with the
    admin token), then tag the directory's subtree."""
    attr = await resolve_dir(client, path)
    quota: dict[str, Any] = await admin.request("POST", "/quota/set", body={
        "volume": client.volume_name, "path": path, "ino": attr["ino"], "max_bytes": max_bytes,
        "max_inodes": max_inodes})
    quota["tagged"] = await tag_subtree(client, attr["ino"], quota["qid"])
    return quota


async def delete_quota(client: VolumeClient, admin: MasterClient, path: str) -> dict[str, Any]:
    """Untag the directory's subtree, then drop the quota at the master."""
    quotas = await admin.request("GET", "/quota/list", {"volume": client.volume_name})
    found = next((q for q in quotas if q["path"] == normal_path(path)), None)
    if found is None:
        raise ShoalError(Code.NOT_FOUND, f"no quota on {path!r}")
    untagged = 0
    try:
        attr = await resolve_dir(client, found["path"])
        if attr["ino"] == found["ino"]:  # (a directory renamed since keeps its tags: they count toward nothing)
            untagged = await tag_subtree(client, attr["ino"], found["qid"], add=False)
    except ShoalError as exc:
        if exc.code not in (Code.NOT_FOUND, Code.NOT_DIR):
            raise
    res: dict[str, Any] = await admin.request("POST", "/quota/delete",
                                              body={"volume": client.volume_name, "path": found["path"]})
    return dict(res, untagged=untagged)
