"""`shoal`: one command for servers, the embedded cluster, volumes and mounts.

Exit codes: 0 success, 1 a failure (one clear line on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import ssl
import sys
import time
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

from shoalfs.cli.cluster import ClusterError, EmbeddedCluster
from shoalfs.client.keys import embedded_master, find_key_file, save_key, store_path
from shoalfs.common.master_client import MasterClient, same_cluster
from shoalfs.common.tls import TlsConfigError, client_context
from shoalfs.proto.errors import ShoalError
from shoalfs.replication.view import DEFAULT_REPLICAS, MAX_REPLICAS, View

DEFAULT_DATA = os.environ.get("SHOAL_DATA", "./shoal-data")
console = Console(width=None if sys.stdout.isatty() else 200)  # pipes get whole lines


def fail(msg: str, code: int = 1) -> NoReturn:
    print(f"shoal: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def master_address(args: argparse.Namespace) -> str:
    if getattr(args, "master", None):
        return str(args.master)
    if os.environ.get("SHOAL_MASTER"):
        return os.environ["SHOAL_MASTER"]
    cluster = EmbeddedCluster(args.data)
    if cluster.layout:
        return cluster.master_addr
    fail("no master address: pass --master ADDR, set SHOAL_MASTER, or use --data DIR of an embedded cluster")


def admin_token(args: argparse.Namespace) -> str | None:
    path = getattr(args, "token_file", None) or os.environ.get("SHOAL_TOKEN_FILE")
    if not path:
        cluster = EmbeddedCluster(args.data)
        path = cluster.token_file if cluster.layout else None
    if not path:
        return None
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        fail(f"cannot read admin token {path}: {exc.strerror}")


def tls_ca(args: argparse.Namespace) -> str | None:
    return getattr(args, "tls_ca", None) or os.environ.get("SHOAL_TLS_CA") or None


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    try:
        return client_context(tls_ca(args))
    except TlsConfigError as exc:
        fail(str(exc))


def call_master(args: argparse.Namespace, method: str, path: str, params: dict[str, Any] | None = None,
                body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
    """`timeout`: for a call that takes long (a scrub); others wait at most 10 s."""
    async def go() -> Any:
        client = MasterClient(master_address(args), admin_token(args), tls=tls_context(args),
                              **({"timeout": timeout} if timeout else {}))
        try:
            # long enough to ride out a master failover (a follower leads within a lease, 3 s);
            # longer while masters answer that an election is under way (a loaded machine)
            return await client.request(method, path, params, body, deadline=max(10.0, timeout or 0.0),
                                        election_grace=20.0)
        finally:
            await client.close()
    try:
        return asyncio.run(go())
    except ShoalError as exc:
        fail(exc.msg)


TIME_COLUMNS = {"created_at", "purge_at", "mounted_at", "last_seen"}
BYTE_COLUMNS = {"disk_free", "disk_total", "used_bytes", "capacity_bytes", "raw_bytes", "max_bytes"}
QUOTA_COLUMNS = ["path", "qid", "max_bytes", "max_inodes", "used_bytes", "inodes"]
USAGE_COLUMNS = ["name", "owner", "status", "used_bytes", "capacity_bytes", "inodes", "inode_limit", "raw_bytes",
                 "created_at", "purge_at"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cell(column: str, value: Any) -> str:
    """A value as a person reads it (--json keeps the raw values)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column in TIME_COLUMNS and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if column in BYTE_COLUMNS and isinstance(value, (int, float)):
        return human_bytes(value)
    return str(value)


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(cell(c, row.get(c)) for c in columns))
    console.print(table)


