"""The CPU's cache sizes, as Linux reports them in sysfs (None elsewhere).

The CPU backend sizes its channel blocks from them, and the benchmark suite uses them to
say when an algorithm has to read its input twice.
"""

from __future__ import annotations

import glob
import os

SYSFS = "/sys/devices/system/cpu/cpu0/cache"


def cache_level(level: int, base: str = SYSFS) -> tuple[int, int] | None:
    """(bytes, CPUs sharing it) of cpu0's data or unified cache at ``level``, or None."""
    for d in sorted(glob.glob(os.path.join(base, "index*"))):
        try:
            if _read(d, "level") != str(level) or _read(d, "type") == "Instruction":
                continue
            size = _read(d, "size")
            shared = _read(d, "shared_cpu_list")
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            ncpu = 0
            for part in shared.split(","):
                lo, _, hi = part.partition("-")
                ncpu += int(hi or lo) - int(lo) + 1
            return int(size.rstrip("KMG")) * mult, max(1, ncpu)
        except (OSError, ValueError):
            continue  # an unreadable or odd entry: try the next one
    return None


def _read(d: str, name: str) -> str:
    with open(os.path.join(d, name)) as fh:
        return fh.read().strip()
