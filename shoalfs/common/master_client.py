"""HTTP client of the master's API (used by the SDK, the mount, the CLI and nodes).

It takes a comma-separated list of masters and finds the leader itself: a
follower answers NOT_LEADER naming the leader (asked next), an unreachable
master passes the turn to the next in the list. A failover is a transient
fault, retried inside the caller's deadline.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import ssl
import time
from typing import Any

import aiohttp

from shoalfs.common.tls import http_scheme
from shoalfs.proto.errors import Code, ShoalError

REQUEST_ID = "X-Shoal-Request-Id"
NO_ANSWER = (Code.NODE_UNREACHABLE, Code.TIMEOUT)  # no master answered: the transport failed or time ran out


def named_leader(exc: ShoalError) -> str | None:
    """The leader a NOT_LEADER answer names, if any."""
    leader = exc.data.get("leader") if isinstance(exc.data, dict) else None
    return leader if isinstance(leader, str) and leader else None


def master_list(spec: str) -> list[str]:
    """`host:port[,host:port...]` (scheme prefixes allowed) -> addresses, in order, once each."""
    out: list[str] = []
    for item in str(spec).split(","):
        addr = item.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
        if addr and addr not in out:
            out.append(addr)
    return out


def same_cluster(a: str, b: str | None) -> bool:
    """Whether two master lists name a master in common."""
    return b is not None and bool(set(master_list(a)) & set(master_list(b)))


class MasterClient:
    def __init__(self, masters: str, token: str | None = None, timeout: float = 5.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.spec = masters
        self.masters = master_list(masters)
        if not self.masters:
            raise ValueError(f"no master address in {masters!r}")
        self.addr = self.masters[0]  # the leader, as far as we know
        self.tls = tls  # with a CA: https only, the master's certificate checked
        self.scheme = http_scheme(tls)
        # the Authorization header: the admin token, or a session's capability once it has one
        self.authorization: str | None = f"Bearer {token}" if token else None
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                                  connector=aiohttp.TCPConnector(ssl=self.tls or True))
        return self._session

    async def request_once(self, method: str, path: str, params: dict[str, Any] | None = None,
                           body: dict[str, Any] | None = None, budget: float | None = None,
                           request_id: str | None = None) -> Any:
        """One pass over the masters, each asked at most once: the one believed
        to lead first, a leader a follower names next, then the rest of the list.
        Within `budget` seconds (default: the client's timeout per master). The
        most telling transient error if none answered as leader."""
        end = None if budget is None else time.monotonic() + budget
        order = [self.addr, *(m for m in self.masters if m != self.addr)]
        asked: set[str] = set()
        error: ShoalError | None = None
        while order:
            addr = order.pop(0)
            if addr in asked:
                continue
            asked.add(addr)
            left = self.timeout if end is None else min(self.timeout, end - time.monotonic())
            if left <= 0:
                break
            try:
                data = await self._ask(addr, method, path, params, body, left, request_id)
                self.addr = addr
                return data
            except ShoalError as exc:
                if exc.code == Code.NOT_LEADER:
                    error = exc  # says more than an unreachable master: a leader is being elected
                    hint = named_leader(exc)
                    if hint and hint not in asked:
                        order.insert(0, hint)
                elif exc.code not in NO_ANSWER:
                    raise
                elif error is None or error.code != Code.NOT_LEADER:
                    error = exc
        raise error or ShoalError(Code.TIMEOUT, "no master answered in time")

    async def _ask(self, addr: str, method: str, path: str, params: dict[str, Any] | None,
                   body: dict[str, Any] | None, timeout: float, request_id: str | None = None) -> Any:
        """One request to one master; transport failures become transient ShoalErrors."""
        headers = {"Authorization": self.authorization} if self.authorization else {}
        if request_id:
            headers[REQUEST_ID] = request_id
        try:
            session = await self._http()
            async with session.request(method, f"{self.scheme}://{addr}{path}", params=params, json=body,
                                       headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                try:
                    env = await resp.json(content_type=None)
                except ValueError:
                    raise ShoalError(Code.UNAVAILABLE,
                                     f"master answered HTTP {resp.status} without an envelope") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ShoalError(Code.NODE_UNREACHABLE, f"master {addr} unreachable: {exc}") from None
        except TimeoutError:
            raise ShoalError(Code.TIMEOUT, f"master {addr} did not answer in {timeout:.1f}s") from None
        if not isinstance(env, dict) or "code" not in env:
            raise ShoalError(Code.UNAVAILABLE, "master answered without an envelope")
        if env["code"] != 0:
            raise ShoalError(env["code"], env.get("msg"), env.get("data"))
        return env.get("data")

    async def request(self, method: str, path: str, params: dict[str, Any] | None = None,
                      body: dict[str, Any] | None = None, deadline: float = 10.0,
                      election_grace: float = 0.0) -> Any:
        """With retries of transient failures (capped backoff, jitter) up to deadline.
        Every attempt carries the same request id: a change the master made but
        could not confirm (it failed over) is answered as done, not done twice.
        `election_grace`: seconds more once a master answered that another
        leads, which did not answer yet (a new leader taking over on a loaded
        machine); not when no leader is known (etcd away: no use waiting)."""
        end = time.monotonic() + deadline
        attempt = 0
        request_id = secrets.token_hex(12)
        answered: ShoalError | None = None  # the last error a master answered with
        while True:
            try:
                return await self.request_once(method, path, params, body, budget=end - time.monotonic(),
                                               request_id=request_id)
            except ShoalError as exc:
                delay = random.uniform(0, min(1.0, 0.1 * 2**attempt))
                if exc.code == Code.NOT_LEADER and named_leader(exc) and election_grace:
                    end, election_grace = end + election_grace, 0.0
                if not exc.transient or time.monotonic() + delay >= end:
                    # an attempt the deadline cut short says less than a master's own answer
                    cut_short = exc.code in NO_ANSWER and time.monotonic() >= end - 0.05
                    raise answered if cut_short and answered is not None else exc from None
                if exc.code not in NO_ANSWER:
                    answered = exc
                attempt += 1
                await asyncio.sleep(delay)

    async def volume_info(self, name: str, deadline: float = 10.0) -> dict[str, Any]:
        data = await self.request("GET", "/volume/info", {"name": name}, deadline=deadline)
        assert isinstance(data, dict)
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
