"""The Stage 2 refiner model: config, shapes, padding, metadata, identity at init, saving, Auto classes, OOM fallback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from _hub_helpers import hub_server  # noqa: F401  (fixture)
from _refiner_helpers import single_thread  # noqa: F401  (fixture)
from _refiner_helpers import tiny_backbone_config, tiny_inputs, tiny_refiner_config, wake_up
from modeling_stage2 import (
    BAND_NAMES,
    UNKNOWN_METADATA,
    PrithviConfig,
    PrithviEncoder,
    Stage2RefinerConfig,
    Stage2RefinerModel,
    Stage2RefinerOutput,
)
from modeling_stage2.bands import DN_LOOKING_MEDIAN, DigitalNumbersWarning
from modeling_stage2.modeling_stage2 import Stage2DropPath, cyclic_month_encoding, looks_like_digital_numbers

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def model() -> Stage2RefinerModel:
    return Stage2RefinerModel(tiny_refiner_config()).eval()


@pytest.fixture
def awake_model(model) -> Stage2RefinerModel:
    """A refiner whose output depends on everything (non-zero head output and metadata fusion)."""
    wake_up(model)
    return model


def assert_same_output(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Identical weights give outputs equal to the last float bit, except that weights read from a memory-mapped
    safetensors file sit at other alignments, which can change the CPU kernels' summation order (1 ulp)."""
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def refine(model, opt_v1, month, biome, **kwargs):
    with torch.no_grad():
        return model(opt_v1, month, biome, **kwargs)


# ------------------------------------------------------------------------------------------------------ config


def test_config_defaults_describe_the_600m_backbone_without_building_it():
    config = Stage2RefinerConfig()
    assert config.model_type == "stage2_refiner"
    assert tuple(config.bands) == BAND_NAMES == ("B02", "B03", "B04", "B08")
    assert UNKNOWN_METADATA == -1
    backbone = config.backbone_config
    assert isinstance(backbone, PrithviConfig)
    assert (backbone.embed_dim, backbone.depth, backbone.num_heads) == (1280, 32, 16)
    assert list(backbone.patch_size) == [1, 14, 14]
    assert list(backbone.bands) == list(BAND_NAMES)
    assert config.backbone_weights is None
    assert (config.num_months, config.num_biomes, config.num_convnext_blocks) == (12, 17, 4)
    assert config.feature_layers == [7, 15, 23, 31]
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.1)
    assert config.lora_target_modules == ["qkv", "proj", "fc1", "fc2"]
    assert config.unfreeze_last_n_blocks is None and config.lora_blocks == list(range(32))
    assert config.head_widths == [256, 128, 64, 32]


