"""Synthetic `opt_v1`: the target degraded the way a SAR-to-optical generator errs.

Without Stage 1 outputs, the builder makes `opt_v1` from the real Sentinel-2 target. A generator
such as TerraMind produces images that are smoother than the truth, slightly misregistered,
radiometrically biased (regression of NIR towards the mean, a hazy blue/green cast), spectrally
confused between bands, patchy at low spatial frequencies, and noisy. `synthesize_opt_v1` applies
each of these, in that order, with parameters drawn per tile:

0. invalid pixels of the target (`valid_mask` False) first take the mean of the tile's valid pixels per
   band (`tiles.fill_invalid_pixels`, the fill the model is given them with in training, evaluation and
   inference), so that the blur does not drag their neighbours towards 0 (a tile without an invalid pixel
   is degraded exactly as before this step existed);
1. blur + misregistration: a Gaussian kernel of width `blur_sigma` (pixels, drawn uniformly from
   the range) centred `shift` pixels off (each axis uniform in +-`max_shift`), edges clamped;
2. band cross-talk: each band takes a fraction c ~ U(0, `crosstalk`) of its value from the other
   bands (random weights), `x' = M x` with rows of M summing to 1;
3. gain and offset per band: `gain_mean + gain_std * N(0, 1)` and `offset_mean + offset_std *
   N(0, 1)` (both clipped at 3 sigma); the means are the systematic, learnable part of the error;
4. a smooth multiplicative field `1 + f`, `f` a `low_freq_grid` x `low_freq_grid` grid of
   N(0, `low_freq_std`) values upsampled bilinearly (the patchy errors of a generator);
5. Gaussian noise whose standard deviation is `noise_std` times the value plus `noise_floor`
   (a generator's errors grow with brightness; additive noise alone would swamp dark water);
6. clipping to `clip`, and 0 at pixels where the target is invalid.

Two optional steps, off by default, sit between steps 3 and 4 (3a, then 3b):

3a. haze: an additive path-radiance term `h * (wavelength / 490 nm) ** -haze_exponent` per band,
    `h ~ U(haze)` per tile (reflectance at B02; strongest in blue, weakest in NIR);
3b. tone curve: `x = max(x, 0) ** g`, one `g` per tile drawn log-uniformly from `tone_gamma`
    (`g < 1` brightens and flattens the shadows, `g > 1` darkens them; `(1, 1)` is off).

Their random numbers are drawn after all the others (and only when the step is on), so switching
them on leaves every other draw of a tile unchanged and `DegradationConfig()` gives the same
`opt_v1` as before they existed.

Named presets (`DEGRADATION_PRESETS`, chosen with `resolve_degradation`): `mild` is
`DegradationConfig()`; `strong` has the much wider systematic errors of a generator that
hallucinates from SAR; `mixture` degrades each tile with `mild` or `strong`, with equal odds, drawn
from a stream of its own (`mixture_choice`).

The random stream of a tile is seeded from `(seed, sha256(tile_id))` only: the same tile gets the
same `opt_v1` whatever the file order, the split or the number of worker processes.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .tiles import TILE_SIZE, fill_invalid_pixels

DEGRADATION_VERSION = 1
"""Bumped whenever the same config and seed would give a different `opt_v1` for a tile whose pixels are all valid.
The fill before the blur (step 0) changed only tiles with invalid pixels and kept version 1, so that datasets of
whole tiles built before it still redraw (`DegradationRedraw.from_record`) and keep their cache keys; a dataset or a
cached conversion built before it from tiles with invalid pixels holds, in its own draw, their neighbours darkened by
the blur (later draws of `--redraw_degradation` do not)."""

BAND_WAVELENGTHS_NM: tuple[float, ...] = (490.0, 560.0, 665.0, 842.0)
"""Nominal central wavelengths of B02, B03, B04, B08 (the haze's spectral shape)."""


_RANGE_FIELDS = ("blur_sigma", "gain_mean", "offset_mean", "clip", "haze", "tone_gamma")
"""The `DegradationConfig` fields that hold several numbers (a range, or one value per band)."""


def _is_finite_number(value) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
            and math.isfinite(value))


