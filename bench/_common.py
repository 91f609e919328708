"""What every benchmark script records about the machine it ran on."""
from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import dataclass
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


def gpu_name() -> str | None:
    """The name of the first CUDA device torch sees; None where it sees none."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


# Other jobs shared the machine where the 1-minute load average was at least this before the benchmark's own work
SHARED_LOAD = 1.0


@dataclass(frozen=True)
class Machine:
    """The machine a benchmark ran on, as measured (`machine()`): what its results' headers say of it."""
    cpu: str
    cores: int
    load: float  # the 1-minute load average before the benchmark's own work (after it, it counts the benchmark too)
    gpu: str | None = None  # the CUDA device's name; None without one (or where the script did not look)

    @property
    def shared(self) -> bool:
        return self.load >= SHARED_LOAD

    @property
    def state(self) -> str:
        """'shared with other jobs' or 'otherwise idle'."""
        return "shared with other jobs" if self.shared else "otherwise idle"


def machine(load: float | None = None, gpu: bool = False) -> Machine:
    """This machine: its CPU, cores (`os.cpu_count()`), 1-minute load average (`load`, read before the benchmark's
    own work; None: now) and, with `gpu`, its CUDA device (`gpu_name()`)."""
    load = os.getloadavg()[0] if load is None else load
    return Machine(cpu_name(), os.cpu_count() or 1, load, gpu_name() if gpu else None)


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


def goal_span(values: list) -> str:
    """'min-max' of ratios read against the goal's 1 - GOAL_MARGIN, with 3 decimals: with 2, 0.903 would print as the
    0.90 it misses."""
    return f"{min(values):.3f}-{max(values):.3f}"


def files():
    """`modeling_stage2._files`, the project's atomic writes and output checks, loaded without the model's imports."""
    from data_builders._leaves import model_leaf

    return model_leaf("_files")


def write_results(path: str | Path, text: str) -> None:
    """`text` written atomically to `path`: a failed or killed benchmark leaves the earlier results as they were."""
    files().write_text(path, text)


def output_problem(output: str | Path, record: bool = True) -> str | None:
    """What stops a study from writing its tables to `output` and (`record`) its record beside it (a missing folder,
    an entry of the other kind, no right to write); None when nothing does."""
    output = Path(output)
    if not output.parent.exists():  # `atomic_file` would make it: more likely a typo, found only after the work
        return f"the folder {output.parent} does not exist"
    for path in (output, output.with_suffix(".json")) if record else (output,):
        problem = files().output_path_problem(path)
        if problem is not None:
            return problem if path == output else f"{path.name} {problem}"
    return None


# The counts the scripts take (timed rounds, training or fitting steps, tiles, threads): each must be at least 1
COUNTS = ("repeats", "steps", "tiles", "threads", "num_tiles", "read_tiles", "slow_read_tiles")


def check_study_arguments(parser, args, output: str | Path | None, record: bool = True) -> None:
    """Exits 2 with a one-line error on `--jobs` below 1 or an `output` (`--output`) that cannot be written: checked
    before any work, as found after the trainings (or the measurements) either would lose them. `output` None: a
    script that derives it from other arguments checks it once it has. `record`: a `.json` record goes beside it
    (the studies; the benchmarks write their tables alone). The counts of `COUNTS` a script takes must be >= 1 too:
    with none, a benchmark fails (or records 0 tiles/s) after its models are built."""
    for name in ("jobs", *COUNTS):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    problem = output_problem(output, record) if output is not None else None
    if problem is not None:
        parser.error(f"--output {output}: {problem}")


def record_study(output: str | Path, text: str, record: dict) -> None:
    """Writes a study's tables to `output`, every number to the same name with `.json`, and prints the tables. Both are
    written in full under temporary names, then renamed over the old ones, the `.json` (what the docs are checked
    against) first: a failure leaves the old pair, a kill at worst the new record beside the old tables."""
    output = Path(output)
    numbers = json.dumps(record, indent=1) + "\n"  # before any file is opened: a record that is no JSON writes nothing
    atomic_file = files().atomic_file
    with atomic_file(output) as tables, atomic_file(output.with_suffix(".json")) as record_file:
        record_file.write_text(numbers, encoding="utf-8")
        tables.write_text(text, encoding="utf-8")
    print(text)
