"""The Prithvi encoder follows transformers 5's model conventions: attention backends through the attention
interface, attention maps, initialisation of every parameter and buffer (meta device included), Auto classes
and config validation. Tiny random models only; the official numerics in both backends are checked in
test_prithvi_encoder.py."""
from __future__ import annotations

import copy
import math
from unittest.mock import patch

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AttentionInterface, AutoConfig, AutoModel, PreTrainedModel, set_seed
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from modeling_stage2 import PrithviConfig, PrithviEncoder
from modeling_stage2.modeling_prithvi import eager_attention_forward, sincos_3d_table

S2_BANDS = ("B02", "B03", "B04", "B08")


def tiny_config(**overrides) -> PrithviConfig:
    arguments = {"bands": S2_BANDS, "depth": 3} | overrides
    return PrithviConfig.from_preset("prithvi_eo_v2_tiny", **arguments)


def randomised(model: PrithviEncoder, seed: int = 0) -> PrithviEncoder:
    """Non-trivial biases and norms, so that a wrong path shows in the numbers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def pair(**overrides) -> tuple[PrithviEncoder, PrithviEncoder]:
    """The same random weights in an eager and an SDPA encoder."""
    torch.manual_seed(0)
    eager = randomised(PrithviEncoder(tiny_config(attn_implementation="eager", **overrides)))
    sdpa = PrithviEncoder(tiny_config(attn_implementation="sdpa", **overrides)).eval()
    sdpa.load_state_dict(eager.state_dict())
    return eager, sdpa


# ------------------------------------------------------------------------------------- attention backends


def test_class_flags_follow_vit():
    for flag in ("_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn", "_supports_attention_backend"):
        assert getattr(PrithviEncoder, flag) is True, flag


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_is_chosen_at_construction(implementation):
    model = PrithviEncoder(tiny_config(attn_implementation=implementation))
    assert model.config._attn_implementation == implementation
    assert all(block.attn.config._attn_implementation == implementation for block in model.blocks)


def test_sdpa_is_the_default_and_unknown_implementations_are_refused():
    assert PrithviEncoder(tiny_config()).config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation"):
        PrithviEncoder(tiny_config(attn_implementation="no_such_attention"))


@pytest.mark.parametrize(
    "overrides, shape",
    [
        ({}, (2, 4, 126, 126)),
        ({"num_frames": 2}, (2, 4, 2, 70, 56)),
        ({"coords_encoding": ["location"]}, (1, 4, 56, 98)),
    ],
)
def test_sdpa_and_eager_agree(overrides, shape):
    eager, sdpa = pair(**overrides)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    extra = {"location_coords": torch.tensor([[45.0, 7.5]] * shape[0])} if "coords_encoding" in overrides else {}
    with torch.no_grad():
        expected, actual = eager(x, **extra), sdpa(x, **extra)
    assert expected.grid_size == actual.grid_size
    assert len(expected.hidden_states) == len(actual.hidden_states) == 3
    for expected_block, actual_block in zip(expected.hidden_states, actual.hidden_states):
        torch.testing.assert_close(actual_block, expected_block, rtol=0, atol=1e-5)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-5)


def test_flex_attention_agrees_with_eager_where_torch_has_it():
    eager, _ = pair()
    try:
        flex = PrithviEncoder(tiny_config(attn_implementation="flex_attention")).eval()
    except (ImportError, ValueError) as error:  # torch or hardware without flex attention
        pytest.skip(f"flex_attention unavailable: {error}")
    flex.load_state_dict(eager.state_dict())
    assert flex.config._attn_implementation == "flex_attention"
    x = torch.randn(1, 4, 56, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, actual = eager(x), flex(x)
    for expected_block, actual_block in zip(expected.hidden_states, actual.hidden_states):
        torch.testing.assert_close(actual_block, expected_block, rtol=0, atol=1e-5)


def test_sdpa_and_eager_gradients_agree():
    eager, sdpa = pair()
    x = torch.randn(2, 4, 56, 56, generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (eager, sdpa):
        model.train().zero_grad()
        model(x).last_hidden_state.square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_registered_attention_backend_is_dispatched_through_the_interface():
    """`attn_implementation` names a function of transformers' AttentionInterface: every block calls it."""
    calls = []

    def counting_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append((tuple(query.shape), kwargs["scaling"], attention_mask))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("prithvi_test_counting", counting_attention)
    eager, _ = pair()
    counted = PrithviEncoder(tiny_config(attn_implementation="prithvi_test_counting")).eval()
    counted.load_state_dict(eager.state_dict())
    x = torch.randn(1, 4, 56, 56)
    with torch.no_grad():
        output = counted(x)
        torch.testing.assert_close(output.last_hidden_state, eager(x).last_hidden_state, rtol=0, atol=1e-5)
    assert len(calls) == 3
    assert calls[0] == ((1, 4, 1 + 16, 16), 16**-0.5, None)  # (B, heads, tokens, head size), no mask


