"""What the comparison scripts read about the machine while they time: other processes' CPU use and page faults."""

from __future__ import annotations

from pathlib import Path


def others_busy() -> int | None:
    """CPU time (jiffies) other processes have used so far, or None where /proc is not available: a timed block
    during which it grew was shared with another process."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7))  # user nice system irq softirq steal
    return busy - int(mine[11]) - int(mine[12])


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the resource module is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
