"""Does one loss weight move the refined output against both baselines?

    .venv/bin/python bench/study_loss_weight.py --parameter reconstruction_weight --values 0 1 5
                                                [--presets mild strong proxy] [--seeds 0 1 2] [--jobs 2]
                                                [--output bench/results/<parameter>.md] [-- <more demo flags>]

Trains the demo (`python -m training.demo`, the `after` model of `bench/study_quality.py`: `configs/demo.yaml`, best
step by the validation loss) with `--<parameter> <value>` for each value, preset and seed, and scores each run on the
test tiles of the sample as shipped (as `bench/study_rotation.py` scores its rotation 0) against both baselines:
`opt_v1` and the least-squares colour fit (4x4 + bias) fitted on the same training tiles. Beside the goal's metrics it
records the reflectance error of each output, PSNR, on every test tile and on the tiles in range (not brighter than
every training tile, `bench._common.in_range_tiles`): a weight can move the reflectance and not the indices (NDVI
and the spectral angle do not see the overall brightness). `--parameter` is a weight of
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
from bench._common import (  # noqa: E402
    SPECTRAL, check_study_arguments, in_range_tiles, load_average, load_span, mean_range_cell, record_study,
)
from bench.study_rotation import (  # noqa: E402
    BASELINES, ROLES, held_out_tile_statistics, meets_preset_goal, ratios, scores, select_tiles,
)

RESULTS = REPO / "bench" / "results"
BASELINE_NAMES = {"linear_fit": "colour fit", "opt_v1": "`opt_v1`"}
REFLECTANCE = ("psnr", "psnr_in_range")  # each role's PSNR on every test tile and on the tiles in range


def loss_weights() -> dict[str, float]:
    """The weights of `Stage2Loss` (name -> default): the parameters this study can vary."""
    from training.losses import Stage2Loss

    return {name: parameter.default for name, parameter in inspect.signature(Stage2Loss).parameters.items()
            if name.endswith("_weight")}


def add_arguments(parser) -> None:
    parser.add_argument("--parameter", required=True, help="a weight of training.losses.Stage2Loss")
    parser.add_argument("--values", nargs="+", required=True, help="the weights to train with (>= 0)")


def check_arguments(parser, args) -> None:
    """Exits 2 with a one-line error on a parameter that is no loss weight, a value that is no weight, or values
    without the default (what the study, and `bench/summarize.py` from its record, reads every value against)."""
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
    if weights[args.parameter] not in map(float, args.values):  # the record is read against it (`bench/summarize.py`)
        parser.error(f"--values {' '.join(args.values)}: the default {weights[args.parameter]:g} is not among them; "
                     "each value is compared with it")


def in_range_test_tiles(dataset_dir: Path) -> list[bool]:
    """For each test tile of the Arrow dataset at `dataset_dir`, in order: whether it is in range (not brighter than
    every training tile, `bench._common.in_range_tiles`)."""
    from datasets import load_from_disk

    dataset_dict = load_from_disk(str(dataset_dir))
    test, train = (dataset_dict[split].select_columns(["opt_v1", "valid_mask"]).with_format("torch")[:]
                   for split in ("test", "train"))
    return in_range_tiles(test["opt_v1"], test["valid_mask"], train["opt_v1"], train["valid_mask"]).tolist()


def reflectance(tile_statistics: dict, in_range: list[bool]) -> dict:
    """role -> {"psnr": over every tile of `tile_statistics` (`held_out_tile_statistics`), "psnr_in_range": over
    the tiles that `in_range` (one flag per tile) keeps}, pooled as one evaluation set's (`scores`)."""
    if not any(in_range):
        raise ValueError(f"in_range keeps no tile: {in_range}")
    every, within = (scores(statistics, ("psnr",))
                     for statistics in (tile_statistics, select_tiles(tile_statistics, in_range)))
    return {role: {"psnr": every[role]["psnr"], "psnr_in_range": within[role]["psnr"]} for role in ROLES}


