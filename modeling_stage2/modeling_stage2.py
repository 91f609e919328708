"""The Stage 2 refiner: metadata conditioning, Prithvi-EO-2.0 backbone and a ConvNeXt refinement head.

    opt_v1 (B, 4, H, W) reflectance --normalise--+
    month, biome -> cyclic + learned embedding --> 4 maps --concat (8 ch)--> pad to the patch --> fuse to 4 ch
        --> Prithvi encoder --> features of several depths (CLS removed, on the patch grid)
        --> ConvNeXt head, upsampled stage by stage, with a skip from the full-resolution input
        --> delta, cropped to (H, W);  refined = opt_v1 + delta

With `spectral_correction="affine"` the residual is added to a per-tile colour correction of `opt_v1` instead:

    mean backbone features, month/biome embedding, per-band mean and spread of the tile --> MLP --> dM, db
        corrected = (M + dM) opt_v1 + (b + db)  (the head's full-resolution stem sees the corrected bands)
        refined = corrected + delta

With `spectral_mlp_hidden_size > 0` a per-pixel MLP adds a non-linear colour correction before the head:

    corrected = corrected + MLP(log(max(corrected, 0) + offset))   (per pixel; `opt_v1` in place of `corrected`
                                                                    without the affine branch)

With `out_of_range_fallback` the output is blended back towards `opt_v1` at pixels whose spectrum lies outside the
training pixels' (Mahalanobis distance of the log spectrum beyond a fitted threshold):

    refined = refined + w (opt_v1 - refined),  w = 0 within the threshold .. 1 from `out_of_range_ramp` times it

With `near_black_fallback` the same blend keeps `opt_v1` at its near-black pixels (red + NIR of `opt_v1`):

    w = 1 up to `near_black_threshold` .. 0 from `near_black_ramp` times it   (the larger weight where both rules act)

or, with `near_black_keep="ndvi"`, keeps only `opt_v1`'s split of red + NIR (its NDVI), on the refiner's own sum:

    red' = red + w (s r - red),  NIR' = NIR + w (s (1 - r) - NIR),  s = red + NIR,  r = opt_v1's red / (red + NIR)

With `nonnegative_output` the refined image is clamped at 0 reflectance (straight-through gradient).

The head's last layer starts at zero (and the correction at the identity, the MLP at zero), so an untrained model returns `opt_v1`
exactly.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_prithvi import PrithviConfig, canonical_band_name
from .bands import DN_CHECK_SAMPLE, DN_LOOKING_MEDIAN, DigitalNumbersWarning
from .configuration_stage2 import BLOCK_LINEAR_PATTERNS, UNKNOWN_METADATA, Stage2RefinerConfig
from .modeling_prithvi import PrithviEncoder

logger = logging.get_logger(__name__)

# Architecture fields that must agree between the refiner's backbone and pretrained weights.
_BACKBONE_ARCHITECTURE = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio", "coords_encoding")


@dataclass
class Stage2RefinerOutput(ModelOutput):
    """
    Output of [`Stage2RefinerModel`].

    Args:
        refined (`torch.FloatTensor` of shape `(batch_size, num_bands, height, width)`):
            The refined image, reflectance, same bands, size and dtype as `opt_v1` (`opt_v1 + delta`, or
            `corrected + delta` with the spectral correction).
        corrected (`torch.FloatTensor` of shape `(batch_size, num_bands, height, width)`, *optional*):
            `opt_v1` after the per-tile spectral correction and the per-pixel spectral MLP, before the head's
            residual; `None` without either (`config.spectral_correction="none"`, `config.spectral_mlp_hidden_size=0`).
        out_of_range_weight (`torch.FloatTensor` of shape `(batch_size, 1, height, width)`, *optional*):
            With `config.out_of_range_fallback` or `config.near_black_fallback` (`config.keeps_opt_v1`): each pixel's
            weight of `opt_v1` in `refined`, 0 where the refiner corrected it as trained, 1 where `opt_v1` was kept:
            its spectrum lies so far outside the training spectra (`Stage2SpectralRange`), or it is near-black
            (`near_black_weight`; with `config.near_black_keep="ndvi"` only `opt_v1`'s NDVI is kept there); `None`
            without either option.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The backbone's hidden states, one `(batch_size, 1 + num_patches, embed_dim)` tensor per block (CLS token
            first, the last after the final LayerNorm), returned when `output_hidden_states=True`. They describe the
            padded input: the patch grid is `(ceil(height / patch), ceil(width / patch))`, tokens in row-major order.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            The backbone's attention maps, one `(batch_size, num_heads, 1 + num_patches, 1 + num_patches)` tensor per
            block, returned when `output_attentions=True` (computed by the eager attention only, see
            [`PrithviEncoderOutput`]).
    """

    refined: torch.FloatTensor | None = None
    corrected: torch.FloatTensor | None = None
    out_of_range_weight: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ------------------------------------------------------------------------------------------------ building blocks


class Stage2LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Stage2DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability `drop_prob` (training only)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = torch.empty(shape, dtype=hidden_states.dtype, device=hidden_states.device).bernoulli_(keep_prob)
        return hidden_states * mask / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class Stage2ConvNextBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv, LayerNorm, inverted MLP (x4), layer scale, stochastic depth, residual."""

    def __init__(self, config: Stage2RefinerConfig, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.empty(dim)) if config.layer_scale_init_value > 0 else None
        self.drop_path = Stage2DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.dwconv(hidden_states).permute(0, 2, 3, 1)  # channels last for the MLP
        hidden_states = self.pwconv2(self.act(self.pwconv1(self.layernorm(hidden_states))))
        if self.layer_scale is not None:
            hidden_states = self.layer_scale * hidden_states
        return residual + self.drop_path(hidden_states.permute(0, 3, 1, 2))


