"""Configuration of the Prithvi-EO-2.0 encoder: presets of the released models and named bands."""
from __future__ import annotations

import copy
import inspect
import math
import numbers
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PretrainedConfig

# Bands the released Prithvi-EO-2.0 checkpoints were pretrained on (HLS), in checkpoint channel order.
PRETRAINED_BANDS: tuple[str, ...] = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")

# Official per-band normalisation statistics, reflectance x 10000.
PRETRAINED_BAND_MEAN: dict[str, float] = {
    "BLUE": 1087.0,
    "GREEN": 1342.0,
    "RED": 1433.0,
    "NIR_NARROW": 2734.0,
    "SWIR_1": 1958.0,
    "SWIR_2": 1363.0,
}
PRETRAINED_BAND_STD: dict[str, float] = {
    "BLUE": 2248.0,
    "GREEN": 2179.0,
    "RED": 2178.0,
    "NIR_NARROW": 1850.0,
    "SWIR_1": 1242.0,
    "SWIR_2": 1049.0,
}

# Sentinel-2 band names -> the HLS band whose pretrained weights they use.
# B08 is the *broad* NIR band (~833 nm, 106 nm wide); Prithvi was pretrained on narrow NIR (HLS B05,
# Sentinel-2 B8A). This project's product has B08 only, so B08 takes NIR_NARROW's weights by design.
SENTINEL2_TO_HLS: dict[str, str] = {
    "B02": "BLUE",
    "B03": "GREEN",
    "B04": "RED",
    "B08": "NIR_NARROW",
    "B8A": "NIR_NARROW",
    "B11": "SWIR_1",
    "B12": "SWIR_2",
}

# Arguments of the official `PrithviMAE` that only concern the MAE decoder or pre-training; accepted
# (so an official config dict can be passed as is) and dropped.
_MAE_ONLY_ARGUMENTS = (
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "mask_ratio",
    "norm_pix_loss",
)

_RELEASED = {"img_size": 224, "num_frames": 4, "bands": PRETRAINED_BANDS, "mlp_ratio": 4.0}
_TL = {"coords_encoding": ("time", "location"), "coords_scale_learn": True}

PRITHVI_PRESETS: dict[str, dict[str, Any]] = {
    "prithvi_eo_v2_600m": {**_RELEASED, "patch_size": (1, 14, 14), "embed_dim": 1280, "depth": 32, "num_heads": 16},
    "prithvi_eo_v2_300m": {**_RELEASED, "patch_size": (1, 16, 16), "embed_dim": 1024, "depth": 24, "num_heads": 16},
    "prithvi_eo_v2_100m": {**_RELEASED, "patch_size": (1, 16, 16), "embed_dim": 768, "depth": 12, "num_heads": 12},
    # A 0.28M-parameter model with the 600M's patch size, for tests and the CPU demo.
    "prithvi_eo_v2_tiny": {
        "img_size": 224,
        "num_frames": 1,
        "bands": PRETRAINED_BANDS,
        "mlp_ratio": 4.0,
        "patch_size": (1, 14, 14),
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 4,
    },
}
for _name in ("prithvi_eo_v2_600m", "prithvi_eo_v2_300m", "prithvi_eo_v2_100m"):
    PRITHVI_PRESETS[f"{_name}_tl"] = {**PRITHVI_PRESETS[_name], **_TL}
del _name

_COORDS_ENCODINGS = ("time", "location")


def canonical_band_name(band: str) -> str:
    """The pretrained (HLS) band whose weights and statistics `band` uses; raises on unknown names."""
    name = str(band).upper()
    if name in PRETRAINED_BAND_MEAN:
        return name
    if name in SENTINEL2_TO_HLS:
        return SENTINEL2_TO_HLS[name]
    known = ", ".join(PRETRAINED_BANDS + tuple(SENTINEL2_TO_HLS))
    raise ValueError(
        f"Unknown band name {band!r}: Prithvi-EO-2.0 has pretrained weights only for {known}. "
        "Rename the band to one of these (Sentinel-2 or HLS names) or drop it; unknown bands are never "
        "given zero or random weights."
    )


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _positive_int(name: str, value, fix: str = "") -> int:
    """`value` as an int, or a ValueError naming the field `name` (bools, strings and fractions are refused)."""
    if not _is_number(value) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.{' ' + fix if fix else ''}")
    return int(value)


