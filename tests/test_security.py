"""Access control (issue 8, DESIGN.md §7): volume keys, capabilities signed by
the master and checked by every node, sessions bound to their capability, a
node credential apart from the admin token, and private files on disk.

Real processes throughout; raw RPCs and raw HTTP play the hostile peer."""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import RawRpc, shoal_env, volume_cap, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.client.core import ClientOptions
from shoalfs.client.mount import is_mounted
from shoalfs.proto import capability
from shoalfs.proto.capability import Capability
from shoalfs.proto.errors import Code
from shoalfs.proto.layout import extent_id
from shoalfs.proto.opcodes import Op

CONTENT = b"the quick brown fox jumps over the lazy dog\n" * 100


def opts(watch: bool = False) -> ClientOptions:
    """A fresh set each time (connect fills in tls_ca): a test that goes wrong fails in seconds.
    Short-lived handles run without the lifecycle guard unless a test is about it."""
    return ClientOptions(op_deadline=15.0, watch=watch)


# ----- helpers ---------------------------------------------------------------------
def shoal(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoalfs.cli", *args], capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=timeout, stdin=subprocess.DEVNULL)


def http(c: EmbeddedCluster, method: str, path: str, body: Any = None,
         auth: str | None = None) -> tuple[int, dict[str, Any]]:
    """One request to the master: (HTTP status, envelope)."""
    headers = {"Authorization": auth} if auth else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(c._url(path), data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10, context=c._tls()) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def random_key() -> str:
    """Well-formed, but no volume's key."""
    return f"shoal1-{secrets.token_hex(8)}-{secrets.token_hex(32)}"


def forged(vol_id: str, rights: str = capability.READ_WRITE, key_id: str = "owner") -> str:
    """A capability in the right format, signed by a key that is not the master's."""
    cap = Capability(vol_id, rights, secrets.token_hex(16), key_id, time.time() + 600)
    return capability.issue(Ed25519PrivateKey.generate(), cap)


def key_ids(c: EmbeddedCluster, volume: str) -> dict[str, str]:
    """name -> key id of the volume's keys (admin)."""
    return {k["name"]: k["key_id"] for k in c.http_get(f"/key/list?volume={volume}")}


def meta_partition(vol: dict[str, Any], ino: int) -> dict[str, Any]:
    return next(p for p in vol["meta_partitions"] if p["start"] <= ino < p["end"])


def data_partition(vol: dict[str, Any], ino: int, chunk: int) -> dict[str, Any]:
    dps = vol["data_partitions"]
    return dps[(ino + chunk) % len(dps)]


def node_name(c: EmbeddedCluster, addr: str) -> str:
    return next(n for n, node in c.layout["nodes"].items() if node["listen"] == addr)


def data_partition_files(c: EmbeddedCluster, vol: dict[str, Any]) -> dict[str, bytes]:
    """Every file of the volume's data partitions on every datanode that holds one."""
    out: dict[str, bytes] = {}
    for part in vol["data_partitions"]:
        for addr in part["replicas"]:
            pdir = os.path.join(c.dir, "data", node_name(c, addr), f"dp_{part['pid']}")
            for name in sorted(os.listdir(pdir)):
                with open(os.path.join(pdir, name), "rb") as f:
                    out[os.path.join(pdir, name)] = f.read()
    return out


def volume_snapshot(vol: Any) -> dict[str, Any]:
    """What a user of the volume sees: listings, attributes and content."""
    def attrs(path: str) -> tuple[int, ...]:
        s = vol.stat(path)
        return (s.st_ino, s.st_mode, s.st_uid, s.st_gid, s.st_size, s.st_nlink, s.st_mtime_ns, s.st_ctime_ns)
    with vol.open("/f", "rb") as f:
        content = f.read()
    return {"root": sorted(vol.listdir("/")), "d": sorted(vol.listdir("/d")), "f": attrs("/f"),
            "d/x": attrs("/d/x"), "content": content}


def write_key_file(path: Any, key: str) -> str:
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return str(path)


def make_volume(c: EmbeddedCluster, name: str) -> dict[str, Any]:
    """A volume with /f (CONTENT, mode 0640), /d and /d/x, written with the owner key."""
    vol = c.create_volume(name)
    with c.connect(name, opts()) as v:
        with v.open("/f", "wb") as f:
            f.write(CONTENT)
        v.chmod("/f", 0o640)
        v.mkdir("/d")
        with v.open("/d/x", "wb") as f:
            f.write(b"x")
    return vol


# ----- 1. the SDK needs a key of the volume -------------------------------------------
def test_sdk_without_a_valid_key_is_denied(cluster: EmbeddedCluster, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Any) -> None:
    """No key, a random key, a real key id with a wrong secret, another volume's key: PermissionError."""
    c = cluster
    c.create_volume("sdk-keys")
    c.create_volume("sdk-other")
    with c.connect("sdk-keys", opts()) as vol:  # the owner key opens it
        vol.open("/hello", "wb").close()
    monkeypatch.delenv("SHOAL_KEY_FILE", raising=False)
    monkeypatch.setenv("SHOAL_DATA", str(tmp_path))  # an embedded-cluster directory without keys

    with pytest.raises(PermissionError) as no_key:
        c.connect("sdk-keys", opts(), key_file=None)  # not the cluster's key store either
    assert "access denied to volume sdk-keys" in str(no_key.value)

    with pytest.raises(PermissionError) as wrong:
        c.connect("sdk-keys", opts(), key=random_key())
    assert "access denied to volume sdk-keys" in str(wrong.value)

    owner_id = key_ids(c, "sdk-keys")["owner"]
    with pytest.raises(PermissionError) as wrong_secret:
        c.connect("sdk-keys", opts(), key=f"shoal1-{owner_id}-{secrets.token_hex(32)}")
    assert "access denied to volume sdk-keys" in str(wrong_secret.value)

    with pytest.raises(PermissionError) as other:
        c.connect("sdk-keys", opts(), key_file=c.key_file("sdk-other"))
    assert "access denied to volume sdk-keys" in str(other.value)
    with c.connect("sdk-other", opts()) as vol:
        assert vol.listdir("/") == []  # that key is good, for its own volume


# ----- 2. a mount needs one too ---------------------------------------------------------
@pytest.mark.fuse
def test_mount_without_a_valid_key_exits_1_with_one_line(cluster: EmbeddedCluster, tmp_path: Any) -> None:
    """Missing key file, wrong key, revoked key, another volume's key, no key at all:
    exit 1, one line, nothing mounted."""
    c = cluster
    c.create_volume("mnt-keys")
    c.create_volume("mnt-other")
    wrong = write_key_file(tmp_path / "wrong.key", random_key())
    revoked = write_key_file(tmp_path / "revoked.key",
                             c.admin("/key/create", {"volume": "mnt-keys", "name": "gone"})["key"])
    c.admin("/key/revoke", {"volume": "mnt-keys", "name": "gone"})
    env = dict(os.environ, SHOAL_DATA=str(tmp_path / "no-cluster"))
    env.pop("SHOAL_KEY_FILE", None)
    cases = {"missing": ["-o", "key_file=/nonexistent/none.key"], "wrong": ["-o", f"key_file={wrong}"],
             "revoked": ["--key-file", revoked], "other volume's": ["-o", f"key_file={c.key_file('mnt-other')}"],
             "no": []}
    procs = {}
    for what, extra in cases.items():  # together: each is a Python start-up
        mnt = tmp_path / f"mnt-{len(procs)}"
        mnt.mkdir()
        procs[what] = (str(mnt), subprocess.Popen(
            [sys.executable, "-m", "shoalfs.cli", "mount", "mnt-keys", str(mnt), "--master", c.master_addr,
             "--foreground", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env=env, cwd=str(tmp_path)))
    for what, (mnt, proc) in procs.items():
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"mount with {what} key did not exit") from None
        text = out + err
        assert proc.returncode == 1, (what, text)
        lines = [line for line in text.splitlines() if "access denied to volume mnt-keys" in line]
        assert len(lines) == 1, (what, text)
        assert lines[0].startswith("shoal: error: access denied to volume mnt-keys"), (what, text)
        assert "Traceback" not in text, (what, text)
        assert not is_mounted(mnt), what
        assert os.listdir(mnt) == [], what


# ----- 3. every node checks every request -----------------------------------------------
def test_raw_rpcs_without_a_capability_of_the_volume_change_nothing(cluster: EmbeddedCluster) -> None:
    """Reads, writes, setattr, create, delete and extent ops on volume A: refused without a
    capability, with volume B's, with a forged one; node commands refused with A's own."""
    c = cluster
    vol = make_volume(c, "rpc-a")
    c.create_volume("rpc-b")
    with c.connect("rpc-a", opts()) as v:
        ino = v.stat("/f").st_ino
        before = volume_snapshot(v)
        extents = v._run(v.client.extents(ino))
    assert before["f"][1] & 0o7777 == 0o640 and before["f"][2] != 4242
    mp_f, mp_root, dp = meta_partition(vol, ino), meta_partition(vol, 1), data_partition(vol, ino, 0)
    ext = extent_id(ino, 0)
    assert extents == {0: [dp["pid"], ext]}, extents  # chunk k: extent ino << 20 | k on dps[(ino + k) % n]
    other_dp = next(p for p in vol["data_partitions"] if p["pid"] != dp["pid"])
    disk_before = data_partition_files(c, vol)
    assert any(path.endswith(f"/e_{ext}") and data == CONTENT for path, data in disk_before.items())

    volume_ops: list[tuple[int, dict[str, Any], dict[str, Any]]] = [
        # reads
        (Op.META_GET_INODE, mp_f, {"ino": ino}),
        (Op.META_READDIR, mp_root, {"parent": 1}),
        (Op.DATA_READ, dp, {"ext": ext, "offset": 0, "size": 64}),
        # write
        (Op.DATA_WRITE, dp, {"ext": ext, "offset": 0, "data": b"EVIL" * 16}),
        # setattr: setuid for everyone, another owner
        (Op.META_SET_ATTR, mp_f, {"ino": ino, "mode": 0o4777, "uid": 4242}),
        # create
        (Op.META_CREATE, mp_root, {"parent": 1, "name": "evil", "mode": stat.S_IFREG | 0o644}),
        # delete
        (Op.META_DELETE_DENTRY, mp_root, {"parent": 1, "name": "f"}),
        (Op.META_UNLINK_INODE, mp_f, {"ino": ino}),
        # extent ops
        (Op.META_EXTENT_SET, mp_f, {"ino": ino, "chunk": 0, "dp": other_dp["pid"], "ext": extent_id(ino, 7)}),
        (Op.META_EXTENT_DROP, mp_f, {"ino": ino, "chunks": [0]}),
        (Op.DATA_TRUNCATE, dp, {"ext": ext, "size": 0}),
        (Op.DATA_DELETE_EXTENT, dp, {"ext": ext}),
    ]
    owner_id = key_ids(c, "rpc-a")["owner"]
    cap_a, cap_b = volume_cap(c, "rpc-a"), volume_cap(c, "rpc-b")
    # the harness works: A's own capability reads A
    code, reply = RawRpc(cap_a)(mp_f["replicas"][0], Op.META_GET_INODE, mp_f["pid"], {"ino": ino})
    assert code == 0 and reply["uid"] == before["f"][2], (code, reply)

    wrong: list[tuple[Any, ...]] = []
    for who, cap, want in (("no capability", None, Code.UNAUTHORIZED),
                           ("volume B's capability", cap_b, Code.FORBIDDEN),
                           ("a forged capability", forged(vol["vol_id"], key_id=owner_id), Code.UNAUTHORIZED)):
        rpc = RawRpc(cap)
        for op, part, body in volume_ops:
            for addr in part["replicas"]:
                code, msg = rpc(addr, op, part["pid"], body)
                if code != want:
                    wrong.append((who, Op(op).name, addr, code, msg))

    # node commands: only the master may send them, not a client of the volume
    node_ops: list[tuple[int, int, dict[str, Any]]] = [
        (Op.HEARTBEAT, 0, {"read_only": [vol["vol_id"]], "revoked": [owner_id]}),
        (Op.CREATE_PARTITION, 990001, {"vol_id": vol["vol_id"], "replicas": [], "start": 1 << 41,
                                       "end": (1 << 41) + 10}),
    ]
    for who, cap, want in (("volume A's own capability", cap_a, Code.FORBIDDEN),
                           ("no capability", None, Code.UNAUTHORIZED),
                           ("a forged master capability", forged("", capability.MASTER, "master"),
                            Code.UNAUTHORIZED)):
        rpc = RawRpc(cap)
        for part in vol["meta_partitions"] + vol["data_partitions"]:
            for addr in part["replicas"]:
                for op, pid, body in node_ops + [(Op.DELETE_PARTITION, part["pid"], {})]:
                    code, msg = rpc(addr, op, pid, body)
                    if code != want:
                        wrong.append((who, Op(op).name, addr, code, msg))
    assert wrong == []

    with c.connect("rpc-a", opts()) as v:  # the owner sees exactly what was there
        assert volume_snapshot(v) == before
        assert v._run(v.client.extents(ino)) == extents
    assert data_partition_files(c, vol) == disk_before


# ----- 4. a read-only key -----------------------------------------------------------------
@pytest.mark.fuse
def test_read_only_key_reads_and_every_change_is_erofs(cluster: EmbeddedCluster, mount_factory: Any,
                                                       tmp_path: Any) -> None:
    """SDK and FUSE with a read-only key read the volume; every change fails EROFS; nodes
    answer READ_ONLY to raw writes with its capability."""
    c = cluster
    vol = make_volume(c, "ro-vol")
    created = c.admin("/key/create", {"volume": "ro-vol", "name": "reader", "read_only": True})
    assert created["rights"] == capability.READ_ONLY
    key = created["key"]
    with c.connect("ro-vol", opts()) as v:
        before = volume_snapshot(v)

    def write_existing(ro: Any) -> None:
        with ro.open("/f", "r+b") as f:
            f.write(b"changed")

    changes = {"create": lambda ro: ro.open("/new", "wb").close(), "write": write_existing,
               "truncate": lambda ro: ro.open("/f", "wb").close(), "mkdir": lambda ro: ro.mkdir("/newdir"),
               "remove": lambda ro: ro.remove("/f"), "remove in a directory": lambda ro: ro.remove("/d/x"),
               "chmod": lambda ro: ro.chmod("/f", 0o777), "rename": lambda ro: ro.rename("/f", "/g")}
    with c.connect("ro-vol", opts(), key=key) as ro:
        with ro.open("/f", "rb") as f:
            assert f.read() == CONTENT
        assert sorted(ro.listdir("/")) == ["d", "f"]
        for what, change in changes.items():
            with pytest.raises(OSError) as exc:
                change(ro)
            assert exc.value.errno == errno.EROFS, (what, exc.value)

    ro_cap = volume_cap(c, "ro-vol", key=key)
    with c.connect("ro-vol", opts()) as v:
        ino = v.stat("/f").st_ino
    dp, mp_root = data_partition(vol, ino, 0), meta_partition(vol, 1)
    rpc = RawRpc(ro_cap)
    code, reply = rpc(dp["replicas"][0], Op.DATA_READ, dp["pid"], {"ext": extent_id(ino, 0), "offset": 0, "size": 16})
    assert code == 0 and reply["data"] == CONTENT[:16], (code, reply)
    assert rpc(dp["replicas"][0], Op.DATA_WRITE, dp["pid"],
               {"ext": extent_id(ino, 0), "offset": 0, "data": b"EVIL"})[0] == Code.READ_ONLY
    assert rpc(mp_root["replicas"][0], Op.META_CREATE, mp_root["pid"],
               {"parent": 1, "name": "evil", "mode": stat.S_IFREG | 0o644})[0] == Code.READ_ONLY

    m = mount_factory(c, "ro-vol", [f"key_file={write_key_file(tmp_path / 'reader.key', key)}"])
    with open(os.path.join(m.path, "f"), "rb") as f:
        assert f.read() == CONTENT
    assert sorted(os.listdir(m.path)) == ["d", "f"]
    for what, change in {"create": lambda: open(os.path.join(m.path, "new"), "wb").close(),
                         "write": lambda: open(os.path.join(m.path, "f"), "r+b").close(),
                         "remove": lambda: os.unlink(os.path.join(m.path, "f"))}.items():
        with pytest.raises(OSError) as exc:
            change()
        assert exc.value.errno == errno.EROFS, (what, exc.value)

    with c.connect("ro-vol", opts()) as v:
        assert volume_snapshot(v) == before


# Regression: Volume.close() could hang for ever. LifecycleGuard.stop() cancelled the subscription
# tasks and awaited them unbounded, closing their connections only afterwards; on Python 3.11
# asyncio.wait_for swallows a cancellation that lands in the step its reply arrives, so a task in
# connect, AUTH or SUBSCRIBE went on to wait for a subscriber connection nobody closes (about 3 % of
# handles closed right after opening). stop() now sets a flag the loops check and closes the
# connections before it waits (bounded).
def test_sdk_handle_closed_right_after_open_does_not_hang(cluster: EmbeddedCluster) -> None:
    """An SDK handle with its lifecycle guard (the default) closes promptly, however soon after opening."""
    c = cluster
    c.create_volume("close-vol")
    for attempt in range(150):
        vol = c.connect("close-vol", opts(watch=True))
        vol.stat("/")
        closer = threading.Thread(target=vol.close, daemon=True)  # a hung close must not hang the test run
        closer.start()
        wait_for(lambda t=closer: not t.is_alive(), 10, f"Volume.close() to return (attempt {attempt + 1})")


# ----- 5. revocation ------------------------------------------------------------------------
@pytest.mark.fuse
def test_revoked_key_loses_access_within_seconds_and_the_mount_stays(cluster: EmbeddedCluster,
                                                                      mount_factory: Any, tmp_path: Any) -> None:
    """`shoal key revoke`: an open SDK handle and a FUSE mount get EACCES within seconds, the
    mount keeps running, the key buys nothing, its old capability is refused; the owner is unaffected."""
    c = cluster
    vol = make_volume(c, "rev-vol")
    key = c.admin("/key/create", {"volume": "rev-vol", "name": "second", "read_only": False})["key"]
    key_file = write_key_file(tmp_path / "second.key", key)
    old_cap = volume_cap(c, "rev-vol", key=key)  # bought before the revocation
    mp = meta_partition(vol, 1)
    dp = vol["data_partitions"][0]
    assert RawRpc(old_cap)(mp["replicas"][0], Op.META_GET_INODE, mp["pid"], {"ino": 1})[0] == 0

    sdk = c.connect("rev-vol", opts(watch=True), key=key)  # as an application opens it: heartbeats too
    try:
        with sdk.open("/by-sdk", "wb") as f:
            f.write(b"sdk")
        m = mount_factory(c, "rev-vol", [f"key_file={key_file},heartbeat=1"])
        with open(os.path.join(m.path, "by-mount"), "wb") as f:
            f.write(b"mount")

        proc = shoal("key", "revoke", "rev-vol", "second", env=shoal_env(c))
        assert proc.returncode == 0, proc
        assert sorted(key_ids(c, "rev-vol")) == ["owner"]

        def sdk_denied() -> bool:
            try:
                sdk.listdir("/")
                return False
            except PermissionError:
                return True

        probes = iter(range(1_000_000))

        def mount_denied() -> bool:
            try:
                with open(os.path.join(m.path, f"probe{next(probes)}"), "wb") as f:
                    f.write(b"p")
                return False
            except OSError as exc:
                if exc.errno == errno.EACCES:
                    return True
                raise

        wait_for(sdk_denied, 10, "the SDK handle to get EACCES")
        wait_for(mount_denied, 10, "the mount to answer EACCES")
        with pytest.raises(PermissionError):
            sdk.stat("/f")
        assert m.proc is not None
        assert m.proc.poll() is None, m.log()[-2000:]
        assert is_mounted(m.path)
        time.sleep(2.5)  # proving a negative: heartbeats (every 1 s) are refused, the mount does not exit
        assert m.proc.poll() is None, m.log()[-2000:]
        assert is_mounted(m.path)
        with pytest.raises(OSError) as exc:
            os.listdir(m.path)
        assert exc.value.errno == errno.EACCES, exc.value
    finally:
        sdk.close()

    with pytest.raises(PermissionError):
        c.connect("rev-vol", opts(), key=key)
    with pytest.raises(PermissionError):
        c.connect("rev-vol", opts(), key_file=key_file)
    with c.connect("rev-vol", opts()) as owner:
        with owner.open("/by-owner", "wb") as f:
            f.write(b"owner")
        assert {"f", "d", "by-sdk", "by-mount", "by-owner"} <= set(owner.listdir("/"))
        with owner.open("/by-mount", "rb") as f:
            assert f.read() == b"mount"
    old = RawRpc(old_cap)
    assert old(mp["replicas"][0], Op.META_GET_INODE, mp["pid"], {"ino": 1})[0] == Code.UNAUTHORIZED
    assert old(dp["replicas"][0], Op.DATA_READ, dp["pid"], {"ext": extent_id(2, 0), "offset": 0,
                                                          "size": 1})[0] == Code.UNAUTHORIZED
    status, env = http(c, "POST", "/client/renew", {}, auth=f"Capability {old_cap}")
    assert (status, env["code"]) == (401, Code.UNAUTHORIZED), env


# Regression: the master accepted a revoked key's unexpired capability on the endpoints that
# take "a capability of the volume" (/volume/info, /volume/stat, /volume/tombstone) until it
# expired, while nodes refused it within a second. Master._wrap now refuses revoked key ids.
def test_master_refuses_a_revoked_keys_capability_at_once(cluster: EmbeddedCluster) -> None:
    """After `key revoke`, the master refuses that key's unexpired capability everywhere:
    heartbeat, renew, and the volume endpoints a capability may read."""
    c = cluster
    c.create_volume("rev-master")
    key = c.admin("/key/create", {"volume": "rev-master", "name": "gone"})["key"]
    cap = volume_cap(c, "rev-master", key=key)
    status, env = http(c, "GET", "/volume/info?name=rev-master", auth=f"Capability {cap}")
    assert (status, env["code"]) == (200, 0), env  # valid before
    c.admin("/key/revoke", {"volume": "rev-master", "name": "gone"})
    for method, path in (("POST", "/client/heartbeat"), ("POST", "/client/renew"),
                         ("GET", "/volume/info?name=rev-master"), ("GET", "/volume/stat?name=rev-master"),
                         ("GET", f"/volume/tombstone?vol_id={env['data']['vol_id']}")):
        status, answer = http(c, method, path, {} if method == "POST" else None, auth=f"Capability {cap}")
        assert (status, answer["code"]) == (401, Code.UNAUTHORIZED), (path, answer)
        assert answer["data"] is None, (path, answer)


# ----- 6. sessions ------------------------------------------------------------------------
def test_client_sessions_are_bound_to_their_capability(cluster: EmbeddedCluster) -> None:
    """Heartbeats need a real capability and well-formed fields; listing shows no session
    ids; a goodbye ends only its own session; the volume can then be deleted."""
    c = cluster
    c.create_volume("sess-vol")
    for auth in (None, f"Capability {forged(c.http_get('/volume/info?name=sess-vol')['vol_id'])}",
                 "Capability not-a-capability", f"Bearer {c.token}"):
        status, env = http(c, "POST", "/client/heartbeat", {"pid": 1}, auth=auth)
        assert (status, env["code"]) == (401, Code.UNAUTHORIZED), (auth, env)
    cap1, cap2 = volume_cap(c, "sess-vol"), volume_cap(c, "sess-vol")
    for bad in ({"mounted_at": "yesterday"}, {"pid": "x"}, {"pid": -1}, {"host": ["h"]}):
        status, env = http(c, "POST", "/client/heartbeat", bad, auth=f"Capability {cap1}")
        assert (status, env["code"]) == (400, Code.BAD_REQUEST), (bad, env)

    def clients() -> tuple[list[dict[str, Any]], str]:
        proc = shoal("volume", "clients", "sess-vol", "--json", env=shoal_env(c))
        assert proc.returncode == 0, proc
        return json.loads(proc.stdout), proc.stdout

    rows, _ = clients()
    assert rows == []  # a refused heartbeat registers nothing
    now = time.time()
    for cap, pid in ((cap1, 1111), (cap2, 2222)):
        # fields the master sets itself, sent by the client too: ignored
        status, env = http(c, "POST", "/client/heartbeat",
                           {"host": "h", "pid": pid, "mountpoint": f"/mnt/{pid}", "version": "t", "mounted_at": now,
                            "session": "chosen-by-client", "key": "admin", "rights": "rw", "vol_id": "x"},
                           auth=f"Capability {cap}")
        assert (status, env["code"]) == (200, 0), env
        assert isinstance(env["data"]["capability"], str)
    rows, text = clients()
    assert sorted(r["pid"] for r in rows) == [1111, 2222], rows
    assert all("session" not in r for r in rows), rows
    assert [(r["key"], r["rights"]) for r in rows] == [("owner", "rw")] * 2, rows
    assert "chosen-by-client" not in text
    master_key = capability.load_public(c.http_get("/cluster/info")["master_pubkey"])
    for cap in (cap1, cap2):
        assert capability.verify(master_key, cap).session not in text
        assert cap not in text

    status, env = http(c, "POST", "/client/goodbye", {}, auth=f"Capability {cap1}")
    assert (status, env["code"]) == (200, 0), env
    rows, _ = clients()
    assert [r["pid"] for r in rows] == [2222], rows

    proc = shoal("volume", "delete", "sess-vol", "--yes", env=shoal_env(c))
    assert proc.returncode == 0, proc
    assert "sess-vol" not in {v["name"] for v in c.http_get("/volume/list")}


# ----- 7. master endpoints ------------------------------------------------------------------
def test_master_endpoints_need_the_right_credential(cluster: EmbeddedCluster) -> None:
    """Admin-only reads refuse strangers; a capability sees only its own volume; the node
    token and the admin token do not stand in for each other."""
    c = cluster
    c.create_volume("ep-a")
    c.create_volume("ep-b")
    for path in ("/volume/info?name=ep-a", "/volume/list", "/cluster/nodes", "/volume/clients?name=ep-a",
                 "/key/list?volume=ep-a", "/volume/stat?name=ep-a"):
        status, env = http(c, "GET", path)
        assert (status, env["code"]) == (401, Code.UNAUTHORIZED), (path, env)
        assert env["data"] is None, (path, env)
    cap_a, cap_b = volume_cap(c, "ep-a"), volume_cap(c, "ep-b")
    status, env = http(c, "GET", "/volume/info?name=ep-a", auth=f"Capability {cap_a}")
    assert (status, env["code"], env["data"]["name"]) == (200, 0, "ep-a"), env
    assert "keys" not in env["data"]
    vol_a = env["data"]["vol_id"]
    for path in ("/volume/info?name=ep-a", "/volume/stat?name=ep-a", f"/volume/tombstone?vol_id={vol_a}"):
        status, env = http(c, "GET", path, auth=f"Capability {cap_b}")
        assert (status, env["code"]) == (401, Code.FORBIDDEN), (path, env)
        assert env["data"] is None, (path, env)
    for path in ("/volume/list", "/cluster/nodes", "/volume/clients?name=ep-a", "/key/list?volume=ep-a"):
        status, env = http(c, "GET", path, auth=f"Capability {cap_a}")  # a capability is not the admin token
        assert (status, env["code"]) == (401, Code.UNAUTHORIZED), (path, env)
    status, env = http(c, "GET", "/cluster/info")
    assert (status, env["code"]) == (200, 0), env

    with open(c.node_token_file) as f:
        node_token = f.read().strip()
    status, env = http(c, "POST", "/volume/create", {"name": "ep-by-node", "owner": "x"}, auth=f"Bearer {node_token}")
    assert (status, env["code"]) == (401, Code.UNAUTHORIZED), env
    status, env = http(c, "POST", "/key/create", {"volume": "ep-a", "name": "by-node"}, auth=f"Bearer {node_token}")
    assert (status, env["code"]) == (401, Code.UNAUTHORIZED), env
    status, env = http(c, "POST", "/node/register", {"role": "metanode", "addr": "127.0.0.1:1"},
                       auth=f"Bearer {c.token}")
    assert (status, env["code"]) == (401, Code.UNAUTHORIZED), env
    names = {v["name"] for v in c.http_get("/volume/list")}
    assert "ep-by-node" not in names and {"ep-a", "ep-b"} <= names
    assert "by-node" not in key_ids(c, "ep-a")
    assert "127.0.0.1:1" not in {n["addr"] for n in c.http_get("/cluster/nodes")}


# ----- 8. the node credential ---------------------------------------------------------------
def node_files(c: EmbeddedCluster) -> list[str]:
    """Every node's logs and data files."""
    out = []
    for name in c.layout["nodes"]:
        out.append(c.log_path(name))
        for root, _, files in os.walk(os.path.join(c.dir, "data", name)):
            out += [os.path.join(root, f) for f in files]
    return out


def test_nodes_never_see_the_admin_token(cluster: EmbeddedCluster) -> None:
    """Node configs name the node token, not the admin token; the admin token is in no
    node config, log or data file."""
    c = cluster
    make_volume(c, "cred-vol")  # some traffic first: volume creation, writes, a key
    c.admin("/key/create", {"volume": "cred-vol", "name": "extra"})
    admin = c.token
    with open(c.node_token_file) as f:
        node_token = f.read().strip()
    assert len(admin) >= 32 and len(node_token) >= 32 and node_token != admin

    assert c.layout["nodes"]
    for name in c.layout["nodes"]:
        path = os.path.join(c.dir, "conf", f"{name}.json")
        with open(path) as f:
            text = f.read()
        assert json.loads(text)["token_file"] == c.node_token_file, path
        assert c.token_file not in text and "admin.token" not in text and admin not in text, path

    files = node_files(c)
    assert any("/dp_" in f for f in files) and any("/mp_" in f for f in files), files
    leaks = []
    for path in files:
        try:
            with open(path, "rb") as f:
                if admin.encode() in f.read():
                    leaks.append(path)
        except FileNotFoundError:  # a temporary file renamed meanwhile
            continue
    assert leaks == []


# ----- 9. private files ---------------------------------------------------------------------
def test_cluster_files_are_private(cluster: EmbeddedCluster) -> None:
    """Data, logs, keys and configs are 0600 files; data and key directories and the cluster
    directory itself are 0700."""
    c = cluster
    make_volume(c, "modes-vol")
    with c.connect("modes-vol", opts()) as v:
        with v.open("/big", "wb") as f:
            f.write(os.urandom(1 << 20))
    c.admin("/key/create", {"volume": "modes-vol", "name": "k"})

    wrong: list[tuple[str, str]] = []
    seen = {"files": 0, "dirs": 0}

    def check(path: str, want: int) -> None:
        try:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
        except FileNotFoundError:  # a temporary file renamed meanwhile
            return
        seen["dirs" if want == 0o700 else "files"] += 1
        if mode != want:
            wrong.append((path, oct(mode)))

    check(c.dir, 0o700)
    for sub, dirs_too in (("data", True), ("keys", True), ("logs", False), ("conf", False)):
        top = os.path.join(c.dir, sub)
        if dirs_too:
            check(top, 0o700)
        for root, dirs, files in os.walk(top):
            for d in dirs:
                if dirs_too:
                    check(os.path.join(root, d), 0o700)
            for f in files:
                if os.path.isfile(os.path.join(root, f)):
                    check(os.path.join(root, f), 0o600)
    assert seen["files"] > 20 and seen["dirs"] > 8, seen
    assert wrong == []