class Stage2MetadataEmbedding(nn.Module):
    """Month and biome -> `metadata_channels` values per sample.

    The month is encoded on the unit circle (sin, cos of 2*pi*(month-1)/num_months: December sits next to January)
    and by a learned embedding; the biome by a learned embedding. Unknown values (-1) take the circle's centre
    (0, 0) and a learned "unknown" slot (month index 0, biome index `num_biomes`). A small MLP projects the
    concatenation to `metadata_channels`.
    """

    def __init__(self, config: Stage2RefinerConfig):
        super().__init__()
        self.num_months = config.num_months
        self.num_biomes = config.num_biomes
        width = config.metadata_embed_dim
        self.month_embedding = nn.Embedding(config.num_months + 1, width)  # 0 = unknown, 1..num_months
        self.biome_embedding = nn.Embedding(config.num_biomes + 1, width)  # num_biomes = unknown
        self.projection = nn.Sequential(
            nn.Linear(2 + 2 * width, width), nn.GELU(), nn.Linear(width, config.metadata_channels)
        )

    @property
    def feature_size(self) -> int:
        """Width of `features()`: the cyclic month (2) and the two learned embeddings."""
        return 2 + self.month_embedding.embedding_dim + self.biome_embedding.embedding_dim

    def features(self, month: torch.Tensor, biome: torch.Tensor) -> torch.Tensor:
        """(B,) month and biome -> (B, `feature_size`): the cyclic month and the learned embeddings, concatenated."""
        month_index = torch.where(month != UNKNOWN_METADATA, month, torch.zeros_like(month))
        biome_index = torch.where(biome != UNKNOWN_METADATA, biome, torch.full_like(biome, self.num_biomes))
        cyclic = cyclic_month_encoding(month, self.num_months).to(self.month_embedding.weight.dtype)
        return torch.cat([cyclic, self.month_embedding(month_index), self.biome_embedding(biome_index)], dim=-1)

    def forward(self, month: torch.Tensor, biome: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """The `metadata_channels` values; pass `features` when `features(month, biome)` is already computed."""
        return self.projection(self.features(month, biome) if features is None else features)


def clamp_min_straight_through(values: torch.Tensor, minimum: float) -> torch.Tensor:
    """`values.clamp(min=minimum)` whose gradient passes through unchanged (straight-through), so that a loss can
    still lift a value predicted below the bound."""
    return values + (values.clamp(min=minimum) - values).detach()


def cyclic_month_encoding(month: torch.Tensor, num_months: int = 12) -> torch.Tensor:
    """(B,) months 1..num_months -> (B, 2) points on the unit circle, (sin, cos) of 2*pi*(month-1)/num_months, so
    December and January are as close as any two consecutive months. Unknown months (-1) map to the centre (0, 0),
    equally far from every month."""
    known = (month != UNKNOWN_METADATA).unsqueeze(-1)
    angle = (month - 1).to(torch.float32) * (2 * math.pi / num_months)
    circle = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1)
    return torch.where(known, circle, torch.zeros_like(circle))


class Stage2InputFusion(nn.Conv2d):
    """1x1 conv fusing the normalised bands and the metadata maps back to the backbone's bands.

    Initialised to pass the bands through unchanged and ignore the metadata, so the pretrained backbone first sees
    its usual input; training learns how much metadata to mix in.
    """

    def __init__(self, config: Stage2RefinerConfig):
        super().__init__(len(config.bands) + config.metadata_channels, len(config.bands), kernel_size=1)


class Stage2ResidualOutput(nn.Conv2d):
    """The head's last 1x1 conv, zero-initialised: an untrained refiner returns `opt_v1` exactly."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)


class Stage2ZeroInitLinear(nn.Linear):
    """A linear layer that starts at zero (weights and bias): the per-tile correction starts as no correction."""


class Stage2SpectralCorrection(nn.Module):
    """Per-tile affine colour correction of `opt_v1`: `corrected = (M + dM) opt_v1 + (b + db)` for every pixel.

    `matrix` (M, bands x bands) and `bias` (b) are shared by all tiles: the identity and zero at initialisation,
    and what a least-squares colour fit of the training split gives when training starts from it
    (`set_shared_correction`). `dM` and `db` are this tile's own: an MLP predicts them from the tile's context,
    the mean of the backbone's last selected features over the patch grid (what the tile shows), the month/biome
    embedding (when it was taken, where) and the per-band mean and standard deviation of the normalised `opt_v1`
    (how bright and how contrasted it is). The MLP's last layer starts at zero, so the branch starts as (M, b) and
    an untrained refiner returns `opt_v1` exactly. With `spectral_correction="shared"` there is no `dM`, `db`: every
    tile gets (M, b).
    """

    def __init__(self, config: Stage2RefinerConfig, metadata_feature_size: int):
        super().__init__()
        bands = len(config.bands)
        embed_dim = config.backbone_config.embed_dim
        self.num_bands = bands
        self.matrix = nn.Parameter(torch.empty(bands, bands))
        self.bias = nn.Parameter(torch.empty(bands))
        self.per_tile = config.spectral_correction == "affine"  # "shared": (M, b) only
        if self.per_tile:
            # Normalised separately: backbone features, and embeddings that start 50x smaller than the cyclic month.
            self.feature_norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.metadata_norm = nn.LayerNorm(metadata_feature_size, eps=1e-6)
            hidden = config.spectral_correction_hidden_size
            self.context = nn.Sequential(nn.Linear(embed_dim + metadata_feature_size + 2 * bands, hidden), nn.GELU())
            self.tile_correction = Stage2ZeroInitLinear(hidden, bands * bands + bands)

    def forward(self, opt_v1: torch.Tensor, normalized_bands: torch.Tensor, features: torch.Tensor,
                metadata_features: torch.Tensor) -> torch.Tensor:
        """`opt_v1` (B, bands, H, W) reflectance, `normalized_bands` the same tile normalised, `features`
        (B, h, w, E) channels-last backbone features, `metadata_features` (B, F) -> corrected (B, bands, H, W)."""
        dtype = self.matrix.dtype
        if not self.per_tile:
            corrected = torch.einsum("ij,bjhw->bihw", self.matrix, opt_v1.to(dtype)) + self.bias[None, :, None, None]
            return corrected.to(opt_v1.dtype)
        spread, mean = torch.std_mean(normalized_bands.to(dtype), dim=(-2, -1), correction=0)
        context = torch.cat([
            self.feature_norm(features.to(dtype).mean(dim=(1, 2))),
            self.metadata_norm(metadata_features.to(dtype)),
            mean,
            spread,
        ], dim=-1)
        correction = self.tile_correction(self.context(context))
        bands = self.num_bands
        matrix = self.matrix + correction[:, : bands * bands].view(-1, bands, bands)
        bias = self.bias + correction[:, bands * bands :]
        corrected = torch.einsum("bij,bjhw->bihw", matrix, opt_v1.to(dtype)) + bias[:, :, None, None]
        return corrected.to(opt_v1.dtype)

    @torch.no_grad()
    def set_shared_correction(self, matrix, bias) -> None:
        """Start the shared (M, b) at a given colour correction, e.g. a least-squares fit of the training tiles."""
        matrix = torch.as_tensor(matrix, dtype=self.matrix.dtype, device=self.matrix.device)
        bias = torch.as_tensor(bias, dtype=self.bias.dtype, device=self.bias.device)
        if matrix.shape != self.matrix.shape or bias.shape != self.bias.shape:
            raise ValueError(
                f"A spectral correction of {self.num_bands} bands needs a {tuple(self.matrix.shape)} matrix and a "
                f"{tuple(self.bias.shape)} bias, got {tuple(matrix.shape)} and {tuple(bias.shape)}."
            )
        if not (torch.isfinite(matrix).all() and torch.isfinite(bias).all()):
            raise ValueError("The spectral correction's matrix and bias must be finite.")
        self.matrix.copy_(matrix)
        self.bias.copy_(bias)


class Stage2SpectralMLPLinear(nn.Linear):
    """A hidden layer of the spectral MLP, initialised with std 1/sqrt(fan_in): at `initializer_range` (0.02) the
    four-band input would keep the GELUs in their linear range, and the MLP would start as a plain linear map."""


# The spectral MLP's log input is centred on a typical land reflectance.
SPECTRAL_MLP_LOG_CENTRE = math.log(0.1)


def log_spectra(spectra: torch.Tensor, log_offset: float) -> torch.Tensor:
    """The spectral MLP's input: `log(max(spectra, 0) + log_offset) - log(0.1)`, elementwise."""
    return torch.log(spectra.clamp(min=0) + log_offset) - SPECTRAL_MLP_LOG_CENTRE


