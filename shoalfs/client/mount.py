"""`shoal mount`: one FUSE mount of one volume, as a process.

The mount process has an explicit life cycle:
  start: open the volume (clear error, exit 1, if it cannot), mount, report
         ready (to the parent that daemonized it, and to systemd);
  stop:  SIGTERM/SIGINT or `umount` -> flush what can be flushed, unmount,
         exit 0.
The lifecycle guard (volume deletion) adds one more way to stop.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from shoalfs.client.core import ClientOptions, VolumeClient
from shoalfs.common.files import open_private_log
from shoalfs.common.metrics import Metrics
from shoalfs.common.tls import TlsConfigError
from shoalfs.proto.errors import Code, ShoalError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FATAL = 1

# options mount(8) passes along that mean nothing to us
GENERIC_OPTIONS = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail",
                   "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async", "sync", "atime",
                   "noatime", "relatime", "norelatime", "strictatime", "diratime", "nodiratime",
                   "x-systemd.automount", "loop"}


# The kernel reads a FUSE file in requests as large as its read-ahead
# window: 128 KiB by default, one Python handler each. 512 KiB measured
# 1.1 -> 1.3 GB/s cold reads (1 MiB requests were slower again, in the
# in-memory ceiling too).
READ_AHEAD_KB = 512


class MountError(Exception):
    """Cannot mount: a clear one-line reason."""


@dataclass
class MountOptions:
    master: str = ""
    volume: str = ""
    mountpoint: str = ""
    writeback_cache: bool = False
    allow_other: bool = True
    read_only: bool = False
    debug: bool = False
    auto_unmount: bool = True
    key_file: str = ""  # the volume's access key (DESIGN.md §7)
    tls_ca: str = ""  # the CA of a TLS cluster
    read_ahead_kb: int = READ_AHEAD_KB  # the kernel's read-ahead for this mount; 0 leaves its default
    local_locks: bool = False  # flock and fcntl locks held by the kernel, for this machine only
    extra: dict[str, str] = field(default_factory=dict)  # options for the lifecycle guard

    # -o flags that set one field: option -> (field, value)
    FLAGS = {"writeback_cache": ("writeback_cache", True), "allow_other": ("allow_other", True),
             "no_allow_other": ("allow_other", False), "ro": ("read_only", True),
             "debug": ("debug", True), "no_auto_unmount": ("auto_unmount", False),
             "local_locks": ("local_locks", True)}
    GUARD_OPTIONS = ("heartbeat", "deleted_exit_code", "watchdog", "linger", "audit_log", "syslog", "push", "detect",
                     "op_deadline", "metrics")

    def apply(self, spec: str) -> None:
        """Apply a comma-separated -o list. A master list continues the same
        way: `master=h1:p1,h2:p2` (an item of host:port without `=` belongs to it)."""
        previous = ""
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, _, value = item.partition("=")
            if previous == "master" and "=" not in item and ":" in item:
                self.master = f"{self.master},{item}"
                continue
            previous = key
            if key == "master":
                self.master = value
            elif key == "key_file":
                self.key_file = value
            elif key == "tls_ca":
                self.tls_ca = value
            elif key == "read_ahead_kb":
                if not value.isdigit():
                    raise MountError(f"read_ahead_kb must be a number of KiB, not {value!r}")
                self.read_ahead_kb = int(value)
            elif key in self.FLAGS:
                setattr(self, *self.FLAGS[key])
            elif key in GENERIC_OPTIONS or key.startswith("x-") or key.startswith("comment="):
                continue
            elif key in self.GUARD_OPTIONS:
                self.extra[key] = value
            else:
                raise MountError(f"unknown mount option {key!r}")


def check_mountpoint(path: str) -> None:
    if not os.path.exists(path):
        raise MountError(f"mountpoint {path} does not exist")
    if not os.path.isdir(path):
        raise MountError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"mountpoint {path} is busy (something is already mounted there)")


def is_mounted(path: str) -> bool:
    """Whether something is mounted at path, from /proc alone: never stat the
    mountpoint, which would hang on a stuck FUSE server (our own, even)."""
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1].replace("\\040", " ") == target for line in f)
    except OSError:
        return False


def mount_device(path: str) -> str:
    """MAJOR:MINOR of what is mounted at path, from /proc alone (never a stat:
    see is_mounted); LookupError if nothing is."""
    target = os.path.abspath(path)
    device = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace("\\040", " ") == target:
                device = fields[2]  # the last one mounted there is the one seen
    if device is None:
        raise LookupError(f"nothing is mounted at {path}")
    return device


MNT_DETACH = 2


def lazy_unmount(path: str) -> None:
    """Last resort: detach a mount the kernel still holds.

    umount2(MNT_DETACH) first: it does not ask the FUSE server anything, so
    it works even when our own event loop is stuck. fusermount3 (for
    non-root) stats the mountpoint, which would hang on a stuck server, so it
    only runs with a short timeout."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), MNT_DETACH) == 0:
        return
    for cmd in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        try:
            if subprocess.run(cmd, capture_output=True, timeout=2).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            continue


