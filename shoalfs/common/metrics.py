"""Prometheus metrics of one process (issue 12), with prometheus-client.

Every role has one `Metrics`: its own registry (no process-global state),
served on `metrics: HOST:PORT` from the config (servers) or `-o
metrics=HOST:PORT` (mounts; off unless asked). What each metric means is in
README's "Metrics" section; names are `shoal_<what>[_unit]`.

Request metrics are observed where every request passes (the RPC server's
dispatch, the master's HTTP middleware, the client's one call path); the
state a role holds (partitions, lagging replicas, volume usage) is read when
Prometheus scrapes, through `state()` callbacks, so nothing is kept twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shoalfs.proto.opcodes import Op

log = logging.getLogger(__name__)

# latency buckets from a cached stat (~100 us) to a failover (seconds)
SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Samples = Iterable[tuple[tuple[str, ...], float]]


def op_name(opcode: int) -> str:
    try:
        return Op(opcode).name
    except ValueError:
        return str(opcode)


class _StateCollector(Collector):
    """A gauge family read at scrape time from `read()`: (label values, value) pairs."""

    def __init__(self, name: str, doc: str, labels: list[str], read: Callable[[], Samples]) -> None:
        self.name, self.doc, self.labels, self.read = name, doc, labels, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
        for values, value in self.read():
            family.add_metric(list(values), value)
        yield family


class Metrics:
    def __init__(self, role: str) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_requests = Counter("shoal_rpc_requests", "RPC requests served, by opcode and result code",
                                    ["op", "code"], registry=r)
        self.rpc_seconds = Histogram("shoal_rpc_seconds", "Time to serve an RPC request, by opcode", ["op"],
                                     buckets=SECONDS, registry=r)
        self.rpc_in_flight = Gauge("shoal_rpc_in_flight", "RPC requests being served now", registry=r)
        self.events = Counter("shoal_events", "Lifecycle and repair events, by kind", ["event"], registry=r)
        self._client: tuple[Counter, Histogram] | None = None

    # ----- observed ------------------------------------------------------------
    def rpc_started(self) -> float:
        self.rpc_in_flight.inc()
        return time.perf_counter()

    def rpc_done(self, opcode: int, result: int, started: float) -> None:
        self.rpc_in_flight.dec()
        name = op_name(opcode)
        self.rpc_requests.labels(name, str(result)).inc()
        self.rpc_seconds.labels(name).observe(time.perf_counter() - started)

    def client_request(self, opcode: int, result: int, started: float) -> None:
        """One user-level call of a client to a partition (retries included)."""
        if self._client is None:
            self._client = (self.counter("shoal_client_requests", "Calls of this client to partitions, by opcode "
                                         "and final result code (retries included)", ["op", "code"]),
                            self.histogram("shoal_client_request_seconds", "Time of a client's call to a "
                                           "partition, retries included, by opcode", ["op"]))
        name = op_name(opcode)
        self._client[0].labels(name, str(result)).inc()
        self._client[1].labels(name).observe(time.perf_counter() - started)

    def event(self, kind: str) -> None:
        self.events.labels(kind).inc()

    # ----- read when scraped --------------------------------------------------------
    def state(self, name: str, doc: str, labels: list[str], read: Callable[[], Samples]) -> None:
        self.registry.register(_StateCollector(name, doc, labels, read))

    def counter(self, name: str, doc: str, labels: list[str]) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def histogram(self, name: str, doc: str, labels: list[str]) -> Histogram:
        return Histogram(name, doc, labels, buckets=SECONDS, registry=self.registry)

    def serve_or_exit(self, addr: str) -> None:
        """serve(), for a server starting up: a bad or busy address ends it, in one line."""
        try:
            self.serve(addr)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"shoal: metrics on {addr}: {exc}") from None
        log.info("%s metrics on http://%s/metrics", self.role, addr)

    def serve(self, addr: str) -> Any:
        """Serve /metrics on HOST:PORT (a thread of prometheus-client's)."""
        host, sep, port = str(addr).rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"metrics address {addr!r}: want HOST:PORT")
        return start_http_server(int(port), host or "127.0.0.1", registry=self.registry)
