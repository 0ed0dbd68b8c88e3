"""The `shoal` command: clear one-line errors, exit codes, cluster life cycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import shoal_env

from shoalfs.cli.cluster import EmbeddedCluster, free_port


def shoal(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoalfs.cli", *args], capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, needle: str) -> None:
    assert proc.returncode == code, proc
    lines = [line for line in proc.stderr.splitlines() if line.startswith("shoal: error:")]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cluster_up_status_down_idempotent(tmp_path) -> None:
    data = str(tmp_path / "c")
    try:
        up = shoal("cluster", "up", "--data", data, "--metanodes", "1", "--datanodes", "1")
        assert up.returncode == 0, up.stderr
        master = up.stdout.strip()
        assert master.startswith("127.0.0.1:")
        st = shoal("cluster", "status", "--data", data, "--json")
        assert st.returncode == 0
        rows = json.loads(st.stdout)
        assert [(r["role"], r["running"]) for r in rows] == [("etcd", True), ("master", True), ("datanode", True),
                                                              ("metanode", True)]
        assert [r["state"] for r in rows if r["role"] == "master"] == ["leader"]
        # up again is a no-op that keeps the same processes
        assert shoal("cluster", "up", "--data", data).stdout.strip() == master
        assert json.loads(shoal("cluster", "status", "--data", data, "--json").stdout) == rows
    finally:
        assert shoal("cluster", "down", "--data", data).returncode == 0
    assert shoal("cluster", "down", "--data", data).returncode == 0
    after = shoal("cluster", "status", "--data", data, "--json")
    assert after.returncode == 1
    assert not any(r["running"] for r in json.loads(after.stdout))
    for r in rows:
        assert not os.path.exists(f"/proc/{r['pid']}") or open(f"/proc/{r['pid']}/stat").read().split()[2] == "Z"


def test_volume_commands_and_errors(cluster: EmbeddedCluster) -> None:
    env = shoal_env(cluster)
    made = shoal("volume", "create", "clivol", "--owner", "alice", "--capacity", "5", "--json", env=env)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["name"] == "clivol"
    listed = json.loads(shoal("volume", "list", "--json", env=env).stdout)
    assert "clivol" in [v["name"] for v in listed]
    info = shoal("volume", "info", "clivol", env=env)
    assert info.returncode == 0 and "partitions" in info.stdout
    assert_one_line_error(shoal("volume", "create", "clivol", "--owner", "bob", env=env), 1, "already exists")
    assert_one_line_error(shoal("volume", "info", "nope", env=env), 1, "does not exist")
    assert_one_line_error(shoal("volume", "delete", "nope", env=env), 1, "does not exist")
    assert_one_line_error(shoal("volume", "create", "x", env=env), 2, "--owner")
    assert_one_line_error(shoal("volume", "create", "x", "--owner", "a", "--capacity", "big", env=env), 2,
                          "capacity")
    assert_one_line_error(shoal("volume", "frobnicate", env=env), 2, "invalid choice")
    assert_one_line_error(shoal("--bogus", env=env), 2, "")
    bad_token = dict(env, SHOAL_TOKEN_FILE="/nonexistent/token")
    assert_one_line_error(shoal("volume", "create", "y", "--owner", "a", env=bad_token), 1, "admin token")
    deleted = shoal("volume", "delete", "clivol", "--yes", env=env)
    assert deleted.returncode == 0, deleted.stderr


def test_master_unreachable_is_one_line(tmp_path) -> None:
    env = dict(os.environ, SHOAL_MASTER=f"127.0.0.1:{free_port()}")
    proc = shoal("volume", "list", env=env)
    assert_one_line_error(proc, 1, "unreachable")


def test_no_master_configured(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_MASTER"}
    proc = shoal("volume", "list", "--data", str(tmp_path / "none"), env=env)
    assert_one_line_error(proc, 1, "no master address")


def test_server_with_bad_config(tmp_path) -> None:
    cfg = tmp_path / "bad.json"
    cfg.write_text("{nope")
    proc = shoal("metanode", "--config", str(cfg))
    assert proc.returncode != 0
    assert "cannot read config" in proc.stderr and "Traceback" not in proc.stderr
    cfg.write_text("{}")
    proc = shoal("datanode", "--config", str(cfg))
    assert proc.returncode != 0 and "lacks" in proc.stderr


def test_mount_without_pyfuse3_says_what_to_install(tmp_path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['pyfuse3'] = None  # as if not installed\n")
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = shoal("mount", "vol", str(tmp_path), "--master", "127.0.0.1:1", env=env)
    assert_one_line_error(proc, 1, "pip install 'shoalfs[fuse]'")


def test_tables_read_as_a_person_reads_them() -> None:
    from shoalfs.cli.main import cell

    assert cell("disk_free", 79849820160) == "74.4 GiB"
    assert cell("disk_free", 512) == "512 B"
    assert cell("running", True) == "yes" and cell("running", False) == "no"
    assert cell("partitions", 3) == "3"


def test_key_commands(cluster: EmbeddedCluster, tmp_path) -> None:
    """Keys are shown once or written 0600; listings never show a secret; the
    embedded cluster keeps owner keys in its key store."""
    env = shoal_env(cluster)
    owner = tmp_path / "owner.key"
    made = shoal("volume", "create", "keys-a", "--owner", "a", "--out", str(owner), env=env)
    assert made.returncode == 0, made.stderr
    secret = owner.read_text().strip()
    assert secret.startswith("shoal1-") and secret not in made.stdout + made.stderr
    assert os.stat(owner).st_mode & 0o777 == 0o600
    shown = json.loads(shoal("volume", "create", "keys-b", "--owner", "b", "--json", env=env).stdout)
    assert shown["owner_key"].startswith("shoal1-")  # no file: shown, once
    # --data of the embedded cluster (its master is the one asked): the key store
    stored = shoal("volume", "create", "keys-c", "--owner", "c", "--data", cluster.dir, env=env)
    assert stored.returncode == 0, stored.stderr
    assert os.stat(cluster.key_file("keys-c")).st_mode & 0o777 == 0o600
    viewer = tmp_path / "viewer.key"
    made = shoal("key", "create", "keys-a", "--read-only", "--name", "viewer", "--out", str(viewer), env=env)
    assert made.returncode == 0, made.stderr
    assert os.stat(viewer).st_mode & 0o777 == 0o600 and viewer.read_text().strip() not in made.stdout
    extra = json.loads(shoal("key", "create", "keys-a", "--json", env=env).stdout)
    assert extra["name"] == "key1" and extra["rights"] == "rw" and extra["key"].startswith("shoal1-")
    listed = json.loads(shoal("key", "list", "keys-a", "--json", env=env).stdout)
    assert [(k["name"], k["rights"]) for k in listed] == [("owner", "rw"), ("viewer", "ro"), ("key1", "rw")]
    assert all(set(k) == {"name", "key_id", "rights", "created_at"} for k in listed)
    assert shoal("key", "revoke", "keys-a", "viewer", env=env).returncode == 0
    assert [k["name"] for k in json.loads(shoal("key", "list", "keys-a", "--json", env=env).stdout)] == \
        ["owner", "key1"]
    assert_one_line_error(shoal("key", "revoke", "keys-a", "viewer", env=env), 1, "no key named")
    assert_one_line_error(shoal("key", "create", "keys-a", "--name", "key1", env=env), 1, "already has")
    assert_one_line_error(shoal("key", "list", "keys-a", env=dict(env, SHOAL_TOKEN_FILE=str(owner))), 1,
                          "admin token")
