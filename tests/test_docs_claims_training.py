"""Values the data, training, inference and loss docs (`docs/training.md`, `docs/data.md`, `docs/inference.md`,
`docs/losses_and_metrics.md`) quote in prose and tables, against the code's: a default or constant changed in one
place and not the other fails here. Each claim is read from the doc by a pattern, so a reworded sentence that drops
the claim fails too (update the pattern with the sentence)."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _text(name: str) -> str:
    return " ".join((DOCS / name).read_text(encoding="utf-8").split())  # one line: claims may wrap


def _quoted(name: str, pattern: str) -> list:
    found = re.findall(pattern, _text(name))
    assert found, f"docs/{name} no longer says {pattern!r}; update this test with the sentence"
    return found


def _same(quoted: str, default) -> bool:
    """Whether a value as the doc writes it (`true`, `0.99`, `qkv proj fc1 fc2`, `mild`) is `default`."""
    if isinstance(default, bool):
        return quoted == str(default).lower()
    if isinstance(default, (int, float)):
        return math.isclose(float(quoted), float(default))
    if isinstance(default, (list, tuple)):
        return quoted.split() == [str(item) for item in default]
    return quoted == str(getattr(default, "value", default))


def test_flag_defaults_in_the_training_table():
    """`--name value` in the table of `stage2-train` flags is that field's default (the loss weights, unset by
    default, are the next test's; `--refiner_config_overrides '{...}'` is an example)."""
    from training.args import Stage2DataArguments, Stage2TrainingArguments

    table = re.search(r"\| group \| arguments \(defaults\) \|(.*?)\n\n",
                      (DOCS / "training.md").read_text(encoding="utf-8"), re.S)
    assert table, "docs/training.md lost its table of stage2-train flags"
    defaults = {}
    for cls in (Stage2TrainingArguments, Stage2DataArguments):
        for item in dataclasses.fields(cls):
            if item.default is not dataclasses.MISSING:
                defaults[item.name] = item.default
            elif item.default_factory is not dataclasses.MISSING:
                defaults[item.name] = item.default_factory()
    checked = []
    for name, value in re.findall(r"`--(\w+) ([a-z0-9_.][\w.\- ]*)`", table.group(1)):
        if defaults.get(name) is None:  # not a field, or unset by default: an example value
            continue
        assert _same(value, defaults[name]), f"docs/training.md: --{name} {value}, the default is {defaults[name]!r}"
        checked.append(name)
    assert {"degradation", "lora_r", "quantization", "disc_num_layers", "num_train_epochs", "save_every_epochs",
            "metric_for_best_model", "out_of_range_quantile", "eval_split", "learning_rate", "warmup_steps",
            "per_device_eval_batch_size", "max_grad_norm"} <= set(checked)


def test_loss_weight_defaults_quoted_in_training_md():
    from training.losses import Stage2Loss

    names, values = _quoted("training.md", r"`--spectral_weight`, (.*?) \(unset: `training\.losses\.Stage2Loss` "
                                          r"defaults: ([\d., ]+)\)")[0]
    names = re.findall(r"`--(\w+)`", "`--spectral_weight`, " + names)
    values = [float(value) for value in values.rstrip(".").split(", ")]
    parameters = inspect.signature(Stage2Loss).parameters
    assert len(names) == len(values) == 8
    assert {name: parameters[name].default for name in names} == dict(zip(names, values))


def test_loss_defaults_table_in_losses_md():
    from training.losses import Stage2Loss

    parameters = inspect.signature(Stage2Loss).parameters
    rows = _quoted("losses_and_metrics.md", r"\| `(\w+_weight)`(?:, `(\w+_weight)`)*(?:, `(\w+_weight)`)? \| "
                                            r"(?:`\w+` = )?([\d.]+)")
    seen = set()
    for *names, value in rows:
        for name in filter(None, names):
            assert parameters[name].default == float(value), f"{name}: doc {value}, code {parameters[name].default}"
            seen.add(name)
    assert {"spectral_weight", "identity_weight", "adversarial_weight", "reconstruction_weight", "ndvi_weight",
            "edge_weight"} <= seen
    floors = _quoted("losses_and_metrics.md", r"\| `ndvi_floor`, `evi_floor` \| ([\d.e-]+), ([\d.e-]+) \|")[0]
    assert (parameters["ndvi_floor"].default, parameters["evi_floor"].default) == tuple(map(float, floors))


def test_metric_names_and_targets_quoted_in_losses_md():
    from training import metrics

    names = _quoted("losses_and_metrics.md", r"`METRIC_NAMES = (\(.*?\))`")[0]
    targets = _quoted("losses_and_metrics.md", r"`DESIGN_TARGETS = (\{.*?\})`")[0]
    assert ast.literal_eval(names) == metrics.METRIC_NAMES
    assert ast.literal_eval(targets) == metrics.DESIGN_TARGETS
    statistics = _quoted("losses_and_metrics.md", r"\(`TILE_STATISTICS`: (.*?); float64\)")[0]
    assert tuple(re.findall(r"`(\w+)`", statistics)) == metrics.TILE_STATISTICS
    assert "MSE floored at 1e-10" in _text("losses_and_metrics.md") and metrics.PSNR_MSE_FLOOR == 1e-10
    assert "gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, data range 1.0" in _text("losses_and_metrics.md")
    assert (metrics.SSIM_WINDOW, metrics.SSIM_SIGMA, metrics.SSIM_K1, metrics.SSIM_K2, metrics.SSIM_DATA_RANGE) == \
        (11, 1.5, 0.01, 0.03, 1.0)


