"""The CRC-32 every frame, journal record and extent block carries.

The same polynomial as zlib.crc32 (IEEE), computed by ISA-L when python-isal
is installed: about 10x faster here (61 vs 6 GB/s on 4 MiB, 21 vs 5 GB/s on
4 KiB blocks), which took the frame check from a fifth of a reading client's
CPU to nothing. Without it zlib gives the same values.
"""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal has wheels for every platform we run on
    from zlib import crc32

__all__ = ["crc32"]
