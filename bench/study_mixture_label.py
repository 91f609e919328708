"""Would a `mixture`-trained correction suit `mild` tiles if it were told each tile's preset? On the bundled sample.

    .venv/bin/python bench/study_mixture_label.py [--sizes 18 36] [--seeds 0 1 2] [--steps 300] [--jobs 2]
                                                  [--output bench/results/mixture_label.md]

Item 4 of the quality issue asks that a model trained on the `mixture` degradation (each tile `mild` or `strong`) be
no worse on `mild` tiles than one trained on `mild` alone by more than the seed spread. Every correction measured so
far misses it by far, from 9 to 36 training tiles (`bench/results/training_tiles.md`). Two things set a `mixture`
correction apart from a `mild` one: it is not told which preset degraded a tile, and it has about half as many `mild`
tiles. This study separates the two, on the training sets of `bench/study_training_tiles.py` (the 36 tiles of the
train and val splits cut into disjoint sets of `--sizes` tiles; the test split held out). Each correction is fitted
as the refiner's warm start fits its spectral MLP (the affine spectral fit, then the correction on top, `--steps` Adam
steps each, one thread) and scored on the `mild` test split:

- `mild`: the refiner's pixel MLP fitted on the set under `mild` (the reference);
- `mixture`: the same fitted on the set under `mixture`;
- `mixture, told the preset`: the set under `mixture`, each tile's preset (`data_builders.degrade.mixture_choice`)
  given to the correction: a 4x4 + bias change of the affine correction for each preset (zero at the start) and the
  preset as an input of the pixel MLP (`PresetConditionedMLP`); scored with `mild` given, as a user who names the
  generator of their `opt_v1` would;
- `mixture, told the preset, own fits as starts`: the same, with each preset's change started where it turns the
  affine spectral fit of all the set's tiles into the affine spectral fit of that preset's tiles alone (`--steps` Adam
  steps from zero may not travel that far: the quality issue's first finding);
- `mixture, told the preset, own fits kept`: the same start, with the changes kept there: each preset's own affine
  spectral fit, and one pixel MLP told the preset, fitted on all the set's tiles;
- `mild, the mixture's mild tiles only`: the pixel MLP fitted under `mild` on the tiles of the set that the mixture
  degrades with `mild`: all that a correction fitted for each preset apart would have for `mild` tiles.

Beside them, whether the preset can be told from the tile at all: a logistic regression on the 12 tile statistics of
`bench/study_tile_conditioning.py` (each band's 5 / 50 / 95 % quantiles of the log spectrum of `opt_v1`), fitted on the
36 pool tiles under both presets and scored on the 18 test tiles under both. Writes the tables to `--output` and every
number to the same name with `.json`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (  # noqa: E402
    SPECTRAL, check_study_arguments, cpu_name, load_average, load_span, mean_range_cell, record_study,
)
from bench.study_quality import DATASET_SEED, build_datasets  # noqa: E402
from bench.study_tile_conditioning import (  # noqa: E402
    apply_affine_change, held_out_rows, mlp_layers_after, spectral_scores, study_refiner_config, tile_statistics,
    with_tile_inputs,
)
from bench.study_training_tiles import (  # noqa: E402
    POOL_SPLITS, evi_comparison, fit_on_set, pool, sample_pool_ids, select_tiles, training_sets,
)
from data_builders.degrade import MIXTURE_PRESETS, mixture_choice  # noqa: E402
from modeling_stage2.modeling_stage2 import log_spectra  # noqa: E402

DEFAULT_SIZES = (18, 36)
REFERENCE = "mild"  # the preset the mixture is scored on and compared with
PRESET_COLUMN = "preset"  # the label column the told correction is fitted with: the index in MIXTURE_PRESETS
TOLD = {  # name -> where the told correction's per-preset changes start, and whether they are fitted from there
    "mixture, told the preset": "zero",
    "mixture, told the preset, own fits as starts": "own",
    "mixture, told the preset, own fits kept": "own, kept",
}
CORRECTIONS = ("mild", "mixture", *TOLD, "mild, the mixture's mild tiles only")
CLASSIFIER_L2 = 1e-2  # the logistic regression's weight penalty: keeps the weights finite if the pool is separable
CLASSIFIER_ITERATIONS = 200


# ------------------------------------------------------------------------------------------------ the told correction
class PresetConditionedMLP(nn.Module):
    """The spectral MLP's shape (two hidden layers of GELUs as wide as the refiner's, the output at zero) told each
    tile's preset (an index in `MIXTURE_PRESETS`): a 4x4 + bias change of its input for each preset, then the preset
    as two one-hot inputs of the MLP beside the pixel's log spectrum. It starts as no correction, for every preset."""

    def __init__(self):
        super().__init__()
        config = study_refiner_config()
        bands, hidden, presets = len(config.bands), config.spectral_mlp_hidden_size, len(MIXTURE_PRESETS)
        self.log_offset, self.presets = config.spectral_mlp_log_offset, presets
        self.preset_affine = nn.Linear(presets, bands * bands + bands, bias=False)
        nn.init.zeros_(self.preset_affine.weight)
        self.first = nn.Conv2d(bands + presets, hidden, 1)
        self.second, self.output = mlp_layers_after(self.first, hidden, bands)

    def forward(self, spectra: torch.Tensor, preset: torch.Tensor) -> torch.Tensor:
        """(B, bands, H, W) reflectance and (B,) preset indices -> the corrected reflectance."""
        told = nn.functional.one_hot(preset.long(), self.presets).to(spectra.dtype)
        spectra = apply_affine_change(spectra, self.preset_affine(told))
        features = with_tile_inputs(log_spectra(spectra, self.log_offset), told)
        hidden = nn.functional.gelu(self.second(nn.functional.gelu(self.first(features))))
        return spectra + self.output(hidden)


