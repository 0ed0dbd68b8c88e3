"""The embedded cluster: every role as a real process on 127.0.0.1, with
configs, logs, pids and data under one directory: one etcd (Debian's
etcd-server), N masters, the metanodes and the datanodes. Used by
`shoal cluster`, the demo, the tests and the benchmarks."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from shoalfs.client.keys import layout_masters, save_key, store_path
from shoalfs.common.files import atomic_write, open_private_log
from shoalfs.common.tls import client_context
from shoalfs.proto.errors import ShoalError
from shoalfs.replication.view import DEFAULT_REPLICAS

ETCD = "etcd"


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


_HANDED_OUT: set[int] = set()  # ports chosen by this process: free now, but promised to a server


def free_port() -> int:
    """A free port *outside* the kernel's ephemeral range: a port the kernel
    hands out to outgoing connections could be taken again before our
    server binds it (seen under load in CI). Never the same port twice in
    one process: a cluster's ports are chosen before any of its servers bind."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 30000) if not low <= p <= high and p not in _HANDED_OUT]
    random.shuffle(candidates)
    for port in candidates[:500]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
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
        self._leader_addr: str | None = None  # the master that answered last as leader
        if os.path.exists(self.layout_path):
            with open(self.layout_path) as f:
                self.layout = json.load(f)

    # ----- layout -----------------------------------------------------------
    @property
    def masters(self) -> dict[str, str]:
        """Master process name -> address ("master", "master2", ...)."""
        return layout_masters(self.layout)

    @property
    def master_addr(self) -> str:
        """Every master, comma-separated: what clients, nodes and the CLI take."""
        return ",".join(self.masters.values())

    @property
    def etcd_endpoint(self) -> str:
        return str(self.layout["etcd"]["client"])

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

    def _url(self, path: str, addr: str | None = None) -> str:
        """The URL of `path` on one master (default: the first)."""
        return f"{'https' if self.tls_ca else 'http'}://{addr or next(iter(self.masters.values()))}{path}"

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
        """Every process, in start order."""
        etcd = [ETCD] if "etcd" in self.layout else []
        return etcd + list(self.masters) + sorted(n for n in self.layout.get("nodes", {}))

    def _conf(self, name: str) -> str:
        return os.path.join(self.dir, "conf", f"{name}.json")

    def _pidfile(self, name: str) -> str:
        return os.path.join(self.dir, "run", f"{name}.pid")

    def log_path(self, name: str) -> str:
        return os.path.join(self.dir, "logs", f"{name}.log")

    def create(self, metanodes: int = 3, datanodes: int = 3, extra: dict[str, Any] | None = None,
               masters: int = 1) -> None:
        """Write configs for a new cluster (ports chosen once, kept across restarts)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)  # configs, keys, logs and data: the owner's only
        for sub in ("conf", "run", "logs", "data", "keys"):
            os.makedirs(os.path.join(self.dir, sub), mode=0o700, exist_ok=True)
        names = ["master"] + [f"master{i}" for i in range(2, masters + 1)]
        master_addrs = {name: self._address(name, "master") for name in names}
        nodes: dict[str, dict[str, str]] = {}
        for role, count in (("metanode", metanodes), ("datanode", datanodes)):
            for i in range(count):
                nodes[f"{role}{i + 1}"] = {"role": role, "listen": self._address(f"{role}{i + 1}", role)}
        etcd = self._etcd_layout()
        self.layout = {"etcd": etcd, "masters": master_addrs, "nodes": nodes}
        for name, addr in master_addrs.items():
            self._write_conf(name, {"listen": addr, "data_dir": os.path.join(self.dir, "data", name),
                                    "etcd": etcd["client"],
                                    # the first master's token files are the cluster's (all hold the same)
                                    **({"token_file": self.token_file} if name == "master" else {}),
                                    # as many copies as the cluster has nodes for, up to 3
                                    "default_replicas": max(1, min(DEFAULT_REPLICAS, metanodes, datanodes)),
                                    **(extra or {}).get("master", {})})
        for name, node in nodes.items():
            self._write_conf(name, {"listen": node["listen"], "master": self.master_addr,
                                    "data_dir": os.path.join(self.dir, "data", name),
                                    "token_file": self.node_token_file,
                                    **(extra or {}).get(node["role"], {})})
        atomic_write(self.layout_path, json.dumps(self.layout, indent=2).encode())

    def _address(self, name: str, role: str) -> str:
        """Where process `name` listens: here every role on 127.0.0.1."""
        return f"127.0.0.1:{free_port()}"

    def _etcd_layout(self) -> dict[str, Any]:
        """The etcd the masters use: here one member on 127.0.0.1."""
        return {"client": self._address(ETCD, ETCD), "peer": self._address(ETCD, ETCD)}

    def _add_etcd(self) -> None:
        """A cluster made before etcd: give it one; its master imports its old state file."""
        self.layout["etcd"] = self._etcd_layout()
        for name in self.masters:
            with open(self._conf(name)) as f:
                cfg = json.load(f)
            self._write_conf(name, dict(cfg, etcd=self.etcd_endpoint))
        atomic_write(self.layout_path, json.dumps(self.layout, indent=2).encode())

    def _write_conf(self, name: str, cfg: dict[str, Any]) -> None:
        atomic_write(self._conf(name), json.dumps(cfg, indent=2).encode(), mode=0o600)

    def role(self, name: str) -> str:
        if name == ETCD or name in self.masters:
            return "master" if name != ETCD else ETCD
        return str(self.layout["nodes"][name]["role"])

    def _command(self, name: str) -> list[str]:
        if name != ETCD:
            return [sys.executable, "-m", "shoalfs.cli", self.role(name), "--config", self._conf(name)]
        client, peer = self.layout["etcd"]["client"], self.layout["etcd"]["peer"]
        return ["etcd", "--name", "shoal", "--data-dir", os.path.join(self.dir, "data", "etcd"),
                "--listen-client-urls", f"http://{client}", "--advertise-client-urls", f"http://{client}",
                "--listen-peer-urls", f"http://{peer}", "--initial-advertise-peer-urls", f"http://{peer}",
                "--initial-cluster", f"shoal=http://{peer}", "--log-level", "warn", "--logger", "zap"]

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
        command = self._command(name)
        if shutil.which(command[0]) is None:
            raise ClusterError(f"{command[0]} not found: install it (./scripts/install installs etcd-server)")
        log = open_private_log(self.log_path(name))
        try:
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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
           extra: dict[str, Any] | None = None, masters: int = 1) -> None:
        if not self.layout:
            self.create(metanodes, datanodes, extra, masters)
        elif "etcd" not in self.layout:
            self._add_etcd()
        # etcd, then the masters (the first writes the token the nodes read), then the nodes
        names = self.names()
        for name in names:
            if self.role(name) in (ETCD, "master"):
                self.start(name)
        self._wait(lambda: os.path.exists(self.node_token_file), timeout, "master to write its tokens")
        for name in names:
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

    def _envelope(self, addr: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        """One call to one master as the operator (the admin token, once written)."""
        headers = {"Authorization": f"Bearer {self.token}"} if os.path.exists(self.token_file) else {}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        req = urllib.request.Request(self._url(path, addr), data=data, headers=headers,
                                     method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._tls()) as r:
                env = json.load(r)
        except urllib.error.HTTPError as exc:
            env = json.load(exc)
        if not isinstance(env, dict) or "code" not in env:
            raise ValueError("no envelope")
        return env

    def _leader_call(self, method: str, path: str, body: dict[str, Any] | None, deadline: float,
                     timeout: float) -> Any:
        """A call to the leader as the operator (the admin token, once written),
        through the master client every role uses: it finds the leader and
        retries transient errors (an election) until `deadline`."""
        import asyncio

        from shoalfs.common.master_client import MasterClient

        async def call() -> Any:
            token = self.token if os.path.exists(self.token_file) else None
            client = MasterClient(self.master_addr, token, timeout=timeout, tls=self._tls())
            if self._leader_addr in client.masters:  # the last leader first: a stopped master costs a timeout
                client.addr = self._leader_addr
            try:
                return await client.request(method, path, body=body, deadline=deadline)
            finally:
                self._leader_addr = client.addr
                await client.close()
        return asyncio.run(call())

    def http_get(self, path: str) -> Any:
        """A GET to the leader as the operator; None if it fails."""
        try:
            return self._leader_call("GET", path, None, 2.0, 2.0)
        except ShoalError:
            return None

    def admin(self, path: str, body: dict[str, Any], election_wait: float = 10.0) -> Any:
        """An authenticated admin call to the leader (waiting up to `election_wait`
        while none leads); raises ShoalError on an error envelope."""
        return self._leader_call("POST", path, body, election_wait, 30.0)

    def master_status(self, skip: str | None = None) -> dict[str, dict[str, Any] | None]:
        """Each master's /master/status (None if it does not answer), but `skip`'s."""
        out: dict[str, dict[str, Any] | None] = {}
        for name, addr in self.masters.items():
            if name == skip:
                continue
            try:
                out[name] = self._envelope(addr, "/master/status", None, 2.0).get("data")
            except (OSError, ValueError, urllib.error.URLError):
                out[name] = None
            if (out[name] or {}).get("leading"):
                self._leader_addr = addr
        return out

    def etcd_state(self) -> dict[str, Any]:
        """The masters' state as etcd holds it: what the next leader loads."""
        import asyncio

        from shoalfs.master.state import unflatten
        from shoalfs.master.store import STATE, EtcdStore

        async def load() -> dict[str, bytes]:
            store = EtcdStore(self.etcd_endpoint)
            try:
                return await store.load(STATE)
            finally:
                await store.close()
        return unflatten(asyncio.run(load()))

    def leader(self) -> str | None:
        """The name of the master that leads now, if one does."""
        return next((name for name, st in self.master_status().items() if st and st.get("leading")), None)

    def create_volume(self, name: str, owner: str = "test", capacity_gib: float = 10,
                      replicas: int | None = None) -> dict[str, Any]:
        """Create it and keep its owner key in the cluster's key store."""
        body: dict[str, Any] = {"name": name, "owner": owner, "capacity_gib": capacity_gib}
        if replicas is not None:
            body["replicas"] = replicas
        vol = dict(self.admin("/volume/create", body))
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
        masters = self.master_status()
        for name in self.names():
            role = self.role(name)
            if role == ETCD:
                listen = self.etcd_endpoint
            else:
                listen = self.masters[name] if role == "master" else self.layout["nodes"][name]["listen"]
            pid = self.pid(name)
            master = masters.get(name)
            state = "" if role != "master" else "down" if master is None else \
                "leader" if master["leading"] else "follower"
            rows.append({"name": name, "role": role, "addr": listen, "pid": pid, "running": pid is not None,
                         "state": state})
        return rows