@dataclass(frozen=True)
class DegradationConfig:
    """Parameters of the synthetic `opt_v1` degradation (reflectance units, pixels).

    Args:
        blur_sigma (`tuple[float, float]`, defaults to `(0.5, 1.5)`):
            Range of the Gaussian blur width in pixels, drawn uniformly per tile. `(0, 0)`
            disables the blur. At most the tile size (120), as are `max_shift` and `low_freq_grid`.
        max_shift (`float`, defaults to `0.5`):
            Largest misregistration in pixels along each axis (sub-pixel, drawn uniformly).
        crosstalk (`float`, defaults to `0.05`):
            Largest fraction of a band taken from the other three bands (drawn per band).
        gain_mean (`tuple[float, ...]`, defaults to `(1.0, 1.0, 1.0, 0.92)`):
            Systematic multiplicative bias per band (B02, B03, B04, B08): NIR is under-estimated.
        gain_std (`float`, defaults to `0.04`):
            Per-tile random spread of the gain around `gain_mean`.
        offset_mean (`tuple[float, ...]`, defaults to `(0.008, 0.005, 0.0, 0.0)`):
            Systematic additive bias per band: a faint haze on blue and green.
        offset_std (`float`, defaults to `0.001`):
            Per-tile random spread of the offset around `offset_mean`.
        low_freq_std (`float`, defaults to `0.04`):
            Standard deviation of the smooth multiplicative error field.
        low_freq_grid (`int`, defaults to `4`):
            Number of control points per axis of that field (>= 2).
        noise_std (`float`, defaults to `0.03`):
            Per-pixel Gaussian noise, relative to the value (0.03 = 3 %).
        noise_floor (`float`, defaults to `0.0`):
            Per-pixel Gaussian noise added whatever the value (reflectance).
        clip (`tuple[float, float]`, defaults to `(0.0, 1.0)`):
            Reflectance range of the result.
        haze (`tuple[float, float]`, defaults to `(0.0, 0.0)`):
            Range of an additive haze (path radiance) in reflectance at B02, drawn uniformly per
            tile; band b gets `h * (BAND_WAVELENGTHS_NM[b] / 490) ** -haze_exponent`. `(0, 0)`
            disables it (no random draw).
        haze_exponent (`float`, defaults to `2.0`):
            Angstrom-like exponent of the haze's wavelength dependence (2: B03 0.77, B04 0.54,
            B08 0.34 of B02).
        tone_gamma (`tuple[float, float]`, defaults to `(1.0, 1.0)`):
            Range of a per-tile tone curve `x ** g` on reflectance (negative values first set to
            0), `g` drawn log-uniformly (so `(0.8, 1.25)` is symmetric around 1). `(1, 1)`
            disables it (no random draw).
    """

    blur_sigma: tuple = (0.5, 1.5)
    max_shift: float = 0.5
    crosstalk: float = 0.05
    gain_mean: tuple = (1.0, 1.0, 1.0, 0.92)
    gain_std: float = 0.04
    offset_mean: tuple = (0.008, 0.005, 0.0, 0.0)
    offset_std: float = 0.001
    low_freq_std: float = 0.04
    low_freq_grid: int = 4
    noise_std: float = 0.03
    noise_floor: float = 0.0
    clip: tuple = (0.0, 1.0)
    haze: tuple = (0.0, 0.0)
    haze_exponent: float = 2.0
    tone_gamma: tuple = (1.0, 1.0)

    def __post_init__(self):
        self._check_types()
        for name in _RANGE_FIELDS:
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for field in dataclasses.fields(self):  # numpy scalars -> Python numbers: the build record is JSON
            if isinstance(getattr(self, field.name), np.generic):
                object.__setattr__(self, field.name, getattr(self, field.name).item())
        low, high = self.blur_sigma if len(self.blur_sigma) == 2 else (None, None)
        if low is None or not 0 <= low <= high:
            raise ValueError(f"blur_sigma must be (low, high) with 0 <= low <= high, got {self.blur_sigma}")
        if len(self.gain_mean) != 4 or len(self.offset_mean) != 4:
            raise ValueError("gain_mean and offset_mean need one value per band (B02, B03, B04, B08)")
        if not 0 <= self.crosstalk < 1:
            raise ValueError(f"crosstalk must be in [0, 1), got {self.crosstalk}")
        for name in ("max_shift", "gain_std", "offset_std", "low_freq_std", "noise_std", "noise_floor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.low_freq_grid < 2:
            raise ValueError(f"low_freq_grid must be >= 2, got {self.low_freq_grid}")
        # Past the tile's size a blur, a shift or a grid means nothing, and a large one fills memory mid-build
        for name, value in (("blur_sigma", high), ("max_shift", self.max_shift), ("low_freq_grid", self.low_freq_grid)):
            if value > TILE_SIZE:
                raise ValueError(f"{name} must be at most {TILE_SIZE} (pixels: the tile size), got {value:g}")
        if len(self.clip) != 2 or self.clip[0] >= self.clip[1]:
            raise ValueError(f"clip must be (low, high) with low < high, got {self.clip}")
        if len(self.haze) != 2 or not 0 <= self.haze[0] <= self.haze[1]:
            raise ValueError(f"haze must be (low, high) with 0 <= low <= high, got {self.haze}")
        if self.haze_exponent < 0:
            raise ValueError(f"haze_exponent must be >= 0, got {self.haze_exponent}")
        if len(self.tone_gamma) != 2 or not 0 < self.tone_gamma[0] <= self.tone_gamma[1]:
            raise ValueError(f"tone_gamma must be (low, high) with 0 < low <= high, got {self.tone_gamma}")

    def _check_types(self) -> None:
        """Finite numbers where numbers go (a JSON file may hold anything), before the range checks."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _RANGE_FIELDS:
                if not isinstance(value, (list, tuple)) or not all(map(_is_finite_number, value)):
                    raise ValueError(f"{field.name} must be a list of finite numbers, got {value!r}")
            elif field.name == "low_freq_grid":
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise ValueError(f"low_freq_grid must be an integer, got {value!r}")
            elif not _is_finite_number(value):
                raise ValueError(f"{field.name} must be a finite number, got {value!r}")

    @property
    def has_haze(self) -> bool:
        return self.haze[1] > 0

    @property
    def has_tone_curve(self) -> bool:
        return self.tone_gamma != (1.0, 1.0)

    def haze_weights(self) -> np.ndarray:
        """Haze per band relative to B02: `(wavelength / 490 nm) ** -haze_exponent`."""
        return (np.asarray(BAND_WAVELENGTHS_NM) / BAND_WAVELENGTHS_NM[0]) ** -self.haze_exponent

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "DegradationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown degradation parameters {unknown}; known: {sorted(known)}")
        return cls(**values)


# ----------------------------------------------------------------------------- presets
# `strong`: what a generator that hallucinates optical bands from SAR alone gets wrong. Published
# S1 -> S2 translation models (pix2pix / CycleGAN-style cGANs trained on SEN1-2 or SEN12MS(-CR))
# are typically reported at PSNR ~18-25 dB and spectral angles of ~0.1-0.3 rad on the S2 bands,
# with visible colour casts, over-smoothed textures and a regression of NIR towards the mean
# (ranges as commonly summarised for that literature, not a re-measurement). The preset is sized
# to land opt_v1 inside that band on the bundled sample: SAM 0.24-0.25 rad, PSNR 23.3-24.3 dB over
# seeds 0-2 (mild: ~0.10 rad, ~31 dB; docs/data.md, "Degradation presets"):
# - blur 1-2.5 px and up to 1.5 px misregistration: cGAN outputs lose most texture below ~3 px;
# - cross-talk up to 0.25: bands predicted from the same two SAR channels are strongly correlated
#   (0.3 pushed SAM past 0.33 rad on its own account: ~0.1 rad of it is cross-talk);
# - gains: NIR 0.85 (regression to the mean of the brightest band), red/blue off by 5 %, per-tile
#   spread 0.1 (colour casts that change from scene to scene);
# - offsets 0.002-0.008 (+-0.004) plus a haze of 0-0.02 at B02 (0.34 of it at B08): up to ~0.03
#   of blue reflectance, the milky look of generated images (most of the SAM of dark water);
# - a tone curve, gamma 0.8-1.25 (log-uniform): generated contrast compressed or stretched;
# - a stronger smooth field (std 0.1, 5 x 5 grid) and 5 % noise: patchy, hallucinated texture.
DEGRADATION_PRESETS: dict[str, DegradationConfig] = {
    "mild": DegradationConfig(),
    "strong": DegradationConfig(
        blur_sigma=(1.0, 2.5),
        max_shift=1.5,
        crosstalk=0.25,
        gain_mean=(1.05, 1.0, 0.95, 0.85),
        gain_std=0.1,
        offset_mean=(0.008, 0.005, 0.002, 0.0),
        offset_std=0.004,
        low_freq_std=0.1,
        low_freq_grid=5,
        noise_std=0.05,
        haze=(0.0, 0.02),
        haze_exponent=2.0,
        tone_gamma=(0.8, 1.25),
    ),
}
MIXTURE = "mixture"
DEGRADATION_CHOICES: tuple[str, ...] = ("mild", "strong", MIXTURE)
"""Names accepted by `resolve_degradation`, `stage2-build-dataset --degradation` and the training
config's `degradation` field."""
MIXTURE_PRESETS: tuple[str, ...] = ("mild", "strong")
"""The presets a `mixture` tile draws from, with equal odds."""

DegradationSpec = Union[str, dict, DegradationConfig, None]


def resolve_degradation(spec: DegradationSpec = None, overrides: Optional[dict] = None
                        ) -> tuple[str, Optional[DegradationConfig]]:
    """`(preset name, config)` of a degradation given by name, dict, config or None.

    - `None` or `"mild"`: `("mild", DegradationConfig())`; `"strong"`: the strong preset;
      `"mixture"`: `("mixture", None)`: each tile picks `mild` or `strong` (`config_for_tile`);
    - a dict: `DegradationConfig` fields overriding the defaults (= `mild`);
    - a `DegradationConfig`: itself.

    The name of a dict or config is that of the preset it equals, else `"custom"`. `overrides`
    (a dict of fields) replaces fields of the resolved config; the name then becomes
    `"<name>+overrides"`. Overrides cannot apply to `mixture` (ValueError: they would silently
    apply to two presets).
    """
    if spec is None:
        spec = "mild"
    if isinstance(spec, str):
        if spec not in DEGRADATION_CHOICES:
            raise ValueError(f"unknown degradation preset {spec!r}; choose from {', '.join(DEGRADATION_CHOICES)}")
        if spec == MIXTURE:
            if overrides:
                raise ValueError("degradation overrides cannot be combined with the 'mixture' preset "
                                 "(they would apply to both of its presets); use 'mild' or 'strong'")
            return MIXTURE, None
        name, config = spec, DEGRADATION_PRESETS[spec]
    elif isinstance(spec, dict):
        config = DegradationConfig.from_dict(spec)
        name = _preset_name(config)
    elif isinstance(spec, DegradationConfig):
        config, name = spec, _preset_name(spec)
    else:
        raise TypeError(f"degradation must be a preset name, a dict or a DegradationConfig, got {type(spec).__name__}")
    if overrides:
        config = DegradationConfig.from_dict({**config.to_dict(), **overrides})
        name = f"{name}+overrides"
    return name, config


def _preset_name(config: DegradationConfig) -> str:
    return next((name for name, preset in DEGRADATION_PRESETS.items() if preset == config), "custom")


def tile_rng(seed: int, tile_id: str, stream: int = 0) -> np.random.Generator:
    """The random stream of one tile: a function of (seed, tile_id) only.

    `stream` 0 is the degradation's; other values give independent streams of the same tile
    (1: the `mixture` choice), so that choice does not correlate with the degradation's draws.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    digest = hashlib.sha256(tile_id.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    spawn_key = (int(stream),) if stream else ()
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words], spawn_key=spawn_key))


def draw_seed(seed: int, draw: int) -> int:
    """The dataset seed of a tile's `draw`-th synthetic `opt_v1`: draw 0 is `seed` itself (the built dataset's own
    `opt_v1`), each later draw a seed derived from (seed, draw), so that draws are independent of each other."""
    if int(draw) < 0:
        raise ValueError(f"draw must be >= 0, got {draw}")
    if int(draw) == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(draw)]).generate_state(1)[0])


@dataclass(frozen=True)
class DegradationRedraw:
    """Draws a tile's synthetic `opt_v1` again (`--redraw_degradation`): the degradation of a built dataset (its
    preset, parameters and seed, from the `opt_v1` part of its build record), applied to a tile's target with the
    seed of another draw (`draw_seed`). Draw 0 gives the dataset's own `opt_v1`; under `mixture` each draw also picks
    the tile's preset anew.

    A dataset of 18 tiles holds 18 draws of the Stage 1 errors; redrawn each epoch, the same targets teach the
    refiner the degradation's distribution instead of those 18 draws."""

    preset: str
    config: Optional[DegradationConfig]
    seed: int

    @classmethod
    def from_record(cls, record: dict) -> "DegradationRedraw":
        """From the `opt_v1` part of a build record (`data_builders.build.read_build_info(dataset)["opt_v1"]`);
        ValueError for a dataset whose `opt_v1` is not synthetic, or was synthesised by another version."""
        cls.check_input_mode(record.get("mode"))
        if record.get("degradation_version") != DEGRADATION_VERSION:
            raise ValueError(f"its opt_v1 was synthesised by degradation version {record.get('degradation_version')}"
                             f", this is version {DEGRADATION_VERSION}; rebuild the dataset")
        degradation = record["degradation"]
        config = DegradationConfig.from_dict(degradation) if degradation is not None else None
        return cls(record["preset"], config, int(record["seed"]))

    @staticmethod
    def check_input_mode(mode) -> None:
        """ValueError unless a dataset's `input_mode` (`"synthetic"`, `"stage1"`, `"identity"`) can be redrawn."""
        if mode != "synthetic":
            raise ValueError(f"its opt_v1 is not synthetic (mode {mode!r}): only a degradation can be drawn again; "
                             "build the dataset with --degradation, or drop --redraw_degradation")

    def __call__(self, target: np.ndarray, tile_id: str, valid_mask: Optional[np.ndarray], draw: int) -> np.ndarray:
        """The `draw`-th synthetic `opt_v1` of a (4, H, W) target (float32, same shape)."""
        seed = draw_seed(self.seed, draw)
        _, config = config_for_tile(self.preset, self.config, seed, tile_id)
        return synthesize_opt_v1(target, tile_id, seed, config, valid_mask)


