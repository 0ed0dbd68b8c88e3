"""A cluster made before etcd: its layout gains an etcd, and the first master
to lead imports the old state file and signing key, once."""

from __future__ import annotations

import json
import os
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.master.keys import _digest
from shoalfs.proto import tombstone
from shoalfs.proto.errors import Code, ShoalError
from tests.conftest import volume_cap


def test_old_cluster_imports_its_state_into_etcd(tmp_path) -> None:
    c = EmbeddedCluster(str(tmp_path / "old"))
    c.create(metanodes=1, datanodes=1)
    # the layout and master config of a cluster from before etcd
    master_addr = c.masters["master"]
    layout = {"master": master_addr, "nodes": c.layout["nodes"]}
    with open(c.layout_path, "w") as f:
        json.dump(layout, f)
    with open(c._conf("master")) as f:
        cfg = {k: v for k, v in json.load(f).items() if k != "etcd"}
    c._write_conf("master", cfg)
    # its state file and signing key, as that master wrote them
    master_dir = os.path.join(c.dir, "data", "master")
    os.makedirs(master_dir, mode=0o700, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    with open(os.path.join(master_dir, "master.key"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    gone = tombstone.sign(key, {"vol_id": "gone-id", "name": "gone", "deleted_at": time.time(), "epoch": 4})
    secret = "ab" * 32
    doc = {"next_pid": 50, "epoch": 4, "nodes": {}, "revoked": {},
           "volumes": {"old-id": {"name": "oldvol", "vol_id": "old-id", "owner": "o", "capacity_gib": 1,
                                  "status": "ACTIVE", "created_at": time.time(), "meta_partitions": [],
                                  "data_partitions": [],
                                  "keys": {"0123456789abcdef": {"name": "owner", "rights": "rw",
                                                                "created_at": time.time(),
                                                                "hash": _digest(secret)}}}},
           "graveyard": {"gone-id": gone}}
    with open(os.path.join(master_dir, "master.json"), "w") as f:
        json.dump(doc, f)
    c = EmbeddedCluster(c.dir)
    try:
        c.up(metanodes=1, datanodes=1)
        assert "etcd" in c.layout
        assert [v["name"] for v in c.http_get("/volume/list")] == ["oldvol"]
        assert c.http_get("/cluster/info")["master_pubkey"] == tombstone.public_hex(key)
        with pytest.raises(ShoalError) as refused:
            c.admin("/volume/undelete", {"name": "gone"})
        assert refused.value.code == Code.VOLUME_NOT_EXIST
        state = c.etcd_state()
        assert state["next_pid"] == 50 and state["graveyard"]["gone-id"] == gone
        assert os.path.exists(os.path.join(master_dir, "master.json.imported"))
        assert not os.path.exists(os.path.join(master_dir, "master.json"))
        # the old key still buys a session, and new volumes take new partition ids
        assert volume_cap(c, "oldvol", key=f"shoal1-0123456789abcdef-{secret}")
        made = c.create_volume("newvol")
        assert min(p["pid"] for p in made["meta_partitions"] + made["data_partitions"]) >= 50
        c.stop("master")
        c.start("master")  # no second import: etcd is the state now
        c.wait_ready(30)
        assert sorted(v["name"] for v in c.http_get("/volume/list")) == ["newvol", "oldvol"]
    finally:
        c.down()
