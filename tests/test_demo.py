"""The README's main job: `shoal demo` runs end to end and exits 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.fuse


def test_shoal_demo_passes() -> None:
    proc = subprocess.run([sys.executable, "-m", "shoalfs.cli", "demo"], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for needle in ("exit code: 143", "ESTALE", "syslog record", "is unmounted and empty", "demo passed"):
        assert needle in out, out[-4000:]