def test_config_round_trip_and_backbone_given_three_ways(tmp_path):
    config = tiny_refiner_config(feature_layers=[0, -1], unfreeze_last_n_blocks=1, return_dict=False)
    config.save_pretrained(tmp_path)
    loaded = Stage2RefinerConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.backbone_config, PrithviConfig) and loaded.backbone_config.depth == 2
    assert loaded.feature_layers == [0, 1] and loaded.lora_blocks == [1] and loaded.return_dict is False

    by_preset = Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny")
    by_dict = Stage2RefinerConfig(backbone_config={"embed_dim": 64, "depth": 4, "num_heads": 4, "num_frames": 1})
    for config in (by_preset, by_dict):
        assert list(config.backbone_config.bands) == list(BAND_NAMES)  # the refiner's bands are passed down
        assert config.backbone_config.band_mean == [1087.0, 1342.0, 1433.0, 2734.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"feature_layers": [0, 2]}, "block 2 does not exist"),
        ({"feature_layers": [1, -1]}, "more than once"),
        ({"lora_target_modules": ["qkv", "patch_embed.proj"]}, r"^lora_target_modules must be a non-empty subset of"),
        ({"unfreeze_last_n_blocks": 3}, "exceeds the backbone depth"),
        ({"padding_mode": "zeros"}, "padding_mode"),
        ({"num_biomes": 0}, "num_biomes must be a positive integer"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"bands": ["B02", "B03", "B04", "B99"]}, "Unknown band name 'B99'"),
        ({"backbone_config": {"model_type": "vit"}}, "model_type 'vit'"),
        ({"initializer_range": -0.02}, r"initializer_range must be >= 0"),
        ({"initializer_range": float("nan")}, "initializer_range must be a finite number, got nan"),
        ({"near_black_ramp": float("inf")}, "near_black_ramp must be a finite number, got inf"),
        ({"layer_scale_init_value": float("nan")}, "layer_scale_init_value must be a finite number"),
        ({"spectral_mlp_log_offset": float("inf")}, "spectral_mlp_log_offset must be a finite number"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_refiner_config(**kwargs)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"head_width": -1}, "head_width must be a positive integer, got -1"),
    ({"spectral_correction": "Affine"}, "spectral_correction must be one of"),
    ({"nonnegative_output": "yes"}, "nonnegative_output must be True or False"),
    ({"initializer_range": float("nan")}, "initializer_range must be a finite number"),
])
def test_overrides_of_from_pretrained_are_checked_like_the_constructor_arguments(tmp_path, overrides, message):
    """transformers sets `from_pretrained(path, **overrides)` with setattr after `__init__`: here they go through it,
    for the config and for the model that loads it."""
    tiny_refiner_config(spectral_correction="affine").save_pretrained(tmp_path / "config")
    with pytest.raises(ValueError, match=message):
        Stage2RefinerConfig.from_pretrained(tmp_path / "config", **overrides)
    Stage2RefinerModel(tiny_refiner_config(spectral_correction="affine")).save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=message):
        Stage2RefinerModel.from_pretrained(tmp_path / "model", **overrides)
    good, unused = Stage2RefinerConfig.from_pretrained(tmp_path / "config", head_width=24, not_an_argument=1,
                                                       return_unused_kwargs=True)
    assert good.head_width == 24 and good.spectral_correction == "affine" and unused == {"not_an_argument": 1}
    tiny_backbone_config().save_pretrained(tmp_path / "backbone")
    with pytest.raises(ValueError, match="must be a multiple of num_heads"):
        PrithviConfig.from_pretrained(tmp_path / "backbone", num_heads=7)


def test_config_rejects_a_backbone_with_other_bands():
    with pytest.raises(ValueError, match="do not match the refiner's bands"):
        Stage2RefinerConfig(backbone_config=tiny_backbone_config(bands=("B04", "B03", "B02", "B08")))


# ------------------------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("size", [(120, 120), (30, 45), (5, 9)])
def test_output_shape_and_dtype_follow_the_input(awake_model, size):
    opt_v1, month, biome = tiny_inputs(batch=2 if size[0] < 100 else 1, size=size)
    output = refine(awake_model, opt_v1, month, biome)
    assert isinstance(output, Stage2RefinerOutput)
    assert output.refined.shape == (opt_v1.shape[0], 4, *size) and output.refined.dtype == torch.float32
    assert output.hidden_states is None
    assert torch.isfinite(output.refined).all()
    assert not torch.equal(output.refined, opt_v1)  # the awake head does change the image

    double = refine(awake_model, opt_v1.double(), month, biome).refined
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), output.refined, atol=1e-6, rtol=0)


