"""`near_black_fallback`: the refiner keeps `opt_v1` at its near-black pixels (red + NIR of `opt_v1`), says where in
`out_of_range_weight`, and the option travels with saved models, adapters and training (issue: refinement
quality)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel
from modeling_stage2.configuration_stage2 import NEAR_BLACK_RAMP, NEAR_BLACK_THRESHOLD
from modeling_stage2.modeling_stage2 import near_black_weight
from training.spectral_range import fit_spectral_range, set_spectral_range

from _refiner_helpers import tiny_inputs, tiny_refiner_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures"
RED, NIR = 2, 3  # positions in the product's bands B02 B03 B04 B08


def awake(model: Stage2RefinerModel, seed: int = 3) -> Stage2RefinerModel:
    """`model` with a head that changes every pixel (a fresh head returns `opt_v1`)."""
    with torch.no_grad():
        model.head.output_projection.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def pair(**overrides) -> tuple[Stage2RefinerModel, Stage2RefinerModel]:
    """The same refiner without and with `near_black_fallback`."""
    torch.manual_seed(0)
    plain = awake(Stage2RefinerModel(tiny_refiner_config(**overrides)))
    guarded = Stage2RefinerModel(tiny_refiner_config(near_black_fallback=True, **overrides)).eval()
    guarded.load_state_dict(plain.state_dict())
    return plain, guarded


def with_dark_stripe(opt_v1: torch.Tensor, red_nir: float = 0.01, rows: slice = slice(0, 8)) -> torch.Tensor:
    """`opt_v1` whose `rows` are water-dark: red + NIR = `red_nir`, blue and green as dark."""
    dark = opt_v1.clone()
    dark[:, :, rows] = red_nir / 2
    return dark


def test_config_default_keeps_nothing_and_checks_its_fields():
    config = tiny_refiner_config()
    assert config.near_black_fallback is False and not config.keeps_opt_v1
    defaults = (config.near_black_threshold, config.near_black_ramp)
    assert defaults == (NEAR_BLACK_THRESHOLD, NEAR_BLACK_RAMP) == (0.02, 2.0)
    assert tiny_refiner_config(near_black_fallback=True).keeps_opt_v1
    assert tiny_refiner_config(out_of_range_fallback=True).keeps_opt_v1
    assert tiny_refiner_config().near_black_band_indices == (RED, NIR)
    reordered = Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", bands=("B08", "B04", "B03", "B02"),
                                    near_black_fallback=True)
    assert reordered.near_black_band_indices == (1, 0)
    with pytest.raises(ValueError, match="near_black_fallback must be True or False"):
        tiny_refiner_config(near_black_fallback="yes")
    for bad in (0.0, -0.01, "dark"):
        with pytest.raises(ValueError, match="near_black_threshold must be"):
            tiny_refiner_config(near_black_threshold=bad)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="near_black_ramp must be > 1"):
            tiny_refiner_config(near_black_ramp=bad)
    with pytest.raises(ValueError, match=r"near_black_fallback needs the bands \('B04', 'B08'\).*lacks \('B08',\)"):
        Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", bands=("B02", "B03", "B04"), near_black_fallback=True)
    Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", bands=("B02", "B03", "B04"))  # without it: any bands


def test_the_weight_is_one_up_to_the_threshold_and_zero_from_the_ramp():
    red_nir = torch.tensor([0.0, 0.01, 0.02, 0.025, 0.03, 0.035, 0.04, 0.08, 0.5])
    opt_v1 = torch.zeros(1, 4, 1, len(red_nir))
    opt_v1[0, RED, 0] = 0.25 * red_nir
    opt_v1[0, NIR, 0] = 0.75 * red_nir
    opt_v1[0, 0, 0] = 0.3  # blue and green play no part
    weight = near_black_weight(opt_v1, (RED, NIR), 0.02, 2.0)
    assert weight.shape == (1, 1, 1, len(red_nir)) and weight.dtype == torch.float32
    expected = torch.tensor([1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0])
    torch.testing.assert_close(weight[0, 0, 0], expected, atol=1e-6, rtol=0)
    # a wider ramp: 0 only from 4 times the threshold
    torch.testing.assert_close(near_black_weight(opt_v1, (RED, NIR), 0.02, 4.0)[0, 0, 0, 4], torch.tensor(5 / 6))


def test_the_refiner_keeps_opt_v1_at_near_black_pixels_and_says_where():
    plain, guarded = pair(spectral_correction="affine", spectral_mlp_hidden_size=8)  # unclamped: the blend is exact
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    opt_v1 = with_dark_stripe(0.2 + 0.5 * opt_v1)  # bright land (red + NIR >= 0.4) below a dark stripe
    opt_v1[:, :, 8:10] = 0.015  # a ramp row: red + NIR 0.03, half way
    with torch.no_grad():
        expected = plain(opt_v1, month, biome)
        output = guarded(opt_v1, month, biome)
    assert expected.out_of_range_weight is None
    weight = output.out_of_range_weight
    assert weight.shape == (2, 1, 28, 28)
    assert torch.equal(weight[:, :, :8], torch.ones_like(weight[:, :, :8]))
    torch.testing.assert_close(weight[:, :, 8:10], torch.full_like(weight[:, :, 8:10], 0.5), atol=1e-6, rtol=0)
    assert torch.equal(weight[:, :, 10:], torch.zeros_like(weight[:, :, 10:]))
    torch.testing.assert_close(output.refined[:, :, :8], opt_v1[:, :, :8], atol=0, rtol=0)  # Stage 1's own pixels
    half = 0.5 * (expected.refined[:, :, 8:10] + opt_v1[:, :, 8:10])
    torch.testing.assert_close(output.refined[:, :, 8:10], half, atol=1e-6, rtol=0)
    assert torch.equal(output.refined[:, :, 10:], expected.refined[:, :, 10:])  # elsewhere: the refiner's output
    assert float((expected.refined[:, :, :8] - opt_v1[:, :, :8]).abs().max()) > 1e-3  # it would have changed them


def test_with_both_rules_a_pixel_keeps_the_larger_weight():
    torch.manual_seed(0)
    model = awake(Stage2RefinerModel(tiny_refiner_config(out_of_range_fallback=True, near_black_fallback=True)))
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    opt_v1 = with_dark_stripe(0.2 + 0.2 * opt_v1)
    opt_v1[:, :, 20:] = 0.8  # snow: outside the training spectra below
    set_spectral_range(model, fit_spectral_range(lambda: [(opt_v1[:, :, 8:20], None)], 0.05, quantile=0.9))
    with torch.no_grad():
        output = model(opt_v1, month, biome)
        out_of_range = model.spectral_range(opt_v1)
    near_black = near_black_weight(opt_v1, (RED, NIR), NEAR_BLACK_THRESHOLD, NEAR_BLACK_RAMP)
    assert float(near_black[:, :, :8].min()) == 1.0 and float(out_of_range[:, :, 20:].min()) == 1.0
    assert 0 < float((out_of_range[:, :, 8:20] > 0).double().mean()) < 0.5  # the fit's 10 % tail
    torch.testing.assert_close(output.out_of_range_weight, torch.maximum(out_of_range, near_black), atol=0, rtol=0)
    torch.testing.assert_close(output.refined[:, :, :8], opt_v1[:, :, :8], atol=0, rtol=0)
    torch.testing.assert_close(output.refined[:, :, 20:], opt_v1[:, :, 20:], atol=0, rtol=0)


def test_the_dark_pixels_give_the_refiner_no_gradient():
    """In training the loss at a kept pixel cannot pull the refiner (its output there is `opt_v1`)."""
    _, guarded = pair()
    guarded.train()
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28))
    opt_v1 = with_dark_stripe(0.2 + 0.2 * opt_v1)
    refined = guarded(opt_v1, month, biome).refined
    dark_only = refined[:, :, :8].sum()
    dark_only.backward(retain_graph=True)
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in guarded.parameters())
    refined[:, :, 10:].sum().backward()
    assert float(guarded.head.output_projection.weight.grad.abs().max()) > 0


def test_a_saved_refiner_keeps_the_rule_and_one_saved_before_it_loads_without(tmp_path):
    _, guarded = pair()
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    opt_v1 = with_dark_stripe(0.2 + 0.2 * opt_v1)
    guarded.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["near_black_fallback"] is True and saved["near_black_threshold"] == NEAR_BLACK_THRESHOLD
    reloaded = Stage2RefinerModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        expected, actual = guarded(opt_v1, month, biome), reloaded(opt_v1, month, biome)
    torch.testing.assert_close(actual.refined, expected.refined, atol=0, rtol=0)
    torch.testing.assert_close(actual.out_of_range_weight, expected.out_of_range_weight, atol=0, rtol=0)
    # A refiner saved before the option: its config has no such key, and it keeps nothing.
    folder = FIXTURES / "refiner_v0"
    assert "near_black_fallback" not in json.loads((folder / "config.json").read_text())
    old = Stage2RefinerModel.from_pretrained(folder).eval()
    assert old.config.near_black_fallback is False and not old.config.keeps_opt_v1
    assert old.config.near_black_keep == "pixel"


@pytest.mark.parametrize("quantization", ["none", "8bit"])
def test_the_rule_travels_with_the_adapter(quantization, tmp_path):
    from modeling_stage2.adapters import build_trainable_model, load_trained_model, save_trained_model

    torch.manual_seed(0)
    model = build_trainable_model(tiny_refiner_config(near_black_fallback=True), quantization=quantization,
                                  print_summary=False)
    awake(model.base_model.model)
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    opt_v1 = with_dark_stripe(0.2 + 0.2 * opt_v1)
    model.eval()
    with torch.no_grad():
        expected = model(opt_v1, month, biome)
    torch.testing.assert_close(expected.refined[:, :, :8], opt_v1[:, :, :8], atol=0, rtol=0)
    save_trained_model(model, tmp_path / "saved")
    reloaded = load_trained_model(tmp_path / "saved", quantization=quantization)
    assert reloaded.config.near_black_fallback
    with torch.no_grad():
        actual = reloaded(opt_v1, month, biome)
    torch.testing.assert_close(actual.out_of_range_weight, expected.out_of_range_weight, atol=0, rtol=0)
    torch.testing.assert_close(actual.refined, expected.refined, atol=1e-6, rtol=0)
    assert float((actual.refined[:, :, 10:] - opt_v1[:, :, 10:]).abs().max()) > 1e-3


def test_training_builds_the_refiner_the_flag_asks_for(tmp_path):
    from inference_stage2.predict import reports_out_of_range_weight
    from training.args import Stage2TrainingArguments
    from training.train import parse_args, refiner_config

    arguments = dict(output_dir=str(tmp_path), quantization="none", report_to="none")
    assert not refiner_config(Stage2TrainingArguments(**arguments)).near_black_fallback  # off by default
    training_args = parse_args(["--output_dir", str(tmp_path), "--near_black_fallback", "true",
                                "--refiner_config_overrides", json.dumps({"near_black_threshold": 0.03})],
                               without_devices=True)[0]
    config = refiner_config(training_args)
    assert config.near_black_fallback and config.near_black_threshold == 0.03
    assert reports_out_of_range_weight(Stage2RefinerModel(tiny_refiner_config(near_black_fallback=True)))
    assert not reports_out_of_range_weight(Stage2RefinerModel(tiny_refiner_config()))


def test_the_rule_and_the_studies_mean_the_same_near_black(repo_root, monkeypatch):
    """`bench/study_quality.py` reports NDVI without near-black target pixels under its own constant (it does not load
    the model); the refiner's default threshold is that value."""
    monkeypatch.syspath_prepend(str(repo_root))
    from bench import study_quality

    assert study_quality.NEAR_BLACK == NEAR_BLACK_THRESHOLD
    assert study_quality.VARIANT_FLAGS["near_black"] == ["--near_black_fallback", "true"]
    assert study_quality.VARIANT_FLAGS["near_black_ndvi"] == ["--near_black_fallback", "true", "--near_black_keep",
                                                              "ndvi"]


