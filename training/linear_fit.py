"""The least-squares colour fit: the baseline every refiner must beat, and the refiner's warm start.

A remote-sensing engineer's first correction of a biased image is a per-band affine colour transform,
`fit(x) = M x + b` with `M` a (bands x bands) matrix and `b` a bias (20 numbers for 4 bands), fitted by least
squares on the valid pixels of the training tiles (`opt_v1 -> target`). `LinearColorFit` accumulates the normal
equations in float64 over any number of batches (exactly: sums add up across batches), then solves them once.

    fit = LinearColorFit.from_dataset(dataset_dict["train"])   # one pass over the training split
    corrected = fit.apply(opt_v1)                              # (B, 4, H, W) -> (B, 4, H, W)

Evaluation reports the metrics of `fit.apply(opt_v1)` beside those of `opt_v1` and the refined output
(`"linear_fit"`). Training starts the refiner's spectral correction at a global fit
(`Stage2TrainingArguments.spectral_correction_init`): the least-squares one (`"linear_fit"`), or by default that fit
refined under the training objective's terms against the target (`"spectral_fit"`, `fit_spectral_correction`,
`Stage2Loss.target_terms`): least squares weighs every
reflectance error alike, while NDVI, EVI and the spectral angle care about band ratios, dark pixels included.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch

from .data import redrawn_opt_v1, split_batches


@dataclass(frozen=True)
class ColorFitResult:
    """A solved colour fit: `corrected = matrix @ opt_v1 + bias` per pixel (reflectance).

    Args:
        matrix (`torch.Tensor` of shape `(bands, bands)`): float64; row i mixes the input bands into output band i.
        bias (`torch.Tensor` of shape `(bands,)`): float64 reflectance offsets.
        pixels (`int`): valid pixels it was fitted on.
        tiles (`int`): tiles it was fitted on.
    """

    matrix: torch.Tensor
    bias: torch.Tensor
    pixels: int
    tiles: int

    def apply(self, opt_v1: torch.Tensor) -> torch.Tensor:
        """The fit applied to a (B, bands, H, W) image, in the image's dtype."""
        matrix = self.matrix.to(device=opt_v1.device, dtype=opt_v1.dtype)
        bias = self.bias.to(device=opt_v1.device, dtype=opt_v1.dtype)
        return torch.einsum("ij,bjhw->bihw", matrix, opt_v1) + bias[None, :, None, None]

    def to_dict(self) -> dict:
        return {"matrix": self.matrix.tolist(), "bias": self.bias.tolist(), "pixels": self.pixels,
                "tiles": self.tiles}


# Singular values of the normal equations below this fraction of the largest are those of directions the pixels do
# not determine: float64 sums of float32 pixels leave a constant band at ~1e-14-1e-12 of it, not 0, and a direction
# solved at that noise takes an arbitrary size, not the minimum norm. A band varying by 1e-5 reflectance is at ~1e-10;
# the smallest of the bundled tiles' fits (any preset, 1 to 18 tiles) at 7e-7, which this leaves bit for bit as it was.
_RCOND = 1e-10