class MountSession:
    def __init__(self, opts: MountOptions, ready_fd: int | None = None) -> None:
        self.opts = opts
        self.ready_fd = ready_fd
        self.client: VolumeClient | None = None
        self.ops: Any = None
        self.exit_code = EXIT_OK
        self._stop = asyncio.Event()
        self.mounted_at = 0.0
        self.stop_reason = ""

    def client_options(self) -> ClientOptions:
        deadline = self.opts.extra.get("op_deadline")
        options = ClientOptions(op_deadline=float(deadline)) if deadline else ClientOptions()
        options.tls_ca = self.opts.tls_ca or None
        return options

    def request_stop(self, reason: str, code: int = EXIT_OK) -> None:
        if not self._stop.is_set():
            log.info("stopping: %s", reason)
            self.stop_reason = reason
            self.exit_code = code
            self._stop.set()

    def report(self, line: str) -> None:
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, (line + "\n").encode())
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    async def open_volume(self) -> VolumeClient:
        try:
            client = VolumeClient(self.opts.master, self.opts.volume, self.client_options(),
                                  key_file=self.opts.key_file or None)
        except TlsConfigError as exc:
            raise MountError(str(exc)) from None
        try:
            await client.open()
        except ShoalError as exc:
            await client.close()
            if exc.code in (Code.UNAUTHORIZED, Code.FORBIDDEN):
                raise MountError(exc.msg) from None  # access denied to volume NAME[: why]
            raise MountError(f"cannot open volume {self.opts.volume!r}: {exc.msg}") from None
        if client.credential.read_only:
            self.opts.read_only = True  # a read-only key: the kernel refuses writes with EROFS
        addr = self.opts.extra.get("metrics")
        if addr:  # -o metrics=HOST:PORT (off unless asked)
            client.metrics = Metrics("mount")
            try:
                client.metrics.serve(addr)
            except (OSError, ValueError) as exc:
                await client.close()
                raise MountError(f"metrics on {addr}: {exc}") from None
        return client

    def operations_class(self) -> Any:
        """With cluster-wide locks unless -o local_locks; refused (before
        anything starts) if this pyfuse3 cannot pass locks on."""
        from shoalfs.client import fuse_locks
        from shoalfs.client.fuse_ops import ShoalOperations

        if self.opts.local_locks:
            return ShoalOperations
        if not fuse_locks.supported():
            raise MountError("this pyfuse3 cannot pass file locks on, so locks would hold on this machine only: "
                             "install the patched build (scripts/install), or mount with -o local_locks")
        return fuse_locks.LockingOperations

    def fuse_options(self) -> set[str]:
        import pyfuse3

        opts = set(pyfuse3.default_options)  # default_permissions
        opts |= {f"fsname=shoal:{self.opts.volume}", "subtype=shoal"}
        if self.opts.allow_other and os.getuid() == 0:
            opts.add("allow_other")
        if self.opts.auto_unmount:
            # fusermount3 stays behind and unmounts if this process is killed
            opts.add("auto_unmount")
        if self.opts.read_only:
            opts.add("ro")
        if self.opts.debug:
            opts.add("debug")
        return opts

    async def tune_read_ahead(self) -> None:
        """Set this mount's read-ahead (root only: it is the bdi's sysfs file),
        once the kernel has our INIT answer, which lowers it to what libfuse
        asked for. Never by a stat of the mountpoint: a thread of ours waiting
        on our own mount keeps a killed mount alive (its /dev/fuse stays open)."""
        if not self.opts.read_ahead_kb or os.getuid() != 0 or self.ops is None:
            return
        try:
            await asyncio.wait_for(self.ops.initialized.wait(), 10)
            with open(f"/sys/class/bdi/{mount_device(self.opts.mountpoint)}/read_ahead_kb", "w") as f:
                f.write(f"{self.opts.read_ahead_kb}\n")
        except (OSError, TimeoutError, LookupError) as exc:  # a slower mount, never a failed one
            log.warning("could not set read-ahead to %d KiB: %s", self.opts.read_ahead_kb, exc)

    async def on_mounted(self) -> None:
        """Start background work (the lifecycle guard overrides this)."""

    async def before_unmount(self) -> None:
        """Flush what can be flushed."""
        if self.ops is not None:
            await self.ops.flush_all()

    async def run(self) -> int:
        import pyfuse3
        import pyfuse3.asyncio

        pyfuse3.asyncio.enable()
        pyfuse3.asyncio.notify_closing = _notify_closing  # type: ignore[attr-defined]
        check_mountpoint(self.opts.mountpoint)
        operations = self.operations_class()
        self.client = await self.open_volume()
        self.ops = operations(self.client, writeback_cache=self.opts.writeback_cache)
        try:
            pyfuse3.init(self.ops, self.opts.mountpoint, self.fuse_options())
        except RuntimeError as exc:
            await self.client.close()
            raise MountError(f"cannot mount on {self.opts.mountpoint}: {exc}") from None
        self.mounted_at = time.time()
        loop = asyncio.get_running_loop()
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT"), (signal.SIGHUP, "SIGHUP")):
            loop.add_signal_handler(sig, self.request_stop, name)
        fuse_main = asyncio.ensure_future(pyfuse3.main())
        fuse_main.add_done_callback(lambda _: self.request_stop("unmounted"))
        await self.tune_read_ahead()
        self.report("READY")
        log.info("mounted volume %s on %s", self.opts.volume, self.opts.mountpoint)
        await self.on_mounted()
        await self._stop.wait()
        await self.shutdown(fuse_main)
        return self.exit_code

    async def shutdown(self, fuse_main: asyncio.Future[Any]) -> None:
        import pyfuse3

        if not fuse_main.done():
            try:
                await asyncio.wait_for(self.before_unmount(), 5)
            except TimeoutError:
                log.warning("flush at shutdown did not finish in 5 s")
            pyfuse3.terminate()
            try:
                await asyncio.wait_for(fuse_main, 5)
            except TimeoutError:
                log.warning("FUSE loop did not stop in 5 s")
        try:
            pyfuse3.close(unmount=True)
        except Exception as exc:  # already unmounted by the user, or the session is gone
            log.debug("close: %r", exc)
        if is_mounted(self.opts.mountpoint):
            lazy_unmount(self.opts.mountpoint)
        if self.client is not None:
            await self.client.close()
        log.info("unmounted %s (%s)", self.opts.mountpoint, self.stop_reason)


