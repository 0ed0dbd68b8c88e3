"""Fixtures: real clusters of real processes on 127.0.0.1, always torn down."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.proto.errors import ShoalError
from shoalfs.proto.rpc import RpcConnection


def wait_for(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll until cond() is truthy; fail the test with `what` otherwise."""
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., EmbeddedCluster]]:
    started: list[EmbeddedCluster] = []

    def make(metanodes: int = 3, datanodes: int = 3, **extra: dict) -> EmbeddedCluster:
        c = EmbeddedCluster(str(tmp_path_factory.mktemp("cluster")))
        started.append(c)
        c.up(metanodes, datanodes, extra=extra or None)
        return c

    yield make
    for c in started:
        c.down()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    c = EmbeddedCluster(str(tmp_path_factory.mktemp("cluster")))
    try:
        c.up()
        yield c
    finally:
        c.down()


def volume_cap(c: EmbeddedCluster, volume: str, key: str | None = None) -> str:
    """A capability of a volume, bought with its owner key (or `key`) as a client would."""
    if key is None:
        with open(c.key_file(volume)) as f:
            key = f.read().strip()
    leader = c.leader() if len(c.masters) > 1 else None
    req = urllib.request.Request(c._url("/client/session", c.masters[leader] if leader else None), method="POST",
                                 data=json.dumps({"volume": volume, "key": key}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10, context=c._tls()) as r:
        return str(json.load(r)["data"]["capability"])


class RawRpc:
    """Raw RPCs, each on a new connection that first presents `cap` (if any):
    what a peer speaking our wire format can do. Returns (result code, reply or message)."""

    def __init__(self, cap: str | None = None) -> None:
        self.cap = cap

    def __call__(self, addr: str, op: int, pid: int, body: Any, timeout: float = 10) -> tuple[int, Any]:
        async def go() -> tuple[int, Any]:
            conn = RpcConnection(addr)
            await conn.connect(5)
            try:
                if self.cap is not None:
                    await conn.authenticate(self.cap, 5)
                return 0, await conn.call(op, pid, body, timeout)
            except ShoalError as exc:
                return exc.code, exc.msg
            finally:
                await conn.close()
        return asyncio.run(go())


def shoal_env(c: EmbeddedCluster) -> dict[str, str]:
    env = dict(os.environ)
    env["SHOAL_MASTER"] = c.master_addr
    env["SHOAL_TOKEN_FILE"] = c.token_file
    return env


def cli(c: EmbeddedCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`shoal ARGS` against cluster `c`, as its operator."""
    return subprocess.run([sys.executable, "-m", "shoalfs.cli", *args], env=shoal_env(c),
                          capture_output=True, text=True, timeout=timeout)


# ----- FUSE mounts ---------------------------------------------------------------
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from shoalfs.client.mount import is_mounted, lazy_unmount  # noqa: E402


def fuse_available() -> bool:
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return False
    return os.path.exists("/dev/fuse")


class Mount:
    """A `shoal mount --foreground` process, so tests see its exit code."""

    def __init__(self, cluster: EmbeddedCluster, volume: str, path: str, options: list[str] | None = None,
                 env: dict[str, str] | None = None, wrap: list[str] | None = None) -> None:
        self.env = env
        self.wrap = wrap or []  # a command prefix, e.g. to run in a network namespace
        self.cluster = cluster
        self.volume = volume
        self.path = path
        self.options = options or []
        self.proc: subprocess.Popen | None = None
        self.log_path = f"{path}.log"

    def start(self) -> Mount:
        os.makedirs(self.path, exist_ok=True)
        args = [*self.wrap, sys.executable, "-m", "shoalfs.cli", "mount", self.volume, self.path,
                "--master", self.cluster.master_addr, "--foreground"]
        if not any(o.startswith("key_file=") for o in self.options):
            args += ["--key-file", self.cluster.key_file(self.volume)]  # the owner key unless told
        if self.cluster.tls_ca:
            args += ["--tls-ca", self.cluster.tls_ca]
        for o in self.options:
            args += ["-o", o]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env)
        wait_for(lambda: is_mounted(self.path) or self.proc.poll() is not None, 30, "the mount")
        if self.proc.poll() is not None:
            raise AssertionError(f"mount exited {self.proc.returncode}: {open(self.log_path).read()[-2000:]}")
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.path):
            lazy_unmount(self.path)
        return self.proc.returncode if self.proc is not None else None


@pytest.fixture
def mount_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Mount]]:
    if not fuse_available():
        pytest.fail("FUSE is required: /dev/fuse and pyfuse3 (./scripts/test installs them)")
    mounts: list[Mount] = []

    def make(cluster: EmbeddedCluster, volume: str, options: list[str] | None = None,
             env: dict[str, str] | None = None, wrap: list[str] | None = None) -> Mount:
        m = Mount(cluster, volume, str(tmp_path_factory.mktemp("mnt") / "m"), options, env, wrap)
        mounts.append(m)
        return m.start()

    yield make
    for m in mounts:
        m.stop()


# ----- syslog --------------------------------------------------------------------
import socket as _socket  # noqa: E402
import threading  # noqa: E402


class SyslogListener:
    """A unix datagram socket standing in for /dev/log; collects records."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: list[str] = []
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.records.append(self.sock.recv(65536).decode(errors="replace"))
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def syslog(tmp_path: object) -> Iterator[SyslogListener]:
    import tempfile

    d = tempfile.mkdtemp(prefix="shoal-syslog-")
    listener = SyslogListener(os.path.join(d, "log.sock"))
    yield listener
    listener.close()


# ----- small filesystems for disk-full tests ----------------------------------------
@pytest.fixture
def tmpfs() -> Iterator[Callable[[str, int], str]]:
    """Mount a tmpfs of `size` bytes on a path (its old content copied in);
    lazily unmounted at the end, even while a process still uses it."""
    import shutil
    import tempfile

    mounted: list[str] = []

    def make(path: str, size: int) -> str:
        keep = tempfile.mkdtemp(prefix="shoal-keep-")
        if os.path.isdir(path):
            shutil.copytree(path, keep, dirs_exist_ok=True)
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path], check=True)
        mounted.append(path)
        shutil.copytree(keep, path, dirs_exist_ok=True)
        shutil.rmtree(keep)
        return path

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", path], check=False)


def fill_disk(path: str) -> str:
    """Fill the filesystem holding `path` with one file; returns the file."""
    filler = os.path.join(path, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")
