"""The embedded cluster: every role as a real process on 127.0.0.1, with
configs, logs, pids and data under one directory. Used by `shoal cluster`,
the demo, the tests and the benchmarks."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from shoalfs.client.keys import save_key, store_path
from shoalfs.common.files import atomic_write, open_private_log
from shoalfs.common.tls import client_context


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free port *outside* the kernel's ephemeral range: a port the kernel
    hands out to outgoing connections could be taken again before our
    server binds it (seen under load in CI)."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 30000) if not low <= p <= high]
    random.shuffle(candidates)
    for port in candidates[:500]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # fall back to whatever the kernel picks
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ClusterError(Exception):
    pass


class EmbeddedCluster:
    def __init__(self, data_dir: str) -> None:
        self.dir = os.path.abspath(data_dir)
        self.layout_path = os.path.join(self.dir, "cluster.json")
        self.layout: dict[str, Any] = {}
        if os.path.exists(self.layout_path):
            with open(self.layout_path) as f:
                self.layout = json.load(f)

    # ----- layout -----------------------------------------------------------
    @property
    def master_addr(self) -> str:
        return str(self.layout["master"])

    @property
    def token_file(self) -> str:
        return os.path.join(self.dir, "data", "master", "admin.token")

    @property
    def node_token_file(self) -> str:
        """The nodes' credential (registration), not the admin token."""
        return os.path.join(self.dir, "data", "master", "node.token")

    @property
    def tls_ca(self) -> str | None:
        """The CA a TLS cluster's clients trust (its roles' `tls_ca`), None without TLS."""
        try:
            with open(self._conf("master")) as f:
                ca = json.load(f).get("tls_ca")
        except (OSError, ValueError):
            return None
        return ca if isinstance(ca, str) and ca else None

    def _url(self, path: str) -> str:
        return f"{'https' if self.tls_ca else 'http'}://{self.master_addr}{path}"

    def _tls(self) -> ssl.SSLContext | None:
        return client_context(self.tls_ca)

    def key_file(self, volume: str) -> str:
        """Where this cluster keeps a volume's owner key (0600)."""
        return store_path(self.dir, volume)

    @property
    def token(self) -> str:
        with open(self.token_file) as f:
            return f.read().strip()

    def names(self) -> list[str]:
        return ["master"] + sorted(n for n in self.layout.get("nodes", {}))

    def _conf(self, name: str) -> str:
        return os.path.join(self.dir, "conf", f"{name}.json")

    def _pidfile(self, name: str) -> str:
        return os.path.join(self.dir, "run", f"{name}.pid")

    def log_path(self, name: str) -> str:
        return os.path.join(self.dir, "logs", f"{name}.log")

    def create(self, metanodes: int = 3, datanodes: int = 3, extra: dict[str, Any] | None = None) -> None:
        """Write configs for a new cluster (ports chosen once, kept across restarts)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)  # configs, keys, logs and data: the owner's only
        for sub in ("conf", "run", "logs", "data", "keys"):
            os.makedirs(os.path.join(self.dir, sub), mode=0o700, exist_ok=True)
        master = f"127.0.0.1:{free_port()}"
        nodes: dict[str, dict[str, str]] = {}
        for role, count in (("metanode", metanodes), ("datanode", datanodes)):
            for i in range(count):
                nodes[f"{role}{i + 1}"] = {"role": role, "listen": f"127.0.0.1:{free_port()}"}
        self.layout = {"master": master, "nodes": nodes}
        master_cfg = {"listen": master, "data_dir": os.path.join(self.dir, "data", "master"),
                      "token_file": self.token_file, **(extra or {}).get("master", {})}
        self._write_conf("master", master_cfg)
        for name, node in nodes.items():
            self._write_conf(name, {"listen": node["listen"], "master": master,
                                    "data_dir": os.path.join(self.dir, "data", name),
                                    "token_file": self.node_token_file,
                                    **(extra or {}).get(node["role"], {})})
        atomic_write(self.layout_path, json.dumps(self.layout, indent=2).encode())

    def _write_conf(self, name: str, cfg: dict[str, Any]) -> None:
        atomic_write(self._conf(name), json.dumps(cfg, indent=2).encode(), mode=0o600)

    def role(self, name: str) -> str:
        return "master" if name == "master" else str(self.layout["nodes"][name]["role"])

    # ----- processes ----------------------------------------------------------
    @staticmethod
    def _proc_stat(pid: int) -> list[str] | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None

    def pid(self, name: str) -> int | None:
        """The pid of a running role process. The pid file also holds the
        process start time, so a reused pid is never mistaken for ours."""
        try:
            with open(self._pidfile(name)) as f:
                pid_s, started = f.read().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            return None
        fields = self._proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X") or fields[19] != started:
            return None
        return pid

    def start(self, name: str) -> None:
        if self.pid(name) is not None:
            return
        if name == "master" and not os.path.exists(self.token_file):
            os.makedirs(os.path.dirname(self.token_file), exist_ok=True)
        log = open_private_log(self.log_path(name))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shoalfs.cli", self.role(name), "--config", self._conf(name)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
        finally:
            log.close()
        fields = self._proc_stat(proc.pid)
        atomic_write(self._pidfile(name), f"{proc.pid} {fields[19] if fields else 0}".encode())

    def signal(self, name: str, sig: int) -> None:
        pid = self.pid(name)
        if pid is not None:
            os.kill(pid, sig)

    def stop(self, name: str, timeout: float = 10.0) -> None:
        pid = self.pid(name)
        if pid is None:
            return
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while self.pid(name) is not None and time.monotonic() < end:
            time.sleep(0.05)
        if self.pid(name) is not None:
            os.kill(pid, signal.SIGKILL)
            while self.pid(name) is not None:
                time.sleep(0.05)

    def kill(self, name: str) -> None:
        """kill -9, as a crash would."""
        pid = self.pid(name)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            while self.pid(name) is not None:
                time.sleep(0.02)

    def up(self, metanodes: int = 3, datanodes: int = 3, timeout: float = 60.0,
           extra: dict[str, Any] | None = None) -> None:
        if not self.layout:
            self.create(metanodes, datanodes, extra)
        # the master first so it writes the token the nodes read
        self.start("master")
        self._wait(lambda: os.path.exists(self.node_token_file), timeout, "master to write its tokens")
        for name in self.names()[1:]:
            self.start(name)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        want_meta = sum(1 for n in self.layout["nodes"].values() if n["role"] == "metanode")
        want_data = len(self.layout["nodes"]) - want_meta

        def ready() -> bool:
            info = self.http_get("/cluster/info")
            return bool(info) and len(info["metanodes"]) >= want_meta and len(info["datanodes"]) >= want_data
        self._wait(ready, timeout, "all nodes to report to the master")

    def _wait(self, cond: Any, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            for name in self.names():
                if os.path.exists(self._pidfile(name)) and self.pid(name) is None:
                    raise ClusterError(f"{name} exited; see {self.log_path(name)}")
            time.sleep(0.1)
        raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")

    def http_get(self, path: str) -> Any:
        """A GET as the operator (the admin token, once the master has written it)."""
        headers = {"Authorization": f"Bearer {self.token}"} if os.path.exists(self.token_file) else {}
        try:
            req = urllib.request.Request(self._url(path), headers=headers)
            with urllib.request.urlopen(req, timeout=2, context=self._tls()) as r:
                env = json.load(r)
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return env.get("data") if env.get("code") == 0 else None

    def admin(self, path: str, body: dict[str, Any]) -> Any:
        """An authenticated admin call; raises ShoalError on an error envelope."""
        from shoalfs.proto.errors import ShoalError

        req = urllib.request.Request(self._url(path), method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30, context=self._tls()) as r:
                env = json.load(r)
        except urllib.error.HTTPError as exc:
            env = json.load(exc)
        if env["code"] != 0:
            raise ShoalError(env["code"], env["msg"], env.get("data"))
        return env["data"]

    def create_volume(self, name: str, owner: str = "test", capacity_gib: float = 10) -> dict[str, Any]:
        """Create it and keep its owner key in the cluster's key store."""
        vol = dict(self.admin("/volume/create", {"name": name, "owner": owner, "capacity_gib": capacity_gib}))
        save_key(self.key_file(name), vol.pop("owner_key"))
        return vol

    def connect(self, volume: str, options: Any = None, **kwargs: Any) -> Any:
        """The SDK on one of this cluster's volumes, with its owner key."""
        from shoalfs.client.core import ClientOptions
        from shoalfs.client.sdk import connect

        kwargs.setdefault("key_file", self.key_file(volume))
        options = options or ClientOptions()
        options.tls_ca = options.tls_ca or self.tls_ca
        return connect(self.master_addr, volume, options, **kwargs)

    def down(self) -> None:
        if not self.layout:
            return
        for name in reversed(self.names()):
            self.stop(name)
            try:
                os.unlink(self._pidfile(name))
            except FileNotFoundError:
                pass

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.names():
            listen = self.master_addr if name == "master" else self.layout["nodes"][name]["listen"]
            pid = self.pid(name)
            rows.append({"name": name, "role": self.role(name), "addr": listen,
                         "pid": pid, "running": pid is not None})
        return rows
