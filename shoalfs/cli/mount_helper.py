"""`mount.fuse.shoal`: lets mount(8) and /etc/fstab mount shoalfs volumes.

mount(8) runs `mount.fuse.shoal VOLUME MOUNTPOINT -o OPTIONS`; we turn that
into `shoal mount VOLUME MOUNTPOINT -o OPTIONS` (master=ADDR among them).
"""

from __future__ import annotations

import sys

from shoalfs.cli.main import main as shoal_main


def main() -> None:
    args = sys.argv[1:]
    positional: list[str] = []
    options: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "-o" and i + 1 < len(args):
            options.append(args[i + 1])
            i += 2
        elif args[i] in ("-n", "-s", "-f", "-v"):  # mount(8) flags: no mtab, sloppy, fake, verbose
            i += 1
        else:
            positional.append(args[i])
            i += 1
    if len(positional) != 2:
        print("usage: mount.fuse.shoal VOLUME MOUNTPOINT -o master=HOST:PORT[,...]", file=sys.stderr)
        raise SystemExit(2)
    argv = ["mount", positional[0], positional[1]]
    for spec in options:
        argv += ["-o", spec]
    shoal_main(argv)


if __name__ == "__main__":
    main()
