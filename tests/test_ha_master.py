"""A highly available master (DESIGN.md §6): state in a real etcd, three real
masters, one leader; kill -9, SIGSTOP and etcd outages under live mounts."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.client.mount import MountOptions
from shoalfs.common.master_client import REQUEST_ID
from shoalfs.master.store import EtcdStore
from shoalfs.proto import capability
from shoalfs.proto.capability import Capability
from shoalfs.proto.errors import Code
from shoalfs.proto.opcodes import Op
from tests.conftest import RawRpc, cli, volume_cap, wait_for
from tests.test_lifecycle import expect_deleted_exit, lifecycle_opts, parse_sd

FAILOVER_LIMIT = 5.0  # seconds from kill -9 of the leader to a follower leading


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    c = EmbeddedCluster(str(tmp_path_factory.mktemp("ha")))
    try:
        c.up(metanodes=2, datanodes=2, masters=3)
        yield c
    finally:
        c.down()


@pytest.fixture
def healed(ha: EmbeddedCluster) -> Iterator[EmbeddedCluster]:
    """The cluster with every process running, before and after the test."""
    yield ha
    for name in ha.names():
        ha.signal(name, signal.SIGCONT)
        ha.start(name)
    wait_for(ha.leader, 30, "a leader")
    ha.wait_ready(30)


def fail_over(c: EmbeddedCluster) -> tuple[str, str, float]:
    """kill -9 the leader: (old, new leader, seconds until the new one leads)."""
    old = wait_for(c.leader, 30, "a leader")
    assert isinstance(old, str)
    c.kill(old)
    killed = time.monotonic()
    new = wait_for(c.leader, 15, "a follower to take over")
    assert isinstance(new, str) and new != old
    return old, new, time.monotonic() - killed


class Writer(threading.Thread):
    """Writes and reads back a file every 50 ms through a mount; keeps every error."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.errors: list[str] = []
        self.done = 0
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            name = os.path.join(self.path, f"w{i % 20}")
            data = os.urandom(4096 + i)
            try:
                with open(name, "wb") as f:
                    f.write(data)
                with open(name, "rb") as f:
                    if f.read() != data:
                        self.errors.append(f"{name}: read back differs")
                self.done += 1
            except OSError as exc:
                self.errors.append(f"{name}: {exc}")
            i += 1
            time.sleep(0.05)

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


def test_master_list_in_mount_options() -> None:
    opts = MountOptions()
    opts.apply("rw,master=10.0.0.1:17010,10.0.0.2:17010,10.0.0.3:17010,key_file=/k,noatime")
    assert opts.master == "10.0.0.1:17010,10.0.0.2:17010,10.0.0.3:17010"
    assert opts.key_file == "/k"


def test_leader_killed_under_load(healed: EmbeddedCluster, mount_factory, syslog, tmp_path) -> None:
    """kill -9 of the leader, three times, under a writing mount and CLI calls:
    a follower leads within 5 s, volume create/delete work through it, the
    mount never fails an operation or exits; then a deletion right after a
    failover still reaches the mount."""
    c = healed
    vol = c.create_volume("ha-load")
    audit = str(tmp_path / "audit.log")
    m = mount_factory(c, "ha-load", lifecycle_opts(syslog, audit))
    writer = Writer(m.path)
    writer.start()
    cli_errors: list[str] = []
    cli_halt = threading.Event()

    def cli_loop() -> None:
        while not cli_halt.is_set():
            r = cli(c, "volume", "list", "--json")
            if r.returncode != 0 or "ha-load" not in r.stdout:
                cli_errors.append(r.stderr[-500:])
    cli_thread = threading.Thread(target=cli_loop, daemon=True)
    cli_thread.start()
    times = []
    try:
        for i in range(3):
            old, new, took = fail_over(c)
            times.append(took)
            made = c.create_volume(f"ha-new{i}")
            assert made["status"] == "ACTIVE"
            c.admin("/volume/delete", {"name": f"ha-new{i}"})
            c.start(old)  # back as a follower
            wait_for(lambda old=old, new=new: (c.master_status()[old] or {}).get("leader") == c.masters[new], 20,
                     "the restarted master to follow the new leader")
            assert m.proc is not None and m.proc.poll() is None, m.log()[-3000:]
        done = writer.done
        wait_for(lambda: writer.done > done + 5, 20, "writes after the last failover")
    finally:
        writer.stop()
        cli_halt.set()
        cli_thread.join(90)
    assert max(times) < FAILOVER_LIMIT, times
    assert writer.errors == [], writer.errors[:5]
    assert cli_errors == [], cli_errors[:3]
    assert not syslog.records, "no mount may report a deletion on a failover"
    # a deletion right after a failover: the new leader has it in etcd and tells everyone
    fail_over(c)
    c.admin("/volume/delete", {"name": "ha-load"})
    assert m.proc.wait(20) == 143, m.log()[-3000:]
    wait_for(lambda: syslog.records, 5, "the syslog record")
    expect_deleted_exit(m, syslog, audit, parse_sd(syslog.records[0])["detection"], vol)