def run_record(preset: str, scored: dict, reflected: dict | None = None) -> dict:
    """One training's test scores, refined / each baseline and whether it meets its preset's goal, and its
    `reflectance` (PSNR) where given."""
    record = {"scores": scored, "ratios": {baseline: ratios(scored, baseline) for baseline in BASELINES},
              "goal": meets_preset_goal(preset, scored)}
    if reflected is not None:
        record["reflectance"] = reflected
    return record


def summarise(record: dict) -> dict:
    """value -> preset -> the mean, min and max over seeds of refined / each baseline (one per `SPECTRAL` metric),
    how many seeds meet the goal, and, where the runs recorded it, of the refined output's PSNR (`REFLECTANCE`)."""
    summary: dict = {}
    for value, presets in record["runs"].items():
        for preset, runs in presets.items():
            spread = {baseline: [[f(run["ratios"][baseline][index] for run in runs) for f in (statistics.fmean, min, max)]
                                 for index in range(len(SPECTRAL))] for baseline in BASELINES}
            summary.setdefault(value, {})[preset] = {"ratios": spread,
                                                     "seeds_meeting_goal": sum(run["goal"] for run in runs)}
            if all("reflectance" in run for run in runs):  # records made before PSNR was recorded have none
                summary[value][preset]["refined_psnr"] = {
                    key: [f(run["reflectance"]["refined"][key] for run in runs) for f in (statistics.fmean, min, max)]
                    for key in REFLECTANCE}
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
        lines += reflectance_table(record, preset)
    return "\n".join(lines)


def reflectance_table(record: dict, preset: str) -> list[str]:
    """The lines of `preset`'s PSNR table (none for a record made before PSNR was recorded)."""
    parameter, values = record["parameter"], record["values"]
    if not all("refined_psnr" in record["summary"][value][preset] for value in values):
        return []
    first = record["runs"][values[0]][preset][0]["reflectance"]  # one dataset: the baselines' PSNR is every run's
    baselines = ", ".join(f"{BASELINE_NAMES[role]} {first[role]['psnr']:.2f} ({first[role]['psnr_in_range']:.2f} in "
                          "range)" for role in ("opt_v1", "linear_fit"))
    lines = [f"PSNR (dB, higher is better), on every test tile and on the tiles in range (not brighter than every "
             f"training tile): {baselines}.", "",
             f"| {parameter} | refined PSNR | in range |", "| ---: | ---: | ---: |"]
    for value in values:
        runs = record["runs"][value][preset]
        default = " (default)" if float(value) == record["default"] else ""
        cells = [mean_range_cell([run["reflectance"]["refined"][key] for run in runs], 2) for key in REFLECTANCE]
        lines.append(f"| {value}{default} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv=None) -> int:
    parser, args, demo_flags = parse_arguments(__doc__.split("\n\n")[0], list(sys.argv[1:] if argv is None else argv),
                                               None, add_arguments)
    check_arguments(parser, args)
    output = Path(args.output or RESULTS / f"{args.parameter}.md")
    check_study_arguments(parser, args, output)
    settings = {f"{args.parameter}={value}": [f"--{args.parameter}", value, *demo_flags] for value in args.values}

    load_start, start = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stage2-loss-weight-") as tmp:
        folders, trained = train_settings(args, settings, Path(tmp))
        record: dict = {"parameter": args.parameter, "default": loss_weights()[args.parameter], "values": args.values,
                        "presets": args.presets, "seeds": args.seeds, "machine": machine(), "demo_flags": demo_flags,
                        "runs": {value: {preset: [] for preset in args.presets} for value in args.values}}
        in_range = {preset: in_range_test_tiles(folder) for preset, folder in folders.items()}
        for (setting, preset, seed), model_dir in trained.items():
            value = setting.split("=", 1)[1]
            held_out = held_out_tile_statistics(model_dir, folders[preset])
            record["runs"][value][preset].append(run_record(preset, scores(held_out),
                                                            reflectance(held_out, in_range[preset])))
            print(f"{setting} {preset} seed {seed} done", flush=True)
    record["summary"] = summarise(record)
    record_study(output, render(record, time.perf_counter() - start, load_span(load_start)), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