def mixture_choice(seed: int, tile_id: str) -> str:
    """The preset (`MIXTURE_PRESETS`, equal odds) a tile gets under `mixture`: a function of
    (seed, tile_id) only, drawn from the tile's stream 1 (never from its degradation stream)."""
    return MIXTURE_PRESETS[int(tile_rng(seed, tile_id, stream=1).integers(len(MIXTURE_PRESETS)))]


def config_for_tile(preset: str, config: Optional[DegradationConfig], seed: int, tile_id: str
                    ) -> tuple[str, DegradationConfig]:
    """`(preset name, config)` a tile is degraded with: `config` itself, or under `mixture` the
    preset `mixture_choice` picks. (`preset`, `config`) is what `resolve_degradation` returned."""
    if preset == MIXTURE:
        name = mixture_choice(seed, tile_id)
        return name, DEGRADATION_PRESETS[name]
    if config is None:
        raise ValueError(f"degradation {preset!r} needs a DegradationConfig")
    return preset, config


def shift_blur_axis(x: np.ndarray, sigma: float, shift: float, axis: int) -> np.ndarray:
    """Blur `x` along `axis` with a Gaussian of width `sigma` whose centre sits `shift` pixels
    away (output pixel i reads around source i + shift), clamping at the edges.

    `sigma == 0` is a pure sub-pixel shift (linear interpolation). Done with shifted slices, not
    matrix products: multi-threaded BLAS on a busy 2-core machine is ~30x slower. The taps are
    summed in order, in float32, into one buffer.
    """
    size = x.shape[axis]
    whole = math.floor(shift)
    frac = shift - whole
    if sigma > 0:  # taps covering +-3 sigma around the centre, which sits `frac` past `whole`
        offsets = np.arange(-math.ceil(3.0 * sigma - frac), math.ceil(3.0 * sigma + frac) + 1)
        weights = np.exp(-0.5 * ((offsets - frac) / sigma) ** 2)
        if weights.max() < 1e-200:  # far narrower than a pixel, every tap underflows (0 / 0 = NaN): the same
            squared = ((offsets - frac) / sigma) ** 2  # weights relative to the nearest tap
            weights = np.exp(-0.5 * (squared - squared.min()))
    else:
        offsets = np.array([0, 1])
        weights = np.array([1.0 - frac, frac])
    weights = (weights / weights.sum()).astype(np.float32)
    pad = int(np.abs(offsets + whole).max())
    padded = _edge_pad(x, pad, axis)
    out = np.empty(x.shape, dtype=np.float32)
    term = np.empty_like(out)
    window = [slice(None)] * x.ndim
    for i, (offset, weight) in enumerate(zip(offsets, weights)):
        start = pad + whole + int(offset)
        window[axis] = slice(start, start + size)
        np.multiply(padded[tuple(window)], weight, out=out if i == 0 else term)
        if i:
            out += term
    out += np.float32(0.0)  # -0.0 -> 0.0: the same bits as summing onto a zero-filled buffer
    return out


