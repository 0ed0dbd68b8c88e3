"""The master's durable store: etcd (DESIGN.md §6), through the asyncio client aetcd.

Keys live under one prefix (`etcd_prefix`, default `/shoal/`):

    leader              {"addr", "id"} of the leading master, on its lease
    state/meta          {"next_pid", "epoch"}
    state/nodes/ADDR    a registered node
    state/volumes/ID    a volume (with its keys' hashes)
    state/graveyard/ID  the tombstone of a volume forgotten after its retention
    state/revoked       key ids whose capabilities nodes refuse, until when
    secret/...          the signing key and the admin and node tokens

Every write of state is one transaction conditional on the writer still
holding the leader key it was elected with (`Guard`), so a deposed leader
writes nothing. etcd unreachable is a transient error (UNAVAILABLE): the
caller's change is not made.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions

from shoalfs.proto.errors import Code, ShoalError

log = logging.getLogger(__name__)

T = TypeVar("T")
LEADER = "leader"
STATE = "state/"
SECRET = "secret/"
MAX_TXN_OPS = 100  # etcd refuses transactions of more than 128 operations by default


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    """`host:port[,host:port...]` (an http:// prefix is allowed) -> [(host, port)]."""
    out = []
    for item in str(text).split(","):
        item = item.strip().removeprefix("http://")
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"bad etcd endpoint {item!r} (want host:port)")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no etcd endpoints")
    return out


@dataclass(frozen=True)
class Guard:
    """The condition of a leader's writes: the leader key is still the one it created."""

    key: bytes
    revision: int


class EtcdStore:
    def __init__(self, endpoints: str, prefix: str = "/shoal/", timeout: float = 2.0,
                 user: str | None = None, password: str | None = None) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.timeout = timeout
        self._auth = (user, password)
        self._current = 0
        self._client: aetcd.Client | None = None

    def key(self, name: str) -> bytes:
        return (self.prefix + name).encode()

    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._current]
        return f"{host}:{port}"

    async def _connected(self) -> aetcd.Client:
        if self._client is None:
            host, port = self.endpoints[self._current]
            self._client = aetcd.Client(host, port, username=self._auth[0], password=self._auth[1],
                                        timeout=self.timeout)  # type: ignore[arg-type]
        return self._client

    async def call(self, what: str, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run one etcd operation; an unreachable or quorum-less member is a
        transient error, and the next call tries the next endpoint."""
        client = await self._connected()
        try:
            return await op(client)
        except (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError,
                aetcd.exceptions.InternalError, aetcd.exceptions.UnauthenticatedError, TimeoutError) as exc:
            # unreachable, no quorum, or an auth token the member forgot: a new client, the next member
            failed = self.endpoint
            await self._rotate()
            raise ShoalError(Code.UNAVAILABLE, f"etcd {failed} unreachable ({what}): {exc}") from None
        except aetcd.exceptions.ClientError as exc:
            raise ShoalError(Code.UNAVAILABLE, f"etcd refused {what}: {exc}") from None
        except Exception as exc:  # the gRPC layer's own errors: treated as an unreachable member
            failed = self.endpoint
            await self._rotate()
            raise ShoalError(Code.UNAVAILABLE, f"etcd {failed} failed ({what}): {exc!r}") from None

    async def _rotate(self) -> None:
        client, self._client = self._client, None
        self._current = (self._current + 1) % len(self.endpoints)
        if client is not None:
            try:
                await client.close()
            except Exception as exc:  # closing a broken channel: nothing to recover
                log.debug("closing etcd client: %s", exc)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ----- reads --------------------------------------------------------------
    async def load(self, section: str) -> dict[str, bytes]:
        """Every key under prefix+section (names relative to it), read at one revision."""
        base = self.key(section)
        rng = await self.call(f"read {section}", lambda c: c.get_prefix(base))
        return {kv.key[len(base):].decode(): bytes(kv.value) for kv in rng}

    async def get(self, name: str) -> tuple[bytes, int] | None:
        """(value, create revision) of one key, or None."""
        got = await self.call(f"read {name}", lambda c: c.get(self.key(name)))
        return None if got is None else (bytes(got.value), int(got.create_revision))

    # ----- writes -------------------------------------------------------------
    async def commit(self, puts: dict[str, bytes], deletes: list[str], guard: Guard) -> bool:
        """Apply puts and deletes atomically if the guard holds; False if it does not
        (the caller is no longer the leader). Large changes (a first import) go in
        batches, each guarded, in order: the deletes, then the puts as given."""
        names: list[tuple[str, bytes | None]] = [*((n, None) for n in deletes), *puts.items()]
        for start in range(0, max(1, len(names)), MAX_TXN_OPS):
            batch = names[start:start + MAX_TXN_OPS]

            async def txn(c: aetcd.Client, batch: list[tuple[str, bytes | None]] = batch) -> bool:
                ops: list[Any] = [c.transactions.delete(self.key(name)) if value is None
                                  else c.transactions.put(self.key(name), value) for name, value in batch]
                ok, _ = await c.transaction(compare=[c.transactions.create(guard.key) == guard.revision],
                                            success=ops, failure=[])
                return bool(ok)
            if not await self.call("write state", txn):
                return False
        return True

    async def create_if_absent(self, name: str, value: bytes) -> bytes:
        """Store value unless the key exists; the value stored either way."""
        key = self.key(name)

        async def txn(c: aetcd.Client) -> bytes:
            ok, answers = await c.transaction(compare=[c.transactions.create(key) == 0],
                                              success=[c.transactions.put(key, value)],
                                              failure=[c.transactions.get(key)])
            return value if ok else bytes(answers[0][0][0])
        return await self.call(f"create {name}", txn)

    # ----- leader election ----------------------------------------------------
    async def grant_lease(self, ttl: int) -> int:
        lease = await self.call("grant a lease", lambda c: c.lease(ttl))
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> int:
        """The lease's new time to live in seconds; 0 if it has expired."""
        reply = await self.call("refresh the leader lease", lambda c: c.refresh_lease(lease_id))
        return max(0, int(reply.TTL)) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self.call("revoke the leader lease", lambda c: c.revoke_lease(lease_id))

    async def campaign(self, value: bytes, lease_id: int) -> tuple[bool, bytes, int]:
        """Create the leader key on our lease unless it exists: (won, the
        leader's value, the key's create revision — our term if we won)."""
        key = self.key(LEADER)

        async def txn(c: aetcd.Client) -> tuple[bool, bytes, int]:
            ok, answers = await c.transaction(compare=[c.transactions.create(key) == 0],
                                              success=[c.transactions.put(key, value, lease=lease_id),
                                                       c.transactions.get(key)],
                                              failure=[c.transactions.get(key)])
            got = answers[-1]
            if not got:  # the key vanished between compare and get: cannot happen in one txn
                return False, b"", 0
            raw, meta = got[0]
            return bool(ok), bytes(raw), int(meta.create_revision)
        return await self.call("campaign", txn)

    def guard(self, revision: int) -> Guard:
        return Guard(self.key(LEADER), revision)
