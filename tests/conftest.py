"""Fixtures: real clusters of real processes on 127.0.0.1, always torn down."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

from shoalfs.cli.cluster import EmbeddedCluster


def wait_for(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll until cond() is truthy; fail the test with `what` otherwise."""
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., EmbeddedCluster]]:
    started: list[EmbeddedCluster] = []

    def make(metanodes: int = 3, datanodes: int = 3, **extra: dict) -> EmbeddedCluster:
        c = EmbeddedCluster(str(tmp_path_factory.mktemp("cluster")))
        started.append(c)
        c.up(metanodes, datanodes, extra=extra or None)
        return c

    yield make
    for c in started:
        c.down()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    c = EmbeddedCluster(str(tmp_path_factory.mktemp("cluster")))
    try:
        c.up()
        yield c
    finally:
        c.down()


def shoal_env(c: EmbeddedCluster) -> dict[str, str]:
    env = dict(os.environ)
    env["SHOAL_MASTER"] = c.master_addr
    env["SHOAL_TOKEN_FILE"] = c.token_file
    return env
