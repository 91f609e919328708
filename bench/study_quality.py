"""Refinement quality against both baselines, before and after the spectral correction, under both degradations.

    .venv/bin/python bench/study_quality.py [--presets mild strong] [--seeds 0 1 2] [--variants before per_tile after]
                                            [--no-mixture] [--mixture_variants after fallback] [--jobs 2]
                                            [--reuse bench/results/quality.json] [--output bench/results/quality.md]
    .venv/bin/python bench/study_quality.py --presets proxy --no-mixture --output bench/results/quality_proxy.md
    .venv/bin/python bench/study_quality.py --presets proxy-seed1 proxy-seed2 --variants after fallback --no-mixture \
        --reuse bench/results/quality_proxy.json --output bench/results/quality_proxy.md
    .venv/bin/python bench/study_quality.py --presets proxy-no-style --variants after fallback --no-mixture \
        --reuse bench/results/quality_proxy.json --output bench/results/quality_proxy.md
    .venv/bin/python bench/study_quality.py --presets --no-mixture --mixture_bounds --reuse bench/results/quality.json
    .venv/bin/python bench/study_quality.py --presets mild-seed1 mild-seed2 strong-seed1 strong-seed2 \
        --variants after fallback --no-mixture --reuse bench/results/quality.json

For each degradation preset (`data_builders.degrade`), training seed and model variant it trains the demo
(`python -m training.demo`: `configs/demo.yaml`, the tiny backbone on the CPU, best step picked on the validation
split) in its own process, then scores the best model on the held-out test split and on the validation split
next to the two baselines: `opt_v1` itself and the least-squares colour fit (4x4 + bias, `training.linear_fit`)
fitted on the same training tiles. Variants: `before` is the refiner of the previous release (additive head only:
`--spectral_correction none --nonnegative_output false --eval_on_start false`), `per_tile` the default before the
spectral MLP (per-tile affine correction started at the spectral fit, output clamped at 0, brightness augmentation
0.1-1.0, no spectral MLP), `after` the current demo (one shared correction started at the spectral fit, refined
per pixel by the spectral MLP, no brightness augmentation; the starting point a candidate for the best step),
`fallback` the demo with `--out_of_range_fallback true`, `near_black` the demo with `--near_black_fallback true`
(`opt_v1` kept where its red + NIR is near-black), `near_black_ndvi` the same with `--near_black_keep ndvi` (only
`opt_v1`'s NDVI kept there: its split of the refined red + NIR), `redraw` the demo with `--redraw_degradation true`
(the training tiles' synthetic `opt_v1` drawn anew each epoch and at each warm-start step; degradation presets
only). With `--mixture` (default) it also trains the
`--mixture_variants` (default `after`) on the `mixture` degradation and scores them on the `mild` test split, to compare
with the same variant trained on `mild` alone (with `--reuse`, the earlier study's mixture runs of variants not trained
now are reported). With `--mixture_bounds` it also trains `after` on two training sets that bound what the mixture
could reach on `mild` tiles (`MIXTURE_BOUNDS`): the `mild` tiles of the mixture alone (what a model that told the two
presets apart perfectly would have for its `mild` tiles), and every tile under both presets (the mixture without the
loss of `mild` tiles).
The preset `proxy` is not a degradation of `degrade.py`: its `opt_v1` comes from `bench/stage1_proxy.py`, a
stand-in Stage 1 generator with other kinds of errors, given to training as Stage 1 outputs (`--stage1_dir`).
`proxy-seed1` and `proxy-seed2` are the same generator with its per-tile errors drawn from other seeds
(`PROXY_DRAWS`), `proxy-no-style` its first draw without the random per-tile colour cast and band mixing
(`PROXY_PRESETS`, `--style_spread 0`; its other errors as drawn for `proxy`), and `mild-seed1` ... `strong-seed2` the
degradation presets drawn with other dataset seeds (`DEGRADATION_DRAWS`, `--dataset_seed`): 18 test tiles are few, so
a verdict should hold on more than one draw.

Besides the design metrics (NDVI RMSE, EVI RMSE, SAM, PSNR, SSIM, `training.metrics`) it reports the NDVI RMSE
without near-black pixels (`ndvi_rmse_bright`: target red + NIR >= `NEAR_BLACK`), where NDVI is a ratio of
quantisation noise, and the EVI RMSE without the test tiles brighter than every training tile (`evi_rmse_in_range`,
`bench._common.in_range_tiles`), where every correction extrapolates. Beside each trained model it also scores the
same output with `opt_v1` blended back in at the pixels outside the training spectra (`refined_fallback`,
`modeling_stage2.Stage2SpectralRange`, fitted by `training.spectral_range`): the rule of a refiner built with
`out_of_range_fallback`, applied to these models' output (trained without it); and, on the test split, the same under
the other settings of that rule in `SENSITIVITY`.
Writes the tables to `--output` and every number to the same name with `.json`.
Runs `--jobs` trainings at a time, each on one thread (about a minute and a half each on a 2-core machine).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_builders.degrade import DEGRADATION_PRESETS  # noqa: E402
from bench._common import (  # noqa: E402
    GOAL_MARGIN, SPECTRAL, check_study_arguments, cpu_name, in_range_evi_rmse, in_range_tiles, load_average, load_span,
    mean_range_cell, meets_goal, record_study,
)

COLUMNS = ("ndvi_rmse", "ndvi_rmse_bright", "evi_rmse", "evi_rmse_in_range", "sam", "psnr", "ssim")
ROLES = ("opt_v1", "linear_fit", "spectral_fit", "refined", "refined_fallback")
# `refined_fallback`: the refined output with `opt_v1` kept outside the training spectra (`out_of_range_fallback`'s
# rule applied to a model trained without it)
FALLBACK = "opt_v1 out of range"
# The settings of that rule tried beside its own (quantile of the training distances, ramp), on the test split
SENSITIVITY = tuple((quantile, ramp) for quantile in (0.95, 0.99, 0.995) for ramp in (1.5, 2.0, 3.0))
# Red + NIR reflectance of the target below which a pixel is "near black" (open water, deep shadow): there NDVI is
# the ratio of two numbers a few digital numbers above zero. The refiner's `near_black_threshold` defaults to the
# same value (on `opt_v1`, the only image it has); kept here so that this script's reporting does not load the model
# (tests/test_near_black.py checks the two agree).
NEAR_BLACK = 0.02


# ------------------------------------------------------------------------------------------------- running
PROXY = "proxy"  # Stage 1 outputs of bench/stage1_proxy.py instead of a degradation preset
# preset -> the seed of bench/stage1_proxy.py: the proxy generator's per-tile errors, drawn again
PROXY_DRAWS = {PROXY: 0, f"{PROXY}-seed1": 1, f"{PROXY}-seed2": 2}
# preset -> (seed, --style_spread) of bench/stage1_proxy.py: every preset of that generator. `proxy-no-style` is the
# first draw without the random per-tile colour style: most of its colour error is then the same on every tile.
PROXY_PRESETS = {**{preset: (seed, 1.0) for preset, seed in PROXY_DRAWS.items()}, f"{PROXY}-no-style": (0, 0.0)}
# preset -> (degradation preset, dataset seed): the per-tile errors of `degrade.py` drawn again
DEGRADATION_DRAWS = {f"{preset}-seed{seed}": (preset, seed) for preset in DEGRADATION_PRESETS for seed in (1, 2)}
TRAINED_PRESETS = (*DEGRADATION_PRESETS, *DEGRADATION_DRAWS, *PROXY_PRESETS)  # what `--presets` takes
SAMPLE_TILES = REPO / "data" / "sample" / "tiles"
DATASET_SEED = 0  # of the synthetic degradation (and of the mixture's choice), as in the demo
# Training sets made from the `mild` and `strong` datasets that bound what a `mixture`-trained model can reach on
# `mild` tiles (validation and test splits: `mild`'s unless said): name -> row label of the mixture table.
MIXTURE_BOUNDS = {
    "mixture_mild_tiles": "mild, only the mixture's mild training tiles",
    "mild_and_strong": "mild and strong, every tile under both presets",
}
BOUNDS_KEY = "mixture_bounds_on_mild"  # where the study's JSON records their runs


def fallback_setting() -> tuple[float, float]:
    """The out-of-range rule's own (quantile, ramp): training's defaults (imported when needed: they load torch)."""
    from modeling_stage2.configuration_stage2 import OUT_OF_RANGE_RAMP
    from training.spectral_range import OUT_OF_RANGE_QUANTILE

    return OUT_OF_RANGE_QUANTILE, OUT_OF_RANGE_RAMP


def proxy_stage1_dir(workdir: Path, preset: str) -> Path:
    return workdir / f"stage1-{preset}"


def build_datasets(presets, workdir: Path) -> dict[str, Path]:
    from data_builders import build_dataset

    folders = {}
    for preset in presets:
        folders[preset] = workdir / f"data-{preset}"
        if preset in PROXY_PRESETS:
            seed, style_spread = PROXY_PRESETS[preset]
            subprocess.run([sys.executable, str(REPO / "bench" / "stage1_proxy.py"), "--output_dir",
                            str(proxy_stage1_dir(workdir, preset)), "--seed", str(seed),
                            "--style_spread", str(style_spread)], check=True, cwd=REPO)
            build_dataset(SAMPLE_TILES, folders[preset], stage1_dir=proxy_stage1_dir(workdir, preset))
        else:
            degradation, seed = DEGRADATION_DRAWS.get(preset, (preset, DATASET_SEED))
            build_dataset(SAMPLE_TILES, folders[preset], degradation=degradation, seed=seed)
    return folders


def training_tiles(dataset_dir: Path) -> int:
    from datasets import load_from_disk

    return load_from_disk(str(dataset_dir))["train"].num_rows


def build_mixture_bounds(folders: dict[str, Path], workdir: Path) -> dict[str, Path]:
    """The `MIXTURE_BOUNDS` training sets, saved beside `folders` (which holds `mild` and `strong`)."""
    from datasets import DatasetDict, concatenate_datasets, load_from_disk

    from data_builders.degrade import mixture_choice

    mild, strong = (load_from_disk(str(folders[preset])) for preset in ("mild", "strong"))
    kept = [index for index, tile_id in enumerate(mild["train"]["tile_id"])
            if mixture_choice(DATASET_SEED, tile_id) == "mild"]
    bounds = {
        "mixture_mild_tiles": DatasetDict({**mild, "train": mild["train"].select(kept)}),
        "mild_and_strong": DatasetDict({**mild, **{split: concatenate_datasets([mild[split], strong[split]])
                                                   for split in ("train", "val")}}),
    }
    built = {}
    for name, dataset_dict in bounds.items():
        built[name] = workdir / f"data-{name}"
        dataset_dict.save_to_disk(str(built[name]))
    return built


# Flags that turn the demo (`after`) into each earlier model.
VARIANT_FLAGS = {
    # the release before the spectral correction: additive head only, unbounded output
    "before": ["--spectral_correction", "none", "--nonnegative_output", "false", "--eval_on_start", "false",
               "--spectral_mlp_hidden_size", "0", "--brightness_augment", "0.1", "1.0"],
    # the release before the spectral MLP: per-tile affine correction, brightness augmentation
    "per_tile": ["--spectral_correction", "affine", "--spectral_mlp_hidden_size", "0",
                 "--brightness_augment", "0.1", "1.0"],
    "after": [],
    # the demo with the rule in the model: opt_v1 kept outside the training spectra, in training and inference
    "fallback": ["--out_of_range_fallback", "true"],
    # the demo with opt_v1 kept at its near-black pixels by the model itself, in training and inference
    "near_black": ["--near_black_fallback", "true"],
    # the same rule keeping only opt_v1's NDVI (its red/NIR split) at those pixels
    "near_black_ndvi": ["--near_black_fallback", "true", "--near_black_keep", "ndvi"],
    # the demo with the training tiles' synthetic opt_v1 drawn anew each epoch and warm-start step
    "redraw": ["--redraw_degradation", "true"],
}


def train(preset: str, seed: int, variant: str, workdir: Path, arrow_presets=MIXTURE_BOUNDS,
          extra_flags=(), tag: str = "") -> Path:
    """Trains the demo's `variant` with `seed` on `preset`'s data; `arrow_presets`: the presets whose data is an Arrow
    dataset saved at `workdir / f"data-{preset}"` (those of `build_mixture_bounds`, unless said); `extra_flags`: more
    demo flags, after the variant's; `tag`: added to the run's folder name, so that runs of the same preset, seed and
    variant with different `extra_flags` keep their own."""
    output = workdir / f"{preset}-{variant}{tag}-seed{seed}"
    if preset in PROXY_PRESETS:
        data = ["--stage1_dir", str(proxy_stage1_dir(workdir, preset))]
    elif preset in arrow_presets:
        data = ["--data_dir", str(workdir / f"data-{preset}")]
    else:  # the dataset seed said, as build_datasets builds the dataset it is scored on
        degradation, dataset_seed = DEGRADATION_DRAWS.get(preset, (preset, DATASET_SEED))
        data = ["--degradation", degradation, "--dataset_seed", str(dataset_seed)]
    command = [sys.executable, "-m", "training.demo", "--output_dir", str(output), *data,
               "--seed", str(seed), "--disable_tqdm", "true", "--report_to", "none"]
    command += [*VARIANT_FLAGS[variant], *extra_flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if not (output / "demo_results.json").is_file():  # exit status 1 only means "did not beat a baseline"
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return output / "best"


@functools.lru_cache(maxsize=None)
def spectral_fit(dataset_dir: Path):
    """Where the spectral correction of the default model starts (`spectral_correction_init: spectral_fit`, seed 0)."""
    from datasets import load_from_disk

    from training.linear_fit import fit_spectral_correction

    return fit_spectral_correction(load_from_disk(str(dataset_dir))["train"])


def score(model_dir: Path, dataset_dir: Path, trained_on: Path | None = None) -> dict:
    """{split: {role: {metric: value}}} of the model, both baselines and the spectral fit on the val and test
    splits of `dataset_dir`. `trained_on` (default `dataset_dir`) holds the training split the model learnt from:
    the training spectra and the brightest training tile come from it (the baselines stay `dataset_dir`'s)."""
    import torch
    from datasets import load_from_disk

    from modeling_stage2 import load_trained_model
    from modeling_stage2.modeling_stage2 import keep_opt_v1, out_of_range_weight
    from training.bootstrap import DEFAULT_RESAMPLES
    from training.data import model_input_opt_v1
    from training.evaluate import evaluate_model, fit_color_baseline, load_split
    from training.losses import ndvi
    from training.metrics import evaluate_pair
    from training.spectral_range import fit_spectral_range

    dataset_dict = load_from_disk(str(dataset_dir))
    fit = fit_color_baseline(dataset_dict)
    start = spectral_fit(dataset_dir)
    model = load_trained_model(model_dir)
    train = load_from_disk(str(trained_on or dataset_dir))["train"].with_format("torch")[:]
    log_offset = model.config.spectral_mlp_log_offset
    own_quantile, own_ramp = fallback_setting()
    spectra_ranges = {quantile: fit_spectral_range(lambda: [(train["opt_v1"], train["valid_mask"])], log_offset,
                                                   quantile)
                      for quantile in {own_quantile} | {quantile for quantile, _ in SENSITIVITY}}

    def fallback_weight(opt_v1, quantile=own_quantile, ramp=own_ramp):
        spectra_range = spectra_ranges[quantile]
        return out_of_range_weight(spectra_range.distance(opt_v1, log_offset), spectra_range.threshold, ramp)[:, None]

    in_model = model.config.out_of_range_fallback  # the rule is the model's own: nothing to add after it
    scores = {}
    for split in ("test", "val"):
        dataset = load_split(str(dataset_dir), split, dataset_dict=dataset_dict)
        results = evaluate_model(model, dataset, progress=False, color_fit=fit,
                                 bootstrap_resamples=DEFAULT_RESAMPLES if split == "test" else 0)
        rows = dataset_dict[split].with_format("torch")[:]
        with torch.no_grad():
            # invalid pixels filled, as `evaluate_model` (above) and inference give them
            model_output = model(model_input_opt_v1(rows["opt_v1"], rows["valid_mask"]), rows["month"], rows["biome"])
        refined = model_output.refined
        target = rows["target"]
        bright = rows["valid_mask"] & (target[:, 2] + target[:, 3] >= NEAR_BLACK)
        in_range = in_range_tiles(rows["opt_v1"], rows["valid_mask"], train["opt_v1"], train["valid_mask"])
        started = start.apply(rows["opt_v1"]).clamp(min=0.0)
        weight = model_output.out_of_range_weight if in_model else fallback_weight(rows["opt_v1"])
        outputs = {"opt_v1": rows["opt_v1"], "linear_fit": fit.apply(rows["opt_v1"]), "spectral_fit": started,
                   "refined": refined}
        if not in_model:
            outputs["refined_fallback"] = keep_opt_v1(refined, rows["opt_v1"], weight.to(refined.dtype))
        for role in ("spectral_fit", "refined_fallback"):
            if role in outputs:
                results[role] = evaluate_pair(outputs[role], target, rows["opt_v1"], rows["valid_mask"])["refined"]
        for role, output in outputs.items():
            error = (ndvi(output) - ndvi(target))[bright]
            results[role]["ndvi_rmse_bright"] = float(error.pow(2).mean().sqrt())
            results[role]["evi_rmse_in_range"] = in_range_evi_rmse(output, target, rows["opt_v1"], rows["valid_mask"],
                                                                   in_range)
        results["bright_fraction"] = float(bright.sum() / rows["valid_mask"].sum())
        results["out_of_range_fraction"] = float(((weight[:, 0] > 0) & rows["valid_mask"]).sum()
                                                 / rows["valid_mask"].sum())
        scores[split] = {key: results[key] for key in (*ROLES, "bright_fraction", "out_of_range_fraction", "n_tiles",
                                                       "bootstrap") if key in results}
        if split == "test" and not in_model:
            scores[split]["fallback_sensitivity"] = {
                f"{quantile}/{ramp}": evaluate_pair(
                    keep_opt_v1(refined, rows["opt_v1"], fallback_weight(rows["opt_v1"], quantile, ramp).to(refined.dtype)),
                    target, rows["opt_v1"], rows["valid_mask"])["refined"]
                for quantile, ramp in SENSITIVITY}
    return scores


# ------------------------------------------------------------------------------------------------ reporting
def _digits(metric: str) -> int:
    return 2 if metric == "psnr" else 4


def _ratios(results: list, split: str, metric: str) -> list:
    """Refined / colour fit per run (None where a reused run predates the column)."""
    return [None if r[split]["refined"].get(metric) is None
            else r[split]["refined"][metric] / r[split]["linear_fit"][metric] for r in results]


def with_fallback(variant_runs: dict) -> dict:
    """The variants, each followed (where its runs recorded it) by itself with `opt_v1` kept outside the training
    spectra: its `refined_fallback` scores in the place of `refined`."""
    shown = {}
    for variant, results in variant_runs.items():
        shown[variant] = results
        if all("refined_fallback" in r["test"] for r in results):
            shown[f"{variant}, {FALLBACK}"] = [
                {split: {**r[split], "refined": r[split]["refined_fallback"]} for split in ("test", "val")}
                for r in results]
    return shown


def render(runs: dict, mixture: dict, seeds, seconds: float, load: str, reused: list[str] = (),
           bounds: dict | None = None, arguments: str | None = None) -> str:
    """The study's markdown. `runs`: (preset, variant) -> one score per seed; `mixture`: variant -> the scores on the
    `mild` test split of that variant trained on `mixture`; `reused`: the keys (`preset/variant`) of runs taken from an
    earlier study; `bounds`: `MIXTURE_BOUNDS` name -> the scores on the `mild` test split of `after` trained on it;
    `arguments`: the flags the study ran with (`command_line`; `--seeds` alone where not given)."""
    quantile, ramp = fallback_setting()
    bounds = bounds or {}
    trainings = sum(len(results) for (preset, variant), results in runs.items() if f"{preset}/{variant}" not in reused)
    trainings += sum(len(results) for variant, results in mixture.items() if f"mixture/{variant}" not in reused)
    trainings += sum(len(results) for name, results in bounds.items() if f"{BOUNDS_KEY}/{name}" not in reused)
    # trainings on both presets' tiles run twice the demo's steps: say so, so the time per training reads right
    doubled = len(bounds.get("mild_and_strong", [])) if f"{BOUNDS_KEY}/mild_and_strong" not in reused else 0
    lines = [
        "# Refinement quality against both baselines",
        "",
        f"Script: `bench/study_quality.py {arguments or '--seeds ' + ' '.join(map(str, seeds))}`; "
        f"{trainings} demo trainings" + (f", {doubled} of them twice as long (36 training tiles)," if doubled else "")
        + " (`configs/demo.yaml`, tiny random-init "
        f"backbone, 18 training tiles, CPU, best step by validation loss) in {seconds / 60:.0f} min on {cpu_name()}; "
        f"load average {load}."
        + (f" Runs of {', '.join(f'`{key}`' for key in reused)} reused from an earlier study (`--reuse`: same code "
           "path and seeds)." if reused else ""),
        "",
        "Baselines: `opt_v1` (the Stage 1 image itself) and `colour fit` (least-squares 4x4 + bias fitted on the "
        "18 training tiles' valid pixels, `training.linear_fit`). Models: `before` = no spectral correction, "
        "unbounded output (two releases ago), `per_tile` = per-tile affine spectral correction started at the "
        "spectral fit, output clamped at 0, brightness augmentation (the previous release), `after` = one shared "
        "correction started at the spectral fit and the per-pixel spectral MLP, no brightness augmentation (the "
        "demo now); the starting point is a candidate for the best step; `fallback` = `after` built with "
        "`out_of_range_fallback` (`opt_v1` kept outside the training spectra by the model itself, in training and "
        "in evaluation; the rule below); `near_black` = `after` built with `near_black_fallback` (`opt_v1` kept at "
        f"its near-black pixels, `opt_v1` red + NIR up to {NEAR_BLACK} reflectance, blended up to twice that, in "
        "training and in evaluation); `near_black_ndvi` = `near_black` keeping only `opt_v1`'s NDVI at those pixels "
        "(`near_black_keep: ndvi`: the refined red + NIR divided as `opt_v1` divides its own, blue and green the "
        "refiner's); `redraw` = `after` trained with `redraw_degradation` (the training tiles' synthetic `opt_v1` "
        "drawn anew each epoch and at each warm-start step; the colour fit stays that of the dataset's own draw). "
        "`spectral fit`: where the default model's affine correction starts, the colour fit refined under the "
        "spectral loss (`training.linear_fit.fit_spectral_correction`, seed 0), clamped at 0 (`after` starts there "
        "with its spectral MLP fitted on top). "
        "Cells: mean over seeds (min-max). `ndvi_rmse_bright`: NDVI RMSE without near-black pixels (target "
        f"red + NIR < {NEAR_BLACK} reflectance), beside the design metric. `evi_rmse_in_range`: EVI RMSE without the "
        "test tiles brighter (mean `opt_v1` reflectance) than every training tile, where every correction "
        "extrapolates (`-`: a reused run that predates the column). "
        f"`<variant>, {FALLBACK}`: the same trained models' output with `opt_v1` blended back in at the pixels "
        "outside the training spectra (Mahalanobis distance of the pixel's log spectrum from the training pixels' "
        f"beyond the {100 * quantile:g}th percentile of their own distances, completely at {ramp:g} times it): the "
        "rule of a refiner built with `out_of_range_fallback` (`training.spectral_range`), applied to the output of "
        "these models, trained without it.",
        "",
    ]
    for (preset, variant_runs) in _by_preset(runs).items():
        variant_runs = with_fallback(variant_runs)
        for split, role in (("test", "held out from training and model selection"),
                            ("val", "held out from training; picks the best step")):
            # The baselines are the same in every run: take them from the newest (the last variant's).
            first = next(reversed(variant_runs.values()))[0][split]
            outside = (f"; {100 * first['out_of_range_fraction']:.1f} % are outside the training spectra"
                       if "out_of_range_fraction" in first else "")
            lines += [f"## {preset}: {split} split ({role})", "",
                      f"{first['n_tiles']} tiles; {100 * first['bright_fraction']:.0f} % of valid pixels are not "
                      f"near-black{outside}.", "",
                      "| output | " + " | ".join(COLUMNS) + " |", "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |"]
            for role_name, label in (("opt_v1", "opt_v1"), ("linear_fit", "colour fit (train)"),
                                     ("spectral_fit", "spectral fit (affine part of the default model's start)")):
                lines.append(f"| {label} | " + " | ".join(mean_range_cell([first[role_name].get(m)], _digits(m)) for m in COLUMNS)
                             + " |")
            for variant, results in variant_runs.items():
                cells = [mean_range_cell([r[split]["refined"].get(m) for r in results], _digits(m)) for m in COLUMNS]
                lines.append(f"| refined, {variant} | " + " | ".join(cells) + " |")
            for variant, results in variant_runs.items():
                ratios = [mean_range_cell(_ratios(results, split, m), 2) for m in COLUMNS if m not in ("psnr", "ssim")]
                lines.append(f"| refined / colour fit, {variant} | " + " | ".join(ratios) + " | | |")
            if split == "test":
                lines.append("")
                for variant, results in variant_runs.items():
                    met = sum(meets_goal(r["test"]["refined"], r["test"]["linear_fit"]) for r in results)
                    lines.append(f"- `{variant}`: {met} of {len(results)} seeds beat the colour fit by at least "
                                 f"{100 * GOAL_MARGIN:.0f} % on NDVI RMSE, EVI RMSE and SAM.")
            lines.append("")
    lines += bootstrap_section(runs, seeds)
    if mixture or bounds:
        lines += ["## Trained on `mixture`, scored on the `mild` test split", "",
                  "Each variant trained on `mild` and on `mixture` (`after` unless named)."
                  + (" Then `after` trained on the sets that bound what the mixture can reach on `mild` tiles "
                     f"(`--mixture_bounds`): `{MIXTURE_BOUNDS['mixture_mild_tiles']}` are the "
                     f"{_training_tiles(bounds, 'mixture_mild_tiles')} of 18 training tiles the mixture degrades with "
                     "`mild` (all a model that told the two presets apart perfectly would have for its `mild` "
                     f"tiles); `{MIXTURE_BOUNDS['mild_and_strong']}` is the mixture without that loss of `mild` tiles "
                     "(its validation split too)." if bounds else ""), "",
                  "| training degradation | " + " | ".join(COLUMNS) + " |",
                  "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |"]
        for label, results in mixture_rows(runs, mixture, bounds).items():
            lines.append(f"| {label} | " + " | ".join(
                mean_range_cell([r["test"]["refined"].get(m) for r in results], _digits(m)) for m in COLUMNS) + " |")
        lines.append("")
    lines += sensitivity_section(runs, mixture)
    return "\n".join(lines)


def bootstrap_section(runs: dict, seeds) -> list[str]:
    """Each run's test-split ratios with their paired tile-bootstrap interval, for the runs that recorded one (the
    runs of each (preset, variant) are those of `seeds`, in order)."""
    from training.bootstrap import interval_cell

    recorded = [(preset, variant, seed, r["test"]) for (preset, variant), results in runs.items()
                for seed, r in zip(seeds, results) if r["test"].get("bootstrap")]
    if not recorded:
        return []
    first = recorded[0][3]["bootstrap"]
    lines = ["## How much each run's verdict hangs on the 18 test tiles", "",
             f"Refined / baseline on the test split with the {100 * first['confidence']:g} % interval of a paired tile "
             f"bootstrap (`training.bootstrap`: the test tiles drawn with replacement {first['resamples']} times, "
             "the same tiles for the refined output and the baseline; what `stage2-evaluate` and the demo print). "
             "Cells: ratio (interval). The goal asks 0.90 or less against the colour fit.", "",
             "| run | seed | " + " | ".join(f"{m} / colour fit" for m in SPECTRAL) + " | "
             + " | ".join(f"{m} / opt_v1" for m in SPECTRAL) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in range(2 * len(SPECTRAL))) + " |"]
    for preset, variant, seed, test in recorded:
        cells = [interval_cell(test["bootstrap"][role][metric])
                 for role in ("linear_fit", "opt_v1") for metric in SPECTRAL]
        lines.append(f"| `{preset}/{variant}` | {seed} | " + " | ".join(cells) + " |")
    return lines + [""]


