"""What every benchmark script records about the machine it ran on."""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

from training.metrics import GAIN_METRICS as SPECTRAL  # the metrics of the studies' goal

# The quality goal of the studies: the refined output beats the least-squares colour fit by at least GOAL_MARGIN on
# each of the `SPECTRAL` metrics (lower is better), on the held-out test tiles.
GOAL_MARGIN = 0.10
# With Stage 1 outputs of a generator the refiner was not designed on (`bench/stage1_proxy.py`): at most the colour
# fit's, and at least OPT_V1_GOAL_MARGIN below `opt_v1`'s, on each of the `SPECTRAL` metrics.
OPT_V1_GOAL_MARGIN = 0.30


def meets_goal(refined: dict, colour_fit: dict) -> bool:
    """Whether `refined` scores (metric -> value) beat `colour_fit`'s by `GOAL_MARGIN` on every `SPECTRAL` metric."""
    return all(refined[m] <= (1 - GOAL_MARGIN) * colour_fit[m] for m in SPECTRAL)


def in_range_tiles(test_opt_v1, test_valid, train_opt_v1, train_valid):
    """(B,) bool tensor: the test tiles whose mean valid `opt_v1` reflectance is not above every training tile's (the
    others are brighter than anything a correction was fitted on: it extrapolates there)."""
    def brightness(image, valid):
        mask = valid[:, None].to(image.dtype)
        return (mask * image).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * image.shape[1]).clamp(min=1)

    return brightness(test_opt_v1, test_valid) <= brightness(train_opt_v1, train_valid).max()


def in_range_evi_rmse(output, target, opt_v1, valid, in_range):
    """EVI RMSE (`training.metrics`, as every table's) of the tiles `in_range` selects; None if it selects none."""
    from training.metrics import evaluate_pair

    if not bool(in_range.any()):
        return None
    return evaluate_pair(output[in_range], target[in_range], opt_v1[in_range], valid[in_range])["refined"]["evi_rmse"]


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


def mean_range_cell(values: list, digits: int) -> str:
    """A table cell of results over seeds: 'mean (min-max)', the value alone for one seed, or '-' where a value is None
    (a run recorded before the column existed)."""
    if any(value is None for value in values):
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def load_span(load_at_start: str) -> str:
    """'<load at the start> at the start, <load now> at the end', for a study's header."""
    return f"{load_at_start} at the start, {load_average()} at the end"


def record_study(output: str | Path, text: str, record: dict) -> None:
    """Writes a study's tables to `output`, every number to the same name with `.json`, and prints the tables."""
    output = Path(output)
    output.write_text(text)
    output.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)
