"""Keeping `opt_v1` (or the colour fit) on whole tiles brighter than every training tile: what would it do?

    .venv/bin/python bench/study_tile_fallback.py [--presets mild strong proxy] [--seeds 0 1 2] [--jobs 2]
                                                  [--output bench/results/tile_fallback.md] [-- DEMO FLAGS]

On the sample's test split two cloud-covered tiles are brighter (mean valid `opt_v1` reflectance) than every training
tile: there every correction extrapolates, and they decide the EVI verdicts (`docs/quality.md`). The refiner's
`out_of_range_fallback` keeps `opt_v1` at single pixels outside the training spectra; this study asks what the same
idea does at the level of the tile, with the studies' own rule for "out of range" (`bench._common.in_range_tiles`,
fixed before measuring). It trains the demo's `after` model (`bench.study_quality.train`, one thread each) and scores
its test split three ways: as it is, with `opt_v1` on the out-of-range tiles, and with the colour fit there (the
least-squares 4x4 + bias of the training split, as the baseline is scored), each against both baselines and the
preset's goal (`bench.study_rotation.meets_preset_goal`). Writes the tables to `--output` and every number to the same
name with `.json`. Flags after `--` go to the demo (for a quick run of the script itself).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._after_runs import machine, parse_arguments, script_line, train_after_runs  # noqa: E402
from bench._common import SPECTRAL, in_range_tiles, load_average, load_span, record_study  # noqa: E402
from bench.study_rotation import BASELINES, meets_preset_goal, ratios  # noqa: E402

# Output -> what the out-of-range tiles get ("refined": nothing changed)
VARIANTS = {"refined": "the refined output", "opt_v1 kept": "`opt_v1`", "colour fit kept": "the colour fit"}


def tile_fallback(refined, replacement, in_range):
    """`refined` with each tile that `in_range` ((B,) bool) leaves out taken whole from `replacement`."""
    import torch

    return torch.where(in_range[:, None, None, None], refined, replacement)


def score(model_dir: Path, dataset_dir: Path) -> dict:
    """{"out_of_range_tiles": [tile ids], variant: {role: {metric: value}}} on the test split of `dataset_dir`: each
    `VARIANTS` output as "refined" beside both baselines."""
    import torch
    from datasets import load_from_disk

    from modeling_stage2 import load_trained_model
    from training.data import model_input_opt_v1
    from training.evaluate import fit_color_baseline
    from training.metrics import evaluate_pair

    dataset_dict = load_from_disk(str(dataset_dir))
    model = load_trained_model(model_dir)
    train_rows = dataset_dict["train"].with_format("torch")[:]
    rows = dataset_dict["test"].with_format("torch")[:]
    with torch.no_grad():
        # invalid pixels filled, as `evaluate_model` and inference give them
        refined = model(model_input_opt_v1(rows["opt_v1"], rows["valid_mask"]), rows["month"], rows["biome"]).refined
    colour_fit = fit_color_baseline(dataset_dict).apply(rows["opt_v1"])
    in_range = in_range_tiles(rows["opt_v1"], rows["valid_mask"], train_rows["opt_v1"], train_rows["valid_mask"])
    outputs = {"refined": refined, "opt_v1 kept": tile_fallback(refined, rows["opt_v1"], in_range),
               "colour fit kept": tile_fallback(refined, colour_fit, in_range)}
    baselines = {"opt_v1": rows["opt_v1"], "linear_fit": colour_fit}

    def scored(output) -> dict:
        return {metric: float(value) for metric, value in evaluate_pair(
            output, rows["target"], rows["opt_v1"], rows["valid_mask"])["refined"].items() if metric in SPECTRAL}

    baseline_scores = {role: scored(output) for role, output in baselines.items()}
    tile_ids = dataset_dict["test"]["tile_id"]
    return {"out_of_range_tiles": [tile for tile, kept in zip(tile_ids, in_range.tolist()) if not kept],
            **{variant: {"refined": scored(output), **baseline_scores} for variant, output in outputs.items()}}


def summarise(record: dict) -> dict:
    """preset -> variant -> {"to": {baseline: mean ratios over seeds}, "goal": seeds meeting the preset's goal}."""
    summary = {}
    for preset, runs in record["presets"].items():
        summary[preset] = {}
        for variant in VARIANTS:
            scores = [run[variant] for run in runs]
            summary[preset][variant] = {
                "to": {baseline: [statistics.fmean(ratios(s, baseline)[index] for s in scores)
                                  for index in range(len(SPECTRAL))] for baseline in BASELINES},
                "goal": sum(meets_preset_goal(preset, s) for s in scores),
            }
    return summary


def render(record: dict, seconds: float, load: str) -> str:
    seeds = record["seeds"]
    lines = [
        "# Keeping `opt_v1` or the colour fit on whole tiles brighter than every training tile",
        "",
        script_line("study_tile_fallback.py", record, seconds, load),
        "",
        "Test split. A tile is out of range when its mean valid `opt_v1` reflectance is above every training tile's "
        "(`bench._common.in_range_tiles`); there the output is the refined one, `opt_v1`, or the colour fit. Cells: "
        "refined / baseline, NDVI RMSE / EVI RMSE / SAM, mean over seeds; goal: the preset's "
        "(`bench/study_rotation.py`).",
    ]
    for preset, by_variant in record["summary"].items():
        tiles = sorted({tile for run in record["presets"][preset] for tile in run["out_of_range_tiles"]})
        lines += ["", f"## `{preset}`: {len(tiles)} test tiles out of range ({', '.join(tiles) or 'none'})", "",
                  "| on those tiles | / colour fit | / `opt_v1` | seeds meeting the goal |",
                  "| --- | --- | --- | --- |"]
        for variant, summary in by_variant.items():
            cells = [" / ".join(f"{value:.2f}" for value in summary["to"][baseline]) for baseline in BASELINES]
            lines.append(f"| {VARIANTS[variant]} | {cells[0]} | {cells[1]} | {summary['goal']} of {len(seeds)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    _, args, demo_flags = parse_arguments(__doc__.split("\n\n")[0], list(sys.argv[1:] if argv is None else argv),
                                          REPO / "bench" / "results" / "tile_fallback.md")
    load_start, start = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stage2-tile-fallback-") as tmp:
        folders, trained = train_after_runs(args, demo_flags, Path(tmp))
        record: dict = {"seeds": args.seeds, "machine": machine(), "demo_flags": demo_flags,
                        "presets": {p: [] for p in args.presets}}
        for (preset, seed), model_dir in trained.items():
            record["presets"][preset].append(score(model_dir, folders[preset]))
            print(f"{preset} seed {seed} done", flush=True)
    record["summary"] = summarise(record)
    record_study(args.output, render(record, time.perf_counter() - start, load_span(load_start)), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
