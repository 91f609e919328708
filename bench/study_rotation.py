"""Every tile of the bundled sample held out once: the quality goal on 54 test tiles instead of 18.

    .venv/bin/python bench/study_rotation.py [--presets mild strong proxy] [--seeds 0 1 2] [--jobs 2]
                                             [--output bench/results/rotation.md]

Every quality figure of `bench/study_quality.py` comes from the sample's 18 test tiles, and the choices of the
refiner's design were made looking at them. A paired tile bootstrap (`training.bootstrap`) says how much a verdict on
18 tiles hangs on which tiles they are; this study asks the same with more tiles: it rotates the roles of the three
splits (`rotate_splits`: rotation 0 is the sample as it is, rotation 1 trains on its `val` tiles, validates on `test`
and tests on `train`, rotation 2 trains on `test`, validates on `train` and tests on `val`), so that each of the 54
tiles is held out exactly once, and trains the demo (`python -m training.demo`, the `after` model of
`bench/study_quality.py`: `configs/demo.yaml`, best step by the validation loss) on each rotation with each seed.
Each rotation's baselines are its own: `opt_v1`, and the least-squares colour fit (4x4 + bias) fitted on that
rotation's training tiles. The test tiles' statistics of the three rotations are pooled, as one evaluation set's are
(`training.metrics`), into the scores of each seed on 54 held-out tiles, with a paired tile bootstrap over them.

Presets (`bench/study_quality.py`'s): `mild` and `strong` (degradation presets of `data_builders.degrade`, dataset
seed 0; a tile's `opt_v1` depends on its id, not its split, so it is the same in every rotation) and `proxy` (Stage 1
outputs of `bench/stage1_proxy.py`, seed 0). Goals (`bench._common`): on `mild` and `strong`, refined / colour fit at
most 0.90 on NDVI RMSE, EVI RMSE and SAM; on `proxy`, at most 1, and refined / `opt_v1` at most 0.70, on all three.
Writes the tables to `--output` and every number (each tile's statistics included) to the same name with `.json`.
Runs `--jobs` trainings at a time, each on one thread.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (  # noqa: E402
    GOAL_MARGIN, OPT_V1_GOAL_MARGIN, SPECTRAL, check_study_arguments, cpu_name, load_average, load_span,
    mean_range_cell, meets_goal, record_study,
)
from bench.study_quality import PROXY_PRESETS, build_datasets, train  # noqa: E402

SPLITS = ("train", "val", "test")
ROTATIONS = (0, 1, 2)
PRESETS = ("mild", "strong", "proxy")
ROLES = ("refined", "opt_v1", "linear_fit")  # the refined output and its two baselines
BASELINES = ("linear_fit", "opt_v1")  # the order of the tables' columns


# ------------------------------------------------------------------------------------------------ data
def rotate_splits(dataset_dict, rotation: int):
    """The `DatasetDict` whose split `SPLITS[i]` is `dataset_dict`'s `SPLITS[(i + rotation) % 3]`: over rotations 0,
    1 and 2 every tile is in each role once."""
    from datasets import DatasetDict

    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation}")
    return DatasetDict({split: dataset_dict[SPLITS[(index + rotation) % len(SPLITS)]]
                        for index, split in enumerate(SPLITS)})


def rotated_name(preset: str, rotation: int) -> str:
    return f"{preset}-rotation{rotation}"


def build_rotations(presets, workdir: Path) -> dict[str, Path]:
    """Each preset's dataset (`bench.study_quality.build_datasets`) saved under each rotation, as the Arrow datasets
    `workdir / "data-<preset>-rotation<k>"` that `train` reads: rotated name -> folder."""
    from datasets import load_from_disk

    built = {}
    for preset, folder in build_datasets(presets, workdir).items():
        dataset_dict = load_from_disk(str(folder))
        for rotation in ROTATIONS:
            name = rotated_name(preset, rotation)
            built[name] = workdir / f"data-{name}"
            rotate_splits(dataset_dict, rotation).save_to_disk(str(built[name]))
    return built


# ------------------------------------------------------------------------------------------------ scoring
def held_out_tile_statistics(model_dir: Path, dataset_dir: Path) -> dict:
    """{"tile_ids": [...], role: {statistic: [one value per test tile]}} of the refined output and both baselines
    (the colour fit fitted on the dataset's training split) on its test split."""
    import torch
    from datasets import load_from_disk

    from modeling_stage2 import load_trained_model
    from training.data import model_input_opt_v1
    from training.evaluate import fit_color_baseline
    from training.metrics import tile_statistics

    dataset_dict = load_from_disk(str(dataset_dir))
    fit = fit_color_baseline(dataset_dict)
    model = load_trained_model(model_dir)
    rows = dataset_dict["test"].with_format("torch")[:]
    with torch.no_grad():
        # invalid pixels filled, as `evaluate_model` and inference give them
        refined = model(model_input_opt_v1(rows["opt_v1"], rows["valid_mask"]), rows["month"], rows["biome"]).refined
    outputs = {"refined": refined, "opt_v1": rows["opt_v1"], "linear_fit": fit.apply(rows["opt_v1"])}
    record: dict = {"tile_ids": list(dataset_dict["test"]["tile_id"])}
    for role, output in outputs.items():
        statistics = tile_statistics(output, rows["target"], rows["opt_v1"], rows["valid_mask"])
        record[role] = {name: values.tolist() for name, values in statistics.items()}
    return record


def pooled(runs: list[dict]) -> dict:
    """The tile statistics of several evaluations (`held_out_tile_statistics`), concatenated: one set of tiles."""
    return {"tile_ids": [tile for run in runs for tile in run["tile_ids"]],
            **{role: {name: [value for run in runs for value in run[role][name]] for name in runs[0][role]}
               for role in ROLES}}


def scores(statistics: dict, metrics: tuple[str, ...] = SPECTRAL) -> dict:
    """role -> {metric: value} of `metrics` (`training.metrics` names; by default the goal's), pooled over the tiles
    of `statistics` (as one evaluation set's)."""
    import torch

    from training.metrics import metrics_from_statistics

    return {role: {metric: float(value) for metric, value in metrics_from_statistics(
        {name: torch.tensor(values, dtype=torch.float64).sum() for name, values in statistics[role].items()}).items()
        if metric in metrics} for role in ROLES}


def select_tiles(statistics: dict, keep: list[bool]) -> dict:
    """The tile statistics (`held_out_tile_statistics`) of the tiles that `keep` (one flag per tile) keeps."""
    if len(keep) != len(statistics["tile_ids"]):
        raise ValueError(f"keep needs one flag per tile ({len(statistics['tile_ids'])}), got {len(keep)}")
    return {"tile_ids": [tile for tile, kept in zip(statistics["tile_ids"], keep) if kept],
            **{role: {name: [value for value, kept in zip(values, keep) if kept]
                      for name, values in statistics[role].items()} for role in ROLES}}


def bootstrap(statistics: dict) -> dict | None:
    """`training.bootstrap.bootstrap_ratios` of the refined output against both baselines over the tiles."""
    from training.bootstrap import bootstrap_ratios

    return bootstrap_ratios(statistics["refined"], {role: statistics[role] for role in BASELINES})


def ratios(scored: dict, baseline: str) -> list[float]:
    """Refined / `baseline` for each `SPECTRAL` metric of `scores` output."""
    return [scored["refined"][metric] / scored[baseline][metric] for metric in SPECTRAL]


def meets_preset_goal(preset: str, scored: dict) -> bool:
    """The goal of `preset`'s kind (module docstring) on `scores` output."""
    if preset in PROXY_PRESETS:
        return (all(ratio <= 1.0 for ratio in ratios(scored, "linear_fit"))
                and all(ratio <= 1.0 - OPT_V1_GOAL_MARGIN for ratio in ratios(scored, "opt_v1")))
    return meets_goal(scored["refined"], scored["linear_fit"])


# ------------------------------------------------------------------------------------------------ reporting
def held_out_split(rotation: int) -> str:
    """The split of the sample as shipped whose tiles are the test tiles of `rotation`."""
    return SPLITS[(SPLITS.index("test") + rotation) % len(SPLITS)]


def summarise(record: dict) -> dict:
    """preset -> {"seeds": [{"scores", "bootstrap", "goal"} pooled over the rotations, per seed],
    "rotations": [[scores of each seed] per rotation]}."""
    summary = {}
    for preset, by_rotation in record["presets"].items():
        seeds = range(len(by_rotation["0"]))
        pooled_seeds = []
        for seed in seeds:
            statistics = pooled([by_rotation[str(rotation)][seed] for rotation in ROTATIONS])
            scored = scores(statistics)
            pooled_seeds.append({"scores": scored, "bootstrap": bootstrap(statistics),
                                 "goal": meets_preset_goal(preset, scored), "n_tiles": len(statistics["tile_ids"])})
        per_rotation = [[scores(run) for run in by_rotation[str(rotation)]] for rotation in ROTATIONS]
        summary[preset] = {"seeds": pooled_seeds, "rotations": per_rotation}
    return summary


def goal_text(preset: str) -> str:
    """The goal of `preset`'s kind (`meets_preset_goal`), in words."""
    if preset in PROXY_PRESETS:
        return f"at most 1 against the colour fit and at most {1 - OPT_V1_GOAL_MARGIN:.2f} against `opt_v1`"
    return f"at most {1 - GOAL_MARGIN:.2f} against the colour fit"


def render(record: dict, summary: dict, seconds: float, load: str) -> str:
    from training.bootstrap import interval_cell

    seeds = record["seeds"]
    tiles = next(iter(summary.values()))["seeds"][0]["n_tiles"]
    trainings = sum(len(runs) for by_rotation in record["presets"].values() for runs in by_rotation.values())
    lines = [
        "# Every tile held out once: the quality goal on every tile of the sample",
        "",
        f"Script: `bench/study_rotation.py --presets {' '.join(record['presets'])} --seeds "
        f"{' '.join(map(str, seeds))}`; {trainings} demo trainings (`configs/demo.yaml`, the `after` model of "
        f"`bench/study_quality.py`, 18 training tiles each, one thread each) in {seconds / 60:.0f} min on "
        f"{cpu_name()}; load average {load}.",
        "",
        "The roles of the sample's three splits rotate (the script's docstring): rotation 0 tests on the `test` tiles "
        "(what every other study does), rotation 1 on the `train` tiles, rotation 2 on the `val` tiles, each time "
        "against its own baselines (the colour fit fitted on that rotation's training tiles). Pooled over the three "
        f"rotations, each seed's refined output is scored on all {tiles} tiles, each by a model that did not see it. "
        f"Cells: refined / baseline on NDVI RMSE, EVI RMSE and SAM with the 90 % interval of a paired tile bootstrap "
        f"over the {tiles} tiles (`training.bootstrap`, {record['resamples']} resamples).",
    ]
    for preset, data in summary.items():
        lines += ["", f"## `{preset}`: pooled over the rotations ({data['seeds'][0]['n_tiles']} test tiles)", "",
                  f"Goal: {goal_text(preset)}, on all three.", "",
                  "| seed | / colour fit: NDVI RMSE | EVI RMSE | SAM | / `opt_v1`: NDVI RMSE | EVI RMSE | SAM "
                  "| goal met |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for seed, pooled_seed in zip(seeds, data["seeds"]):
            cells = [interval_cell(pooled_seed["bootstrap"][role][metric])
                     for role in BASELINES for metric in SPECTRAL]
            lines.append(f"| {seed} | " + " | ".join(cells) + f" | {'yes' if pooled_seed['goal'] else 'no'} |")
        rotation_tiles = len(record["presets"][preset]["0"][0]["tile_ids"])
        lines += ["", f"Each rotation alone ({rotation_tiles} test tiles; mean over seeds (min-max)):", "",
                  "| rotation | test tiles | / colour fit: NDVI RMSE | EVI RMSE | SAM | / `opt_v1`: NDVI RMSE "
                  "| EVI RMSE | SAM | seeds meeting the goal |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for rotation, runs in zip(ROTATIONS, data["rotations"]):
            cells = [mean_range_cell([ratios(run, role)[index] for run in runs], 2)
                     for role in BASELINES for index in range(len(SPECTRAL))]
            met = sum(meets_preset_goal(preset, run) for run in runs)
            lines.append(f"| {rotation} | `{held_out_split(rotation)}` | " + " | ".join(cells)
                         + f" | {met} of {len(runs)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "rotation.md"))
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, args.output)
    from training.bootstrap import DEFAULT_RESAMPLES  # after the arguments: it loads torch

    load_start, start = load_average(), time.perf_counter()
    jobs = [(rotated_name(preset, rotation), seed) for preset in args.presets for rotation in ROTATIONS
            for seed in args.seeds]
    with tempfile.TemporaryDirectory(prefix="stage2-rotation-") as tmp:
        workdir = Path(tmp)
        folders = build_rotations(args.presets, workdir)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            trained = list(pool.map(lambda job: train(job[0], job[1], "after", workdir, arrow_presets=folders), jobs))
        record: dict = {"seeds": args.seeds, "resamples": DEFAULT_RESAMPLES,
                        "presets": {preset: {str(rotation): [] for rotation in ROTATIONS} for preset in args.presets}}
        for (name, seed), model_dir in zip(jobs, trained):
            preset, rotation = name.rsplit("-rotation", 1)
            record["presets"][preset][rotation].append(held_out_tile_statistics(model_dir, folders[name]))
            print(f"{name} seed {seed} done", flush=True)
    summary = summarise(record)
    record["summary"] = summary
    record_study(args.output, render(record, summary, time.perf_counter() - start, load_span(load_start)), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