# ------------------------------------------------------------------------------------------ attention maps


def test_attentions_are_none_by_default():
    for implementation in ("eager", "sdpa"):
        model = PrithviEncoder(tiny_config(attn_implementation=implementation)).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 4, 56, 56)).attentions is None, implementation


def test_eager_attention_maps_have_the_shape_and_rows_of_a_softmax():
    eager, _ = pair()
    x = torch.randn(2, 4, 70, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = eager(x, output_attentions=True)
        plain = eager(x)
    tokens = 1 + 5 * 4
    assert len(output.attentions) == eager.config.depth == 3
    for attention in output.attentions:
        assert attention.shape == (2, 4, tokens, tokens)
        assert attention.min() >= 0
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, tokens), rtol=0, atol=1e-5)
    # Asking for the maps changes nothing else.
    assert torch.equal(output.last_hidden_state, plain.last_hidden_state)


def test_eager_attention_maps_are_softmax_of_the_scaled_query_key_products():
    """Block 1's map recomputed by hand from block 0's output (its input)."""
    eager, _ = pair()
    with torch.no_grad():
        output = eager(torch.randn(1, 4, 56, 56), output_attentions=True)
        block = eager.blocks[1]
        qkv = block.attn.qkv(block.norm1(output.hidden_states[0])).reshape(1, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
        expected = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(16), dim=-1)
    torch.testing.assert_close(output.attentions[1], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(output.attentions[0], output.attentions[1])


def test_eager_attention_forward_matches_torch_sdpa():
    generator = torch.Generator().manual_seed(4)
    query, key, value = (torch.randn(2, 3, 10, 8, generator=generator) for _ in range(3))
    module = torch.nn.Module().eval()
    output, weights = eager_attention_forward(module, query, key, value, None, scaling=8**-0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value).transpose(1, 2)
    assert output.shape == (2, 10, 3, 8) and weights.shape == (2, 3, 10, 10)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)


def test_config_output_attentions_is_the_default_of_the_forward():
    model = PrithviEncoder(tiny_config(attn_implementation="eager", output_attentions=True)).eval()
    with torch.no_grad():
        assert len(model(torch.randn(1, 4, 56, 56)).attentions) == 3
        assert model(torch.randn(1, 4, 56, 56), output_attentions=False).attentions is None


def test_sdpa_asked_for_attentions_returns_none_of_them_as_vit_does():
    """transformers' SDPA path computes no weights: an empty tuple (and a warning), as ViTModel returns."""
    eager, sdpa = pair()
    x = torch.randn(1, 4, 56, 56)
    with torch.no_grad():
        output = sdpa(x, output_attentions=True)
        torch.testing.assert_close(output.last_hidden_state, eager(x).last_hidden_state, rtol=0, atol=1e-5)
    assert output.attentions == ()
    # A config asking for maps from SDPA is refused by transformers' own validator.
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match="output_attentions"):
        tiny_config(attn_implementation="sdpa", output_attentions=True)


def test_tuple_output_keeps_the_positions_of_the_earlier_fields():
    eager, _ = pair()
    x = torch.randn(1, 4, 56, 56)
    with torch.no_grad():
        as_tuple = eager(x, return_dict=False, output_attentions=True)
        plain = eager(x, return_dict=False)
    assert len(as_tuple) == 4 and len(plain) == 3
    assert as_tuple[2] == plain[2] == (1, 4, 4)  # grid_size stays third
    assert len(as_tuple[3]) == 3 and as_tuple[3][0].shape == (1, 4, 17, 17)


