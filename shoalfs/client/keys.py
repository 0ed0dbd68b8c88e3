"""Where a client finds the key of a volume (DESIGN.md §7).

In order: the key given, a key file given, $SHOAL_KEY_FILE, then the key
store of an embedded cluster — `DIR/keys/<volume>.key`, where DIR is
`data_dir`, $SHOAL_DATA or ./shoal-data, and only if that cluster's master
is the one asked (so a key never goes to another cluster's master).
"""

from __future__ import annotations

import json
import os
from typing import Any

from shoalfs.common.files import atomic_write
from shoalfs.common.master_client import same_cluster

DEFAULT_DATA = "./shoal-data"


class KeyFileError(Exception):
    """A key file that cannot be read: one clear line."""


def store_path(data_dir: str, volume: str) -> str:
    return os.path.join(data_dir, "keys", f"{volume}.key")


def layout_masters(layout: dict[str, Any]) -> dict[str, str]:
    """Master name -> address in an embedded cluster's layout (cluster.json;
    one made before etcd names a single "master")."""
    return {str(k): str(v) for k, v in (layout.get("masters") or {"master": layout["master"]}).items()}


def embedded_master(data_dir: str) -> str | None:
    """The master list of the embedded cluster in data_dir, if there is one."""
    try:
        with open(os.path.join(data_dir, "cluster.json")) as f:
            return ",".join(layout_masters(json.load(f)).values())
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def read_key_file(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None


def save_key(path: str, key: str) -> None:
    """A key is a secret: 0600 in a 0700 directory."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    atomic_write(path, (key + "\n").encode(), mode=0o600)


def find_key_file(master: str, volume: str, key_file: str | None = None,
                  data_dir: str | None = None) -> str | None:
    """The file to read the key from: the one given, $SHOAL_KEY_FILE, or the
    embedded cluster's store if that cluster's masters include one of `master`
    (a comma-separated list)."""
    path = key_file or os.environ.get("SHOAL_KEY_FILE")
    if path:
        return path
    data_dir = data_dir or os.environ.get("SHOAL_DATA") or DEFAULT_DATA
    stored = store_path(data_dir, volume)
    if same_cluster(master, embedded_master(data_dir)) and os.path.exists(stored):
        return os.path.abspath(stored)
    return None


def find_key(master: str, volume: str, key: str | None = None, key_file: str | None = None,
             data_dir: str | None = None) -> str | None:
    if key:
        return key
    path = find_key_file(master, volume, key_file, data_dir)
    return read_key_file(path) if path else None
