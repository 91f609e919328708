"""Model and dataset cards for the Stage 2 refiner, rendered with `huggingface_hub.ModelCard` / `DatasetCard`.

    card = build_model_card(metrics={"refined": {...}, "opt_v1": {...}, "n_tiles": 25},
                            training_config={"learning_rate": 2e-4, ...}, repo_id="me/stage2-refiner")
    card.save("README.md")
    write_model_card("runs/demo/best")   # reads metrics.json, config.json, adapter_config.json there

The metadata carries the base model (the Prithvi-EO-2.0 repo), license, library, tags, datasets and the
evaluation results as `model-index` entries (`EvalResult`s, lower is better); the text has the intended
use and limits, the training configuration and the results next to the two baselines, `opt_v1` itself and the
colour fit (`linear_fit`), and the design's targets.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from modeling_stage2.adapters import (  # the files save_trained_model and training write beside a model
    ADAPTER_CONFIG_FILE,
    BASE_SOURCE_FILE,
    BASE_WEIGHTS_FILE,
    FITTED_MODULES,
    LORA_MERGED_KEY,
    METRICS_FILE,
    PREVIEW_FILE,
    TRAINING_CONFIG_FILE,
)
from data_builders.cache import saved_dataset_problem
from data_builders.tiles import TILE_SIZE
from modeling_stage2._files import write_text
from modeling_stage2.bands import BAND_NAMES, NUM_BIOMES, NUM_MONTHS, UNKNOWN_METADATA
from modeling_stage2.convert_prithvi import DEFAULT_HUB_REPO, official_hub_repo
from modeling_stage2.hub import is_hub_repo_id
from modeling_stage2.vocabulary import INPUT_MODES, QUANTIZATIONS
from training.metrics import DESIGN_TARGETS, HIGHER_IS_BETTER, METRIC_NAMES, METRIC_UNITS

TEMPLATE_PATH = Path(__file__).with_name("template.md")
DATASET_TEMPLATE_PATH = Path(__file__).with_name("dataset_template.md")

DEFAULT_BASE_MODEL = DEFAULT_HUB_REPO  # the backbone a default config builds
DEFAULT_LICENSE = "apache-2.0"
TILES_NAME = "BigEarthNet v2 Sentinel-2 tiles"
DEFAULT_DATASET_NAME = f"{TILES_NAME} with synthetic opt_v1"
MODEL_TAGS = ("earth-observation", "remote-sensing", "sentinel-2", "prithvi", "lora", "image-to-image",
              "sar-to-optical", "stage2-refiner")
DATASET_TAGS = ("earth-observation", "remote-sensing", "sentinel-2", "bigearthnet", "sar-to-optical",
                "stage2-refiner")
TASK_TYPE = "image-to-image"
TASK_NAME = "Stage 2 refinement of opt_v1"

# The model-index metrics: those with a design target (all lower is better), as training.metrics defines them.
CARD_METRICS: tuple[str, ...] = tuple(DESIGN_TARGETS)
TABLE_METRICS: tuple[str, ...] = CARD_METRICS + tuple(name for name in METRIC_NAMES if name not in DESIGN_TARGETS)
_METRIC_WORDS = {"ndvi_rmse": "NDVI RMSE", "evi_rmse": "EVI RMSE", "sam": "SAM", "identity_l1": "identity L1",
                 "edge_l1": "edge L1", "psnr": "PSNR", "ssim": "SSIM"}
METRIC_LABELS = {name: f"{words} ({METRIC_UNITS[name]})" if name in METRIC_UNITS else words
                 for name, words in _METRIC_WORDS.items()}
_METRIC_DEFINITIONS = (
    "NDVI/EVI RMSE: RMSE of the vegetation indices of the output against those of the target; SAM: mean "
    "spectral angle between output and target spectra, in radians; identity L1: mean |output - opt_v1| (how "
    "far the refinement moves from its input); edge L1: mean |Sobel(output) - Sobel(opt_v1)| (edges kept from "
    "the input)."
)
_OPT_V1_NOTE = "The `opt_v1` column scores the unrefined input the same way, so its identity and edge L1 are 0."
_COLOUR_FIT_NOTE = (
    "The colour fit column scores the colour fit: a least-squares per-band affine colour "
    "correction of `opt_v1` (4x4 matrix + bias, `training.linear_fit`) fitted on the split it names and applied "
    "to the evaluated tiles."
)
_BASELINES_NOTE = (
    "The refined output is worth using where it beats both `opt_v1` and the colour fit, the two baselines."
)
_POOLING_NOTE = (
    "Metrics are pooled over the valid pixels of the whole split (`training.metrics`); n/a: nothing to measure."
)
# Said where metrics lack a baseline (training's validation records only `opt_v1`; hand-written metrics may have
# neither): the table then holds fewer than the two baselines, and the card says so instead of leaving the reader to
# look for the others.
_NO_OPT_V1_NOTE = (
    "These metrics hold no `opt_v1` scores: the table does not show whether the refined output beats its own input "
    "(`stage2-evaluate --json` records them)."
)
_NO_COLOUR_FIT_NOTE = (
    "These metrics hold no colour fit (`linear_fit`): it was not evaluated on these tiles, so the table does not "
    "show whether the refined output beats it (`stage2-evaluate --json` adds it, fitted on the data's `train` split)."
)


def metric_notes(has_opt_v1: bool, has_linear_fit: bool) -> str:
    """The notes under the evaluation table: what each metric and each baseline column shown is, and which are not."""
    shown = [_OPT_V1_NOTE] * has_opt_v1 + [_COLOUR_FIT_NOTE] * has_linear_fit
    missing = [_NO_OPT_V1_NOTE] * (not has_opt_v1) + [_NO_COLOUR_FIT_NOTE] * (not has_linear_fit)
    return " ".join([_METRIC_DEFINITIONS, *shown, _BASELINES_NOTE, _POOLING_NOTE, *missing])


# In every generated card: `stage2-push` regenerates a card carrying it (so the pushed card names the right
# repo, code and datasets); deleting the line keeps a hand-edited card as it is.
GENERATED_MARKER = "generated by model_cards.cards: stage2-push regenerates this card; delete this line to keep edits"

_TILE = f"{TILE_SIZE}, {TILE_SIZE}"
COLUMN_DOCS = {
    "target": f"float32 ({len(BAND_NAMES)}, {_TILE}): the real Sentinel-2 surface reflectance, bands "
              f"{' '.join(BAND_NAMES)}, 0..1 (invalid pixels stored as 0)",
    "opt_v1": f"float32 ({len(BAND_NAMES)}, {_TILE}): the image to refine (how it was made: above), same bands and "
              "scale",
    "month": f"int64: acquisition month 1..{NUM_MONTHS} ({UNKNOWN_METADATA} unknown)",
    "biome": f"int64: IGBP-like biome 0..{NUM_BIOMES - 1} ({UNKNOWN_METADATA} unknown)",
    "tile_id": "string: tile identifier",
    "valid_mask": f"bool ({_TILE}): True where every target band is finite",
    "s1": f"float32 (2, {_TILE}): Sentinel-1 backscatter (VV, VH), when present",
}


class CardError(ValueError):
    """Bad input for a card (names the file or argument and what to fix)."""


# ------------------------------------------------------------------------------------ metrics
def validate_metrics(metrics: Mapping, source: str = "metrics") -> dict:
    """Check `{"refined": {...}, "opt_v1": {...}, "n_tiles": N}` and return it with plain floats/ints.

    `refined` must have every `CARD_METRICS` key; `opt_v1` (the unrefined input), `linear_fit` (the colour fit,
    with `linear_fit_fitted_on = {"split": ..., "tiles": N}`), `n_tiles`, `split` (the split the metrics were
    computed on, recorded when they were), `data` (what the evaluated data's `opt_v1` is: `input_mode`, and for a
    synthetic one `degradation` and `dataset_seed`, as `stage2-evaluate --json` records it) and `quantization` (the
    backbone's precision they were measured at, one of `QUANTIZATIONS`) are optional. Values
    must be numbers; NaN (a metric with no valid pixel to measure) is kept and shown as n/a.
    """
    if not isinstance(metrics, Mapping):
        raise CardError(f"{source}: expected a mapping {{'refined': {{...}}, 'opt_v1': {{...}}, 'n_tiles': N}}, "
                        f"got {type(metrics).__name__}")
    if not isinstance(metrics.get("refined"), Mapping):
        raise CardError(f"{source}: key 'refined' is missing or not a mapping of metric name -> value "
                        "(write it with `stage2-evaluate --json`)")
    clean: dict[str, Any] = {}
    for group in ("refined", "opt_v1", "linear_fit"):
        if group not in metrics:
            continue
        values = metrics[group]
        if not isinstance(values, Mapping):
            raise CardError(f"{source}: key {group!r} must be a mapping of metric name -> value")
        clean[group] = {name: _number(value, f"{source}: {group}.{name}") for name, value in values.items()}
    missing = [name for name in CARD_METRICS if name not in clean["refined"]]
    if missing:
        raise CardError(f"{source}: 'refined' lacks {missing}; the card needs {list(CARD_METRICS)}")
    if metrics.get("n_tiles") is not None:
        n_tiles = metrics["n_tiles"]
        if isinstance(n_tiles, bool) or not isinstance(n_tiles, int) or n_tiles < 1:
            raise CardError(f"{source}: 'n_tiles' must be a positive integer, got {n_tiles!r}")
        clean["n_tiles"] = int(n_tiles)
    fitted_on = metrics.get("linear_fit_fitted_on")
    if fitted_on is not None:
        if not isinstance(fitted_on, Mapping) or not isinstance(fitted_on.get("split"), str):
            raise CardError(f"{source}: 'linear_fit_fitted_on' must be a mapping with the 'split' the colour fit "
                            f"was fitted on, got {fitted_on!r}")
        clean["linear_fit_fitted_on"] = {"split": fitted_on["split"], "tiles": fitted_on.get("tiles")}
    if metrics.get("split") is not None:
        if not isinstance(metrics["split"], str) or not metrics["split"]:
            raise CardError(f"{source}: 'split' must name the split the metrics were computed on, "
                            f"got {metrics['split']!r}")
        clean["split"] = metrics["split"]
    if metrics.get("data") is not None:
        clean["data"] = _data_record(metrics["data"], f"{source}: data")
    if metrics.get("quantization") is not None:  # absent (or null) in metrics written before it was recorded
        if metrics["quantization"] not in QUANTIZATIONS:
            raise CardError(f"{source}: 'quantization' must be one of {list(QUANTIZATIONS)} (the stage2-evaluate "
                            f"--quantization the metrics were measured with), got {metrics['quantization']!r}")
        clean["quantization"] = metrics["quantization"]
    return clean


def _data_record(data: Any, where: str) -> dict:
    """A metrics file's `data` block, checked: `input_mode` one of `INPUT_MODES`, `degradation` a preset name or
    None, `dataset_seed` an integer or None."""
    if not isinstance(data, Mapping) or data.get("input_mode") not in INPUT_MODES:
        raise CardError(f"{where}: expected {{'input_mode': one of {list(INPUT_MODES)}, 'degradation': ..., "
                        f"'dataset_seed': ...}} (what stage2-evaluate --json records), got {data!r}")
    degradation, seed = data.get("degradation"), data.get("dataset_seed")
    if degradation is not None and not isinstance(degradation, str):
        raise CardError(f"{where}.degradation: expected a preset name or null, got {degradation!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise CardError(f"{where}.dataset_seed: expected an integer or null, got {seed!r}")
    return {"input_mode": data["input_mode"], "degradation": degradation, "dataset_seed": seed}


UNRECORDED_SPLIT = "unrecorded"
"""The split shown for metrics that do not say which split they were computed on (written before they did)."""


def evaluated_split(metrics: Mapping | None, split: str | None = None) -> str:
    """The split a card names for `metrics`: the one recorded in them; `split` only for metrics that record none.
    A `split` that contradicts the recorded one is an error: a card never relabels validation metrics as test."""
    recorded = metrics.get("split") if metrics else None
    if recorded is not None and split is not None and split != recorded:
        raise CardError(f"the metrics were computed on the {recorded!r} split; they cannot be labelled {split!r}")
    return recorded or split or UNRECORDED_SPLIT


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or value is None:
        raise CardError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CardError(f"{where}: expected a number, got {value!r}") from None


def eval_results(metrics: Mapping, *, dataset_type: str, dataset_name: str, split: str = "test") -> list[EvalResult]:
    """The `model-index` entries of the refined model's measured `CARD_METRICS` (lower is better)."""
    metrics = validate_metrics(metrics)
    measured = [name for name in CARD_METRICS if math.isfinite(metrics["refined"][name])]
    return [
        EvalResult(task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=dataset_type, dataset_name=dataset_name,
                   dataset_split=split, metric_type=name, metric_name=METRIC_LABELS[name],
                   metric_value=metrics["refined"][name])
        for name in measured
    ]


def metric_rows(metrics: Mapping) -> list[dict[str, str]]:
    """Rows of the evaluation table: refined, `opt_v1`, colour fit (`linear_fit`), target and whether the target is
    met."""
    metrics = validate_metrics(metrics)
    rows = []
    for name in TABLE_METRICS:
        refined = metrics["refined"].get(name)
        if refined is None:
            continue
        opt_v1 = metrics.get("opt_v1", {}).get(name)
        linear_fit = metrics.get("linear_fit", {}).get(name)
        target = DESIGN_TARGETS.get(name)
        digits = _distinguishing_digits(refined, opt_v1, linear_fit)
        rows.append({
            "name": name,
            "label": _row_label(name),
            "refined": _fmt(refined, target, digits),
            "opt_v1": _fmt(opt_v1, digits=digits),
            "linear_fit": _fmt(linear_fit, digits=digits),
            "target": f"< {target:g}" if target is not None else "-",
            "meets": "-" if target is None or not math.isfinite(refined) else ("yes" if refined < target else "no"),
        })
    return rows


def _linear_fit_label(fitted_on: Mapping | None) -> str:
    """Column header of the colour fit (`linear_fit`), naming the split (and tile count) it was fitted on."""
    if not fitted_on:
        return "colour fit"
    tiles = f", {fitted_on['tiles']} tiles" if fitted_on.get("tiles") else ""
    return f"colour fit (fitted on `{fitted_on['split']}`{tiles})"


def _row_label(name: str) -> str:
    """The metric's label in the table, its unit and direction in one parenthesis: "PSNR (dB, higher is better)"."""
    notes = [METRIC_UNITS[name]] if name in METRIC_UNITS else []
    notes += ["higher is better"] if HIGHER_IS_BETTER[name] else []
    return f"{_METRIC_WORDS[name]} ({', '.join(notes)})" if notes else _METRIC_WORDS[name]


SHOWN_DIGITS = 4  # significant digits of the table's values, unless more are needed to tell them apart (below)
MAX_DIGITS = 17  # enough for any float64 to print as itself


def _distinguishing_digits(*values: float | None) -> int:
    """The fewest significant digits (at least `SHOWN_DIGITS`) at which the row's values that differ print
    differently: a refined 0.09871 beside an `opt_v1` of 0.09874 must not read as the same "0.0987"."""
    finite = sorted({value for value in values if value is not None and math.isfinite(value)})
    for digits in range(SHOWN_DIGITS, MAX_DIGITS):
        if len({f"{value:.{digits}g}" for value in finite}) == len(finite):
            return digits
    return MAX_DIGITS


def _fmt(value: float | None, target: float | None = None, digits: int = SHOWN_DIGITS) -> str:
    """`value` to `digits` significant digits; beside a `target`, with as many more as it takes for the value shown to
    be on the side of the target that the value is (0.049996 is "0.049996", not "0.05", next to "< 0.05" and "yes")."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "n/a"
    for shown in range(digits, MAX_DIGITS + 1):
        text = f"{value:.{shown}g}"
        if target is None or (float(text) < target) == (value < target):
            return text
    return repr(value)


# ------------------------------------------------------------------------------------ model card
def build_model_card(
    metrics: Mapping | None = None,
    training_config: Mapping | None = None,
    *,
    base_model: str | None = DEFAULT_BASE_MODEL,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str = DEFAULT_LICENSE,
    datasets: list[str] | str | None = None,
    dataset_name: str = DEFAULT_DATASET_NAME,
    eval_dataset_name: str | None = None,
    split: str | None = None,
    preview: str | None = PREVIEW_FILE,
    model_config: Mapping | None = None,
    adapter_config: Mapping | None = None,
    library_name: str = "peft",
    has_code: bool = False,
    base_is_refiner: bool = False,
    local_base: str | None = None,
    contents: str | None = None,
    quantization: str | None = None,
    training_data_scope: str = "BigEarthNet v2 Sentinel-2 tiles (10 European countries, June 2017 - May 2018)",
    extra_tags: tuple[str, ...] | list[str] = (),
    template_path: str | Path = TEMPLATE_PATH,
) -> ModelCard:
    """A model card rendered from `template.md`.

    Args:
        metrics: `{"refined": {...}, "opt_v1": {...}, "n_tiles": N}` (as `stage2-evaluate --json` writes); its
            `CARD_METRICS` become `model-index` entries. None: a card without results.
        training_config: flat or nested settings shown in the training table (None values are left out).
        base_model: Hub id of the pretrained backbone (a Prithvi-EO-2.0 repo); None for a randomly initialised
            backbone (the card then names no base model).
        repo_id: where the model lives on the Hub (used in the usage snippets and as the model name).
        model_name: the `model-index` name; defaults to the repo name.
        license: SPDX-like license id of the Hub (`apache-2.0`).
        datasets: Hub dataset ids the model was trained on (metadata `datasets`).
        dataset_name: human name of the training data (the Data line, when no `datasets` ids are given).
        eval_dataset_name: human name of the evaluation data; by default `dataset_name`, unless the metrics
            record (`"data"`) an `opt_v1` other than the training record's: then that one's name (`data_name`).
            `split`: its split, for metrics that do not record it (metrics name their own split under `"split"`;
            a different `split` here is an error).
        preview: relative path or URL of the preview image, None for none.
        model_config: the refiner's `config.json` as a dict (backbone and bands are described from it).
        adapter_config: the PEFT `adapter_config.json` as a dict (LoRA rank, alpha, targets).
        library_name: `peft` for an adapter repo, `transformers` for a full model.
        has_code: whether the repo carries the modeling code (`trust_remote_code` snippet).
        base_is_refiner: `base_model` is the Stage 2 refiner the adapter was trained on, not a backbone.
        local_base: the folder of the refiner the adapter was trained on, when that is a folder on the training
            machine (`stage2_base.json`): the card names it as the base, and no Hub base model.
        contents: a sentence saying what the repo holds (derived from the other arguments by default).
        quantization: how the backbone was quantized in training ("8bit", "4bit", "none"); by default read
            from `training_config["quantization"]` or the config's `quantization_config`.
        training_data_scope: where and when the training data come from (the limits section).
        extra_tags: tags added to `MODEL_TAGS`.
        template_path: the Jinja template.
    """
    clean = validate_metrics(metrics) if metrics is not None else None
    split = evaluated_split(clean, split)
    evaluated = clean.get("data") if clean else None
    trained_on_it = evaluated is None or all((training_config or {}).get(key) == value
                                             for key, value in evaluated.items())
    if eval_dataset_name is None:
        eval_dataset_name = dataset_name if trained_on_it else data_name(evaluated)
    if training_config is not None and not isinstance(training_config, Mapping):
        raise CardError(f"training_config: expected a mapping of setting -> value, got {type(training_config).__name__}")
    if base_model is not None and (not isinstance(base_model, str) or not is_hub_repo_id(base_model)):
        raise CardError(f"base_model: expected a Hub repo id OWNER/NAME, got {base_model!r}")
    dataset_ids = [datasets] if isinstance(datasets, str) else list(datasets or [])
    name = model_name or (repo_id.split("/")[-1] if repo_id else "stage2-refiner")
    tags = list(dict.fromkeys([*MODEL_TAGS, *(["peft"] if library_name == "peft" else []), *extra_tags]))
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation=None if base_model is None else "adapter" if library_name == "peft" else "finetune",
        license=license,
        library_name=library_name,
        pipeline_tag=TASK_TYPE,
        tags=tags,
        datasets=dataset_ids or None,
        metrics=list(CARD_METRICS) if clean else None,
        model_name=name,
        # the training data's Hub id only for results on that data: the Hub links `type` to that dataset's page
        eval_results=eval_results(clean, dataset_type=dataset_ids[0] if dataset_ids and trained_on_it
                                  else "bigearthnet-v2",
                                  dataset_name=eval_dataset_name, split=split) or None if clean else None,
    )
    model_config = dict(model_config or {})
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=name,
        repo_id=repo_id or "OWNER/REPO",
        summary=_summary(library_name),
        base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if base_model else None,
        base_is_refiner=base_is_refiner and base_model is not None,
        local_base=local_base,
        backbone_from_a_local_file=_backbone_from_a_local_file(model_config),
        bands=list(model_config.get("bands") or BAND_NAMES),
        architecture=_describe_architecture(model_config),
        adaptation=_describe_adaptation(adapter_config, model_config),
        quantization=_describe_quantization(
            {"quantization": quantization} if quantization else training_config, model_config),
        contents=contents or _describe_contents(
            library_name, has_code, named=bool((adapter_config or {}).get("modules_to_save")),
            pretrained_base=base_model is not None or _backbone_from_a_local_file(model_config),
            local_base=local_base),
        library_name=library_name,
        has_code=has_code,
        license=license,
        preview=preview,
        training_data_scope=training_data_scope,
        datasets_text=", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in dataset_ids)
        or dataset_name,
        training_rows=training_rows(training_config or {}),
        metric_rows=metric_rows(clean) if clean else [],
        n_tiles=clean.get("n_tiles", "the") if clean else None,
        split=split,
        eval_dataset_name=eval_dataset_name,
        eval_precision=_measured_precision(clean.get("quantization")) if clean else None,
        metric_notes=metric_notes("opt_v1" in clean, "linear_fit" in clean) if clean else None,
        has_opt_v1=bool(clean) and "opt_v1" in clean,
        linear_fit_label=(_linear_fit_label(clean.get("linear_fit_fitted_on"))
                          if clean and "linear_fit" in clean else None),
        generated_marker=GENERATED_MARKER,
    )


def _summary(library_name: str) -> str:
    kind = "LoRA adapter and trainable modules" if library_name == "peft" else "weights"
    return (f"The {kind} of a Stage 2 refiner: it turns `opt_v1`, a synthetic 4-band Sentinel-2 image generated "
            "from SAR by Stage 1, into refined optical surface reflectance, conditioned on the month and biome "
            "of the tile, with a frozen Prithvi-EO-2.0 backbone.")


def _describe_backbone(model_config: Mapping) -> str:
    backbone = model_config.get("backbone_config") or {}
    if not isinstance(backbone, Mapping) or not backbone:
        return "configuration in `config.json`"
    parts = [f"{key} {backbone[key]}" for key in ("embed_dim", "depth", "num_heads") if key in backbone]
    if "patch_size" in backbone:
        parts.append("patch " + "x".join(str(p) for p in backbone["patch_size"]))
    return ", ".join(parts) or "configuration in `config.json`"


def _describe_architecture(model_config: Mapping) -> str:
    """The refiner's parts in the order of its forward pass, from its config (absent keys: the config's defaults,
    which are those of models saved before each part existed)."""
    parts = ["month/biome embedding + fusion", f"Prithvi-EO-2.0 encoder ({_describe_backbone(model_config)})"]
    correction = model_config.get("spectral_correction", "none")
    if correction == "shared":
        parts.append("one 4x4 + bias colour correction of `opt_v1` for every tile")
    elif correction == "affine":
        parts.append("a 4x4 + bias colour correction of `opt_v1` per tile, from the tile's features, month and biome")
    hidden = model_config.get("spectral_mlp_hidden_size", 0)
    if hidden:
        parts.append(f"a per-pixel spectral MLP (hidden width {hidden}), a non-linear colour correction")
    blocks, width = model_config.get("num_convnext_blocks"), model_config.get("head_width")
    shape = f" ({blocks} blocks, width {width})" if blocks and width else ""
    parts.append(f"ConvNeXt head{shape} adding a local residual")
    text = " -> ".join(parts)
    kept = []
    if model_config.get("out_of_range_fallback"):
        kept.append("`opt_v1` at pixels whose spectrum lies outside the training spectra")
    if model_config.get("near_black_fallback"):
        what = "`opt_v1`'s NDVI" if model_config.get("near_black_keep") == "ndvi" else "`opt_v1`"
        kept.append(f"{what} at near-black pixels (red + NIR reflectance up to "
                    f"{model_config.get('near_black_threshold')})")
    if kept:
        text += "; keeps " + " and ".join(kept)
    if model_config.get("nonnegative_output"):
        text += "; output clamped at 0 reflectance"
    return text


def _describe_adaptation(adapter_config: Mapping | None, model_config: Mapping) -> str:
    targets = model_config.get("lora_target_modules") or ("qkv", "proj", "fc1", "fc2")
    blocks = model_config.get("unfreeze_last_n_blocks")
    blocks_text = ("every backbone block" if not blocks else "the last backbone block" if blocks == 1
                   else f"the last {blocks} backbone blocks")
    where = f"{', '.join(targets)} of {blocks_text}"
    if adapter_config is not None:
        saved = adapter_config.get("modules_to_save") or ()
        trained = [name for name in saved if name not in FITTED_MODULES]
        fitted = [name for name in saved if name in FITTED_MODULES]
        text = (f"LoRA r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, "
                f"dropout={adapter_config.get('lora_dropout')} on {where}")
        text += f"; trained in full: {', '.join(trained)}" if trained else ""
        return text + (f"; fitted before training: {', '.join(fitted)}" if fitted else "")
    if model_config.get(LORA_MERGED_KEY) and model_config.get("lora_r"):
        return f"LoRA r={model_config['lora_r']}, alpha={model_config.get('lora_alpha')} on {where}, merged"
    # every config holds LoRA settings (the defaults an adapter would be built with): only the merge's record says
    # that these weights went through them
    return (f"full refiner weights, with no LoRA merge recorded in `config.json` (`export_merged_model` records "
            f"one as `{LORA_MERGED_KEY}`)")


QUANTIZED_WORDS = {"8bit": "8-bit (LLM.int8, bitsandbytes)", "4bit": "4-bit NF4 (bitsandbytes)"}


def _measured_precision(quantization: str | None) -> str | None:
    """How the backbone was loaded when the metrics were measured (`stage2-evaluate --quantization`, or the training's
    `quantization` for the metrics training records), in words; None for metrics that do not record it."""
    if quantization is None:
        return None
    words = QUANTIZED_WORDS.get(quantization, "full precision (not quantized)")
    return f"the backbone loaded in {words}"


def _describe_quantization(training_config: Mapping | None, model_config: Mapping) -> str:
    value = (training_config or {}).get("quantization")
    saved = model_config.get("quantization_config")
    if value is None and isinstance(saved, Mapping):
        value = "8bit" if saved.get("load_in_8bit") else "4bit" if saved.get("load_in_4bit") else saved.get(
            "quant_method")
    names = {**{name: f"{words} during training" for name, words in QUANTIZED_WORDS.items()},
             "none": "not quantized during training"}
    if value is None:
        return "chosen at load time: `load_trained_model(..., quantization=...)` with 8bit, 4bit or none"
    return names.get(str(value), str(value))


def _describe_contents(library_name: str, has_code: bool, named: bool, pretrained_base: bool,
                       local_base: str | None = None) -> str:
    """`named`: the Adaptation row lists the modules saved with the adapter; `pretrained_base`: the frozen backbone
    comes from a base model (else it was randomly initialised and `save_trained_model` saved it beside the adapter);
    `local_base`: the adapter's base is that refiner folder on the training machine (not saved beside it)."""
    if library_name != "peft":
        text = "the full refiner weights (`model.safetensors`) and config"
    else:
        modules = "the non-backbone modules trained or fitted beside it" + (" (named under Adaptation)" if named else "")
        text = f"the LoRA adapter (`adapter_model.safetensors`, `adapter_config.json`), {modules} and the refiner config"
        text += (f"; the base refiner (`{local_base}`) is not included" if local_base is not None else
                 "; the backbone weights are not included (they come from the base model)" if pretrained_base else
                 f"; the randomly initialised backbone (`{BASE_WEIGHTS_FILE}`) that the adapter was trained on")
    return text + ("; the modeling code" if has_code else "")


