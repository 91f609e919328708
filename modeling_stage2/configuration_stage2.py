"""Configuration of the Stage 2 refiner: Prithvi backbone, metadata conditioning, ConvNeXt head, LoRA defaults."""
from __future__ import annotations

import copy
import math
import operator
from pathlib import Path
from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import CONFIG_NAME

from .bands import BAND_NAMES, NUM_BIOMES, NUM_MONTHS, UNKNOWN_METADATA
from .configuration_prithvi import CheckedOverridesMixin, PrithviConfig, canonical_band_name

DEFAULT_BACKBONE_PRESET = "prithvi_eo_v2_600m"

# The backbone linears LoRA may adapt (never `patch_embed.proj`, whose input is the fused image).
LORA_TARGETS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
# Each target's module name in a backbone block, as a regex: LoRA adapts them, 8/4-bit quantizes them (only them).
BLOCK_LINEAR_PATTERNS: dict[str, str] = {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "fc1": r"mlp\.fc1",
                                         "fc2": r"mlp\.fc2"}

PADDING_MODES: tuple[str, ...] = ("reflect", "replicate")

# Per-tile spectral correction branches: "none" (the head's residual only, as models saved before the branch
# existed), "affine" (a 4x4 + bias colour transform of `opt_v1`, predicted per tile) or "shared" (the same transform
# for every tile).
SPECTRAL_CORRECTIONS: tuple[str, ...] = ("none", "affine", "shared")

# With `out_of_range_fallback`: the output is `opt_v1` entirely at this multiple of the threshold distance (a ramp as
# wide as the threshold; chosen before measuring, see docs/quality.md).
OUT_OF_RANGE_RAMP = 2.0

# With `near_black_fallback`: `opt_v1` is kept entirely where its red + NIR reflectance is at most this (water, deep
# shadow: NDVI is a ratio of noise there) and the refiner's own output is used from `NEAR_BLACK_RAMP` times it on,
# linear between. Both fixed before measuring (the quality studies' near-black threshold, a ramp as wide as it; see
# docs/quality.md).
NEAR_BLACK_THRESHOLD = 0.02
NEAR_BLACK_RAMP = 2.0
# The bands whose sum is a pixel's brightness for `near_black_fallback`: those of NDVI.
NEAR_BLACK_BANDS: tuple[str, ...] = ("B04", "B08")
# What `near_black_fallback` keeps of `opt_v1` at a near-black pixel: "pixel", all of it; "ndvi", only its split of
# red + NIR (its NDVI), with the refiner's own red + NIR sum and other bands.
NEAR_BLACK_KEEPS: tuple[str, ...] = ("pixel", "ndvi")


