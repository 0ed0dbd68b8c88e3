"""Three copies of every data partition (DESIGN.md §6): real datanodes killed,
stopped and damaged under a write workload; nothing acknowledged is lost."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import threading
import time
from typing import Any

import pytest
from conftest import wait_for

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.proto.errors import Code, ShoalError


class Workload:
    """A thread writing new files through the SDK until stopped; records
    every acknowledged file (its bytes), every error and the longest write."""

    def __init__(self, c: EmbeddedCluster, volume: str, prefix: str = "w", size: int = 96 * 1024) -> None:
        self.vol = c.connect(volume)
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
        self.vol.close()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            path, data = f"/{self.prefix}{i}", os.urandom(self.size + i % 4096)
            start = time.monotonic()
            try:
                with self.vol.open(path, "wb") as f:
                    f.write(data)
            except OSError as exc:
                self.errors.append(exc)
                continue
            finally:
                i += 1
            self.longest = max(self.longest, time.monotonic() - start)
            self.acked[path] = data

    def wait_for_writes(self, n: int) -> None:
        start = len(self.acked)
        wait_for(lambda: len(self.acked) >= start + n or self.errors, 60, f"{n} more acknowledged writes")

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
        copies = replica_files(c, part["pid"])
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
        c.up(metanodes=3, datanodes=4, extra={"failover_after": 1.5})
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


def test_datanode_killed_for_good_during_writes_loses_nothing(rcluster: EmbeddedCluster) -> None:
    c = rcluster
    c.create_volume("kill", replicas=3)
    victim_addr = data_views(c, "kill")[0]["replicas"][0]  # leads a partition, follows others
    victim = node_of(c, victim_addr)
    with Workload(c, "kill") as load:
        load.wait_for_writes(20)
        c.kill(victim)
        load.wait_for_writes(60)
    assert not load.errors, load.errors[:3]
    print(f"longest write with a datanode killed: {load.longest:.2f}s")
    assert all(victim_addr != p["replicas"][0] and victim_addr not in p["in_sync"]
               for p in data_views(c, "kill"))
    assert_all_read_back(c, "kill", load.acked)
    # back: it catches up and every copy is the same, byte for byte
    c.start(victim)
    wait_for(lambda: fully_replicated(c, "kill"), 60, "the restarted datanode back in sync")
    assert_replicas_identical(c, "kill")
    assert_all_read_back(c, "kill", load.acked)


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
