"""Three copies of every data partition (DESIGN.md §6): real datanodes killed,
stopped and damaged under a write workload; nothing acknowledged is lost."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from conftest import RawRpc, shoal_env, volume_cap, wait_for

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op


class Workload:
    """A thread writing new files until stopped, through the SDK or (with
    `mount`, a mounted directory) the kernel; records every acknowledged
    file (its bytes), every error and the longest write."""

    def __init__(self, c: EmbeddedCluster, volume: str, prefix: str = "w", size: int = 96 * 1024,
                 mount: str | None = None) -> None:
        self.vol = c.connect(volume) if mount is None else None
        self.mount = mount
        self.prefix = prefix
        self.size = size
        self.acked: dict[str, bytes] = {}
        self.errors: list[BaseException] = []
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Workload:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self.vol is not None:
            self.vol.close()

    def _write(self, path: str, data: bytes) -> None:
        if self.vol is not None:
            with self.vol.open(path, "wb") as f:
                f.write(data)
        else:
            assert self.mount is not None
            with open(self.mount + path, "wb") as f:
                f.write(data)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            path, data = f"/{self.prefix}{i}", os.urandom(self.size + i % 4096)
            start = time.monotonic()
            try:
                self._write(path, data)
            except OSError as exc:
                self.errors.append(exc)
                continue
            finally:
                i += 1
            self.longest = max(self.longest, time.monotonic() - start)
            self.acked[path] = data

    def wait_for_writes(self, n: int) -> None:
        start = len(self.acked)
        wait_for(lambda: len(self.acked) >= start + n or self.errors, 90, f"{n} more acknowledged writes")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)


def views(c: EmbeddedCluster, volume: str, kind: str = "data") -> list[dict[str, Any]]:
    info = c.http_get(f"/volume/info?name={volume}")
    assert info is not None, "volume info"
    return list(info[f"{kind}_partitions"])


def data_views(c: EmbeddedCluster, volume: str) -> list[dict[str, Any]]:
    return views(c, volume, "data")


def node_of(c: EmbeddedCluster, addr: str) -> str:
    return next(n for n, spec in c.layout["nodes"].items() if spec["listen"] == addr)


def fully_replicated(c: EmbeddedCluster, volume: str) -> bool:
    return all(sorted(p["in_sync"]) == sorted(p["replicas"])
               for kind in ("meta", "data") for p in views(c, volume, kind))


def replica_files(c: EmbeddedCluster, pid: int) -> dict[str, dict[str, str]]:
    """node -> extent file name -> sha256, for every copy of a data partition."""
    out = {}
    for name in c.layout["nodes"]:
        pdir = os.path.join(c.dir, "data", name, f"dp_{pid}")
        if os.path.isdir(pdir):
            out[name] = {f: hashlib.sha256(open(os.path.join(pdir, f), "rb").read()).hexdigest()
                         for f in sorted(os.listdir(pdir)) if f.startswith("e_")}
    return out


def assert_replicas_identical(c: EmbeddedCluster, volume: str) -> None:
    for part in data_views(c, volume):
        members = {node_of(c, a) for a in part["replicas"]}
        copies = {name: files for name, files in replica_files(c, part["pid"]).items() if name in members}
        assert len(copies) == len(part["replicas"]), (part, list(copies))
        first = next(iter(copies.values()))
        for name, files in copies.items():
            assert files == first, f"partition {part['pid']}: {name} differs"


def assert_all_read_back(c: EmbeddedCluster, volume: str, acked: dict[str, bytes]) -> None:
    with c.connect(volume) as vol:
        for path, data in acked.items():
            with vol.open(path, "rb") as f:
                assert f.read() == data, path


@pytest.fixture(scope="module")
def rcluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = EmbeddedCluster(str(tmp_path_factory.mktemp("repl")))
    try:
        c.up(metanodes=3, datanodes=4, extra={"master": {"failover_after": 1.5, "replace_after": 8}})
        yield c
    finally:
        c.down()


def test_replicas_option_is_checked_and_placed_on_distinct_nodes(rcluster: EmbeddedCluster) -> None:
    c = rcluster
    for bad in (0, 6, "3", True):
        with pytest.raises(ShoalError) as err:
            c.create_volume(f"bad{bad!s}".lower(), replicas=bad)  # type: ignore[arg-type]
        assert err.value.code == Code.BAD_REQUEST
    with pytest.raises(ShoalError) as err:
        c.create_volume("toomany", replicas=4)
    assert err.value.code == Code.UNAVAILABLE and "4 live metanodes" in err.value.msg
    vol = c.create_volume("placed", replicas=3)
    for part in vol["meta_partitions"] + vol["data_partitions"]:
        assert len(set(part["replicas"])) == 3 and part["in_sync"] == part["replicas"] and part["epoch"] == 1
    c.admin("/volume/delete", {"name": "placed", "delay_s": 0})
    # every copy is removed with the volume
    wait_for(lambda: not any(replica_files(c, p["pid"]) for p in vol["data_partitions"]), 30,
             "every replica's directory removed")


def test_datanode_killed_for_good_during_writes_loses_nothing(rcluster: EmbeddedCluster, mount_factory) -> None:
    c = rcluster
    c.create_volume("kill", replicas=3)
    mount = mount_factory(c, "kill")
    victim_addr = data_views(c, "kill")[0]["replicas"][0]  # leads a partition, follows others
    victim = node_of(c, victim_addr)
    with Workload(c, "kill") as load, Workload(c, "kill", prefix="m", mount=mount.path) as through_mount:
        load.wait_for_writes(20)
        through_mount.wait_for_writes(5)
        c.kill(victim)
        load.wait_for_writes(60)
        through_mount.wait_for_writes(20)
    assert not load.errors and not through_mount.errors, (load.errors[:3], through_mount.errors[:3])
    print(f"longest write with a datanode killed: SDK {load.longest:.2f}s, mount {through_mount.longest:.2f}s")
    assert all(victim_addr != p["replicas"][0] and victim_addr not in p["in_sync"]
               for p in data_views(c, "kill"))
    # volume info names every member still to catch up, with how far it is
    assert all(set(p["catch_up"]) == set(p["replicas"]) - set(p["in_sync"]) for p in data_views(c, "kill"))
    acked = {**load.acked, **through_mount.acked}
    assert_all_read_back(c, "kill", acked)
    # back: it catches up and every copy is the same, byte for byte
    c.start(victim)
    wait_for(lambda: fully_replicated(c, "kill"), 60, "the restarted datanode back in sync")
    assert_replicas_identical(c, "kill")
    assert_all_read_back(c, "kill", acked)
    assert mount.proc is not None and mount.proc.poll() is None  # never took the failover for a deletion


def test_stopped_leader_cannot_acknowledge_and_catches_up(rcluster: EmbeddedCluster) -> None:
    c = rcluster
    c.create_volume("pause", replicas=3)
    before = data_views(c, "pause")
    leader_addr = before[0]["replicas"][0]
    leader = node_of(c, leader_addr)
    with Workload(c, "pause") as load:
        load.wait_for_writes(10)
        c.signal(leader, signal.SIGSTOP)
        try:
            wait_for(lambda: data_views(c, "pause")[0]["replicas"][0] != leader_addr, 30, "a new leader")
            load.wait_for_writes(30)
        finally:
            c.signal(leader, signal.SIGCONT)
        # the old leader's writes that were waiting in its socket are refused by its
        # followers (an older epoch); the workload retries them at the new leader
        load.wait_for_writes(30)
    assert not load.errors, load.errors[:3]
    wait_for(lambda: fully_replicated(c, "pause"), 60, "the resumed node back in sync")
    assert_replicas_identical(c, "pause")
    assert_all_read_back(c, "pause", load.acked)


def test_damaged_copy_is_read_from_another_and_repaired(rcluster: EmbeddedCluster) -> None:
    c = rcluster
    c.create_volume("heal", replicas=3)
    with c.connect("heal") as vol:
        data = {name: os.urandom(200_000) for name in ("flipped", "gone", "short")}
        for name, content in data.items():
            with vol.open(f"/{name}", "wb") as f:
                f.write(content)
        damaged = {}
        for name in data:
            ino = vol.stat(f"/{name}").st_ino
            (dp, ext), = vol._run(vol.client.extents(ino), name).values()
            part = next(p for p in data_views(c, "heal") if p["pid"] == dp)
            path = os.path.join(c.dir, "data", node_of(c, part["replicas"][0]), f"dp_{dp}", f"e_{ext}")
            damaged[name] = (dp, path)
        with open(damaged["flipped"][1], "r+b") as f:
            f.seek(5000)
            byte = f.read(1)
            f.seek(5000)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.unlink(damaged["gone"][1])
        os.truncate(damaged["short"][1], 4096)
        for name, content in data.items():
            with vol.open(f"/{name}", "rb") as f:
                assert f.read() == content, name
    for _name, (dp, _path) in damaged.items():
        copies = replica_files(c, dp)
        assert len({tuple(sorted(files.items())) for files in copies.values()}) == 1, "repaired in place"


def test_one_replica_volume_still_reports_a_damaged_extent(rcluster: EmbeddedCluster) -> None:
    c = rcluster
    c.create_volume("single", replicas=1)
    with c.connect("single") as vol:
        with vol.open("/f", "wb") as f:
            f.write(os.urandom(50_000))
        ino = vol.stat("/f").st_ino
        (dp, ext), = vol._run(vol.client.extents(ino), "/f").values()
        part = next(p for p in data_views(c, "single") if p["pid"] == dp)
        os.unlink(os.path.join(c.dir, "data", node_of(c, part["replicas"][0]), f"dp_{dp}", f"e_{ext}"))
        with pytest.raises(OSError) as err:
            vol.open("/f", "rb").read()
        assert err.value.errno == errno.EIO


def test_metanode_leading_the_root_killed_for_good_during_writes(rcluster: EmbeddedCluster) -> None:
    c = rcluster
    c.create_volume("metakill", replicas=3)
    root_leader = views(c, "metakill", "meta")[0]["replicas"][0]  # holds "/" and leads its partition
    victim = node_of(c, root_leader)
    with Workload(c, "metakill") as load:
        load.wait_for_writes(20)
        c.kill(victim)
        load.wait_for_writes(40)
    assert not load.errors, load.errors[:3]
    print(f"longest write with the root's metanode killed: {load.longest:.2f}s")
    assert all(p["replicas"][0] != root_leader for p in views(c, "metakill", "meta"))
    assert_all_read_back(c, "metakill", load.acked)
    c.start(victim)
    wait_for(lambda: fully_replicated(c, "metakill"), 60, "the restarted metanode back in sync")
    assert_all_read_back(c, "metakill", load.acked)
    # and then the new leader too: the restarted node has every change again
    second = node_of(c, views(c, "metakill", "meta")[0]["replicas"][0])
    c.kill(second)
    assert_all_read_back(c, "metakill", load.acked)
    c.start(second)
    wait_for(lambda: fully_replicated(c, "metakill"), 60, "every metanode back in sync")


def scrub(c: EmbeddedCluster, volume: str) -> tuple[int, list[dict[str, Any]]]:
    proc = subprocess.run([sys.executable, "-m", "shoalfs.cli", "volume", "scrub", volume, "--json"],
                          capture_output=True, text=True, env=shoal_env(c), timeout=120)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_scrub_finds_and_repairs_copies_that_differ(rcluster: EmbeddedCluster) -> None:
    c = rcluster
    c.create_volume("scrub", replicas=3)
    content = os.urandom(300_000)
    with c.connect("scrub") as vol:
        with vol.open("/f", "wb") as f:
            f.write(content)
        (dp, ext), = vol._run(vol.client.extents(vol.stat("/f").st_ino), "/f").values()
    assert scrub(c, "scrub")[0] == 0
    part = next(p for p in data_views(c, "scrub") if p["pid"] == dp)
    # one follower's block rots; another holds an extent the leader never had
    rotted = os.path.join(c.dir, "data", node_of(c, part["replicas"][1]), f"dp_{dp}", f"e_{ext}")
    with open(rotted, "r+b") as f:
        f.seek(70_000)
        byte = f.read(1)
        f.seek(70_000)
        f.write(bytes([byte[0] ^ 1]))
    stray = os.path.join(c.dir, "data", node_of(c, part["replicas"][2]), f"dp_{dp}", "e_7")
    for path in (stray, stray + ".crc"):
        with open(path, "wb") as f:
            f.write(b"\1" * 8)
    code, rows = scrub(c, "scrub")
    assert code == 1
    found = {row["member"]: row["found"] for row in rows if row["pid"] == dp}
    assert "repaired" in found[part["replicas"][1]] and "repaired" in found[part["replicas"][2]], found
    assert all(row["found"] == "same" for row in rows if row["pid"] != dp), rows
    code, rows = scrub(c, "scrub")
    assert code == 0 and all(row["found"] == "same" for row in rows), rows
    assert_replicas_identical(c, "scrub")
    with c.connect("scrub") as vol:
        assert vol.open("/f", "rb").read() == content


def test_node_gone_for_good_is_replaced_by_another(rcluster: EmbeddedCluster) -> None:
    c = rcluster
    c.create_volume("moved", replicas=3)
    with Workload(c, "moved") as load:
        load.wait_for_writes(20)
    assert not load.errors
    victim_addr = data_views(c, "moved")[0]["replicas"][1]
    victim = node_of(c, victim_addr)
    c.kill(victim)
    try:
        # past replace_after (8 s here) every copy it held is made again on the spare datanode
        wait_for(lambda: all(victim_addr not in p["replicas"] and sorted(p["in_sync"]) == sorted(p["replicas"])
                             for p in data_views(c, "moved")), 120, "copies rebuilt elsewhere")
        assert_all_read_back(c, "moved", load.acked)
        assert_replicas_identical(c, "moved")
    finally:
        c.start(victim)
    # back, it drops the copies it no longer holds
    pids = [p["pid"] for p in data_views(c, "moved")]
    wait_for(lambda: not any(os.path.isdir(os.path.join(c.dir, "data", victim, f"dp_{pid}")) for pid in pids),
             60, "the returning node dropped its old copies")


def test_a_change_retried_after_a_failover_applies_once(rcluster: EmbeddedCluster) -> None:
    c = rcluster
    c.create_volume("once", replicas=3)
    rpc = RawRpc(volume_cap(c, "once"))
    root = views(c, "once", "meta")[0]
    create = {"parent": 1, "name": "f", "mode": 0o100644, "rid": "a1b2c3d4"}
    # (the leader serves once its followers have renewed its lease: a moment after the create)
    wait_for(lambda: rpc(root["replicas"][0], Op.META_GET_INODE, root["pid"], {"ino": 1})[0] == 0, 10, "served")
    code, first = rpc(root["replicas"][0], Op.META_CREATE, root["pid"], create)
    assert code == 0, first
    # the same request again (its answer was lost): the same answer, nothing made twice
    assert rpc(root["replicas"][0], Op.META_CREATE, root["pid"], create) == (0, first)
    assert rpc(root["replicas"][0], Op.META_CREATE, root["pid"], dict(create, rid="e5f6a7b8"))[0] == Code.EXISTS
    # a rename into a directory of another partition (two steps, an intent between): once too
    with c.connect("once") as vol:
        for i in range(6):
            vol.mkdir(f"/d{i}")
        inos = {vol.stat(f"/d{i}").st_ino for i in range(6)}
    far = next(ino for ino in inos if not root["start"] <= ino < root["end"])
    target = next(p for p in views(c, "once", "meta") if p["start"] <= far < p["end"])
    move = {"src_parent": 1, "src_name": "f", "dst_parent": far, "dst_name": "g", "dst_pid": target["pid"],
            "rid": "c0ffee00"}
    moved = rpc(root["replicas"][0], Op.META_RENAME, root["pid"], move)
    assert moved[0] == 0, moved
    assert rpc(root["replicas"][0], Op.META_RENAME, root["pid"], move) == moved
    # and at the leader after a failover: the answer came with the change
    old = node_of(c, root["replicas"][0])
    c.kill(old)
    try:
        wait_for(lambda: views(c, "once", "meta")[0]["replicas"][0] != root["replicas"][0], 30, "a new leader")
        new = views(c, "once", "meta")[0]["replicas"][0]
        wait_for(lambda: rpc(new, Op.META_CREATE, root["pid"], create)[0] != Code.TRY_AGAIN, 30, "the lease")
        assert rpc(new, Op.META_CREATE, root["pid"], create) == (0, first)
    finally:
        c.start(old)
    wait_for(lambda: fully_replicated(c, "once"), 60, "back in sync")