def _edge_pad(x: np.ndarray, pad: int, axis: int) -> np.ndarray:
    """`np.pad(x, pad, mode="edge")` along one axis (same dtype), without np.pad's overhead."""
    size = x.shape[axis]
    shape = list(x.shape)
    shape[axis] = size + 2 * pad
    padded = np.empty(shape, dtype=x.dtype)

    def along(part: slice) -> tuple:
        index = [slice(None)] * x.ndim
        index[axis] = part
        return tuple(index)

    padded[along(slice(pad, pad + size))] = x
    padded[along(slice(0, pad))] = x[along(slice(0, 1))]
    padded[along(slice(pad + size, None))] = x[along(slice(size - 1, size))]
    return padded


@functools.lru_cache(maxsize=64)
def _upsample_weights(points: int, size: int) -> tuple:
    """(lower, upper, 1 - frac, frac) of `linear_upsample_axis` (cached: they depend on sizes only)."""
    positions = np.linspace(0.0, points - 1, size)
    lower = np.minimum(np.floor(positions).astype(np.int64), points - 2)
    frac = (positions - lower).astype(np.float32)
    return lower, lower + 1, 1.0 - frac, frac


def linear_upsample_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Linear interpolation of `x` along `axis` to `size` samples, both ends kept."""
    lower, upper, keep, frac = _upsample_weights(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    out = np.take(x, lower, axis=axis).astype(np.result_type(x, keep), copy=False)
    out *= keep.reshape(shape)
    high = np.take(x, upper, axis=axis)
    high *= frac.reshape(shape)
    out += high
    return out


def crosstalk_matrix(rng: np.random.Generator, num_bands: int, max_fraction: float) -> np.ndarray:
    """Rows sum to 1: band i keeps 1 - c_i of itself and takes c_i from the others."""
    fractions = rng.uniform(0.0, max_fraction, size=num_bands)
    weights = rng.uniform(0.0, 1.0, size=(num_bands, num_bands))
    np.fill_diagonal(weights, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    return (np.diag(1.0 - fractions) + fractions[:, None] * weights).astype(np.float32)


def _mix_bands(mix: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`M x` over the band axis as float32 products summed band by band (no BLAS threads)."""
    out = np.multiply(mix[:, 0, None, None], x[0])
    term = np.empty_like(out)
    for j in range(1, x.shape[0]):
        np.multiply(mix[:, j, None, None], x[j], out=term)
        out += term
    out += np.float32(0.0)  # -0.0 -> 0.0, as when summing onto 0
    return out