def test_refiner_style_call_is_unchanged():
    """The refiner calls backbone(x, output_hidden_states=True, return_dict=True) and reads these two fields."""
    eager, sdpa = pair()
    with torch.no_grad():
        for model in (eager, sdpa):
            output = model(torch.randn(2, 4, 126, 126), output_hidden_states=True, return_dict=True)
            assert output.grid_size == (1, 9, 9)
            assert len(output.hidden_states) == 3 and output.hidden_states[0].shape == (2, 82, 64)
            assert output.attentions is None


def test_gradient_checkpointing_with_attention_maps():
    eager, _ = pair()
    eager.train()
    x = torch.randn(1, 4, 56, 56)
    plain = eager(x, output_attentions=True)
    eager.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = eager(x, output_attentions=True)
    for a, b in zip(plain.attentions, checkpointed.attentions):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    checkpointed.last_hidden_state.sum().backward()
    assert eager.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ initialisation


def _seeded_initialize_weights():
    """transformers' test_can_init_all_missing_weights: the same seed before every module's init."""
    original = PreTrainedModel._initialize_weights

    def seeded(self, module, *args, **kwargs):
        set_seed(0)
        return original(self, module, *args, **kwargs)

    return patch.object(PreTrainedModel, "_initialize_weights", seeded)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"coords_encoding": ["time", "location"], "coords_scale_learn": True},
        {"coords_encoding": ["time"], "coords_scale_learn": False},
    ],
)
def test_every_missing_weight_is_initialised_like_a_fresh_model(overrides):
    config = tiny_config(**overrides)
    with _seeded_initialize_weights():
        from_config = PrithviEncoder(copy.deepcopy(config))
        from_nothing = PrithviEncoder.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    fresh, loaded = from_config.state_dict(), from_nothing.state_dict()
    assert fresh.keys() == loaded.keys()
    different = [key for key in fresh if not torch.equal(fresh[key], loaded[key])]
    assert different == []


def test_meta_device_init_computes_every_buffer_and_finite_weights():
    config = tiny_config(coords_encoding=["time", "location"], coords_scale_learn=False, num_frames=2)
    reference = PrithviEncoder(copy.deepcopy(config))
    with torch.device("meta"):
        model = PrithviEncoder(copy.deepcopy(config))
    assert model.pos_embed.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    buffers, expected_buffers = dict(model.named_buffers()), dict(reference.named_buffers())
    expected_names = {"pos_embed", "temporal_embed_enc.scale", "location_embed_enc.scale"}
    assert buffers.keys() == expected_buffers.keys() == expected_names
    for name, buffer in buffers.items():
        assert torch.equal(buffer, expected_buffers[name]), name
    assert torch.equal(model.pos_embed, sincos_3d_table(64, (2, 16, 16)))
    assert torch.equal(model.temporal_embed_enc.scale, torch.ones(1))
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name
        if name.endswith("bias"):
            assert torch.equal(parameter, torch.zeros_like(parameter)), name
        if "norm" in name and name.endswith("weight"):
            assert torch.equal(parameter, torch.ones_like(parameter)), name


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize("on_meta", [False, True])
def test_weights_follow_the_official_distributions(on_meta):
    """Xavier-uniform linears and patch conv (the conv as a (embed_dim, C*t*h*w) matrix), N(0, 0.02) CLS token."""
    torch.manual_seed(0)
    config = tiny_config(bands=("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"), initializer_range=0.5)
    if on_meta:
        with torch.device("meta"):
            model = PrithviEncoder(config)
        model.to_empty(device="cpu")
        model.init_weights()
    else:
        model = PrithviEncoder(config)
    conv = model.patch_embed.proj.weight  # (64, 6, 1, 14, 14)
    bound = _xavier_bound(6 * 196, 64)
    assert conv.abs().max() <= bound
    # uniform(-b, b) has std b / sqrt(3); torch's default Conv3d init would give about 0.42 of this.
    assert abs(conv.std().item() / (bound / math.sqrt(3)) - 1) < 0.03
    qkv = model.blocks[0].attn.qkv.weight  # (192, 64)
    assert qkv.abs().max() <= _xavier_bound(64, 192)
    assert abs(qkv.std().item() / (_xavier_bound(64, 192) / math.sqrt(3)) - 1) < 0.03
    fc1 = model.blocks[0].mlp.fc1.weight  # (256, 64)
    assert abs(fc1.std().item() / (_xavier_bound(64, 256) / math.sqrt(3)) - 1) < 0.03
    assert 0.2 < model.cls_token.std().item() < 0.8  # 64 samples of N(0, 0.5)


