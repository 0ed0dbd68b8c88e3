"""Bad input never crashes a server and never loses anything."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import urllib.error
import urllib.request

import pytest
from conftest import volume_cap

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.proto.rpc import RpcConnection
from shoalfs.proto.wire import HEADER, MAGIC, MAX_BODY, VERSION


def node_addrs(c: EmbeddedCluster) -> list[str]:
    return [n["listen"] for n in c.layout["nodes"].values()]


def send_raw(addr: str, payload: bytes) -> None:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        try:
            while s.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass


def ping(addr: str) -> dict:
    async def go() -> dict:
        conn = RpcConnection(addr)
        await conn.connect(5)
        try:
            return await conn.call(Op.PING, 0, {}, 5)
        finally:
            await conn.close()
    return asyncio.run(go())


GARBAGE = [
    b"",
    b"\x00",
    os.urandom(7),
    os.urandom(4096),
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    HEADER.pack(MAX_BODY + 1, MAGIC, VERSION, 0, Op.PING, 0, 1, 0, 0),  # oversized length
    HEADER.pack(10, 0xBEEF, VERSION, 0, Op.PING, 0, 1, 0, 0) + b"x" * 10,  # bad magic
    HEADER.pack(10, MAGIC, 99, 0, Op.PING, 0, 1, 0, 0) + b"x" * 10,  # bad version
    HEADER.pack(5, MAGIC, VERSION, 0, Op.PING, 0, 1, 0, 0) + b"\xc1\xc1\xc1\xc1\xc1",  # bad crc
    HEADER.pack(1000, MAGIC, VERSION, 0, Op.PING, 0, 1, 0, 0) + b"short",  # truncated
]


def test_garbage_to_every_node_port_leaves_it_serving(cluster: EmbeddedCluster) -> None:
    for addr in node_addrs(cluster):
        for payload in GARBAGE:
            send_raw(addr, payload)
        assert ping(addr)["addr"] == addr


def test_well_framed_nonsense_gets_error_codes(cluster: EmbeddedCluster) -> None:
    vol = cluster.create_volume("nonsense")
    meta = vol["meta_partitions"][0]
    data = vol["data_partitions"][0]

    cap = volume_cap(cluster, "nonsense")

    async def go() -> list[int]:
        codes = []
        cases = [
            (meta["replicas"][0], Op.META_GET_INODE, meta["pid"], {"ino": "not-an-int"}),
            (meta["replicas"][0], Op.META_LOOKUP, meta["pid"], {}),
            (meta["replicas"][0], Op.META_READDIR, meta["pid"], [1, 2, 3]),
            (meta["replicas"][0], 999, meta["pid"], {}),
            (meta["replicas"][0], Op.META_GET_INODE, 987654, {"ino": 1}),
            (meta["replicas"][0], Op.CREATE_PARTITION, 5555, {"vol_id": "x", "start": 1, "end": 2}),
            (data["replicas"][0], Op.DATA_WRITE, data["pid"], {"ext": 1, "offset": -5, "data": b"x"}),
            (data["replicas"][0], Op.DATA_READ, data["pid"], {"ext": 1, "offset": 0, "size": 1 << 40}),
            (data["replicas"][0], Op.DATA_WRITE, data["pid"], {"ext": 1, "offset": 0, "data": "str"}),
        ]
        for addr, op, pid, body in cases:
            conn = RpcConnection(addr)
            await conn.connect(5)
            try:
                await conn.authenticate(cap, 5)
                await conn.call(op, pid, body, 5)
                codes.append(0)
            except ShoalError as exc:
                codes.append(exc.code)
            finally:
                await conn.close()
        return codes

    codes = asyncio.run(go())
    assert codes == [Code.BAD_REQUEST, Code.BAD_REQUEST, Code.BAD_REQUEST, Code.BAD_REQUEST,
                     Code.PARTITION_NOT_EXIST, Code.FORBIDDEN, Code.BAD_REQUEST, Code.BAD_REQUEST,
                     Code.BAD_REQUEST]
    for addr in node_addrs(cluster):
        assert ping(addr)["addr"] == addr


def http(c: EmbeddedCluster, method: str, path: str, body: bytes | None = None,
         token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://{c.master_addr}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_bad_http_gets_an_envelope_not_a_500(cluster: EmbeddedCluster) -> None:
    tok = cluster.token
    cases = [
        ("GET", "/volume/info", None, None),
        ("GET", "/volume/info?name=", None, None),
        ("GET", "/volume/info?name=%00%ff", None, None),
        ("GET", "/no/such/route", None, None),
        ("POST", "/volume/create", b"{not json", tok),
        ("POST", "/volume/create", b"[1,2]", tok),
        ("POST", "/volume/create", json.dumps({"name": "ok-name"}).encode(), tok),
        ("POST", "/volume/create", json.dumps({"name": "../etc", "owner": "x"}).encode(), tok),
        ("POST", "/volume/create", json.dumps({"name": "v", "owner": "x", "capacity_gib": "lots"}).encode(), tok),
        ("POST", "/volume/create", json.dumps({"name": 5, "owner": "x"}).encode(), tok),
        ("POST", "/volume/create", json.dumps({"name": "v", "owner": "x"}).encode(), None),
        ("POST", "/volume/create", json.dumps({"name": "v", "owner": "x"}).encode(), "wrong"),
        ("POST", "/volume/delete", json.dumps({}).encode(), tok),
        ("POST", "/node/register", json.dumps({"role": "king", "addr": "x"}).encode(), tok),
    ]
    for method, path, body, token in cases:
        status, env = http(cluster, method, path, body, token)
        assert status < 500, (path, body, status, env)
        assert set(env) == {"code", "msg", "data"}, env
        assert env["code"] != 0, (path, body, env)
        assert isinstance(env["msg"], str) and env["msg"]
    status, env = http(cluster, "POST", "/volume/create", json.dumps({"name": "v", "owner": "x"}).encode())
    assert status == 401 and env["code"] == Code.UNAUTHORIZED
    status, env = http(cluster, "GET", "/volume/info?name=nope", token=tok)
    assert env["code"] == Code.VOLUME_NOT_EXIST
    assert http(cluster, "GET", "/cluster/info")[1]["code"] == 0


def test_secrets_are_private(cluster: EmbeddedCluster) -> None:
    """Tokens 0600; the signing key only in etcd (0700), never in a master's files."""
    for path in (cluster.token_file, cluster.node_token_file):
        assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.join(cluster.dir, "data", "etcd")).st_mode & 0o777 == 0o700
    master_files = os.listdir(os.path.join(cluster.dir, "data", "master"))
    assert "master.key" not in master_files and sorted(master_files) == ["admin.token", "node.token"]
    for name in cluster.names():
        if name != "etcd":
            assert os.stat(os.path.join(cluster.dir, "conf", f"{name}.json")).st_mode & 0o777 == 0o600