def synthesize_opt_v1(
    target: np.ndarray,
    tile_id: str,
    seed: int = 0,
    config: Optional[DegradationConfig | str] = None,
    valid_mask: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Degrade a (4, H, W) reflectance target into a synthetic `opt_v1` (float32, same shape).

    Args:
        target: float32 reflectance; its invalid pixels (any value, 0 in a built tile) are filled with the
            mean of its valid pixels per band before the blur (`fill_invalid_pixels`), so they do not leak
            into their neighbours.
        tile_id: names the tile's random stream (with `seed`).
        seed: the dataset seed.
        config: the degradation parameters (`DegradationConfig()` by default), or a preset
            name (`DEGRADATION_CHOICES`; `"mixture"` picks `mild` or `strong` per tile).
        valid_mask: (H, W) bool; where it is False the target is filled (step 0) and `opt_v1` is 0.
    """
    if config is None or isinstance(config, str):
        config = config_for_tile(*resolve_degradation(config), seed, tile_id)[1]
    if target.ndim != 3 or target.shape[0] != len(config.gain_mean):
        raise ValueError(f"target must be (4, H, W), got {target.shape}")
    rng = tile_rng(seed, tile_id)
    num_bands, height, width = target.shape
    x = np.asarray(target, dtype=np.float32)
    if valid_mask is not None:  # step 0: the array itself (no copy) when every pixel is valid
        x = fill_invalid_pixels(x[None], np.asarray(valid_mask, dtype=bool)[None])[0]

    sigma = rng.uniform(*config.blur_sigma)
    shift_y, shift_x = rng.uniform(-config.max_shift, config.max_shift, size=2)
    x = shift_blur_axis(shift_blur_axis(x, sigma, shift_y, axis=1), sigma, shift_x, axis=2)

    mix = crosstalk_matrix(rng, num_bands, config.crosstalk)
    x = _mix_bands(mix, x)

    gain = np.asarray(config.gain_mean) + config.gain_std * np.clip(rng.standard_normal(num_bands), -3, 3)
    offset = np.asarray(config.offset_mean) + config.offset_std * np.clip(rng.standard_normal(num_bands), -3, 3)
    x *= gain.astype(np.float32)[:, None, None]
    x += offset.astype(np.float32)[:, None, None]

    grid = rng.standard_normal((num_bands, config.low_freq_grid, config.low_freq_grid)).astype(np.float32)
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    # the optional steps draw after everything else, so the draws above never depend on them
    haze = rng.uniform(*config.haze) if config.has_haze else 0.0
    gamma = math.exp(rng.uniform(*np.log(config.tone_gamma))) if config.has_tone_curve else 1.0
    if config.has_haze:  # 3a
        x += (haze * config.haze_weights()).astype(np.float32)[:, None, None]
    if config.has_tone_curve:  # 3b
        np.maximum(x, np.float32(0.0), out=x)
        np.power(x, np.float32(gamma), out=x)

    field = linear_upsample_axis(linear_upsample_axis(grid, height, axis=1), width, axis=2)
    field *= np.float32(config.low_freq_std)
    field += np.float32(1.0)
    x *= field

    scale = np.abs(x)  # the noise's standard deviation: noise_std * |x| + noise_floor
    scale *= np.float32(config.noise_std)
    scale += np.float32(config.noise_floor)
    noise *= scale
    x += noise
    np.clip(x, config.clip[0], config.clip[1], out=x)
    if valid_mask is not None and not valid_mask.all():
        x[:, ~valid_mask] = 0.0
    return x.astype(np.float32, copy=False)