class Stage2RefinerConfig(CheckedOverridesMixin, PretrainedConfig):
    r"""
    Configuration of a [`Stage2RefinerModel`]: the Stage 2 refiner that turns the synthetic Sentinel-2 image `opt_v1`
    into a refined one. The month and biome of the tile are embedded, projected to `metadata_channels` maps, fused
    with `opt_v1` back to the backbone's bands, encoded by a Prithvi-EO-2.0 backbone, and a ConvNeXt head predicts a
    residual at full resolution (`refined = opt_v1 + delta`). With `spectral_correction="affine"` a per-tile colour
    correction of `opt_v1` comes first (`refined = (M + dM) opt_v1 + (b + db) + delta`, see the argument), and with
    `spectral_mlp_hidden_size > 0` a per-pixel spectral MLP adds a non-linear colour correction before the head.

    Building the config allocates nothing: the default describes the 600M backbone without loading it.

    Args:
        backbone_config (`PrithviConfig`, `dict` or `str`, *optional*):
            The Prithvi encoder: a [`PrithviConfig`], its dict, or a preset name of
            `PrithviConfig.from_preset` (e.g. `"prithvi_eo_v2_tiny"`). Presets and dicts without `bands` get the
            refiner's `bands`. Defaults to the `prithvi_eo_v2_600m` preset with bands B02 B03 B04 B08. The refiner
            works on single frames: the backbone's temporal patch size (`patch_size[0]`) must be 1.
        backbone_weights (`str`, *optional*):
            Where the pretrained backbone weights come from when a fresh model is built
            (`Stage2RefinerModel.load_backbone_weights`, `build_trainable_model`): a Hub repo id
            (`"ibm-nasa-geospatial/Prithvi-EO-2.0-600M"`, optionally `"OWNER/REPO/FILE.pt"`), an official
            `Prithvi_EO_V2_*.pt` file (local or `hf://OWNER/REPO/FILE.pt`), or a folder written by
            `stage2-convert-prithvi`. `None` keeps the random initialisation (tests, demos). An existing local path
            is kept as its absolute path, so a saved config names the same weights wherever it is loaded.
            `from_pretrained` of a saved refiner never reads it: the saved weights are used.
        bands (`tuple[str]`, *optional*, defaults to `("B02", "B03", "B04", "B08")`):
            Names of the input (and output) channels of `opt_v1`, reflectance 0..1. Each must map to the backbone
            band at the same position (B08, the broad NIR band, takes Prithvi's narrow-NIR weights by design).
        num_months (`int`, *optional*, defaults to 12):
            Months are coded 1..`num_months`; `UNKNOWN_METADATA` (-1) marks a tile without a month.
        num_biomes (`int`, *optional*, defaults to 17):
            Biomes are coded 0..`num_biomes - 1` (IGBP-like); `UNKNOWN_METADATA` (-1) marks a tile without one.
        metadata_embed_dim (`int`, *optional*, defaults to 32):
            Width of the learned month and biome embeddings and of the metadata MLP.
        metadata_channels (`int`, *optional*, defaults to 4):
            Number of maps the metadata vector is projected to and broadcast over the tile before fusion with
            `opt_v1`.
        feature_layers (`list[int]`, *optional*):
            Backbone blocks (0-based; negative values count from the end) whose outputs feed the head. Defaults to
            four evenly spaced depths ending with the last block (blocks 7, 15, 23, 31 of the 600M backbone).
        num_convnext_blocks (`int`, *optional*, defaults to 4):
            Number of ConvNeXt blocks of the head, one per upsampling stage: stage `i` of `n` works at 1/2^(n-1-i)
            of the (padded) input size, never coarser than the patch grid, so the last one is at full resolution.
        head_width (`int`, *optional*, defaults to 256):
            Channels of the first head stage; each following stage halves it, never below 16.
        layer_scale_init_value (`float`, *optional*, defaults to 1e-6):
            Initial value of the ConvNeXt layer scale (0 disables layer scale); must be >= 0.
        drop_path_rate (`float`, *optional*, defaults to 0.1):
            Stochastic-depth rate of the last head block; earlier blocks get linearly smaller rates. Training only.
        padding_mode (`str`, *optional*, defaults to `"reflect"`):
            How the input is padded to a multiple of the patch size so that no border pixel is dropped
            (120 -> 126 for the 14-px patch, split between both sides): `"reflect"` mirrors the image without
            repeating the edge, `"replicate"` repeats the edge pixels. Inputs too small to mirror fall back to
            `"replicate"`. The padding is cropped off the output.
        lora_r (`int`, *optional*, defaults to 8):
            Default LoRA rank used by `build_trainable_model`.
        lora_alpha (`int`, *optional*, defaults to 16):
            Default LoRA scaling numerator (the update is scaled by `lora_alpha / lora_r`).
        lora_dropout (`float`, *optional*, defaults to 0.1):
            Default dropout on the LoRA input.
        lora_target_modules (`tuple[str]`, *optional*, defaults to `("qkv", "proj", "fc1", "fc2")`):
            Backbone block linears that receive LoRA adapters; a subset of `("qkv", "proj", "fc1", "fc2")` (the
            attention projections and the MLP). The patch embedding never does.
        unfreeze_last_n_blocks (`int`, *optional*):
            When set, only the last `n` backbone blocks receive LoRA adapters (the earlier ones stay fully frozen);
            `None` adapts every block.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the head's and embeddings' weights.
        spectral_correction (`str`, *optional*, defaults to `"none"`):
            `"affine"` adds a spectral-correction branch: each tile's `opt_v1` first goes through its own affine
            colour transform, `corrected = (M + dM) opt_v1 + (b + db)` per pixel, and the head's residual is added
            to `corrected`. `M` (bands x bands) and `b` (bands) are shared by all tiles (identity and zero at
            initialisation; training can start them at the least-squares colour fit of the training split);
            `dM`, `db` are predicted per tile from the mean backbone features, the month/biome embedding and the
            per-band mean and spread of the tile, by an MLP whose last layer starts at zero. So the model can
            express any per-band affine correction from step 0, conditioned on the tile's content, month and
            biome, and the head adds the local, spatial correction on top. `"none"` (the default, so that models
            saved before this option load and compute exactly as before) has no such branch. `"shared"` keeps only
            the shared `M`, `b` (no `dM`, `db`): one colour correction for every tile, for training sets too small
            to learn a per-tile one (on the 18 tiles of the bundled sample the per-tile part overfits). Training
            (`Stage2TrainingArguments.spectral_correction`) builds new refiners with `"affine"`.
        spectral_correction_hidden_size (`int`, *optional*, defaults to 64):
            Width of the MLP that predicts the per-tile correction `dM`, `db` (with `spectral_correction="affine"`).
        spectral_mlp_hidden_size (`int`, *optional*, defaults to 0):
            Width of the per-pixel spectral MLP; 0 (the default, so that models saved before this option load and
            compute exactly as before) means none. The MLP maps each pixel's spectrum, after the spectral correction
            (or `opt_v1` without one), to a residual added to it: a non-linear colour correction (tone curves, band
            cross-talk that depends on brightness) that a 4x4 + bias cannot express. It sees the log reflectance
            (`log(max(x, 0) + spectral_mlp_log_offset)`), in which the gain errors of a Stage 1 generator are
            offsets and bright pixels (cloud, snow) are compressed instead of extrapolated. It is fed neither
            the month, the biome nor the neighbourhood: it learns from pixels, not tiles, so a few training tiles
            are enough. Its last layer starts at zero. Training (`Stage2TrainingArguments.spectral_mlp_hidden_size`)
            builds new refiners with 32.
        spectral_mlp_num_layers (`int`, *optional*, defaults to 2):
            Hidden layers of the per-pixel spectral MLP (with `spectral_mlp_hidden_size > 0`).
        spectral_mlp_log_offset (`float`, *optional*, defaults to 0.05):
            Reflectance added before the log of the spectral MLP's input: well above the quantisation step (1e-4)
            and the noise of open water, so dark pixels do not dominate the input.
        nonnegative_output (`bool`, *optional*, defaults to `False`):
            Clamp the refined output at 0: surface reflectance is never negative, and a negative value (an affine
            correction's negative offset on open water, say) wrecks the spectral angle and NDVI of dark pixels. The
            gradient passes straight through the clamp, so training still learns to lift pixels predicted below 0.
            `False` (the default) keeps the output unbounded, as models saved before this option computed it;
            training (`Stage2TrainingArguments.nonnegative_output`) builds new refiners with `True`.
        out_of_range_fallback (`bool`, *optional*, defaults to `False`):
            Leave `opt_v1` as it is at pixels whose spectrum lies outside the spectra the refiner was trained on:
            the refiner then carries the statistics of its training pixels' log spectra (`spectral_mlp_log_offset`,
            as the spectral MLP sees them: mean, inverse covariance and a threshold on the Mahalanobis distance,
            fitted by training and saved with the model or adapter), `refined` is blended towards `opt_v1` beyond the
            threshold, completely from `out_of_range_ramp` times it (before the non-negative clamp), and the output
            carries the blend weight (`out_of_range_weight`) so users see where the refiner declined. Every
            correction extrapolates on a spectrum it never saw (cloud, snow, a colour cast no training tile had) and
            can be worse there than Stage 1's own image; how much this helps depends on the generator, see
            docs/quality.md. Until the statistics are fitted (a fresh model) the weight is 0 everywhere. `False`
            (the default, so that models saved before this option load and compute exactly as before): no
            statistics, no blend.
        out_of_range_ramp (`float`, *optional*, defaults to 2.0):
            With `out_of_range_fallback`: the multiple of the threshold distance at which the output is `opt_v1`
            entirely (linear in the distance from the threshold, where the blend starts); must be > 1.
        near_black_fallback (`bool`, *optional*, defaults to `False`):
            Leave `opt_v1` as it is at its near-black pixels (open water, deep shadow): where its red + NIR
            reflectance (B04 + B08, which `bands` must hold) is at most `near_black_threshold`, `refined` is
            `opt_v1`, and from `near_black_ramp` times it on the refiner's own output, linear between (before the
            non-negative clamp). There NDVI is a ratio of two noisy, near-zero values, and a colour correction fitted
            to all pixels (its offsets above all) moves it further than Stage 1 got it wrong. Nothing is fitted: the
            rule is the config's. With `out_of_range_fallback` too, a pixel keeps the larger of the two weights;
            either way the output carries the weight (`out_of_range_weight`). `False` (the default, so that models
            saved before this option load and compute exactly as before): no blend.
        near_black_threshold (`float`, *optional*, defaults to 0.02):
            With `near_black_fallback`: the red + NIR reflectance up to which the output is `opt_v1` entirely; > 0.
        near_black_ramp (`float`, *optional*, defaults to 2.0):
            With `near_black_fallback`: the multiple of `near_black_threshold` from which the output is the refiner's
            own; must be > 1.
        near_black_keep (`str`, *optional*, defaults to `"pixel"`):
            With `near_black_fallback`, what of `opt_v1` the blend keeps at a near-black pixel: `"pixel"` (the
            default, as before this option) all four bands; `"ndvi"` only its NDVI, the split of red + NIR between
            the two bands. With `"ndvi"` the refiner's own red + NIR sum is divided as `opt_v1` divides its own (evenly
            where `opt_v1`'s red + NIR is zero) and its other bands are left alone: NDVI there is a ratio of noise
            that a correction only moves, while the brightness and the spectral angle it corrects are kept. The
            weight is the same either way.
        kwargs:
            Passed to [`PretrainedConfig`] (e.g. `output_hidden_states`, `return_dict`).

    Example:

    ```python
    >>> from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel
    >>> config = Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", head_width=32)
    >>> model = Stage2RefinerModel(config)
    ```
    """

    model_type = "stage2_refiner"
    # The backbone's config is a sub-config: `attn_implementation` set on the refiner (at construction or at
    # `from_pretrained`) reaches it.
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=PrithviConfig)}

    def __init__(
        self,
        backbone_config: PrithviConfig | dict | str | None = None,
        backbone_weights: str | None = None,
        bands: tuple[str, ...] | list[str] = BAND_NAMES,
        num_months: int = NUM_MONTHS,
        num_biomes: int = NUM_BIOMES,
        metadata_embed_dim: int = 32,
        metadata_channels: int = 4,
        feature_layers: list[int] | tuple[int, ...] | None = None,
        num_convnext_blocks: int = 4,
        head_width: int = 256,
        layer_scale_init_value: float = 1e-6,
        drop_path_rate: float = 0.1,
        padding_mode: str = "reflect",
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.1,
        lora_target_modules: tuple[str, ...] | list[str] = LORA_TARGETS,
        unfreeze_last_n_blocks: int | None = None,
        initializer_range: float = 0.02,
        spectral_correction: str = "none",
        spectral_correction_hidden_size: int = 64,
        spectral_mlp_hidden_size: int = 0,
        spectral_mlp_num_layers: int = 2,
        spectral_mlp_log_offset: float = 0.05,
        nonnegative_output: bool = False,
        out_of_range_fallback: bool = False,
        out_of_range_ramp: float = OUT_OF_RANGE_RAMP,
        near_black_fallback: bool = False,
        near_black_threshold: float = NEAR_BLACK_THRESHOLD,
        near_black_ramp: float = NEAR_BLACK_RAMP,
        near_black_keep: str = "pixel",
        **kwargs,
    ):
        self.bands = _resolve_bands(bands)
        self.backbone_config = _resolve_backbone_config(backbone_config, self.bands)
        self.backbone_weights = local_source_or_name(backbone_weights)
        self.num_months = _positive_int(num_months, "num_months")
        self.num_biomes = _positive_int(num_biomes, "num_biomes")
        self.metadata_embed_dim = _positive_int(metadata_embed_dim, "metadata_embed_dim")
        self.metadata_channels = _positive_int(metadata_channels, "metadata_channels")
        self.feature_layers = _resolve_feature_layers(feature_layers, self.backbone_config.depth)
        self.num_convnext_blocks = _positive_int(num_convnext_blocks, "num_convnext_blocks")
        self.head_width = _positive_int(head_width, "head_width")
        self.layer_scale_init_value = _real(layer_scale_init_value, "layer_scale_init_value")
        if self.layer_scale_init_value < 0:
            raise ValueError(f"layer_scale_init_value must be >= 0 (0 disables layer scale), got "
                             f"{layer_scale_init_value!r}.")
        self.drop_path_rate = _fraction(drop_path_rate, "drop_path_rate")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}.")
        self.padding_mode = padding_mode
        self.lora_r = _positive_int(lora_r, "lora_r")
        self.lora_alpha = _positive_int(lora_alpha, "lora_alpha")
        self.lora_dropout = _fraction(lora_dropout, "lora_dropout")
        self.lora_target_modules = resolve_lora_targets(lora_target_modules)
        self.unfreeze_last_n_blocks = _resolve_last_n_blocks(unfreeze_last_n_blocks, self.backbone_config.depth)
        self.initializer_range = _real(initializer_range, "initializer_range")
        if self.initializer_range < 0:
            raise ValueError(f"initializer_range must be >= 0 (the std of the initial weights), got "
                             f"{initializer_range!r}.")
        if spectral_correction not in SPECTRAL_CORRECTIONS:
            raise ValueError(
                f"spectral_correction must be one of {SPECTRAL_CORRECTIONS}, got {spectral_correction!r}: \"affine\" "
                "adds the per-tile colour-correction branch, \"shared\" one correction for all tiles, \"none\" "
                "keeps the head's residual only."
            )
        self.spectral_correction = spectral_correction
        self.spectral_correction_hidden_size = _positive_int(
            spectral_correction_hidden_size, "spectral_correction_hidden_size"
        )
        self.spectral_mlp_hidden_size = _nonnegative_int(spectral_mlp_hidden_size, "spectral_mlp_hidden_size")
        self.spectral_mlp_num_layers = _positive_int(spectral_mlp_num_layers, "spectral_mlp_num_layers")
        self.spectral_mlp_log_offset = _real(spectral_mlp_log_offset, "spectral_mlp_log_offset")
        if not self.spectral_mlp_log_offset > 0:
            raise ValueError(f"spectral_mlp_log_offset must be > 0 (reflectance), got {spectral_mlp_log_offset!r}.")
        if not isinstance(nonnegative_output, bool):
            raise ValueError(f"nonnegative_output must be True or False, got {nonnegative_output!r}.")
        self.nonnegative_output = nonnegative_output
        if not isinstance(out_of_range_fallback, bool):
            raise ValueError(f"out_of_range_fallback must be True or False, got {out_of_range_fallback!r}.")
        self.out_of_range_fallback = out_of_range_fallback
        self.out_of_range_ramp = _real(out_of_range_ramp, "out_of_range_ramp")
        if not self.out_of_range_ramp > 1:
            raise ValueError(
                f"out_of_range_ramp must be > 1 (the multiple of the threshold distance where the output is opt_v1 "
                f"entirely), got {out_of_range_ramp!r}."
            )
        if not isinstance(near_black_fallback, bool):
            raise ValueError(f"near_black_fallback must be True or False, got {near_black_fallback!r}.")
        canonical = [canonical_band_name(band) for band in self.bands]
        missing = [band for band in NEAR_BLACK_BANDS if canonical_band_name(band) not in canonical]
        if near_black_fallback and missing:
            raise ValueError(
                f"near_black_fallback needs the bands {NEAR_BLACK_BANDS} (red and NIR) in `bands`, which lacks "
                f"{tuple(missing)}: add them or leave near_black_fallback=False."
            )
        self.near_black_fallback = near_black_fallback
        self.near_black_threshold = _real(near_black_threshold, "near_black_threshold")
        if not self.near_black_threshold > 0:
            raise ValueError(f"near_black_threshold must be > 0 (red + NIR reflectance), got {near_black_threshold!r}.")
        self.near_black_ramp = _real(near_black_ramp, "near_black_ramp")
        if not self.near_black_ramp > 1:
            raise ValueError(
                f"near_black_ramp must be > 1 (the multiple of near_black_threshold from which the output is the "
                f"refiner's own), got {near_black_ramp!r}."
            )
        if near_black_keep not in NEAR_BLACK_KEEPS:
            raise ValueError(
                f"near_black_keep must be one of {NEAR_BLACK_KEEPS}, got {near_black_keep!r}: \"pixel\" keeps all of "
                "opt_v1 at near-black pixels, \"ndvi\" only its NDVI (the split of red + NIR)."
            )
        self.near_black_keep = near_black_keep
        super().__init__(**kwargs)
        if self.dtype is not None and self.backbone_config.dtype is None:
            self.backbone_config.dtype = self.dtype  # one dtype for the whole refiner unless the backbone says

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' `get_config_dict`, refusing on one line the config of another model (a Prithvi backbone's
        folder): transformers only warns, and the refiner built from it fails later (`patch_size` has no setter). A
        refiner config nested in another model's is left to transformers' look-up, which takes it from there."""
        subfolder = kwargs.get("subfolder") or ""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        nested = any(isinstance(value, dict) and value.get("model_type") == cls.model_type
                     for value in config_dict.values())
        if model_type is not None and model_type != cls.model_type and not nested:
            source = "/".join(part for part in (str(pretrained_model_name_or_path), subfolder) if part)
            source = Path(source) / CONFIG_NAME if Path(source).is_dir() else source
            hint = (" (a Prithvi backbone's config: load it with PrithviConfig.from_pretrained, or give it to "
                    "Stage2RefinerConfig as backbone_config)" if model_type == PrithviConfig.model_type else "")
            raise ValueError(f"{source}: key 'model_type' is {model_type!r}, not {cls.model_type!r}: not a Stage 2 "
                             f"refiner config{hint}.")
        return config_dict, kwargs

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' `save_pretrained`, after the checks of `__init__` on the values as they are now: a field set
        after construction (`config.head_width = -3`) would otherwise be written to a `config.json` that no longer
        loads."""
        type(self).from_dict(self.to_dict())
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        # The whole sub-config, as transformers' composite configs save theirs.
        backbone = self.backbone_config.to_dict()
        backbone.pop("transformers_version", None)
        output["backbone_config"] = backbone
        return output

    @property
    def keeps_opt_v1(self) -> bool:
        """Whether the refiner keeps `opt_v1` at some pixels (`out_of_range_fallback`, `near_black_fallback`) and
        says where in its output (`out_of_range_weight`)."""
        return self.out_of_range_fallback or self.near_black_fallback

    @property
    def near_black_band_indices(self) -> tuple[int, ...]:
        """Positions in `bands` of the red and NIR bands whose sum `near_black_fallback` thresholds."""
        canonical = [canonical_band_name(band) for band in self.bands]
        return tuple(canonical.index(canonical_band_name(band)) for band in NEAR_BLACK_BANDS)

    @property
    def patch_size(self) -> tuple[int, int]:
        """Spatial patch size (height, width) of the backbone."""
        return int(self.backbone_config.patch_size[1]), int(self.backbone_config.patch_size[2])

    @property
    def head_widths(self) -> list[int]:
        """Channels of each head stage: `head_width` halved per stage, never below 16."""
        return [max(self.head_width >> stage, min(16, self.head_width)) for stage in range(self.num_convnext_blocks)]

    def record_lora(self, r=None, alpha=None, dropout=None, target_modules=None, last_n_blocks=None) -> None:
        """Set the LoRA settings an adapter is built with, checked as `__init__` checks them; None keeps the
        config's. `build_trainable_model` calls it, so a saved `config.json` (and the model card made from it)
        describes the adaptation the weights went through, not the defaults."""
        if r is not None:
            self.lora_r = _positive_int(r, "lora_r")
        if alpha is not None:
            self.lora_alpha = _positive_int(alpha, "lora_alpha")
        if dropout is not None:
            self.lora_dropout = _fraction(dropout, "lora_dropout")
        if target_modules is not None:
            self.lora_target_modules = resolve_lora_targets(target_modules, "target_modules")
        if last_n_blocks is not None:
            self.unfreeze_last_n_blocks = _resolve_last_n_blocks(last_n_blocks, self.backbone_config.depth)

    @property
    def lora_blocks(self) -> list[int]:
        """Indices of the backbone blocks that receive LoRA adapters."""
        depth = self.backbone_config.depth
        first = 0 if self.unfreeze_last_n_blocks is None else depth - self.unfreeze_last_n_blocks
        return list(range(first, depth))


