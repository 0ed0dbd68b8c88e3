"""Space accounting and limits (issue 15): what a volume holds is counted by
its metanodes and summed by the master; df, df -i and du tell the truth;
capacity and inode limits are enforced with ENOSPC; counts survive a kill -9."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import cli, wait_for

from shoalfs.cli.cluster import EmbeddedCluster

MiB = 1 << 20
BLOCK = 4096


def usage(c: EmbeddedCluster, volume: str) -> dict[str, Any]:
    info = c.http_get(f"/volume/info?name={volume}")
    assert info is not None
    return dict(info)


def settles(c: EmbeddedCluster, volume: str, **want: int) -> dict[str, Any]:
    """Wait until the master's sums show `want` (within a couple of heartbeat rounds)."""
    def matches() -> dict[str, Any] | None:
        u = usage(c, volume)
        return u if all(u[k] == v for k, v in want.items()) else None
    return dict(wait_for(matches, 15, f"usage {want}"))  # type: ignore[call-overload]


def test_df_du_and_df_i_follow_writes_truncates_holes_and_deletes(cluster: EmbeddedCluster,
                                                                   mount_factory: Any) -> None:
    c = cluster
    c.create_volume("use-df", capacity_gib=2)
    m = mount_factory(c, "use-df")
    settles(c, "use-df", used_bytes=0, inodes=1)  # the root directory
    with open(os.path.join(m.path, "f"), "wb") as f:
        f.write(os.urandom(3 * MiB + 100))
    want = 3 * MiB + BLOCK
    settles(c, "use-df", used_bytes=want, inodes=2)
    # every copy of it on the datanodes (the datanodes report on their own heartbeats)
    wait_for(lambda: usage(c, "use-df")["raw_bytes"] >= 3 * MiB + 100, 15, "the datanodes' bytes")
    st = os.statvfs(m.path)
    assert st.f_blocks * st.f_frsize == 2 << 30
    assert (st.f_blocks - st.f_bfree) * st.f_frsize == want
    assert st.f_files - st.f_ffree == 2  # df -i: the root and f
    # a 1-byte write at 1 GiB: one block allocated, not a gigabyte
    with open(os.path.join(m.path, "sparse"), "wb") as f:
        f.seek(1 << 30)
        f.write(b"x")
    assert os.stat(os.path.join(m.path, "sparse")).st_size == (1 << 30) + 1
    # (the kernel may show the attributes of the create for up to their timeout)
    wait_for(lambda: os.stat(os.path.join(m.path, "sparse")).st_blocks == BLOCK // 512, 5, "st_blocks of a hole")
    du = subprocess.run(["du", "-k", os.path.join(m.path, "sparse")], capture_output=True, text=True, check=True)
    assert du.stdout.split()[0] == "4", du.stdout
    wait_for(lambda: os.stat(os.path.join(m.path, "f")).st_blocks == want // 512, 5, "st_blocks")
    settles(c, "use-df", used_bytes=want + BLOCK, inodes=3)
    os.truncate(os.path.join(m.path, "f"), MiB)
    settles(c, "use-df", used_bytes=MiB + BLOCK, inodes=3)
    os.unlink(os.path.join(m.path, "f"))
    os.unlink(os.path.join(m.path, "sparse"))
    u = settles(c, "use-df", used_bytes=0, inodes=1)
    assert u["capacity_bytes"] == 2 << 30
    listed = cli(c, "volume", "list")
    assert listed.returncode == 0 and "use-df" in listed.stdout and "2.0 GiB" in listed.stdout, listed


def fill(vol: Any, path: str, piece: int) -> int:
    """Append `piece`-byte writes (each flushed) until ENOSPC; the bytes accepted."""
    written = 0
    f = vol.open(path, "ab")
    try:
        while True:
            try:
                f.write(os.urandom(piece))
                f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written
            written += piece
            assert written < 64 * MiB, "never refused"
    finally:
        with contextlib.suppress(OSError):  # the refused bytes are still buffered: refused again
            f.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """One metanode: the volume has one meta partition, whose own count is
    exact (with several, each adds what the master last saw of the others)."""
    c = EmbeddedCluster(str(tmp_path_factory.mktemp("usage")))
    try:
        c.up(metanodes=1, datanodes=1)
        yield c
    finally:
        c.down()


def test_capacity_refuses_growth_at_the_right_byte_then_resumes(small: EmbeddedCluster) -> None:
    c = small
    capacity = 8 * MiB + 10 * 1024  # not a whole number of the 256 KiB pieces, nor of blocks
    c.create_volume("use-cap", capacity_gib=capacity / (1 << 30))
    with c.connect("use-cap") as vol:
        first = os.urandom(4 * MiB)
        with vol.open("/first", "wb") as f:
            f.write(first)
        settles(c, "use-cap", used_bytes=4 * MiB)  # the metanodes have heard the limit and this
        fill(vol, "/grow", 256 * 1024)
        got = fill(vol, "/grow", BLOCK)  # then block by block: refused at the block that does not fit
        size = vol.stat("/grow").st_size
        assert 4 * MiB + size <= capacity < 4 * MiB + size + BLOCK, (size, got)
        with vol.open("/first", "rb") as f:
            assert f.read() == first  # nothing acknowledged before is touched
        with pytest.raises(OSError) as full:
            with vol.open("/new", "wb") as f:
                f.write(b"y" * BLOCK)
        assert full.value.errno == errno.ENOSPC
        # room again after a delete
        vol.remove("/first")
        settles(c, "use-cap", used_bytes=size)
        assert fill(vol, "/grow", 256 * 1024) >= 3 * MiB
        # and after the capacity is raised (`shoal volume set`)
        r = cli(c, "volume", "set", "use-cap", "--capacity", str(16 * MiB / (1 << 30)))
        assert r.returncode == 0, r.stderr
        settles(c, "use-cap", capacity_bytes=16 * MiB)
        before = vol.stat("/grow").st_size

        def grown() -> bool:  # the metanodes hear the new capacity with the next heartbeat round
            fill(vol, "/grow", 256 * 1024)
            return vol.stat("/grow").st_size - before >= 7 * MiB
        wait_for(grown, 10, "writes under the raised capacity")
        assert vol.stat("/grow").st_size <= 16 * MiB


def test_inode_limit_refuses_creates_until_raised(small: EmbeddedCluster) -> None:
    c = small
    c.create_volume("use-ino")
    with c.connect("use-ino") as vol:
        vol.mkdir("/d")
        settles(c, "use-ino", inodes=2)
        # a limit the volume already holds: the next create is refused once the
        # metanodes have it (the next heartbeat round)
        assert cli(c, "volume", "set", "use-ino", "--inodes", "2").returncode == 0
        wait_for(lambda: _refused(vol, "/probe"), 10, "creates refused at the limit")
        r = cli(c, "volume", "set", "use-ino", "--inodes", "4")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: not _refused(vol, "/d/a"), 10, "creates again under the new limit")
        vol.open("/d/a", "wb").close()
        vol.open("/d/b", "wb").close()
        for path in ("/d/c", "/e"):
            with pytest.raises(OSError) as full:
                vol.open(path, "wb").close()
            assert full.value.errno == errno.ENOSPC
        assert sorted(vol.listdir("/d")) == ["a", "b"]
        assert cli(c, "volume", "set", "use-ino", "--inodes", "0").returncode == 0
        settles(c, "use-ino", inode_limit=0)
        wait_for(lambda: not _refused(vol, "/d/c"), 10, "creates again without a limit")


def test_concurrent_creates_never_pass_the_inode_limit(small: EmbeddedCluster) -> None:
    c = small
    c.create_volume("use-race")
    assert cli(c, "volume", "set", "use-race", "--inodes", "12").returncode == 0
    with c.connect("use-race") as vol:
        wait_for(lambda: _refused_past(vol, 12), 15, "the limit at the metanodes")
        made: list[str] = []
        errors: list[OSError] = []  # an assertion in a thread would not fail the test

        def creator(t: int) -> None:
            for i in range(6):
                try:
                    vol.open(f"/t{t}-{i}", "wb").close()
                    made.append(f"/t{t}-{i}")
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        errors.append(exc)
        threads = [threading.Thread(target=creator, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads), errors
        assert len(made) == 11, made  # 12 with the root: not one more, however they raced
        assert len(vol.listdir("/")) == 11


def _refused_past(vol: Any, limit: int) -> bool:
    """Fill up to `limit` inodes (the root counts) with probes, check the next
    create is refused, then remove the probes; whether it was."""
    made = []
    try:
        for i in range(limit - 1):
            vol.open(f"/probe{i}", "wb").close()
            made.append(f"/probe{i}")
        return _refused(vol, "/probe-over")
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
        return False
    finally:
        for p in made:
            vol.remove(p)


def _refused(vol: Any, path: str) -> bool:
    """Whether creating `path` is refused with ENOSPC; a create that works is undone."""
    try:
        vol.open(path, "wb").close()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
        return True
    vol.remove(path)
    return False


def test_counts_after_a_metanode_kill_mid_workload_equal_a_recount(small: EmbeddedCluster) -> None:
    c = small
    c.create_volume("use-kill")
    stop = threading.Event()
    errors: list[BaseException] = []

    # creates, overwrites and truncates until stopped (no unlinks: a restarted
    # metanode keeps unlinked files for a lease period, for clients it forgot)
    done = [0]

    def workload() -> None:
        with c.connect("use-kill") as vol:
            i = 0
            while not stop.is_set():
                try:
                    with vol.open(f"/f{i % 50}", "wb") as f:
                        f.write(os.urandom(5000 + 997 * (i % 13)))
                    if i % 5 == 0 and i >= 50:
                        with vol.open(f"/f{(i * 7) % 50}", "r+b") as f:
                            f.truncate(1000)
                    done[0] += 1
                except OSError as exc:
                    errors.append(exc)
                i += 1
    writer = threading.Thread(target=workload)
    writer.start()
    try:
        wait_for(lambda: done[0] > 60, 30, "writes")
        before = cli(c, "volume", "fsck", "use-kill", "--json")  # the counts kept so far equal a recount
        assert before.returncode == 0 and json.loads(before.stdout)["usage"] == [], before.stdout + before.stderr
        c.kill("metanode1")  # mid-workload: the writer's calls wait for it
        c.start("metanode1")
        after = done[0]
        wait_for(lambda: done[0] > after + 40, 60, "writes after the restart")
    finally:
        stop.set()
        writer.join(120)
    assert not errors, errors[:3]
    with c.connect("use-kill") as vol:
        files = ["/" + n for n in vol.listdir("/")]
        want = sum(-(-vol.stat(p).st_size // BLOCK) * BLOCK for p in files)
        assert all(vol.stat(p).st_blocks * 512 == -(-vol.stat(p).st_size // BLOCK) * BLOCK for p in files)
    settles(c, "use-kill", used_bytes=want, inodes=len(files) + 1)
    r = cli(c, "volume", "fsck", "use-kill", "--json")  # every partition's counts equal a fresh count
    assert r.returncode == 0 and json.loads(r.stdout)["usage"] == [], r.stdout + r.stderr


def test_allocated_counts_chunks_with_an_extent_up_to_the_size() -> None:
    from shoalfs.proto.layout import CHUNK, allocated

    assert allocated(0, []) == 0
    assert allocated(1, [0]) == BLOCK
    assert allocated(CHUNK * 16 + 1, [16]) == BLOCK  # a hole of 1 GiB, then one byte
    assert allocated(CHUNK + 5000, [0, 1]) == CHUNK + 2 * BLOCK
    assert allocated(100, [3]) == 0  # an extent past the end (a truncate's leftovers) holds nothing


def quotas(c: EmbeddedCluster, volume: str) -> dict[str, dict[str, Any]]:
    r = cli(c, "quota", "list", volume, "--json")
    assert r.returncode == 0, r.stderr
    return {q["path"]: q for q in json.loads(r.stdout)}


def _linked(src: str, dst: str) -> bool:
    try:
        os.link(src, dst)
    except OSError as exc:
        assert exc.errno == errno.EXDEV, exc
        return False
    return True


def test_directory_quota_limits_its_subtree_and_moves_keep_usage_right(small: EmbeddedCluster,
                                                                      mount_factory: Any) -> None:
    c = small
    c.create_volume("use-dq")
    m = mount_factory(c, "use-dq")
    os.makedirs(os.path.join(m.path, "team", "sub"))
    os.makedirs(os.path.join(m.path, "other"))
    for rel in ("team/a", "team/sub/b", "other/c"):
        with open(os.path.join(m.path, rel), "wb") as f:
            f.write(os.urandom(MiB))
    r = cli(c, "quota", "set", "use-dq", "/team", "--bytes", "4M", "--inodes", "8", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tagged"] == 4  # team, sub, a, b
    wait_for(lambda: quotas(c, "use-dq")["/team"]["used_bytes"] == 2 * MiB, 15, "the subtree's usage")
    assert quotas(c, "use-dq")["/team"]["inodes"] == 4
    with c.connect("use-dq") as vol:
        def over() -> bool:  # 2 MiB held + 3 MiB does not fit in 4 MiB, once the metanodes know the quota
            try:
                with vol.open("/team/probe", "wb") as f:
                    f.write(b"p" * 3 * MiB)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return True
            finally:
                with contextlib.suppress(OSError):
                    vol.remove("/team/probe")
            return False
        wait_for(over, 15, "growth in the subtree refused")
        got = fill(vol, "/team/sub/grow", 256 * 1024)
        assert 2 * MiB - 256 * 1024 < got <= 2 * MiB, got
        with vol.open("/other/free", "wb") as f:  # outside the subtree: only the volume's capacity counts
            f.write(os.urandom(3 * MiB))
        vol.remove("/team/sub/grow")
    wait_for(lambda: quotas(c, "use-dq")["/team"]["used_bytes"] == 2 * MiB, 15, "usage after the delete")
    # a move out of the quota: rename(2) says EXDEV, and mv copies, then removes
    with pytest.raises(OSError) as moved:
        os.rename(os.path.join(m.path, "team", "a"), os.path.join(m.path, "other", "a"))
    assert moved.value.errno == errno.EXDEV
    subprocess.run(["mv", os.path.join(m.path, "team", "a"), os.path.join(m.path, "other", "a")], check=True)
    os.rename(os.path.join(m.path, "team", "sub", "b"), os.path.join(m.path, "team", "b"))  # inside: a rename
    wait_for(lambda: quotas(c, "use-dq")["/team"]["used_bytes"] == MiB, 15, "usage after the move out")
    assert quotas(c, "use-dq")["/team"]["inodes"] == 3  # team, sub, b
    with open(os.path.join(m.path, "other", "a"), "rb") as f:
        assert len(f.read()) == MiB
    # through the mount: the write that does not fit fails at its fsync, with ENOSPC
    dd = subprocess.run(["dd", "if=/dev/zero", f"of={os.path.join(m.path, 'team', 'dd')}", "bs=1M", "count=8",
                         "conv=fsync"], capture_output=True, text=True)
    assert dd.returncode != 0 and "No space left on device" in dd.stderr, dd.stderr
    assert os.stat(os.path.join(m.path, "team", "dd")).st_size <= 3 * MiB
    os.unlink(os.path.join(m.path, "team", "dd"))
    # the inode limit: 3 held of 8
    with c.connect("use-dq") as vol:
        for i in range(5):
            vol.open(f"/team/n{i}", "wb").close()
        with pytest.raises(OSError) as full:
            vol.mkdir("/team/one-too-many")
        assert full.value.errno == errno.ENOSPC
        vol.mkdir("/other/fine")
    # a hard link across the quota's edge: EXDEV too (the file would grow uncounted there)
    with pytest.raises(OSError) as linked:
        os.link(os.path.join(m.path, "team", "b"), os.path.join(m.path, "other", "b"))
    assert linked.value.errno == errno.EXDEV
    assert os.stat(os.path.join(m.path, "team", "b")).st_nlink == 1  # the refused link left no count
    os.link(os.path.join(m.path, "team", "b"), os.path.join(m.path, "team", "sub", "b"))  # inside: fine
    r = cli(c, "quota", "delete", "use-dq", "/team")
    assert r.returncode == 0, r.stderr
    assert "/team" not in quotas(c, "use-dq")
    # the tags of a deleted quota count toward nothing: the same link is a link now
    wait_for(lambda: _linked(os.path.join(m.path, "team", "b"), os.path.join(m.path, "other", "b")), 15,
             "a link across the deleted quota's edge")
    with c.connect("use-dq") as vol:
        wait_for(lambda: not _refused(vol, "/team/after"), 15, "creates again without the quota")