@pytest.mark.parametrize("path", ["push", "heartbeat", "error-code"])
def test_deletion_after_failover_each_path(healed: EmbeddedCluster, mount_factory, syslog, tmp_path,
                                           path: str) -> None:
    c = healed
    name = f"ha-{path}"
    vol = c.create_volume(name)
    audit = str(tmp_path / "audit.log")
    m = mount_factory(c, name, lifecycle_opts(syslog, audit, detect=path))
    with open(f"{m.path}/before", "w") as f:
        f.write("x")
    fail_over(c)
    c.admin("/volume/delete", {"name": name})
    if path == "error-code":  # only what operations meet
        def poke() -> bool:
            try:
                os.listdir(m.path)
            except OSError:
                pass
            return m.proc is not None and m.proc.poll() is not None
        wait_for(poke, 20, "an operation to meet the deletion")
    expect_deleted_exit(m, syslog, audit, path, vol)


def test_stopped_leader_resumes_without_split_brain(healed: EmbeddedCluster, mount_factory) -> None:
    """SIGSTOP of the leader for 20 s: a follower takes over; the old leader,
    resumed, answers the request that waited for it with NOT_LEADER, writes
    nothing, and its old term is refused by the nodes."""
    c = healed
    c.create_volume("ha-stop")
    m = mount_factory(c, "ha-stop")
    old = wait_for(c.leader, 30, "a leader")
    assert isinstance(old, str)
    old_term = c.master_status()[old]["term"]
    c.signal(old, signal.SIGSTOP)
    stopped = time.monotonic()
    # a delete sent to the stopped leader waits in its socket until it resumes
    late: dict = {}
    sender = threading.Thread(target=lambda: late.update(
        c._envelope(c.masters[old], "/volume/delete", {"name": "ha-stop"}, 60)), daemon=True)
    sender.start()
    try:
        new = wait_for(lambda: next((n for n, st in c.master_status(skip=old).items()
                                     if st and st["leading"]), None), 15, "a follower to lead")
        assert time.monotonic() - stopped < FAILOVER_LIMIT + 1
        c.create_volume("ha-during-stop")
        with open(f"{m.path}/during", "w") as f:
            f.write("written while the old leader was stopped")
        wait_for(lambda: time.monotonic() - stopped > 20, 30, "20 s of SIGSTOP")
    finally:
        c.signal(old, signal.SIGCONT)
    sender.join(60)
    assert late.get("code") == Code.NOT_LEADER, late
    state = c.etcd_state()
    assert {v["name"]: v["status"] for v in state["volumes"].values()}["ha-stop"] == "ACTIVE"
    assert "ha-during-stop" in {v["name"] for v in state["volumes"].values()}
    status = wait_for(lambda: c.master_status()[old], 10, "the resumed master to answer")
    assert isinstance(status, dict) and not status["leading"]
    wait_for(lambda: (c.master_status()[old] or {}).get("leader") == c.masters[str(new)], 10,
             "the resumed master to follow the new leader")
    assert c.leader() == new
    assert m.proc is not None and m.proc.poll() is None
    with open(f"{m.path}/during") as f:
        assert f.read() == "written while the old leader was stopped"
    # fencing on the nodes: a capability of the old term is refused, the new one obeyed
    signing = signing_key(c)
    node = next(iter(c.layout["nodes"].values()))["listen"]
    new_term = c.master_status()[str(new)]["term"]
    assert new_term > old_term

    def master_cap(term: int) -> str:
        return capability.issue(signing, Capability("", capability.MASTER, str(term), "master", time.time() + 60))
    code, msg = RawRpc(master_cap(old_term))(node, Op.HEARTBEAT, 0, {})
    assert code == Code.NOT_LEADER, msg
    code, _ = RawRpc(master_cap(new_term))(node, Op.HEARTBEAT, 0, {})
    assert code == 0


def signing_key(c: EmbeddedCluster):  # type: ignore[no-untyped-def]
    """The cluster's signing key, as the operator can read it from etcd."""
    import asyncio

    async def read() -> bytes:
        store = EtcdStore(c.etcd_endpoint)
        try:
            got = await store.get("secret/signing_key")
        finally:
            await store.close()
        assert got is not None
        return got[0]
    return serialization.load_pem_private_key(asyncio.run(read()), password=None)