def _training_tiles(bounds: dict, name: str) -> str:
    """The number of training tiles of a `MIXTURE_BOUNDS` set, as its runs recorded it ('?' where they did not)."""
    counts = {run.get("train_tiles") for run in bounds.get(name, [])}
    return str(counts.pop()) if len(counts) == 1 and None not in counts else "?"


def mixture_rows(runs: dict, mixture: dict, bounds: dict | None = None) -> dict:
    """label -> runs of the mixture table: `mild` and `mixture` (the `after` variant, each followed by its scores with
    `opt_v1` kept out of range), then `mild, <variant>` and `mixture, <variant>` for each other variant trained on the
    mixture, then the `MIXTURE_BOUNDS` runs."""
    trained = {"mild": runs.get(("mild", "after"), []), "mixture": mixture.get("after", [])}
    rows = with_fallback({name: results for name, results in trained.items() if results})
    for variant, results in mixture.items():
        if variant != "after":
            if runs.get(("mild", variant)):
                rows[f"mild, {variant}"] = runs[("mild", variant)]
            rows[f"mixture, {variant}"] = results
    for name, label in MIXTURE_BOUNDS.items():
        if (bounds or {}).get(name):
            rows[label] = bounds[name]
    return rows


def sensitivity_section(runs: dict, mixture: dict) -> list[str]:
    """The test EVI RMSE of the `after` models with `opt_v1` kept out of range under each setting of `SENSITIVITY`
    (and the seeds that then meet the goal), where the runs recorded it."""
    # label -> (runs, whether to count the seeds meeting the goal: not for the mixture, judged by the mild model)
    groups = {f"`{preset}`": (results, True) for (preset, variant), results in runs.items() if variant == "after"}
    if mixture.get("after"):
        groups["`mixture` (scored on `mild`)"] = (mixture["after"], False)
    groups = {label: group for label, group in groups.items()
              if all("fallback_sensitivity" in r["test"] for r in group[0])}
    if not groups:
        return []
    own_quantile, own_ramp = fallback_setting()
    lines = [f"## How much the two numbers of `{FALLBACK}` matter (test split)", "",
             "Test EVI RMSE of the `after` models (mean over seeds) with `opt_v1` kept where a pixel's distance passes "
             "the given quantile of the training pixels' distances, completely at the given multiple of it; in "
             "brackets the seeds that then beat the colour fit by the goal's margin on all three metrics (not shown for "
             "the `mixture`, whose goal is the `mild` model's score). The study's own setting (training's default) is "
             f"{100 * own_quantile:g} % / {own_ramp:g}x.", "",
             "| trained on | without | " + " | ".join(f"{100 * q:g} % / {r:g}x" for q, r in SENSITIVITY) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in SENSITIVITY) + " |"]
    for label, (results, with_goal) in groups.items():
        def cell(scores_of) -> str:
            scores = [scores_of(r["test"]) for r in results]
            evi = sum(score["evi_rmse"] for score in scores) / len(scores)
            if not with_goal:
                return f"{evi:.4f}"
            met = sum(meets_goal(score, r["test"]["linear_fit"]) for score, r in zip(scores, results))
            return f"{evi:.4f} ({met} of {len(results)})"
        lines.append(f"| {label} | {cell(lambda test: test['refined'])} | " + " | ".join(
            cell(lambda test, key=f"{q}/{r}": test["fallback_sensitivity"][key]) for q, r in SENSITIVITY) + " |")
    lines.append("")
    return lines