class LinearColorFit:
    """Accumulates `sum x x^T` and `sum x y^T` of valid pixels (`x` = opt_v1 bands and a 1, `y` = target bands) and
    solves the least-squares affine map. Pixels where `valid_mask` is False, or where any value is not finite, do
    not count."""

    def __init__(self, num_bands: int = 4):
        if num_bands < 1:
            raise ValueError(f"num_bands must be >= 1, got {num_bands}.")
        self.num_bands = num_bands
        self.gram = torch.zeros(num_bands + 1, num_bands + 1, dtype=torch.float64)
        self.cross = torch.zeros(num_bands + 1, num_bands, dtype=torch.float64)
        self.pixels = 0
        self.tiles = 0

    def update(self, opt_v1, target, valid_mask=None) -> None:
        """Add a batch: `opt_v1` and `target` (B, bands, H, W) reflectance, `valid_mask` (B, H, W) bool or None."""
        opt_v1 = torch.as_tensor(opt_v1).to(torch.float64)
        target = torch.as_tensor(target).to(torch.float64)
        if opt_v1.ndim != 4 or opt_v1.shape[1] != self.num_bands or opt_v1.shape != target.shape:
            raise ValueError(
                f"opt_v1 and target must both be (batch, {self.num_bands}, height, width); got "
                f"{tuple(opt_v1.shape)} and {tuple(target.shape)}."
            )
        valid = torch.isfinite(opt_v1).all(dim=1) & torch.isfinite(target).all(dim=1)
        if valid_mask is not None:
            valid_mask = torch.as_tensor(valid_mask, dtype=torch.bool)
            if valid_mask.shape != valid.shape:  # an (H, W) mask would be broadcast to every tile of the batch
                raise ValueError(f"valid_mask must be (batch, height, width) = {tuple(valid.shape)}, got "
                                 f"{tuple(valid_mask.shape)}.")
            valid &= valid_mask
        inputs = opt_v1.permute(0, 2, 3, 1)[valid]  # (N, bands)
        outputs = target.permute(0, 2, 3, 1)[valid]
        design = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=torch.float64)], dim=1)
        self.gram += design.T @ design
        self.cross += design.T @ outputs
        self.pixels += int(inputs.shape[0])
        self.tiles += int(opt_v1.shape[0])

    def solve(self) -> ColorFitResult:
        """The least-squares matrix and bias (minimum-norm when the pixels do not determine them)."""
        if self.pixels == 0:
            raise ValueError("LinearColorFit.solve() has no valid pixel to fit; update() it with tiles first.")
        # (bands + 1, bands): the matrix's transpose above the bias.
        solution = torch.linalg.lstsq(self.gram, self.cross, rcond=_RCOND, driver="gelsd").solution
        return ColorFitResult(matrix=solution[: self.num_bands].T.contiguous(), bias=solution[self.num_bands].clone(),
                              pixels=self.pixels, tiles=self.tiles)

    @classmethod
    def from_dataset(cls, dataset, num_bands: int = 4) -> ColorFitResult:
        """The fit of a `datasets.Dataset` split with `opt_v1`, `target` (and optionally `valid_mask`) columns."""
        columns = [name for name in ("opt_v1", "target", "valid_mask") if name in dataset.column_names]
        missing = {"opt_v1", "target"} - set(columns)
        if missing:
            raise ValueError(f"The dataset lacks the columns {sorted(missing)} needed for a colour fit.")
        fit = cls(num_bands)
        for batch in split_batches(dataset, columns):
            fit.update(np.asarray(batch["opt_v1"]), np.asarray(batch["target"]),
                       np.asarray(batch["valid_mask"]) if "valid_mask" in batch else None)
        return fit.solve()


