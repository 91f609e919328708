"""The refiner and the Prithvi encoder used as a transformers user uses them: loading in another dtype, configs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from _refiner_helpers import single_thread  # noqa: F401  (fixture)
from _refiner_helpers import tiny_backbone_config, tiny_inputs, tiny_refiner_config
from modeling_stage2 import Stage2RefinerModel

pytestmark = pytest.mark.usefixtures("single_thread")

# A range fitted by `training.spectral_range` on the bundled sample's training tiles (log offset 0.05; rounded to
# 4 decimals): the precision of four strongly correlated bands has large entries of opposite signs that cancel in
# the distance.
_FITTED_MEAN = [-0.1241, 0.1106, -0.0153, 1.0624]
_FITTED_PRECISION = [
    [120.1802, -128.5122, -7.5190, 20.1449],
    [-128.5122, 210.2467, -42.2325, -32.1229],
    [-7.5190, -42.2325, 41.3445, 4.8858],
    [20.1449, -32.1229, 4.8858, 7.6144],
]
_FITTED_THRESHOLD = 5.573479


def _spectra_on_the_ramp(count: int, seed: int = 0) -> torch.Tensor:
    """(1, 4, 1, count) reflectance whose log spectra lie 0.5 to 2.5 thresholds from the fitted mean: about half of
    them on the ramp of `out_of_range_weight` (between 1 and 2 thresholds)."""
    generator = torch.Generator().manual_seed(seed)
    precision = torch.tensor(_FITTED_PRECISION, dtype=torch.float64)
    root = torch.linalg.cholesky(torch.linalg.inv(precision))  # covariance = root root^T
    direction = torch.randn(count, 4, generator=generator, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    distance = _FITTED_THRESHOLD * (0.5 + 2.0 * torch.rand(count, 1, generator=generator, dtype=torch.float64))
    log_spectra = torch.tensor(_FITTED_MEAN, dtype=torch.float64) + distance * direction @ root.T
    reflectance = torch.exp(log_spectra) * 0.1 - 0.05  # the inverse of `log_spectra` (log offset 0.05, centre 0.1)
    return reflectance.T.reshape(1, 4, 1, count).to(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loading_in_half_precision_keeps_the_fitted_spectral_range(tmp_path, dtype):
    """`from_pretrained(dtype=torch.bfloat16)` rounded the fitted range (mean, precision, threshold) to bfloat16:
    up to 0.11 of `out_of_range_weight` moved, a third fewer pixels kept `opt_v1`, and a model saved after that kept
    the rounded range. The range is float32 whatever the model's dtype (as the normaliser's statistics)."""
    model = Stage2RefinerModel(tiny_refiner_config(out_of_range_fallback=True)).eval()
    model.spectral_range.set_range(_FITTED_MEAN, _FITTED_PRECISION, _FITTED_THRESHOLD)
    model.save_pretrained(tmp_path / "float32")
    spectra = _spectra_on_the_ramp(400)
    with torch.no_grad():
        expected = model(spectra).out_of_range_weight
    on_the_ramp = ((expected > 0) & (expected < 1)).float().mean()
    assert 0.3 < on_the_ramp < 0.7  # the comparison below is about the ramp, not about 0s and 1s

    loaded = Stage2RefinerModel.from_pretrained(tmp_path / "float32", dtype=dtype).eval()
    assert loaded.fusion.weight.dtype == dtype
    with torch.no_grad():
        weight = loaded(spectra).out_of_range_weight
    # The distance is computed in float32 from the same float32 statistics: the same weights to float32 rounding
    # (bfloat16 statistics moved them by up to 0.11, float16 ones by ~4e-3).
    torch.testing.assert_close(weight, expected, rtol=0, atol=1e-5)
    assert {buffer.dtype for buffer in loaded.spectral_range.buffers()} == {torch.float32}

    loaded.save_pretrained(tmp_path / "resaved")
    reloaded = Stage2RefinerModel.from_pretrained(tmp_path / "resaved", dtype=torch.float32)
    for name, buffer in model.spectral_range.named_buffers():
        assert torch.equal(dict(reloaded.spectral_range.named_buffers())[name], buffer), name


def test_a_range_saved_in_bfloat16_still_loads(tmp_path):
    """A folder saved from a bfloat16 model before the range was kept in float32 holds bfloat16 range buffers: they
    load into the float32 buffers, widened exactly."""
    model = Stage2RefinerModel(tiny_refiner_config(out_of_range_fallback=True)).eval()
    model.spectral_range.set_range(_FITTED_MEAN, _FITTED_PRECISION, _FITTED_THRESHOLD)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for name in ("mean", "precision", "threshold"):
        state[f"spectral_range.{name}"] = state[f"spectral_range.{name}"].to(torch.bfloat16)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = Stage2RefinerModel.from_pretrained(tmp_path).eval()
    for name, buffer in model.spectral_range.named_buffers():
        widened = buffer.to(torch.bfloat16).to(torch.float32)
        assert torch.equal(dict(loaded.spectral_range.named_buffers())[name], widened), name


def test_initializer_range_zero_builds_a_model():
    """The config accepts `initializer_range=0` (">= 0, the std of the initial weights"), but building the model
    raised ZeroDivisionError inside torch's truncated normal. Its weights are now the distribution's limit, zero."""
    model = Stage2RefinerModel(tiny_refiner_config(initializer_range=0.0)).eval()
    truncated_normal = (
        "head.feature_projection.weight", "head.input_stem.0.weight", "metadata_embedding.projection.0.weight"
    )
    for name in truncated_normal:
        assert not model.get_parameter(name).any(), name
    assert not model.metadata_embedding.month_embedding.weight.any()  # a normal of std 0
    assert model.backbone.blocks[0].attn.qkv.weight.any()  # the backbone keeps its own (xavier) initialisation
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28))
    with torch.no_grad():
        assert torch.equal(model(opt_v1, month, biome).refined, opt_v1)


@pytest.mark.parametrize(("build", "message"), [
    # Band names are case-insensitive (`canonical_band_name`): "b02" is B02, so the tile held the blue band twice.
    (lambda: tiny_refiner_config(bands=("B02", "b02", "B04", "B08")), "bands lists a band more than once"),
    (lambda: tiny_backbone_config(bands=("B02", "b02", "B04", "B08")), r"bands lists \['B02', 'b02'\] more than once"),
    # `operator.index(True)` is 1: feature_layers=[True] silently meant block 1.
    (lambda: tiny_refiner_config(feature_layers=[True, -1]), "feature_layers must be block indices"),
])
def test_configs_refuse_values_they_used_to_misread(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("save", ["config", "model"])
def test_a_field_set_after_construction_is_checked_before_it_is_saved(tmp_path, save):
    """`config.head_width = -3` passed no check and was written to a config.json that no longer loads."""
    config = tiny_refiner_config()
    model = Stage2RefinerModel(config)
    config.head_width = -3
    with pytest.raises(ValueError, match="head_width must be a positive integer, got -3"):
        (config if save == "config" else model).save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "config.json").exists()
    config.head_width = tiny_refiner_config().head_width
    config.save_pretrained(tmp_path / "saved")  # the same config, put right, saves
    assert Stage2RefinerModel.config_class.from_pretrained(tmp_path / "saved").head_width == config.head_width
