"""Do the colour corrections gain from more training tiles? Fitted on 9, 18 and 36 tiles of the bundled sample.

    .venv/bin/python bench/study_training_tiles.py [--datasets mild strong proxy mixture] [--sizes 9 18 36]
                                                   [--seeds 0 1] [--variants pixel "tile affine + pixel"]
                                                   [--steps 300] [--jobs 2] [--output bench/results/training_tiles.md]

Every quality study trains on the sample's 18 training tiles, and two of the quality issue's misses may be limits of
18 tiles rather than of the model: the tile-level corrections overfit (`bench/results/tile_conditioning.md`), and a
`mixture`-trained correction is worse on `mild` tiles than a `mild`-trained one. Users train on thousands of tiles.
This study asks which way the corrections move with more tiles, on the 54 there are. The test split (18 tiles) is
held out throughout; the train and val splits (36 tiles) are the pool. For each size n in `--sizes` (a divisor of
36) the pool, in an order drawn once (`POOL_ORDER_SEED`, over the sorted tile ids, the same tiles for every
dataset), is cut into 36 / n disjoint training sets of n tiles. On each set, each `--variants` correction of
`bench/study_tile_conditioning.py` is fitted with each seed exactly as that study fits it (the affine spectral fit,
then the correction on top, `--steps` Adam steps each; `pixel` is the refiner's own spectral MLP, the default model's
warm start), beside the least-squares colour fit (4x4 + bias) of the same set.

Scores on the test split: NDVI RMSE, EVI RMSE and SAM (`training.metrics`), as ratios to the set's colour fit and to
`opt_v1`, with the goal of the dataset's kind (`bench/study_rotation.py`'s: at most 0.90 against the colour fit; for
`proxy`, at most 1 against it and at most 0.70 against `opt_v1`), and how many test tiles are brighter than every
tile of the set (`bench._common.in_range_tiles`; more tiles could also mean more of the test tiles' brightness
covered). For `mixture` (scored on the `mild` test tiles, as the issue asks) it also compares each fit with the same
correction fitted on the same tiles under `mild` alone (`--datasets` must then hold `mild`). Writes the tables to
`--output` and every number to the same name with `.json`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (  # noqa: E402
    SPECTRAL, check_study_arguments, cpu_name, in_range_tiles, load_average, load_span, mean_range_cell, record_study,
)
from bench.study_quality import SAMPLE_TILES, build_datasets  # noqa: E402
from bench.study_rotation import goal_text, meets_preset_goal  # noqa: E402
from bench.study_tile_conditioning import (  # noqa: E402
    DATASETS, SCORED_ON, VARIANTS, datasets_to_build, fitted_scores, held_out_rows, spectral_scores,
)

POOL_SPLITS = ("train", "val")  # the tiles training sets are drawn from; the test split is held out
POOL_ORDER_SEED = 0
DEFAULT_SIZES = (9, 18, 36)
DEFAULT_VARIANTS = ("pixel", "tile affine + pixel")
MIXTURE_REFERENCE = "mild"  # what a `mixture` fit is compared with, on the same tiles


# ------------------------------------------------------------------------------------------------ training sets
def pool(dataset_dir: Path):
    """The dataset's `POOL_SPLITS` as one split."""
    from datasets import concatenate_datasets, load_from_disk

    dataset = load_from_disk(str(dataset_dir))
    return concatenate_datasets([dataset[split] for split in POOL_SPLITS])


def sample_pool_ids() -> list[str]:
    """The tile ids of the bundled sample's `POOL_SPLITS`, as the dataset builder splits them (sidecars only)."""
    from data_builders.discovery import discover_tiles

    splits, _ = discover_tiles(SAMPLE_TILES)
    return [spec.tile_id for split in POOL_SPLITS for spec in splits[split]]


def training_sets(tile_ids: list[str], size: int) -> list[list[str]]:
    """The pool's tiles (`tile_ids`), in the order `POOL_ORDER_SEED` draws over their sorted ids, cut into disjoint
    sets of `size` tiles (each sorted)."""
    if size < 1 or len(tile_ids) % size:
        raise ValueError(f"a training set size must divide the pool's {len(tile_ids)} tiles, got {size}")
    ordered = sorted(tile_ids)
    order = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(POOL_ORDER_SEED)).tolist()
    drawn = [ordered[index] for index in order]
    return [sorted(drawn[start:start + size]) for start in range(0, len(drawn), size)]


def select_tiles(dataset, tile_ids: list[str]):
    """The rows of `dataset` whose `tile_id` is in `tile_ids` (every one of them must be there)."""
    wanted = set(tile_ids)
    rows = [index for index, tile_id in enumerate(dataset["tile_id"]) if tile_id in wanted]
    if len(rows) != len(wanted):
        raise ValueError(f"{len(wanted) - len(rows)} of the {len(wanted)} tiles are not in the pool")
    return dataset.select(rows)