def preset_index(tile_id: str) -> int:
    """The index in `MIXTURE_PRESETS` of the preset the study's `mixture` dataset degrades `tile_id` with."""
    return MIXTURE_PRESETS.index(mixture_choice(DATASET_SEED, tile_id))


def tiles_of(preset: str, tile_ids: list[str]) -> list[str]:
    """The tiles of `tile_ids` that the `mixture` degrades with `preset`."""
    return [tile_id for tile_id in tile_ids if mixture_choice(DATASET_SEED, tile_id) == preset]


def reference_tiles(tile_ids: list[str]) -> list[str]:
    """The tiles of `tile_ids` that the `mixture` degrades with `REFERENCE`."""
    return tiles_of(REFERENCE, tile_ids)


def change_between(shared, own) -> torch.Tensor:
    """The change (`apply_affine_change`'s, bands * bands + bands numbers) that turns the output of the colour
    correction `shared` (`training.linear_fit.ColorFitResult`) into that of `own`: with y = M x + b,
    M' x + b' = (I + D) y + c for D = M' M^-1 - I and c = b' - (I + D) b."""
    mixing = own.matrix @ torch.linalg.inv(shared.matrix)
    change = mixing - torch.eye(mixing.shape[0], dtype=mixing.dtype)
    return torch.cat([change.flatten(), own.bias - mixing @ shared.bias]).float()


def start_at_own_fits(correction: PresetConditionedMLP, tiles, steps: int, seed: int) -> None:
    """Starts each preset's change of `correction` where it turns the affine spectral fit of `tiles` into the
    affine spectral fit of that preset's tiles alone (the fits `training.linear_fit.fit_spectral_correction` makes
    with `steps` and `seed`)."""
    from training.linear_fit import fit_spectral_correction

    shared = fit_spectral_correction(tiles, steps=steps, seed=seed)
    for index in range(len(MIXTURE_PRESETS)):
        own = tiles.select([row for row, label in enumerate(tiles[PRESET_COLUMN]) if label == index])
        change = change_between(shared, fit_spectral_correction(own, steps=steps, seed=seed))
        with torch.no_grad():
            correction.preset_affine.weight[:, index] = change


def told_correction(tiles, seed: int, steps: int, start: str):
    """`PresetConditionedMLP` fitted with `seed` on `tiles` (a split with the `PRESET_COLUMN`), each tile told its
    preset, its changes started at zero or at each preset's own fit (`start`: "zero", "own"; "own, kept" keeps them
    there and fits the MLP alone), on top of the affine spectral fit of all `tiles`, as the refiner's warm start fits
    its spectral MLP. Returns the correction and that affine fit."""
    from training.linear_fit import fit_spectral_correction

    if start not in TOLD.values():
        raise ValueError(f"unknown start {start!r}; choose one of {tuple(TOLD.values())}")
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    correction = PresetConditionedMLP()
    if start.startswith("own"):
        start_at_own_fits(correction, tiles, steps, seed)
        correction.preset_affine.weight.requires_grad_(start != "own, kept")
    affine = fit_spectral_correction(tiles, steps=steps, seed=seed, spectral_mlp=correction,
                                     mlp_columns=(PRESET_COLUMN,))
    return correction, affine


