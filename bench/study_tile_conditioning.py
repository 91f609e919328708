"""Can the colour correction learn from the tile, or only from the pixel? Measured on the bundled sample.

    .venv/bin/python bench/study_tile_conditioning.py [--datasets mild strong proxy mixture] [--seeds 0 1 2]
                                                      [--steps 300] [--jobs 2] [--output bench/results/tile_conditioning.md]

The refiner's colour parts that learn from pixels (the affine spectral fit and the per-pixel spectral MLP) beat the
colour fit on held-out tiles; its parts that learn from tiles (the per-tile correction, the head on a random tiny
backbone) overfit the 18 training tiles (`bench/results/quality.md`). Two goals of the quality issue need a correction
that depends on the tile: a `mixture`-trained model that still suits `mild` tiles, and EVI on a generator whose colour
error is drawn per tile (`bench/stage1_proxy.py`). This study asks whether cheaper tile-level inputs than backbone
features can be learned from 18 tiles. Each correction below is fitted exactly as the refiner's warm start fits its
spectral MLP (`training.linear_fit.fit_spectral_correction(..., spectral_mlp=...)`: the affine spectral fit, then
`--steps` Adam steps of the spectral loss on 6 tiles each, one thread), on top of the same affine fit:

- `pixel`: the refiner's own `Stage2SpectralMLP` (each pixel's log spectrum alone; the default model's start);
- `pixel + tile statistics`: the same MLP also fed its tile's 5 / 50 / 95 % quantiles of each band's log spectrum
  (12 numbers per tile);
- `tile affine + pixel`: a per-tile 4x4 + bias change of the affine correction, a linear map (zero at the start) of
  those 12 statistics, then the pixel MLP;
- `3x3 neighbourhood`: the MLP's first layer sees each pixel's 3 x 3 neighbourhood (noise and blur are local).

Datasets (`bench/study_quality.py`'s): `mild`, `strong` (degradation presets), `proxy` (Stage 1 outputs of
`bench/stage1_proxy.py`) and `mixture` (each training tile `mild` or `strong`; scored on the `mild` test tiles, as the
issue asks). Scores on the held-out test split: NDVI RMSE, EVI RMSE and SAM (`training.metrics`) beside `opt_v1`, the
least-squares colour fit of the same training tiles and the affine spectral fit. Writes the tables to `--output` and
every number to the same name with `.json`.
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
from bench.study_quality import build_datasets  # noqa: E402
from bench.study_rotation import goal_text, meets_preset_goal  # noqa: E402
from modeling_stage2.modeling_stage2 import log_spectra  # noqa: E402

DATASETS = ("mild", "strong", "proxy", "mixture")
SCORED_ON = {"mixture": "mild"}  # the dataset whose test tiles a training set is scored on, where not its own
QUANTILES = (0.05, 0.5, 0.95)
VARIANTS = ("pixel", "pixel + tile statistics", "tile affine + pixel", "3x3 neighbourhood")
BASELINES = ("opt_v1", "colour fit", "spectral fit")


# ------------------------------------------------------------------------------------------------ corrections
def study_refiner_config():
    """The tiny refiner with the spectral MLP a training run builds (`Stage2TrainingArguments`' default width)."""
    from modeling_stage2 import Stage2RefinerConfig
    from training.args import Stage2TrainingArguments

    width = Stage2TrainingArguments.__dataclass_fields__["spectral_mlp_hidden_size"].default
    return Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", spectral_mlp_hidden_size=width)


def pixel_mlp() -> nn.Module:
    """The refiner's spectral MLP, initialised as a new refiner initialises it."""
    from modeling_stage2 import Stage2RefinerModel

    return Stage2RefinerModel(study_refiner_config()).spectral_mlp


def tile_statistics(log_image: torch.Tensor) -> torch.Tensor:
    """(B, bands, H, W) log spectra -> (B, bands * 3): each band's `QUANTILES` over the tile (no gradient)."""
    flat = log_image.detach().flatten(2)
    quantiles = torch.quantile(flat, torch.tensor(QUANTILES, dtype=flat.dtype), dim=2)  # (3, B, bands)
    return quantiles.permute(1, 2, 0).flatten(1)


class ConditionedSpectralMLP(nn.Module):
    """The spectral MLP's shape (two hidden layers of GELUs as wide as the refiner's, hidden weights std
    1/sqrt(fan_in), the output at zero, so it starts as no correction) with a tile-level or neighbourhood input added,
    per `variant`. 1x1 convolutions stand for the MLP's linear layers, so that the 3x3 one fits beside them."""

    def __init__(self, variant: str):
        super().__init__()
        config = study_refiner_config()
        bands, hidden = len(config.bands), config.spectral_mlp_hidden_size
        self.variant, self.log_offset = variant, config.spectral_mlp_log_offset
        statistics_width = bands * len(QUANTILES)
        if variant == "pixel + tile statistics":
            self.first = nn.Conv2d(bands + statistics_width, hidden, 1)
        elif variant == "3x3 neighbourhood":
            self.first = nn.Conv2d(bands, hidden, 3, padding=1, padding_mode="replicate")
        elif variant == "tile affine + pixel":
            self.first = nn.Conv2d(bands, hidden, 1)
            self.tile_affine = nn.Linear(statistics_width, bands * bands + bands)
            nn.init.zeros_(self.tile_affine.weight)
            nn.init.zeros_(self.tile_affine.bias)
        else:
            raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS[1:]}")
        self.second, self.output = mlp_layers_after(self.first, hidden, bands)

    def forward(self, spectra: torch.Tensor) -> torch.Tensor:
        if self.variant == "tile affine + pixel":
            spectra = apply_affine_change(spectra, self.tile_affine(tile_statistics(log_spectra(spectra,
                                                                                                 self.log_offset))))
        features = log_spectra(spectra, self.log_offset)
        if self.variant == "pixel + tile statistics":
            features = with_tile_inputs(features, tile_statistics(features))
        hidden = nn.functional.gelu(self.second(nn.functional.gelu(self.first(features))))
        return spectra + self.output(hidden)


