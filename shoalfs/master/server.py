"""The master process: HTTP/JSON admin API over the durable state in etcd.

Any number of masters run against one etcd cluster; the leader
(leadership.py) serves every call, the others answer NOT_LEADER naming it,
except /master/status, which every master answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import StreamReader, web

from shoalfs.common.limits import config_count, config_seconds, connection_cap, raise_nofile_limit
from shoalfs.common.master_client import REQUEST_ID
from shoalfs.common.tasks import BackgroundTask
from shoalfs.common.tls import TlsConfigError, client_context, http_scheme, server_context
from shoalfs.master.access import Auth, Authority, Caller, master_credential
from shoalfs.master.cluster_secrets import ClusterSecrets, cluster_secrets
from shoalfs.master.keys import OWNER, KeyRing
from shoalfs.master.leadership import Leadership
from shoalfs.master.lifecycle import VolumeLifecycle
from shoalfs.master.metrics import master_metrics
from shoalfs.master.nodes import NodeMonitor
from shoalfs.master.sessions import ClientSessions
from shoalfs.master.state import DELETED, MasterState
from shoalfs.master.store import EtcdStore
from shoalfs.master.usage import delete_quota, limits_state, quota_list, set_limits, set_quota, volume_usage
from shoalfs.master.views import REPLACE_AFTER, PartitionViews
from shoalfs.proto.errors import Code, ShoalError, info
from shoalfs.proto.rpc import split_addr
from shoalfs.replication.view import DEFAULT_REPLICAS, MAX_REPLICAS

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[Any]]
PRIVATE_FIELDS = ("keys", "created_by", "deleted_by")  # of a volume record: never in an answer
VERSION = "0.1.0"


def envelope(code: int, msg: str, data: Any = None, status: int = 200) -> web.Response:
    return web.json_response({"code": int(code), "msg": msg, "data": data}, status=status)


def http_status(code: int) -> int:
    if code in (Code.UNAUTHORIZED, Code.FORBIDDEN):
        return 401
    if code in (Code.VOLUME_NOT_EXIST, Code.NOT_FOUND):
        return 404
    if code == Code.INTERNAL:
        return 500
    return 503 if info(code).transient else 400


# ----- what one HTTP client can make the master hold ------------------------------
@dataclass(frozen=True)
class HttpLimits:
    read_timeout: float = 10.0   # to receive a whole request, headers and body
    idle_timeout: float = 30.0   # a keep-alive connection waiting for its next request
    max_connections: int = 1024  # open client connections

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], fd_limit: int) -> HttpLimits:
        """ValueError, naming the key, for an invalid value."""
        requested = config_count(cfg, "http_max_connections", cls.max_connections)
        return cls(read_timeout=config_seconds(cfg, "http_read_timeout", cls.read_timeout),
                   idle_timeout=config_seconds(cfg, "http_idle_timeout", cls.idle_timeout),
                   max_connections=connection_cap("http_max_connections", requested, fd_limit))


class ConnectionTable:
    """The open client connections, least recently active first.

    Over the cap, a new connection makes room by closing the least recently
    active connection that is not being served (one idle between requests,
    or one still sending a request); if every other connection has a fully
    received request in progress, the new connection is closed at once.
    So a flood of silent or slow connections cannot lock out a client that
    sends its request promptly."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.conns: OrderedDict[GuardedRequestHandler, None] = OrderedDict()
        self._warned_at = -3600.0

    def admit(self, conn: GuardedRequestHandler) -> None:
        self.conns[conn] = None
        if len(self.conns) <= self.max_connections:
            return
        victim = next((c for c in self.conns if c is not conn and c.evictable), conn)
        now = asyncio.get_running_loop().time()
        if now - self._warned_at > 60:
            self._warned_at = now
            log.warning("%d HTTP connections open (http_max_connections): closing the least recently "
                        "active ones to make room", self.max_connections)
        victim.drop()

    def touch(self, conn: GuardedRequestHandler) -> None:
        if conn in self.conns:
            self.conns.move_to_end(conn)

    def discard(self, conn: GuardedRequestHandler) -> None:
        self.conns.pop(conn, None)


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's HTTP protocol (which closes idle keep-alive connections
    itself, keepalive_timeout) plus what it lacks: a deadline for receiving
    a request and the connection cap of a ConnectionTable.

    The deadline is armed when the connection is accepted and at the first
    byte after each complete request; it is met once the headers are parsed
    and the body has fully arrived, else the connection is closed unanswered.
    (A pipelined request arriving behind another is left to the idle timeout.)"""

    __slots__ = ("_table", "_read_timeout", "_deadline", "_payload", "_unanswered")

    def __init__(self, manager: web.Server, table: ConnectionTable, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._table = table
        self._read_timeout = read_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._payload: StreamReader | None = None  # the body of the request being received
        self._unanswered = 0  # requests received whose response is not finished

    @property
    def evictable(self) -> bool:
        """Not serving a fully received request: idle, or still receiving one."""
        return self._deadline is not None or self._unanswered == 0

    def drop(self) -> None:
        self._disarm()
        self._table.discard(self)
        self.force_close()

    def _arm(self) -> None:
        self._payload = None
        self._deadline = self._loop.call_later(self._read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_timed_out(self) -> None:
        self._deadline = None
        log.debug("closing HTTP connection from %s: no complete request within %gs",
                  self.peername, self._read_timeout)
        self.drop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()
        self._table.admit(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._table.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._table.touch(self)
        if self._deadline is None and data:  # aiohttp also calls this with b"" when it resumes reading
            self._arm()
        queued = len(self._messages)
        super().data_received(data)
        parsed = len(self._messages) - queued  # only data_received adds to the queue
        if parsed > 0:
            self._unanswered += parsed
            self._payload = self._messages[-1][1]
        if self._payload is not None and self._payload.is_eof():
            self._disarm()

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._unanswered = max(0, self._unanswered - 1)
            self._table.touch(self)


async def serve_http(server: web.Server, host: str, port: int, limits: HttpLimits,
                     tls: ssl.SSLContext | None = None) -> asyncio.Server:
    """Listen with GuardedRequestHandler in place of the protocol aiohttp's
    TCPSite would make (runner.server() takes no handler class)."""
    loop = asyncio.get_running_loop()
    table = ConnectionTable(limits.max_connections)

    def protocol() -> GuardedRequestHandler:
        return GuardedRequestHandler(server, table, limits.read_timeout, loop=loop, access_log=None,
                                     keepalive_timeout=limits.idle_timeout,
                                     lingering_time=limits.read_timeout)
    return await loop.create_server(protocol, host, port, ssl=tls,
                                    ssl_handshake_timeout=None if tls is None else limits.read_timeout)


def data_dir_of(cfg: Mapping[str, Any]) -> str:
    data_dir = str(cfg["data_dir"])
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    os.chmod(data_dir, 0o700)
    return data_dir


def etcd_store(cfg: Mapping[str, Any]) -> EtcdStore:
    """ValueError, naming the key, for an invalid value."""
    password = None
    if cfg.get("etcd_password_file"):
        with open(str(cfg["etcd_password_file"])) as f:
            password = f.read().strip()
    if bool(cfg.get("etcd_user")) != bool(password):
        raise ValueError("etcd_user and etcd_password_file go together")
    try:
        return EtcdStore(str(cfg.get("etcd", "127.0.0.1:2379")), str(cfg.get("etcd_prefix", "/shoal/")),
                         user=cfg.get("etcd_user"), password=password)
    except ValueError as exc:
        raise ValueError(f"etcd: {exc}") from None


class Master:
    def __init__(self, cfg: dict[str, Any], store: EtcdStore, shared: ClusterSecrets,
                 http_limits: HttpLimits | None = None) -> None:
        self.cfg = cfg
        self.http_limits = http_limits or HttpLimits()
        self.listen: str = cfg["listen"]
        self.data_dir = data_dir_of(cfg)
        self.signing_key = shared.signing_key  # signs tombstones and capabilities
        self.authority = Authority(cfg, shared)
        lease = math.ceil(config_seconds(cfg, "leader_lease", 3.0))  # etcd leases are whole seconds
        self.leadership = Leadership(store, str(cfg.get("advertise") or self.listen), max(2, lease),
                                     self._elected, self._deposed)
        self._campaign = BackgroundTask(self.leadership.run)
        self.state = MasterState(store)
        self.state.guard = self.leadership.guard
        self.state.on_write_failed = self.leadership.resign
        self.keys = KeyRing(self.state, self.authority.capability_ttl)
        self.authority.revoked = lambda key_id: key_id in self.keys.revoked
        self.tls_server = server_context(cfg)
        self.nodes = NodeMonitor(self.state, float(cfg.get("heartbeat_interval", 1.0)),
                                 float(cfg.get("node_timeout", 5.0)), tls=client_context(cfg.get("tls_ca")))
        self.nodes.leading = lambda: self.leadership.holds_lease  # also while taking over
        self.nodes.fenced_off = self._fenced_off
        try:
            failover_after = config_seconds(cfg, "failover_after", 2.0)
            replace_after = config_seconds(cfg, "replace_after", REPLACE_AFTER)
            # copies of each partition of a volume created without saying
            self.default_replicas = config_count(cfg, "default_replicas", DEFAULT_REPLICAS)
            if self.default_replicas > MAX_REPLICAS:
                raise ValueError(f"default_replicas must be at most {MAX_REPLICAS}")
        except ValueError as exc:
            raise SystemExit(f"shoal: config: {exc}") from None
        # a leader cut off silently is judged when the round that missed it ends
        self.nodes.beat_timeout = min(3.0, max(1.0, failover_after))
        self.views = PartitionViews(self.state, self.nodes, failover_after, replace_after)
        self.nodes.after_round = self.views.fail_over
        self.nodes.before_recreate = self.views.lost
        self.fence_term = 0  # the term node commands carry: above every term nodes have obeyed
        self.lock = asyncio.Lock()
        self._background_jobs: set[asyncio.Task[None]] = set()
        self.metrics, counted = master_metrics(self)
        self.views.on_change = self.metrics.event
        self.metrics_addr: str | None = cfg.get("metrics") or None  # HOST:PORT; off when absent
        self.app = web.Application(middlewares=[counted, self._envelope_mw], client_max_size=1 << 20)
        self.routes: dict[tuple[str, str], tuple[Handler, Auth]] = {}
        self.add("GET", "/master/status", self.master_status, Auth.OPEN, leader_only=False)
        self.add("GET", "/cluster/info", self.cluster_info, Auth.OPEN)
        self.add("GET", "/cluster/nodes", self.cluster_nodes, Auth.ADMIN)
        self.add("POST", "/node/register", self.node_register, Auth.NODE)
        self.add("POST", "/partition/report", self.partition_report, Auth.NODE)
        self.add("POST", "/volume/scrub", self.volume_scrub, Auth.ADMIN)
        self.add("POST", "/volume/create", self.volume_create, Auth.ADMIN)
        self.add("GET", "/volume/list", self.volume_list, Auth.ADMIN)
        self.add("GET", "/volume/info", self.volume_info, Auth.VOLUME)
        self.add("GET", "/volume/stat", self.volume_stat, Auth.VOLUME)
        self.add("POST", "/volume/set", self.volume_set, Auth.ADMIN)
        self.add("POST", "/quota/set", self.quota_set, Auth.ADMIN)
        self.add("POST", "/quota/delete", self.quota_delete, Auth.ADMIN)
        self.add("GET", "/quota/list", self.quota_list, Auth.VOLUME)
        self.add("POST", "/key/create", self.key_create, Auth.ADMIN)
        self.add("GET", "/key/list", self.key_list, Auth.ADMIN)
        self.add("POST", "/key/revoke", self.key_revoke, Auth.ADMIN)
        self.lifecycle = VolumeLifecycle(self)
        self.sessions = ClientSessions(self)
        self.nodes.round_state = self._round_state
        self.nodes.orphan_context = self._orphan_context
        self.nodes.node_state = lambda addr: {"node_cap": self.authority.node_capability(addr)}

    def add(self, method: str, path: str, handler: Handler, auth: Auth, leader_only: bool = True) -> None:
        self.routes[(method, path)] = (handler, auth)
        self.app.router.add_route(method, path, self._wrap(handler, auth, leader_only))

    def _wrap(self, handler: Handler, auth: Auth, leader_only: bool) -> Handler:
        async def wrapped(request: web.Request) -> web.Response:
            term = self.leadership.term
            if leader_only:
                self._check_leading(term)
            request["caller"] = self.authority.caller(request, auth)
            try:
                data = await handler(request)
            finally:
                if leader_only:
                    # an answer from a state dropped meanwhile (deposed, or re-elected
                    # and reloaded) proves nothing: the client asks the leader again
                    self._check_leading(term)
            return envelope(0, "ok", data)
        return wrapped

    def _check_leading(self, term: int) -> None:
        if not self.leadership.leading or self.leadership.term != term:
            raise self.leadership.not_leader()

    @staticmethod
    def caller(request: web.Request) -> Caller:
        return request["caller"]  # type: ignore[no-any-return]

    @web.middleware
    async def _envelope_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        except ShoalError as exc:
            return envelope(exc.code, exc.msg, exc.data, http_status(exc.code))
        except web.HTTPException as exc:
            code = Code.NOT_FOUND if exc.status == 404 else Code.BAD_REQUEST
            return envelope(code, exc.reason, None, exc.status)
        except Exception as exc:
            if isinstance(exc, ConnectionResetError) and (request.transport is None
                                                          or request.transport.is_closing()):
                # the client went away, or its read deadline closed it, before its body arrived
                log.debug("request %s %s: client connection closed (%s)", request.method, request.path, exc)
                return envelope(Code.BAD_REQUEST, "client connection closed", None, 400)
            log.exception("request %s %s failed", request.method, request.path)
            return envelope(Code.INTERNAL, f"internal error: {exc!r}", None, 500)

    # ----- request helpers -----------------------------------------------
    @staticmethod
    async def body(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ShoalError(Code.BAD_REQUEST, "request body must be a JSON object") from None
        if not isinstance(data, dict):
            raise ShoalError(Code.BAD_REQUEST, "request body must be a JSON object")
        return data

    @staticmethod
    def request_id(request: web.Request) -> str | None:
        """The client's id of this request, the same on its retries (or None)."""
        rid = request.headers.get(REQUEST_ID, "")
        return rid if 8 <= len(rid) <= 64 and rid.isalnum() else None

    @staticmethod
    def arg(request: web.Request, name: str) -> str:
        value = request.query.get(name)
        if not value:
            raise ShoalError(Code.BAD_REQUEST, f"missing query parameter {name!r}")
        return value

    # ----- handlers ----------------------------------------------------------
    async def master_status(self, request: web.Request) -> Any:
        status = self.leadership.status()
        return dict(status, term=self.fence_term if status["leading"] else None)  # the term nodes obey

    async def cluster_info(self, request: web.Request) -> Any:
        return {"version": VERSION, "master_pubkey": self.lifecycle.public_key,
                "metanodes": self.nodes.live("metanode"), "datanodes": self.nodes.live("datanode"),
                "volumes": sum(1 for v in self.state.volumes.values() if v["status"] != DELETED)}

    async def cluster_nodes(self, request: web.Request) -> Any:
        return self.nodes.node_table()

    async def node_register(self, request: web.Request) -> Any:
        body = await self.body(request)
        # not under self.lock: a volume create holds it while it waits for nodes,
        # perhaps for this very node to register (saves are serialized by the state)
        new = await self.state.register_node(body.get("role"), body.get("addr"))  # type: ignore[arg-type]
        self.nodes.reports.pop(body["addr"], None)
        return {"new": new, "master_pubkey": self.lifecycle.public_key,
                "node_cap": self.authority.node_capability(body["addr"])}

    async def partition_report(self, request: web.Request) -> Any:
        """A partition leader asks to drop a failed follower or add a caught-up one."""
        return await self.views.report(await self.body(request))

    async def volume_scrub(self, request: web.Request) -> Any:
        body = await self.body(request)
        return await self.views.scrub(self.state.by_name(body.get("name")))  # type: ignore[arg-type]

    def _round_state(self) -> dict[str, Any]:
        """What every node hears in a heartbeat round: volumes pending deletion
        (read-only) and the keys whose capabilities to refuse."""
        live = [v for v in self.state.volumes.values() if v["status"] != DELETED]
        return {"read_only": self.state.read_only_volumes(), "revoked": self.keys.revoked_ids(),
                "limits": limits_state(live, self.nodes.reports)}

    async def volume_create(self, request: web.Request) -> Any:
        body = await self.body(request)
        await self.nodes.settled()
        rid = self.request_id(request)
        async with self.lock:
            done = self.state.made_by(rid, "created_by")
            if done is not None:  # a retry of a create the master made but could not confirm
                _, owner_key = self.keys.reissue(done, OWNER)
                await self.state.save()
                return dict(self.describe(done), owner_key=owner_key)
            vol = self.state.plan_volume(body.get("name"), body.get("owner"),  # type: ignore[arg-type]
                                         body.get("capacity_gib", 100),
                                         self.nodes.live("metanode"), self.nodes.live("datanode"),
                                         body.get("replicas", self.default_replicas))
            if rid:
                vol["created_by"] = rid
            await self.state.save()  # its partition ids, before any node holds them
            pids = {p["pid"] for key in ("meta_partitions", "data_partitions") for p in vol[key]}
            self.nodes.creating |= pids
            try:
                return await self._place_volume(vol)
            finally:
                self.nodes.creating -= pids

    async def _place_volume(self, vol: dict[str, Any]) -> Any:
        """Create a planned volume's partitions, then record the volume."""
        jobs = [self.nodes.create_partition(addr, "meta", p, vol)
                for p in vol["meta_partitions"] for addr in p["replicas"]]
        jobs += [self.nodes.create_partition(addr, "data", p, vol)
                 for p in vol["data_partitions"] for addr in p["replicas"]]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.drop_partitions(vol)
            raise ShoalError(Code.UNAVAILABLE, f"could not place volume: {failed[0]}")
        _, owner_key = self.keys.create(vol, OWNER, read_only=False)
        await self.state.add_volume(vol)
        log.info("created volume %s (%s)", vol["name"], vol["vol_id"])
        return dict(self.describe(vol), owner_key=owner_key)

    async def drop_partitions(self, vol: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Best effort; nodes that miss it drop orphans at their next heartbeat."""
        jobs = [self.nodes.delete_partition(addr, p["pid"], extra)
                for key in ("meta_partitions", "data_partitions")
                for p in vol[key] for addr in p["replicas"]]
        await asyncio.gather(*jobs, return_exceptions=True)

    def _orphan_context(self, pid: int, report: dict[str, Any]) -> dict[str, Any]:
        tomb = self.state.tombstone_of_partition(pid)
        return {"tombstone": tomb} if tomb else {}

    def describe(self, vol: dict[str, Any]) -> dict[str, Any]:
        return dict({k: v for k, v in vol.items() if k not in PRIVATE_FIELDS}, master_pubkey=self.lifecycle.public_key)

    async def volume_list(self, request: web.Request) -> Any:
        return [dict({k: v for k, v in vol.items() if k not in ("meta_partitions", "data_partitions", "tombstone",
                                                                "quotas", "next_qid", *PRIVATE_FIELDS)},
                     **volume_usage(vol, self.nodes.reports))
                for vol in sorted(self.state.volumes.values(), key=lambda v: v["name"])
                if vol["status"] != DELETED]

    def visible_volume(self, request: web.Request, name: str) -> dict[str, Any]:
        """The volume of that name, if the caller may see it."""
        vol = self.state.by_name(name)
        self.caller(request).check_volume(vol["vol_id"])
        return vol

    async def volume_info(self, request: web.Request) -> Any:
        vol = self.visible_volume(request, self.arg(request, "name"))
        info = dict(self.describe(vol), **volume_usage(vol, self.nodes.reports))
        for key in ("meta_partitions", "data_partitions"):  # with how far each catch-up is
            info[key] = [dict(p, catch_up=self.views.catch_up(p)) for p in info[key]]
        return info

    async def volume_stat(self, request: web.Request) -> Any:
        vol = self.visible_volume(request, self.arg(request, "name"))
        return volume_usage(vol, self.nodes.reports)

    async def quota_set(self, request: web.Request) -> Any:
        body = await self.body(request)
        async with self.lock:
            vol = self.state.by_name(body.get("volume"))  # type: ignore[arg-type]
            qid, quota = set_quota(vol, body)
            await self.state.save()
        return dict(quota, qid=qid)

    async def quota_delete(self, request: web.Request) -> Any:
        body = await self.body(request)
        async with self.lock:
            vol = self.state.by_name(body.get("volume"))  # type: ignore[arg-type]
            delete_quota(vol, body.get("path"))
            await self.state.save()
        return {"deleted": body.get("path")}

    async def quota_list(self, request: web.Request) -> Any:
        return quota_list(self.visible_volume(request, self.arg(request, "volume")), self.nodes.reports)

    async def volume_set(self, request: web.Request) -> Any:
        body = await self.body(request)
        async with self.lock:
            vol = self.state.by_name(body.get("name"))  # type: ignore[arg-type]
            set_limits(vol, body)
            await self.state.save()  # the metanodes hear it with the next heartbeat round
        return self.describe(vol)

    # ----- access keys --------------------------------------------------------
    async def key_create(self, request: web.Request) -> Any:
        body = await self.body(request)
        read_only = body.get("read_only", False)
        if not isinstance(read_only, bool):
            raise ShoalError(Code.BAD_REQUEST, "read_only must be true or false")
        async with self.lock:
            vol = self.state.by_name(body.get("volume"))  # type: ignore[arg-type]
            key_id, key = self.keys.create(vol, body.get("name"), read_only)
            await self.state.save()
        entry = self.keys.describe(vol, key_id)
        log.info("issued %s key %r of volume %s", entry["rights"], entry["name"], vol["name"])
        return dict(entry, key=key)

    async def key_list(self, request: web.Request) -> Any:
        return self.keys.listing(self.state.by_name(self.arg(request, "volume")))

    async def key_revoke(self, request: web.Request) -> Any:
        body = await self.body(request)
        async with self.lock:
            vol = self.state.by_name(body.get("volume"))  # type: ignore[arg-type]
            key_id = self.keys.revoke(vol, body.get("name"))
            await self.state.save()
        log.info("revoked key %r (%s) of volume %s", body.get("name"), key_id, vol["name"])
        await self.nodes.beat_all()  # nodes refuse its capabilities from now on
        return {"revoked": body.get("name"), "key_id": key_id}

    # ----- leadership --------------------------------------------------------
    async def _elected(self, term: int) -> None:
        """Take over: the state from etcd, then the node heartbeats and the
        deletion timers. Client sessions start empty: every mount registers
        again with its next heartbeat."""
        await self.state.load(legacy_file=os.path.join(self.data_dir, "master.json"))
        self.sessions.table.clear()
        self.fence_term = max(term, int(self.state.doc["term_floor"]) + 1)
        self.views.leading_since = time.monotonic()
        await self.nodes.start(master_credential(self.authority, self.fence_term))
        await self.lifecycle.start()

    def _fenced_off(self, obeyed: int) -> None:
        """A node has obeyed a later term than ours while we hold the lease:
        etcd's revisions went back (restored from a backup, or replaced).
        Record a floor above it in etcd and lead again from there. (A leader
        deposed for real fails the write: it no longer holds the lease.)"""
        if obeyed < self.fence_term or not self.leadership.leading or self.state.doc["term_floor"] >= obeyed:
            return
        self.state.doc["term_floor"] = obeyed

        async def raise_floor() -> None:
            try:
                await self.state.save()
            except ShoalError as exc:
                log.warning("could not record term floor %d: %s", obeyed, exc.msg)
                return
            self.leadership.resign(f"nodes have obeyed term {obeyed}, above ours ({self.fence_term}): "
                                   "was etcd restored? leading again above it")
        self._background_jobs.add(task := asyncio.create_task(raise_floor()))
        task.add_done_callback(self._background_jobs.discard)

    async def _deposed(self) -> None:
        try:
            await self.lifecycle.stop()
        finally:
            try:
                await self.nodes.stop()
            finally:
                self.sessions.table.clear()
                self.state.clear()

    # ----- life cycle --------------------------------------------------------
    async def run(self) -> None:
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        assert runner.server is not None
        host, port = split_addr(self.listen)
        listener = await serve_http(runner.server, host, port, self.http_limits, self.tls_server)
        if self.metrics_addr:
            self.metrics.serve_or_exit(self.metrics_addr)
        log.info("master serving on %s://%s (%s), etcd %s", http_scheme(self.tls_server), self.listen,
                 self.http_limits, self.leadership.store.endpoint)
        self._campaign.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("master stopping")
        listener.close()
        await self._campaign.stop()  # steps down: a follower takes over at once
        await runner.cleanup()
        await self.leadership.store.close()


async def serve(cfg: dict[str, Any], limits: HttpLimits) -> None:
    """Fetch the cluster's secrets (waiting for etcd), then serve."""
    store = etcd_store(cfg)
    data_dir = data_dir_of(cfg)
    while True:
        try:
            shared = await cluster_secrets(store, cfg.get("key_file") or os.path.join(data_dir, "master.key"),
                                           cfg.get("token_file") or os.path.join(data_dir, "admin.token"),
                                           cfg.get("node_token_file") or os.path.join(data_dir, "node.token"))
            break
        except ShoalError as exc:
            log.warning("waiting for etcd: %s", exc.msg)
            await asyncio.sleep(1.0)
    await Master(cfg, store, shared, limits).run()


def main(config_path: str) -> None:
    from shoalfs.common.service import install_loop_policy, load_config, setup_logging

    cfg = load_config(config_path, ("listen", "data_dir"))
    setup_logging(cfg.get("log_level", "INFO"))
    fd_limit = raise_nofile_limit()
    try:
        limits = HttpLimits.from_config(cfg, fd_limit)
        etcd_store(cfg)
        server_context(cfg)
    except (ValueError, TlsConfigError, OSError) as exc:
        raise SystemExit(f"shoal: config {config_path}: {exc}") from None
    install_loop_policy()
    asyncio.run(serve(cfg, limits))