class Stage2SpectralMLP(nn.Module):
    """Per-pixel non-linear colour correction: `corrected + MLP(log(max(corrected, 0) + log_offset))`.

    Each pixel's spectrum alone goes in, nothing of its neighbours, month or biome: the MLP learns from the (many)
    pixels, not from the (few) tiles, which a small training set can support. The log turns the gain errors of a
    generator into offsets and compresses bright pixels (cloud, snow), so the MLP does not extrapolate a steep slope
    to reflectances it rarely saw. The last layer starts at zero: the branch starts as no correction.
    """

    def __init__(self, config: Stage2RefinerConfig):
        super().__init__()
        bands, hidden = len(config.bands), config.spectral_mlp_hidden_size
        self.log_offset = config.spectral_mlp_log_offset
        layers: list[nn.Module] = []
        width = bands
        for _ in range(config.spectral_mlp_num_layers):
            layers += [Stage2SpectralMLPLinear(width, hidden), nn.GELU()]
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.output = Stage2ZeroInitLinear(hidden, bands)

    def forward(self, spectra: torch.Tensor) -> torch.Tensor:
        """(B, bands, H, W) reflectance -> the same plus the per-pixel residual."""
        dtype = self.output.weight.dtype
        features = log_spectra(spectra.to(dtype), self.log_offset).permute(0, 2, 3, 1)
        residual = self.output(self.hidden(features)).permute(0, 3, 1, 2)
        return spectra + residual.to(spectra.dtype)


def spectral_distance(spectra: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor,
                      log_offset: float) -> torch.Tensor:
    """(B, bands, H, W) reflectance -> (B, H, W) Mahalanobis distance of each pixel's log spectrum (`log_spectra`)
    from `mean` (bands,) under `precision` (bands x bands, an inverse covariance), in the dtype of `mean`."""
    centred = log_spectra(spectra.to(mean.dtype), log_offset).permute(0, 2, 3, 1) - mean
    return torch.einsum("...i,ij,...j->...", centred, precision, centred).clamp(min=0).sqrt()


def out_of_range_weight(distance: torch.Tensor, threshold: torch.Tensor | float, ramp: float) -> torch.Tensor:
    """The weight of `opt_v1` at a pixel `distance` away from the training spectra: 0 up to `threshold`, 1 from
    `ramp` times it, linear between; 0 everywhere with an infinite `threshold` (no range fitted)."""
    return ((distance / threshold - 1) / (ramp - 1)).clamp(0, 1)


