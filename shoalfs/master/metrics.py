"""The master's Prometheus metrics (common/metrics.py): its HTTP requests,
whether it leads, its view of the nodes and each volume's usage."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from shoalfs.common.metrics import Metrics
from shoalfs.master.state import DELETED
from shoalfs.master.usage import volume_usage

if TYPE_CHECKING:
    from shoalfs.master.server import Master

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def master_metrics(m: Master) -> tuple[Metrics, Any]:
    """The master's metrics, and an aiohttp middleware that counts its requests."""
    metrics = Metrics("master")
    requests = metrics.counter("shoal_http_requests", "HTTP requests answered, by route and status",
                               ["route", "status"])
    seconds = metrics.histogram("shoal_http_seconds", "Time to answer an HTTP request, by route", ["route"])
    metrics.state("shoal_master_leading", "1 while this master leads", [],
                  lambda: [((), 1.0 if m.leadership.leading else 0.0)])

    def nodes() -> list[tuple[tuple[str, ...], float]]:
        counts: dict[tuple[str, str], int] = {}
        for addr, node in m.state.nodes.items():
            key = (str(node.get("role", "?")), "up" if m.nodes.is_up(addr) else "down")
            counts[key] = counts.get(key, 0) + 1
        return [(k, float(v)) for k, v in counts.items()]
    metrics.state("shoal_nodes", "Registered nodes, by role and whether they answer heartbeats (leader only)",
                  ["role", "status"], nodes)

    def volumes() -> list[tuple[tuple[str, ...], float]]:
        out: list[tuple[tuple[str, ...], float]] = []
        for vol in m.state.volumes.values() if m.leadership.leading else ():
            if vol["status"] == DELETED:
                continue
            u = volume_usage(vol, m.nodes.reports)
            for what in ("used_bytes", "capacity_bytes", "inodes", "raw_bytes"):
                out.append(((vol["name"], what), float(u[what])))
        return out
    metrics.state("shoal_volume", "Each volume's usage and capacity as the leader sums it (what: used_bytes, "
                  "capacity_bytes, inodes, raw_bytes)", ["volume", "what"], volumes)

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resp = await handler(request)
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        requests.labels(route, str(resp.status)).inc()
        seconds.labels(route).observe(time.perf_counter() - started)
        return resp

    return metrics, count
