"""Write new files until SIGTERM; log each acknowledged one for a read-back.

    acked_writer.py LOG --dir MOUNTED_DIR [--prefix p]
    acked_writer.py LOG --master M --volume V --key-file F [--op-deadline S] [--prefix p]

File i is /{prefix}{i}, its bytes a function of its name (seeded random),
written whole and closed (the SDK's close, or the kernel's close through
the mount, both flush). One JSON line per write, flushed at once:
{"path", "len", "sha", "t0", "t1"} when acknowledged, {"path", "errno",
"error", "t0", "t1"} when it failed; t0/t1 are CLOCK_MONOTONIC, shared by
every process on the machine. Run by tests/netcluster.py's AckedWriter in
a client's own network namespace.
"""

from __future__ import annotations

import argparse
import errno as errno_mod
import hashlib
import json
import os
import random
import signal
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def content(path: str, size: int) -> bytes:
    return random.Random(path).randbytes(size)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--dir")
    ap.add_argument("--master")
    ap.add_argument("--volume")
    ap.add_argument("--key-file")
    ap.add_argument("--op-deadline", type=float, default=60.0)
    ap.add_argument("--prefix", default="w")
    ap.add_argument("--size", type=int, default=64 * 1024)
    args = ap.parse_args()
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_term)

    vol = None
    if args.dir is None:
        from shoalfs.client.core import ClientOptions
        from shoalfs.client.sdk import connect
        vol = connect(args.master, args.volume, ClientOptions(op_deadline=args.op_deadline), key_file=args.key_file)

    with open(args.log, "a") as log:
        i = 0
        while not stop:
            path = f"/{args.prefix}{i}"
            data = content(path, args.size + i % 4096)
            t0 = time.monotonic()
            record: dict[str, Any] = {"path": path}
            try:
                if vol is not None:
                    with vol.open(path, "wb") as f:
                        f.write(data)
                else:
                    with open(args.dir + path, "wb") as f:
                        f.write(data)
                record.update(len=len(data), sha=hashlib.sha256(data).hexdigest())
            except OSError as exc:
                code = exc.errno or errno_mod.EIO
                record.update(errno=code, error=str(exc))
                if code == errno_mod.ESTALE:
                    stop = True  # the volume is gone: nothing more to write
                else:
                    time.sleep(0.05)
            record.update(t0=t0, t1=time.monotonic())
            log.write(json.dumps(record) + "\n")
            log.flush()
            i += 1
    if vol is not None:
        try:
            vol.close()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