def fit_spectral_correction(dataset, loss=None, steps: int = 300, batch_tiles: int = 32, learning_rate: float = 1e-3,
                            nonnegative: bool = True, seed: int = 0, spectral_mlp=None,
                            mlp_batch_tiles: int = 6, redraw=None, mlp_columns: tuple[str, ...] = ()) -> ColorFitResult:
    """The global affine correction that minimises `loss` on `dataset` (a split with `opt_v1`, `target` and
    optionally `valid_mask`): the least-squares fit, then `steps` Adam steps on its 20 numbers, each on `batch_tiles`
    tiles drawn (seeded) from the split. `loss` maps `(output, target, valid_mask)` to `(value, ...)` (default
    `training.losses.SpectralLoss()`; training passes its objective's `Stage2Loss.target_terms`); `nonnegative`
    clamps the corrected image at 0 first (straight-through gradient), as a refiner with `nonnegative_output` does.

    With `spectral_mlp` (a refiner's `Stage2SpectralMLP`) the per-pixel MLP is then fitted on top of that affine
    correction, in place: `steps` more Adam steps on `mlp_batch_tiles` tiles each, `corrected = spectral_mlp(M x + b)`
    with (M, b) fixed. It is a pixel-level model that every pixel of the split teaches, so it can start fitted, like
    the affine map, instead of at zero; the affine map is fitted first so that the MLP only adds what it cannot do.

    With `redraw` (a `data_builders.degrade.DegradationRedraw`, `--redraw_degradation`) each Adam step reads its
    tiles' `opt_v1` from a draw of their degradation of its own (draws 1, 2, ... in step order, through both fits),
    as training redraws it each epoch; the least-squares start is the dataset's own draw.

    With `mlp_columns` (names of `dataset` columns holding one number per tile, e.g. a label) the spectral MLP is
    called as `spectral_mlp(spectra, *columns)`, each column a (tiles,) tensor of the step's tiles: a correction
    conditioned on something the spectra do not show (`bench/study_mixture_label.py`). The affine fit ignores them.

    It runs on one CPU thread: Adam normalises every gradient, so the float noise of a multi-threaded sum would move
    near-zero-gradient weights differently with each thread count; on one thread the fit is the same bits in every
    process of a distributed run and on every machine."""
    with _one_thread():
        return _fit_spectral_correction(dataset, loss, steps, batch_tiles, learning_rate, nonnegative, seed,
                                        spectral_mlp, mlp_batch_tiles, redraw, tuple(mlp_columns))


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_spectral_correction(dataset, loss, steps, batch_tiles, learning_rate, nonnegative, seed, spectral_mlp,
                             mlp_batch_tiles, redraw, mlp_columns) -> ColorFitResult:
    from modeling_stage2.modeling_stage2 import clamp_min_straight_through

    from .losses import SpectralLoss

    missing = [name for name in mlp_columns if name not in dataset.column_names]
    if missing:
        raise ValueError(f"mlp_columns {missing} are not columns of the dataset (it has {dataset.column_names}).")
    if mlp_columns and spectral_mlp is None:
        raise ValueError("mlp_columns are inputs of the spectral MLP: pass spectral_mlp too.")
    start = LinearColorFit.from_dataset(dataset)
    loss = loss if loss is not None else SpectralLoss()
    wanted = ("opt_v1", "target", "valid_mask") + (("tile_id",) if redraw is not None else ()) + mlp_columns
    columns = [name for name in wanted if name in dataset.column_names]
    if redraw is not None and "tile_id" not in columns:
        raise ValueError("redrawing opt_v1 needs the dataset's tile_id column, which it lacks.")
    rows = dataset.select_columns(columns).with_format("numpy")
    generator = torch.Generator().manual_seed(seed)
    draws = iter(range(1, 2 * steps + 1))  # with `redraw`: each step's draw of the degradation

    def fit(parameters, correct, tiles_per_step: int) -> None:
        optimizer = torch.optim.Adam(parameters, lr=learning_rate)
        for _ in range(steps):
            index = torch.randperm(len(rows), generator=generator)[:tiles_per_step].sort().values.tolist()
            batch = rows[index]
            if redraw is not None:
                batch["opt_v1"] = redrawn_opt_v1(redraw, batch["target"], batch["tile_id"],
                                                 batch["valid_mask"] if "valid_mask" in batch else None, next(draws))
            opt_v1, target = torch.from_numpy(batch["opt_v1"]), torch.from_numpy(batch["target"])
            valid = torch.from_numpy(batch["valid_mask"]) if "valid_mask" in batch else None
            corrected = correct(opt_v1, [torch.as_tensor(batch[name]) for name in mlp_columns])
            if nonnegative:
                corrected = clamp_min_straight_through(corrected, 0.0)
            value = loss(corrected, target, valid)[0]
            optimizer.zero_grad()
            value.backward()
            optimizer.step()

    matrix = start.matrix.float().clone().requires_grad_(True)
    bias = start.bias.float().clone().requires_grad_(True)
    training = ColorFitResult(matrix=matrix, bias=bias, pixels=start.pixels, tiles=start.tiles)
    fit([matrix, bias], lambda x, _: training.apply(x), batch_tiles)
    fitted = ColorFitResult(matrix=matrix.detach().double(), bias=bias.detach().double(), pixels=start.pixels,
                            tiles=start.tiles)
    if spectral_mlp is not None:
        # Fitted on a CPU copy, whatever device the refiner is on (a quantized one is on the GPU from the start): the
        # split is read on the CPU, and one CPU thread gives the same bits everywhere.
        on_cpu = copy.deepcopy(spectral_mlp).to("cpu")
        fit([p for p in on_cpu.parameters() if p.requires_grad],
            lambda x, conditioning: on_cpu(fitted.apply(x), *conditioning), mlp_batch_tiles)
        with torch.no_grad():
            for fitted_parameter, parameter in zip(on_cpu.parameters(), spectral_mlp.parameters()):
                parameter.copy_(fitted_parameter)
    return fitted


def spectral_corrections(model) -> list:
    """The `Stage2SpectralCorrection` modules a refiner computes with, if any: in a peft model the trained copy
    (`modules_to_save`), not the frozen original that peft keeps beside it."""
    from modeling_stage2.modeling_stage2 import Stage2SpectralCorrection

    return [module for name, module in model.named_modules()
            if isinstance(module, Stage2SpectralCorrection) and "original_module" not in name.split(".")]


def spectral_mlps(model) -> list:
    """The `Stage2SpectralMLP` modules a refiner computes with, if any (in a peft model the trained copy)."""
    from modeling_stage2.modeling_stage2 import Stage2SpectralMLP

    return [module for name, module in model.named_modules()
            if isinstance(module, Stage2SpectralMLP) and "original_module" not in name.split(".")]


def set_shared_spectral_correction(model, fit: ColorFitResult) -> None:
    """Start the refiner's shared spectral correction (M, b) at a colour fit (the trained copy; the frozen base
    keeps its own)."""
    modules = spectral_corrections(model)
    if not modules:
        raise ValueError("The model has no spectral correction branch; build it with spectral_correction='affine'.")
    for module in modules:
        module.set_shared_correction(fit.matrix, fit.bias)


__all__ = [
    "ColorFitResult",
    "LinearColorFit",
    "fit_spectral_correction",
    "set_shared_spectral_correction",
    "spectral_corrections",
    "spectral_mlps",
]