def mlp_layers_after(first: nn.Conv2d, hidden: int, bands: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    """The second hidden layer and the output layer of a conditioned spectral MLP whose first layer is `first`, with
    the spectral MLP's initialisation: hidden weights std 1/sqrt(fan_in) (`first` too, here), output at zero."""
    second, output = nn.Conv2d(hidden, hidden, 1), nn.Conv2d(hidden, bands, 1)
    for layer in (first, second):
        nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)
        nn.init.zeros_(layer.bias)
    nn.init.zeros_(output.weight)
    nn.init.zeros_(output.bias)
    return second, output


def apply_affine_change(spectra: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """`spectra` (B, bands, H, W) plus the per-tile 4x4 + bias change `change` (B, bands * bands + bands) of it."""
    bands = spectra.shape[1]
    matrix, bias = change[:, : bands * bands].view(-1, bands, bands), change[:, bands * bands:]
    return spectra + torch.einsum("bij,bjhw->bihw", matrix, spectra) + bias[:, :, None, None]


def with_tile_inputs(features: torch.Tensor, tile: torch.Tensor) -> torch.Tensor:
    """Per-pixel `features` (B, C, H, W) with per-tile inputs `tile` (B, K) appended to every pixel."""
    return torch.cat([features, tile[:, :, None, None].expand(-1, -1, *features.shape[2:])], dim=1)


def build_correction(variant: str) -> nn.Module:
    return pixel_mlp() if variant == "pixel" else ConditionedSpectralMLP(variant)


# ------------------------------------------------------------------------------------------------ fitting
def datasets_to_build(names) -> list[str]:
    """The datasets `names` are fitted on, and those they are scored on."""
    return sorted(set(names) | {SCORED_ON[name] for name in names if name in SCORED_ON})


def held_out_rows(dataset_dir: Path):
    """(opt_v1, target, valid_mask) of the dataset's test split, float32."""
    from datasets import load_from_disk

    rows = load_from_disk(str(dataset_dir))["test"].with_format("torch")[:]
    return rows["opt_v1"].float(), rows["target"].float(), rows["valid_mask"]


def spectral_scores(output: torch.Tensor, rows) -> dict:
    """NDVI RMSE, EVI RMSE and SAM of `output` against the target of `rows` (`held_out_rows`)."""
    from training.metrics import evaluate_pair

    opt_v1, target, valid = rows
    scores = evaluate_pair(output.float(), target, opt_v1, valid)["refined"]
    return {metric: scores[metric] for metric in SPECTRAL}


def fitted_scores(training_tiles, rows, variant: str, seed: int, steps: int) -> dict:
    """Scores on `rows` (`held_out_rows`) of `variant` fitted on the dataset `training_tiles` with `seed`, on top of
    the affine spectral fit, as the refiner's warm start fits its spectral MLP; clamped at 0 as the refiner's output."""
    from training.linear_fit import fit_spectral_correction

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    correction = build_correction(variant)
    affine = fit_spectral_correction(training_tiles, steps=steps, seed=seed, spectral_mlp=correction)
    with torch.no_grad():
        return spectral_scores(correction(affine.apply(rows[0])).clamp(min=0.0), rows)


def fit_and_score(train_dir: Path, test_dir: Path, variant: str, seed: int, steps: int) -> dict:
    """Test-split scores of `variant` fitted on `train_dir`'s training split with `seed`."""
    from datasets import load_from_disk

    return fitted_scores(load_from_disk(str(train_dir))["train"], held_out_rows(test_dir), variant, seed, steps)


def baselines(train_dir: Path, test_dir: Path, steps: int) -> dict:
    """Test-split scores of `opt_v1`, the colour fit and the affine spectral fit (seed 0) of `train_dir`."""
    from datasets import load_from_disk

    from training.linear_fit import LinearColorFit, fit_spectral_correction

    train_split = load_from_disk(str(train_dir))["train"]
    rows = held_out_rows(test_dir)
    outputs = {"opt_v1": rows[0], "colour fit": LinearColorFit.from_dataset(train_split).apply(rows[0]),
               "spectral fit": fit_spectral_correction(train_split, steps=steps).apply(rows[0]).clamp(min=0.0)}
    return {name: spectral_scores(output, rows) for name, output in outputs.items()}


# ------------------------------------------------------------------------------------------------ reporting
def seeds_meeting_goal(fitted: list[dict], baselines: dict, dataset: str) -> int:
    """Seeds that meet the goal of the dataset's kind (`bench.study_rotation.meets_preset_goal`: for the proxy, at most
    the colour fit's and at most 0.70 of `opt_v1`'s), against the dataset's `baselines`."""
    return sum(meets_preset_goal(dataset, {"refined": run, "linear_fit": baselines["colour fit"],
                                           "opt_v1": baselines["opt_v1"]}) for run in fitted)


def render(record: dict, seconds: float, load: str) -> str:
    seeds = record["seeds"]
    lines = [
        "# Tile-level conditioning of the colour correction",
        "",
        f"Script: `bench/study_tile_conditioning.py --seeds {' '.join(map(str, seeds))} --steps {record['steps']}`; "
        f"{sum(len(v) for d in record['datasets'].values() for v in d['variants'].values())} fits on one thread "
        f"each in {seconds / 60:.0f} min on {cpu_name()}; load average {load}.",
        "",
        "Each correction is fitted on the 18 training tiles on top of the affine spectral fit, as the refiner's warm "
        "start fits its spectral MLP, and scored on the 18 held-out test tiles (see the script's docstring for the "
        "variants). Cells: mean over seeds (min-max); ratios are to the colour fit (least squares, 4x4 + bias) of "
        "the same training tiles; `seeds meeting the goal` counts the goal of the dataset's kind (under each title).",
    ]
    for name, data in record["datasets"].items():
        scored_on = SCORED_ON.get(name, name)
        lines += ["", f"## trained on `{name}`, scored on the `{scored_on}` test split", "",
                  f"Goal: {goal_text(name)}, on all three.", "",
                  "| correction | ndvi_rmse | evi_rmse | sam | / colour fit: ndvi | evi | sam | seeds meeting the goal |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        fit = data["baselines"]["colour fit"]
        for baseline in BASELINES:
            scores = data["baselines"][baseline]
            lines.append(f"| {baseline} | " + " | ".join(f"{scores[m]:.4f}" for m in SPECTRAL) + " | "
                         + " | ".join(f"{scores[m] / fit[m]:.2f}" for m in SPECTRAL) + " | |")
        for variant, runs in data["variants"].items():
            lines.append(f"| {variant} | " + " | ".join(mean_range_cell([run[m] for run in runs], 4) for m in SPECTRAL) + " | "
                         + " | ".join(mean_range_cell([run[m] / fit[m] for run in runs], 2) for m in SPECTRAL)
                         + f" | {seeds_meeting_goal(runs, data['baselines'], name)} of {len(runs)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of each fit (the warm start's 300)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "tile_conditioning.md"))
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, args.output)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    load_start, start = load_average(), time.perf_counter()
    needed = datasets_to_build(args.datasets)
    with tempfile.TemporaryDirectory(prefix="stage2-tile-conditioning-") as tmp:
        folders = build_datasets(needed, Path(tmp))
        pairs = {name: (folders[name], folders[SCORED_ON.get(name, name)]) for name in args.datasets}
        jobs = [(name, variant, seed) for name in args.datasets for variant in args.variants for seed in args.seeds]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            fitted = [pool.submit(fit_and_score, *pairs[name], variant, seed, args.steps)
                      for name, variant, seed in jobs]
            scored = {name: pool.submit(baselines, *pairs[name], args.steps) for name in args.datasets}
            record = {"seeds": args.seeds, "steps": args.steps, "quantiles": list(QUANTILES), "datasets": {
                name: {"scored_on": SCORED_ON.get(name, name), "baselines": scored[name].result(), "variants": {}}
                for name in args.datasets}}
            for (name, variant, _), future in zip(jobs, fitted):
                record["datasets"][name]["variants"].setdefault(variant, []).append(future.result())
    record_study(args.output, render(record, time.perf_counter() - start, load_span(load_start)), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
