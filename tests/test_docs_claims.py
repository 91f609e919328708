"""Values the model docs quote in prose (`docs/refiner.md`, `docs/export.md`, `docs/INTERFACES.md`) against the code's:
a default, a threshold or a size limit changed in one place and not the other fails here. Each claim is read from the
doc by a pattern, so a reworded sentence that drops the claim fails too (update the pattern with the sentence)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from modeling_stage2 import Stage2RefinerConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _text(name: str) -> str:
    return " ".join((DOCS / name).read_text(encoding="utf-8").split())  # one line: claims may wrap


def _quoted(name: str, pattern: str) -> list[str]:
    found = re.findall(pattern, _text(name))
    assert found, f"docs/{name} no longer says {pattern!r}; update this test with the sentence"
    return found


def test_the_graphs_smallest_side_is_quoted_per_patch_size():
    from modeling_stage2.export import side_limits

    patches = {}
    for preset in ("prithvi_eo_v2_600m", "prithvi_eo_v2_300m", "prithvi_eo_v2_100m", "prithvi_eo_v2_tiny"):
        config = Stage2RefinerConfig(backbone_config=preset)
        patches[config.patch_size[0]] = side_limits(config)["height"][0]
    for doc in ("export.md", "INTERFACES.md"):
        claims = _quoted(doc, r"\b(\d+)(?: px)? for the (\d+)-px (?:patch|one)\b")
        assert {int(patch): int(side) for side, patch in claims} == patches, doc
        # one number for every backbone would be wrong for the others
        assert not re.search(r"H, W >= \d", _text(doc)), doc


def test_refiner_defaults_quoted_in_refiner_md():
    config = Stage2RefinerConfig()
    lora = _quoted("refiner.md", r"`lora_r` (\d+), `lora_alpha` (\d+), `lora_dropout` ([\d.]+) by default")[0]
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (int(lora[0]), int(lora[1]), float(lora[2]))
    for field, pattern in (
        ("spectral_correction_hidden_size", r"`spectral_correction_hidden_size`, (\d+)\)"),
        ("spectral_mlp_num_layers", r"`spectral_mlp_num_layers`, (\d+)\)"),
        ("near_black_threshold", r"`near_black_threshold` \(([\d.]+) reflectance"),
        ("near_black_ramp", r"`near_black_ramp` \((\d+)\) times it"),
        ("out_of_range_ramp", r"`out_of_range_ramp` \((\d+)\) times it"),
        ("spectral_mlp_log_offset", r"spectral_mlp_log_offset\)`, ([\d.]+) reflectance"),
    ):
        for value in _quoted("refiner.md", pattern):
            assert getattr(config, field) == pytest.approx(float(value)), field
    assert config.spectral_mlp_hidden_size == int(_quoted("refiner.md", r"\((\d+) in the config, \d+ in training")[0])
    blocks = _quoted("refiner.md", r"hidden states of blocks ([\d, ]+) \(600M\)")[0]
    assert config.feature_layers == [int(block) for block in blocks.split(",")]


def test_training_defaults_quoted_in_refiner_md():
    from training.args import Stage2TrainingArguments
    from training.spectral_range import OUT_OF_RANGE_QUANTILE

    fields = {field.name: field.default for field in Stage2TrainingArguments.__dataclass_fields__.values()}
    assert fields["spectral_correction"] == _quoted(
        "refiner.md", r"`Stage2TrainingArguments.spectral_correction` \(default `\"(\w+)\"`\)")[0]
    assert str(fields["nonnegative_output"]) == _quoted("refiner.md", r"`nonnegative_output` \(default `(\w+)`\)")[0]
    mlp = _quoted("refiner.md", r"\(\d+ in the config, (\d+) in training")[0]
    assert fields["spectral_mlp_hidden_size"] == int(mlp)
    assert fields["spectral_correction_init"] == "spectral_fit"
    assert OUT_OF_RANGE_QUANTILE == pytest.approx(int(_quoted("refiner.md", r"the (\d+)th percentile")[0]) / 100)
