"""Does one loss weight move the refined output against both baselines?

    .venv/bin/python bench/study_loss_weight.py --parameter reconstruction_weight --values 0 1 5
                                                [--presets mild strong proxy] [--seeds 0 1 2] [--jobs 2]
                                                [--output bench/results/<parameter>.md] [-- <more demo flags>]

Trains the demo (`python -m training.demo`, the `after` model of `bench/study_quality.py`: `configs/demo.yaml`, best
step by the validation loss) with `--<parameter> <value>` for each value, preset and seed, and scores each run on the
test tiles of the sample as shipped (as `bench/study_rotation.py` scores its rotation 0) against both baselines:
`opt_v1` and the least-squares colour fit (4x4 + bias) fitted on the same training tiles. `--parameter` is a weight of
`training.losses.Stage2Loss` (the record names its default). Presets and goals are those of `bench/study_rotation.py`:
`mild` and `strong` (`degrade.py`), `proxy` (`bench/stage1_proxy.py`, a generator that is not `degrade.py`), so that a
weight is not judged on one kind of Stage 1 error. Writes the tables to `--output` and every score to the same name
with `.json`. Runs `--jobs` trainings at a time, each on one thread: about a minute a training on 2 idle cores.
"""
from __future__ import annotations

import inspect
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._after_runs import machine, parse_arguments, script_line, train_settings  # noqa: E402
from bench._common import SPECTRAL, load_average, load_span, mean_range_cell, record_study  # noqa: E402
from bench.study_rotation import (  # noqa: E402
    BASELINES, held_out_tile_statistics, meets_preset_goal, ratios, scores,
)

RESULTS = REPO / "bench" / "results"
BASELINE_NAMES = {"linear_fit": "colour fit", "opt_v1": "`opt_v1`"}


def loss_weights() -> dict[str, float]:
    """The weights of `Stage2Loss` (name -> default): the parameters this study can vary."""
    from training.losses import Stage2Loss

    return {name: parameter.default for name, parameter in inspect.signature(Stage2Loss).parameters.items()
            if name.endswith("_weight")}


def add_arguments(parser) -> None:
    parser.add_argument("--parameter", required=True, help="a weight of training.losses.Stage2Loss")
    parser.add_argument("--values", nargs="+", required=True, help="the weights to train with (>= 0)")


def check_arguments(parser, args) -> None:
    """Exits 2 with a one-line error on a parameter that is no loss weight or a value that is no weight."""
    weights = loss_weights()
    if args.parameter not in weights:
        parser.error(f"--parameter {args.parameter}: not a weight of training.losses.Stage2Loss; use one of "
                     f"{', '.join(sorted(weights))}")
    for value in args.values:
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight >= 0):
            parser.error(f"--values {value}: a weight is a finite number >= 0")
    if len(set(map(float, args.values))) < len(args.values):
        parser.error(f"--values {' '.join(args.values)}: each weight once")


def run_record(preset: str, scored: dict) -> dict:
    """One training's test scores, refined / each baseline and whether it meets its preset's goal."""
    return {"scores": scored, "ratios": {baseline: ratios(scored, baseline) for baseline in BASELINES},
            "goal": meets_preset_goal(preset, scored)}


def summarise(record: dict) -> dict:
    """value -> preset -> the mean, min and max over seeds of refined / each baseline (one per `SPECTRAL` metric),
    and how many seeds meet the goal."""
    summary: dict = {}
    for value, presets in record["runs"].items():
        for preset, runs in presets.items():
            spread = {baseline: [[f(run["ratios"][baseline][index] for run in runs) for f in (statistics.fmean, min, max)]
                                 for index in range(len(SPECTRAL))] for baseline in BASELINES}
            summary.setdefault(value, {})[preset] = {"ratios": spread,
                                                     "seeds_meeting_goal": sum(run["goal"] for run in runs)}
    return summary


def _ratio_cell(runs: list[dict], baseline: str, index: int) -> str:
    return mean_range_cell([run["ratios"][baseline][index] for run in runs], 2)


def render(record: dict, seconds: float, load: str) -> str:
    parameter = record["parameter"]
    lines = [
        f"# Loss-weight study: `{parameter}`",
        "",
        script_line("study_loss_weight.py", record, seconds, load,
                    f"--parameter {parameter} --values {' '.join(record['values'])} ", len(record["values"])),
        "",
        f"`{parameter}` is a weight of `training.losses.Stage2Loss` (default {record['default']:g}). Test split of "
        "the sample as shipped (18 tiles). Cells: refined / baseline, mean over seeds (min-max); below 1 = better "
        "than the baseline. Goal: the preset's (`bench/study_rotation.py`).",
        "",
    ]
    for preset in record["presets"]:
        header = " | ".join(f"{metric} / {BASELINE_NAMES[baseline]}" for baseline in BASELINES for metric in SPECTRAL)
        lines += [f"## {preset}", "", f"| {parameter} | {header} | seeds meeting the goal |",
                  "| ---: | " + " | ".join("---:" for _ in BASELINES for _ in SPECTRAL) + " | --- |"]
        for value in record["values"]:
            runs = record["runs"][value][preset]
            cells = [_ratio_cell(runs, baseline, index) for baseline in BASELINES for index in range(len(SPECTRAL))]
            met = record["summary"][value][preset]["seeds_meeting_goal"]
            default = " (default)" if float(value) == record["default"] else ""
            lines.append(f"| {value}{default} | " + " | ".join(cells) + f" | {met} of {len(runs)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser, args, demo_flags = parse_arguments(__doc__.split("\n\n")[0], list(sys.argv[1:] if argv is None else argv),
                                               None, add_arguments)
    check_arguments(parser, args)
    output = Path(args.output or RESULTS / f"{args.parameter}.md")
    settings = {f"{args.parameter}={value}": [f"--{args.parameter}", value, *demo_flags] for value in args.values}

    load_start, start = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stage2-loss-weight-") as tmp:
        folders, trained = train_settings(args, settings, Path(tmp))
        record: dict = {"parameter": args.parameter, "default": loss_weights()[args.parameter], "values": args.values,
                        "presets": args.presets, "seeds": args.seeds, "machine": machine(), "demo_flags": demo_flags,
                        "runs": {value: {preset: [] for preset in args.presets} for value in args.values}}
        for (setting, preset, seed), model_dir in trained.items():
            value = setting.split("=", 1)[1]
            scored = scores(held_out_tile_statistics(model_dir, folders[preset]))
            record["runs"][value][preset].append(run_record(preset, scored))
            print(f"{setting} {preset} seed {seed} done", flush=True)
    record["summary"] = summarise(record)
    record_study(output, render(record, time.perf_counter() - start, load_span(load_start)), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