def test_discriminator_defaults_and_table_in_losses_md():
    from training.discriminator import PatchDiscriminator, PatchDiscriminatorConfig

    quoted = _quoted("losses_and_metrics.md", r"`PatchDiscriminator\((in_channels=.*?)\)`")[0]
    assert {key: ast.literal_eval(value) for key, value in re.findall(r"(\w+)=([\d.]+)", quoted)} == \
        {name: item.default for name, item in inspect.signature(PatchDiscriminatorConfig).parameters.items()
         if name != "self"}
    rows = _quoted("losses_and_metrics.md", r"\| (\d)(?: \(default\))? \| (\d+) \| (\d+) x (\d+) \| ([\d.]+) M \|")
    assert len(rows) == 5
    for layers, field, side, _, millions in rows:
        model = PatchDiscriminator(num_layers=int(layers))
        assert model.receptive_field == int(field)
        assert model.output_size(120, 120) == (int(side), int(side))
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == float(millions)


def test_evaluation_bootstrap_defaults_quoted_in_training_md():
    from training import bootstrap
    from training.evaluate import build_parser

    assert _quoted("training.md", r"`--bootstrap N` times \(default (\d+), seeded")[0] == \
        str(build_parser().get_default("bootstrap")) == str(bootstrap.DEFAULT_RESAMPLES)
    block = _quoted("training.md", r'"bootstrap": \{"resamples": (\d+), "confidence": ([\d.]+), "seed": (\d+)')[0]
    assert block == (str(bootstrap.DEFAULT_RESAMPLES), str(bootstrap.DEFAULT_CONFIDENCE), "0")


def test_scene_and_tile_defaults_quoted_in_inference_md():
    from inference_stage2 import refine_scene, refine_tiles
    from inference_stage2.values import DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP, DEFAULT_WINDOW

    assert _quoted("inference.md", r"overlap by at least `--overlap` pixels \(default (\d+);")[0] == \
        str(DEFAULT_OVERLAP)
    assert _quoted("inference.md", r"covered with (\d+) x \1 windows \(`--window`\)")[0] == str(DEFAULT_WINDOW)
    tiles = inspect.signature(refine_tiles).parameters
    assert _quoted("inference.md", r"`refine_tiles\(model, inputs, output_dir, stage1_dir=None, "
                                   r"batch_size=(\d+),")[0] == str(tiles["batch_size"].default) == \
        str(DEFAULT_BATCH_SIZE)
    scene = inspect.signature(refine_scene).parameters
    call = _quoted("inference.md", r"refine_scene\(model, \"scene\.tif\", \"refined\.tif\", month=7, biome=4, "
                                   r"window=(\d+), overlap=(\d+), batch_size=(\d+)")[0]
    assert call == (str(scene["window"].default), str(scene["overlap"].default), str(scene["batch_size"].default))
    from inference_stage2.raster import PIXEL_SIZE_TOLERANCE

    tolerance = _quoted("inference.md", r"differ from 10 m by more than (\d+) %")[0]
    assert tolerance == str(round(PIXEL_SIZE_TOLERANCE * 100))


def test_reader_and_builder_constants_quoted_in_data_md():
    from data_builders import build, tiles
    from data_builders.degrade import DEGRADATION_CHOICES

    assert _quoted("data.md", r"`NPZ_MAX_BYTES` = (\d+) MiB")[0] == str(tiles.NPZ_MAX_BYTES // 2**20)
    assert float(_quoted("data.md", r"`REFLECTANCE_MIN = (-[\d.]+)`")[0]) == tiles.REFLECTANCE_MIN
    assert ast.literal_eval(_quoted("data.md", r"`DEGRADATION_CHOICES = (\(.*?\))`")[0]) == DEGRADATION_CHOICES
    assert _quoted("data.md", r"Tiles stream through in chunks of (\d+)")[0] == str(build.CHUNK_SIZE)
    assert _quoted("data.md", r"Arrow record batches of (\d+) rows")[0] == str(build.WRITER_BATCH_SIZE)


@pytest.mark.parametrize("preset", ["mild", "strong"])
def test_degradation_parameters_quoted_in_data_md(preset):
    """The `mild` / `strong` columns of the presets' table (scalars and tuples; `off` = the identity's range)."""
    from data_builders.degrade import DEGRADATION_PRESETS

    config = DEGRADATION_PRESETS[preset]
    column = 1 if preset == "mild" else 2
    rows = {}
    for line in (DOCS / "data.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+`(?: \(.*\))?", cells[0]):
            rows[re.match(r"`(\w+)`", cells[0]).group(1)] = cells[column]
    scalars = ("max_shift", "crosstalk", "gain_std", "offset_std", "noise_std")
    for name in scalars:
        assert float(rows[name]) == getattr(config, name), f"{preset} {name}: doc {rows[name]}"
    for name in ("gain_mean", "offset_mean"):
        assert tuple(float(value) for value in rows[name].split(", ")) == getattr(config, name)
    low, high = (float(value) for value in rows["blur_sigma"].split("-"))
    assert (low, high) == config.blur_sigma
