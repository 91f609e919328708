"""The Prithvi-EO-2.0 encoder port computes the official function and has the official layout."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from _prithvi_helpers import FIXTURE_CASES, FIXTURE_OVERRIDES, load_reference

from modeling_stage2 import (
    PRETRAINED_BANDS,
    PRITHVI_PRESETS,
    PrithviConfig,
    PrithviEncoder,
    PrithviEncoderOutput,
    convert_official_checkpoint,
)
from modeling_stage2.modeling_prithvi import sincos_3d_table

S2_BANDS = ("B02", "B03", "B04", "B08")
# manifest_summary.json entry for each preset the fixtures describe
MANIFEST_PRESETS = {
    "600m": "prithvi_eo_v2_600m",
    "600m_tl": "prithvi_eo_v2_600m_tl",
    "300m": "prithvi_eo_v2_300m",
    "100m_tl": "prithvi_eo_v2_100m_tl",
}


def tiny(**overrides) -> PrithviEncoder:
    return PrithviEncoder(PrithviConfig.from_preset("prithvi_eo_v2_tiny", **overrides)).eval()


def meta_encoder(preset: str, **overrides) -> PrithviEncoder:
    """A real-sized encoder with shapes only (no memory allocated)."""
    with torch.device("meta"):
        return PrithviEncoder(PrithviConfig.from_preset(preset, **overrides))


# ------------------------------------------------------------------------------------ official numerics


@pytest.fixture(scope="module")
def reference(prithvi_fixtures_dir):
    return load_reference(prithvi_fixtures_dir)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case, input_name, bands", FIXTURE_CASES)
def test_every_block_matches_the_official_features(
    prithvi_fixtures_dir, reference, case, input_name, bands, attn_implementation
):
    model = convert_official_checkpoint(
        prithvi_fixtures_dir / "tiny_checkpoint.pt",
        bands=bands,
        attn_implementation=attn_implementation,
        **FIXTURE_OVERRIDES,
    )
    assert model.config._attn_implementation == attn_implementation
    with torch.no_grad():
        output = model(reference[f"inputs.{input_name}"])

    n_features = sum(key.startswith(f"outputs.{case}.features.") for key in reference)
    assert n_features == model.config.depth == len(output.hidden_states)
    for index, features in enumerate(output.hidden_states):
        expected = reference[f"outputs.{case}.features.{index}"]
        assert features.shape == expected.shape
        torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.last_hidden_state, output.hidden_states[-1], rtol=0, atol=0)

    final_image = reference[f"outputs.{case}.final_image"]
    t, h, w = output.grid_size
    assert (t, h, w) == (1, *final_image.shape[-2:])
    as_image = output.last_hidden_state[:, 1:].reshape(-1, h, w, model.config.embed_dim).permute(0, 3, 1, 2)
    torch.testing.assert_close(as_image, final_image, rtol=0, atol=1e-5)


def test_position_table_is_the_official_buffer(prithvi_fixtures_dir):
    checkpoint = torch.load(prithvi_fixtures_dir / "tiny_checkpoint.pt", weights_only=True)
    official = checkpoint["encoder.pos_embed"]
    table = sincos_3d_table(64, (1, 16, 16))
    torch.testing.assert_close(table, official, rtol=0, atol=1e-7)
    assert torch.equal(tiny().pos_embed, table)  # computed in _init_weights
    assert torch.count_nonzero(table[0, 0]) == 0  # CLS row


def test_cropped_input_is_the_official_crop(reference):
    """120 px with a 14-px patch: the last 8 px are dropped, exactly as if the input were 112 px."""
    model = tiny()
    x = torch.randn(2, 6, 120, 120)
    with torch.no_grad():
        full, cropped = model(x), model(x[..., :112, :112])
    assert full.grid_size == (1, 8, 8)
    assert torch.equal(full.last_hidden_state, cropped.last_hidden_state)


def test_padded_input_keeps_every_pixel():
    model = tiny()
    x = torch.randn(1, 6, 126, 126)
    with torch.no_grad():
        output = model(x)
        changed = x.clone()
        changed[..., 125, 125] += 10.0  # the last pixel of a 120 px tile padded to 126
        moved = model(changed)
    assert output.grid_size == (1, 9, 9)
    assert output.last_hidden_state.shape == (1, 1 + 81, 64)
    last_patch = moved.last_hidden_state[:, -1] - output.last_hidden_state[:, -1]
    assert last_patch.abs().max() > 1e-3


def test_non_square_interpolation_keeps_height_and_width_apart():
    """align_corners=True keeps the corner rows/columns of the table: a transposed grid would not."""
    model = tiny()
    table = model.pos_embed[0, 1:].reshape(16, 16, 64)
    resized = model.interpolate_pos_encoding((1, 16, 5))[0, 1:].reshape(16, 5, 64)
    torch.testing.assert_close(resized[:, 0], table[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(resized[:, -1], table[:, -1], rtol=0, atol=1e-6)
    assert not torch.allclose(resized[0, :], resized[-1, :])


def test_single_frame_of_a_multi_frame_model_uses_the_first_frame_table():
    model = tiny(num_frames=4)
    assert model.pos_embed.shape == (1, 1 + 4 * 256, 64)
    single = model.interpolate_pos_encoding((1, 16, 16))
    torch.testing.assert_close(single, model.pos_embed[:, : 1 + 256], rtol=0, atol=1e-7)
    assert torch.equal(model.interpolate_pos_encoding((4, 16, 16)), model.pos_embed)  # resized to itself: bit for bit


def test_four_frame_input_uses_the_stored_table():
    model = tiny(num_frames=4)
    x = torch.randn(1, 6, 4, 56, 56)
    with torch.no_grad():
        output = model(x)
    assert output.grid_size == (4, 4, 4)
    assert output.last_hidden_state.shape == (1, 1 + 64, 64)


@pytest.mark.parametrize("preset", sorted(PRITHVI_PRESETS))
def test_every_preset_accepts_other_sizes(preset):
    model = meta_encoder(preset, bands=S2_BANDS)  # shapes only: real-sized presets cost no memory
    _, patch_h, patch_w = model.config.patch_size
    for height, width in [(126, 126), (128, 128), (120, 120), (130, 98), (224, 224)]:
        with torch.device("meta"):
            output = model(torch.empty(2, 4, height, width), output_hidden_states=True)
        grid = (1, height // patch_h, width // patch_w)
        assert output.grid_size == grid
        assert output.last_hidden_state.shape == (2, 1 + grid[1] * grid[2], model.config.embed_dim)
        assert len(output.hidden_states) == model.config.depth


# ------------------------------------------------------------------------------------ layout and sizes


def test_600m_preset_has_the_official_keys_and_shapes(prithvi_fixtures_dir):
    manifest = json.loads((prithvi_fixtures_dir / "manifest_600m_encoder.json").read_text())
    expected = {key.removeprefix("encoder."): shape for key, shape in manifest.items()}
    state = meta_encoder("prithvi_eo_v2_600m").state_dict()
    assert {key: list(value.shape) for key, value in state.items()} == expected
    assert len(expected) == 390


def test_tl_preset_adds_exactly_the_official_extra_keys(prithvi_fixtures_dir):
    base = json.loads((prithvi_fixtures_dir / "manifest_600m_encoder.json").read_text())
    extra = json.loads((prithvi_fixtures_dir / "manifest_600m_tl_extra_keys.json").read_text())
    encoder_extra = {key: shape for key, shape in extra.items() if key.startswith("encoder.")}
    expected = {key.removeprefix("encoder."): shape for key, shape in {**base, **encoder_extra}.items()}
    model = meta_encoder("prithvi_eo_v2_600m_tl")
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == expected
    assert isinstance(model.temporal_embed_enc.scale, torch.nn.Parameter)
    assert isinstance(model.location_embed_enc.scale, torch.nn.Parameter)


@pytest.mark.parametrize("summary_key, preset", sorted(MANIFEST_PRESETS.items()))
def test_parameter_and_key_counts_match_the_released_models(prithvi_fixtures_dir, summary_key, preset):
    summary = json.loads((prithvi_fixtures_dir / "manifest_summary.json").read_text())[summary_key]
    model = meta_encoder(preset)
    assert sum(parameter.numel() for parameter in model.parameters()) == summary["n_params_encoder"]
    assert len(model.state_dict()) == summary["n_keys_encoder"]
    for name in ("embed_dim", "depth", "num_heads", "num_frames", "img_size"):
        assert getattr(model.config, name) == summary["cfg"][name], name
    assert model.config.patch_size == summary["cfg"]["patch_size"]


def test_tiny_preset_shape():
    config = PrithviConfig.from_preset("prithvi_eo_v2_tiny")
    assert (config.embed_dim, config.depth, config.num_heads, config.patch_size) == (64, 4, 4, [1, 14, 14])
    assert config.bands == list(PRETRAINED_BANDS)


# ------------------------------------------------------------------------------- transformers behaviour


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    model = tiny(bands=S2_BANDS).train()
    x = torch.randn(2, 4, 126, 126)

    def run():
        model.zero_grad()
        output = model(x)
        loss = sum(hidden.square().mean() for hidden in output.hidden_states)
        loss.backward()
        return output.last_hidden_state.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_output, plain_grads = run()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(block.gradient_checkpointing for block in model.blocks)
    checkpointed_output, checkpointed_grads = run()
    torch.testing.assert_close(checkpointed_output, plain_output, rtol=0, atol=1e-6)
    assert plain_grads.keys() == checkpointed_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(checkpointed_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
def test_reentrant_checkpointing_with_frozen_backbone_reaches_the_input_embeddings():
    """The path peft.prepare_model_for_kbit_training takes (it still calls gradient_checkpointing_enable):
    frozen weights, input grads enabled."""
    model = tiny(bands=S2_BANDS).train()
    model.requires_grad_(False)
    model.blocks[-1].mlp.fc2.weight.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    assert model.get_input_embeddings() is model.patch_embed
    model(torch.randn(1, 4, 126, 126)).last_hidden_state.sum().backward()
    assert model.blocks[-1].mlp.fc2.weight.grad is not None
    assert model.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_output_flags_fall_back_to_the_config():
    model = tiny(bands=S2_BANDS)
    x = torch.randn(1, 4, 56, 56)
    with torch.no_grad():
        default = model(x)
        assert isinstance(default, PrithviEncoderOutput)
        assert len(default.hidden_states) == 4  # PrithviConfig defaults output_hidden_states to True
        assert model(x, output_hidden_states=False).hidden_states is None
        as_tuple = model(x, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], default.last_hidden_state)
        model.config.output_hidden_states = False
        assert model(x).hidden_states is None


def test_eval_mode_is_deterministic():
    model = tiny(bands=S2_BANDS)
    x = torch.randn(1, 4, 70, 70)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = tiny(bands=S2_BANDS, coords_encoding=["time", "location"], coords_scale_learn=True)
    model.save_pretrained(tmp_path)
    loaded = PrithviEncoder.from_pretrained(tmp_path)
    assert not loaded.training
    assert loaded.config.to_diff_dict() | {"_name_or_path": ""} == model.config.to_diff_dict() | {"_name_or_path": ""}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, coords = torch.randn(2, 4, 126, 126), torch.tensor([[[2020.0, 150.0]], [[2021.0, 10.0]]])
    with torch.no_grad():
        assert torch.equal(loaded(x, coords).last_hidden_state, model(x, coords).last_hidden_state)


# --------------------------------------------------------------------------------------- TL encodings


def _official_sincos_1d(dim: int, value: float) -> np.ndarray:
    """The official 1D formula, written out independently in numpy."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    return np.concatenate([np.sin(value * omega), np.cos(value * omega)])