def test_corrupted_block_is_detected_on_read(cluster: EmbeddedCluster) -> None:
    cluster.create_volume("corrupt", replicas=1)  # the only copy (with more, another one is read)
    with cluster.connect("corrupt") as vol:
        with vol.open("/victim", "wb") as f:
            f.write(b"A" * 100_000)
            f.fsync()
        ino = vol.stat("/victim").st_ino
        extents = asyncio.run_coroutine_threadsafe(vol.client.extents(ino), vol._loop.loop).result()
        (dp, ext), = extents.values()
        paths = [os.path.join(root, f"e_{ext}") for root, _, files in os.walk(os.path.join(cluster.dir, "data"))
                 if f"e_{ext}" in files and root.endswith(f"dp_{dp}")]
        assert len(paths) == 1
        with open(paths[0], "r+b") as f:
            f.seek(50_000)
            f.write(b"B")
        with pytest.raises(OSError) as err:
            vol.open("/victim", "rb").read()
        assert err.value.errno == 5  # EIO, never wrong bytes
        # the rest of the file (other blocks) is still readable
        with vol.open("/victim", "rb") as f:
            assert f.read(40_000) == b"A" * 40_000


def test_disk_full_is_a_clear_error(cluster_factory) -> None:
    # a datanode whose reserve exceeds the free space behaves as a full disk
    c = cluster_factory(datanode={"reserve_bytes": 1 << 60})
    c.create_volume("full")
    with c.connect("full") as vol:
        f = vol.open("/x", "wb")
        f.write(b"data")
        with pytest.raises(OSError) as err:
            f.close()
        assert err.value.errno == 28  # ENOSPC
        assert vol.listdir("/") == ["x"]  # metadata still works


def test_frame_header_layout_is_stable() -> None:
    assert HEADER.size == 34
    assert struct.calcsize("!IHBBHIQQI") == 34
