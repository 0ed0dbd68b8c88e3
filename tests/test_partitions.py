"""Network partitions (issue 13): every etcd member, master, node and client
in its own network namespace; links cut silently (tests/netcluster.py)
under a workload of acknowledged writes through the SDK and a mount;
everything acknowledged reads back after healing, and the copies agree."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Mount, RawRpc, SyslogListener, volume_cap, wait_for
from netcluster import CTL, AckedWriter, Net, NetCluster
from test_lifecycle import RECORD_FIELDS, lifecycle_opts, parse_sd
from test_replication import assert_replicas_identical, fully_replicated, scrub, views

from shoalfs.client.mount import is_mounted
from shoalfs.proto.errors import Code
from shoalfs.proto.opcodes import Op

pytestmark = [pytest.mark.partition, pytest.mark.fuse]

ETCDS = ["etcd1", "etcd2", "etcd3"]
MASTERS = ["master", "master2"]
NODES = [f"{role}{i}" for role in ("metanode", "datanode") for i in (1, 2, 3)]
CLIENTS = ["client1", "client2"]  # the SDK writer's, and the mount's
FAILOVER_AFTER = 1.5  # the master's: a leader silent this long is replaced


@pytest.fixture
def pc(tmp_path: Any) -> Iterator[NetCluster]:
    """A fresh cluster (3 etcd members, 2 masters, 3+3 nodes), each process in
    its own namespace; everything it made is gone afterwards."""
    net = Net(ETCDS + MASTERS + NODES + CLIENTS)
    try:
        net.up()
        c = NetCluster(str(tmp_path / "cluster"), net)
        try:
            c.up(3, 3, masters=2, extra={"master": {"failover_after": FAILOVER_AFTER}})
            yield c
        finally:
            net.heal()  # a test that failed mid-cut: stop everything on a whole network
            c.down()
    finally:
        net.down()
    assert not net.leftovers(), net.leftovers()


class Workload:
    """An SDK writer in client1's namespace and a mount (with its writer) in
    client2's, both writing new files until stopped."""

    def __init__(self, c: NetCluster, volume: str, mount_factory: Callable[..., Mount], tmp: str,
                 mount_options: list[str] | None = None, op_deadline: float = 60.0) -> None:
        self.c = c
        self.volume = volume
        self.sdk = AckedWriter(c.net, "client1", os.path.join(tmp, f"{volume}-sdk.log"),
                               ["--master", c.master_addr, "--volume", volume, "--key-file", c.key_file(volume),
                                "--op-deadline", str(op_deadline)], "s")
        self.mount = mount_factory(c, volume, mount_options, wrap=c.net.wrap("client2"))
        self.fuse = AckedWriter(c.net, "client2", os.path.join(tmp, f"{volume}-fuse.log"), ["--dir", self.mount.path],
                                "m")
        self.writers = (self.sdk, self.fuse)

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            self.c.net.heal()  # failed mid-cut: let the writers finish their last write
        self.stop()

    def stop(self) -> None:
        for w in self.writers:
            w.stop()

    def longest_since(self, t: float) -> float:
        """The longest write (create, write, close) that ended after `t`."""
        return max(r["t1"] - r["t0"] for w in self.writers for r in w.records() if r["t1"] >= t)

    def wait_for_writes(self, n: int, timeout: float = 60) -> None:
        """n more acknowledged writes from each writer."""
        for w in self.writers:
            start = len(w.acked())
            wait_for(lambda w=w, start=start: len(w.acked()) >= start + n, timeout,
                     f"{n} more writes acknowledged ({w.prefix})")

    def assert_no_errors(self) -> None:
        for w in self.writers:
            assert not w.errors(), w.errors()[:5]

    def assert_read_back(self) -> int:
        """Every acknowledged file reads back whole (from the test process),
        each its own inode; returns how many there were."""
        inodes: dict[int, str] = {}
        with self.c.connect(self.volume) as vol:
            for w in self.writers:
                for rec in w.acked():
                    with vol.open(rec["path"], "rb") as f:
                        data = f.read()
                    assert (len(data), hashlib.sha256(data).hexdigest()) == (rec["len"], rec["sha"]), rec["path"]
                    ino = vol.stat(rec["path"]).st_ino  # two files never share an inode
                    assert ino not in inodes, (rec["path"], inodes.get(ino), ino)
                    inodes[ino] = rec["path"]
        assert inodes
        return len(inodes)


def leader_of(c: NetCluster, part: dict[str, Any]) -> str:
    return c.node_name(part["replicas"][0])


def part_view(c: NetCluster, volume: str, kind: str, pid: int) -> dict[str, Any]:
    return next(p for p in views(c, volume, kind) if p["pid"] == pid)