def read_earlier(path: Path) -> dict:
    """An earlier study's record (`--reuse`), checked for what `reuse_runs`, `reuse_mixture` and `reuse_bounds` read:
    raises ValueError saying what is wrong."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"not readable ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error})") from None
    runs = earlier.get("runs") if isinstance(earlier, dict) else None
    if not isinstance(runs, dict) or not all(key.count("/") == 1 and isinstance(results, list)
                                             for key, results in runs.items()):
        raise ValueError("no 'runs' object of 'preset/variant' -> list of runs (not a record of this study)")
    if not isinstance(earlier.get("mixture_on_mild", {}), (dict, list)):  # a list: before the mixture had variants
        raise ValueError("'mixture_on_mild' is neither an object nor a list of runs")
    if not isinstance(earlier.get(BOUNDS_KEY, {}), dict):
        raise ValueError(f"{BOUNDS_KEY!r} is not an object")
    return earlier


def reuse_runs(earlier: dict, runs: dict) -> list[str]:
    """Adds to `runs` the runs of `earlier` (an earlier study's record, `read_earlier`) for (preset, variant) pairs not
    trained now, in the order of VARIANT_FLAGS; returns the keys it took."""
    taken = []
    for key, results in earlier["runs"].items():
        preset, variant = key.split("/")
        if variant in VARIANT_FLAGS and (preset, variant) not in runs:
            runs[(preset, variant)] = results
            taken.append(key)
    order = {variant: index for index, variant in enumerate(VARIANT_FLAGS)}
    ordered = sorted(runs.items(), key=lambda item: (item[0][0], order[item[0][1]]))
    runs.clear()
    runs.update(ordered)
    return taken


def reuse_mixture(earlier: dict, mixture: dict) -> list[str]:
    """Adds to `mixture` the `mixture` runs of `earlier` (an earlier study's record) of variants not trained now;
    returns the keys (`mixture/<variant>`) it took. (A study before the mixture had variants recorded a list of `after`
    runs.)"""
    earlier = earlier.get("mixture_on_mild", {})
    earlier = {"after": earlier} if isinstance(earlier, list) else earlier
    taken = []
    for variant, results in earlier.items():
        if variant in VARIANT_FLAGS and variant not in mixture and results:
            mixture[variant] = results
            taken.append(f"mixture/{variant}")
    order = {variant: index for index, variant in enumerate(VARIANT_FLAGS)}
    ordered = sorted(mixture.items(), key=lambda item: order[item[0]])
    mixture.clear()
    mixture.update(ordered)
    return taken


def reuse_bounds(earlier: dict, bounds: dict) -> list[str]:
    """Adds to `bounds` the `MIXTURE_BOUNDS` runs of `earlier` (an earlier study's record) not trained now; returns
    the keys (`<BOUNDS_KEY>/<name>`) it took."""
    earlier = earlier.get(BOUNDS_KEY, {})
    taken = []
    for name in MIXTURE_BOUNDS:
        if earlier.get(name) and name not in bounds:
            bounds[name] = earlier[name]
            taken.append(f"{BOUNDS_KEY}/{name}")
    ordered = sorted(bounds.items(), key=lambda item: list(MIXTURE_BOUNDS).index(item[0]))
    bounds.clear()
    bounds.update(ordered)
    return taken


def _by_preset(runs: dict) -> dict:
    grouped: dict = {}
    for (preset, variant), results in runs.items():
        grouped.setdefault(preset, {})[variant] = results
    return grouped


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, checked before any work: exits 2 with one line on `--jobs` below 1, an `--output` that cannot be
    written or a `--reuse` record that cannot be read (`args.earlier`: that record, or None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="*", default=["mild", "strong"], choices=TRAINED_PRESETS,
                        help="the presets trained (none: only the mixture, with the others reused)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANT_FLAGS), choices=tuple(VARIANT_FLAGS))
    parser.add_argument("--mixture", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--mixture_variants", nargs="+", default=["after"], choices=tuple(VARIANT_FLAGS),
                        help="the variants trained on the mixture")
    parser.add_argument("--mixture_bounds", action=argparse.BooleanOptionalAction, default=False,
                        help="also train `after` on the MIXTURE_BOUNDS training sets")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--reuse", help="an earlier study's JSON: its runs of variants not trained now are reported "
                                        "beside the new ones (for variants whose code and seeds did not change)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "quality.md"))
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, args.output)
    args.earlier = None
    if args.reuse:
        try:
            args.earlier = read_earlier(Path(args.reuse))
        except ValueError as error:
            parser.error(f"--reuse {args.reuse}: {error}")
        recorded = args.earlier.get("seeds")
        if recorded is not None and recorded != args.seeds:  # the record has one list of seeds for all its runs
            parser.error(f"--reuse {args.reuse}: recorded with --seeds {' '.join(map(str, recorded))}, not "
                         f"{' '.join(map(str, args.seeds))}")
    elif not planned_jobs(args):  # it would replace the record at --output with an empty one
        parser.error("nothing to train (no --presets, --no-mixture, no --mixture_bounds) and nothing to --reuse")
    return args


def command_line(args: argparse.Namespace) -> str:
    """The flags of `args` that decide what the study trains and reports (all but `--jobs` and `--output`)."""
    flags = [f"--presets {' '.join(args.presets)}".rstrip(), f"--seeds {' '.join(map(str, args.seeds))}",
             f"--variants {' '.join(args.variants)}"]
    flags += [f"--mixture_variants {' '.join(args.mixture_variants)}"] if args.mixture else ["--no-mixture"]
    flags += ["--mixture_bounds"] if args.mixture_bounds else []
    return " ".join(flags + ([f"--reuse {args.reuse}"] if args.reuse else []))


def planned_jobs(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """(preset, seed, variant) of every training the study runs with `args`."""
    jobs = [(preset, seed, variant) for preset in args.presets for variant in args.variants for seed in args.seeds]
    if args.mixture:
        jobs += [("mixture", seed, variant) for variant in args.mixture_variants for seed in args.seeds]
    if args.mixture_bounds:
        jobs += [(name, seed, "after") for name in MIXTURE_BOUNDS for seed in args.seeds]
    return jobs


def main(argv=None) -> int:
    args = parse_args(argv)
    load_start = load_average()
    start = time.perf_counter()
    jobs = planned_jobs(args)
    needed = (set(args.presets) | ({"mild", "mixture"} if args.mixture else set())
              | ({"mild", "strong"} if args.mixture_bounds else set()))
    with tempfile.TemporaryDirectory(prefix="stage2-quality-") as tmp:
        workdir = Path(tmp)
        datasets = build_datasets(sorted(needed), workdir)
        if args.mixture_bounds:
            datasets.update(build_mixture_bounds(datasets, workdir))
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            trained = list(pool.map(lambda job: train(*job, workdir), jobs))
        runs: dict = {}
        mixture: dict = {}
        bounds: dict = {}
        for (preset, seed, variant), model_dir in zip(jobs, trained):
            on_mild = preset == "mixture" or preset in MIXTURE_BOUNDS
            scored = (score(model_dir, datasets["mild"], trained_on=datasets[preset]) if on_mild
                      else score(model_dir, datasets[preset]))
            print(f"{preset} {variant} seed {seed}: test refined/fit " + ", ".join(
                f"{m} {scored['test']['refined'][m] / scored['test']['linear_fit'][m]:.3f}" for m in SPECTRAL),
                flush=True)
            if preset == "mixture":
                mixture.setdefault(variant, []).append(scored)
            elif preset in MIXTURE_BOUNDS:
                scored["train_tiles"] = training_tiles(datasets[preset])
                bounds.setdefault(preset, []).append(scored)
            else:
                runs.setdefault((preset, variant), []).append(scored)
    reused = []
    if args.earlier is not None:
        reused = (reuse_runs(args.earlier, runs) + reuse_mixture(args.earlier, mixture)
                  + reuse_bounds(args.earlier, bounds))
    text = render(runs, mixture, args.seeds, time.perf_counter() - start, load_span(load_start), reused, bounds,
                  command_line(args))
    record = {"runs": {f"{preset}/{variant}": results for (preset, variant), results in runs.items()},
              "mixture_on_mild": mixture, BOUNDS_KEY: bounds, "seeds": args.seeds, "near_black": NEAR_BLACK}
    record_study(args.output, text, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
