"""What every node process shares: config, the RPC server, registration with
the master, and an explicit start/stop life cycle."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shoalfs.common.files import atomic_write
from shoalfs.common.limits import raise_nofile_limit, server_limits
from shoalfs.common.master_client import MasterClient
from shoalfs.common.metrics import Metrics
from shoalfs.common.tls import TlsConfigError, client_context, server_context
from shoalfs.common.tombstones import TombstoneStore
from shoalfs.proto import capability, tombstone
from shoalfs.proto.capability import MAX_TOKEN, Access, Capability
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.proto.rpc import split_addr
from shoalfs.proto.schema import I64_MAX, Int, ListOf, Map, Opt, Schema, Str
from shoalfs.proto.server import RpcServer, ServerConnection

log = logging.getLogger(__name__)

# Schemas of the master's commands, the same on every node (the connection's
# capability, not a field, proves they come from the master).
IDS = ListOf(Str(64), 1_000_000)  # vol_ids, key ids
MASTER_STATE: Schema = {"read_only": Opt(IDS, []), "volumes": Opt(Map, {}), "revoked": Opt(IDS, []),
                        "node_cap": Opt(Str(MAX_TOKEN)), "limits": Opt(Map, {})}
DELETE_PARTITION: Schema = {"tombstone": Opt(Map)}
NEW_PARTITION: Schema = {"vol_id": Str(64), "replicas": Opt(ListOf(Str(256), 16), []), "volume": Opt(Map),
                         "epoch": Opt(Int(1, I64_MAX), 1), "in_sync": Opt(ListOf(Str(256), 16), [])}


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


class Partition(Protocol):
    @property
    def info(self) -> dict[str, Any]:
        """pid, vol_id, replicas, ..."""


class NodeService:
    """Base of metanode and datanode."""

    role = "node"
    partitions: Mapping[int, Partition]

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.listen: str = cfg["listen"]
        self.data_dir: str = cfg["data_dir"]
        self.master: str = cfg["master"]
        self.token = read_secret(cfg["token_file"])  # the node credential: registers with the master
        try:
            limits = server_limits(cfg)
        except ValueError as exc:
            raise SystemExit(f"shoal: config: {exc}") from None
        try:
            self.tls_server = server_context(cfg)
            self.tls_client = client_context(cfg.get("tls_ca"))
        except TlsConfigError as exc:
            raise SystemExit(f"shoal: config: {exc}") from None
        self.master_api = MasterClient(self.master, self.token, tls=self.tls_client)
        self.rpc = RpcServer(f"{self.role}@{self.listen}", limits)
        self.rpc.authorize = self.authorize
        self.metrics = Metrics(self.role)
        self.metrics_addr: str | None = cfg.get("metrics") or None  # HOST:PORT; off when absent
        if self.metrics_addr:  # (nothing is counted when nobody can scrape it)
            self.rpc.started, self.rpc.answered = self.metrics.rpc_started, self.metrics.rpc_done
        self.rpc.route(Op.PING, self._ping, access=Access.OPEN)
        self.rpc.route(Op.AUTH, self._authenticate, {"cap": Str(MAX_TOKEN)}, access=Access.OPEN)
        # learned when the master accepts our registration
        self.master_key: Ed25519PublicKey | None = None
        self.node_cap: str | None = None  # what this node presents to other nodes
        self.revoked: set[str] = set()  # key ids whose capabilities are refused
        self.master_term = 0  # the latest leader term obeyed (check_master_term)
        self.credential = NodeCredential(self)
        self._stop = asyncio.Event()
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.tombstones = TombstoneStore(os.path.join(self.data_dir, "tombstones.json"))
        self._master_file = os.path.join(self.data_dir, "master.json")
        self._load_master_key()
        self.read_only: set[str] = set()  # vol_ids pending deletion: mutations refused

    def apply_master_state(self, body: dict[str, Any]) -> None:
        """Volume states the master sends with each heartbeat."""
        self.read_only = set(body["read_only"])
        revoked = set(body["revoked"])
        if revoked != self.revoked:
            self.revoked = revoked
            self._save_master_file()
        if body.get("node_cap"):
            self.node_cap = body["node_cap"]

    def check_writable(self, vol_id: str) -> None:
        if vol_id in self.read_only:
            raise ShoalError(Code.READ_ONLY, "volume is pending deletion: read-only")

    async def _ping(self, pid: int, body: Any, conn: Any) -> Any:
        return {"role": self.role, "addr": self.listen}

    # ----- authorization (DESIGN.md §7) ----------------------------------------
    async def _authenticate(self, pid: int, body: Any, conn: ServerConnection) -> Any:
        """Op.AUTH: the capability applies to every later request on this connection."""
        if self.master_key is None:
            raise ShoalError(Code.TRY_AGAIN, "this node has not registered with the master yet")
        # expiry is checked per request (an expired capability may still learn of a deletion)
        cap = capability.verify(self.master_key, body["cap"], allow_expired=True)
        if cap.key_id in self.revoked:
            raise ShoalError(Code.UNAUTHORIZED, "the key of this capability was revoked")
        conn.grant(cap)
        return {"rights": cap.rights, "expires": cap.expires}

    def partition_volume(self, pid: int) -> str | None:
        """The vol_id partition `pid` belongs (or belonged) to; None if unknown."""
        part = self.partitions.get(pid)
        return str(part.info["vol_id"]) if part is not None else self.tombstones.partitions.get(pid)

    def authorize(self, conn: ServerConnection, access: Access, pid: int) -> None:
        """Raise unless the connection's capability grants `access` on partition `pid`."""
        if access is Access.OPEN:
            return
        cap = self.check_capability(conn.capability)
        if access in (Access.RECLAIM, Access.INSPECT) and cap.rights == capability.NODE:
            access = Access.PEER
        if access is Access.MASTER or access is Access.PEER:
            capability.check_expiry(cap)
            if cap.rights == capability.MASTER:
                self.check_master_term(cap)
                return
            if access is Access.PEER and cap.rights == capability.NODE:
                return
            raise ShoalError(Code.FORBIDDEN, f"this request is for the {access.value} only")
        if not cap.on_volume:
            raise ShoalError(Code.FORBIDDEN, "volume data needs a volume capability")
        vol_id = self.partition_volume(pid)
        if vol_id is not None:
            self.check_volume(cap, vol_id)
        if pid not in self.partitions and vol_id is not None:
            return  # a partition of its deleted volume: the handler answers with the tombstone
        capability.check_expiry(cap)
        if access in (Access.WRITE, Access.RECLAIM) and cap.rights == capability.READ_ONLY:
            raise ShoalError(Code.READ_ONLY, "read-only key: changes are refused")

    def check_master_term(self, cap: Capability) -> None:
        """Fencing: a master capability carries its leader's term (its session
        field); once a node has obeyed a term it refuses every earlier one, so
        a deposed leader that has not noticed yet changes nothing here."""
        term = int(cap.session) if cap.session.isdigit() else 0
        if term < self.master_term:
            raise ShoalError(Code.NOT_LEADER, f"a later master leads (term {self.master_term} > {term})",
                             {"leader": None, "term": self.master_term})
        if term > self.master_term:
            self.master_term = term
            self._save_master_file()

    def check_capability(self, cap: Capability | None) -> Capability:
        if cap is None:
            raise ShoalError(Code.UNAUTHORIZED, "this connection has not presented a capability")
        if cap.key_id in self.revoked:
            raise ShoalError(Code.UNAUTHORIZED, "the key of this capability was revoked")
        return cap

    def check_watch(self, cap: Capability | None, vol_id: str) -> None:
        """A subscription to a volume's events: its capability, which may have
        expired if the volume is deleted (then the tombstone is all it gets)."""
        checked = self.check_capability(cap)
        self.check_volume(checked, vol_id)
        if self.tombstones.for_volume(vol_id) is None:
            capability.check_expiry(checked)

    @staticmethod
    def check_volume(cap: Capability | None, vol_id: str) -> None:
        if cap is None or cap.vol_id != vol_id:
            raise ShoalError(Code.FORBIDDEN, "the capability is for another volume")

    async def open(self) -> None:
        """Load local state (subclasses)."""

    async def close(self) -> None:
        """Flush and release local state (subclasses)."""

    async def register_once(self) -> None:
        """Prove ourselves to the master with the node credential; learn its
        public key (which signs every capability) and our node capability."""
        try:
            data = await self.master_api.request_once("POST", "/node/register",
                                                      body={"role": self.role, "addr": self.listen})
        except ShoalError as exc:
            if exc.transient:
                raise ShoalError(exc.code, f"master {self.master} not reachable ({exc.msg})") from None
            raise ShoalError(Code.UNAUTHORIZED, f"master refused registration: {exc.msg}") from None
        try:
            self.master_key = capability.load_public(data["master_pubkey"])
            self.node_cap = str(data["node_cap"])
        except (KeyError, TypeError, ValueError):
            raise ShoalError(Code.UNAVAILABLE, "master answered registration without its key") from None
        self._save_master_file()

    def _save_master_file(self) -> None:
        """What this node knows of the master, kept so that after a restart it
        serves clients (and refuses revoked keys) before the master is back."""
        if self.master_key is not None:
            atomic_write(self._master_file, json.dumps({"master_pubkey": tombstone.public_hex(self.master_key),
                                                        "revoked": sorted(self.revoked),
                                                        "master_term": self.master_term}).encode())

    def _load_master_key(self) -> None:
        try:
            with open(self._master_file) as f:
                doc = json.load(f)
            self.master_key = capability.load_public(doc["master_pubkey"])
            self.revoked = set(doc.get("revoked", []))
            self.master_term = int(doc.get("master_term", 0))
        except FileNotFoundError:
            pass  # never registered: capabilities are refused until we are
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s (%s): waiting for the master", self._master_file, exc)

    async def register(self) -> None:
        """Register; retried until the master answers (it may start later)."""
        delay = 0.1
        while not self._stop.is_set():
            try:
                await self.register_once()
                log.info("registered with master %s", self.master)
                return
            except ShoalError as exc:
                log.log(logging.ERROR if exc.code == Code.UNAUTHORIZED else logging.INFO, "%s", exc.msg)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def run(self) -> None:
        raise_nofile_limit()
        await self.open()
        host, port = split_addr(self.listen)
        await self.rpc.start(host, port, self.tls_server)
        if self.metrics_addr:
            self.metrics.serve_or_exit(self.metrics_addr)
        log.info("%s serving on %s%s", self.role, self.listen, " (TLS)" if self.tls_server else "")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        reg = asyncio.create_task(self.register())
        await self._stop.wait()
        log.info("%s stopping", self.role)
        reg.cancel()
        await self.rpc.stop()
        await self.close()
        await self.master_api.close()


class NodeCredential:
    """What a node presents to other nodes: the node capability the master
    gave it at registration and renews with every heartbeat."""

    def __init__(self, node: NodeService) -> None:
        self.node = node

    def token(self) -> str | None:
        return self.node.node_cap

    async def renew(self) -> None:
        await self.node.register_once()