def local_source_or_name(source) -> str | None:
    """Where weights come from, as a saved config or record keeps it: an existing local file or folder as its absolute
    path (a relative one would name another place, or nothing, wherever the folder is loaded next), anything else
    (a Hub id, an `hf://` URL) as given."""
    if source is None:
        return None
    path = Path(str(source)).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _int_at_least(value, minimum: int, requirement: str, name: str) -> int:
    """`value` as an int >= `minimum`; anything else (a bool, a fraction, a string, ...) is a ValueError naming
    `name` and saying `requirement`."""
    try:
        number = int(value)
        exact = not isinstance(value, (bool, str)) and number == value
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact or number < minimum:
        raise ValueError(f"{name} must be {requirement}, got {value!r}.")
    return number


def _positive_int(value, name: str) -> int:
    return _int_at_least(value, 1, "a positive integer", name)


def _nonnegative_int(value, name: str) -> int:
    """0 switches a part off."""
    return _int_at_least(value, 0, "an integer >= 0 (0: none)", name)


def _real(value, name: str) -> float:
    """`value` as a finite float; anything else (not a number, NaN, infinity) is a ValueError naming `name`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return number


def _fraction(value, name: str) -> float:
    value = _real(value, name)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}.")
    return value


def _resolve_bands(bands) -> list[str]:
    if isinstance(bands, str) or not bands:
        raise ValueError(f"bands must be a non-empty sequence of band names such as {BAND_NAMES}, got {bands!r}.")
    names = [str(band) for band in bands]
    for band in names:
        canonical_band_name(band)  # raises with the list of known names
    if len({name.upper() for name in names}) != len(names):  # case-insensitive, as `canonical_band_name`
        raise ValueError(f"bands lists a band more than once: {names}.")
    return names


def _resolve_backbone_config(backbone_config, bands: list[str]) -> PrithviConfig:
    if backbone_config is None:
        backbone_config = DEFAULT_BACKBONE_PRESET
    if isinstance(backbone_config, str):
        config = PrithviConfig.from_preset(backbone_config, bands=tuple(bands))
    elif isinstance(backbone_config, PrithviConfig):
        config = copy.deepcopy(backbone_config)
    elif isinstance(backbone_config, dict):
        arguments = dict(backbone_config)
        model_type = arguments.pop("model_type", PrithviConfig.model_type)
        if model_type != PrithviConfig.model_type:
            raise ValueError(
                f"backbone_config has model_type {model_type!r}; the refiner's backbone is a Prithvi encoder "
                f"({PrithviConfig.model_type!r})."
            )
        arguments.pop("transformers_version", None)
        if "bands" not in arguments and "in_chans" not in arguments:
            arguments["bands"] = list(bands)
        config = PrithviConfig(**arguments)
    else:
        raise TypeError(
            f"backbone_config must be a PrithviConfig, a dict or a preset name, got {type(backbone_config).__name__}."
        )
    if config.patch_size[0] != 1:
        raise ValueError(
            f"The refiner works on single-frame input, so its backbone needs patch_size[0] == 1, got patch_size="
            f"{list(config.patch_size)}: build the backbone config with patch_size=(1, {config.patch_size[1]}, "
            f"{config.patch_size[2]})."
        )
    backbone_bands = [canonical_band_name(band) for band in config.bands]
    refiner_bands = [canonical_band_name(band) for band in bands]
    if backbone_bands != refiner_bands:
        raise ValueError(
            f"The backbone's bands {list(config.bands)} do not match the refiner's bands {bands} position by position; "
            f"build the backbone config with bands={tuple(bands)}."
        )
    return config


def _resolve_feature_layers(feature_layers, depth: int) -> list[int]:
    if feature_layers is None:
        count = min(4, depth)
        return sorted({depth * (index + 1) // count - 1 for index in range(count)})
    if isinstance(feature_layers, int) or not feature_layers:
        raise ValueError(f"feature_layers must be a non-empty list of block indices, got {feature_layers!r}.")
    layers = []
    for layer in feature_layers:
        try:
            if isinstance(layer, bool):
                raise TypeError
            layer = operator.index(layer)  # ints (numpy's too), never a bool, a fraction or a string
        except TypeError:
            raise ValueError(f"feature_layers must be block indices (integers), got {feature_layers!r}.") from None
        if not -depth <= layer < depth:
            raise ValueError(f"feature_layers: block {layer} does not exist in a backbone of depth {depth}.")
        layers.append(layer % depth)
    if len(set(layers)) != len(layers):
        raise ValueError(f"feature_layers lists a block more than once: {list(feature_layers)} -> {layers}.")
    return sorted(layers)


def resolve_lora_targets(targets, argument: str = "lora_target_modules") -> list[str]:
    """LoRA target names (one or several of `LORA_TARGETS`) in `LORA_TARGETS` order; `argument` names the
    setting in the error message."""
    if isinstance(targets, str):
        targets = [targets]
    names = [str(name) for name in targets]
    unknown = [name for name in names if name not in LORA_TARGETS]
    if not names or unknown:
        raise ValueError(
            f"{argument} must be a non-empty subset of {LORA_TARGETS} (the backbone block linears; the patch "
            f"embedding is never adapted), got {list(targets)}."
        )
    return [name for name in LORA_TARGETS if name in names]


def _resolve_last_n_blocks(value, depth: int) -> int | None:
    if value is None:
        return None
    value = _positive_int(value, "unfreeze_last_n_blocks")
    if value > depth:
        raise ValueError(f"unfreeze_last_n_blocks={value} exceeds the backbone depth {depth}; use None for all blocks.")
    return value


Stage2RefinerConfig.register_for_auto_class()
AutoConfig.register(Stage2RefinerConfig.model_type, Stage2RefinerConfig, exist_ok=True)

__all__ = [
    "BAND_NAMES", "LORA_TARGETS", "OUT_OF_RANGE_RAMP", "SPECTRAL_CORRECTIONS", "UNKNOWN_METADATA",
    "Stage2RefinerConfig",
]