# ------------------------------------------------------------------------------------------------ near_black_keep="ndvi"
def red_share(image: torch.Tensor) -> torch.Tensor:
    return image[:, RED] / (image[:, RED] + image[:, NIR])


def test_keeping_only_ndvi_splits_the_refined_red_and_nir_as_opt_v1_does():
    """At a kept pixel: `opt_v1`'s NDVI, the refiner's red + NIR sum, blue and green; half way on the ramp; the
    refiner's own output elsewhere. The weight it reports is the whole-pixel rule's."""
    plain, whole = pair(spectral_correction="affine", spectral_mlp_hidden_size=8)
    ndvi_only = Stage2RefinerModel(tiny_refiner_config(near_black_fallback=True, near_black_keep="ndvi",
                                                       spectral_correction="affine", spectral_mlp_hidden_size=8))
    ndvi_only.load_state_dict(plain.state_dict())
    ndvi_only.eval()
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    opt_v1 = 0.2 + 0.5 * opt_v1
    opt_v1[:, :, :8] = 0.005 + 0.01 * opt_v1[:, :, :8]  # water: red + NIR 0.012-0.03, an NDVI of its own per pixel
    opt_v1[:, NIR, :8] *= 0.6
    opt_v1[:, :, 8:10] = 0.015  # red + NIR 0.03: half way
    with torch.no_grad():
        expected, kept_whole = plain(opt_v1, month, biome), whole(opt_v1, month, biome)
        output = ndvi_only(opt_v1, month, biome)
    torch.testing.assert_close(output.out_of_range_weight, kept_whole.out_of_range_weight, atol=0, rtol=0)
    weight = output.out_of_range_weight[:, 0]
    dark = weight == 1
    assert int(dark.sum()) > 100 and bool((weight[:, 10:] == 0).all())
    refined, own = output.refined, expected.refined
    # Blue, green and the red + NIR sum are the refiner's everywhere; only the split of red + NIR changed.
    torch.testing.assert_close(refined[:, :RED], own[:, :RED], atol=0, rtol=0)
    torch.testing.assert_close(refined[:, RED] + refined[:, NIR], own[:, RED] + own[:, NIR], atol=1e-6, rtol=0)
    torch.testing.assert_close(red_share(refined)[dark], red_share(opt_v1)[dark], atol=1e-5, rtol=0)
    assert float((red_share(own) - red_share(opt_v1))[dark].abs().max()) > 0.05  # the refiner had moved it
    half = 0.5 * (red_share(own) + red_share(opt_v1))
    torch.testing.assert_close(red_share(refined)[:, 8:10], half[:, 8:10], atol=1e-5, rtol=0)
    torch.testing.assert_close(refined[:, :, 10:], own[:, :, 10:], atol=0, rtol=0)
    # The whole-pixel rule gives blue and green back to opt_v1 as well: what "ndvi" leaves to the refiner.
    assert float((kept_whole.refined[:, :RED] - refined[:, :RED])[:, :, :8].abs().max()) > 1e-3


