"""SDK-level throughput and metadata rates against the embedded cluster.

    python -m bench.sdk
"""

from __future__ import annotations

import os

from bench.common import Timer, bench_cluster, show

MiB = 1024 * 1024
TOTAL = 256 * MiB
FILES = 2000


def main() -> None:
    rows: list[list[str]] = []
    with bench_cluster() as c:
        c.create_volume("bench")
        block = os.urandom(4 * MiB)
        with c.connect("bench") as vol:
            with Timer() as t:
                with vol.open("/seq", "wb") as f:
                    for _ in range(TOTAL // len(block)):
                        f.write(block)
                    f.fsync()
            rows.append(["sequential write 256 MiB (+fsync)", f"{TOTAL / MiB / t.seconds:.1f} MiB/s"])
            with Timer() as t:
                with vol.open("/seq", "rb") as f:
                    while f.read(4 * MiB):
                        pass
            rows.append(["sequential read 256 MiB", f"{TOTAL / MiB / t.seconds:.1f} MiB/s"])
            vol.mkdir("/meta")
            for label, fn in (
                ("create", lambda i: vol.open(f"/meta/f{i}", "wb").close()),
                ("stat", lambda i: vol.stat(f"/meta/f{i}")),
                ("unlink", lambda i: vol.remove(f"/meta/f{i}")),
            ):
                with Timer() as t:
                    for i in range(FILES):
                        fn(i)
                rows.append([f"{label} {FILES} files (one at a time)", f"{FILES / t.seconds:.0f} ops/s"])
    show("shoalfs SDK benchmark", ["what", "result"], rows)


if __name__ == "__main__":
    main()
