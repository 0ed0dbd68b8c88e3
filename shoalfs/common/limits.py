"""Process-wide resource limits and the config checks for them."""

from __future__ import annotations

import logging
import math
import resource
import sys
from collections.abc import Mapping
from typing import Any

# File descriptors kept back from client connections for everything else a
# server opens (logs, journals, state files, connections to other nodes):
# one number for the RPC servers and the master's HTTP server.
from shoalfs.proto.server import DESCRIPTOR_HEADROOM as FD_HEADROOM
from shoalfs.proto.server import ServerLimits

log = logging.getLogger(__name__)


def _nr_open() -> int:
    """Linux refuses a file limit above fs.nr_open (1 Mi unless tuned)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and return the soft
    limit now in force (an unlimited one is returned as sys.maxsize). The
    servers derive their connection caps from it, so a refusal to raise is
    logged and the old soft limit returned rather than failing start-up."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


def config_seconds(cfg: Mapping[str, Any], key: str, default: float, zero: bool = False) -> float:
    """A duration from config: a finite number of seconds > 0 (>= 0 if `zero`
    is allowed); ValueError otherwise."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{key} must be a number of seconds {'>=' if zero else '>'} 0, got {value!r}")
    return float(value)


def config_count(cfg: Mapping[str, Any], key: str, default: int) -> int:
    """A count from config: an integer >= 1 (ValueError otherwise)."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    return value


def server_limits(cfg: Mapping[str, Any]) -> ServerLimits:
    """A node's RPC limits from its config keys `rpc_<field>` (ValueError if one is bad)."""
    fields: dict[str, Any] = {}
    for name, default in vars(ServerLimits()).items():
        check = config_seconds if isinstance(default, float) else config_count
        fields[name] = check(cfg, f"rpc_{name}", default)
    return ServerLimits(**fields)


def connection_cap(key: str, requested: int, fd_limit: int) -> int:
    """`requested` client connections, but never more than the open-file
    soft limit minus FD_HEADROOM (ValueError if that leaves none)."""
    room = fd_limit - FD_HEADROOM
    if room < 1:
        raise ValueError(f"the open-file limit ({fd_limit}) leaves no room for client connections "
                         f"({FD_HEADROOM} are kept back); raise `ulimit -n`")
    if requested > room:
        log.warning("%s lowered from %d to %d: the open-file limit is %d", key, requested, room, fd_limit)
        return room
    return requested