def test_keeping_only_ndvi_splits_evenly_where_opt_v1_is_black_and_saves_and_trains(tmp_path):
    from modeling_stage2.modeling_stage2 import keep_opt_v1_ndvi
    from training.args import Stage2TrainingArguments
    from training.train import parse_args, refiner_config

    output = torch.tensor([0.1, 0.2, 0.03, 0.01]).view(1, 4, 1, 1).repeat(1, 1, 1, 3)
    opt_v1 = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.004, 0.001], [0.0, 0.0, 0.004, 0.001]]).T
    opt_v1 = opt_v1.reshape(1, 4, 1, 3)
    weight = torch.tensor([1.0, 1.0, 0.25]).view(1, 1, 1, 3)
    kept = keep_opt_v1_ndvi(output, opt_v1, weight, (RED, NIR))
    torch.testing.assert_close(kept[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.02, 0.02]))  # black: an even split
    torch.testing.assert_close(kept[0, :, 0, 1], torch.tensor([0.1, 0.2, 0.032, 0.008]))  # opt_v1's 4:1
    torch.testing.assert_close(kept[0, :, 0, 2], torch.tensor([0.1, 0.2, 0.0305, 0.0095]))  # a quarter of the way
    # L2A reflectance dips below 0 over water: a negative red is no share below 0 (NIR takes the sum), and a sum
    # at or below 0 has no split (an even one).
    negative = torch.tensor([[0.0, 0.0, -0.002, 0.010], [0.0, 0.0, -0.003, 0.001]]).T.reshape(1, 4, 1, 2)
    kept = keep_opt_v1_ndvi(output[..., :2], negative, torch.ones(1, 1, 1, 2), (RED, NIR))
    torch.testing.assert_close(kept[0, RED:, 0], torch.tensor([[0.0, 0.02], [0.04, 0.02]]), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match=r"near_black_keep must be one of \('pixel', 'ndvi'\)"):
        tiny_refiner_config(near_black_fallback=True, near_black_keep="bands")
    assert tiny_refiner_config().near_black_keep == "pixel"

    _, whole = pair()
    model = Stage2RefinerModel(tiny_refiner_config(near_black_fallback=True, near_black_keep="ndvi"))
    model.load_state_dict(whole.state_dict())
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["near_black_keep"] == "ndvi"
    reloaded = Stage2RefinerModel.from_pretrained(tmp_path / "saved").eval()
    inputs = tiny_inputs(batch=2, size=(28, 28))
    inputs = (with_dark_stripe(0.2 + 0.2 * inputs[0]), *inputs[1:])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*inputs).refined, model.eval()(*inputs).refined, atol=0, rtol=0)

    arguments = dict(output_dir=str(tmp_path), quantization="none", report_to="none")
    assert refiner_config(Stage2TrainingArguments(**arguments)).near_black_keep == "pixel"
    training_args = parse_args(["--output_dir", str(tmp_path), "--near_black_fallback", "true",
                                "--near_black_keep", "ndvi"], without_devices=True)[0]
    assert refiner_config(training_args).near_black_keep == "ndvi"


