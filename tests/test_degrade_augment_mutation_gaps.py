"""Tests closing gaps a mutation audit of data_builders/degrade.py and data_builders/augment.py (with the brightness
augmentation of training/data.py) found: behaviour each mutation changed while every other test still passed. Each
names, in its docstring or name, the behaviour it pins."""
from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np
import pytest
import torch
from test_data_degrade import NO_DEGRADATION, _target

from data_builders import make_eval_transform, make_train_transform
from data_builders.augment import TileTransform, dihedral
from data_builders.degrade import (
    DegradationConfig,
    DegradationRedraw,
    config_for_tile,
    mixture_choice,
    resolve_degradation,
    synthesize_opt_v1,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the config's checks and messages
@pytest.mark.parametrize("bad, message", [
    ({"noise_std": True}, "noise_std must be a finite number, got True"),
    ({"noise_std": float("nan")}, "noise_std must be a finite number, got nan"),
    ({"blur_sigma": "01"}, "blur_sigma must be a list of finite numbers, got '01'"),
    ({"low_freq_grid": 4.0}, "low_freq_grid must be an integer, got 4.0"),
    ({"offset_mean": (0.0, 0.0)}, "gain_mean and offset_mean need one value per band (B02, B03, B04, B08)"),
    ({"max_shift": -0.5}, "max_shift must be >= 0, got -0.5"),
    ({"gain_std": -0.5}, "gain_std must be >= 0, got -0.5"),
    ({"offset_std": -0.5}, "offset_std must be >= 0, got -0.5"),
    ({"low_freq_std": -0.5}, "low_freq_std must be >= 0, got -0.5"),
    ({"noise_std": -0.5}, "noise_std must be >= 0, got -0.5"),
    ({"noise_floor": -0.5}, "noise_floor must be >= 0, got -0.5"),
    ({"max_shift": 121}, "max_shift must be at most 120 (pixels: the tile size), got 121"),
    ({"clip": (0.5, 0.5)}, "clip must be (low, high) with low < high, got (0.5, 0.5)"),
    ({"clip": (0, 1, 2)}, "clip must be (low, high) with low < high, got (0.0, 1.0, 2.0)"),
    ({"haze": (0, 0.01, 0.02)}, "haze must be (low, high) with 0 <= low <= high, got (0.0, 0.01, 0.02)"),
    ({"haze_exponent": -0.5}, "haze_exponent must be >= 0, got -0.5"),
    ({"tone_gamma": (0.8, 1.0, 1.25)}, "tone_gamma must be (low, high) with 0 < low <= high, got (0.8, 1.0, 1.25)"),
])
def test_a_bad_degradation_config_is_refused_naming_the_field(bad, message):
    """A JSON `--degradation_config` may hold anything: each bad field is one message naming it (a bool, a NaN, a
    string of digits, a float grid, a negative spread, a third value of a range were accepted by some mutation, and
    failed mid-build or degraded silently)."""
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        DegradationConfig(**bad)


def test_a_range_of_one_value_is_accepted_where_documented():
    """`blur_sigma` (0, 0), `haze` (0, 0), `tone_gamma` (1, 1) are "off"; `haze_exponent` 0 is a flat haze."""
    config = DegradationConfig(blur_sigma=(0, 0), haze=(0.01, 0.01), haze_exponent=0, tone_gamma=(1.1, 1.1))
    assert config.blur_sigma == (0.0, 0.0) and config.has_haze and config.has_tone_curve


def test_resolve_and_config_for_tile_say_what_they_need():
    with pytest.raises(TypeError, match=r"^degradation must be a preset name, a dict or a DegradationConfig, got int$"):
        resolve_degradation(3)
    with pytest.raises(ValueError, match=r"^degradation 'custom' needs a DegradationConfig$"):
        config_for_tile("custom", None, 0, "t")


@pytest.mark.parametrize("shape", [(3, 8, 8), (5, 8, 8), (8, 8)])
def test_a_target_that_is_not_four_bands_is_refused_naming_its_shape(shape):
    with pytest.raises(ValueError, match=re.escape(f"target must be (4, H, W), got {shape}")):
        synthesize_opt_v1(np.zeros(shape, np.float32), "t")


# ----------------------------------------------------------------------------- the documented ranges
def test_gains_and_offsets_are_clipped_at_three_sigma():
    """docs: gain `gain_mean + gain_std * N(0, 1)` and offset likewise, "both clipped at 3 sigma". Pixel 0 of a
    [0, 1] target reads the offset, pixel 1 gain + offset; over 1500 tiles some draws pass 3 sigma (p ~ 1 %)."""
    config = dataclasses.replace(NO_DEGRADATION, gain_std=0.1, offset_std=0.01, clip=(-10, 10))
    target = np.tile(np.array([0.0, 1.0], np.float32), (4, 1, 1))
    out = np.stack([synthesize_opt_v1(target, f"t{i}", config=config)[:, 0] for i in range(1500)]).astype(np.float64)
    offsets, gains = out[..., 0], out[..., 1] - out[..., 0]
    assert np.abs(offsets).max() == pytest.approx(0.03, abs=1e-6)  # reached, never passed
    assert np.abs(gains - 1).max() == pytest.approx(0.3, abs=1e-6)
    assert (np.isclose(np.abs(gains - 1), 0.3, atol=1e-6)).sum() >= 3  # clipped draws, not one extreme one


@pytest.mark.parametrize("tone_gamma", [(1.0, 1.5), (0.7, 1.0)])
def test_a_tone_curve_range_with_one_end_at_one_is_on(tone_gamma):
    """Only `(1, 1)` is off: a range from 1 (or to 1) still draws a gamma per tile, log-uniform within it."""
    config = dataclasses.replace(NO_DEGRADATION, tone_gamma=tone_gamma)
    assert config.has_tone_curve
    constant = np.full((4, 2, 2), 0.3, np.float32)
    gammas = np.array([np.log(synthesize_opt_v1(constant, f"t{i}", config=config)[0, 0, 0]) / np.log(0.3)
                       for i in range(100)])
    assert gammas.min() >= tone_gamma[0] - 1e-5 and gammas.max() <= tone_gamma[1] + 1e-5
    assert np.ptp(gammas) > 0.2 * (tone_gamma[1] - tone_gamma[0])


def test_a_mixture_by_name_picks_each_tile_s_preset_with_the_seed_given():
    """`synthesize_opt_v1(target, tile_id, seed, "mixture")` is the preset `mixture_choice(seed, tile_id)` picks, for
    every seed (at seed 0 a choice made with seed 0 whatever the seed given went unnoticed)."""
    target = _target(4)[:, :16, :16]
    tiles = [f"t{i}" for i in range(12)]
    for seed in (1, 2):
        choices = [mixture_choice(seed, tile_id) for tile_id in tiles]
        assert choices != [mixture_choice(0, tile_id) for tile_id in tiles]
        for tile_id, choice in zip(tiles, choices):
            assert synthesize_opt_v1(target, tile_id, seed, "mixture").tobytes() == \
                synthesize_opt_v1(target, tile_id, seed, choice).tobytes()


# ----------------------------------------------------------------------------- drawing a dataset's opt_v1 again
def test_a_redraw_uses_the_seed_of_the_build_record():
    """A dataset built with `--dataset_seed 5` redraws from seed 5: draw 0 is its own opt_v1 bit for bit (the
    bundled sample is built with seed 0, where a redraw that ignored the record's seed still matched)."""
    record = {"mode": "synthetic", "preset": "mild", "seed": 5, "degradation": DegradationConfig().to_dict(),
              "degradation_version": 1}  # what a version-1 build wrote: the recorded datasets redraw as they are
    redraw = DegradationRedraw.from_record(record)
    target = _target(3)
    assert redraw(target, "tile", None, 0).tobytes() == synthesize_opt_v1(target, "tile", 5).tobytes()
    assert redraw(target, "tile", None, 0).tobytes() != synthesize_opt_v1(target, "tile", 0).tobytes()


# ----------------------------------------------------------------------------- augment: columns and conversion
def test_only_the_named_spatial_columns_are_flipped():
    """`TileTransform(augment=True, spatial_columns=...)` moves those columns only; the others are converted."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(16, 1, 1, 1)
    torch.manual_seed(0)
    out = TileTransform(True, spatial_columns=("target",))({"target": x, "opt_v1": x.clone()})
    assert torch.equal(out["opt_v1"], x)
    assert not torch.equal(out["target"], x)


def test_metadata_columns_keep_their_types_and_values():
    """Scalars per row become tensors of their kind (bool, int64, float32); strings stay lists, untouched."""
    torch.manual_seed(0)
    batch = {"target": torch.zeros(2, 1, 2, 2), "flag": [True, False], "month": [1, 12], "scale": [0.5, 2.0],
             "tile_id": np.array(["a", "b"]), "name": ["a", "b"]}
    for transform in (make_train_transform(), make_eval_transform()):
        out = transform(dict(batch))
        assert out["flag"].dtype == torch.bool and out["flag"].tolist() == [True, False]
        assert out["month"].dtype == torch.int64 and out["month"].tolist() == [1, 12]
        assert out["scale"].dtype == torch.float32 and out["scale"].tolist() == [0.5, 2.0]
        assert out["tile_id"] == ["a", "b"] and out["name"] == ["a", "b"]


def test_nested_lists_of_s1_become_a_float32_tensor_moved_with_the_others():
    """`set_transform` hands nested Python lists: s1 (float64 values in Python) is float32, flipped like target."""
    image = np.arange(8.0).reshape(2, 2, 2)
    batch = {"target": [image.tolist()] * 8, "s1": [(image * 2).tolist()] * 8}
    plain = make_eval_transform()(batch)
    assert plain["s1"].dtype == torch.float32 and plain["target"].dtype == torch.float32
    torch.manual_seed(1)
    out = make_train_transform()(batch)
    assert out["s1"].dtype == torch.float32
    for i in range(8):
        op = next(op for op in range(8) if torch.equal(dihedral(plain["target"][i], op), out["target"][i]))
        assert torch.equal(dihedral(plain["s1"][i], op), out["s1"][i])


def test_a_read_only_array_is_copied_not_shared():
    """Arrow hands read-only numpy arrays: the tensor is a copy (sharing them warns and lets a write through)."""
    frozen = np.ones((2, 3), np.float32)
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = make_eval_transform()({"month": frozen})["month"]
    out += 1
    assert (frozen == 1).all()


def test_collating_no_rows_is_an_error():
    with pytest.raises(ValueError, match="^cannot collate an empty list of rows$"):
        make_train_transform().collate([])


# ----------------------------------------------------------------------------- TileDataset: seeds and brightness
def _rows_table(count=8, size=4):
    import datasets

    rng = np.random.default_rng(0)
    target = rng.uniform(0.1, 0.4, (count, 4, size, size)).astype(np.float32)
    mask = rng.uniform(size=(count, size, size)) > 0.3
    return datasets.Dataset.from_dict({"target": target, "opt_v1": target * 2, "valid_mask": mask,
                                       "month": list(range(1, count + 1)), "biome": [3] * count})


def test_brightness_scales_target_and_opt_v1_only():
    """The exposure factor multiplies target and opt_v1; valid_mask, month and biome are left as they are."""
    from training.data import TileDataset

    table = _rows_table()
    plain = TileDataset(table, make_eval_transform()).__getitems__(range(8))
    bright = TileDataset(table, make_eval_transform(), brightness_range=(0.5, 2.0)).__getitems__(range(8))
    for before, after in zip(plain, bright):
        assert after["valid_mask"].dtype == torch.bool and torch.equal(after["valid_mask"], before["valid_mask"])
        assert torch.equal(after["month"], before["month"]) and torch.equal(after["biome"], before["biome"])
        factor = after["target"] / before["target"]
        torch.testing.assert_close(factor, torch.full_like(factor, float(factor.flatten()[0])))
        torch.testing.assert_close(after["opt_v1"], before["opt_v1"] * factor)


def test_a_brightness_range_of_one_value_is_that_factor():
    """`--brightness_augment 1.5 1.5` is allowed (LOW <= HIGH) and scales every row by 1.5."""
    from training.data import TileDataset

    table = _rows_table(count=2)
    rows = TileDataset(table, make_eval_transform(), brightness_range=(1.5, 1.5)).__getitems__([0, 1])
    plain = TileDataset(table, make_eval_transform()).__getitems__([0, 1])
    for row, before in zip(rows, plain):
        torch.testing.assert_close(row["target"], before["target"] * 1.5)


def test_row_augmentation_depends_on_the_seed_and_leaves_the_global_rng_alone():
    """Each row's flip and brightness come from its own RNG seeded by (seed, epoch, row): another seed draws
    others, and reading rows does not move torch's global RNG (which seeds the model's own random numbers)."""
    from training.data import TileDataset

    table = _rows_table(count=16)
    datasets_by_seed = [TileDataset(table, make_train_transform(), seed=seed, brightness_range=(0.5, 2.0))
                        for seed in (0, 1)]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, second = (dataset.__getitems__(range(16)) for dataset in datasets_by_seed)
    assert torch.equal(torch.rand(3), expected)
    assert any(not torch.equal(a["target"], b["target"]) for a, b in zip(first, second))
    again = datasets_by_seed[0].__getitems__(range(16))
    assert all(torch.equal(a["target"], b["target"]) for a, b in zip(first, again))