# ------------------------------------------------------------------------------------------------ fitting
def fit_on_set(dataset_dir: Path, test_dir: Path, tile_ids: list[str], variant: str, seed: int, steps: int) -> dict:
    """Test-split scores of `variant` fitted with `seed` on the pool tiles `tile_ids` of `dataset_dir`."""
    return fitted_scores(select_tiles(pool(dataset_dir), tile_ids), held_out_rows(test_dir), variant, seed, steps)


def set_baselines(dataset_dir: Path, test_dir: Path, tile_ids: list[str]) -> dict:
    """The test-split scores of the colour fit of the set `tile_ids`, and how many test tiles are brighter than
    every tile of the set."""
    from training.linear_fit import LinearColorFit

    tiles = select_tiles(pool(dataset_dir), tile_ids)
    rows = held_out_rows(test_dir)
    fit = LinearColorFit.from_dataset(tiles)
    training = tiles.select_columns(["opt_v1", "valid_mask"]).with_format("torch")[:]
    in_range = in_range_tiles(rows[0], rows[2], training["opt_v1"].float(), training["valid_mask"])
    return {"colour fit": spectral_scores(fit.apply(rows[0]), rows), "out_of_range": int((~in_range).sum())}


def opt_v1_scores(test_dir: Path) -> dict:
    rows = held_out_rows(test_dir)
    return spectral_scores(rows[0], rows)


# ------------------------------------------------------------------------------------------------ reporting
def runs_of(data: dict, size: str, variant: str) -> list[dict]:
    """Every fit of `variant` at `size` (all sets, all seeds), each with the set's colour fit and `opt_v1` beside it:
    {"refined", "linear_fit", "opt_v1"}, the shape `bench.study_rotation.meets_preset_goal` reads."""
    return [{"refined": run, "linear_fit": training_set["colour fit"], "opt_v1": data["opt_v1"]}
            for training_set in data["sizes"][size] for run in training_set["variants"][variant]]


def ratio_cells(runs: list[dict], baseline: str) -> list[str]:
    return [mean_range_cell([run["refined"][m] / run[baseline][m] for run in runs], 2) for m in SPECTRAL]


def evi_comparison(runs: list[list[dict]], reference: list[list[dict]]) -> dict:
    """`runs` and `reference` (per set, per seed: scores, paired) compared on EVI RMSE: the paired ratios and their
    mean, the difference of the means, and the reference's seed spread (max - min over seeds, mean over the sets),
    which the issue's item 4 allows the difference (`within_spread`)."""
    def mean_of(sets: list[list[dict]]) -> float:
        return statistics.fmean(run["evi_rmse"] for set_runs in sets for run in set_runs)

    ratios = [run["evi_rmse"] / ref["evi_rmse"] for set_runs, set_ref in zip(runs, reference)
              for run, ref in zip(set_runs, set_ref)]
    spread = statistics.fmean(max(r["evi_rmse"] for r in s) - min(r["evi_rmse"] for r in s) for s in reference)
    difference = mean_of(runs) - mean_of(reference)
    return {"ratios": ratios, "ratio": statistics.fmean(ratios), "difference": difference, "seed_spread": spread,
            "within_spread": difference <= spread}


def mixture_rows(record: dict, size: str, variant: str) -> list[str]:
    """EVI RMSE of the `mixture` fits and of the `MIXTURE_REFERENCE` fits on the same tiles, with the seed spread
    of the latter (`evi_comparison`)."""
    mixture, reference = ([s["variants"][variant] for s in record["datasets"][name]["sizes"][size]]
                          for name in ("mixture", MIXTURE_REFERENCE))
    compared = evi_comparison(mixture, reference)
    mixed, alone = ([run["evi_rmse"] for set_runs in sets for run in set_runs] for sets in (mixture, reference))
    return [f"| {size} | {variant} | {mean_range_cell(alone, 4)} | {mean_range_cell(mixed, 4)} | "
            f"{mean_range_cell(compared['ratios'], 2)} | {compared['difference']:.4f} | "
            f"{compared['seed_spread']:.4f} |"]


