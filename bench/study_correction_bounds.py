"""How far could a per-tile colour correction go, and can it be found without the target? On the bundled sample.

    .venv/bin/python bench/study_correction_bounds.py [--datasets mild strong proxy mixture] [--steps 300]
                                                      [--output bench/results/correction_bounds.md]

The refiner's global colour parts (the affine spectral fit, the per-pixel spectral MLP) beat the colour fit on the
held-out tiles; what is left of the goal (`mild` EVI on every seed, `mixture`, EVI on `proxy`) needs a correction
that depends on the tile. This study measures, without training a refiner, on the 18 held-out test tiles:

- the bounds: `global affine (oracle)`, the least-squares 4x4 + bias of all test tiles together fitted on their own
  targets: the best that one correction for every tile could reach, however it was found; `per-tile gain (oracle)` and
  `per-tile affine (oracle)`, the least-squares per-band gain and 4x4 + bias of each test tile fitted on that tile's
  own target: what a perfect tile-level colour correction would reach;
- two blind tile-level corrections fitted on the training tiles only, as a refiner would have to:
  `grey world`: each band's gain is `exp(lambda_b (f_b - mean f_b) + r_b)` on top of the colour fit, `f_b` the tile's
  mean log reflectance, (lambda, r) least squares over the training tiles against their own best log gain (how much
  of a tile's colour cast its mean colour tells); `kernel colour fit`: the least-squares 4x4 + bias of the training
  tiles weighted by `exp(-d^2 / 2 h^2)`, `d` the distance between this tile's and a training tile's 5 / 50 / 95 %
  log-reflectance quantiles (standardised over the training tiles), the bandwidth `h` (`BANDWIDTHS`, inf = the
  colour fit) chosen by leave-one-tile-out spectral loss on the training tiles (a correction from similar tiles);
  `spectral fit + kernel change`: the spectral fit plus the kernel colour fit's change from the colour fit (its
  4x4 + bias minus the colour fit's), the kernel's tile dependence on the refiner's starting point;
- `evi_rmse, in range`: EVI RMSE without the test tiles brighter (mean `opt_v1` reflectance) than every training
  tile, where each correction extrapolates and where EVI's denominator (NIR + 6 R - 7.5 B + 1) nears 0 on cloud and
  snow.

Datasets as in `bench/study_tile_conditioning.py` (`mixture`: fitted on its training tiles, scored on the `mild` test
tiles). The references beside them: `opt_v1`, the colour fit (as every study and `stage2-evaluate` score it: the
least-squares output as it comes, negative reflectance included), the same clamped at 0 (as the refiner's output and
every other row here are) and the affine spectral fit (seed 0, `--steps`).
Writes the tables to `--output` and every number to the same name with `.json`.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (  # noqa: E402
    SPECTRAL, check_study_arguments, cpu_name, in_range_evi_rmse, in_range_tiles, load_average, load_span,
    mean_range_cell, record_study,
)
from bench.study_quality import build_datasets  # noqa: E402
from bench.study_tile_conditioning import (  # noqa: E402
    DATASETS, SCORED_ON, datasets_to_build, held_out_rows, spectral_scores, study_refiner_config, tile_statistics,
)
from modeling_stage2.modeling_stage2 import log_spectra  # noqa: E402
from training.linear_fit import ColorFitResult, LinearColorFit  # noqa: E402

BANDWIDTHS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
REFERENCES = ("opt_v1", "colour fit", "colour fit, clamped at 0", "spectral fit")
BOUNDS = ("global affine (oracle)", "per-tile gain (oracle)", "per-tile affine (oracle)")
BLIND = ("grey world", "kernel colour fit", "spectral fit + kernel change")
COLUMNS = (*SPECTRAL, "evi_rmse_in_range")


# ------------------------------------------------------------------------------------------------ per-tile fits
def tile_fits(opt_v1: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> list[LinearColorFit]:
    """One least-squares accumulator per tile (its valid pixels' normal equations)."""
    fits = []
    for index in range(opt_v1.shape[0]):
        fit = LinearColorFit(opt_v1.shape[1])
        fit.update(opt_v1[index : index + 1], target[index : index + 1], valid[index : index + 1])
        fits.append(fit)
    return fits


def weighted_fit(fits: list[LinearColorFit], weights: torch.Tensor):
    """The colour fit of the tiles behind `fits`, tile i's pixels weighted by `weights[i]`."""
    combined = LinearColorFit(fits[0].num_bands)
    for fit, weight in zip(fits, weights.tolist()):
        combined.gram += weight * fit.gram
        combined.cross += weight * fit.cross
        combined.pixels += fit.pixels if weight > 0 else 0
        combined.tiles += int(weight > 0)
    return combined.solve()


def oracle_global_affine(opt_v1, target, valid) -> torch.Tensor:
    """Every tile corrected by the one 4x4 + bias least-squares fit of all the tiles' own targets."""
    fit = LinearColorFit(opt_v1.shape[1])
    fit.update(opt_v1, target, valid)
    return fit.solve().apply(opt_v1)


def oracle_affine(opt_v1, target, valid) -> torch.Tensor:
    """Each tile corrected by the 4x4 + bias least-squares fit of its own target."""
    return torch.cat([fit.solve().apply(opt_v1[i : i + 1]) for i, fit in enumerate(tile_fits(opt_v1, target, valid))])


def oracle_gain(opt_v1, target, valid) -> torch.Tensor:
    """Each tile's bands scaled by the least-squares gain against its own target (no offset, no mixing)."""
    mask = valid[:, None].to(opt_v1.dtype)
    gain = (mask * opt_v1 * target).sum(dim=(2, 3)) / (mask * opt_v1 * opt_v1).sum(dim=(2, 3)).clamp(min=1e-12)
    return opt_v1 * gain[:, :, None, None]


def mean_log(image: torch.Tensor, valid: torch.Tensor, log_offset: float) -> torch.Tensor:
    """(B, bands) mean log reflectance over each tile's valid pixels."""
    mask = valid[:, None].to(image.dtype)
    return (mask * log_spectra(image, log_offset)).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp(min=1)


class GreyWorld:
    """Per-band log gain predicted from the tile's mean log reflectance: `lambda_b (f_b - mean f_b) + r_b`, fitted
    on the training tiles against the mean log ratio target / input of each (after `base`)."""

    def __init__(self, base, opt_v1, target, valid, log_offset: float):
        self.base, self.log_offset = base, log_offset
        corrected = base(opt_v1)
        features = mean_log(corrected, valid, log_offset)
        best_log_gain = mean_log(target, valid, log_offset) - features
        self.centre, centred = features.mean(dim=0), features - features.mean(dim=0)
        self.offset = best_log_gain.mean(dim=0)
        self.slope = (centred * (best_log_gain - self.offset)).sum(dim=0) / (centred * centred).sum(dim=0)

    def __call__(self, opt_v1, valid) -> torch.Tensor:
        corrected = self.base(opt_v1).clamp(min=0.0)
        log_gain = self.slope * (mean_log(corrected, valid, self.log_offset) - self.centre) + self.offset
        return (corrected + self.log_offset) * log_gain.exp()[:, :, None, None] - self.log_offset


class KernelColourFit:
    """The colour fit of the training tiles weighted by how close each is to the tile at hand (see the docstring)."""

    def __init__(self, opt_v1, target, valid, log_offset: float, loss=None):
        from training.losses import SpectralLoss

        self.log_offset = log_offset
        self.fits = tile_fits(opt_v1, target, valid)
        descriptors = tile_statistics(log_spectra(opt_v1, log_offset))
        self.mean, self.std = descriptors.mean(dim=0), descriptors.std(dim=0).clamp(min=1e-6)
        self.descriptors = (descriptors - self.mean) / self.std
        loss = loss if loss is not None else SpectralLoss()
        self.cv_loss = {h: float(loss(self._apply(opt_v1, self.descriptors, h, leave_out=True).float(),
                                      target.float(), valid)[0]) for h in BANDWIDTHS}
        self.bandwidth = min(BANDWIDTHS, key=lambda h: (self.cv_loss[h], -h))  # ties: the smoother fit

    def weights(self, descriptor: torch.Tensor, bandwidth: float) -> torch.Tensor:
        if math.isinf(bandwidth):
            return torch.ones(len(self.descriptors), dtype=torch.float64)
        squared = ((self.descriptors - descriptor) ** 2).sum(dim=1).double()
        return torch.exp(-(squared - squared.min()) / (2 * bandwidth**2))  # the nearest tile weighs 1

    def _apply(self, opt_v1, descriptors, bandwidth: float, leave_out: bool = False) -> torch.Tensor:
        corrected = []
        for index, descriptor in enumerate(descriptors):
            weights = self.weights(descriptor, bandwidth)
            if leave_out:
                weights[index] = 0.0
            corrected.append(weighted_fit(self.fits, weights).apply(opt_v1[index : index + 1]))
        return torch.cat(corrected)

    def tile_fits_for(self, opt_v1) -> list:
        """The colour fit (`ColorFitResult`) each tile of `opt_v1` gets."""
        descriptors = (tile_statistics(log_spectra(opt_v1, self.log_offset)) - self.mean) / self.std
        return [weighted_fit(self.fits, self.weights(descriptor, self.bandwidth)) for descriptor in descriptors]

    def __call__(self, opt_v1) -> torch.Tensor:
        return torch.cat([fit.apply(opt_v1[i : i + 1]) for i, fit in enumerate(self.tile_fits_for(opt_v1))])

    def change_on(self, start, colour_fit, opt_v1) -> torch.Tensor:
        """`opt_v1` through `start` (a `ColorFitResult`) plus each tile's kernel fit minus `colour_fit`."""
        corrected = []
        for index, fit in enumerate(self.tile_fits_for(opt_v1)):
            changed = ColorFitResult(matrix=start.matrix + fit.matrix - colour_fit.matrix,
                                     bias=start.bias + fit.bias - colour_fit.bias, pixels=fit.pixels, tiles=fit.tiles)
            corrected.append(changed.apply(opt_v1[index : index + 1]))
        return torch.cat(corrected)


# ------------------------------------------------------------------------------------------------ scoring
def score(output: torch.Tensor, rows, in_range: torch.Tensor) -> dict:
    opt_v1, target, valid = rows
    return {**spectral_scores(output, rows),
            "evi_rmse_in_range": in_range_evi_rmse(output.float(), target, opt_v1, valid, in_range)}


def study_dataset(train_dir: Path, test_dir: Path, steps: int) -> dict:
    """Every row's test-split scores for one training set, plus what the blind fits chose."""
    from datasets import load_from_disk

    from training.linear_fit import fit_spectral_correction

    torch.set_num_threads(1)
    log_offset = study_refiner_config().spectral_mlp_log_offset
    train_split = load_from_disk(str(train_dir))["train"]
    train = train_split.with_format("torch")[:]
    train_rows = train["opt_v1"].float(), train["target"].float(), train["valid_mask"]
    rows = held_out_rows(test_dir)
    opt_v1, target, valid = rows
    in_range = in_range_tiles(opt_v1, valid, train_rows[0], train_rows[2])
    colour_fit = LinearColorFit.from_dataset(train_split)
    grey_world = GreyWorld(colour_fit.apply, *train_rows, log_offset)
    kernel = KernelColourFit(*train_rows, log_offset)
    spectral_fit = fit_spectral_correction(train_split, steps=steps)
    # The references as the other studies score them; every correction clamped at 0, as the refiner's output is.
    corrections = {
        "colour fit, clamped at 0": colour_fit.apply(opt_v1),
        "spectral fit": spectral_fit.apply(opt_v1),
        "global affine (oracle)": oracle_global_affine(opt_v1, target, valid),
        "per-tile gain (oracle)": oracle_gain(opt_v1, target, valid),
        "per-tile affine (oracle)": oracle_affine(opt_v1, target, valid),
        "grey world": grey_world(opt_v1, valid),
        "kernel colour fit": kernel(opt_v1),
        "spectral fit + kernel change": kernel.change_on(spectral_fit, colour_fit, opt_v1),
    }
    outputs = {"opt_v1": opt_v1, "colour fit": colour_fit.apply(opt_v1),
               **{name: output.clamp(min=0.0) for name, output in corrections.items()}}
    return {"tiles": int(len(opt_v1)), "out_of_range_tiles": int((~in_range).sum()),
            "kernel_bandwidth": f"{kernel.bandwidth:g}",
            "kernel_cv_loss": {f"{h:g}": v for h, v in kernel.cv_loss.items()},
            "grey_world_slope": grey_world.slope.tolist(),
            "rows": {name: score(output, rows, in_range) for name, output in outputs.items()}}


# ------------------------------------------------------------------------------------------------ reporting
def render(record: dict, seconds: float, load: str) -> str:
    lines = [
        "# How far a per-tile colour correction could go",
        "",
        f"Script: `bench/study_correction_bounds.py --steps {record['steps']}`; {len(record['datasets'])} training "
        f"sets on one thread in {seconds / 60:.0f} min on {cpu_name()}; load average {load}.",
        "",
        "Scores on the 18 held-out test tiles (see the script's docstring for each row). `oracle` rows are fitted on "
        "the test tiles' own targets (the global one on all of them together, the per-tile ones on each tile): bounds, "
        "not methods. `evi_rmse_in_range` leaves out the test tiles brighter "
        "than every training tile. Ratios are to the colour fit; the goal is 0.90 or less on NDVI RMSE, EVI RMSE and "
        "SAM.",
    ]
    for name, data in record["datasets"].items():
        fit = data["rows"]["colour fit"]
        lines += ["", f"## fitted on `{name}`, scored on the `{SCORED_ON.get(name, name)}` test split", "",
                  f"{data['out_of_range_tiles']} of {data['tiles']} test tiles are brighter than every training "
                  f"tile. Kernel bandwidth chosen: {data['kernel_bandwidth']}; grey-world slopes "
                  + ", ".join(f"{v:.2f}" for v in data["grey_world_slope"]) + " (B02, B03, B04, B08).",
                  "", "| correction | " + " | ".join(COLUMNS) + " | / colour fit: ndvi | evi | sam |",
                  "| --- | " + " | ".join("---:" for _ in COLUMNS) + " | ---: | ---: | ---: |"]
        for row in (*REFERENCES, *BOUNDS, *BLIND):
            scores = data["rows"][row]
            lines.append(f"| {row} | " + " | ".join(mean_range_cell([scores[m]], 4) for m in COLUMNS) + " | "
                         + " | ".join(f"{scores[m] / fit[m]:.2f}" for m in SPECTRAL) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of the spectral fit (the warm start's 300)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "correction_bounds.md"))
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, args.output)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    load_start, start = load_average(), time.perf_counter()
    needed = datasets_to_build(args.datasets)
    with tempfile.TemporaryDirectory(prefix="stage2-correction-bounds-") as tmp:
        folders = build_datasets(needed, Path(tmp))
        record = {"steps": args.steps, "bandwidths": [f"{h:g}" for h in BANDWIDTHS], "datasets": {
            name: {"scored_on": SCORED_ON.get(name, name),
                   **study_dataset(folders[name], folders[SCORED_ON.get(name, name)], args.steps)}
            for name in args.datasets}}
    record_study(args.output, render(record, time.perf_counter() - start, load_span(load_start)), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