def emit(args: argparse.Namespace, data: Any, title: str, columns: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_table(title, data if isinstance(data, list) else [data], columns)


# ----- subcommands ---------------------------------------------------------------
def cmd_server(args: argparse.Namespace) -> None:
    if args.command == "master":
        from shoalfs.master.server import main
    elif args.command == "metanode":
        from shoalfs.metanode.server import main
    else:
        from shoalfs.datanode.server import main
    main(args.config)


def cmd_cluster(args: argparse.Namespace) -> None:
    cluster = EmbeddedCluster(args.data)
    try:
        if args.action == "up":
            cluster.up(args.metanodes, args.datanodes, masters=args.masters)
            print(cluster.master_addr)
            print(f"export SHOAL_MASTER={cluster.master_addr}", file=sys.stderr)
        elif args.action == "down":
            cluster.down()
        else:
            if not cluster.layout:
                fail(f"no embedded cluster in {cluster.dir}")
            rows = cluster.status()
            emit(args, rows, f"cluster {cluster.dir}", ["name", "role", "addr", "pid", "running", "state"])
            nodes = cluster.http_get("/cluster/nodes")
            if nodes and not args.json:
                print_table("as the leading master sees them", nodes,
                            ["addr", "role", "status", "partitions", "disk_free"])
            if not all(r["running"] for r in rows) or not any(r["state"] == "leader" for r in rows):
                raise SystemExit(1)
    except ClusterError as exc:
        fail(str(exc))


def partition_row(part: dict[str, Any]) -> dict[str, Any]:
    """A partition's view, as `volume info` shows it."""
    view = View.of_partition(part)
    progress = part.get("catch_up") or {}
    return {"pid": view.pid, "epoch": view.epoch, "leader": view.leader, "members": ",".join(view.members),
            "in_sync": ",".join(view.in_sync),
            "catching_up": ", ".join(f"{m} ({progress.get(m, 'waiting')})" for m in view.lagging()) or "-"}


def cmd_volume(args: argparse.Namespace) -> None:
    cols = ["name", "vol_id", "owner", "status", "capacity_gib", "created_at", "purge_at"]
    if args.action == "create":
        data = call_master(args, "POST", "/volume/create",
                           body={"name": args.name, "owner": args.owner, "capacity_gib": args.capacity,
                                 **({"replicas": args.replicas} if args.replicas else {})})
        store = embedded_key_store(args, args.name)
        hand_over_key(args, data, "owner_key", args.out or store)
        emit(args, data, "volume created", cols)
    elif args.action == "list":
        emit(args, call_master(args, "GET", "/volume/list"), "volumes", USAGE_COLUMNS)
    elif args.action == "set":
        if args.capacity is None and args.inodes is None:
            fail("give --capacity and/or --inodes", 2)
        body: dict[str, Any] = {"name": args.name}
        if args.capacity is not None:
            body["capacity_gib"] = args.capacity
        if args.inodes is not None:
            body["inode_limit"] = args.inodes
        emit(args, call_master(args, "POST", "/volume/set", body=body), "volume changed", cols + ["inode_limit"])
    elif args.action == "info":
        data = call_master(args, "GET", "/volume/info", {"name": args.name})
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print_table(f"volume {args.name}", [data], ["vol_id", *USAGE_COLUMNS])
            parts = [dict(partition_row(p), kind="meta", range=f"[{p['start']}, {p['end']})")
                     for p in data["meta_partitions"]]
            parts += [dict(partition_row(p), kind="data", range="") for p in data["data_partitions"]]
            print_table("partitions", parts, ["kind", "pid", "range", "epoch", "leader", "members", "in_sync",
                                              "catching_up"])
    elif args.action == "delete":
        delete_volume(args)
    elif args.action == "undelete":
        data = call_master(args, "POST", "/volume/undelete", body={"name": args.name})
        emit(args, data, "volume restored", cols)
    elif args.action == "clients":
        emit(args, call_master(args, "GET", "/volume/clients", {"name": args.name}),
             f"clients of {args.name}", SESSION_COLUMNS)
    elif args.action == "fsck":
        fsck_volume(args)
    elif args.action == "scrub":
        scrub_volume(args)


def scrub_volume(args: argparse.Namespace) -> None:
    """Every partition's copies compared (and repaired) by its leader; exit 1
    if a copy differed or could not be compared."""
    rows = call_master(args, "POST", "/volume/scrub", body={"name": args.name}, timeout=900.0)
    out = [{"kind": r["kind"], "pid": r["pid"], "leader": r["leader"], "member": member, "found": found}
           for r in rows for member, found in (r["members"] or {"-": r.get("error", "-")}).items()]
    emit(args, out, f"scrub of {args.name}", ["kind", "pid", "leader", "member", "found"])
    single = "no other in-sync copy to compare"
    if any(row["found"] not in ("same", single) for row in out):
        sys.exit(1)


def embedded_key_store(args: argparse.Namespace, volume: str) -> str | None:
    """Where the embedded cluster keeps owner keys, if the master is its master."""
    if not same_cluster(master_address(args), embedded_master(args.data)):
        return None
    return store_path(args.data, volume)


def hand_over_key(args: argparse.Namespace, data: dict[str, Any], field: str, path: str | None) -> None:
    """A new key is shown once, or written to a 0600 file (and then not shown)."""
    key = data.get(field)
    if not isinstance(key, str):
        return
    if path is None:
        if not args.json:
            print(f"key (shown once, keep it secret): {key}", file=sys.stderr)
        return
    try:
        save_key(path, key)
    except OSError as exc:
        fail(f"cannot write key file {path}: {exc.strerror}; the key, shown once: {key}")
    data.pop(field)
    data[f"{field}_file"] = os.path.abspath(path)
    if not args.json:
        print(f"key written to {os.path.abspath(path)} (mode 0600)", file=sys.stderr)


def cmd_key(args: argparse.Namespace) -> None:
    """Access keys of a volume (DESIGN.md §7): admin token required."""
    cols = ["name", "key_id", "rights", "created_at"]
    if args.action == "create":
        data = call_master(args, "POST", "/key/create",
                           body={"volume": args.volume, "name": args.name, "read_only": args.read_only})
        hand_over_key(args, data, "key", args.out)
        emit(args, data, f"key of {args.volume}", cols + (["key_file"] if args.out else []))
    elif args.action == "list":
        emit(args, call_master(args, "GET", "/key/list", {"volume": args.volume}), f"keys of {args.volume}", cols)
    else:
        data = call_master(args, "POST", "/key/revoke", body={"volume": args.volume, "name": args.name})
        emit(args, data, "revoked (its sessions lose access at once)", ["revoked", "key_id"])


def fsck_volume(args: argparse.Namespace) -> None:
    """Report (and with --repair, fix) orphans, dangling entries and link counts;
    exit 1 while anything found is left unrepaired."""
    from shoalfs.client.core import ClientOptions, VolumeClient
    from shoalfs.client.fsck import check

    token = admin_token(args)
    if token is None:
        fail("fsck needs the admin token: --token-file or SHOAL_TOKEN_FILE")

    async def go() -> Any:
        options = ClientOptions(op_deadline=30.0, watch=False, tls_ca=tls_ca(args))
        client = VolumeClient(master_address(args), args.name, options, admin_token=token)
        try:
            await client.open()
            return await check(client, repair=args.repair, grace=args.grace)
        finally:
            await client.close()
    try:
        report = asyncio.run(go())
    except ShoalError as exc:
        fail(exc.msg)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        console.print(f"{args.name}: {report.inodes} inodes, {report.entries} entries, "
                      f"{len(report.findings)} problems")
        if report.findings:
            print_table("fsck", [vars(f) for f in report.findings], ["kind", "ino", "detail", "repaired"])
        if report.usage:
            print_table("usage counts off", report.usage, ["pid", "kept", "counted", "repaired"])
    if report.unrepaired:
        raise SystemExit(1)


SESSION_COLUMNS = ["host", "pid", "mountpoint", "key", "rights", "version", "mounted_at", "last_seen"]


def parse_size(text: str) -> int:
    """"1048576", "512K", "10M", "2G", "1T" (powers of 1024) -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if text and text[-1].upper() in units:
            return int(float(text[:-1]) * units[text[-1].upper()])
        return int(text)
    except (ValueError, OverflowError):
        fail(f"bad size {text!r}: use e.g. 512K, 10M, 2G", 2)


def cmd_quota(args: argparse.Namespace) -> None:
    """Directory quotas (client/quota.py): set tags the subtree, so it runs
    as a client of the volume with the admin token."""
    if args.action == "list":
        rows = call_master(args, "GET", "/quota/list", {"volume": args.volume})
        emit(args, rows, f"quotas of {args.volume}", QUOTA_COLUMNS)
        return
    from shoalfs.client.core import ClientOptions, VolumeClient
    from shoalfs.client.quota import delete_quota, set_quota

    token = admin_token(args)
    if token is None:
        fail(f"quota {args.action} needs the admin token: --token-file or SHOAL_TOKEN_FILE")
    setting = args.action == "set"
    max_bytes = parse_size(args.bytes) if setting and args.bytes else 0
    if setting and (max_bytes < 0 or (args.inodes or 0) < 0):
        fail("--bytes and --inodes must not be negative", 2)

    async def go() -> Any:
        client = VolumeClient(master_address(args), args.volume,
                              ClientOptions(op_deadline=30.0, watch=False, tls_ca=tls_ca(args)), admin_token=token)
        admin = MasterClient(master_address(args), token, tls=tls_context(args))
        try:
            await client.open()
            if setting:
                return await set_quota(client, admin, args.path, max_bytes, args.inodes or 0)
            return await delete_quota(client, admin, args.path)
        finally:
            await client.close()
            await admin.close()
    try:
        quota = asyncio.run(go())
    except ShoalError as exc:
        fail(exc.msg)
    if setting:
        emit(args, quota, f"quota on {args.path}", [*QUOTA_COLUMNS[:4], "tagged"])
    else:
        emit(args, quota, "quota deleted", ["deleted", "untagged"])


def parse_duration(text: str) -> float:
    """"90", "90s", "15m", "2h", "7d" -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        fail(f"bad duration {text!r}: use e.g. 90s, 15m, 2h or 7d", 2)


def delete_volume(args: argparse.Namespace) -> None:
    """Show who has the volume mounted and ask before deleting it."""
    call_master(args, "GET", "/volume/info", {"name": args.name})  # a clear error if it does not exist
    sessions = call_master(args, "GET", "/volume/clients", {"name": args.name})
    delay = parse_duration(args.delay) if args.delay else 0.0
    if sessions and not args.yes:
        print_table(f"{len(sessions)} client(s) have {args.name} mounted", sessions,
                    SESSION_COLUMNS)
        if not sys.stdin.isatty():
            fail(f"volume {args.name} is mounted by {len(sessions)} client(s); "
                 "pass --yes to delete it anyway")
        what = f"in {args.delay}" if delay else "now"
        answer = input(f"Delete volume {args.name} {what}? Mounted clients will exit. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            fail("not deleted")
    data = call_master(args, "POST", "/volume/delete", body={"name": args.name, "delay_s": delay})
    title = f"volume pending deletion (purge in {args.delay})" if delay else "volume deleted"
    emit(args, data, title, ["name", "vol_id", "status"])


def cmd_mount(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("pyfuse3") is None:
        fail("shoal mount needs pyfuse3: apt-get install fuse3 libfuse3-dev pkg-config, "
             "then pip install 'shoalfs[fuse]'")
    from shoalfs.client.deletion import DeletionAwareMount
    from shoalfs.client.mount import MountError, MountOptions, run_foreground, spawn_daemon
    from shoalfs.common.service import setup_logging

    opts = MountOptions(volume=args.volume, mountpoint=os.path.abspath(args.mountpoint))
    try:
        for spec in args.o or []:
            opts.apply(spec)
    except MountError as exc:
        fail(str(exc), 2)
    if args.deleted_exit_code is not None:
        opts.extra["deleted_exit_code"] = str(args.deleted_exit_code)
    opts.master = args.master or opts.master or master_address(args)
    opts.tls_ca = opts.tls_ca or tls_ca(args) or ""
    # the key's file, never the key, is handed on (a command line is public)
    opts.key_file = find_key_file(opts.master, opts.volume, args.key_file or opts.key_file or None, args.data) or ""
    try:
        DeletionAwareMount(opts)  # validates the lifecycle options before mounting
    except MountError as exc:
        fail(str(exc), 2)
    if args.foreground:
        setup_logging("DEBUG" if opts.debug else "INFO")
        raise SystemExit(run_foreground(opts, args.ready_fd, DeletionAwareMount))
    log_file = args.log_file or os.path.join(
        os.path.expanduser("~/.cache/shoalfs"), f"mount-{args.volume}.log")
    argv = ["mount", args.volume, opts.mountpoint, "--master", opts.master]
    if opts.key_file:
        argv += ["--key-file", opts.key_file]
    if opts.tls_ca:
        argv += ["-o", f"tls_ca={opts.tls_ca}"]
    if args.deleted_exit_code is not None:
        argv += ["--deleted-exit-code", str(args.deleted_exit_code)]
    for spec in args.o or []:
        argv += ["-o", spec]
    raise SystemExit(spawn_daemon(argv, log_file))


def cmd_demo(args: argparse.Namespace) -> None:
    from shoalfs.cli.demo import run_demo

    raise SystemExit(run_demo(args.data))


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        fail(message, 2)


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--master", help="master addresses host:port[,host:port...] (or SHOAL_MASTER)")
    common.add_argument("--data", default=DEFAULT_DATA, help="embedded cluster directory")
    common.add_argument("--token-file", help="admin token file (default: the embedded cluster's)")
    common.add_argument("--tls-ca", help="CA of a TLS cluster (or SHOAL_TLS_CA)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    p = Parser(prog="shoal", description="shoalfs: a distributed file system")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    for role in ("master", "metanode", "datanode"):
        s = sub.add_parser(role, help=f"run a {role} process")
        s.add_argument("--config", required=True, help="JSON config file")
        s.set_defaults(func=cmd_server)

    c = sub.add_parser("cluster", help="embedded cluster on 127.0.0.1")
    c.add_argument("action", choices=["up", "down", "status"])
    c.add_argument("--data", default=DEFAULT_DATA, help="directory for configs, logs, pids, data")
    c.add_argument("--metanodes", type=int, default=3)
    c.add_argument("--datanodes", type=int, default=3)
    c.add_argument("--masters", type=int, default=1,
                   help="masters sharing the cluster's etcd (one leads); chosen when the cluster is created")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_cluster)

    v = sub.add_parser("volume", help="manage volumes")
    vsub = v.add_subparsers(dest="action", required=True, parser_class=Parser)
    vc = vsub.add_parser("create", parents=[common])
    vc.add_argument("name")
    vc.add_argument("--owner", required=True)
    vc.add_argument("--capacity", type=float, default=100.0, help="GiB")
    vc.add_argument("--replicas", type=int, choices=range(1, MAX_REPLICAS + 1), metavar="N",
                    help=f"copies of each partition on distinct nodes, 1-{MAX_REPLICAS} (default: the "
                         f"master's default_replicas, {DEFAULT_REPLICAS} unless configured)")
    vc.add_argument("--out", help="write the owner key to this file (0600) instead of showing it "
                                  "(the embedded cluster keeps it in DIR/keys/NAME.key)")
    vsub.add_parser("list", parents=[common])
    vsub.add_parser("info", parents=[common]).add_argument("name")
    vd = vsub.add_parser("delete", parents=[common])
    vd.add_argument("name")
    vd.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    vd.add_argument("--delay", help="pending delete: purge after this long (e.g. 15m); undelete restores")
    vsub.add_parser("undelete", parents=[common]).add_argument("name")
    vsub.add_parser("clients", parents=[common]).add_argument("name")
    vf = vsub.add_parser("fsck", parents=[common])
    vf.add_argument("name")
    vf.add_argument("--repair", action="store_true", help="fix what is found")
    vf.add_argument("--grace", type=float, default=600.0,
                    help="leave inodes changed in the last S seconds alone (operations under way)")
    vsub.add_parser("scrub", parents=[common], help="compare every partition's copies; repair what differs"
                    ).add_argument("name")
    vs = vsub.add_parser("set", parents=[common], help="change a volume's capacity or inode limit (admin)")
    vs.add_argument("name")
    vs.add_argument("--capacity", type=float, help="GiB (a fraction is allowed: 0.01 is about 10 MiB)")
    vs.add_argument("--inodes", type=int, help="most files and directories the volume may hold (0: no limit)")
    v.set_defaults(func=cmd_volume)

    q = sub.add_parser("quota", help="directory quotas of a volume (admin)")
    qsub = q.add_subparsers(dest="action", required=True, parser_class=Parser)
    qs = qsub.add_parser("set", parents=[common], help="limit a directory's subtree (0 or absent: no limit)")
    qs.add_argument("volume")
    qs.add_argument("path", help="a directory of the volume, e.g. /teams/a")
    qs.add_argument("--bytes", help="most bytes the subtree may hold, e.g. 10G")
    qs.add_argument("--inodes", type=int, help="most files and directories under it")
    qsub.add_parser("list", parents=[common]).add_argument("volume")
    qd = qsub.add_parser("delete", parents=[common])
    qd.add_argument("volume")
    qd.add_argument("path")
    q.set_defaults(func=cmd_quota)

    k = sub.add_parser("key", help="access keys of a volume (admin)")
    ksub = k.add_subparsers(dest="action", required=True, parser_class=Parser)
    kc = ksub.add_parser("create", parents=[common], help="issue a key (shown once, or --out FILE)")
    kc.add_argument("volume")
    kc.add_argument("--name", help="a name to revoke it by (default key1, key2, ...)")
    kc.add_argument("--read-only", action="store_true", help="mounts read-only; nodes refuse every change")
    kc.add_argument("--out", help="write the key to this file (0600) instead of showing it")
    ksub.add_parser("list", parents=[common]).add_argument("volume")
    kr = ksub.add_parser("revoke", parents=[common], help="its sessions lose access within a second")
    kr.add_argument("volume")
    kr.add_argument("name")
    k.set_defaults(func=cmd_key)

    m = sub.add_parser("mount", help="mount a volume through FUSE")
    m.add_argument("volume")
    m.add_argument("mountpoint")
    m.add_argument("--master", help="master addresses host:port[,host:port...] (or SHOAL_MASTER)")
    m.add_argument("--data", default=DEFAULT_DATA, help=argparse.SUPPRESS)
    m.add_argument("--foreground", "-f", action="store_true", help="stay attached, log to stderr")
    m.add_argument("-o", action="append", metavar="OPTIONS", help="comma-separated mount options")
    m.add_argument("--key-file", help="the volume's access key (or -o key_file=, SHOAL_KEY_FILE; default: "
                                      "the embedded cluster's key store)")
    m.add_argument("--tls-ca", help="CA of a TLS cluster (or -o tls_ca=, SHOAL_TLS_CA)")
    m.add_argument("--log-file", help="log of the background mount process")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--deleted-exit-code", type=int, help="exit code when the volume is deleted (143)")
    m.set_defaults(func=cmd_mount)

    d = sub.add_parser("demo", help="the main job end to end on an embedded cluster")
    d.add_argument("--data", default=None, help="directory for the demo cluster (default: a temp dir)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    capacity = getattr(args, "capacity", None)
    if args.command in ("cluster", "volume") and capacity is not None and capacity <= 0:
        fail("--capacity must be positive", 2)
    try:
        args.func(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