def _larger(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """The elementwise larger of two weights, either of which may be absent (None)."""
    if first is None or second is None:
        return second if first is None else first
    return torch.maximum(first, second)


def near_black_weight(opt_v1: torch.Tensor, band_indices: tuple[int, ...], threshold: float,
                      ramp: float) -> torch.Tensor:
    """(B, bands, H, W) reflectance -> (B, 1, H, W) weight of `opt_v1` at its near-black pixels: 1 where the sum of
    the bands at `band_indices` (red and NIR) is at most `threshold`, 0 from `ramp` times it, linear between."""
    brightness = sum(opt_v1[:, index : index + 1] for index in band_indices)
    return ((ramp - brightness / threshold) / (ramp - 1)).clamp(0, 1)


def keep_opt_v1(output: torch.Tensor, opt_v1: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`output` with `opt_v1` blended in by `weight` ((B, 1, H, W), `out_of_range_weight`): Stage 1's own pixels kept
    where the refiner declines. Written so that both ends are exact: `output` at weight 0, `opt_v1` itself at 1."""
    return (1 - weight) * output + weight * opt_v1


# Below this red + NIR reflectance `opt_v1` has no red/NIR split: `keep_opt_v1_ndvi` divides the sum evenly there.
RED_NIR_SPLIT_FLOOR = 1e-6


def keep_opt_v1_ndvi(output: torch.Tensor, opt_v1: torch.Tensor, weight: torch.Tensor,
                     band_indices: tuple[int, int]) -> torch.Tensor:
    """`output` with `opt_v1`'s NDVI blended in by `weight` ((B, 1, H, W)): its red + NIR (`band_indices`) divided
    as `opt_v1` divides its own, every other band and the red + NIR sum untouched. `output` at weight 0, `opt_v1`'s
    NDVI exactly at 1 (where the sum is positive)."""
    red, nir = band_indices
    source_total = opt_v1[:, red : red + 1] + opt_v1[:, nir : nir + 1]
    red_share = torch.where(source_total > RED_NIR_SPLIT_FLOOR,
                            opt_v1[:, red : red + 1] / source_total.clamp(min=RED_NIR_SPLIT_FLOOR),
                            torch.full_like(source_total, 0.5)).clamp(0, 1)
    total = output[:, red : red + 1] + output[:, nir : nir + 1]
    kept = {red: total * red_share, nir: total * (1 - red_share)}
    bands = [keep_opt_v1(output[:, b : b + 1], kept[b], weight) if b in kept else output[:, b : b + 1]
             for b in range(output.shape[1])]
    return torch.cat(bands, dim=1)


class Stage2SpectralRange(nn.Module):
    """Where the spectra the refiner was trained on end (with `config.out_of_range_fallback`).

    Buffers, fitted by training (`training.spectral_range`) and saved with the model or adapter: the `mean` and
    `precision` (inverse covariance) of the training pixels' log spectra (`log_spectra`, as the spectral MLP sees
    them) and a `threshold` on their Mahalanobis distance (a high quantile of the training pixels' own). `forward`
    gives each pixel's weight of `opt_v1` in the output: 0 within the threshold, 1 from `config.out_of_range_ramp`
    times it. A fresh module has an infinite threshold: weight 0 everywhere.
    """

    def __init__(self, config: Stage2RefinerConfig):
        super().__init__()
        bands = len(config.bands)
        self.log_offset = config.spectral_mlp_log_offset
        self.ramp = config.out_of_range_ramp
        # Unfitted: `_init_weights` sets the same values (a model built on the meta device gets them there).
        # float32 whatever the default dtype, as the normaliser's statistics: `from_pretrained(dtype=torch.bfloat16)`
        # would round the fitted statistics (the precision's large entries of opposite signs cancel in the distance)
        # and move which pixels keep `opt_v1`, and a model saved after that would keep the rounded range.
        self.register_buffer("mean", torch.zeros(bands, dtype=torch.float32))
        self.register_buffer("precision", torch.eye(bands, dtype=torch.float32))
        self.register_buffer("threshold", torch.tensor(math.inf, dtype=torch.float32))

    @property
    def is_fitted(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    def forward(self, opt_v1: torch.Tensor) -> torch.Tensor:
        """(B, bands, H, W) reflectance -> (B, 1, H, W) weight of `opt_v1`, in its dtype."""
        dtype = torch.promote_types(self.mean.dtype, torch.float32)  # a half-precision model measures in float32
        distance = spectral_distance(opt_v1, self.mean.to(dtype), self.precision.to(dtype), self.log_offset)
        return out_of_range_weight(distance, self.threshold.to(dtype), self.ramp)[:, None].to(opt_v1.dtype)

    @torch.no_grad()
    def set_range(self, mean, precision, threshold) -> None:
        """Set the fitted statistics: `mean` (bands,), `precision` (bands x bands), `threshold` (a positive
        distance)."""
        mean = torch.as_tensor(mean, dtype=self.mean.dtype, device=self.mean.device)
        precision = torch.as_tensor(precision, dtype=self.precision.dtype, device=self.precision.device)
        threshold = torch.as_tensor(threshold, dtype=self.threshold.dtype, device=self.threshold.device)
        if mean.shape != self.mean.shape or precision.shape != self.precision.shape or threshold.ndim != 0:
            raise ValueError(
                f"A spectral range of {self.mean.numel()} bands needs a {tuple(self.mean.shape)} mean, a "
                f"{tuple(self.precision.shape)} precision and a scalar threshold, got {tuple(mean.shape)}, "
                f"{tuple(precision.shape)} and {tuple(threshold.shape)}."
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(precision).all() and torch.isfinite(threshold)
                and threshold > 0):
            raise ValueError("The spectral range's mean and precision must be finite and its threshold positive.")
        self.mean.copy_(mean)
        self.precision.copy_(precision)
        self.threshold.copy_(threshold)


def looks_like_digital_numbers(opt_v1: torch.Tensor) -> bool:
    """Whether float band values look like digital numbers (reflectance x 10000): the median of an even sample of
    `DN_CHECK_SAMPLE` values is above `DN_LOOKING_MEDIAN` (sampled, so the check costs little on large batches)."""
    flat = opt_v1.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // DN_CHECK_SAMPLE)]
    return bool(sample.numel()) and float(sample.float().median()) > DN_LOOKING_MEDIAN


class Stage2InputNormalizer(nn.Module):
    """Reflectance (0..1) -> the backbone's normalised input: (reflectance * 10000 - mean) / std per band."""

    def __init__(self, config: Stage2RefinerConfig):
        super().__init__()
        bands = len(config.bands)
        # Derived from the config (not saved): the statistics stay those of the backbone's pretraining.
        backbone = config.backbone_config
        self.register_buffer("mean", torch.tensor(backbone.band_mean, dtype=torch.float32).view(1, bands, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(backbone.band_std, dtype=torch.float32).view(1, bands, 1, 1),
                             persistent=False)

    def forward(self, reflectance: torch.Tensor) -> torch.Tensor:
        return (reflectance * 10000.0 - self.mean) / self.std


class Stage2RefinementHead(nn.Module):
    """ConvNeXt head: backbone features of several depths -> a residual image at full (padded) resolution.

    The features (B, E, h, w) of each selected depth are normalised and projected together to `head_widths[0]`
    channels. Stage `i` of `n` upsamples (bilinear) to 1/2^(n-1-i) of the input size (never coarser than the patch
    grid) and runs a ConvNeXt block; between stages a LayerNorm + 1x1 conv narrows the channels. Before the last,
    full-resolution stage the features are joined with a 3x3-conv stem of the full-resolution input (normalised
    bands + metadata maps), so fine detail does not have to pass through the 14-px patches. A zero-initialised 1x1
    conv outputs the residual.
    """

    def __init__(self, config: Stage2RefinerConfig):
        super().__init__()
        embed_dim = config.backbone_config.embed_dim
        widths = config.head_widths
        self.patch_size = config.patch_size
        self.feature_norms = nn.ModuleList(nn.LayerNorm(embed_dim, eps=1e-6) for _ in config.feature_layers)
        self.feature_projection = nn.Linear(embed_dim * len(config.feature_layers), widths[0])
        rates = torch.linspace(0, config.drop_path_rate, len(widths), device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Stage2ConvNextBlock(config, width, drop_path=rate) for width, rate in zip(widths, rates)
        )
        self.transitions = nn.ModuleList(
            nn.Sequential(Stage2LayerNorm2d(widths[i], eps=1e-6), nn.Conv2d(widths[i], widths[i + 1], kernel_size=1))
            for i in range(len(widths) - 1)
        )
        in_channels = len(config.bands) + config.metadata_channels
        self.input_stem = nn.Sequential(nn.Conv2d(in_channels, widths[-1], kernel_size=3, padding=1), nn.GELU())
        self.skip_merge = nn.Conv2d(2 * widths[-1], widths[-1], kernel_size=1)
        self.final_norm = Stage2LayerNorm2d(widths[-1], eps=1e-6)
        self.output_projection = Stage2ResidualOutput(widths[-1], len(config.bands))

    def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(height, width) of each stage for a padded input of (height, width)."""
        count = len(self.blocks)
        sizes = []
        for stage in range(count):
            stride = 2 ** (count - 1 - stage)
            stride_h, stride_w = min(stride, self.patch_size[0]), min(stride, self.patch_size[1])
            # integer ceiling division on positive numbers: the values of math.ceil(height / stride), and traceable
            # (ONNX divides integers by truncation, so no floor division of negative numbers)
            sizes.append(((height + stride_h - 1) // stride_h, (width + stride_w - 1) // stride_w))
        return sizes

    def forward(self, features: list[torch.Tensor], full_resolution_input: torch.Tensor) -> torch.Tensor:
        hidden = torch.cat([norm(feature) for norm, feature in zip(self.feature_norms, features)], dim=-1)
        hidden = self.feature_projection(hidden).permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)
        sizes = self.stage_sizes(*full_resolution_input.shape[-2:])
        last = len(self.blocks) - 1
        for stage, block in enumerate(self.blocks):
            # Always resized, also to its own size (the identity, bit for bit): no comparison of sizes in the
            # forward, so it traces for any input size (torch.export / ONNX).
            hidden = F.interpolate(hidden, size=sizes[stage], mode="bilinear", align_corners=False)
            if stage == last:
                skip = self.input_stem(full_resolution_input.to(hidden.dtype))
                hidden = self.skip_merge(torch.cat([hidden, skip], dim=1))
            hidden = block(hidden)
            if stage < last:
                hidden = self.transitions[stage](hidden)
        return self.output_projection(self.final_norm(hidden))


# ------------------------------------------------------------------------------------------------------- models


class Stage2PreTrainedModel(PreTrainedModel):
    config: Stage2RefinerConfig
    config_class = Stage2RefinerConfig
    base_model_prefix = "stage2_refiner"
    main_input_name = "opt_v1"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # The attention is the backbone's (transformers' attention interface): eager, SDPA, flash, flex.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["PrithviBlock", "Stage2ConvNextBlock"]
    _input_embed_layer = "fusion"

    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal convs and linears (std `initializer_range`), normal embeddings, unit LayerNorms,
        `layer_scale_init_value` layer scales, the band statistics of the backbone; the fusion starts as the
        identity on the bands and the head's output conv at zero (an untrained refiner returns `opt_v1`); the
        spectral MLP's hidden layers at std 1/sqrt(fan_in), its output at zero; the spectral range unfitted (an
        infinite threshold: `opt_v1` is never blended back in). The backbone is the encoder's own
        (`PrithviEncoder._init_weights`): transformers' `initialize_weights` hands its modules to it; called by
        `model.apply(model._init_weights)`, which reaches the encoder after its modules, it initialises the encoder
        whole, so the backbone comes out the same way."""
        std = self.config.initializer_range
        if isinstance(module, PrithviEncoder):
            module.apply(module._init_weights)
        elif isinstance(module, Stage2SpectralCorrection):
            init.copy_(module.matrix, torch.eye(module.num_bands, dtype=module.matrix.dtype))
            init.zeros_(module.bias)
        elif isinstance(module, Stage2InputFusion):
            bands = len(self.config.bands)
            identity = torch.zeros(module.weight.shape, dtype=module.weight.dtype)
            identity[:, :bands, 0, 0] = torch.eye(bands, dtype=identity.dtype)
            init.copy_(module.weight, identity)
            init.zeros_(module.bias)
        elif isinstance(module, (Stage2ResidualOutput, Stage2ZeroInitLinear)):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, Stage2SpectralMLPLinear):
            init.trunc_normal_(module.weight, std=module.in_features**-0.5)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            if std > 0:
                init.trunc_normal_(module.weight, std=std)
            else:  # initializer_range=0: the distribution's limit (torch's truncated normal divides by the std)
                init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, Stage2ConvNextBlock) and module.layer_scale is not None:
            init.constant_(module.layer_scale, self.config.layer_scale_init_value)
        elif isinstance(module, Stage2SpectralRange):
            init.zeros_(module.mean)
            init.copy_(module.precision, torch.eye(module.mean.numel(), dtype=module.precision.dtype))
            init.constant_(module.threshold, math.inf)
        elif isinstance(module, Stage2InputNormalizer):
            backbone = self.config.backbone_config
            init.copy_(module.mean, torch.tensor(backbone.band_mean, dtype=module.mean.dtype).view_as(module.mean))
            init.copy_(module.std, torch.tensor(backbone.band_std, dtype=module.std.dtype).view_as(module.std))


FULL_PRECISION_MODULES = rf"(?!backbone\.blocks\.\d+\.(?:{'|'.join(BLOCK_LINEAR_PATTERNS.values())})$).+"
"""`llm_int8_skip_modules` entry (transformers matches it as a regex, from the start of a module's name) of every
module of a refiner but the backbone blocks' linears, whatever its configuration."""


def _quantized_outside_backbone(model: nn.Module) -> list[str]:
    """The modules outside the backbone (head, metadata embedding, colour parts) that bitsandbytes replaced: none
    can run quantized (an 8-bit linear in the head fails on its 4-D input)."""
    import bitsandbytes as bnb  # installed: transformers quantized with it

    return [name for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) and not name.startswith("backbone.")]