def fit_told(mixture_dir: Path, test_dir: Path, tile_ids: list[str], seed: int, steps: int, start: str) -> dict:
    """Test-split scores of `told_correction` on the `mixture` pool tiles `tile_ids`, scored with `REFERENCE` told
    (as `bench.study_tile_conditioning.fitted_scores` scores, clamped at 0)."""
    tiles = select_tiles(pool(mixture_dir), tile_ids)
    tiles = tiles.add_column(PRESET_COLUMN, [preset_index(tile_id) for tile_id in tiles["tile_id"]])
    correction, affine = told_correction(tiles, seed, steps, start)
    rows = held_out_rows(test_dir)
    told = torch.full((rows[0].shape[0],), MIXTURE_PRESETS.index(REFERENCE))
    with torch.no_grad():
        return spectral_scores(correction(affine.apply(rows[0]), told).clamp(min=0.0), rows)


def fit_correction(name: str, folders: dict, tile_ids: list[str], seed: int, steps: int) -> dict:
    """Test-split scores (on `REFERENCE`'s test split) of the correction `name` (`CORRECTIONS`) on the set."""
    reference = folders[REFERENCE]
    if name == "mild":
        return fit_on_set(reference, reference, tile_ids, "pixel", seed, steps)
    if name == "mixture":
        return fit_on_set(folders["mixture"], reference, tile_ids, "pixel", seed, steps)
    if name in TOLD:
        return fit_told(folders["mixture"], reference, tile_ids, seed, steps, TOLD[name])
    if name == "mild, the mixture's mild tiles only":
        return fit_on_set(reference, reference, reference_tiles(tile_ids), "pixel", seed, steps)
    raise ValueError(f"unknown correction {name!r}; choose one of {CORRECTIONS}")


# ------------------------------------------------------------------------------------------------ telling the presets
def opt_v1_statistics(dataset_dir: Path, splits: tuple[str, ...]) -> torch.Tensor:
    """(tiles, 12) tile statistics of `opt_v1` (`bench.study_tile_conditioning.tile_statistics` of its log spectra) of
    the dataset's `splits`."""
    from datasets import concatenate_datasets, load_from_disk

    dataset = load_from_disk(str(dataset_dir))
    rows = concatenate_datasets([dataset[split] for split in splits]).select_columns(["opt_v1"])
    opt_v1 = rows.with_format("torch")[:]["opt_v1"].float()
    return tile_statistics(log_spectra(opt_v1, study_refiner_config().spectral_mlp_log_offset))


def fit_logistic(features: torch.Tensor, labels: torch.Tensor):
    """A logistic regression (L2 `CLASSIFIER_L2`, on features standardised by their own mean and spread) fitted by
    L-BFGS; returns the function from features to predicted labels (bool)."""
    mean, spread = features.mean(0), features.std(0).clamp(min=1e-6)
    weight = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    standard = ((features - mean) / spread).double()
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=CLASSIFIER_ITERATIONS, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = nn.functional.binary_cross_entropy_with_logits(standard @ weight + bias, labels.double())
        value = value + CLASSIFIER_L2 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(closure)
    return lambda x: (((x - mean) / spread).double() @ weight.detach() + bias.detach()) > 0


def preset_classification(folders: dict) -> dict:
    """How well the tile statistics tell `strong` tiles from `mild` ones: fitted on the pool under both presets,
    scored on the test split under both (accuracy, and each preset's tiles told right)."""
    def labelled(splits):
        features, labels = [], []
        for label, preset in enumerate(MIXTURE_PRESETS):
            features.append(opt_v1_statistics(folders[preset], splits))
            labels.append(torch.full((features[-1].shape[0],), label))
        return torch.cat(features), torch.cat(labels)

    train_features, train_labels = labelled(tuple(POOL_SPLITS))
    test_features, test_labels = labelled(("test",))
    predict = fit_logistic(train_features, train_labels)
    scores = {}
    for role, (features, labels) in {"pool": (train_features, train_labels),
                                     "test": (test_features, test_labels)}.items():
        right = predict(features) == labels.bool()
        scores[role] = {"tiles": int(labels.numel()), "accuracy": float(right.double().mean()),
                        **{preset: f"{int(right[labels == index].sum())} of {int((labels == index).sum())}"
                           for index, preset in enumerate(MIXTURE_PRESETS)}}
    return scores