def test_etcd_down_30s_then_back(healed: EmbeddedCluster, mount_factory, syslog, tmp_path) -> None:
    """etcd stopped for 30 s: data I/O continues, admin calls fail with a clear
    transient error, no mount exits; etcd back: a master leads again and admin
    calls work."""
    c = healed
    c.create_volume("ha-etcd")
    audit = str(tmp_path / "audit.log")
    m = mount_factory(c, "ha-etcd", lifecycle_opts(syslog, audit))
    writer = Writer(m.path)
    writer.start()
    try:
        c.stop("etcd")
        down = time.monotonic()
        # the leader serves until its lease would have run out, then nobody leads
        wait_for(lambda: c.leader() is None, 10, "the leader to stop leading without etcd")
        r = cli(c, "volume", "list")
        assert r.returncode == 1
        assert "is not the leader: no leader known (etcd: etcd 127.0.0.1:" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        wait_for(lambda: time.monotonic() - down > 30, 40, "30 s without etcd")
        assert m.proc is not None and m.proc.poll() is None, m.log()[-3000:]
        done = writer.done
        wait_for(lambda: writer.done > done + 5, 20, "writes with etcd down")
        c.start("etcd")
        wait_for(c.leader, 20, "a master to lead again")
        made = c.create_volume("ha-after-etcd")
        assert made["status"] == "ACTIVE"
        r = cli(c, "volume", "list", "--json")
        assert r.returncode == 0 and "ha-etcd" in r.stdout, r.stderr
    finally:
        writer.stop()
    assert writer.errors == [], writer.errors[:5]
    assert m.proc.poll() is None and not syslog.records
    assert json.loads(cli(c, "volume", "info", "ha-etcd", "--json").stdout)["status"] == "ACTIVE"


def test_nodes_fenced_above_the_leader_lead_it_higher(healed: EmbeddedCluster) -> None:
    """As after etcd is restored from a backup (its revisions go back): a node
    has obeyed a term above the leader's. The leader, still holding its lease,
    records a floor above that term in etcd and leads again from there; the
    node obeys it again."""
    c = healed
    forged = 10**6
    node = c.layout["nodes"]["metanode1"]["listen"]
    cap = capability.issue(signing_key(c), Capability("", capability.MASTER, str(forged), "master",
                                                      time.time() + 60))
    assert RawRpc(cap)(node, Op.HEARTBEAT, 0, {})[0] == 0  # the node now refuses every lower term

    def leads_above() -> bool:
        status = c.master_status()
        return any(st and st["leading"] and st["term"] > forged for st in status.values())
    wait_for(leads_above, 30, "a leader above the forged term")
    wait_for(lambda: any(n["addr"] == node and n["status"] == "up" for n in c.http_get("/cluster/nodes") or []),
             15, "the node to obey the leader again")
    assert c.etcd_state()["term_floor"] >= forged
    code, msg = RawRpc(cap)(node, Op.HEARTBEAT, 0, {})
    assert code == Code.NOT_LEADER, msg  # and the forged term is now the stale one


def leader_call(c: EmbeddedCluster, path: str, body: dict, request_id: str) -> dict:
    """An admin call to the leader as MasterClient makes it: with a request id."""
    leader = wait_for(c.leader, 30, "a leader")
    req = urllib.request.Request(c._url(path, c.masters[str(leader)]), data=json.dumps(body).encode(),
                                 method="POST", headers={"Authorization": f"Bearer {c.token}",
                                                         "Content-Type": "application/json",
                                                         REQUEST_ID: request_id})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return dict(json.load(r))
    except urllib.error.HTTPError as exc:
        return dict(json.load(exc))


def test_a_create_or_delete_retried_after_a_failover_is_answered_as_done(healed: EmbeddedCluster) -> None:
    """The leader made the change, then a failover lost its answer: the client's
    retry (same request id) reaches the new leader and is answered as done."""
    c = healed
    made = leader_call(c, "/volume/create", {"name": "ha-retry", "owner": "o"}, "create0001")
    assert made["code"] == 0
    fail_over(c)
    again = leader_call(c, "/volume/create", {"name": "ha-retry", "owner": "o"}, "create0001")
    assert again["code"] == 0 and again["data"]["vol_id"] == made["data"]["vol_id"]
    # the retry's owner key works; the lost answer's key no longer does
    assert volume_cap(c, "ha-retry", key=again["data"]["owner_key"])
    with pytest.raises(urllib.error.HTTPError):
        volume_cap(c, "ha-retry", key=made["data"]["owner_key"])
    other = leader_call(c, "/volume/create", {"name": "ha-retry", "owner": "o"}, "create0002")
    assert other["code"] == Code.VOLUME_EXISTS  # another request: the name is taken
    gone = leader_call(c, "/volume/delete", {"name": "ha-retry"}, "delete0001")
    assert gone["code"] == 0
    fail_over(c)
    again = leader_call(c, "/volume/delete", {"name": "ha-retry"}, "delete0001")
    assert again["code"] == 0 and again["data"]["tombstone"] == gone["data"]["tombstone"]
    other = leader_call(c, "/volume/delete", {"name": "ha-retry"}, "delete0002")
    assert other["code"] == Code.VOLUME_NOT_EXIST