def test_hidden_states_and_tuple_output(awake_model):
    opt_v1, month, biome = tiny_inputs(batch=1)
    output = refine(awake_model, opt_v1, month, biome, output_hidden_states=True)
    assert len(output.hidden_states) == 2
    for hidden in output.hidden_states:
        assert hidden.shape == (1, 1 + 9 * 9, 64)  # 120 px padded to 126 = 9 patches of 14, CLS first
    as_tuple = refine(awake_model, opt_v1, month, biome, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert torch.equal(as_tuple[0], output.refined)
    assert torch.equal(as_tuple[1][-1], output.hidden_states[-1])
    assert len(refine(awake_model, opt_v1, month, biome, return_dict=False)) == 1


# ------------------------------------------------------------------------------------------------- behaviour


def test_untrained_model_returns_opt_v1_exactly():
    model = Stage2RefinerModel(tiny_refiner_config(drop_path_rate=0.2))
    opt_v1, month, biome = tiny_inputs(batch=2, size=(60, 50))
    for mode in (model.eval, model.train):
        mode()
        assert torch.equal(model(opt_v1, month, biome).refined, opt_v1)
    # The rest of the network is initialised normally, not zeroed: only the last layer is.
    assert model.head.blocks[0].pwconv1.weight.std() > 0.01
    assert torch.equal(model.head.output_projection.weight, torch.zeros_like(model.head.output_projection.weight))


def test_normalisation_uses_the_prithvi_band_statistics(model):
    reflectance = torch.tensor([0.1087, 0.1342, 0.1433, 0.2734]).view(1, 4, 1, 1).expand(1, 4, 3, 3)
    torch.testing.assert_close(model.normalizer(reflectance), torch.zeros(1, 4, 3, 3), atol=1e-5, rtol=0)
    one_std = reflectance + torch.tensor([0.2248, 0.2179, 0.2178, 0.1850]).view(1, 4, 1, 1)
    torch.testing.assert_close(model.normalizer(one_std), torch.ones(1, 4, 3, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("corner", [(0, 0), (0, 119), (119, 0), (119, 119)])
def test_padding_lets_the_backbone_see_every_corner_pixel(awake_model, corner):
    opt_v1, month, biome = tiny_inputs(batch=1)
    changed = opt_v1.clone()
    changed[0, :, corner[0], corner[1]] += 0.3
    before = refine(awake_model, opt_v1, month, biome, output_hidden_states=True)
    after = refine(awake_model, changed, month, biome, output_hidden_states=True)
    assert not torch.equal(before.hidden_states[-1], after.hidden_states[-1])
    assert not torch.equal(before.refined[0, :, corner[0], corner[1]], after.refined[0, :, corner[0], corner[1]])


def test_the_output_is_that_of_the_padded_tile_cropped_back(awake_model):
    """30 x 45 pads to 42 x 56 (6 + 6 rows, 5 + 6 columns, reflected): the delta is cropped from where the tile sits
    in the padded grid, so refining the tile equals refining its padded copy (no padding needed) and cropping."""
    opt_v1, month, biome = tiny_inputs(batch=2, size=(30, 45))
    padded = torch.nn.functional.pad(opt_v1, (5, 6, 6, 6), mode="reflect")
    expected = refine(awake_model, padded, month, biome).refined[:, :, 6:36, 5:50]
    actual = refine(awake_model, opt_v1, month, biome).refined
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
    assert float((actual - opt_v1).abs().max()) > 1e-2  # the head's delta is what is compared


def test_without_padding_the_encoder_drops_the_last_pixels(awake_model):
    """The reason for the padding: the official encoder crops 120 px to 112 (8 patches of 14)."""
    opt_v1, month, biome = tiny_inputs(batch=1)
    changed = opt_v1.clone()
    changed[0, :, 119, 119] += 0.3
    with torch.no_grad():
        before = awake_model.backbone(awake_model.normalizer(opt_v1)).last_hidden_state
        after = awake_model.backbone(awake_model.normalizer(changed)).last_hidden_state
    assert torch.equal(before, after)


def test_drop_path_drops_whole_samples_and_rescales_the_kept_ones():
    drop = Stage2DropPath(0.25).train()
    torch.manual_seed(0)
    x = torch.rand(400, 3, 2, 2) + 0.5
    y = drop(x)
    kept, dropped = (y != 0).flatten(1).all(dim=1), (y == 0).flatten(1).all(dim=1)
    assert bool((kept ^ dropped).all())  # a whole sample's branch, never part of it
    torch.testing.assert_close(y[kept], x[kept] / 0.75, atol=0, rtol=1e-6)  # expectation unchanged
    assert 0.68 < float(kept.float().mean()) < 0.82  # keep probability 0.75 (binomial std 0.022)
    assert torch.equal(drop.eval()(x), x)


def test_padding_modes_differ_and_tiny_inputs_fall_back_to_replicate():
    reflect = Stage2RefinerModel(tiny_refiner_config(padding_mode="reflect")).eval()
    replicate = Stage2RefinerModel(tiny_refiner_config(padding_mode="replicate")).eval()
    replicate.load_state_dict(reflect.state_dict())
    wake_up(reflect), wake_up(replicate)
    opt_v1, month, biome = tiny_inputs(batch=1, size=(30, 30))
    out_reflect = refine(reflect, opt_v1, month, biome).refined
    out_replicate = refine(replicate, opt_v1, month, biome).refined
    assert not torch.equal(out_reflect, out_replicate)

    hidden = torch.arange(9.0).view(1, 1, 3, 3)
    padded, padding = reflect._pad_to_patch_multiple(hidden)  # 3 -> 14 cannot be mirrored
    assert padding == (5, 6, 5, 6) and padded.shape == (1, 1, 14, 14)
    assert padded[0, 0, 0, 0] == 0 and padded[0, 0, -1, -1] == 8  # edge values repeated
    padded, padding = reflect._pad_to_patch_multiple(torch.arange(120.0).view(1, 1, 1, 120).expand(1, 1, 120, 120))
    assert padding == (3, 3, 3, 3)
    assert padded[0, 0, 0, :4].tolist() == [3.0, 2.0, 1.0, 0.0]  # mirrored without repeating the edge


def test_month_encoding_is_cyclic():
    points = cyclic_month_encoding(torch.arange(1, 13))
    step = (points[1] - points[0]).norm()
    assert torch.allclose((points[0] - points[11]).norm(), step, atol=1e-6)  # December -> January
    assert (points[0] - points[6]).norm() > 1.9  # July is opposite January
    assert torch.equal(cyclic_month_encoding(torch.tensor([UNKNOWN_METADATA])), torch.zeros(1, 2))


def test_metadata_conditions_the_output(awake_model):
    opt_v1, _, _ = tiny_inputs(batch=1, size=(28, 28))
    outputs = {}
    for month, biome in [(1, 3), (12, 3), (1, 4), (UNKNOWN_METADATA, 3), (1, UNKNOWN_METADATA)]:
        outputs[(month, biome)] = refine(awake_model, opt_v1, torch.tensor([month]), torch.tensor([biome])).refined
    reference = outputs[(1, 3)]
    for key, output in outputs.items():
        if key != (1, 3):
            assert not torch.equal(output, reference), key


def test_unknown_metadata_takes_its_own_learned_slot(awake_model):
    """Unknown month: the circle's centre and month slot 0 (months are 1..12); unknown biome: slot num_biomes (biomes
    are 0..16), not the slot of a real month or biome."""
    embedding = awake_model.metadata_embedding
    width = embedding.month_embedding.embedding_dim
    months, biomes = embedding.month_embedding.weight, embedding.biome_embedding.weight
    with torch.no_grad():
        features = embedding.features(torch.tensor([UNKNOWN_METADATA, 1, 12]), torch.tensor([UNKNOWN_METADATA, 0, 16]))
    assert torch.equal(features[0, :2], torch.zeros(2))
    for row, month, biome in ((0, 0, 17), (1, 1, 0), (2, 12, 16)):
        assert torch.equal(features[row, 2 : 2 + width], months[month]), row
        assert torch.equal(features[row, 2 + width :], biomes[biome]), row


@pytest.mark.parametrize(
    ("month", "biome", "error", "message"),
    [
        ([0, 1], [0, 0], ValueError, r"month must be in 1\.\.12, or -1 \(UNKNOWN_METADATA\).*got \[0\] at batch positions \[0"),
        ([1, 13], [0, 0], ValueError, r"month must be in 1\.\.12.*got \[13\] at batch positions \[1\]"),
        ([-2, 1], [0, 0], ValueError, r"month must be in 1\.\.12.*got \[-2\]"),
        ([1, 2], [17, 0], ValueError, r"biome must be in 0\.\.16, or -1 \(UNKNOWN_METADATA\).*got \[17\]"),
        ([1, 2], [0, -5], ValueError, r"biome must be in 0\.\.16.*got \[-5\]"),
        ([1.0, 2.0], [0, 0], TypeError, "month must be an integer tensor"),
        ([1], [0, 0], ValueError, r"month must have shape \(2,\) \(one value per tile\) or be one integer for every "
                                  r"tile, got \(1,\)"),
        ([[1], [2]], [0, 0], ValueError, r"month must have shape \(2,\).*got \(2, 1\)"),
        (13, [0, 0], ValueError, r"month must be in 1\.\.12.*got \[13, 13\] at batch positions \[0, 1\]"),
        ([1, 2], 2.0, TypeError, "biome must be an integer tensor"),
    ],
)
def test_bad_month_or_biome_gives_a_clear_error(model, month, biome, error, message):
    opt_v1, _, _ = tiny_inputs(batch=2, size=(20, 20))
    with pytest.raises(error, match=message):
        model(opt_v1, torch.tensor(month), torch.tensor(biome))


def test_metadata_lists_that_are_not_integers_give_a_clear_error(model):
    """None marks every tile unknown; in a list ([7, None]) torch raised "Could not infer dtype of NoneType"."""
    opt_v1, _, _ = tiny_inputs(batch=2, size=(20, 20))
    with pytest.raises(TypeError, match=r"month must be integers.*unknown with -1 \(UNKNOWN_METADATA\), not None"):
        model(opt_v1, [7, None], [0, 0])
    with pytest.raises(TypeError, match=r"biome must be integers"):
        model(opt_v1, [7, 8], ["forest", 0])


def test_metadata_may_be_one_integer_for_every_tile_or_left_out(awake_model):
    """One month / biome for a batch (tiles of one scene), or none at all (unknown, as Prithvi's own coordinates
    are optional): the same output as the per-tile tensors they stand for."""
    opt_v1, _, _ = tiny_inputs(batch=2, size=(28, 28))
    per_tile = refine(awake_model, opt_v1, torch.tensor([7, 7]), torch.tensor([4, 4])).refined
    with torch.no_grad():
        assert torch.equal(awake_model(opt_v1, 7, 4).refined, per_tile)
        assert torch.equal(awake_model(opt_v1, torch.tensor(7), torch.tensor(4)).refined, per_tile)
        unknown = refine(awake_model, opt_v1, torch.tensor([UNKNOWN_METADATA] * 2),
                         torch.tensor([UNKNOWN_METADATA] * 2)).refined
        assert torch.equal(awake_model(opt_v1).refined, unknown)
        assert torch.equal(awake_model(opt_v1, month=7).refined,
                           refine(awake_model, opt_v1, torch.tensor([7, 7]), torch.tensor([-1, -1])).refined)
    assert not torch.equal(unknown, per_tile)  # the metadata is used: leaving it out is not the same as giving it


def test_bad_opt_v1_gives_a_clear_error(model):
    month, biome = torch.tensor([1]), torch.tensor([0])
    with pytest.raises(ValueError, match=r"opt_v1 must be a \(batch, 4, height, width\) tensor"):
        model(torch.rand(1, 3, 20, 20), month, biome)
    with pytest.raises(TypeError, match="float reflectance"):
        model(torch.ones(1, 4, 20, 20, dtype=torch.long), month, biome)
    bad = torch.rand(1, 4, 20, 20)
    bad[0, 1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(bad, month, biome)
    for empty in (torch.rand(0, 4, 20, 20), torch.rand(1, 4, 0, 20)):  # every runtime failed its own way on these
        with pytest.raises(ValueError, match=r"opt_v1 is empty, shape \("):
            model(empty, month[:len(empty)], biome[:len(empty)])


def _digital_numbers_warnings(model, opt_v1) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(opt_v1, torch.tensor([1] * len(opt_v1)), torch.tensor([0] * len(opt_v1)))
    return [w for w in caught if issubclass(w.category, DigitalNumbersWarning)]


def test_digital_numbers_passed_as_reflectance_give_one_warning(model):
    reflectance = torch.rand(2, 4, 20, 20) * 0.4
    assert _digital_numbers_warnings(model, reflectance) == []
    # Bright clouds and snow reach reflectance 1-2 on every band: still reflectance.
    assert _digital_numbers_warnings(model, reflectance + 1.5) == []
    caught = _digital_numbers_warnings(model, reflectance * 10000)
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "opt_v1 looks like digital numbers (median above 2), not reflectance 0..1; divide digital numbers by 10000 "
        "before refining."
    )


def test_the_digital_numbers_check_is_the_median_of_an_even_sample():
    values = torch.full((1, 4, 300, 300), 0.3)
    values.view(-1)[: values.numel() // 2 - 100] = 3000.0  # just under half the values look like DN
    assert not looks_like_digital_numbers(values)
    values.view(-1)[: values.numel() // 2 + 100] = 3000.0  # just over half
    assert looks_like_digital_numbers(values)
    assert looks_like_digital_numbers(torch.full((1, 4, 2, 2), DN_LOOKING_MEDIAN + 0.01))
    assert not looks_like_digital_numbers(torch.full((1, 4, 2, 2), DN_LOOKING_MEDIAN))


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_refiner_config()
    plain = Stage2RefinerModel(config).train()
    wake_up(plain)
    checkpointed = Stage2RefinerModel(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(block.gradient_checkpointing for block in checkpointed.backbone.blocks)
    opt_v1, month, biome = tiny_inputs(batch=1, size=(40, 40))
    for model in (plain, checkpointed):
        model(opt_v1, month, biome).refined.square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


# -------------------------------------------------------------------------------------------- saving, loading


def test_save_pretrained_round_trip_is_exact(awake_model, tmp_path):
    awake_model.save_pretrained(tmp_path)
    loaded = Stage2RefinerModel.from_pretrained(tmp_path).eval()
    saved, reloaded = awake_model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[key], reloaded[key]) for key in saved)
    opt_v1, month, biome = tiny_inputs(batch=2, size=(30, 30))
    assert_same_output(refine(loaded, opt_v1, month, biome).refined, refine(awake_model, opt_v1, month, biome).refined)
    # Derived (unsaved) buffers are rebuilt from the config.
    assert "normalizer.mean" not in load_file(tmp_path / "model.safetensors")
    assert loaded.normalizer.std.flatten().tolist() == [2248.0, 2179.0, 2178.0, 1850.0]


def test_auto_classes_load_the_installed_package(awake_model, tmp_path):
    from transformers import AutoConfig, AutoModel

    awake_model.save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["auto_map"] == {
        "AutoConfig": "configuration_stage2.Stage2RefinerConfig",
        "AutoModel": "modeling_stage2.Stage2RefinerModel",
    }
    assert type(AutoConfig.from_pretrained(tmp_path)) is Stage2RefinerConfig
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is Stage2RefinerModel
    opt_v1, month, biome = tiny_inputs(batch=1, size=(30, 30))
    assert_same_output(refine(loaded, opt_v1, month, biome).refined, refine(awake_model, opt_v1, month, biome).refined)


_REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class RefuseProjectPackages(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_stage2", "training", "data_builders", "model_cards"):
                raise ImportError(f"{name} must come from the model folder, not the installed project")

    sys.meta_path.insert(0, RefuseProjectPackages())
    sys.path = [entry for entry in sys.path if entry not in ("", sys.argv[3])]

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert type(model.backbone).__module__.startswith("transformers_modules."), type(model.backbone).__module__
    inputs = load_file(sys.argv[2])
    with torch.no_grad():
        refined = model(inputs["opt_v1"], inputs["month"], inputs["biome"]).refined
    save_file({"refined": refined}, sys.argv[2] + ".out")
    """
)


def test_trust_remote_code_loads_from_the_folder_alone(awake_model, tmp_path, repo_root):
    folder = tmp_path / "refiner_remote"
    awake_model.save_pretrained(folder)
    modules = ("modeling_stage2", "configuration_stage2", "configuration_prithvi", "modeling_prithvi", "convert_prithvi")
    for module in modules:
        assert (folder / f"{module}.py").is_file(), module
    opt_v1, month, biome = tiny_inputs(batch=2, size=(30, 30))
    inputs = tmp_path / "inputs.safetensors"
    save_file({"opt_v1": opt_v1, "month": month, "biome": biome}, inputs)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_CODE_SCRIPT, str(folder), str(inputs), str(repo_root)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = load_file(str(inputs) + ".out")["refined"]
    assert_same_output(remote, refine(awake_model, opt_v1, month, biome).refined)


# ---------------------------------------------------------------------------------------- pretrained backbone


def test_backbone_weights_from_a_converted_folder(tmp_path):
    encoder = PrithviEncoder(tiny_backbone_config())
    encoder.save_pretrained(tmp_path / "converted")
    model = Stage2RefinerModel(tiny_refiner_config(backbone_weights=str(tmp_path / "converted")))
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)
    model.load_backbone_weights()
    expected = encoder.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.backbone.state_dict().items())


def test_a_relative_backbone_weights_path_is_saved_absolute(tmp_path, monkeypatch):
    """A saved config must name the weights wherever it is loaded next; a Hub id stays as given."""
    encoder = PrithviEncoder(tiny_backbone_config())
    encoder.save_pretrained(tmp_path / "work" / "converted")
    monkeypatch.chdir(tmp_path / "work")
    config = tiny_refiner_config(backbone_weights="converted")
    assert config.backbone_weights == str((tmp_path / "work" / "converted").resolve())
    config.save_pretrained(tmp_path / "saved")
    monkeypatch.chdir(tmp_path)  # elsewhere: "converted" names nothing here
    model = Stage2RefinerModel(Stage2RefinerConfig.from_pretrained(tmp_path / "saved"))
    model.load_backbone_weights()
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)
    assert tiny_refiner_config(backbone_weights="ibm-nasa-geospatial/Prithvi-EO-2.0-600M").backbone_weights == (
        "ibm-nasa-geospatial/Prithvi-EO-2.0-600M")


def test_backbone_weights_from_the_official_checkpoint(prithvi_fixtures_dir):
    """The official tiny checkpoint (6 bands, depth 2) gives the 4-band weights sliced by band name."""
    config = tiny_refiner_config(backbone_weights=str(prithvi_fixtures_dir / "tiny_checkpoint.pt"))
    model = Stage2RefinerModel(config)
    model.load_backbone_weights()
    reference = load_file(prithvi_fixtures_dir / "tiny_reference.safetensors")
    prefix = "encoder4_state_dict."
    expected = {key[len(prefix):]: value for key, value in reference.items() if key.startswith(prefix)}
    state = model.backbone.state_dict()
    assert expected and set(expected) <= set(state)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0, msg=key)


def test_backbone_weights_from_a_hub_repo_id(hub_server, tmp_path):
    """`OWNER/Prithvi-EO-2.0-<size>` resolves to the official file name, is downloaded and converted."""
    from huggingface_hub import HfApi

    official = PrithviEncoder(PrithviConfig.from_preset("prithvi_eo_v2_tiny"))  # 6 bands, official layout below
    checkpoint = tmp_path / "Prithvi_EO_V2_tiny.pt"
    torch.save({f"encoder.{key}": value for key, value in official.state_dict().items()}, checkpoint)
    repo_id = f"{hub_server.user}/Prithvi-EO-2.0-tiny"
    HfApi().create_repo(repo_id)
    HfApi().upload_file(path_or_fileobj=str(checkpoint), path_in_repo="Prithvi_EO_V2_tiny.pt", repo_id=repo_id)

    config = tiny_refiner_config(backbone_config="prithvi_eo_v2_tiny", backbone_weights=repo_id)
    model = Stage2RefinerModel(config)
    model.load_backbone_weights()
    expected = official.state_dict()
    expected["patch_embed.proj.weight"] = expected["patch_embed.proj.weight"][:, :4]  # B02 B03 B04 B08 by name
    assert all(torch.equal(value, expected[key]) for key, value in model.backbone.state_dict().items())
    assert hub_server.count("GET", "Prithvi_EO_V2_tiny.pt") == 1


def test_backbone_weights_that_do_not_fit_are_refused(tmp_path):
    PrithviEncoder(tiny_backbone_config(depth=3)).save_pretrained(tmp_path / "deeper")
    PrithviEncoder(PrithviConfig.from_preset("prithvi_eo_v2_tiny", depth=2)).save_pretrained(tmp_path / "six")
    model = Stage2RefinerModel(tiny_refiner_config())
    with pytest.raises(ValueError, match=r"do not fit the refiner's backbone.*depth 3 vs 2"):
        model.load_backbone_weights(tmp_path / "deeper")
    with pytest.raises(ValueError, match=r"bands \['BLUE', 'GREEN', 'RED', 'NIR_NARROW', 'SWIR_1', 'SWIR_2'\]"):
        model.load_backbone_weights(tmp_path / "six")
    with pytest.raises(ValueError, match="config.backbone_weights is None"):
        model.load_backbone_weights()
    with pytest.raises(FileNotFoundError, match="neither an existing folder or file nor a Hub id"):
        model.load_backbone_weights(tmp_path / "missing" / "nothing.pt")


# ------------------------------------------------------------------------------------------ OOM fallback


def _head_failing_once(model, monkeypatch, failures: int = 1) -> dict:
    original = model.head.forward
    calls = {"count": 0}

    def flaky_forward(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] <= failures:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(model.head, "forward", flaky_forward)
    return calls


def test_head_oom_falls_back_to_the_cpu_and_warns_once(awake_model, monkeypatch):
    opt_v1, month, biome = tiny_inputs(batch=1, size=(30, 30))
    expected = refine(awake_model, opt_v1, month, biome).refined
    # The tensors are on the CPU here: let the model treat it as the accelerator whose memory ran out.
    awake_model.oom_fallback_device_types = ("cpu",)
    calls = _head_failing_once(awake_model, monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"ran out of memory on cpu; running it on the CPU.*cpu_fallback_count"):
        output = refine(awake_model, opt_v1, month, biome).refined
    assert torch.equal(output, expected)
    assert awake_model.cpu_fallback_count == 1 and calls["count"] == 2

    calls["count"] = 0  # fails once more: counted again, but no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(refine(awake_model, opt_v1, month, biome).refined, expected)
    assert awake_model.cpu_fallback_count == 2


def test_head_oom_is_raised_in_training_and_on_the_cpu(awake_model, monkeypatch):
    opt_v1, month, biome = tiny_inputs(batch=1, size=(30, 30))
    _head_failing_once(awake_model, monkeypatch, failures=10)
    with pytest.raises(torch.OutOfMemoryError):  # a real CPU: nowhere to fall back to
        refine(awake_model, opt_v1, month, biome)
    awake_model.oom_fallback_device_types = ("cpu",)
    with pytest.raises(torch.OutOfMemoryError):  # autograd on: moving the head would break the graph
        awake_model(opt_v1, month, biome)
    assert awake_model.cpu_fallback_count == 0