# ------------------------------------------------------------------------------------------------ reporting
def render(record: dict, seconds: float, load: str) -> str:
    fits = sum(len(runs) for sets in record["sizes"].values() for training_set in sets
               for runs in training_set["corrections"].values())
    lines = [
        "# A `mixture` correction told each tile's preset",
        "",
        f"Script: `bench/study_mixture_label.py --sizes {' '.join(record['sizes'])} --seeds "
        f"{' '.join(map(str, record['seeds']))} --steps {record['steps']}`; {fits} fits on one thread each in "
        f"{seconds / 60:.0f} min on {cpu_name()}; load average {load}.",
        "",
        "The training sets are `bench/study_training_tiles.py`'s (the 36 tiles of the train and val splits, cut into "
        "disjoint sets; the test split held out). Each correction is fitted on a set as the refiner's warm start fits "
        "its spectral MLP and scored on the `mild` test split (see the script's docstring). Cells: mean over sets and "
        "seeds (min-max). `/ mild`: the EVI RMSE as a fraction of the `mild` correction's on the same set and seed. "
        "Item 4 of the issue asks the mixture to be no worse than `mild` by more than the seed spread (of the `mild` "
        "correction's EVI RMSE: max - min over seeds, mean over the sets).",
    ]
    for size, sets in record["sizes"].items():
        mild_tiles = ", ".join(str(len(s["mild_tiles"])) for s in sets)
        lines += ["", f"## {size} training tiles ({len(sets)} set{'s' if len(sets) > 1 else ''}; `mild` tiles under "
                  f"`mixture`: {mild_tiles})", "",
                  "| correction | ndvi_rmse | evi_rmse | sam | evi / mild | evi difference | within the seed spread |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name in record["corrections"]:
            runs = [s["corrections"][name] for s in sets]
            cells = [mean_range_cell([run[m] for set_runs in runs for run in set_runs], 4) for m in SPECTRAL]
            if name == REFERENCE:
                spread = evi_comparison(runs, runs)["seed_spread"]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | 1 | seed spread {spread:.4f} | |")
                continue
            compared = evi_comparison(runs, [s["corrections"][REFERENCE] for s in sets])
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_range_cell(compared['ratios'], 2)} | "
                         f"{compared['difference']:+.4f} | {'yes' if compared['within_spread'] else 'no'} |")
    classified = record["preset_classification"]
    lines += ["", "## Can the tile statistics tell the presets apart?", "",
              "A logistic regression on the 12 tile statistics of `opt_v1` (`bench/study_tile_conditioning.py`'s), "
              "fitted on the pool's tiles under both presets and scored on the test tiles under both.", "",
              "| tiles | count | accuracy | " + " | ".join(f"`{p}` told right" for p in MIXTURE_PRESETS) + " |",
              "| --- | ---: | ---: | " + " | ".join("---:" for _ in MIXTURE_PRESETS) + " |"]
    for role, scores in classified.items():
        lines.append(f"| {role} | {scores['tiles']} | {scores['accuracy']:.2f} | "
                     + " | ".join(scores[p] for p in MIXTURE_PRESETS) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ running
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES),
                        help="training set sizes, each a divisor of the pool's 36 tiles")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of each fit (the warm start's 300)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "mixture_label.md"))
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, args.output)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if len(args.seeds) < 2:
        parser.error("--seeds: the seed spread needs at least 2 seeds")
    try:  # the sets from the sample's tile ids as the dataset builder splits them, before any dataset is built
        sets = {str(size): training_sets(sample_pool_ids(), size) for size in args.sizes}
    except ValueError as error:
        parser.error(f"--sizes: {error}")
    for size, size_sets in sets.items():
        if any(not tiles_of(preset, tiles) for tiles in size_sets for preset in MIXTURE_PRESETS):
            parser.error(f"--sizes: a set of {size} tiles lacks tiles of one of the mixture's presets "
                         f"({', '.join(MIXTURE_PRESETS)})")

    load_start, start = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stage2-mixture-label-") as tmp:
        folders = build_datasets(list(MIXTURE_PRESETS) + ["mixture"], Path(tmp))
        jobs = [(size, index, name, seed) for size in sets for index in range(len(sets[size]))
                for name in CORRECTIONS for seed in args.seeds]
        with ProcessPoolExecutor(max_workers=args.jobs) as workers:
            fitted = [workers.submit(fit_correction, name, folders, sets[size][index], seed, args.steps)
                      for size, index, name, seed in jobs]
            record = {"seeds": args.seeds, "steps": args.steps, "corrections": list(CORRECTIONS),
                      "dataset_seed": DATASET_SEED, "preset_classification": preset_classification(folders),
                      "sizes": {size: [{"tiles": tiles, "mild_tiles": reference_tiles(tiles), "corrections": {}}
                                       for tiles in sets[size]] for size in sets}}
            for (size, index, name, _), future in zip(jobs, fitted):
                record["sizes"][size][index]["corrections"].setdefault(name, []).append(future.result())
    record_study(args.output, render(record, time.perf_counter() - start, load_span(load_start)), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
