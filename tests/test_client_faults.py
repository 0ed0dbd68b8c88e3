"""Client behaviour when a datanode dies: real processes, no mocks.

- One deadline per user call: a read or a close that cannot reach the only
  datanode fails with EIO after `op_deadline` (not a multiple of it), also
  when the read first waits for a pending prefetch or a close drains several
  write-behind batches.
- Bytes whose write-back failed never make the file grow: the size the
  metanode gets covers only what landed on the datanodes.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import wait_for

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.client.core import ClientOptions

MiB = 1024 * 1024
KiB = 1024
DEADLINE = 5.0
LOW, HIGH = DEADLINE * 0.9, DEADLINE * 1.1  # "within 10 % of the option"


def small_cluster(cluster_factory: Callable[..., EmbeddedCluster]) -> EmbeddedCluster:
    c = cluster_factory(metanodes=1, datanodes=1)
    c.create_volume("v")
    assert "datanode1" in c.names()
    return c


def options() -> ClientOptions:
    return ClientOptions(op_deadline=DEADLINE)


def timed(fn: Callable[[], object]) -> tuple[OSError, float]:
    """Run fn, which must fail with OSError; return the error and the seconds it took."""
    t0 = time.monotonic()
    with pytest.raises(OSError) as err:
        fn()
    return err.value, time.monotonic() - t0


def restart_datanode(c: EmbeddedCluster) -> None:
    c.start("datanode1")
    host, port = c.layout["nodes"]["datanode1"]["listen"].rsplit(":", 1)

    def listening() -> bool:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return True
        except OSError:
            return False
    wait_for(listening, 30, "the datanode to listen again")


def test_read_from_dead_datanode_fails_within_one_deadline(cluster_factory) -> None:
    c = small_cluster(cluster_factory)
    data = os.urandom(4 * MiB)
    with c.connect("v", options()) as vol:
        with vol.open("/f", "wb") as f:
            f.write(data)
            f.fsync()
        with vol.open("/f", "rb") as f:
            c.kill("datanode1")
            # a small first read asks for read-ahead too; that fails, and so
            # would the retry of just the requested bytes: one deadline in all
            err, took = timed(lambda: f.read(64 * KiB))
    assert err.errno == errno.EIO, err
    assert LOW <= took <= HIGH, f"the read took {took:.2f}s with op_deadline={DEADLINE}"


def test_read_that_waits_for_a_prefetch_fails_within_one_deadline(cluster_factory) -> None:
    c = small_cluster(cluster_factory)
    data = os.urandom(4 * MiB)
    piece = 64 * KiB
    with c.connect("v", options()) as vol:
        with vol.open("/f", "wb") as f:
            f.write(data)
            f.fsync()
        with vol.open("/f", "rb") as f:
            pos = 0
            for _ in range(2):  # the first 128 KiB, sequentially: read-ahead is on
                assert f.read(piece) == data[pos:pos + piece]
                pos += piece
            c.kill("datanode1")
            # read on: what was read ahead still serves; the next read waits
            # for a prefetch that cannot finish, and must still fail in time
            waited_for_prefetch = None
            while pos < len(data):
                pending = any(w.off <= pos < w.stop and not w.task.done() for w in f._handle._ahead._windows)
                t0 = time.monotonic()
                try:
                    got = f.read(piece)
                except OSError as exc:
                    err, took = exc, time.monotonic() - t0
                    waited_for_prefetch = pending
                    break
                assert got == data[pos:pos + piece]
                pos += piece
            else:
                pytest.fail("every read succeeded with the only datanode dead")
    assert waited_for_prefetch, "the failing read should have found a prefetch in flight"
    assert err.errno == errno.EIO, err
    assert LOW <= took <= HIGH, f"the read took {took:.2f}s with op_deadline={DEADLINE}"


def landed_then_datanode_killed(c, vol, path: str) -> tuple[Any, bytes]:
    """An open file whose first 3 MiB are durable; then the only datanode dies."""
    landed = os.urandom(3 * MiB)
    f = vol.open(path, "wb")
    f.write(landed)
    f.fsync()
    assert vol.stat(path).st_size == len(landed)
    c.kill("datanode1")
    return f, landed


def assert_only_landed(c, vol, path: str, landed: bytes) -> None:
    """The file holds what landed and did not grow by what failed, before and
    after the datanode is back."""
    assert vol.stat(path).st_size == len(landed)
    restart_datanode(c)
    assert vol.stat(path).st_size == len(landed)
    with vol.open(path, "rb") as r:
        assert r.read() == landed


@pytest.mark.parametrize("unsent", ["buffered", "in-flight"])
def test_failed_write_back_is_reported_by_close_and_does_not_grow_the_file(cluster_factory, unsent) -> None:
    c = small_cluster(cluster_factory)
    with c.connect("v", options()) as vol:
        f, landed = landed_then_datanode_killed(c, vol, "/g")
        if unsent == "buffered":
            f.write(os.urandom(3 * MiB))  # below the write-behind threshold: stays in memory
        else:
            for _ in range(4):  # each starts a write-behind batch that cannot land
                f.write(os.urandom(4 * MiB))
            f.write(os.urandom(3 * MiB))  # and this one waits for a free slot at close
        err, took = timed(f.close)
        assert err.errno == errno.EIO, err
        assert LOW <= took <= HIGH, f"close took {took:.2f}s with op_deadline={DEADLINE}"
        assert f.closed
        assert_only_landed(c, vol, "/g", landed)


def test_close_after_flush_reported_the_error_does_not_grow_the_file(cluster_factory) -> None:
    c = small_cluster(cluster_factory)
    with c.connect("v", options()) as vol:
        f, landed = landed_then_datanode_killed(c, vol, "/h")
        f.write(os.urandom(3 * MiB))
        err, took = timed(f.flush)
        assert err.errno == errno.EIO, err
        assert LOW <= took <= HIGH, f"flush took {took:.2f}s with op_deadline={DEADLINE}"
        f.close()  # the error was reported once, by flush; nothing new failed since
        assert f.closed
        assert_only_landed(c, vol, "/h", landed)
