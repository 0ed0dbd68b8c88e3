"""Volume deletion lifecycle on the master (DESIGN.md §3).

ACTIVE -> PENDING_DELETE (optional delay; writes refused, undeletable)
       -> DELETED: a signed tombstone is issued, pushed to the volume's nodes
          (which push it on to subscribed clients) and served by vol_id for
          the retention period; the partitions are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from shoalfs.common.tasks import BackgroundTask
from shoalfs.master.access import Auth
from shoalfs.master.state import ACTIVE, DELETED, PENDING_DELETE
from shoalfs.proto import tombstone
from shoalfs.proto.errors import Code, ShoalError

if TYPE_CHECKING:
    from shoalfs.master.server import Master

log = logging.getLogger(__name__)

MAX_DELAY = 90 * 24 * 3600.0


class VolumeLifecycle:
    def __init__(self, master: Master) -> None:
        self.m = master
        cfg = master.cfg
        self.key = master.signing_key
        self.public_key = tombstone.public_hex(self.key)
        self.retention = float(cfg.get("tombstone_retention", 7 * 24 * 3600))
        self._background = BackgroundTask(self._loop)
        m = master
        m.add("POST", "/volume/delete", self.delete, Auth.ADMIN)
        m.add("POST", "/volume/undelete", self.undelete, Auth.ADMIN)
        m.add("GET", "/volume/tombstone", self.get_tombstone, Auth.VOLUME)

    # ----- admin calls -------------------------------------------------------
    async def delete(self, request: web.Request) -> Any:
        body = await self.m.body(request)
        delay = body.get("delay_s", 0)
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay <= MAX_DELAY:
            raise ShoalError(Code.BAD_REQUEST, f"delay_s must be 0..{MAX_DELAY:.0f} seconds")
        rid = self.m.request_id(request)
        async with self.m.lock:
            done = self.m.state.made_by(rid, "deleted_by")
            if done is not None:  # a retry of a deletion the master made but could not confirm
                return self.m.describe(done)  # its tombstone included
            vol = self.m.state.by_name(body.get("name"))  # type: ignore[arg-type]
            if delay > 0:
                if vol["status"] == PENDING_DELETE:
                    raise ShoalError(Code.INVALID, f"volume {vol['name']} is already pending deletion")
                if rid:
                    vol["deleted_by"] = rid  # saved with the pending state
                vol["status"] = PENDING_DELETE
                vol["purge_at"] = time.time() + delay
                await self.m.state.save()
                log.info("volume %s pending deletion, purge in %.0fs", vol["name"], delay)
        if delay > 0:
            await self.m.nodes.beat_all()  # nodes refuse writes from now on
            return self.m.describe(vol)
        tomb = await self.purge(vol, rid)
        return dict(self.m.describe(vol), tombstone=tomb)

    async def undelete(self, request: web.Request) -> Any:
        body = await self.m.body(request)
        async with self.m.lock:
            vol = self.m.state.by_name(body.get("name"))  # type: ignore[arg-type]
            if vol["status"] != PENDING_DELETE:
                raise ShoalError(Code.INVALID, f"volume {vol['name']} is not pending deletion")
            vol["status"] = ACTIVE
            vol.pop("purge_at", None)
            vol.pop("deleted_by", None)
            await self.m.state.save()
        await self.m.nodes.beat_all()
        log.info("volume %s restored", vol["name"])
        return self.m.describe(vol)

    async def purge(self, vol: dict[str, Any], request_id: str | None = None) -> dict[str, Any]:
        """Issue the tombstone, persist it (with the id of the request that
        asked, if any), then tell every node."""
        async with self.m.lock:
            if vol["status"] == DELETED:
                return vol["tombstone"]  # type: ignore[no-any-return]
            if request_id:
                vol["deleted_by"] = request_id
            tomb = tombstone.sign(self.key, {"vol_id": vol["vol_id"], "name": vol["name"],
                                             "deleted_at": time.time(), "epoch": self.m.state.next_epoch()})
            vol["status"] = DELETED
            vol["tombstone"] = tomb
            vol["retain_until"] = time.time() + self.retention
            vol.pop("purge_at", None)
            await self.m.state.save()
        log.info("volume %s (%s) deleted, epoch %d", vol["name"], vol["vol_id"], tomb["epoch"])
        await self.m.drop_partitions(vol, {"tombstone": tomb})
        return tomb

    async def get_tombstone(self, request: web.Request) -> Any:
        vol_id = self.m.arg(request, "vol_id")
        self.m.caller(request).check_volume(vol_id)
        self.raise_if_deleted(vol_id)
        vol = self.m.state.by_id(vol_id)
        if vol is None:
            raise ShoalError(Code.VOLUME_NOT_EXIST, "no such volume and no tombstone for it")
        return {"status": vol["status"]}

    def raise_if_deleted(self, vol_id: Any) -> None:
        """VOLUME_NOT_EXIST with the signed tombstone, however long ago the deletion."""
        tomb = self.m.state.tombstone_of(vol_id)
        if tomb is not None:
            raise ShoalError(Code.VOLUME_NOT_EXIST, f"volume {tomb['name']} was deleted", {"tombstone": tomb})

    # ----- background ------------------------------------------------------------
    async def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _loop(self) -> None:
        """Purge pending deletes when due (also after a restart); after the
        retention a deleted volume shrinks to its tombstone (kept for ever)."""
        while True:
            now = time.time()
            for vol in list(self.m.state.volumes.values()):
                if vol["status"] == PENDING_DELETE and vol.get("purge_at", 0) <= now:
                    try:
                        await self.purge(vol)
                    except Exception:
                        log.exception("purge of %s failed; will retry", vol["name"])
                elif vol["status"] == DELETED and vol.get("retain_until", 0) <= now:
                    async with self.m.lock:
                        await self.m.state.remove_volume(vol["vol_id"])
            self.m.sessions.table.expire()
            await asyncio.sleep(0.2)
