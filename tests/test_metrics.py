"""Prometheus metrics (issue 12): every server, and a mount that asks, serves
/metrics; requests, state and usage show up as they happen."""

from __future__ import annotations

import os
import re
import urllib.request
from typing import Any

from conftest import wait_for

from shoalfs.cli.cluster import free_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sample `name{labels...}` (labels in any order), or 0 if absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_servers_and_a_mount_serve_metrics(cluster_factory: Any, mount_factory: Any) -> None:
    ports = {role: free_port() for role in ("master", "metanode", "datanode", "mount")}
    c = cluster_factory(metanodes=1, datanodes=1,
                        **{role: {"metrics": f"127.0.0.1:{ports[role]}"} for role in ("master", "metanode",
                                                                                       "datanode")})
    c.create_volume("mx")
    m = mount_factory(c, "mx", [f"metrics=127.0.0.1:{ports['mount']}"])
    with open(os.path.join(m.path, "f"), "wb") as f:
        f.write(os.urandom(300_000))
    with open(os.path.join(m.path, "f"), "rb") as f:
        assert len(f.read()) == 300_000

    meta = scrape(ports["metanode"])
    assert value(meta, "shoal_rpc_requests_total", op="META_CREATE", code="0") >= 1
    assert value(meta, "shoal_rpc_seconds_count", op="META_CREATE") >= 1
    assert value(meta, "shoal_partitions", leading="yes") == 3  # one metanode, three meta partitions
    assert value(meta, "shoal_replicas_lagging") == 0
    data = scrape(ports["datanode"])
    assert value(data, "shoal_rpc_requests_total", op="DATA_WRITE", code="0") >= 1
    assert value(data, "shoal_rpc_requests_total", op="HEARTBEAT", code="0") >= 1
    mount = scrape(ports["mount"])
    assert value(mount, "shoal_client_requests_total", op="META_CREATE", code="0") >= 1
    assert value(mount, "shoal_client_request_seconds_count", op="DATA_WRITE") >= 1
    master = wait_for(lambda: (lambda t: t if value(t, "shoal_volume", volume="mx", what="used_bytes") > 0
                               else None)(scrape(ports["master"])), 15, "the volume's usage")
    assert isinstance(master, str)
    assert value(master, "shoal_master_leading") == 1
    assert value(master, "shoal_volume", volume="mx", what="used_bytes") == 300_000 + 4096 - 300_000 % 4096
    assert value(master, "shoal_nodes", role="metanode", status="up") == 1
    assert value(master, "shoal_http_requests_total", route="/volume/create", status="200") >= 1
    # every metric the shipped Grafana dashboard draws exists
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "packaging", "grafana-dashboard.json")) as f:
        drawn = set(re.findall(r"shoal_[a-z_]+", f.read()))
    served = "".join(scrape(p) for p in ports.values())
    for name in drawn:
        base = re.sub(r"_(bucket|count|sum)$", "", name)  # a histogram's series
        assert f"# TYPE {base} " in served, name
    # a refused request is counted with its code: a name that is not there
    assert not os.path.exists(os.path.join(m.path, "no-such-name"))
    assert value(scrape(ports["mount"]), "shoal_client_requests_total", op="META_LOOKUP", code="100405") >= 1