def test_learned_coordinate_scales_start_at_0_1():
    with torch.device("meta"):
        model = PrithviEncoder(tiny_config(coords_encoding=["time", "location"], coords_scale_learn=True))
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.temporal_embed_enc.scale.detach(), torch.tensor([0.1]))
    assert torch.equal(model.location_embed_enc.scale.detach(), torch.tensor([0.1]))


def test_loading_keeps_the_loaded_weights_and_computes_a_missing_table(tmp_path):
    """A checkpoint without `pos_embed` gets the table computed; the loaded weights are not re-initialised."""
    from safetensors.torch import load_file, save_file

    model = randomised(PrithviEncoder(tiny_config()))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["pos_embed"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = PrithviEncoder.from_pretrained(tmp_path)
    assert torch.equal(loaded.pos_embed, sincos_3d_table(64, (1, 16, 16)))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# --------------------------------------------------------------------------------- Auto classes, loading


def test_auto_classes_round_trip(tmp_path):
    model = randomised(PrithviEncoder(tiny_config()))
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is PrithviConfig and config.bands == list(S2_BANDS)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is PrithviEncoder and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(1, 4, 126, 126)
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)
    assert type(AutoModel.from_config(config)) is PrithviEncoder


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_from_pretrained_sets_the_attention_implementation(tmp_path, implementation):
    model = randomised(PrithviEncoder(tiny_config(attn_implementation="eager" if implementation == "sdpa" else "sdpa")))
    model.save_pretrained(tmp_path)
    x = torch.randn(1, 4, 56, 56)
    for loader in (PrithviEncoder, AutoModel):
        loaded = loader.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.config._attn_implementation == implementation
        assert all(block.attn.config._attn_implementation == implementation for block in loaded.blocks)
        with torch.no_grad():
            output = loaded(x, output_attentions=True)
            torch.testing.assert_close(output.last_hidden_state, model(x).last_hidden_state, rtol=0, atol=1e-5)
        assert len(output.attentions) == (3 if implementation == "eager" else 0)