def test_temporal_and_location_encodings_follow_the_official_formula():
    model = tiny(bands=S2_BANDS, coords_encoding=["time", "location"], coords_scale_learn=True)
    assert torch.equal(model.temporal_embed_enc.scale, torch.tensor([0.1]))
    with torch.no_grad():
        model.temporal_embed_enc.scale.fill_(0.7)
        model.location_embed_enc.scale.fill_(0.3)
        temporal = model.temporal_embed_enc(torch.tensor([[[2019.0, 200.0]]]), tokens_per_frame=3)
        location = model.location_embed_enc(torch.tensor([[48.5, -3.25]]))
    expected_t = 0.7 * np.concatenate([_official_sincos_1d(32, 2019.0), _official_sincos_1d(32, 200.0)])
    expected_l = 0.3 * np.concatenate([_official_sincos_1d(32, 48.5), _official_sincos_1d(32, -3.25)])
    assert temporal.shape == (1, 3, 64) and location.shape == (1, 1, 64)
    np.testing.assert_allclose(temporal[0, 2].numpy(), expected_t, atol=2e-4)  # float32 of year x frequency
    np.testing.assert_allclose(location[0, 0].numpy(), expected_l, atol=1e-5)


def test_each_frame_gets_its_own_date_encoding():
    """Tokens are ordered (t, h, w): frame f's tokens (a run of h*w) all carry frame f's date, as the official
    repeat_interleave gives; read at the first block's input, with and without dates."""
    model = tiny(depth=1, num_frames=3, coords_encoding=["time"], coords_scale_learn=False)
    x = torch.randn(2, 6, 3, 28, 42)  # grid (3, 2, 3): 6 tokens per frame
    dates = torch.tensor([[[2019.0, 10.0], [2019.0, 100.0], [2020.0, 300.0]],
                          [[2021.0, 5.0], [2021.0, 180.0], [2022.0, 7.0]]])
    block_inputs = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: block_inputs.append(args[0]))
    with torch.no_grad():
        model(x)
        model(x, temporal_coords=dates)
    added = (block_inputs[1] - block_inputs[0]).double().numpy()
    assert added.shape == (2, 1 + 18, 64) and not added[:, 0].any()  # the CLS token gets no date
    for sample in range(2):
        for frame in range(3):
            year, day = dates[sample, frame].tolist()
            expected = np.concatenate([_official_sincos_1d(32, year), _official_sincos_1d(32, day)])
            tokens = added[sample, 1 + 6 * frame : 1 + 6 * (frame + 1)]
            np.testing.assert_allclose(tokens, np.broadcast_to(expected, tokens.shape), atol=3e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_coordinate_encodings_are_the_float32_ones_rounded(dtype):
    """The sin-cos of a year (angles ~2000 rad) is computed in float32, then rounded once to the model dtype: within
    half an ulp of values below 1 (a sin-cos in float16 is off by up to 0.6, in bfloat16 by 1.6)."""
    model = tiny(depth=1, coords_encoding=["time", "location"], coords_scale_learn=False)
    half = copy.deepcopy(model).to(dtype)
    temporal = torch.tensor([[[2019.0, 200.0]], [[2021.0, 201.0]]])
    location = torch.tensor([[48.5, -3.25], [48.6, -179.3]])
    with torch.no_grad():
        pairs = [(half.temporal_embed_enc(temporal, 1), model.temporal_embed_enc(temporal, 1)),
                 (half.location_embed_enc(location), model.location_embed_enc(location))]
    for encoded, reference in pairs:
        assert encoded.dtype == dtype
        torch.testing.assert_close(encoded.float(), reference, rtol=0, atol=torch.finfo(dtype).eps / 2)


def test_tl_coordinates_change_the_output_and_train_the_scale():
    model = tiny(bands=S2_BANDS, coords_encoding=["time", "location"], coords_scale_learn=True).train()
    x = torch.randn(2, 4, 56, 56)
    temporal, location = torch.tensor([[[2020.0, 1.0]], [[2020.0, 180.0]]]), torch.tensor([[10.0, 20.0], [-5.0, 3.0]])
    without = model(x).last_hidden_state
    with_coords = model(x, temporal_coords=temporal, location_coords=location).last_hidden_state
    assert (with_coords - without).abs().max() > 1e-3
    with_coords.square().mean().backward()
    assert model.temporal_embed_enc.scale.grad.abs() > 0
    assert model.location_embed_enc.scale.grad.abs() > 0
    fixed = tiny(bands=S2_BANDS, coords_encoding=["time"], coords_scale_learn=False)
    assert "temporal_embed_enc.scale" in fixed.state_dict()
    assert torch.equal(fixed.temporal_embed_enc.scale, torch.ones(1))
    assert not hasattr(fixed, "location_embed_enc")


# ------------------------------------------------------------------------------------- config and bands


def test_sentinel2_bands_take_the_hls_statistics():
    config = PrithviConfig.from_preset("prithvi_eo_v2_600m", bands=S2_BANDS)
    assert config.in_chans == 4
    assert config.pretrained_band_names == ("BLUE", "GREEN", "RED", "NIR_NARROW")
    assert config.band_mean == [1087.0, 1342.0, 1433.0, 2734.0]
    assert config.band_std == [2248.0, 2179.0, 2178.0, 1850.0]
    swir = PrithviConfig.from_preset("prithvi_eo_v2_tiny", bands=("B12", "SWIR_1"))
    assert swir.band_mean == [1363.0, 1958.0] and swir.band_std == [1049.0, 1242.0]


def test_in_chans_alone_selects_the_first_pretrained_bands():
    config = PrithviConfig.from_preset("prithvi_eo_v2_tiny", in_chans=4)
    assert config.bands == ["BLUE", "GREEN", "RED", "NIR_NARROW"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bands": ("B02", "B05")}, "Unknown band name 'B05'"),
        ({"bands": ("B02", "B02")}, "more than once"),
        ({"bands": ("B02", "B03"), "in_chans": 3}, "does not match"),
        ({"in_chans": 7}, "name the bands"),
        ({"band_mean": [1.0]}, "band_mean has 1 values"),
        ({"num_heads": 5}, "multiple of num_heads"),
        ({"embed_dim": 72, "num_heads": 4}, "multiple of 16"),
        ({"coords_encoding": ["elevation"]}, "coords_encoding"),
    ],
)
def test_bad_config_arguments_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        PrithviConfig.from_preset("prithvi_eo_v2_tiny", **overrides)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="prithvi_eo_v2_600m"):
        PrithviConfig.from_preset("prithvi_eo_v3")


