"""Integration tests of the cluster core through the SDK: real processes."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
from collections.abc import Callable
from typing import Any

import pytest
from conftest import wait_for

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.client import ClientOptions, VolumeClient
from shoalfs.proto.errors import ShoalError

MiB = 1024 * 1024
SIZES = [0, 1, 4096, MiB + 1, 16 * MiB]


def write_mixed(vol, total: int) -> dict[str, str]:
    """Files of mixed sizes adding up to `total` bytes; returns path -> sha256."""
    digests: dict[str, str] = {}
    vol.makedirs("/mixed", exist_ok=True)
    written, i = 0, 0
    while written < total:
        size = SIZES[i % len(SIZES)]
        data = os.urandom(size)
        path = f"/mixed/f{i:03d}_{size}"
        with vol.open(path, "wb") as f:
            f.write(data)
            f.fsync()
        digests[path] = hashlib.sha256(data).hexdigest()
        written += size
        i += 1
    return digests


def check_all(vol, digests: dict[str, str]) -> None:
    for path, digest in digests.items():
        with vol.open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, path


def test_crash_of_metanode_and_datanode_loses_nothing(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory()
    c.create_volume("crash")
    with c.connect("crash") as vol:
        digests = write_mixed(vol, 64 * MiB)
        assert len(digests) >= 10
        c.kill("metanode1")
        c.kill("datanode2")
        c.start("metanode1")
        c.start("datanode2")
        c.wait_ready()
        check_all(vol, digests)  # the same client reconnects by itself
    with c.connect("crash") as vol:
        check_all(vol, digests)
        assert sorted(vol.listdir("/mixed")) == sorted(p.rsplit("/", 1)[1] for p in digests)


def test_whole_cluster_restart_keeps_everything(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory()
    c.create_volume("keep")
    c.create_volume("other")
    with c.connect("keep") as vol:
        vol.makedirs("/d1/d2/d3")
        with vol.open("/d1/d2/d3/file", "wb") as f:
            f.write(b"persist me" * 1000)
        vol.symlink("d2", "/d1/link")
        vol.setxattr("/d1", "user.tag", b"blue")
    c.down()
    assert all(not r["running"] for r in c.status())
    c.up()
    names = {v["name"] for v in c.http_get("/volume/list")}
    assert names == {"keep", "other"}
    with c.connect("keep") as vol:
        assert vol.open("/d1/d2/d3/file", "rb").read() == b"persist me" * 1000
        assert vol.readlink("/d1/link") == "d2"
        assert vol.listdir("/d1/link") == ["d3"]
        assert vol.getxattr("/d1", "user.tag") == b"blue"


def test_paged_readdir_of_20000_entries(cluster: EmbeddedCluster) -> None:
    cluster.create_volume("bigdir")

    async def go() -> list[str]:
        client = VolumeClient(cluster.master_addr, "bigdir", key=open(cluster.key_file("bigdir")).read().strip())
        await client.open()
        try:
            d = await client.create(1, "big", stat.S_IFDIR | 0o755)
            sem = asyncio.Semaphore(64)

            async def one(i: int) -> None:
                async with sem:
                    await client.create(d["ino"], f"entry-{i:05d}", stat.S_IFREG | 0o644)
            await asyncio.gather(*(one(i) for i in range(20_000)))
            return [name async for name, _, _ in client.iterdir(d["ino"], page=777)]
        finally:
            await client.close()

    names = asyncio.run(go())
    assert len(names) == 20_000
    assert len(set(names)) == 20_000
    assert set(names) == {f"entry-{i:05d}" for i in range(20_000)}


def test_rename_semantics(cluster: EmbeddedCluster) -> None:
    cluster.create_volume("ren")
    with cluster.connect("ren") as vol:
        # over an existing file: the target is replaced, its data freed
        with vol.open("/a", "wb") as f:
            f.write(b"AAA")
        with vol.open("/b", "wb") as f:
            f.write(b"BBB")
        vol.rename("/a", "/b")
        assert vol.open("/b", "rb").read() == b"AAA"
        assert not vol.exists("/a")
        # a directory into itself is refused
        vol.makedirs("/x/y")
        with pytest.raises(OSError) as err:
            vol.rename("/x", "/x/y/z")
        assert err.value.errno == errno.EINVAL
        # directory over a non-empty directory
        vol.makedirs("/full/inner")
        with pytest.raises(OSError) as err:
            vol.rename("/x", "/full")
        assert err.value.errno == errno.ENOTEMPTY
        # file over directory and directory over file
        with pytest.raises(OSError) as err:
            vol.rename("/b", "/x")
        assert err.value.errno == errno.EISDIR
        with pytest.raises(OSError) as err:
            vol.rename("/x", "/b")
        assert err.value.errno == errno.ENOTDIR
        # across partitions: make many directories so parents land in different partitions
        client = vol.client
        parts = set()
        for i in range(12):
            vol.mkdir(f"/p{i}")
            parts.add(client.meta_partition(vol.stat(f"/p{i}").st_ino)["pid"])
        assert len(parts) >= 2, "directories should spread over meta partitions"
        pairs = [(i, j) for i in range(12) for j in range(12)
                 if client.meta_partition(vol.stat(f"/p{i}").st_ino)["pid"]
                 != client.meta_partition(vol.stat(f"/p{j}").st_ino)["pid"]]
        i, j = pairs[0]
        with vol.open(f"/p{i}/moving", "wb") as f:
            f.write(b"cross")
        with vol.open(f"/p{j}/victim", "wb") as f:
            f.write(b"old")
        vol.rename(f"/p{i}/moving", f"/p{j}/victim")
        assert vol.listdir(f"/p{i}") == []
        assert vol.listdir(f"/p{j}") == ["victim"]
        assert vol.open(f"/p{j}/victim", "rb").read() == b"cross"
        assert vol.stat(f"/p{j}/victim").st_nlink == 1
        # hard links keep link counts
        vol.link(f"/p{j}/victim", f"/p{i}/hard")
        assert vol.stat(f"/p{i}/hard").st_nlink == 2
        vol.remove(f"/p{j}/victim")
        assert vol.stat(f"/p{i}/hard").st_nlink == 1
        assert vol.open(f"/p{i}/hard", "rb").read() == b"cross"


def test_file_api(cluster: EmbeddedCluster) -> None:
    cluster.create_volume("api")
    with cluster.connect("api") as vol:
        with vol.open("/f", "w+b") as f:
            f.write(b"0123456789")
            f.seek(3)
            assert f.read(3) == b"345"
            assert f.tell() == 6
            f.seek(20)
            f.write(b"end")
            f.truncate(22)
            f.seek(0)
            assert f.read() == b"0123456789" + bytes(10) + b"en"
        with vol.open("/f", "ab") as f:
            f.write(b"+")
        assert vol.stat("/f").st_size == 23
        with vol.open("/f", "r+b") as f:
            f.truncate(4)
        assert vol.open("/f", "rb").read() == b"0123"
        with pytest.raises(FileExistsError):
            vol.open("/f", "xb")
        with pytest.raises(FileNotFoundError):
            vol.open("/missing", "rb")
        with pytest.raises(IsADirectoryError):
            vol.open("/", "rb")
        vol.mkdir("/d")
        with pytest.raises(FileExistsError):
            vol.mkdir("/d")
        with pytest.raises(NotADirectoryError):
            vol.rmdir("/f")
        with pytest.raises(IsADirectoryError):
            vol.remove("/d")
        with vol.open("/d/t.txt", "w") as f:
            f.write("text ✓\n")
        assert vol.open("/d/t.txt").read() == "text ✓\n"
        assert list(vol.walk("/")) == [("/", ["d"], ["f"]), ("/d", [], ["t.txt"])]
        vol.chmod("/f", 0o600)
        assert stat.S_IMODE(vol.stat("/f").st_mode) == 0o600
        # sparse file past 4 GiB
        with vol.open("/sparse", "wb") as f:
            f.seek(5 * 1024**3)
            f.write(b"far")
        with vol.open("/sparse", "rb") as f:
            f.seek(5 * 1024**3 - 3)
            assert f.read() == b"\0\0\0far"


def test_unknown_volume_is_a_clear_error(cluster: EmbeddedCluster) -> None:
    with pytest.raises(OSError) as err:
        cluster.connect("no-such-volume", ClientOptions(op_deadline=5), key="shoal1-" + "0" * 16 + "-" + "0" * 64)
    assert err.value.errno == errno.ESTALE


def test_delete_volume_drops_partitions(cluster: EmbeddedCluster) -> None:
    vol = cluster.create_volume("gone")
    pids = {p["pid"] for p in vol["meta_partitions"] + vol["data_partitions"]}

    def on_disk() -> set[int]:
        found = set()
        for name in os.listdir(os.path.join(cluster.dir, "data")):
            for entry in os.listdir(os.path.join(cluster.dir, "data", name)):
                if entry.startswith(("mp_", "dp_")):
                    found.add(int(entry.split("_")[1]))
        return found

    assert pids <= on_disk()
    cluster.admin("/volume/delete", {"name": "gone"})
    wait_for(lambda: not (pids & on_disk()), 10, "partitions to be removed")
    with pytest.raises(ShoalError):
        cluster.admin("/volume/delete", {"name": "gone"})


def race_creates_against(c: EmbeddedCluster, volume: str, churn: Callable[[Any, dict[str, int]], None]
                         ) -> dict[str, int]:
    """Two clients until each side has done its part 100 times: one runs
    `churn` (which removes or replaces /d), the other creates and then removes
    files in /d. A create that succeeded must never find its directory gone
    under it ("lost": the file went with it)."""
    import threading

    stop = threading.Event()
    counts = {"churned": 0, "created": 0, "lost": 0}

    def churner() -> None:
        with c.connect(volume) as vol:
            while not stop.is_set():
                churn(vol, counts)

    def creator() -> None:
        with c.connect(volume) as vol:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    vol.open(f"/d/f{i}", "wb").close()
                except FileNotFoundError:
                    continue
                counts["created"] += 1
                try:
                    vol.remove(f"/d/f{i}")
                except FileNotFoundError:
                    counts["lost"] += 1

    threads = [threading.Thread(target=churner), threading.Thread(target=creator)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: min(counts["churned"], counts["created"]) >= 100 or not all(t.is_alive() for t in threads),
                 120, "both sides of the race to run 100 times")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert counts["churned"] >= 100 and counts["created"] >= 100, counts  # both sides really raced
    return counts


def test_rmdir_never_races_a_create(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=2, datanodes=1)
    c.create_volume("race")

    def remove_and_remake(vol: Any, counts: dict[str, int]) -> None:
        try:
            vol.mkdir("/d")
        except FileExistsError:
            pass
        try:
            vol.rmdir("/d")
            counts["churned"] += 1
        except OSError as exc:
            assert exc.errno in (errno.ENOTEMPTY, errno.ENOENT), exc

    assert race_creates_against(c, "race", remove_and_remake)["lost"] == 0


def test_rename_over_a_directory_never_races_a_create(cluster_factory) -> None:
    c: EmbeddedCluster = cluster_factory(metanodes=2, datanodes=1)
    c.create_volume("race2")

    def replace(vol: Any, counts: dict[str, int]) -> None:
        try:
            vol.mkdir("/e")
        except FileExistsError:
            pass
        try:
            vol.rename("/e", "/d")  # an empty directory over /d
            counts["churned"] += 1
        except OSError as exc:
            assert exc.errno == errno.ENOTEMPTY, exc

    assert race_creates_against(c, "race2", replace)["lost"] == 0
