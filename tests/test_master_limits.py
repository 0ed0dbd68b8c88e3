"""The master bounds what an HTTP client can make it hold: a read deadline for
each request, an idle timeout for keep-alive connections, a connection cap.
Real master processes (no nodes: nothing else opens connections or files)."""

from __future__ import annotations

import json
import os
import pathlib
import resource
import select
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from conftest import wait_for

from shoalfs.cli.cluster import ClusterError, EmbeddedCluster
from shoalfs.common.limits import FD_HEADROOM
from shoalfs.master.server import HttpLimits

READ_TIMEOUT = 2.0
IDLE_TIMEOUT = 4.0  # > READ_TIMEOUT + 1: aiohttp's idle timer cannot pass for the read deadline


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    c = EmbeddedCluster(str(tmp_path_factory.mktemp("limits")))
    try:
        c.up(0, 0, extra={"master": {"http_read_timeout": READ_TIMEOUT, "http_idle_timeout": IDLE_TIMEOUT,
                                     "http_max_connections": 50}})
        yield c
    finally:
        c.down()


def connect(c: EmbeddedCluster) -> socket.socket:
    host, port = c.master_addr.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def closed_by_peer(s: socket.socket) -> bool:
    """True once the master has closed `s` (EOF or reset); never blocks."""
    if not select.select([s], [], [], 0)[0]:
        return False
    try:
        return s.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def wait_closed(s: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Seconds until the master closes `s`, and what it sent before that."""
    start = time.monotonic()
    got = b""
    s.settimeout(timeout)
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the master kept the connection open for {timeout}s") from None
    return time.monotonic() - start, got


def cluster_info(c: EmbeddedCluster) -> dict:
    with urllib.request.urlopen(f"http://{c.master_addr}/cluster/info", timeout=5) as r:
        env = json.load(r)
    assert set(env) == {"code", "msg", "data"} and env["code"] == 0, env
    assert env["data"]["version"], env
    return dict(env)


def read_response(s: socket.socket) -> bytes:
    """One Content-Length framed response."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"closed mid-response: {buf!r}"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


@pytest.mark.parametrize("kept_alive", [False, True], ids=["first-request", "after-a-request"])
def test_half_sent_headers_closed_after_read_timeout(master: EmbeddedCluster, kept_alive: bool) -> None:
    with connect(master) as s:
        if kept_alive:  # the deadline restarts with each request, not only at accept
            s.sendall(b"GET /cluster/info HTTP/1.1\r\nHost: x\r\n\r\n")
            assert json.loads(read_response(s))["code"] == 0
        s.sendall(b"GET /cluster/info HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        took, got = wait_closed(s, READ_TIMEOUT + 5)
    assert got == b""
    assert READ_TIMEOUT - 0.5 <= took <= READ_TIMEOUT + 1, took
    cluster_info(master)


def test_half_sent_body_closed_after_read_timeout(master: EmbeddedCluster) -> None:
    with connect(master) as s:
        # with the token, so the handler is waiting on the body (not refusing before it)
        s.sendall(b"POST /volume/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + master.token.encode() + b"\r\n"
                  b"Content-Length: 100\r\n\r\n" + b'{"name": "' + b"v" * 40)
        took, got = wait_closed(s, READ_TIMEOUT + 5)
    assert got == b"", got  # no answer to a request that never arrived whole
    assert READ_TIMEOUT - 0.5 <= took <= READ_TIMEOUT + 1, took
    cluster_info(master)


def test_idle_keepalive_closed_after_idle_timeout(master: EmbeddedCluster) -> None:
    request = b"GET /cluster/info HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(master) as s:
        # a slow but complete request on a kept-alive connection is fine (the
        # deadline restarts per request), and the answers do not close it
        for _ in range(2):
            s.sendall(request[:10])
            time.sleep(READ_TIMEOUT * 0.6)
            s.sendall(request[10:])
            assert json.loads(read_response(s))["code"] == 0
        took, got = wait_closed(s, IDLE_TIMEOUT + 5)
    assert got == b""
    # idle is longer than the read timeout: this is the idle timer, not the read deadline
    assert IDLE_TIMEOUT - 0.5 <= took <= IDLE_TIMEOUT + 1, took


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_connection_cap_closes_least_recently_active(
        cluster_factory: Callable[..., EmbeddedCluster]) -> None:
    cap = 50
    # long timeouts: the flood stays open unless the cap closes it
    c = cluster_factory(0, 0, master={"http_read_timeout": 60, "http_idle_timeout": 60,
                                      "http_max_connections": cap})
    pid = c.pid("master")
    assert pid is not None
    cluster_info(c)
    baseline = open_fds(pid)
    flood: list[socket.socket] = []
    peak = 0

    def closed() -> list[bool]:
        return [closed_by_peer(s) for s in flood]
    try:
        for _ in range(cap + 40):
            flood.append(connect(c))
            peak = max(peak, open_fds(pid))
        wait_for(lambda: sum(closed()) >= 40, 10, "the master to close 40 connections")
        assert closed() == [True] * 40 + [False] * cap  # room was made from the oldest
        for _ in range(5):  # a client sending whole requests is served all along ...
            cluster_info(c)
            peak = max(peak, open_fds(pid))
        # ... the first by closing the least recently active of the others (the
        # next ones reuse that room: each client closes before the next comes)
        wait_for(lambda: sum(closed()) >= 41, 10, "the master to close 41 connections")
        assert closed() == [True] * 41 + [False] * (cap - 1)
        peak = max(peak, open_fds(pid))
    finally:
        for s in flood:
            s.close()
    assert peak <= baseline + cap + 3, (peak, baseline)


def test_master_raises_its_open_file_limit(cluster_factory: Callable[..., EmbeddedCluster]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    assert low < hard, "needs a hard open-file limit above 256"
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # the master inherits it
    try:
        c = cluster_factory(0, 0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with open(f"/proc/{c.pid('master')}/limits") as f:
        row = next(line for line in f if line.startswith("Max open files")).split()
    assert row[3:5] == [str(hard), str(hard)], row


def test_invalid_limits_fail_startup(tmp_path: pathlib.Path) -> None:
    c = EmbeddedCluster(str(tmp_path))
    try:
        with pytest.raises(ClusterError, match="master exited"):
            c.up(0, 0, timeout=30, extra={"master": {"http_read_timeout": "ten"}})
    finally:
        c.down()
    with open(c.log_path("master")) as f:
        assert "http_read_timeout must be a number of seconds > 0, got 'ten'" in f.read()


@pytest.mark.parametrize("cfg, key", [
    ({"http_read_timeout": 0}, "http_read_timeout"),
    ({"http_read_timeout": "10"}, "http_read_timeout"),
    ({"http_idle_timeout": float("inf")}, "http_idle_timeout"),
    ({"http_idle_timeout": True}, "http_idle_timeout"),
    ({"http_max_connections": 0}, "http_max_connections"),
    ({"http_max_connections": 10.5}, "http_max_connections"),
])
def test_invalid_limit_values_are_named(cfg: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        HttpLimits.from_config(cfg, 4096)


def test_connection_cap_leaves_fd_headroom() -> None:
    assert HttpLimits.from_config({}, 1 << 20) == HttpLimits(10.0, 30.0, 1024)
    assert HttpLimits.from_config({"http_max_connections": 5000}, 1024).max_connections == 1024 - FD_HEADROOM
    with pytest.raises(ValueError, match="open-file limit"):
        HttpLimits.from_config({}, FD_HEADROOM)