def test_official_config_dict_is_accepted(prithvi_fixtures_dir):
    official = json.loads((prithvi_fixtures_dir / "tiny_reference.json").read_text())["config"]
    config = PrithviConfig(**official)
    assert (config.embed_dim, config.depth, config.num_heads, config.in_chans) == (64, 2, 4, 6)
    assert not hasattr(config, "decoder_embed_dim")


def test_bad_inputs_raise_clear_errors():
    model = tiny(bands=S2_BANDS)
    with pytest.raises(ValueError, match="has 6 channels but the encoder expects 4"):
        model(torch.randn(1, 6, 56, 56))
    with pytest.raises(ValueError, match="smaller than one patch"):
        model(torch.randn(1, 4, 10, 56))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(4, 56, 56))


@pytest.mark.parametrize("coords_scale_learn", [False, True])
def test_buffers_hold_their_values_without_weight_initialisation(coords_scale_learn, monkeypatch):
    """The fixed buffers (position table, non-learned coordinate scales) are set in `__init__` too, so a model built
    without `_init_weights` (transformers' `test_init_weights_can_init_buffers`) holds the initialised values."""
    from transformers import PreTrainedModel

    config = PrithviConfig.from_preset("prithvi_eo_v2_tiny", depth=1, img_size=28, num_frames=2,
                                       coords_encoding=["time", "location"], coords_scale_learn=coords_scale_learn)
    initialised = dict(PrithviEncoder(config).named_buffers())
    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", lambda *args, **kwargs: None)
    uninitialised = dict(PrithviEncoder(config).named_buffers())
    assert sorted(initialised) == sorted(uninitialised)
    assert "pos_embed" in initialised and (not coords_scale_learn) == ("temporal_embed_enc.scale" in initialised)
    for name, value in initialised.items():
        torch.testing.assert_close(uninitialised[name], value, rtol=0, atol=0, msg=name)