@pytest.mark.parametrize("followers", ["reachable", "cut too"])
def test_leaders_cut_from_etcd_and_masters_stop_acknowledging(pc: NetCluster, mount_factory: Any, tmp_path: Any,
                                                              followers: str) -> None:
    """Scenario 1: the leaders of a meta and a data partition lose etcd and
    the masters but still reach clients (and, in one variant, their
    followers). New leaders take over; the old ones acknowledge nothing
    more; nothing acknowledged is lost or overwritten once the links heal."""
    c = pc
    c.create_volume("p1")
    meta, data = views(c, "p1", "meta")[0], views(c, "p1", "data")[0]
    old = {"meta": (meta, leader_of(c, meta)), "data": (data, leader_of(c, data))}
    with Workload(c, "p1", mount_factory, str(tmp_path)) as w:
        w.wait_for_writes(20)
        for _, name in old.values():
            peers = [n for n in NODES if n != name and n[:4] == name[:4]] if followers == "cut too" else []
            c.net.cut(name, ETCDS + MASTERS + peers)
        for kind, (part, _) in old.items():
            wait_for(lambda kind=kind, part=part: part_view(c, "p1", kind, part["pid"])["replicas"][0]
                     != part["replicas"][0], 30, f"a new {kind} leader")
        w.wait_for_writes(30)  # through the new leaders
        # the deposed leaders, asked directly (the test still reaches them), refuse
        rpc = RawRpc(volume_cap(c, "p1"))
        create = {"parent": 1, "name": "probe", "mode": 0o100644, "rid": "0badc0de"}
        code, _ = rpc(meta["replicas"][0], Op.META_CREATE, meta["pid"], create)
        assert code in (Code.NOT_PARTITION_LEADER, Code.STALE_EPOCH, Code.TRY_AGAIN), code
        write = {"ext": 1 << 40, "offset": 0, "data": b"x" * 4096, "sync": True}
        code, _ = rpc(data["replicas"][0], Op.DATA_WRITE, data["pid"], write)
        assert code in (Code.NOT_PARTITION_LEADER, Code.STALE_EPOCH, Code.TRY_AGAIN), code
        c.net.heal()
        wait_for(lambda: fully_replicated(c, "p1"), 90, "the old leaders caught up")
        w.wait_for_writes(10)
    w.assert_no_errors()
    assert w.assert_read_back() >= 120
    with c.connect("p1") as vol:
        assert "probe" not in vol.listdir("/")
    assert_replicas_identical(c, "p1")
    assert scrub(c, "p1")[0] == 0


def test_follower_cut_from_its_leader_leaves_in_sync_and_catches_up(pc: NetCluster, mount_factory: Any,
                                                                     tmp_path: Any) -> None:
    """Scenario 2: a follower cut from its leader only (it still reaches the
    master): dropped from in_sync, writes go on, caught up after healing."""
    c = pc
    c.create_volume("p2")
    cuts = []
    for kind in ("meta", "data"):
        part = views(c, "p2", kind)[0]
        cuts.append((kind, part["pid"], leader_of(c, part), c.node_name(part["replicas"][1])))
    with Workload(c, "p2", mount_factory, str(tmp_path)) as w:
        w.wait_for_writes(20)
        for _, _, leader, follower in cuts:
            c.net.cut(leader, [follower])
        for kind, pid, leader, follower in cuts:
            addr = c.layout["nodes"][follower]["listen"]
            wait_for(lambda kind=kind, pid=pid, addr=addr: addr not in part_view(c, "p2", kind, pid)["in_sync"],
                     30, f"the {kind} follower out of in_sync")
            assert leader_of(c, part_view(c, "p2", kind, pid)) == leader  # the leader keeps leading
        w.wait_for_writes(30)
        assert any(addr_info["running"] for addr_info in c.status() if addr_info["name"] == cuts[0][3])
        c.net.heal()
        wait_for(lambda: fully_replicated(c, "p2"), 90, "the followers caught up")
        w.wait_for_writes(10)
    w.assert_no_errors()
    w.assert_read_back()
    assert_replicas_identical(c, "p2")
    assert scrub(c, "p2")[0] == 0


def test_master_leader_cut_from_etcd_is_replaced_and_writes_nothing(pc: NetCluster, mount_factory: Any,
                                                                   tmp_path: Any) -> None:
    """Scenario 3: the leading master loses etcd (it still reaches the nodes
    and clients): the other master leads; the old one refuses admin writes
    and nothing it was asked to do reaches etcd."""
    c = pc
    c.create_volume("p3")
    old = wait_for(c.leader, 10, "a leader")
    other = next(m for m in MASTERS if m != old)
    with Workload(c, "p3", mount_factory, str(tmp_path)) as w:
        w.wait_for_writes(10)
        c.net.cut(str(old), ETCDS)
        wait_for(lambda: c.leader() == other, 30, "the other master to lead")
        status = c.master_status()[str(old)]
        assert status is not None and not status["leading"]
        # asked directly, the old master refuses (NOT_LEADER); the new one creates
        env = c._envelope(c.masters[str(old)], "/volume/create", {"name": "p3-old", "owner": "t"}, 10)
        assert env["code"] == Code.NOT_LEADER, env
        c.create_volume("p3-new")
        w.wait_for_writes(20)  # data goes on: nodes and clients follow the new master
        c.net.heal()
        wait_for(lambda: (c.master_status()[str(old)] or {}).get("leader") == c.masters[other], 30,
                 "the old master to follow")
        w.wait_for_writes(5)
    w.assert_no_errors()
    w.assert_read_back()
    names = {v["name"] for v in c.etcd_state()["volumes"].values()}
    assert {"p3", "p3-new"} <= names and "p3-old" not in names, names
    assert c.leader() == other


