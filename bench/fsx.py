"""A randomized file exerciser, checked against an in-memory model of the file.

    python -m bench.fsx DIR [--ops 100000] [--seeds 1,2,3,4,5]

Each step is one of: read, a run of consecutive reads, write (also past the end, leaving a hole), read
or write through a shared mmap, truncate up or down, fsync, and close and
reopen (close-to-open). After every step the file's size must match the
model and what a read returned must match it byte for byte; every 64 steps
(and at the end) the whole file is compared. A failure names the seed and
the last steps, so it can be replayed. The tests run it briefly on a real
mount; this runs it long.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import time
from collections import deque
from collections.abc import Callable

MAX_SIZE = 1 << 20
FULL_CHECK_EVERY = 64


class Mismatch(AssertionError):
    pass


class Exerciser:
    def __init__(self, path: str, seed: int, max_size: int = MAX_SIZE) -> None:
        self.path = path
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_size = max_size
        self.model = bytearray()
        self.history: deque[str] = deque(maxlen=24)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.ops: list[tuple[int, Callable[[], None]]] = [
            (20, self.read), (10, self.stream_read), (20, self.write), (8, self.mmap_read), (8, self.mmap_write),
            (12, self.truncate), (4, self.fsync), (3, self.reopen)]
        self.weights = [w for w, _ in self.ops]

    # ----- helpers ------------------------------------------------------------------
    def _range(self, limit: int) -> tuple[int, int]:
        off = self.rng.randrange(0, max(1, limit))
        return off, self.rng.randrange(1, 1 + min(65536, max(1, limit - off)))

    def _fail(self, what: str) -> None:
        raise Mismatch(f"seed {self.seed}: {what}\nlast steps:\n  " + "\n  ".join(self.history))

    def _expect(self, got: bytes, off: int, size: int, what: str) -> None:
        want = bytes(self.model[off:off + size])
        if got != want:
            first = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), min(len(got), len(want)))
            self._fail(f"{what} at {off}+{size}: {len(got)} bytes back, {len(want)} expected, "
                       f"first difference at {off + first}")

    def _resize(self, size: int) -> None:
        del self.model[size:]
        self.model.extend(bytes(size - len(self.model)))

    # ----- operations ------------------------------------------------------------------
    def read(self) -> None:
        off, size = self._range(len(self.model) + 4096)
        self.history.append(f"pread {size} @ {off}")
        self._expect(os.pread(self.fd, size, off), off, size, "pread")

    def write(self) -> None:
        off, size = self._range(min(self.max_size, len(self.model) + 65536))
        size = min(size, self.max_size - off)
        data = self.rng.randbytes(size)
        self.history.append(f"pwrite {size} @ {off}")
        if os.pwrite(self.fd, data, off) != size:
            self._fail("short pwrite")
        if off + size > len(self.model):
            self._resize(off + size)
        self.model[off:off + size] = data

    def stream_read(self) -> None:
        """Consecutive reads, as a streaming reader does: the client reads ahead."""
        off = self.rng.randrange(0, max(1, len(self.model)))
        chunk = self.rng.choice((4096, 16384, 65536))
        self.history.append(f"stream read {chunk} x 6 @ {off}")
        for _ in range(6):
            self._expect(os.pread(self.fd, chunk, off), off, chunk, "stream read")
            off += chunk

    def mmap_read(self) -> None:
        if not self.model:
            return
        off, size = self._range(len(self.model))
        self.history.append(f"mmap read {size} @ {off}")
        with mmap.mmap(self.fd, len(self.model), mmap.MAP_SHARED, mmap.PROT_READ) as m:
            got = m[off:off + size]
        self._expect(got, off, size, "mmap read")

    def mmap_write(self) -> None:
        if not self.model:
            return
        off, size = self._range(len(self.model))
        data = self.rng.randbytes(size)
        self.history.append(f"mmap write {size} @ {off}")
        with mmap.mmap(self.fd, len(self.model), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[off:off + size] = data
            m.flush()
        self.model[off:off + size] = data

    def truncate(self) -> None:
        size = self.rng.randrange(0, self.max_size)
        if self.rng.random() < 0.5:  # often a small step, where pages straddle the end
            size = max(0, len(self.model) + self.rng.randrange(-8192, 8192))
        self.history.append(f"ftruncate {size}")
        os.ftruncate(self.fd, size)
        self._resize(size)

    def fsync(self) -> None:
        self.history.append("fsync")
        os.fsync(self.fd)

    def reopen(self) -> None:
        self.history.append("close, reopen")
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)

    # ----- the run ---------------------------------------------------------------------
    def check_all(self) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            self._fail(f"size {size}, model {len(self.model)}")
        self._expect(os.pread(self.fd, len(self.model) + 1, 0), 0, len(self.model) + 1, "whole-file read")

    def run(self, steps: int) -> None:
        try:
            for i in range(steps):
                self.rng.choices(self.ops, self.weights)[0][1]()
                if os.fstat(self.fd).st_size != len(self.model):
                    self._fail(f"after step {i}: size {os.fstat(self.fd).st_size}, model {len(self.model)}")
                if i % FULL_CHECK_EVERY == FULL_CHECK_EVERY - 1:
                    self.check_all()
            self.check_all()
        finally:
            os.close(self.fd)


def exercise(directory: str, steps: int, seed: int) -> None:
    Exerciser(os.path.join(directory, f"fsx-{seed}"), seed).run(steps)


def main() -> None:
    from bench.common import show

    ap = argparse.ArgumentParser()
    ap.add_argument("directory", help="a directory on the file system under test (a shoal mount)")
    ap.add_argument("--ops", type=int, default=100_000, help="steps per seed")
    ap.add_argument("--seeds", default="1,2,3,4,5")
    args = ap.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t = time.perf_counter()
        exercise(args.directory, args.ops, seed)
        took = time.perf_counter() - t
        rows.append([str(seed), f"{args.ops:,}", "clean", f"{took:.0f} s", f"{args.ops / took:,.0f}"])
    show(f"fsx on {args.directory}", ["seed", "steps", "result", "time", "steps/s"], rows)


if __name__ == "__main__":
    main()