def _notify_closing(fd: Any) -> None:
    """pyfuse3's asyncio layer sets an exception on every pending read of the
    FUSE device at terminate(), even on one that has just fired, and then
    fails with InvalidStateError half-way (seen at SIGTERM during a large
    write): only futures still pending are told."""
    import pyfuse3.asyncio

    for fut in list(pyfuse3.asyncio._read_futures.get(fd, ())):
        if not fut.done():
            fut.set_exception(pyfuse3.asyncio.ClosedResourceError())


def run_foreground(opts: MountOptions, ready_fd: int | None, session_cls: type[MountSession] = MountSession) -> int:
    from shoalfs.common.service import install_loop_policy

    install_loop_policy()
    session = session_cls(opts, ready_fd)
    try:
        return asyncio.run(session.run())
    except MountError as exc:
        session.report(f"ERROR {exc}")
        print(f"shoal: error: {exc}", file=sys.stderr)
        return EXIT_FATAL


def spawn_daemon(argv: list[str], log_file: str, timeout: float = 60.0) -> int:
    """Start the mount in the background; return once it is live (or failed)."""
    r, w = os.pipe()
    with open_private_log(log_file) as logf:
        proc = subprocess.Popen([sys.executable, "-m", "shoalfs.cli", *argv, "--foreground",
                                 "--ready-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf, start_new_session=True)
    os.close(w)
    deadline = time.monotonic() + timeout
    buf = b""
    with os.fdopen(r, "rb", buffering=0) as reader:
        while b"\n" not in buf and time.monotonic() < deadline:
            # wake on data, or every half second to notice a child that died silently
            if select.select([reader], [], [], min(0.5, max(0.0, deadline - time.monotonic())))[0]:
                chunk = reader.read(4096)
                if not chunk:
                    break  # the child closed the pipe without a word
                buf += chunk
            elif proc.poll() is not None:
                break
    line = buf.decode(errors="replace").strip()
    if line == "READY":
        print(f"mounted (pid {proc.pid}, log {log_file})")
        return EXIT_OK
    if line.startswith("ERROR "):
        print(f"shoal: error: {line[6:]}", file=sys.stderr)
    else:
        print(f"shoal: error: the mount process did not become ready; see {log_file}", file=sys.stderr)
        if proc.poll() is None:
            proc.terminate()
    return EXIT_FATAL