def test_with_both_rules_and_only_ndvi_kept_out_of_range_pixels_are_still_opt_v1_entirely():
    torch.manual_seed(0)
    model = awake(Stage2RefinerModel(tiny_refiner_config(out_of_range_fallback=True, near_black_fallback=True,
                                                         near_black_keep="ndvi")))
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    opt_v1 = with_dark_stripe(0.2 + 0.2 * opt_v1, red_nir=0.012)
    opt_v1[:, NIR, :8] *= 0.5  # dark pixels with an NDVI of their own
    # bright visible, dark NIR: outside the training spectra below, which hold the water and the land
    opt_v1[:, :, 20:] = torch.tensor([0.9, 0.9, 0.9, 0.02])[None, :, None, None]
    set_spectral_range(model, fit_spectral_range(lambda: [(opt_v1[:, :, :20], None)], 0.05, quantile=0.95))
    with torch.no_grad():
        output = model(opt_v1, month, biome)
        out_of_range = model.spectral_range(opt_v1)
    near_black = near_black_weight(opt_v1, (RED, NIR), NEAR_BLACK_THRESHOLD, NEAR_BLACK_RAMP)
    torch.testing.assert_close(output.out_of_range_weight, torch.maximum(out_of_range, near_black), atol=0, rtol=0)
    assert float(out_of_range[:, :, 20:].min()) == 1.0
    torch.testing.assert_close(output.refined[:, :, 20:], opt_v1[:, :, 20:], atol=0, rtol=0)  # the whole pixel
    dark = (near_black[:, 0] == 1) & (out_of_range[:, 0] == 0)
    assert int(dark.sum()) > 50
    torch.testing.assert_close(red_share(output.refined)[dark], red_share(opt_v1)[dark], atol=1e-5, rtol=0)
    assert float((output.refined[:, :RED] - opt_v1[:, :RED]).abs().amax(dim=1)[dark].max()) > 1e-3  # only NDVI kept