def _adapter_base_named(adapter_config: Path) -> bool:
    """Whether a peft `adapter_config.json` names its base (`base_model_name_or_path`); an unreadable one is left
    to transformers and peft, which say what is wrong with it."""
    try:
        named = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return True
    return bool(named)


class Stage2RefinerModel(Stage2PreTrainedModel):
    """
    The Stage 2 refiner: `forward(opt_v1, month, biome)` returns the refined image (`opt_v1 + delta`) and, when
    asked, the backbone's hidden states. See [`Stage2RefinerConfig`] for the architecture.

    `model.backbone` is the [`PrithviEncoder`]. A fresh model has a randomly initialised backbone; call
    [`load_backbone_weights`] to load `config.backbone_weights` (`from_pretrained` of a saved refiner loads the
    saved weights instead). `model.cpu_fallback_count` counts the calls whose head ran on the CPU after an
    out-of-memory error on the accelerator (inference only).
    """

    # Device types whose head out-of-memory errors are retried on the CPU.
    oom_fallback_device_types: tuple[str, ...] = ("cuda", "xpu", "mps", "npu", "hpu")

    def __init__(self, config: Stage2RefinerConfig):
        super().__init__(config)
        self.normalizer = Stage2InputNormalizer(config)
        self.metadata_embedding = Stage2MetadataEmbedding(config)
        self.fusion = Stage2InputFusion(config)
        self.backbone = PrithviEncoder(config.backbone_config)
        self.head = Stage2RefinementHead(config)
        self.spectral_correction = (
            Stage2SpectralCorrection(config, self.metadata_embedding.feature_size)
            if config.spectral_correction != "none"
            else None
        )
        self.spectral_mlp = Stage2SpectralMLP(config) if config.spectral_mlp_hidden_size > 0 else None
        self.spectral_range = Stage2SpectralRange(config) if config.out_of_range_fallback else None
        self.cpu_fallback_count = 0
        self._warned_cpu_fallback = False
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`. A `quantization_config` (`BitsAndBytesConfig`, or its dict) that names no
        `llm_int8_skip_modules` quantizes the backbone blocks' linears only (`FULL_PRECISION_MODULES`): the head, the
        metadata embedding and the colour parts cannot run quantized; a list of the caller's own that leaves one of
        them quantized is refused once loaded (a `ValueError`, not a tensor-size error at the first forward).

        A local trained adapter folder (`adapter_config.json` beside `config.json`, as `save_trained_model` writes it,
        and no model weights), which transformers takes for the model itself and says holds no `model.safetensors`,
        is refused on one line naming `modeling_stage2.load_trained_model`, which loads it (`AutoModel.from_pretrained`
        comes here too). Without `config.json` (peft's own `save_pretrained`) transformers loads the base
        `adapter_config.json` names, with the adapter; one naming no base (a base built from a config) is refused
        naming `peft.PeftModel.from_pretrained`, where transformers would ask the Hub for a repo "None". A Hub repo id
        is left to transformers (telling would cost a request)."""
        from transformers.utils import (
            ADAPTER_CONFIG_NAME, CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
            WEIGHTS_NAME,
        )

        if pretrained_model_name_or_path is not None and kwargs.get("gguf_file") is None:
            folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
            weights = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
            if (folder / ADAPTER_CONFIG_NAME).is_file() and not any((folder / name).is_file() for name in weights):
                if (folder / CONFIG_NAME).is_file():
                    raise OSError(f"{folder}: a trained adapter folder ({ADAPTER_CONFIG_NAME}, no {SAFE_WEIGHTS_NAME}),"
                                  " which from_pretrained does not load: load it with "
                                  f"modeling_stage2.load_trained_model('{folder}').")
                if not _adapter_base_named(folder / ADAPTER_CONFIG_NAME):  # transformers would ask the Hub for "None"
                    raise OSError(
                        f"{folder / ADAPTER_CONFIG_NAME}: base_model_name_or_path names no base model (its base was "
                        "built from a config, not loaded), so from_pretrained cannot find one: build that base and "
                        f"apply the adapter with peft.PeftModel.from_pretrained(base, '{folder}'), or save the two "
                        "together with modeling_stage2.save_trained_model."
                    )
        quantization_config = kwargs.get("quantization_config")
        if isinstance(quantization_config, dict):  # as transformers reads one, here so that what follows applies to it
            from transformers.quantizers.auto import AutoQuantizationConfig

            quantization_config = kwargs["quantization_config"] = AutoQuantizationConfig.from_dict(quantization_config)
        bitsandbytes = getattr(quantization_config, "quant_method", None) == "bitsandbytes"
        if bitsandbytes and quantization_config.llm_int8_skip_modules is None:
            kwargs["quantization_config"] = copy.deepcopy(quantization_config)
            kwargs["quantization_config"].llm_int8_skip_modules = [FULL_PRECISION_MODULES]
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        quantized = _quantized_outside_backbone(model) if bitsandbytes else []
        if quantized:  # found now, not as a tensor-size error at the first forward
            raise ValueError(
                f"quantization_config.llm_int8_skip_modules {quantization_config.llm_int8_skip_modules} leaves "
                f"{', '.join(quantized[:3])}{' ...' if len(quantized) > 3 else ''} quantized, which cannot run so "
                "(only the backbone's linears can): add "
                "modeling_stage2.adapters.modules_kept_in_full_precision(config) to the list, or leave "
                "llm_int8_skip_modules unset"
            )
        return loaded

    def forward(
        self,
        opt_v1: torch.Tensor,
        month: torch.Tensor | int | None = None,
        biome: torch.Tensor | int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
    ) -> Stage2RefinerOutput | tuple:
        r"""
        Args:
            opt_v1 (`torch.FloatTensor` of shape `(batch_size, num_bands, height, width)`):
                The Stage 1 image, reflectance 0..1, bands in the order of `config.bands`. Any size: it is padded to a
                multiple of the patch internally and the output is cropped back.
            month (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Month 1..`num_months`, or `UNKNOWN_METADATA` (-1). One integer (a Python int or a 0-d tensor) is
                every tile's month; None (the default) is unknown for every tile.
            biome (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Biome 0..`num_biomes - 1`, or `UNKNOWN_METADATA` (-1); one integer or None as for `month`.
            output_hidden_states (`bool`, *optional*):
                Also return the backbone's per-block hidden states; defaults to `config.output_hidden_states`.
            return_dict (`bool`, *optional*):
                Return a [`Stage2RefinerOutput`] instead of a tuple; defaults to `config.return_dict`.
            output_attentions (`bool`, *optional*):
                Also return the backbone's attention maps (with `attn_implementation="eager"`); defaults to
                `config.output_attentions`.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_opt_v1(opt_v1)
        device = opt_v1.device
        month = self._check_metadata(month, "month", 1, self.config.num_months, opt_v1.shape[0]).to(device)
        biome = self._check_metadata(biome, "biome", 0, self.config.num_biomes - 1, opt_v1.shape[0]).to(device)

        dtype = self.fusion.weight.dtype
        height, width = opt_v1.shape[-2:]
        bands = self.normalizer(opt_v1.to(self.normalizer.mean.dtype)).to(dtype)
        metadata_features = self.metadata_embedding.features(month, biome)
        metadata = self.metadata_embedding(month, biome, features=metadata_features).to(dtype)
        metadata_maps = metadata[:, :, None, None].expand(-1, -1, height, width)
        conditioned, padding = self._pad_to_patch_multiple(torch.cat([bands, metadata_maps], dim=1))

        encoded = self.backbone(self.fusion(conditioned), output_hidden_states=True, return_dict=True,
                                output_attentions=output_attentions)
        grid = encoded.grid_size
        features = [
            self._tokens_to_grid(encoded.hidden_states[layer], grid).to(dtype) for layer in self.config.feature_layers
        ]
        corrected, head_input = None, conditioned
        if self.spectral_correction is not None:
            corrected = self.spectral_correction(opt_v1, bands, features[-1], metadata_features)
        if self.spectral_mlp is not None:
            corrected = self.spectral_mlp(opt_v1 if corrected is None else corrected)
        if corrected is not None:
            # The head refines what the correction made: its full-resolution stem sees the corrected bands.
            corrected_bands = self.normalizer(corrected.to(self.normalizer.mean.dtype)).to(dtype)
            head_input, _ = self._pad_to_patch_multiple(torch.cat([corrected_bands, metadata_maps], dim=1))
        delta = self._run_head(features, head_input)
        top, _, left, _ = padding
        delta = delta[:, :, top : top + height, left : left + width]
        refined = (opt_v1 if corrected is None else corrected) + delta.to(opt_v1.dtype)
        out_of_range, near_black = self._opt_v1_weights(opt_v1)
        if near_black is not None and self.config.near_black_keep == "ndvi":
            refined = keep_opt_v1_ndvi(refined, opt_v1, near_black, self.config.near_black_band_indices)
            kept_whole = out_of_range
        else:
            kept_whole = _larger(out_of_range, near_black)
        if kept_whole is not None:
            refined = keep_opt_v1(refined, opt_v1, kept_whole)
        if self.config.nonnegative_output:
            refined = clamp_min_straight_through(refined, 0.0)

        output = Stage2RefinerOutput(
            refined=refined,
            corrected=corrected,
            out_of_range_weight=_larger(out_of_range, near_black),
            hidden_states=encoded.hidden_states if output_hidden_states else None,
            attentions=encoded.attentions if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    # ---------------------------------------------------------------------------------------------- forward parts

    def _opt_v1_weights(self, opt_v1: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each pixel's weight of `opt_v1` in the output, (B, 1, H, W), under each rule the config has: outside the
        training spectra (`out_of_range_fallback`) and near-black (`near_black_fallback`); None for a rule it lacks."""
        out_of_range = near_black = None
        if self.spectral_range is not None:
            # Outside the training spectra every correction extrapolates: Stage 1's own pixel is kept there.
            out_of_range = self.spectral_range(opt_v1)
        if self.config.near_black_fallback:
            # On near-black pixels NDVI is a ratio of noise: a correction fitted to all pixels only moves it.
            near_black = near_black_weight(opt_v1, self.config.near_black_band_indices,
                                           self.config.near_black_threshold, self.config.near_black_ramp)
        return out_of_range, near_black

    def _check_opt_v1(self, opt_v1: torch.Tensor) -> None:
        bands = len(self.config.bands)
        if not torch.is_tensor(opt_v1) or opt_v1.ndim != 4 or opt_v1.shape[1] != bands:
            shape = tuple(opt_v1.shape) if torch.is_tensor(opt_v1) else type(opt_v1).__name__
            raise ValueError(
                f"opt_v1 must be a (batch, {bands}, height, width) tensor with the bands {tuple(self.config.bands)}, "
                f"got {shape}."
            )
        if opt_v1.numel() == 0:  # eager, torch.export and ONNX would each fail differently, or return nothing
            raise ValueError(f"opt_v1 is empty, shape {tuple(opt_v1.shape)}: give at least one tile of at least one "
                             "pixel.")
        if not opt_v1.is_floating_point():
            raise TypeError(f"opt_v1 must hold float reflectance (0..1), got dtype {opt_v1.dtype}.")
        if not torch.isfinite(opt_v1).all():
            raise ValueError("opt_v1 contains NaN or infinite values; fill or mask invalid pixels before refining.")
        if looks_like_digital_numbers(opt_v1):
            # A warning, not an error: a generator may put out unusual values, but DN would be refined as nonsense.
            warnings.warn(
                f"opt_v1 looks like digital numbers (median above {DN_LOOKING_MEDIAN:g}), not reflectance 0..1; "
                "divide digital numbers by 10000 before refining.",
                DigitalNumbersWarning,
                stacklevel=2,
            )

    @staticmethod
    def _check_metadata(values, name: str, low: int, high: int, batch_size: int) -> torch.Tensor:
        """`values` as a (batch_size,) LongTensor: None is unknown for every tile, one integer is every tile's."""
        try:
            values = torch.as_tensor(UNKNOWN_METADATA if values is None else values)
        except (TypeError, ValueError, RuntimeError):  # [7, None]: torch's "Could not infer dtype of NoneType"
            raise TypeError(
                f"{name} must be integers (a LongTensor, a list of ints or one int), got {values!r}; mark a tile whose "
                f"{name} is unknown with {UNKNOWN_METADATA} (UNKNOWN_METADATA), not None."
            ) from None
        if values.is_floating_point() or values.dtype == torch.bool or values.is_complex():
            raise TypeError(f"{name} must be an integer tensor (LongTensor), got dtype {values.dtype}.")
        if values.ndim == 0:
            values = values.expand(batch_size)
        if values.shape != (batch_size,):
            raise ValueError(f"{name} must have shape ({batch_size},) (one value per tile) or be one integer for "
                             f"every tile, got {tuple(values.shape)}.")
        values = values.long()
        valid = ((values >= low) & (values <= high)) | (values == UNKNOWN_METADATA)
        if not bool(valid.all()):
            positions = torch.nonzero(~valid).flatten().tolist()
            bad = values[~valid].tolist()
            raise ValueError(
                f"{name} must be in {low}..{high}, or {UNKNOWN_METADATA} (UNKNOWN_METADATA) when unknown; got "
                f"{bad[:8]} at batch positions {positions[:8]}."
            )
        return values

    def _pad_to_patch_multiple(self, hidden: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Pad H and W up to a multiple of the patch, split between both sides, so no border pixel is dropped."""
        height, width = hidden.shape[-2:]
        patch_h, patch_w = self.config.patch_size
        pad_h, pad_w = -height % patch_h, -width % patch_w
        top, left = pad_h // 2, pad_w // 2
        padding = (top, pad_h - top, left, pad_w - left)
        if pad_h == 0 and pad_w == 0:
            return hidden, padding
        mode = self.config.padding_mode
        if mode == "reflect" and (max(padding[:2]) >= height or max(padding[2:]) >= width):
            mode = "replicate"  # too small to mirror
        return F.pad(hidden, (padding[2], padding[3], padding[0], padding[1]), mode=mode), padding

    @staticmethod
    def _tokens_to_grid(tokens: torch.Tensor, grid_size) -> torch.Tensor:
        """(B, 1 + t*h*w, E) tokens -> (B, h, w, E) channels-last map of the (single) frame, CLS removed."""
        frames, height, width = grid_size
        if frames != 1:
            raise ValueError(f"The refiner works on single-frame input, got a token grid {tuple(grid_size)}.")
        return tokens[:, 1:, :].reshape(tokens.shape[0], height, width, tokens.shape[-1])

    def _run_head(self, features: list[torch.Tensor], full_resolution_input: torch.Tensor) -> torch.Tensor:
        """The head, retried on the CPU for this call when it runs out of accelerator memory at inference. In training
        (autograd on: moving the head would break the graph) or on the CPU itself, the error propagates."""
        try:
            return self.head(features, full_resolution_input)
        except torch.OutOfMemoryError:
            device = full_resolution_input.device
            if device.type not in self.oom_fallback_device_types or torch.is_grad_enabled():
                raise
        return self._run_head_on_cpu(features, full_resolution_input, device)

    def _run_head_on_cpu(self, features, full_resolution_input, device: torch.device) -> torch.Tensor:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.cpu_fallback_count += 1
        if not self._warned_cpu_fallback:
            self._warned_cpu_fallback = True
            warnings.warn(
                f"The refinement head ran out of memory on {device}; running it on the CPU for this call (slow). "
                "Refine fewer or smaller tiles per call, free accelerator memory, or load the backbone in 8-bit/4-bit. "
                "`model.cpu_fallback_count` counts these fallbacks.",
                RuntimeWarning,
                stacklevel=3,
            )
        # Inference only (no autograd graph), so the head's parameters can move and come back in place.
        self.head.to("cpu")
        try:
            delta = self.head([feature.to("cpu") for feature in features], full_resolution_input.to("cpu"))
        finally:
            self.head.to(device)
        return delta.to(device)

    # ------------------------------------------------------------------------------------ pretrained backbone

    def load_backbone_weights(self, source: str | Path | None = None, revision: str | None = None) -> None:
        """Load pretrained weights into `self.backbone` from `source` (default `config.backbone_weights`).

        `source` is a folder written by `stage2-convert-prithvi` (or `PrithviEncoder.save_pretrained`), an official
        `Prithvi_EO_V2_*.pt` file (local path or `hf://OWNER/REPO/FILE.pt`), or a Hub repo id
        (`OWNER/REPO`, or `OWNER/REPO/FILE.pt`), converted once and cached by `load_prithvi_from_hub`.
        `revision` (branch, tag or commit) applies to the Hub sources; default the main branch.
        """
        source = source if source is not None else self.config.backbone_weights
        if source is None:
            raise ValueError(
                "No backbone weights to load: config.backbone_weights is None. Set it to a Hub repo id, an official "
                "Prithvi .pt file or a converted folder."
            )
        encoder = load_pretrained_encoder(source, self.config.backbone_config, revision=revision)
        self._copy_backbone_weights(encoder, str(source))

    def _copy_backbone_weights(self, encoder: PrithviEncoder, source: str) -> None:
        mine, theirs = self.backbone.config, encoder.config
        mismatches = [
            f"{name} {_as_list(getattr(theirs, name))} vs {_as_list(getattr(mine, name))}"
            for name in _BACKBONE_ARCHITECTURE
            if _as_list(getattr(theirs, name)) != _as_list(getattr(mine, name))
        ]
        their_bands = [canonical_band_name(band) for band in theirs.bands]
        my_bands = [canonical_band_name(band) for band in mine.bands]
        if their_bands != my_bands:
            mismatches.append(f"bands {list(theirs.bands)} vs {list(mine.bands)}")
        if mismatches:
            raise ValueError(
                f"Backbone weights {source} do not fit the refiner's backbone (weights vs config): "
                + "; ".join(mismatches)
                + ". Choose the backbone preset and bands of the checkpoint (e.g. convert it with --bands "
                + " ".join(mine.bands)
                + ")."
            )
        state = encoder.state_dict()
        if state["pos_embed"].shape != self.backbone.pos_embed.shape:
            # The fixed sin-cos table depends on img_size/num_frames only; keep the one built for this config.
            state["pos_embed"] = self.backbone.pos_embed.detach().clone()
        self.backbone.load_state_dict(state, strict=True)


def load_pretrained_encoder(source: str | Path, backbone_config: PrithviConfig,
                            revision: str | None = None) -> PrithviEncoder:
    """A pretrained `PrithviEncoder` with the bands of `backbone_config`, from a converted folder, an official
    checkpoint file (`.pt`, local or `hf://`), or a Hub repo id (`OWNER/REPO` or `OWNER/REPO/FILE.pt`); `revision`
    is the Hub sources' branch, tag or commit."""
    from .convert_prithvi import load_official_encoder, load_prithvi_from_hub

    kind, location = backbone_weights_location(source)
    bands = list(backbone_config.bands)
    if kind == "folder":
        return PrithviEncoder.from_pretrained(location)
    if kind == "checkpoint":
        overrides = {name: getattr(backbone_config, name) for name in ("img_size", "num_frames", "num_heads")}
        return load_official_encoder(location, bands=bands, revision=revision, **overrides)
    repo_id, filename = location
    return PrithviEncoder.from_pretrained(load_prithvi_from_hub(repo_id, filename=filename, revision=revision,
                                                                bands=bands))


