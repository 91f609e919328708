"""What every benchmark script records about the machine it ran on."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. '0.7 1.0 1.2' (how busy the shared machine was)."""
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def mean_range_cell(values: list[float], digits: int) -> str:
    """A table cell of results over seeds: 'mean (min-max)', or the value alone for one seed."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
