"""The audit record of a volume deletion seen by a mount.

One record, sent as RFC 5424 syslog with structured data (to /dev/log or a
configured unix/udp address) and appended as a JSON line to the local audit
log. Writing it never blocks the exit for long and never raises.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

SD_ID = "shoalfs@32473"  # 32473: the enterprise number reserved for examples (RFC 5612)
FACILITY_DAEMON = 3
SEVERITY_NOTICE = 5


def default_audit_log() -> str:
    if os.getuid() == 0:
        return "/var/log/shoalfs/audit.log"
    return os.path.expanduser("~/.local/state/shoalfs/audit.log")


def _sd_escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def rfc5424(record: dict[str, Any], app: str = "shoalfs") -> bytes:
    pri = FACILITY_DAEMON * 8 + SEVERITY_NOTICE
    ts = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    params = " ".join(f'{k}="{_sd_escape(v)}"' for k, v in record.items() if v is not None)
    msg = (f"volume {record.get('volume')} ({record.get('vol_id')}) was deleted; "
           f"unmounting {record.get('mountpoint')} and exiting {record.get('exit_code')}")
    host = socket.gethostname() or "-"
    return f"<{pri}>1 {ts} {host} {app} {os.getpid()} VOLUME_DELETED [{SD_ID} {params}] {msg}".encode()


def send_syslog(record: dict[str, Any], target: str) -> bool:
    """target: "unix:/dev/log", "udp:HOST:PORT" or "off"."""
    if target == "off":
        return False
    data = rfc5424(record)
    try:
        if target.startswith("udp:"):
            host, _, port = target[4:].rpartition(":")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(data, (host or "127.0.0.1", int(port)))
        else:
            path = target.removeprefix("unix:")
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.settimeout(1.0)
                s.connect(path)
                s.send(data)
        return True
    except (OSError, ValueError) as exc:
        log.warning("could not send the audit record to syslog %s: %s", target, exc)
        return False


def append_json(record: dict[str, Any], path: str) -> bool:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    except OSError as exc:
        log.warning("could not append the audit record to %s: %s", path, exc)
        return False
