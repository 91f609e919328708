"""Official Prithvi-EO-2.0 checkpoints (`Prithvi_EO_V2_*.pt`, flat MAE state dicts) -> `PrithviEncoder`.

    stage2-convert-prithvi Prithvi_EO_V2_600M.pt converted/ --bands B02 B03 B04 B08
    stage2-convert-prithvi hf://ibm-nasa-geospatial/Prithvi-EO-2.0-600M/Prithvi_EO_V2_600M.pt converted/

The checkpoint is read with `torch.load(weights_only=True)` (never unpickled), the `encoder.*` keys are kept and
the decoder dropped, the patch embedding's input channels are taken by band name, every key and shape is checked
against the model, and the result is written as a `save_pretrained` folder (config.json + model.safetensors).
"""
from __future__ import annotations

import argparse
import logging
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ._files import is_system_failure, staged_folder
from ._signals import exit_on_termination
from .configuration_prithvi import PRETRAINED_BANDS, PRITHVI_PRESETS, PrithviConfig, canonical_band_name
from .hub import DOWNLOAD_FAILED, hub_download_errors, hub_failure_is_users, hub_failure_line
from .modeling_prithvi import PrithviEncoder, sincos_3d_table
from .vocabulary import OneLineArgumentParser

logger = logging.getLogger(__name__)

OFFICIAL_HUB_REPOS = {
    "prithvi_eo_v2_600m": "ibm-nasa-geospatial/Prithvi-EO-2.0-600M",
    "prithvi_eo_v2_600m_tl": "ibm-nasa-geospatial/Prithvi-EO-2.0-600M-TL",
    "prithvi_eo_v2_300m": "ibm-nasa-geospatial/Prithvi-EO-2.0-300M",
    "prithvi_eo_v2_300m_tl": "ibm-nasa-geospatial/Prithvi-EO-2.0-300M-TL",
    "prithvi_eo_v2_100m": "ibm-nasa-geospatial/Prithvi-EO-2.0-100M",
    "prithvi_eo_v2_100m_tl": "ibm-nasa-geospatial/Prithvi-EO-2.0-100M-TL",
}
"""The Hub repo of each released preset (the tiny test preset has none)."""
DEFAULT_HUB_REPO = OFFICIAL_HUB_REPOS["prithvi_eo_v2_600m"]
DEFAULT_HUB_FILENAME = "Prithvi_EO_V2_600M.pt"
HUB_PREFIX = "hf://"
_SAVED_FILES = {"config.json", "model.safetensors"}
_COORDS_KEYS = {"time": "temporal_embed_enc.scale", "location": "location_embed_enc.scale"}
ENCODER_PREFIX = "encoder."
DECODER_PREFIX = "decoder."  # the MAE decoder, dropped
_TABLE_SIZE_ARGUMENTS = ("img_size", "num_frames")
# A stored position table is "the sin-cos table of a grid" within this: it admits a table computed in float32
# (off by 2e-6 at 224 px, 1.5e-5 at 1792 px, from float64's) while the tables of two different grids differ by ~1.
_TABLE_ATOL = 1e-4


class PrithviCheckpointError(ValueError):
    """An official checkpoint that cannot be read or does not fit the requested encoder."""


@dataclass(frozen=True)
class CheckpointSource:
    """A checkpoint file, as messages name it, with the prefix its encoder keys have there (`encoder.` in the
    released layout, none in an encoder-only state dict saved without it)."""

    path: Path
    prefix: str = ENCODER_PREFIX

    def __str__(self) -> str:
        return str(self.path)


def _in_file(key: str, source) -> str:
    """The encoder key `key` as the checkpoint file names it (`source` may also be a plain path)."""
    return getattr(source, "prefix", ENCODER_PREFIX) + key


# ----------------------------------------------------------------------------------------------- reading


