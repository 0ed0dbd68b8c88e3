"""Shared benchmark helpers: an embedded cluster for the run, a result table."""

from __future__ import annotations

import contextlib
import platform
import tempfile
import time
from collections.abc import Iterator

from rich.console import Console
from rich.table import Table

from shoalfs.cli.cluster import EmbeddedCluster

console = Console()


@contextlib.contextmanager
def bench_cluster() -> Iterator[EmbeddedCluster]:
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as d:
        c = EmbeddedCluster(d)
        try:
            c.up()
            yield c
        finally:
            c.down()


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def machine() -> str:
    import os

    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def show(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"machine: {machine()}")
