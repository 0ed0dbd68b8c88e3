"""A mount that leaves cleanly when its volume is deleted (DESIGN.md §4).

On a verified tombstone, bounded by a watchdog that forces the exit if any
step hangs:
  1. fence: every new and pending operation fails with ESTALE;
  2. close streams: fail buffered writes (their fsync/close report ESTALE),
     stop the guard, close every connection;
  3. drop every cache;
  4. unmount lazily: no new path reaches the volume;
  5. linger: files still open keep getting ESTALE (never the kernel's
     ENOTCONN) until they are closed or `linger` seconds pass;
  6. audit: RFC 5424 syslog record, JSON line in the audit log, sd_notify
     (with how long it lingered and how many files were open);
  7. exit with the deleted-exit-code (143 by default).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

from shoalfs.client import audit
from shoalfs.client.lifecycle import ALL_PATHS, PUSH, GuardConfig, LifecycleGuard
from shoalfs.client.mount import MountError, MountOptions, MountSession, is_mounted, lazy_unmount
from shoalfs.common.sdnotify import sd_notify
from shoalfs.proto.errors import Code, ShoalError

log = logging.getLogger(__name__)

EXIT_DELETED = 143
LINGER = 5.0  # seconds files still open keep getting ESTALE after a deletion


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DeletionAwareMount(MountSession):
    def __init__(self, opts: MountOptions, ready_fd: int | None = None) -> None:
        super().__init__(opts, ready_fd)
        x = opts.extra
        try:
            self.deleted_exit_code = int(x.get("deleted_exit_code", EXIT_DELETED))
            self.watchdog_s = float(x.get("watchdog", 5.0))
            self.linger_s = float(x.get("linger", LINGER))
            paths = GuardConfig.parse_paths(x["detect"]) if "detect" in x else ALL_PATHS
            if x.get("push") in ("0", "no", "off"):
                paths = tuple(p for p in paths if p != PUSH)
            self.guard_config = GuardConfig(paths=paths, heartbeat_interval=float(x.get("heartbeat", 5.0)))
        except ValueError as exc:
            raise MountError(f"bad lifecycle option: {exc}") from None
        if not 0 <= self.deleted_exit_code <= 255:
            raise MountError("deleted_exit_code must be 0..255")
        if not 0 <= self.linger_s <= 3600:
            raise MountError("linger must be 0..3600 seconds")
        self.audit_log = x.get("audit_log") or audit.default_audit_log()
        self.syslog = x.get("syslog") or ("unix:/dev/log" if os.path.exists("/dev/log") else "off")
        self.guard: LifecycleGuard | None = None
        self.deletion: dict[str, Any] | None = None
        self.record: dict[str, Any] | None = None
        self._watchdog: threading.Timer | None = None
        self._exiting: asyncio.Task[None] | None = None

    async def on_mounted(self) -> None:
        assert self.client is not None
        self.guard_config.session_info = {"mountpoint": self.opts.mountpoint, "mounted_at": self.mounted_at}
        self.guard = LifecycleGuard(self.client, self.guard_config, self.on_deleted)
        await self.guard.start()
        sd_notify("READY=1", f"STATUS=mounted volume {self.opts.volume} on {self.opts.mountpoint}")

    # ----- detection -------------------------------------------------------------
    def on_deleted(self, tomb: dict[str, Any], path: str) -> None:
        if self.deletion is not None:
            return
        self.deletion = {"tomb": tomb, "path": path, "detected_at": time.time(), "t0": time.monotonic()}
        if self.client is not None and self.client.metrics is not None:
            self.client.metrics.event(f"deletion_detected_by_{path}")
        self._watchdog = threading.Timer(self.watchdog_s + self.linger_s, self._force_exit)
        self._watchdog.daemon = True
        self._watchdog.start()
        self._exiting = asyncio.get_running_loop().create_task(self.graceful_exit())

    async def graceful_exit(self) -> None:
        assert self.deletion is not None and self.client is not None
        gone = ShoalError(Code.VOLUME_NOT_EXIST, f"volume {self.opts.volume} was deleted")
        # 1. fence
        self.client.fenced = True  # the FUSE layer and the core both check this one flag
        # 2. close streams
        for handle in list(self.ops.handles.values()):
            handle.fail(gone)
        if self.guard is not None:
            await self.guard.stop(goodbye=False)
        await self.client.pool.close()
        await self.client.master.close()
        # 3. caches
        self.ops.drop_caches()
        # 4. unmount lazily: open files keep the FUSE session, and we keep answering them
        self.deletion["open_files"] = open_files = len(self.ops.handles)
        if is_mounted(self.opts.mountpoint):
            lazy_unmount(self.opts.mountpoint)
        # 5. linger until the last of them is closed, or linger seconds
        t = time.monotonic()
        if open_files and self.linger_s > 0:
            log.warning("volume deleted: %d files still open get ESTALE for up to %.1fs", open_files, self.linger_s)
            # until the files are closed, or the kernel ends the session (after
            # the last close on the detached mount: no file can be open then)
            while self.ops.handles and not self._stop.is_set() and time.monotonic() - t < self.linger_s:
                await asyncio.sleep(0.02)
        self.deletion["lingered"] = time.monotonic() - t
        # 6. audit
        self.write_audit(forced=False)
        # 7. the normal stop path finishes the unmount and returns the exit code
        self.request_stop("volume deleted", self.deleted_exit_code)

    def request_stop(self, reason: str, code: int = 0) -> None:
        # once deleted, whatever ends the session (the kernel ending it after the
        # last close, a signal) ends it with the deleted-exit-code
        super().request_stop(reason, self.deleted_exit_code if self.deletion is not None else code)

    def build_record(self, forced: bool) -> dict[str, Any]:
        assert self.deletion is not None
        tomb, detected = self.deletion["tomb"], self.deletion["detected_at"]
        return {
            "event": "volume_deleted", "volume": tomb["name"], "vol_id": tomb["vol_id"],
            "mountpoint": self.opts.mountpoint, "detection": self.deletion["path"],
            "deleted_at": _iso(tomb["deleted_at"]), "detected_at": _iso(detected),
            "detection_latency_ms": round(max(0.0, detected - tomb["deleted_at"]) * 1000, 1),
            "exit_duration_ms": round((time.monotonic() - self.deletion["t0"]) * 1000, 1),
            "epoch": tomb["epoch"], "exit_code": self.deleted_exit_code, "pid": os.getpid(),
            "forced_by_watchdog": forced,
            "open_files": self.deletion.get("open_files", 0),
            "lingered_ms": round(self.deletion.get("lingered", 0.0) * 1000, 1),
        }

    def write_audit(self, forced: bool) -> None:
        if self.record is not None:
            return
        self.record = record = self.build_record(forced)
        audit.send_syslog(record, self.syslog)
        audit.append_json(record, self.audit_log)
        sd_notify(f"STATUS=volume {record['volume']} deleted; exiting {self.deleted_exit_code}", "STOPPING=1")
        log.warning("audit: %s", record)

    def _force_exit(self) -> None:
        """Watchdog thread: a step hung; leave anyway, without a dead mount."""
        log.error("graceful exit did not finish in %.1fs; forcing it", self.watchdog_s)
        try:
            self.write_audit(forced=True)
        except Exception:
            log.exception("audit under the watchdog failed")
        if is_mounted(self.opts.mountpoint):
            lazy_unmount(self.opts.mountpoint)
        os._exit(self.deleted_exit_code)

    # ----- stop ----------------------------------------------------------------------
    async def before_unmount(self) -> None:
        if self.deletion is None:
            await super().before_unmount()

    async def shutdown(self, fuse_main: asyncio.Future[Any]) -> None:
        if self._exiting is not None:
            # the kernel may end the session first (the last open file closed on
            # the detached mount): the exit still finishes, audit record included
            await asyncio.gather(self._exiting, return_exceptions=True)
        if self.guard is not None and self.deletion is None:
            await self.guard.stop()
        await super().shutdown(fuse_main)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.deletion is not None:
            total = (time.monotonic() - self.deletion["t0"]) * 1000
            log.warning("left %s %.0f ms after detecting the deletion; exit %d",
                        self.opts.mountpoint, total, self.deleted_exit_code)
