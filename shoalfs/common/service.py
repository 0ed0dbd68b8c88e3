"""What every node process shares: config, the RPC server, registration with
the master, and an explicit start/stop life cycle."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import Any

import aiohttp

from shoalfs.common.limits import raise_nofile_limit, server_limits
from shoalfs.common.tombstones import TombstoneStore
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.proto.rpc import split_addr
from shoalfs.proto.schema import ListOf, Map, Opt, Schema, Str
from shoalfs.proto.server import RpcServer

log = logging.getLogger(__name__)

# Schemas of the master's commands, the same on every node. An absent token
# passes the schema so that check_master refuses it as UNAUTHORIZED.
TOKEN = Opt(Str(1024), "")
MASTER_STATE: Schema = {"token": TOKEN, "read_only": Opt(ListOf(Str(64), 1_000_000), []), "volumes": Opt(Map, {})}
DELETE_PARTITION: Schema = {"token": TOKEN, "tombstone": Opt(Map)}
NEW_PARTITION: Schema = {"token": TOKEN, "vol_id": Str(64), "replicas": Opt(ListOf(Str(256), 16), []),
                         "volume": Opt(Map)}


def load_config(path: str, required: tuple[str, ...]) -> dict[str, Any]:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"shoal: cannot read config {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"shoal: config {path} must be a JSON object")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise SystemExit(f"shoal: config {path} lacks {', '.join(missing)}")
    return cfg


def read_secret(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def install_loop_policy() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at runtime
        pass


class NodeService:
    """Base of metanode and datanode."""

    role = "node"

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.listen: str = cfg["listen"]
        self.data_dir: str = cfg["data_dir"]
        self.master: str = cfg["master"]
        self.token = read_secret(cfg["token_file"])
        try:
            limits = server_limits(cfg)
        except ValueError as exc:
            raise SystemExit(f"shoal: config: {exc}") from None
        self.rpc = RpcServer(f"{self.role}@{self.listen}", limits)
        self.rpc.route(Op.PING, self._ping)
        self._stop = asyncio.Event()
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.tombstones = TombstoneStore(os.path.join(self.data_dir, "tombstones.json"))
        self.read_only: set[str] = set()  # vol_ids pending deletion: mutations refused

    def apply_master_state(self, body: dict[str, Any]) -> None:
        """Volume states the master sends with each heartbeat."""
        ro = body.get("read_only")
        if isinstance(ro, list):
            self.read_only = {v for v in ro if isinstance(v, str)}

    def check_writable(self, vol_id: str) -> None:
        if vol_id in self.read_only:
            raise ShoalError(Code.READ_ONLY, "volume is pending deletion: read-only")

    async def _ping(self, pid: int, body: Any, conn: Any) -> Any:
        return {"role": self.role, "addr": self.listen}

    def check_master(self, body: Any) -> None:
        """Partition placement commands come only from the master."""
        if not isinstance(body, dict) or body.get("token") != self.token:
            raise ShoalError(Code.UNAUTHORIZED, "placement commands need the cluster token")

    async def open(self) -> None:
        """Load local state (subclasses)."""

    async def close(self) -> None:
        """Flush and release local state (subclasses)."""

    async def register(self) -> None:
        """Tell the master we exist; retried until it answers (it may start later)."""
        url = f"http://{self.master}/node/register"
        delay = 0.1
        while not self._stop.is_set():
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.post(url, json={"role": self.role, "addr": self.listen},
                                      headers={"Authorization": f"Bearer {self.token}"},
                                      timeout=aiohttp.ClientTimeout(total=5)) as r:
                        env = await r.json()
                if env.get("code") == 0:
                    log.info("registered with master %s", self.master)
                    return
                log.error("master refused registration: %s", env.get("msg"))
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                log.info("master %s not reachable yet (%r)", self.master, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def run(self) -> None:
        raise_nofile_limit()
        await self.open()
        host, port = split_addr(self.listen)
        await self.rpc.start(host, port)
        log.info("%s serving on %s", self.role, self.listen)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        reg = asyncio.create_task(self.register())
        await self._stop.wait()
        log.info("%s stopping", self.role)
        reg.cancel()
        await self.rpc.stop()
        await self.close()
