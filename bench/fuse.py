"""FUSE benchmark: a shoal mount vs the in-memory pyfuse3 ceiling vs a local dir.

    python -m bench.fuse            (as root; needs fio)

bench.peers without the peers: the same workloads (dd, metadata rates, fio)
on shoalfs with 1 replica, the in-memory ceiling and the local disk.
"""

from __future__ import annotations

import sys

from bench import peers

if __name__ == "__main__":
    sys.argv[1:] = ["--only", "shoal 1 replica,in-memory pyfuse3,local disk", *sys.argv[1:]]
    peers.main()
