"""HTTP client of the master's API (used by the SDK, the mount, the CLI and nodes)."""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from typing import Any

import aiohttp

from shoalfs.common.tls import http_scheme
from shoalfs.proto.errors import Code, ShoalError


class MasterClient:
    def __init__(self, addr: str, token: str | None = None, timeout: float = 5.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.addr = addr.removeprefix("http://").removeprefix("https://").rstrip("/")
        self.tls = tls  # with a CA: https only, the master's certificate checked
        self.url = f"{http_scheme(tls)}://{self.addr}"
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
                           body: dict[str, Any] | None = None) -> Any:
        """One request; transport failures become transient ShoalErrors."""
        headers = {"Authorization": self.authorization} if self.authorization else {}
        try:
            session = await self._http()
            async with session.request(method, f"{self.url}{path}", params=params,
                                       json=body, headers=headers) as resp:
                try:
                    env = await resp.json(content_type=None)
                except ValueError:
                    raise ShoalError(Code.UNAVAILABLE,
                                     f"master answered HTTP {resp.status} without an envelope") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ShoalError(Code.NODE_UNREACHABLE, f"master {self.addr} unreachable: {exc}") from None
        except TimeoutError:
            raise ShoalError(Code.TIMEOUT, f"master {self.addr} did not answer in {self.timeout}s") from None
        if not isinstance(env, dict) or "code" not in env:
            raise ShoalError(Code.UNAVAILABLE, "master answered without an envelope")
        if env["code"] != 0:
            raise ShoalError(env["code"], env.get("msg"), env.get("data"))
        return env.get("data")

    async def request(self, method: str, path: str, params: dict[str, Any] | None = None,
                      body: dict[str, Any] | None = None, deadline: float = 10.0) -> Any:
        """With retries of transient failures (capped backoff, jitter) up to deadline."""
        end = time.monotonic() + deadline
        attempt = 0
        while True:
            try:
                return await self.request_once(method, path, params, body)
            except ShoalError as exc:
                delay = random.uniform(0, min(2.0, 0.1 * 2**attempt))
                if not exc.transient or time.monotonic() + delay >= end:
                    raise
                attempt += 1
                await asyncio.sleep(delay)

    async def volume_info(self, name: str, deadline: float = 10.0) -> dict[str, Any]:
        data = await self.request("GET", "/volume/info", {"name": name}, deadline=deadline)
        assert isinstance(data, dict)
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