def training_rows(config: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    """Flatten a (nested) training configuration into table rows, leaving out None values."""
    rows = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if value is None:
            continue
        if isinstance(value, Mapping):
            rows.extend(training_rows(value, prefix=f"{name}."))
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        text = str(value).replace("|", "\\|").replace("\n", " ")
        rows.append((name, text if len(text) <= 200 else text[:197] + "..."))
    return rows


# ------------------------------------------------------------------------------------ folder -> card
def data_name(record: Mapping | None) -> str:
    """The card's name of a model's data, from what a record says its `opt_v1` was (`input_mode`, and for a
    synthetic one `degradation` and `dataset_seed`): the training record (`training_config.json`) for the training
    data, a metrics file's `"data"` for the evaluated data; `DEFAULT_DATASET_NAME` for a record that does not say."""
    config = record or {}
    mode = config.get("input_mode")
    if mode == "stage1":
        return f"{TILES_NAME} with Stage 1 outputs as opt_v1"
    if mode == "identity":
        return f"{TILES_NAME} with opt_v1 = the target (identity)"
    if mode == "synthetic" and config.get("degradation") is not None:
        return (f"{TILES_NAME} with synthetic opt_v1 (degradation {config['degradation']!r}, dataset seed "
                f"{config.get('dataset_seed')})")
    return DEFAULT_DATASET_NAME


def read_json(path: Path, what: str) -> dict | None:
    """A JSON object from `path` (None when the file is absent); a clear error when it is not one."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CardError(f"{path}: cannot read the {what} ({err}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise CardError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}")
    return data


def base_model_from_config(model_config: Mapping | None, adapter_config: Mapping | None = None) -> str | None:
    """The backbone's Hub repo: `backbone_weights` of the refiner config when it names one
    (`OWNER/REPO` or `OWNER/REPO/FILE.pt`, `hf://...`); for weights from a local file or folder, the released
    Prithvi-EO-2.0 repo of the config's backbone architecture (None when no release has it); None when the config
    says the backbone was randomly initialised (`backbone_weights` null and no Hub base in the adapter config: a demo or
    test model, which must not claim a pretrained base); else `DEFAULT_BASE_MODEL` (nothing known)."""
    for source in ((model_config or {}).get("backbone_weights"),
                   (adapter_config or {}).get("base_model_name_or_path")):
        repo_id = _hub_repo_of(source)
        if repo_id is not None:
            return repo_id
    if _backbone_from_a_local_file(model_config) and isinstance(model_config.get("backbone_config"), Mapping):
        return official_hub_repo(model_config["backbone_config"])
    # a base the adapter names on the Hub was returned above; one it names otherwise (a refiner folder on the training
    # machine) says nothing of the backbone, which the config says was randomly initialised
    if model_config is not None and "backbone_weights" in model_config and model_config["backbone_weights"] is None:
        return None
    return DEFAULT_BASE_MODEL


def _hub_repo_of(source) -> str | None:
    """OWNER/NAME of a Hub source (`OWNER/NAME`, `OWNER/NAME/FILE.pt`, `hf://...`), None for anything else."""
    if not isinstance(source, str):
        return None
    text = source[len("hf://"):] if source.startswith("hf://") else source
    repo_id = "/".join(text.split("/")[:2])  # OWNER/NAME, or OWNER/NAME/FILE of a checkpoint
    return repo_id if text.count("/") <= 2 and is_hub_repo_id(repo_id) and not Path(text).exists() else None


def _backbone_from_a_local_file(model_config: Mapping | None) -> bool:
    """The config's `backbone_weights` names a local file or folder (stored absolute by `local_source_or_name`)."""
    source = (model_config or {}).get("backbone_weights")
    return isinstance(source, str) and _hub_repo_of(source) is None


def card_for_folder(
    output_dir: str | Path,
    metrics: Mapping | None = None,
    training_config: Mapping | None = None,
    base_model: str | None = None,
    preview: str | None = PREVIEW_FILE,
    **kwargs,
) -> ModelCard:
    """`build_model_card` for a trained model folder, reading what the folder holds: `metrics.json`,
    `training_config.json`, `config.json`, `adapter_config.json`, `stage2_base.json` and the preview image."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise CardError(f"{folder}: not a folder; give the folder written by save_trained_model / the trainer")
    if metrics is None:
        metrics = read_json(folder / METRICS_FILE, "evaluation metrics")
        if metrics is not None:
            metrics = validate_metrics(metrics, source=str(folder / METRICS_FILE))
    if training_config is None:
        training_config = read_json(folder / TRAINING_CONFIG_FILE, "training configuration")
    model_config = read_json(folder / "config.json", "model config")
    adapter_config = read_json(folder / ADAPTER_CONFIG_FILE, "adapter config")
    base_source = read_json(folder / BASE_SOURCE_FILE, "base description") or {}
    kwargs.setdefault("quantization", base_source.get("trained_quantization"))
    kwargs.setdefault("dataset_name", data_name(training_config))
    kwargs.setdefault("library_name", "peft" if adapter_config is not None else "transformers")
    if preview is not None and "://" not in preview and not (folder / preview).is_file():
        preview = None  # never link an image the repo does not have
    refiner_base = _refiner_base(base_source) if base_model is None else None
    kwargs.setdefault("base_is_refiner", refiner_base is not None)
    local_base = _local_refiner_base(base_source) if base_model is None else None
    kwargs.setdefault("local_base", local_base)
    if local_base is not None:  # an adapter of that folder, not of a Hub repo: no Hub base to name
        return build_model_card(metrics, training_config, base_model=None, preview=preview, model_config=model_config,
                                adapter_config=adapter_config, **kwargs)
    return build_model_card(
        metrics, training_config,
        base_model=base_model or refiner_base or base_model_from_config(model_config, adapter_config),
        preview=preview, model_config=model_config, adapter_config=adapter_config, **kwargs,
    )


def _refiner_base(base_source: Mapping) -> str | None:
    """The Hub repo of the refiner an adapter was trained on (`stage2_base.json` of kind "model"): the adapter's base,
    which `load_trained_model` fetches, rather than the backbone that refiner was built on."""
    if base_source.get("kind") != "model":
        return None
    return _hub_repo_of(base_source.get("model_name_or_path"))


def _local_refiner_base(base_source: Mapping) -> str | None:
    """The folder of the refiner an adapter was trained on when it is one on this machine (`stage2_base.json` of kind
    "model" naming no Hub repo): the adapter's base, which nobody who pulls the adapter has."""
    source = base_source.get("model_name_or_path")
    if base_source.get("kind") != "model" or not isinstance(source, str) or _hub_repo_of(source) is not None:
        return None
    return source


def is_placeholder_card(text: str) -> bool:
    """True for an unfilled card, such as the one `peft`'s `save_pretrained` writes beside an adapter."""
    return "[More Information Needed]" in text or "# Model Card for Model ID" in text


def should_regenerate_card(text: str) -> bool:
    """True for a card `stage2-push` replaces: an unfilled template or one this module generated."""
    return is_placeholder_card(text) or GENERATED_MARKER in text


def write_model_card(
    output_dir: str | Path,
    metrics: Mapping | None = None,
    training_config: Mapping | None = None,
    base_model: str | None = None,
    preview: str | None = PREVIEW_FILE,
    **kwargs,
) -> Path:
    """Write `README.md` (the model card) into a trained model folder and return its path.

    What is not given is read from the folder when present: `metrics.json` (`stage2-evaluate --json`
    format), `training_config.json`, `config.json`, `adapter_config.json`; the preview is linked only if
    the file exists. `base_model` defaults to the Hub repo named by the config's `backbone_weights`. Other
    keyword arguments go to `build_model_card` (`repo_id`, `datasets`, `license`, ...). The file is
    replaced atomically.
    """
    card = card_for_folder(output_dir, metrics, training_config, base_model, preview, **kwargs)
    return write_text(Path(output_dir) / "README.md", str(card))


# ------------------------------------------------------------------------------------ dataset card
def build_dataset_card(
    dataset_dict_or_info: Any,
    *,
    repo_id: str | None = None,
    license: str = "cdla-permissive-1.0",
    pretty_name: str | None = None,
    extra_metadata: Mapping | None = None,
    extra_tags: tuple[str, ...] | list[str] = (),
    template_path: str | Path = DATASET_TEMPLATE_PATH,
) -> DatasetCard:
    """A dataset card for the Arrow dataset of `data_builders.build_dataset`.

    `dataset_dict_or_info` is a `datasets.DatasetDict` (or `Dataset`), the folder it was saved to, or a
    mapping `{"splits": {name: num_rows}, "features": {column: description}}`. `extra_metadata` is merged
    into the YAML (e.g. the `configs` / `dataset_info` that `DatasetDict.push_to_hub` writes). The default
    license is BigEarthNet's (CDLA-Permissive-1.0); Sentinel data are under the Copernicus terms. The title (unless
    `pretty_name`), the `opt_v1` paragraph and its limitation say what the build record says `opt_v1` is: Stage 1
    outputs, the target itself or a degraded target; a dataset without a record claims none of them.
    """
    source = _loaded_dataset(dataset_dict_or_info)
    splits, columns = _dataset_summary(source)
    opt_v1 = _opt_v1_kind(source)
    pretty_name = pretty_name or DATASET_TITLES[opt_v1["input_mode"] if opt_v1 else None]
    total = sum(splits.values())
    metadata = dict(extra_metadata or {})
    metadata.pop("license", None)
    card_data = DatasetCardData(
        license=license,
        pretty_name=pretty_name,
        task_categories=[TASK_TYPE],
        tags=list(dict.fromkeys([*DATASET_TAGS, *extra_tags])),
        size_categories=[_size_category(total)],
        **metadata,
    )
    return DatasetCard.from_template(
        card_data,
        template_path=str(template_path),
        pretty_name=pretty_name,
        repo_id=repo_id or "OWNER/REPO",
        split_rows=sorted(splits.items(), key=lambda item: ("train", "val", "validation", "test").index(item[0])
                          if item[0] in ("train", "val", "validation", "test") else 9),
        total_rows=total,
        column_rows=[(name, COLUMN_DOCS.get(name, description)) for name, description in columns.items()],
        opt_v1_origin=_opt_v1_origin(opt_v1),
        opt_v1_limitation=OPT_V1_LIMITATIONS[opt_v1["input_mode"] if opt_v1 else None],
        license=license,
    )


DATASET_TITLES = {
    "stage1": "Stage 2 refinement tiles (Sentinel-2, Stage 1 opt_v1)",
    "synthetic": "Stage 2 refinement tiles (Sentinel-2, synthetic opt_v1)",
    "identity": "Stage 2 refinement tiles (Sentinel-2, opt_v1 = target)",
    None: "Stage 2 refinement tiles (Sentinel-2)",
}
OPT_V1_LIMITATIONS = {
    "stage1": "`opt_v1` is a Stage 1 output, generated from SAR: an input to refine, not an observation.",
    "synthetic": "`opt_v1` is the target degraded by `data_builders.degrade`, not a Stage 1 output: a model trained "
                 "on it has learnt those errors, which a real Stage 1 generator's may not resemble.",
    "identity": "`opt_v1` is the target itself: there is nothing to refine; use it to check that a refiner keeps "
                "a clean input, not to train one.",
    None: "`opt_v1` is a Stage 1 output or a stand-in for one (this dataset does not record which): an input to "
          "refine, not an observation.",
}


def _opt_v1_kind(source: Any) -> dict | None:
    """The dataset's `opt_v1` settings from its build record (`data_builders.build.recorded_opt_v1`); None for an
    info mapping or a dataset without a record."""
    if isinstance(source, Mapping) and "splits" in source:
        return None
    from data_builders.build import recorded_opt_v1

    return recorded_opt_v1(source)


def _opt_v1_origin(settings: dict | None) -> str | None:
    """How the dataset's `opt_v1` was made, in words; None where the dataset does not record it."""
    if settings is None:
        return None
    mode = settings["input_mode"]
    if mode == "stage1":
        return "the outputs of a Stage 1 generator (`input_mode` stage1)."
    if mode == "identity":
        return "`target` itself (`input_mode` identity): no Stage 1 output, no degradation."
    if mode == "synthetic":
        preset = repr(settings["degradation"]) if settings["degradation"] is not None else "not recorded"
        return (f"`target` degraded by `data_builders.degrade` (`input_mode` synthetic; preset {preset}, dataset seed "
                f"{settings['dataset_seed']}): it stands in for a Stage 1 output and is not one.")
    return None


def _loaded_dataset(source: Any) -> Any:
    """`source` with a saved dataset folder loaded (`datasets.load_from_disk`); anything else as it is."""
    if not isinstance(source, (str, Path)):
        return source
    path = Path(source)
    if not path.is_dir():
        raise CardError(f"{path}: not a saved dataset folder (write it with data_builders.build_dataset)")
    problem = saved_dataset_problem(path)
    if problem:
        raise CardError(problem)
    import datasets

    return datasets.load_from_disk(str(path))


def _dataset_summary(source: Any) -> tuple[dict[str, int], dict[str, str]]:
    if isinstance(source, Mapping) and "splits" in source:
        splits = source["splits"]
        if not isinstance(splits, Mapping) or not all(isinstance(n, int) and n >= 0 for n in splits.values()):
            raise CardError("dataset info: 'splits' must map split name -> number of rows")
        features = source.get("features") or {}
        return dict(splits), {str(k): str(v) for k, v in features.items()}
    import datasets

    if isinstance(source, datasets.Dataset):
        source = datasets.DatasetDict({"train": source})
    if not isinstance(source, datasets.DatasetDict) or not source:
        raise CardError(f"dataset: expected a DatasetDict, Dataset, saved folder or info mapping, got "
                        f"{type(source).__name__}")
    first = next(iter(source.values()))
    return ({name: split.num_rows for name, split in source.items()},
            {name: _describe_feature(feature) for name, feature in first.features.items()})


def _describe_feature(feature: Any) -> str:
    dtype = getattr(feature, "dtype", None)
    shape = getattr(feature, "shape", None)
    return f"{dtype} {tuple(shape)}" if shape else str(dtype or type(feature).__name__)


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"
