"""A file unlinked on one client while another has it open (issue 11): its
data stays until the last client that has it open closes it, or stops
renewing its lease (killed) -- then the metanode's reaper frees it."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

from conftest import wait_for

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.client.core import ClientOptions

MiB = 1024 * 1024


def extent_files(c: EmbeddedCluster) -> set[str]:
    return {p for p in glob.glob(os.path.join(c.dir, "data", "datanode*", "dp_*", "e_*")) if not p.endswith(".crc")}


def test_unlinked_on_one_client_stays_readable_on_another(cluster_factory, mount_factory) -> None:
    lease = 4.0  # renewed every 1.3 s: room for a mount slowed down by a busy machine
    c: EmbeddedCluster = cluster_factory(metanodes=2, datanodes=1, metanode={"open_lease": lease})
    c.create_volume("keep")
    data = os.urandom(10 * MiB + 123)
    with c.connect("keep") as a:
        with a.open("/f", "wb") as f:
            f.write(data)
        # a file nobody else has open goes at once
        with a.open("/g", "wb") as f:
            f.write(b"x" * MiB)
        before = extent_files(c)
        a.remove("/g")
        assert extent_files(c) < before
    before = extent_files(c)
    m = mount_factory(c, "keep")  # mount B: opens the file, reads nothing yet
    with open(f"{m.path}/f", "rb") as held:
        with c.connect("keep", ClientOptions(watch=False)) as a:
            a.remove("/f")
            assert a.listdir("/") == []
        assert extent_files(c) == before  # kept for B
        time.sleep(2 * lease)  # proving a negative: B renews its lease, nothing goes meanwhile
        assert extent_files(c) == before
        assert held.read() == data  # every byte, none of it cached by the kernel before
    # B closed: its lease lapses, and the reaper frees the file two lease periods after the unlink
    wait_for(lambda: not extent_files(c) & before, 20, "the data freed after the last close")


HOLDER = textwrap.dedent("""
    import sys, time
    from shoalfs.client import connect
    vol = connect(sys.argv[1], sys.argv[2], key_file=sys.argv[3])
    f = vol.open("/f", "rb")
    print("open", flush=True)
    time.sleep(3600)  # killed here, the file still open
""")


def test_a_killed_clients_lease_lapses_and_the_reaper_frees_the_file(cluster_factory) -> None:
    lease = 3.0
    c: EmbeddedCluster = cluster_factory(metanodes=1, datanodes=1, metanode={"open_lease": lease})
    c.create_volume("reap")
    with c.connect("reap") as a:
        with a.open("/f", "wb") as f:
            f.write(os.urandom(3 * MiB))
    before = extent_files(c)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, c.master_addr, "reap", c.key_file("reap")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with c.connect("reap", ClientOptions(watch=False)) as a:
            a.remove("/f")
        # the holder renews its lease (every lease/3): well past one lease, the data is still there
        assert holder.poll() is None and extent_files(c) == before  # kept for the holder
        deadline_check = time.monotonic() + 2 * lease
        while time.monotonic() < deadline_check:  # proving a negative: nothing goes early
            assert extent_files(c) == before
            time.sleep(0.2)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # killed: its lease lapses, and after two lease periods the reaper frees the file
    wait_for(lambda: not extent_files(c) & before, 30, "the reaper to free the killed client's unlinked file")
    log = open(c.log_path("metanode1")).read()
    assert "reclaimed unlinked inode" in log


def test_fsck_leaves_an_unlinked_file_held_open_alone(cluster_factory, tmp_path) -> None:
    """An unlinked file still open elsewhere is not an orphan: fsck reports
    nothing and its data stays."""
    from conftest import shoal_env
    from test_cli import shoal
    c: EmbeddedCluster = cluster_factory(metanodes=1, datanodes=1)
    c.create_volume("fs")
    with c.connect("fs") as a:
        with a.open("/f", "wb") as f:
            f.write(b"still open" * 1000)
        with a.open("/f", "rb") as held:
            with c.connect("fs", ClientOptions(watch=False)) as b:
                b.remove("/f")
            proc = shoal("volume", "fsck", "fs", "--grace", "0", "--repair", "--json", env=shoal_env(c))
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert '"findings": []' in proc.stdout
            assert held.read() == b"still open" * 1000