def test_client_cut_from_everything_gets_eio_never_estale(pc: NetCluster, mount_factory: Any, syslog: SyslogListener,
                                                           tmp_path: Any) -> None:
    """Scenario 4: clients cut from everything longer than their deadline:
    their operations fail with EIO, never ESTALE, the mount stays; healed,
    they work again. A volume deleted while they are cut off is found once
    they can reach the cluster, and the mount exits 143."""
    c = pc
    vol = c.create_volume("p4")
    deadline = 3.0
    audit = str(tmp_path / "audit.log")
    with Workload(c, "p4", mount_factory, str(tmp_path), lifecycle_opts(syslog, audit, op_deadline=str(deadline)),
                  op_deadline=deadline) as w:
        w.wait_for_writes(10)
        for round_ in ("cut", "cut, volume deleted"):
            seen = {id(wr): len(wr.records()) for wr in w.writers}
            cut_at = time.monotonic()
            for client in CLIENTS:
                c.net.isolate(client)
            if round_ == "cut, volume deleted":
                c.admin("/volume/delete", {"name": "p4"})
            for wr in w.writers:
                wait_for(lambda wr=wr, t=cut_at: len(wr.errors()) and wr.errors()[-1]["t0"] > t, 3 * deadline + 30,
                         f"{wr.prefix}: an operation to fail")
            wait_for(lambda t=cut_at: time.monotonic() > t + 3 * deadline, 4 * deadline, "three deadlines")
            for wr in w.writers:
                after = wr.records()[seen[id(wr)]:]
                failed = [r for r in after if "errno" in r]
                assert failed and {r["errno"] for r in failed} == {errno.EIO}, failed[:5]
            assert w.mount.proc is not None and w.mount.proc.poll() is None, "the mount exited while cut off"
            assert is_mounted(w.mount.path) and not syslog.records
            c.net.heal()
            if round_ == "cut":
                w.wait_for_writes(5, 30)
        # healed after the deletion: found by the heartbeat or the first failing call
        assert w.mount.proc.wait(30) == 143, w.mount.log()[-3000:]
        assert not is_mounted(w.mount.path)
        wait_for(lambda: syslog.records, 5, "the syslog record")
        fields = parse_sd(syslog.records[0])
        assert RECORD_FIELDS <= set(fields) and fields["vol_id"] == vol["vol_id"], fields
        wait_for(lambda: w.sdk.proc.poll() is not None, 30, "the SDK writer to stop on ESTALE")
        assert w.sdk.errors()[-1]["errno"] == errno.ESTALE


def test_etcd_minority_cut_away_admin_writes_continue(pc: NetCluster, mount_factory: Any, tmp_path: Any) -> None:
    """Scenario 5: one of three etcd members (the one the leading master
    talks to) cut from everyone: admin writes go on through the other two,
    and data I/O never notices."""
    c = pc
    c.create_volume("p5")
    leader = str(wait_for(c.leader, 10, "a leader"))
    used = (c.master_status()[leader] or {})["etcd"]
    member = next(m for m in ETCDS if used.startswith(c.net.ips[m] + ":"))
    with Workload(c, "p5", mount_factory, str(tmp_path)) as w:
        w.wait_for_writes(10)
        cut_at = time.monotonic()
        c.net.cut(member, [n for n in c.net.names if n != member] + [CTL])
        for i in range(5):
            c.create_volume(f"p5-{i}")  # each within the admin call's deadline
        c.admin("/volume/delete", {"name": "p5-0"})
        w.wait_for_writes(20)
        assert w.longest_since(cut_at) < 5, "data I/O stalled while an etcd member was cut away"
        c.net.heal()
        w.wait_for_writes(5)
    w.assert_no_errors()
    w.assert_read_back()
    listed = {v["name"] for v in wait_for(lambda: c.http_get("/volume/list"), 20, "the volume list")}
    assert {"p5", "p5-1", "p5-2", "p5-3", "p5-4"} <= listed and "p5-0" not in listed


def test_harness_cuts_are_silent_and_heal(pc: NetCluster) -> None:
    """The harness itself: a cut link drops packets (a connect times out, it
    is not refused), other links still pass, and heal restores it."""
    c = pc
    host, port = c.layout["nodes"]["metanode1"]["listen"].split(":")

    def connect() -> None:
        with socket.create_connection((host, int(port)), timeout=1.5):
            pass
    connect()
    c.net.cut("metanode1", [CTL])
    with pytest.raises(TimeoutError):
        connect()
    assert c.http_get("/cluster/info") is not None  # the masters are still reachable
    c.net.heal()
    connect()