def backbone_weights_commit(source: str | Path, revision: str | None = None) -> str | None:
    """The Hub commit the checkpoint named by `source` (`OWNER/REPO[/FILE.pt]` or `hf://`) resolves to now at
    `revision` (default the main branch; the file is downloaded into the Hub cache, where loading it at that commit
    finds it), or None for a local folder or file.
    Loading at the commit returned keeps a later commit to the backbone's repo from changing a trained adapter."""
    from .convert_prithvi import HUB_PREFIX, resolve_checkpoint, snapshot_commit

    kind, location = backbone_weights_location(source)
    if kind == "folder" or (kind == "checkpoint" and not str(location).startswith(HUB_PREFIX)):
        return None
    if kind == "checkpoint":
        return snapshot_commit(resolve_checkpoint(location, revision=revision))
    from huggingface_hub import hf_hub_download

    repo_id, filename = location
    return snapshot_commit(Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)))


def backbone_weights_location(source: str | Path) -> tuple[str, Any]:
    """What `backbone_weights` names, found without reading it: `("folder", path)` (a `stage2-convert-prithvi`
    folder), `("checkpoint", path or hf:// URL)` (an official `.pt` file) or `("hub", (repo_id, file name))`.
    `FileNotFoundError` or `ValueError` saying what it is not, so a run can be refused before it starts."""
    from .convert_prithvi import HUB_PREFIX

    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"backbone_weights folder {path} has no config.json; give a folder written by stage2-convert-prithvi."
            )
        return "folder", path
    if path.is_file() or text.startswith(HUB_PREFIX):
        return "checkpoint", text if text.startswith(HUB_PREFIX) else path
    parts = text.split("/")
    a_missing_file = len(parts) == 2 and parts[1].endswith(".pt")  # dir/x.pt: a path, not OWNER/REPO
    if len(parts) in (2, 3) and all(parts) and not text.startswith((".", "/", "~")) and not a_missing_file:
        return "hub", ("/".join(parts[:2]), parts[2] if len(parts) == 3 else _official_filename(parts[1]))
    raise FileNotFoundError(
        f"backbone_weights {text!r} is neither an existing folder or file nor a Hub id (OWNER/REPO or "
        "OWNER/REPO/FILE.pt)."
    )


def _official_filename(repo_name: str) -> str:
    """The checkpoint file of an official repo: Prithvi-EO-2.0-600M-TL -> Prithvi_EO_V2_600M_TL.pt."""
    prefix = "Prithvi-EO-2.0-"
    if not repo_name.startswith(prefix):
        raise ValueError(
            f"Cannot infer the checkpoint file of Hub repo {repo_name!r}; give backbone_weights as OWNER/REPO/FILE.pt."
        )
    return "Prithvi_EO_V2_" + repo_name[len(prefix) :].replace("-", "_") + ".pt"


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


Stage2RefinerModel.register_for_auto_class("AutoModel")
AutoModel.register(Stage2RefinerConfig, Stage2RefinerModel, exist_ok=True)

__all__ = [
    "Stage2PreTrainedModel",
    "Stage2RefinerModel",
    "Stage2RefinerOutput",
    "Stage2SpectralCorrection",
    "Stage2SpectralRange",
    "clamp_min_straight_through",
    "cyclic_month_encoding",
    "keep_opt_v1",
    "keep_opt_v1_ndvi",
    "load_pretrained_encoder",
    "log_spectra",
    "out_of_range_weight",
    "spectral_distance",
]