def read_official_state_dict(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """The flat state dict of an official checkpoint, loaded weights-only (memory-mapped when possible)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"Prithvi checkpoint not found: {path}")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as error:  # torch raises several types for corrupt or pickled-object files
        raise PrithviCheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint "
            f"({_truncation(path) or _load_error_reason(error)}). Official Prithvi-EO-2.0 files (Prithvi_EO_V2_*.pt) "
            "are flat state dicts of tensors."
        ) from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise PrithviCheckpointError(f"{path}: expected a flat dict of tensors, got {type(state).__name__}.")
    _check_entries(state, path)
    return state


def _load_error_reason(error: Exception) -> str:
    """`torch.load`'s error in one line, with its type. Its refusal of a pickled object spans paragraphs (and suggests
    loading with `weights_only=False`, which this converter never does): only the unpickler's own reason is kept."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split(". Please use", 1)[0]
    return f"{type(error).__name__}: {' '.join(text.split())}"


_ZIP_START = b"PK\x03\x04"  # a zip's first local header: torch's zip checkpoints start with it


def _truncation(path: Path) -> str | None:
    """Why a file torch could not read is cut short, or None. A torch (zip) checkpoint cut anywhere has lost (part of)
    its end-of-archive record; torch's reader then says so for most lengths, but "[Errno 22] Invalid argument" (a seek
    before the file's start) for files of 4 to 68 KiB. An empty file gives a bare EOFError."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "the file is empty: download or copy it again"
        with path.open("rb") as file:
            if not _ZIP_START.startswith(file.read(len(_ZIP_START))):  # a 1-3 byte file too: its first bytes
                return None  # not a zip checkpoint (torch's legacy format, or something else): torch's reason stands
            if zipfile.is_zipfile(file):  # a whole end-of-archive record: torch failed for another reason
                return None
    except OSError:  # unreadable now: torch's own reason is all there is
        return None
    return (f"a zip archive of {size} bytes without a whole end-of-archive record: the file is truncated (an "
            "interrupted download or copy); download or copy it again")


def _check_entries(state: dict, path: Path) -> None:
    """Names for keys and tensors for values, or an error naming the first entry that is not."""
    for key, value in state.items():
        if not isinstance(key, str):
            raise PrithviCheckpointError(
                f"{path}: key {key!r} ({type(key).__name__}) is not a parameter name; expected a flat dict of "
                "tensors keyed by name (e.g. `encoder.cls_token`), as in the official Prithvi_EO_V2_*.pt files."
            )
        if not isinstance(value, torch.Tensor):
            raise PrithviCheckpointError(
                f"{path}: entry `{key}` is a {type(value).__name__}, not a tensor; expected a flat dict of tensors "
                "(save the model's state dict alone, without other entries)."
            )


def checkpoint_source(state: dict[str, torch.Tensor], path: str | Path) -> CheckpointSource:
    """`path` with the prefix of its encoder keys: none for an encoder-only state dict without `encoder.`."""
    prefixed = any(key.startswith(ENCODER_PREFIX) for key in state)
    return CheckpointSource(Path(path), "" if "patch_embed.proj.weight" in state and not prefixed else ENCODER_PREFIX)


def encoder_state_dict(state: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's entries without their prefix; the MAE decoder (`decoder.*`) is dropped. Any other top-level
    key and any encoder tensor that is not floating point are refused, named as in the file."""
    if not isinstance(source, CheckpointSource):
        source = checkpoint_source(state, source)
    prefix = source.prefix
    encoder = {key[len(prefix) :]: value for key, value in state.items()
               if key.startswith(prefix) and not key.startswith(DECODER_PREFIX)}
    if not encoder:
        raise PrithviCheckpointError(
            f"{source}: no `encoder.*` keys (found e.g. {sorted(state)[:5]}); this is not a Prithvi-EO-2.0 checkpoint."
        )
    for key in state:
        if not key.startswith((prefix, DECODER_PREFIX)):
            raise PrithviCheckpointError(
                f"{source}: key `{key}` is neither an encoder (`{ENCODER_PREFIX}*`) nor a decoder "
                f"(`{DECODER_PREFIX}*`) weight of the Prithvi-EO-2.0 MAE; remove it from the file (it would otherwise "
                "be dropped unseen)."
            )
    for key, value in encoder.items():
        if not value.is_floating_point():
            raise PrithviCheckpointError(
                f"{source}: `{_in_file(key, source)}` is a {value.dtype} tensor; the encoder's weights are floating "
                "point, so the file is damaged or not a Prithvi-EO-2.0 checkpoint."
            )
    return encoder


