"""What the machine was doing while a benchmark ran: its figures are noise when other
processes competed for the cores, so each benchmark reports how busy they kept them."""

from __future__ import annotations

import os


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy so far (Linux /proc/stat), or nan."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