def _positive_float(name: str, value, fix: str = "", allow_zero: bool = False) -> float:
    if not _is_number(value) or not (float(value) >= 0 if allow_zero else float(value) > 0):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}.{' ' + fix if fix else ''}")
    return float(value)


def _boolean(name: str, value) -> bool:
    """`value` if it is a bool; anything else (`"false"`, 0, None) is refused rather than read by truthiness."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


class CheckedOverridesMixin:
    """`from_dict(d, **kwargs)` (and so `from_pretrained(path, head_width=64)`, the model's too) with the overrides
    that name an `__init__` argument passed to `__init__`, so they go through its checks: transformers sets
    overrides with `setattr` after `__init__`, past every one of them. A transformers name of one
    (`attribute_map`: `num_hidden_layers` for `depth`) counts as that argument."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        arguments = inspect.signature(cls.__init__).parameters
        aliases = getattr(cls, "attribute_map", {})
        own = {}
        for name in list(kwargs):
            argument = aliases.get(name, name)
            if (argument in arguments and argument != "self"
                    and arguments[argument].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD):
                own[argument] = kwargs.pop(name)
        return super().from_dict({**config_dict, **own}, **kwargs)


def _band_names(bands) -> list[str] | None:
    """`bands` as the pretrained bands they take (`B02` and `BLUE` are one); None where a name is unknown (left to
    `__init__`, which names it)."""
    try:
        return [canonical_band_name(band) for band in bands]
    except (ValueError, TypeError):
        return None


def _normalise_patch_size(patch_size) -> list[int]:
    fix = "Give an int p (meaning (1, p, p)) or three positive ints (t, h, w), e.g. patch_size=(1, 14, 14)."
    if isinstance(patch_size, numbers.Real):
        size = _positive_int("patch_size", patch_size, fix)
        return [1, size, size]
    if isinstance(patch_size, str) or not hasattr(patch_size, "__len__") or len(patch_size) != 3:
        raise ValueError(f"patch_size must be an int or (t, h, w), got {patch_size!r}. {fix}")
    return [_positive_int("patch_size", p, fix) for p in patch_size]


def _normalise_img_size(img_size) -> int | list[int]:
    fix = "Give an int or (height, width) in pixels, e.g. img_size=224."
    if isinstance(img_size, numbers.Real):
        return _positive_int("img_size", img_size, fix)
    if isinstance(img_size, str) or not hasattr(img_size, "__len__") or len(img_size) != 2:
        raise ValueError(f"img_size must be an int or (height, width), got {img_size!r}. {fix}")
    size = [_positive_int("img_size", s, fix) for s in img_size]
    return size[0] if size[0] == size[1] else size


@strict
class PrithviConfig(CheckedOverridesMixin, PretrainedConfig):
    r"""
    Configuration of a Prithvi-EO-2.0 encoder ([`PrithviEncoder`]). The defaults are those of the released
    Prithvi-EO-2.0-600M; [`PrithviConfig.from_preset`] builds the other released sizes and a tiny test model.

    Args:
        img_size (`int` or `(int, int)`, *optional*, defaults to 224):
            Image size the fixed position table is built for. Other input sizes are supported: the table is
            interpolated bicubically (align_corners=True) to the input's patch grid, as the official code does.
        patch_size (`int` or `(int, int, int)`, *optional*, defaults to `(1, 14, 14)`):
            Patch size (frames, height, width) of the Conv3d patch embedding. An int `p` means `(1, p, p)`.
        num_frames (`int`, *optional*, defaults to 4):
            Number of frames the position table is built for (the released checkpoints use 4). A 4-D input
            (B, C, H, W) is always one frame; its position table is recomputed for one frame, as the official
            code does for a frame count other than `num_frames`.
        bands (`tuple[str]`, *optional*):
            Names of the input channels, in order. HLS names (`BLUE`, `GREEN`, `RED`, `NIR_NARROW`, `SWIR_1`,
            `SWIR_2`) or Sentinel-2 names (`B02`, `B03`, `B04`, `B08`, `B8A`, `B11`, `B12`), which use the
            weights of the HLS band they map to. `B08` is the broad NIR band; it takes NIR_NARROW's weights by
            design (Prithvi was pretrained on narrow NIR). Unknown names raise an error. Defaults to the first
            `in_chans` pretrained bands (all six when `in_chans` is not given either).
        in_chans (`int`, *optional*):
            Number of input channels; must equal `len(bands)` when both are given.
        embed_dim (`int`, *optional*, defaults to 1280):
            Token embedding width.
        depth (`int`, *optional*, defaults to 32):
            Number of transformer blocks.
        num_heads (`int`, *optional*, defaults to 16):
            Attention heads per block; must divide `embed_dim`.
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            Width of the MLP hidden layer relative to `embed_dim`.
        coords_encoding (`list[str]`, *optional*, defaults to `[]`):
            Extra encodings of the -TL variants: `"time"` (year, day of year) and/or `"location"` (lat, lon).
        coords_scale_learn (`bool`, *optional*, defaults to `False`):
            Whether the temporal/location encodings have a learned `scale` parameter (the -TL checkpoints do);
            otherwise `scale` is a fixed buffer of ones.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every LayerNorm. The official model uses `nn.LayerNorm`'s default, 1e-5 (the reference
            fixtures agree to ~2e-6 with 1e-5 and differ by ~3e-3 with 1e-6).
        band_mean (`list[float]`, *optional*):
            Per-band mean (reflectance x 10000), aligned with `bands`. Defaults to the official statistics.
        band_std (`list[float]`, *optional*):
            Per-band standard deviation (reflectance x 10000), aligned with `bands`. Defaults to the official
            statistics.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the CLS token.
        output_hidden_states (`bool`, *optional*, defaults to `True`):
            Whether the forward returns the per-block hidden states (the official `forward_features` output).
        attn_implementation (`str`, *optional*):
            The attention implementation (a [`PretrainedConfig`] argument): `"eager"` (plain torch; the only one
            that returns attention maps), `"sdpa"` (`torch.nn.functional.scaled_dot_product_attention`, the default
            when not set), `"flash_attention_2"`/`"flash_attention_3"` or `"flex_attention"` where installed.
            Unknown values are refused when the model is built.
        output_attentions (`bool`, *optional*, defaults to `False`):
            Whether the forward returns per-block attention maps (needs `attn_implementation="eager"`).
        kwargs:
            Passed to [`PretrainedConfig`]. The official MAE's decoder/pre-training arguments
            (`decoder_embed_dim`, `decoder_depth`, `decoder_num_heads`, `mask_ratio`, `norm_pix_loss`) are
            accepted and ignored, so an official config dict can be passed as is.

    Example:

    ```python
    >>> from modeling_stage2 import PrithviConfig, PrithviEncoder
    >>> config = PrithviConfig.from_preset("prithvi_eo_v2_tiny", bands=("B02", "B03", "B04", "B08"))
    >>> model = PrithviEncoder(config)
    ```
    """

    model_type = "prithvi_eo_v2"
    attribute_map = {"hidden_size": "embed_dim", "num_hidden_layers": "depth", "num_attention_heads": "num_heads"}

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int, int] = (1, 14, 14),
        num_frames: int = 4,
        bands: tuple[str, ...] | list[str] | None = None,
        in_chans: int | None = None,
        embed_dim: int = 1280,
        depth: int = 32,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        coords_encoding: tuple[str, ...] | list[str] | None = None,
        coords_scale_learn: bool = False,
        layer_norm_eps: float = 1e-5,
        band_mean: list[float] | None = None,
        band_std: list[float] | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        for name in _MAE_ONLY_ARGUMENTS:
            kwargs.pop(name, None)
        if kwargs.pop("drop_path", 0.0):
            raise ValueError("drop_path (stochastic depth) is not supported by this port; use drop_path=0.")
        kwargs.setdefault("output_hidden_states", True)

        self._set_checked_fields(
            img_size=img_size, patch_size=patch_size, num_frames=num_frames, in_chans=in_chans, bands=bands,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            coords_encoding=coords_encoding, coords_scale_learn=coords_scale_learn, layer_norm_eps=layer_norm_eps,
            band_mean=band_mean, band_std=band_std, initializer_range=initializer_range,
        )
        self._check_architecture()
        self._check_band_statistics()
        super().__init__(**kwargs)

    def _set_checked_fields(
        self, *, img_size, patch_size, num_frames, in_chans, bands, embed_dim, depth, num_heads, mlp_ratio,
        coords_encoding, coords_scale_learn, layer_norm_eps, band_mean, band_std, initializer_range,
    ) -> None:
        """Check and normalise every field (an error names the field and the fix), then set it. `__init__` sets its
        arguments with it and `validate` re-sets the current values, so each check has one definition. Types and
        positivity come first: `_check_architecture` divides by them."""
        self.img_size = _normalise_img_size(img_size)
        self.patch_size = _normalise_patch_size(patch_size)
        self.num_frames = _positive_int("num_frames", num_frames, "The released checkpoints use num_frames=4.")
        if in_chans is not None:
            in_chans = _positive_int("in_chans", in_chans, "Or leave it unset and name the input bands with `bands=`.")
        self.bands = self._resolve_bands(bands, in_chans)
        self.in_chans = len(self.bands)
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        self.depth = _positive_int("depth", depth)
        self.num_heads = _positive_int("num_heads", num_heads, "It must divide embed_dim.")
        self.mlp_ratio = _positive_float("mlp_ratio", mlp_ratio, "The released models use mlp_ratio=4.0.")
        self.coords_encoding = self._resolve_coords_encoding(coords_encoding)
        self.coords_scale_learn = _boolean("coords_scale_learn", coords_scale_learn)
        self.layer_norm_eps = _positive_float("layer_norm_eps", layer_norm_eps, "The official value is 1e-5.")
        self.band_mean = self._resolve_band_stats(band_mean, PRETRAINED_BAND_MEAN, "band_mean")
        self.band_std = self._resolve_band_stats(band_std, PRETRAINED_BAND_STD, "band_std")
        self.initializer_range = _positive_float("initializer_range", initializer_range, allow_zero=True)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """As `CheckedOverridesMixin`'s, refusing a `bands` override other than the bands `config_dict` was saved
        with: its `band_mean`/`band_std` and a saved encoder's patch-embedding weights are per channel, for those
        (the same number of other bands would load with another band's statistics and weights)."""
        saved, given = config_dict.get("bands"), kwargs.get("bands")
        names = None if given is None or isinstance(given, str) else _band_names(given)  # unknown: __init__ names it
        if saved is not None and names is not None and names != _band_names(saved):
            raise ValueError(
                f"bands={tuple(given)} differs from the bands this config was saved with ({', '.join(saved)}): its "
                "band_mean/band_std and its encoder's patch-embedding weights are per channel, for those. Load it "
                "without bands=, or convert the official checkpoint again with the bands you need "
                "(stage2-convert-prithvi --bands ...)."
            )
        return super().from_dict(config_dict, **kwargs)

    def to_diff_dict(self) -> dict[str, Any]:
        # transformers leaves out values equal to PretrainedConfig's defaults; this config's output_hidden_states
        # defaults to True (not False), so a saved False would load back as True without the key.
        return {**super().to_diff_dict(), "output_hidden_states": self.output_hidden_states}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PrithviConfig":
        """Config of a released model (`prithvi_eo_v2_600m`, `..._300m`, `..._100m`, their `_tl` variants) or
        of `prithvi_eo_v2_tiny`, with `overrides` applied (e.g. `bands=("B02", "B03", "B04", "B08")`)."""
        if name not in PRITHVI_PRESETS:
            raise ValueError(f"Unknown Prithvi preset {name!r}; choose one of {sorted(PRITHVI_PRESETS)}.")
        arguments = copy.deepcopy(PRITHVI_PRESETS[name])
        if "in_chans" in overrides and "bands" not in overrides:
            arguments.pop("bands")  # in_chans alone selects the first in_chans pretrained bands
        arguments.update(overrides)
        return cls(**arguments)

    @property
    def pretrained_band_names(self) -> tuple[str, ...]:
        """The HLS band each input channel takes its pretrained weights from."""
        return tuple(canonical_band_name(band) for band in self.bands)

    @property
    def image_size(self) -> tuple[int, int]:
        """`img_size` as (height, width)."""
        size = self.img_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Patch grid (t, h, w) of the stored position table."""
        height, width = self.image_size
        patch_t, patch_h, patch_w = self.patch_size
        return (self.num_frames // patch_t, height // patch_h, width // patch_w)

    @staticmethod
    def _resolve_bands(bands, in_chans) -> list[str]:
        if bands is None:
            count = len(PRETRAINED_BANDS) if in_chans is None else int(in_chans)
            if not 1 <= count <= len(PRETRAINED_BANDS):
                raise ValueError(
                    f"in_chans={in_chans} without band names: only the {len(PRETRAINED_BANDS)} pretrained bands "
                    f"{PRETRAINED_BANDS} can be chosen by count; name the bands with `bands=`."
                )
            return list(PRETRAINED_BANDS[:count])
        if isinstance(bands, str):
            raise ValueError(f"bands must be a sequence of band names, got the string {bands!r}")
        names = [str(band) for band in bands]
        if not names:
            raise ValueError("bands is empty: give at least one band name.")
        for band in names:
            canonical_band_name(band)
        upper = [band.upper() for band in names]  # band names are case-insensitive (`canonical_band_name`)
        duplicates = sorted({band for band in names if upper.count(band.upper()) > 1})
        if duplicates:
            raise ValueError(f"bands lists {duplicates} more than once: {names}")
        if in_chans is not None and int(in_chans) != len(names):
            raise ValueError(
                f"in_chans={in_chans} does not match the {len(names)} bands {names}: give one of them, or both "
                "consistently."
            )
        return names

    @staticmethod
    def _resolve_coords_encoding(coords_encoding) -> list[str]:
        if coords_encoding is None:
            return []
        if isinstance(coords_encoding, str) or not hasattr(coords_encoding, "__iter__"):
            hint = f"; for one encoding write [{coords_encoding!r}]" if isinstance(coords_encoding, str) else ""
            raise ValueError(
                f"coords_encoding must be a list of names from {_COORDS_ENCODINGS}, got {coords_encoding!r}{hint}."
            )
        encodings = list(coords_encoding)
        unknown = [name for name in encodings if name not in _COORDS_ENCODINGS]
        if unknown:
            raise ValueError(f"coords_encoding accepts {_COORDS_ENCODINGS}, got {unknown}")
        return encodings

    def _resolve_band_stats(self, values, defaults: dict[str, float], name: str) -> list[float]:
        if values is None:
            return [defaults[canonical_band_name(band)] for band in self.bands]
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ValueError(f"{name} must be a list of numbers, one per band of `bands`, got {values!r}.")
        if name == "band_std":
            return [_positive_float(name, value, "A standard deviation must be > 0.") for value in values]
        if not all(_is_number(value) for value in values):
            raise ValueError(f"{name} must hold finite numbers, one per band of `bands`, got {values!r}.")
        return [float(value) for value in values]

    # `validate_*` methods are transformers' (`@strict`) config validators: they run after `__init__` and again at
    # `save_pretrained`, so a field changed after construction is caught too. `__init__` calls the same checks
    # first so that a bad argument raises a plain ValueError naming the field. They run in name order, so
    # validate_architecture (first) re-checks every field before the divisions of `_check_architecture`.
    def validate_architecture(self) -> None:
        super().validate_architecture()
        fields = inspect.signature(self._set_checked_fields).parameters
        self._set_checked_fields(**{name: getattr(self, name) for name in fields})
        self._check_architecture()

    def validate_band_statistics(self) -> None:
        self._check_band_statistics()

    def _check_band_statistics(self) -> None:
        for name in ("band_mean", "band_std"):
            values = getattr(self, name)
            if len(values) != len(self.bands):
                raise ValueError(
                    f"{name} has {len(values)} values for the {len(self.bands)} bands {list(self.bands)}: give one "
                    f"value per band, in the order of `bands`, or leave {name} unset to use the official statistics."
                )

    def _check_architecture(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be a multiple of num_heads ({self.num_heads}): choose num_heads "
                f"among the divisors of {self.embed_dim}."
            )
        if self.embed_dim % 16:
            # The 3D sin-cos table splits the width 6/16 (w), 6/16 (h), 4/16 (t), each into sin/cos halves.
            raise ValueError(f"embed_dim ({self.embed_dim}) must be a multiple of 16 for the 3D sin-cos table.")
        if "time" in self.coords_encoding and self.patch_size[0] != 1:
            raise ValueError(
                f"The temporal encoding needs patch_size[0] == 1, got patch_size={self.patch_size}: set "
                "patch_size=(1, h, w) or drop 'time' from coords_encoding."
            )
        if min(self.grid_size) < 1:
            raise ValueError(
                f"img_size {self.img_size} / num_frames {self.num_frames} is smaller than one patch {self.patch_size}."
            )


# `import modeling_stage2` registers the config with AutoConfig (the model half is in modeling_prithvi.py).
AutoConfig.register(PrithviConfig.model_type, PrithviConfig, exist_ok=True)


__all__ = [
    "PRETRAINED_BANDS",
    "PRETRAINED_BAND_MEAN",
    "PRETRAINED_BAND_STD",
    "PRITHVI_PRESETS",
    "SENTINEL2_TO_HLS",
    "PrithviConfig",
    "canonical_band_name",
]