def render(record: dict, seconds: float, load: str) -> str:
    fits = sum(len(runs) for data in record["datasets"].values() for sets in data["sizes"].values()
               for training_set in sets for runs in training_set["variants"].values())
    lines = [
        "# More training tiles: how the colour corrections scale",
        "",
        f"Script: `bench/study_training_tiles.py --sizes {' '.join(record['sizes'])} --seeds "
        f"{' '.join(map(str, record['seeds']))} --steps {record['steps']}`; {fits} fits on one thread each in "
        f"{seconds / 60:.0f} min on {cpu_name()}; load average {load}.",
        "",
        "The 18 test tiles are held out throughout. The 36 tiles of the train and val splits are the pool, cut into "
        "disjoint training sets of n tiles (36 / n of them, the same tiles for every dataset). Each correction is "
        "fitted on a set as the refiner's warm start fits its spectral MLP, on top of the affine spectral fit "
        "(`pixel` is the default model's warm start; see `bench/study_tile_conditioning.py` for the other). "
        "Cells: mean over sets and seeds (min-max). Ratios are to the colour fit of the same set (least squares, "
        "4x4 + bias) and to `opt_v1`. `goal met`: fits meeting the goal of the dataset's kind. `out of range`: test "
        "tiles brighter than every tile of the set (mean over the sets).",
    ]
    for name, data in record["datasets"].items():
        scored_on = data["scored_on"]
        lines += ["", f"## trained on `{name}`, scored on the `{scored_on}` test split", "",
                  f"Goal: {goal_text(name)}, on all three.", "",
                  "| training tiles | sets | correction | / colour fit: ndvi | evi | sam | / `opt_v1`: ndvi | evi "
                  "| sam | goal met | out of range |",
                  "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for size, sets in data["sizes"].items():
            fit_runs = [{"refined": s["colour fit"], "opt_v1": data["opt_v1"]} for s in sets]
            out_of_range = statistics.fmean(s["out_of_range"] for s in sets)
            lines.append(f"| {size} | {len(sets)} | colour fit | | | | " + " | ".join(ratio_cells(fit_runs, "opt_v1"))
                         + f" | | {out_of_range:g} |")
            for variant in record["variants"]:
                runs = runs_of(data, size, variant)
                met = sum(meets_preset_goal(name, run) for run in runs)
                lines.append(f"| {size} | {len(sets)} | {variant} | " + " | ".join(ratio_cells(runs, "linear_fit"))
                             + " | " + " | ".join(ratio_cells(runs, "opt_v1")) + f" | {met} of {len(runs)} | |")
    if "mixture" in record["datasets"] and MIXTURE_REFERENCE in record["datasets"]:
        lines += ["", f"## `mixture` against `{MIXTURE_REFERENCE}` alone, on the same tiles", "",
                  f"EVI RMSE on the `{MIXTURE_REFERENCE}` test split of each correction fitted on a set under "
                  f"`mixture` and under `{MIXTURE_REFERENCE}` alone (the same tiles, the same seeds). The issue asks "
                  "that the mixture be no worse by more than the seed spread (here: max - min over seeds of the "
                  f"`{MIXTURE_REFERENCE}` fits, mean over the sets).", "",
                  f"| training tiles | correction | `{MIXTURE_REFERENCE}` alone | `mixture` | ratio | difference of "
                  "the means | seed spread |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for size in record["sizes"]:
            for variant in record["variants"]:
                lines += mixture_rows(record, size, variant)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ running
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES),
                        help="training set sizes, each a divisor of the pool's 36 tiles")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of each fit (the warm start's 300)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "training_tiles.md"))
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, args.output)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if "mixture" in args.datasets and MIXTURE_REFERENCE not in args.datasets:
        parser.error(f"--datasets mixture needs {MIXTURE_REFERENCE} too: the mixture is compared with it")

    try:  # the sets from the sample's tile ids as the dataset builder splits them, before any dataset is built
        sets = {str(size): training_sets(sample_pool_ids(), size) for size in args.sizes}
    except ValueError as error:
        parser.error(f"--sizes: {error}")

    load_start, start = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stage2-training-tiles-") as tmp:
        folders = build_datasets(datasets_to_build(args.datasets), Path(tmp))
        pairs = {name: (folders[name], folders[SCORED_ON.get(name, name)]) for name in args.datasets}
        jobs = [(name, size, index, variant, seed) for name in args.datasets for size in sets
                for index in range(len(sets[size])) for variant in args.variants for seed in args.seeds]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool_of_workers:
            fitted = [pool_of_workers.submit(fit_on_set, *pairs[name], sets[size][index], variant, seed, args.steps)
                      for name, size, index, variant, seed in jobs]
            baselines = {(name, size, index): pool_of_workers.submit(set_baselines, *pairs[name], tiles)
                         for name in args.datasets for size in sets for index, tiles in enumerate(sets[size])}
            record = {"seeds": args.seeds, "steps": args.steps, "sizes": list(sets), "variants": args.variants,
                      "pool_splits": list(POOL_SPLITS), "pool_order_seed": POOL_ORDER_SEED, "datasets": {}}
            for name in args.datasets:
                record["datasets"][name] = {
                    "scored_on": SCORED_ON.get(name, name), "opt_v1": opt_v1_scores(pairs[name][1]),
                    "sizes": {size: [{"tiles": tiles, **baselines[(name, size, index)].result(), "variants": {}}
                                     for index, tiles in enumerate(sets[size])] for size in sets}}
            for (name, size, index, variant, _), future in zip(jobs, fitted):
                record["datasets"][name]["sizes"][size][index]["variants"].setdefault(variant, []).append(
                    future.result())
    record_study(args.output, render(record, time.perf_counter() - start, load_span(load_start)), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
