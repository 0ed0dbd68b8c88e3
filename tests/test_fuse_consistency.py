"""Bytes read back through a mount are the bytes written, whatever the mix of
read, write, mmap and truncate (issue 11, item 6)."""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from conftest import Mount, fuse_available

from bench.fsx import exercise
from shoalfs.cli.cluster import EmbeddedCluster

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def mnt(cluster: EmbeddedCluster) -> Iterator[str]:
    assert fuse_available(), "FUSE is required"
    cluster.create_volume("fsx")
    base = tempfile.mkdtemp(prefix="shoal-fsx-", dir="/tmp")
    m = Mount(cluster, "fsx", f"{base}/m").start()
    try:
        yield m.path
    finally:
        assert m.stop() == 0, m.log()
        shutil.rmtree(base, ignore_errors=True)


def test_pwrite_past_eof_after_mmap_read_and_truncate(mnt: str) -> None:
    """The sequence that read written bytes back as zeros in 7 of 8 runs: a
    read-ahead started before the pwrite landed was served afterwards."""
    for run in range(8):
        fd = os.open(f"{mnt}/seq{run}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        model = bytearray(os.urandom(262144))
        os.pwrite(fd, model, 0)
        for size in (108116, 29252, 160292):
            os.ftruncate(fd, size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        data = os.urandom(55140)
        with mmap.mmap(fd, 160292, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[105152:105152 + len(data)] = data
            m.flush()
        model[105152:105152 + len(data)] = data
        os.ftruncate(fd, 168643)
        model.extend(bytes(168643 - len(model)))
        with mmap.mmap(fd, 168643, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[74255:74255 + 50780] == model[74255:74255 + 50780]
        tail = os.urandom(5030)
        os.pwrite(fd, tail, 183065)
        model.extend(bytes(183065 - len(model)))
        model[183065:] = tail
        assert os.pread(fd, 14639, 173456) == model[173456:173456 + 14639], f"run {run}"
        os.close(fd)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_randomized_operations_match_a_model(mnt: str, seed: int) -> None:
    exercise(mnt, 1500, seed)  # `python -m bench.fsx DIR` runs 100,000+ steps per seed