# ---------------------------------------------------------------------------------------- architecture


def _tensor(encoder: dict[str, torch.Tensor], key: str, source) -> torch.Tensor:
    if key not in encoder:
        raise PrithviCheckpointError(f"{source}: missing key `{_in_file(key, source)}`; the checkpoint is incomplete.")
    return encoder[key]


def infer_architecture(encoder: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> dict:
    """Config arguments readable from the weights' shapes (all but `num_heads`, and the image size and frame
    count, which `infer_table_size` reads from the position table's values)."""
    proj = _tensor(encoder, "patch_embed.proj.weight", source)
    if proj.ndim != 5:
        raise PrithviCheckpointError(
            f"{source}: `{_in_file('patch_embed.proj.weight', source)}` has shape {tuple(proj.shape)}, expected a "
            "Conv3d weight (embed_dim, in_chans, t, h, w)."
        )
    embed_dim, in_chans, *patch_size = proj.shape
    block_ids = {int(key.split(".")[1]) for key in encoder if key.startswith("blocks.") and key.split(".")[1].isdigit()}
    mlp_hidden = encoder.get("blocks.0.mlp.fc1.weight")
    coords = [name for name, key in _COORDS_KEYS.items() if key in encoder]
    arguments = {
        "embed_dim": int(embed_dim),
        "depth": len(block_ids),
        "patch_size": [int(p) for p in patch_size],
        "checkpoint_in_chans": int(in_chans),
        "coords_encoding": coords,
        "coords_scale_learn": bool(coords),
    }
    if mlp_hidden is not None:
        arguments["mlp_ratio"] = mlp_hidden.shape[0] / embed_dim
    return arguments


def infer_table_size(encoder: dict[str, torch.Tensor], patch_size, source: str | Path = "checkpoint") -> dict:
    """`img_size` and `num_frames` of the stored position table: the one patch grid (t, h, w), among every
    factorisation of its token count, whose fixed sin-cos table it is. Raises when none or several are."""
    table = _tensor(encoder, "pos_embed", source)
    tokens = table.shape[1] - 1 if table.ndim == 3 else 0
    grids = [grid for grid in _token_grids(tokens) if is_sincos_table(table, grid)]
    if len(grids) != 1:
        patch_t, patch_h, patch_w = patch_size
        sizes = [((h * patch_h, w * patch_w), t * patch_t) for t, h, w in grids]
        found = f"fits several ((height, width), frames): {sizes}" if grids else "is not the sin-cos table of any grid"
        raise PrithviCheckpointError(
            f"{source}: the position table `{_in_file('pos_embed', source)}` {tuple(table.shape)} {found}, so the "
            "image size and frame count it was built for cannot be read from it; pass them explicitly with "
            "img_size= and num_frames= (--img-size, --num-frames)."
        )
    (frames, height, width), (patch_t, patch_h, patch_w) = grids[0], patch_size
    return {"img_size": [height * patch_h, width * patch_w], "num_frames": frames * patch_t}


def _token_grids(tokens: int) -> list[tuple[int, int, int]]:
    """Every (t, h, w) with t * h * w == tokens, square and not."""
    divisors = [d for d in range(1, tokens + 1) if tokens % d == 0]
    return [(t, h, tokens // (t * h)) for t in divisors for h in divisors if (tokens // t) % h == 0]


def is_sincos_table(table: torch.Tensor, grid: tuple[int, int, int]) -> bool:
    """Whether `table` (1, 1 + t*h*w, E) is the fixed sin-cos position table of the patch grid `grid`."""
    if table.ndim != 3 or table.shape[0] != 1 or table.shape[-1] % 16:
        return False  # the 3D table splits the width in sixteenths
    expected = sincos_3d_table(table.shape[-1], grid)
    return table.shape == expected.shape and bool((table.float() - expected).abs().max() <= _TABLE_ATOL)


def official_hub_repo(backbone_config: dict) -> str | None:
    """The Hub repo of the released model whose architecture a saved encoder config (`config.json`'s
    `backbone_config`) has: embed_dim, depth, patch and coordinate encodings; None when it has no released one."""
    try:
        architecture = {name: backbone_config[name] for name in ("embed_dim", "depth")}
        architecture["patch_size"] = list(backbone_config["patch_size"])
    except (KeyError, TypeError):
        return None
    architecture["coords_encoding"] = list(backbone_config.get("coords_encoding") or ())
    return OFFICIAL_HUB_REPOS.get(match_preset(architecture))


def match_preset(architecture: dict) -> str | None:
    """The preset with the checkpoint's embed_dim, depth and patch (one with the same coordinate encodings
    first), if any."""
    candidates = [
        name
        for name, preset in PRITHVI_PRESETS.items()
        if preset["embed_dim"] == architecture["embed_dim"]
        and preset["depth"] == architecture["depth"]
        and list(preset["patch_size"]) == architecture["patch_size"]
    ]
    same_coords = [
        name
        for name in candidates
        if sorted(PRITHVI_PRESETS[name].get("coords_encoding", ())) == sorted(architecture["coords_encoding"])
    ]
    return (same_coords or candidates or [None])[0]


def build_config(
    encoder: dict[str, torch.Tensor], preset: str | None, bands, config_overrides: dict, source
) -> PrithviConfig:
    """The encoder config: the preset (given or matched from shapes) or the inferred shapes, then overrides."""
    overrides = dict(config_overrides)
    architecture = infer_architecture(encoder, source)
    checkpoint_in_chans = architecture.pop("checkpoint_in_chans")
    if not set(_TABLE_SIZE_ARGUMENTS) <= set(overrides):  # read from the table unless both are given
        architecture.update(infer_table_size(encoder, architecture["patch_size"], source))
    inferred = preset is None
    if inferred:
        preset = match_preset(architecture)
    if preset is not None:
        if preset not in PRITHVI_PRESETS:
            raise ValueError(f"Unknown Prithvi preset {preset!r}; choose one of {sorted(PRITHVI_PRESETS)}.")
        arguments = dict(PRITHVI_PRESETS[preset])
        # What the weights say wins: the table's size always, the encodings of a -TL checkpoint of a size that has
        # no -TL preset when the preset was matched.
        for name in _TABLE_SIZE_ARGUMENTS + (("coords_encoding", "coords_scale_learn") if inferred else ()):
            if name in architecture:
                arguments[name] = architecture[name]
    else:
        if "num_heads" not in overrides:
            raise PrithviCheckpointError(
                f"{source}: its shapes (embed_dim {architecture['embed_dim']}, depth {architecture['depth']}, "
                f"patch {architecture['patch_size']}) match no preset and the number of heads cannot be read from "
                "weights; pass `preset=` (--preset) or `num_heads=` (--num-heads)."
            )
        arguments = architecture

    if bands is not None and "bands" in overrides:
        raise ValueError("bands given twice (as `bands` and in the config overrides).")
    bands = bands if bands is not None else overrides.pop("bands", None)
    if bands is None and "in_chans" not in overrides:
        bands = PRETRAINED_BANDS[:checkpoint_in_chans]
    arguments.pop("bands", None)
    arguments.update(overrides)
    return PrithviConfig(bands=list(bands) if bands is not None else None, **arguments)


# ----------------------------------------------------------------------------------------------- weights


def select_weights(
    encoder: dict[str, torch.Tensor], config: PrithviConfig, expected: dict[str, torch.Size], source
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors shaped for `config`: bands taken by name, position table and coordinate scales
    reconciled, everything float32. Raises on any key or shape that does not fit."""
    weights = dict(encoder)
    patch_weight = _tensor(encoder, "patch_embed.proj.weight", source)
    weights["patch_embed.proj.weight"] = _select_bands(patch_weight, config, source)

    table = weights.get("pos_embed")
    if table is not None and table.shape[-1] == config.embed_dim and not is_sincos_table(table, config.grid_size):
        # The table is fixed (sin-cos of the patch grid): another img_size/num_frames gets its own, as terratorch does.
        logger.info("%s: position table %s recomputed for grid %s", source, tuple(table.shape), config.grid_size)
        weights["pos_embed"] = sincos_3d_table(config.embed_dim, config.grid_size)

    for name, key in _COORDS_KEYS.items():
        if key in weights and key not in expected:
            logger.warning("%s: dropping `%s`: the config has no %r encoding.", source, _in_file(key, source), name)
            del weights[key]

    _check_keys_and_shapes(weights, expected, source)
    return {
        key: value.to(torch.float32).contiguous() if value.is_floating_point() else value
        for key, value in weights.items()
    }


def _select_bands(weight: torch.Tensor, config: PrithviConfig, source) -> torch.Tensor:
    checkpoint_bands = PRETRAINED_BANDS[: weight.shape[1]]
    indices = []
    for band, pretrained in zip(config.bands, config.pretrained_band_names):
        if pretrained not in checkpoint_bands:
            raise PrithviCheckpointError(
                f"{source}: band {band!r} ({pretrained}) is not among the checkpoint's input bands {checkpoint_bands}."
            )
        indices.append(checkpoint_bands.index(pretrained))
    if indices == list(range(weight.shape[1])):
        return weight
    return weight[:, indices]


def _first(names: list[str], count: int = 8) -> str:
    return str(names[:count]) + (" ..." if len(names) > count else "")


def _check_keys_and_shapes(weights: dict, expected: dict, source) -> None:
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{_in_file(key, source)}: checkpoint {tuple(weights[key].shape)} vs model {tuple(expected[key])}"
        for key in sorted(set(expected) & set(weights))
        if tuple(weights[key].shape) != tuple(expected[key])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_first([_in_file(key, source) for key in missing])}")
    if unexpected:
        problems.append(f"unexpected keys {_first([_in_file(key, source) for key in unexpected])}")
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
    if problems:
        raise PrithviCheckpointError(
            f"{source} does not fit the requested encoder: " + " | ".join(problems) + ". Check the preset and "
            "config overrides (leave `preset` unset to infer it from the checkpoint)."
        )


# ---------------------------------------------------------------------------------------------- public API


def convert_official_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path | None = None,
    preset: str | None = None,
    bands=None,
    **config_overrides,
) -> PrithviEncoder:
    """Read an official Prithvi-EO-2.0 checkpoint into a `PrithviEncoder` (eval mode).

    Args:
        checkpoint_path: a `Prithvi_EO_V2_*.pt` flat state dict (`encoder.*` and `decoder.*` keys).
        output_dir: when given, the encoder is written there with `save_pretrained` (config.json +
            model.safetensors), atomically: a failed conversion leaves nothing behind. A folder holding an
            earlier conversion is replaced; a folder holding other files is refused.
        preset: a `PRITHVI_PRESETS` name; inferred from the weights' shapes when not given.
        bands: input band names (HLS or Sentinel-2, e.g. `("B02", "B03", "B04", "B08")`); the patch embedding's
            input channels are taken from the pretrained bands by name. Defaults to all checkpoint bands.
        config_overrides: other `PrithviConfig` arguments (`num_frames`, `img_size`, `in_chans`, ...). The image
            size and frame count are read from the stored position table (the grid whose sin-cos table it is);
            give both `img_size` and `num_frames` for a checkpoint whose table fits no grid or several.
    """
    if output_dir is not None:
        check_output_folder(output_dir)  # before reading (or downloading) gigabytes
    state = read_official_state_dict(checkpoint_path)
    source = checkpoint_source(state, checkpoint_path)
    encoder = encoder_state_dict(state, source)
    config = build_config(encoder, preset, bands, config_overrides, source)
    with torch.device("meta"):
        model = PrithviEncoder(config)  # shapes only: the weights come from the checkpoint
    expected = {key: value.shape for key, value in model.state_dict().items()}
    weights = select_weights(encoder, config, expected, source)
    model.load_state_dict(weights, strict=True, assign=True)
    model.eval()
    if output_dir is not None:
        save_atomically(model, output_dir)
    return model


def load_official_encoder(checkpoint_path: str | Path, *, revision: str | None = None,
                          **config_overrides) -> PrithviEncoder:
    """The encoder of an official checkpoint (a local `.pt` or `hf://REPO_ID/FILENAME` at `revision`), in eval mode.

    `config_overrides` are `PrithviConfig` arguments (`bands` or `in_chans`, `num_frames`, ...) plus an optional
    `preset`. Calling the encoder on (B, C, H, W) returns `last_hidden_state` and the per-block `hidden_states`.
    """
    preset = config_overrides.pop("preset", None)
    bands = config_overrides.pop("bands", None)
    path = resolve_checkpoint(checkpoint_path, revision=revision)
    return convert_official_checkpoint(path, None, preset=preset, bands=bands, **config_overrides).eval()


def load_prithvi_from_hub(
    repo_id: str = DEFAULT_HUB_REPO,
    filename: str = DEFAULT_HUB_FILENAME,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    bands=None,
    preset: str | None = None,
    **config_overrides,
) -> Path:
    """Download an official checkpoint with `huggingface_hub` and convert it once; returns the converted
    `save_pretrained` folder (load it with `PrithviEncoder.from_pretrained`).

    `config_overrides` are `PrithviConfig` arguments, as for `load_official_encoder` (e.g. `num_heads`
    for a checkpoint that matches no preset); they are part of the cache key.

    Conversions are cached beside the Hub cache (`<cache_dir or HF_HOME>/stage2-converted/`), keyed by repo,
    resolved commit, preset and bands, and reused afterwards (offline too, once downloaded).
    """
    from huggingface_hub import constants, hf_hub_download

    checkpoint = Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir))
    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HOME)
    band_key = "-".join(str(band) for band in bands) if bands else "all-bands"
    override_key = "".join(f"__{key}-{config_overrides[key]}" for key in sorted(config_overrides))
    commit = snapshot_commit(checkpoint) or (revision or "main").replace("/", "--")
    target = (
        root / "stage2-converted" / repo_id.replace("/", "--") / commit
        / Path(filename).stem / f"{preset or 'auto'}__{band_key}{override_key}".replace("/", "-").replace(" ", "")
    )
    if all((target / name).is_file() for name in _SAVED_FILES):
        return target
    convert_official_checkpoint(checkpoint, target, preset=preset, bands=bands, **config_overrides)
    return target


def snapshot_commit(local_file: Path) -> str | None:
    """The commit a Hub-cache file belongs to (`.../snapshots/<commit>/<filename>`); None for a file elsewhere."""
    parts = local_file.parts
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        return parts[parts.index("snapshots") + 1]
    return None


def resolve_checkpoint(checkpoint: str | Path, revision: str | None = None, cache_dir=None) -> Path:
    """A local path, or `hf://REPO_OWNER/REPO_NAME/FILENAME` downloaded through the Hub cache."""
    text = str(checkpoint)
    if not text.startswith(HUB_PREFIX):
        return Path(checkpoint)
    parts = text[len(HUB_PREFIX) :].split("/")
    if len(parts) < 3 or not all(parts):
        example = f"hf://{DEFAULT_HUB_REPO}/{DEFAULT_HUB_FILENAME}"
        raise ValueError(f"{text!r}: expected hf://OWNER/REPO/FILENAME, e.g. {example}")
    from huggingface_hub import hf_hub_download

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir))


def check_output_folder(output_dir: str | Path) -> None:
    """Raises `FileExistsError` unless `output_dir` is new, empty or an earlier conversion (`save_atomically`)."""
    output_dir = Path(output_dir)
    if output_dir.exists():
        if not output_dir.is_dir():
            raise FileExistsError(f"{output_dir} exists and is not a folder.")
        others = sorted(path.name for path in output_dir.iterdir() if path.name not in _SAVED_FILES)
        if others:
            raise FileExistsError(
                f"{output_dir} holds other files ({others[:5]}); choose a new or empty folder for the converted "
                "encoder."
            )


def save_atomically(model: PrithviEncoder, output_dir: str | Path) -> Path:
    """`save_pretrained` into a temporary sibling folder, then rename it into place."""
    output_dir = Path(output_dir)
    check_output_folder(output_dir)
    with staged_folder(output_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
    return output_dir


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="stage2-convert-prithvi",
        description="Convert an official Prithvi-EO-2.0 checkpoint into a save_pretrained folder "
        "(config.json + model.safetensors) loadable with PrithviEncoder.from_pretrained.",
    )
    parser.add_argument("checkpoint", help="official Prithvi_EO_V2_*.pt file, or hf://OWNER/REPO/FILENAME")
    parser.add_argument("output_dir", help="folder to write (created; an earlier conversion there is replaced)")
    parser.add_argument("--preset", choices=sorted(PRITHVI_PRESETS), help="architecture (default: inferred)")
    parser.add_argument(
        "--bands", nargs="+", metavar="BAND", help="input bands by name, e.g. B02 B03 B04 B08 (default: all six HLS)"
    )
    parser.add_argument(
        "--num-heads", type=int, help="attention heads, for a checkpoint whose shapes match no preset"
    )
    parser.add_argument(
        "--img-size", type=int, nargs="+", metavar="PX",
        help="image size (H or H W) of the checkpoint's position table (default: read from the table)",
    )
    parser.add_argument(
        "--num-frames", type=int, help="frame count of the checkpoint's position table (default: read from the table)"
    )
    parser.add_argument("--revision", help="Hub revision for hf:// checkpoints")
    parser.add_argument("--cache-dir", help="Hub cache folder for hf:// checkpoints")
    return parser


@exit_on_termination
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.bands:
            for band in args.bands:
                canonical_band_name(band)
        check_output_folder(args.output_dir)  # before a download
        checkpoint = resolve_checkpoint(args.checkpoint, revision=args.revision, cache_dir=args.cache_dir)
        overrides = {"num_heads": args.num_heads} if args.num_heads is not None else {}
        if args.img_size:
            overrides["img_size"] = args.img_size[0] if len(args.img_size) == 1 else args.img_size
        if args.num_frames is not None:
            overrides["num_frames"] = args.num_frames
        model = convert_official_checkpoint(
            checkpoint, args.output_dir, preset=args.preset, bands=args.bands, **overrides
        )
    except hub_download_errors() as error:  # an hf:// checkpoint: no such repo or file (2), or the Hub out of reach (1)
        print(f"stage2-convert-prithvi: error: {args.checkpoint}: {DOWNLOAD_FAILED} ({hub_failure_line(error)})",
              file=sys.stderr)
        return 2 if hub_failure_is_users(error) else 1
    except (ValueError, OSError) as error:  # 1 for a full disk (the machine's), 2 for the input's
        print(f"stage2-convert-prithvi: error: {error}", file=sys.stderr)
        return 1 if is_system_failure(error) else 2
    config = model.config
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(
        f"Wrote {args.output_dir}: Prithvi encoder embed_dim {config.embed_dim}, depth {config.depth}, "
        f"patch {tuple(config.patch_size)}, bands {', '.join(config.bands)}, {parameters:,} parameters."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