def test_set_attn_implementation_switches_a_built_model():
    eager, _ = pair()
    x = torch.randn(1, 4, 56, 56)
    with torch.no_grad():
        before = eager(x, output_attentions=True)
        eager.set_attn_implementation("sdpa")
        after = eager(x)
    assert eager.config._attn_implementation == "sdpa"
    torch.testing.assert_close(after.last_hidden_state, before.last_hidden_state, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ config fields


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"depth": 0}, "depth must be a positive integer"),
        ({"embed_dim": -64}, "embed_dim must be a positive integer"),
        ({"num_heads": 2.5}, "num_heads must be a positive integer"),
        ({"num_frames": "4"}, "num_frames must be a positive integer"),
        ({"in_chans": 0, "bands": None}, "in_chans must be a positive integer"),
        ({"patch_size": (1, 14)}, r"patch_size must be an int or \(t, h, w\)"),
        ({"patch_size": (1, 0, 14)}, "patch_size must be a positive integer"),
        ({"patch_size": True}, "patch_size"),
        ({"img_size": (224, 224, 3)}, r"img_size must be an int or \(height, width\)"),
        ({"img_size": -1}, "img_size must be a positive integer"),
        ({"mlp_ratio": 0}, "mlp_ratio must be a finite positive number"),
        ({"layer_norm_eps": -1e-5}, "layer_norm_eps must be a finite positive number"),
        ({"initializer_range": float("nan")}, "initializer_range"),
        ({"band_mean": [1.0, 2.0]}, r"band_mean has 2 values for the 4 bands .*one value per band"),
        ({"band_std": [1.0, 2.0, 3.0, 4.0, 5.0]}, r"band_std has 5 values for the 4 bands"),
        ({"band_std": [1.0, 2.0, 0.0, 4.0]}, "band_std must be a finite positive number"),
        ({"band_mean": "1087"}, "band_mean must be a list of numbers"),
        ({"num_heads": 3}, "embed_dim .64. must be a multiple of num_heads .3."),
        ({"coords_encoding": ["time"], "patch_size": (2, 14, 14)}, r"patch_size\[0\] == 1"),
        ({"coords_encoding": "time"}, r"got 'time'; for one encoding write \['time'\]"),
        ({"coords_scale_learn": "false"}, "coords_scale_learn must be True or False, got 'false'"),
        ({"coords_scale_learn": 1}, "coords_scale_learn must be True or False, got 1"),
    ],
)
def test_bad_field_values_raise_a_value_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_fields_changed_after_construction_are_caught_by_validate_and_save(tmp_path):
    config = tiny_config()
    config.validate()  # a valid config passes
    config.num_heads = 5
    with pytest.raises(StrictDataclassClassValidationError, match="multiple of num_heads"):
        config.validate()
    with pytest.raises(StrictDataclassClassValidationError, match="multiple of num_heads"):
        config.save_pretrained(tmp_path)
    config = tiny_config()
    config.band_mean = [1.0]
    with pytest.raises(StrictDataclassClassValidationError, match="band_mean has 1 values"):
        config.validate()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("depth", 0, "depth must be a positive integer, got 0"),
        ("num_heads", 0, "num_heads must be a positive integer, got 0"),  # not a ZeroDivisionError of embed_dim % 0
        ("patch_size", [1, 0, 14], "patch_size must be a positive integer, got 0"),
        ("coords_encoding", ["elevation"], r"coords_encoding accepts \('time', 'location'\), got \['elevation'\]"),
        ("coords_scale_learn", "false", "coords_scale_learn must be True or False"),
        ("bands", ["B02", "VV", "B04", "B08"], "Unknown band name 'VV'"),
        ("mlp_ratio", -1.0, "mlp_ratio must be a finite positive number, got -1.0"),
        ("layer_norm_eps", 0.0, "layer_norm_eps must be a finite positive number, got 0.0"),
        ("band_std", [1.0, 0.0, 1.0, 1.0], "band_std must be a finite positive number, got 0.0"),
        ("img_size", [224, -1], "img_size must be a positive integer, got -1"),
    ],
)
def test_every_field_changed_after_construction_is_checked_as_in_init(tmp_path, field, value, message):
    config = tiny_config()
    setattr(config, field, value)
    with pytest.raises(StrictDataclassClassValidationError, match=message) as error:
        config.validate()
    assert type(error.value.__cause__) is ValueError
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("output_hidden_states", [False, True])
def test_output_hidden_states_survives_save_and_load(tmp_path, output_hidden_states):
    """False equals PretrainedConfig's default, which transformers leaves out of config.json; this config's
    default is True, so the saved value must be kept."""
    model = PrithviEncoder(tiny_config(depth=1, output_hidden_states=output_hidden_states))
    model.save_pretrained(tmp_path)
    loaded = PrithviEncoder.from_pretrained(tmp_path)
    assert loaded.config.output_hidden_states is output_hidden_states
    with torch.no_grad():
        hidden_states = loaded(torch.randn(1, 4, 28, 28)).hidden_states
    assert (hidden_states is None) is not output_hidden_states
    assert PrithviConfig.from_pretrained(tmp_path).output_hidden_states is output_hidden_states


def test_valid_numeric_forms_are_accepted():
    config = tiny_config(depth=2.0, patch_size=14, img_size=[224, 112], layer_norm_eps=1e-6, band_mean=[0, -1, 2, 3])
    assert (config.depth, config.patch_size, config.img_size) == (2, [1, 14, 14], [224, 112])
    assert isinstance(config.depth, int) and config.band_mean == [0.0, -1.0, 2.0, 3.0]
    assert config.grid_size == (1, 16, 8)
