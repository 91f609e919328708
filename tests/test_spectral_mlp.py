"""The per-pixel spectral MLP and the shared (one-for-all-tiles) spectral correction (issue: refinement quality).

Known-answer test: synthetic tiles whose `opt_v1` is a band mix + offset of the target passed through a non-linear
tone curve, which no 4x4 + bias can undo and a per-pixel MLP can.
"""
from __future__ import annotations

import math

import pytest
import torch

from modeling_stage2 import Stage2RefinerModel
from modeling_stage2.modeling_stage2 import Stage2SpectralMLP
from training.linear_fit import LinearColorFit, set_shared_spectral_correction

from _refiner_helpers import tiny_inputs, tiny_refiner_config
from test_spectral_correction import MIX, OFFSET, degrade, refine, rmse, synthetic_targets, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mlp_model(**overrides) -> Stage2RefinerModel:
    torch.manual_seed(0)
    return Stage2RefinerModel(tiny_refiner_config(**{"spectral_mlp_hidden_size": 32, **overrides}))


def tone_curve(reflectance: torch.Tensor) -> torch.Tensor:
    """A saturating tone response, as a generator that compresses highlights has: steep in the dark, flat when
    bright (0.3 -> 0.27, 0.6 -> 0.39)."""
    return 0.6 * (1 - torch.exp(-reflectance.clamp(min=0) / 0.35))


# ------------------------------------------------------------------------------------------------ configuration
def test_config_default_has_no_mlp_and_checks_its_fields():
    config = tiny_refiner_config()
    assert config.spectral_mlp_hidden_size == 0  # models saved before the option load without it
    model = Stage2RefinerModel(config)
    assert model.spectral_mlp is None and not any("spectral_mlp" in name for name in model.state_dict())
    for bad in (-1, 1.5, "32", True):
        with pytest.raises(ValueError, match="spectral_mlp_hidden_size must be an integer >= 0"):
            tiny_refiner_config(spectral_mlp_hidden_size=bad)
    with pytest.raises(ValueError, match="spectral_mlp_num_layers must be a positive integer"):
        tiny_refiner_config(spectral_mlp_hidden_size=8, spectral_mlp_num_layers=0)
    with pytest.raises(ValueError, match="spectral_mlp_log_offset must be > 0"):
        tiny_refiner_config(spectral_mlp_log_offset=0.0)
    with pytest.raises(ValueError, match="spectral_correction must be one of"):
        tiny_refiner_config(spectral_correction="global")


def test_mlp_layers_and_initialisation():
    model = mlp_model(spectral_mlp_num_layers=3)
    mlp = model.spectral_mlp
    linears = [layer for layer in mlp.hidden if isinstance(layer, torch.nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(4, 32), (32, 32), (32, 32)]
    for layer in linears:  # std 1/sqrt(fan_in), not initializer_range: the GELUs start out of their linear range
        assert abs(float(layer.weight.detach().std()) - layer.in_features**-0.5) < 0.35 * layer.in_features**-0.5
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert torch.equal(mlp.output.weight, torch.zeros_like(mlp.output.weight))
    assert torch.equal(mlp.output.bias, torch.zeros_like(mlp.output.bias))


@torch.no_grad()
def test_untrained_mlp_returns_the_correction_and_its_residual_is_a_function_of_the_log_spectrum():
    model = mlp_model(spectral_correction="shared").eval()
    opt_v1, month, biome = tiny_inputs(batch=2, size=(30, 29))
    output = model(opt_v1, month, biome)
    assert torch.equal(output.refined, opt_v1) and torch.equal(output.corrected, opt_v1)
    model.spectral_mlp.output.weight.normal_(std=0.1)
    model.spectral_mlp.output.bias.fill_(0.01)
    mlp = model.spectral_mlp
    corrected = model(opt_v1, month, biome).corrected
    # Per pixel, from the log spectrum centred on 0.1, nothing else: recomputed here by hand.
    spectra = opt_v1.permute(0, 2, 3, 1)
    hidden = torch.log(spectra.clamp(min=0) + model.config.spectral_mlp_log_offset) - math.log(0.1)
    expected = spectra + mlp.output(mlp.hidden(hidden))
    torch.testing.assert_close(corrected, expected.permute(0, 3, 1, 2), rtol=0, atol=1e-6)
    # Neither the month, the biome nor a neighbour changes a pixel's correction.
    other = model(opt_v1, torch.tensor([12, 3]), torch.tensor([16, 0])).corrected
    assert torch.equal(other, corrected)
    shifted = opt_v1.clone()
    shifted[:, :, 0, 0] += 0.2
    moved = model(shifted, month, biome).corrected
    assert torch.equal(moved[:, :, 1:], corrected[:, :, 1:])
    assert float((moved[:, :, 0, 0] - corrected[:, :, 0, 0]).abs().max()) > 0.1


def test_shared_correction_is_one_affine_map_for_every_tile():
    model = mlp_model(spectral_correction="shared", spectral_mlp_hidden_size=0).eval()
    correction = model.spectral_correction
    assert not correction.per_tile and not hasattr(correction, "tile_correction")
    assert not any("tile_correction" in name or "context" in name for name in model.state_dict())
    matrix, bias = torch.linalg.inv(MIX), -(torch.linalg.inv(MIX) @ OFFSET)
    correction.set_shared_correction(matrix, bias)
    opt_v1, month, biome = tiny_inputs(batch=3, size=(28, 28))
    expected = torch.einsum("ij,bjhw->bihw", matrix, opt_v1) + bias[None, :, None, None]
    torch.testing.assert_close(model(opt_v1, month, biome).corrected, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(opt_v1, month.flip(0), biome.flip(0)).corrected, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ known answer
def test_known_answer_tone_curve_the_mlp_beats_the_least_squares_fit():
    """opt_v1 = tone_curve(mix + offset of the target) plus noise: a 4x4 + bias cannot undo the curve. Started at
    the least-squares fit, with only the spectral MLP trained (the head's output stays zero) for a bounded number
    of steps, the refiner lands well below the fit's error on held-out tiles: the MLP alone expresses the curve."""
    target = synthetic_targets(48, seed=4) * 1.6  # up to ~0.6 reflectance: into the curve's flat part
    opt_v1 = tone_curve(degrade(target, MIX, OFFSET, seed=5))
    month, biome = torch.full((48,), 6), torch.full((48,), 4)
    train_tiles, held_out = slice(0, 32), slice(32, 48)
    fit = LinearColorFit()
    fit.update(opt_v1[train_tiles], target[train_tiles])
    fit = fit.solve()
    model = mlp_model(spectral_correction="shared")
    set_shared_spectral_correction(model, fit)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("spectral_mlp."))
    model = train(model, opt_v1[train_tiles], target[train_tiles], month[train_tiles], biome[train_tiles],
                  steps=200, learning_rate=3e-3)
    assert torch.equal(model.head.output_projection.weight, torch.zeros_like(model.head.output_projection.weight))
    fit_error = rmse(fit.apply(opt_v1[held_out]), target[held_out])
    refined_error = rmse(refine(model, opt_v1[held_out], month[held_out], biome[held_out]), target[held_out])
    assert fit_error > 0.01  # the curve is strong enough that a linear fit leaves a real error
    assert refined_error < 0.7 * fit_error, (refined_error, fit_error)  # without the MLP: 1.0x


# ------------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_lora_model_trains_and_saves_the_mlp(quantization, tmp_path):
    from modeling_stage2.adapters import build_trainable_model, load_trained_model, save_trained_model

    model = build_trainable_model(tiny_refiner_config(spectral_correction="shared", spectral_mlp_hidden_size=16),
                                  quantization=quantization, print_summary=False)
    assert "spectral_mlp" in model.peft_config["default"].modules_to_save
    trained = model.base_model.model.spectral_mlp.modules_to_save["default"]
    assert isinstance(trained, Stage2SpectralMLP) and trained.output.weight.requires_grad
    assert trained.output.weight.dtype == torch.float32  # kept out of quantization
    with torch.no_grad():
        trained.output.weight.normal_(std=0.05)
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    model.eval()
    with torch.no_grad():
        refined = model(opt_v1=opt_v1, month=month, biome=biome).refined
    assert float((refined - opt_v1).abs().max()) > 1e-3
    save_trained_model(model, tmp_path / "saved")
    reloaded = load_trained_model(tmp_path / "saved", quantization=quantization)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(opt_v1, month, biome).refined, refined, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ warm start
def test_the_spectral_fit_also_fits_the_mlp_on_top_of_the_affine_map(sample_dataset_dir):
    """With a spectral MLP, training's default start fits it too, after and on top of the affine spectral fit: the
    affine part is the same as without the MLP, the MLP moves off zero, and the spectral loss on the tiles it was
    fitted on drops below the affine fit's. Deterministic for a seed."""
    from datasets import load_from_disk

    from modeling_stage2.modeling_stage2 import clamp_min_straight_through
    from training.args import Stage2TrainingArguments
    from training.linear_fit import fit_spectral_correction
    from training.losses import SpectralLoss
    from training.warm_start import start_spectral_correction

    train_split = load_from_disk(str(sample_dataset_dir))["train"]
    affine_only = fit_spectral_correction(train_split, steps=40, seed=0)
    mlps = [mlp_model(spectral_correction="shared").spectral_mlp for _ in range(2)]
    fits = [fit_spectral_correction(train_split, steps=40, seed=0, spectral_mlp=mlp) for mlp in mlps]
    for fit in fits:  # the affine map does not depend on the MLP fitted after it
        assert torch.equal(fit.matrix, affine_only.matrix) and torch.equal(fit.bias, affine_only.bias)
    assert torch.equal(mlps[0].output.weight, mlps[1].output.weight)
    assert float(mlps[0].output.weight.detach().abs().max()) > 1e-3
    rows = train_split.with_format("torch")[:]

    @torch.no_grad()
    def loss(correct) -> float:
        corrected = clamp_min_straight_through(correct(affine_only.apply(rows["opt_v1"])), 0.0)
        return float(SpectralLoss()(corrected, rows["target"], rows["valid_mask"])[0])

    assert loss(mlps[0]) < 0.97 * loss(lambda x: x), (loss(mlps[0]), loss(lambda x: x))
    # Through training's start: the MLP the model computes with is the one fitted.
    model = mlp_model(spectral_correction="shared", nonnegative_output=True)
    said = start_spectral_correction(model, train_split, Stage2TrainingArguments(
        output_dir="unused", quantization="none", report_to="none"))
    assert said == f"spectral_fit of {len(train_split)} training tiles"
    assert float(model.spectral_mlp.output.weight.detach().abs().max()) > 1e-3


def _fit_on(device: str, train_split) -> tuple[Stage2SpectralMLP, list[int]]:
    from training.linear_fit import fit_spectral_correction

    torch.manual_seed(0)
    mlp = mlp_model(spectral_correction="shared").spectral_mlp.to(device)
    ids = [id(parameter) for parameter in mlp.parameters()]
    fit_spectral_correction(train_split, steps=20, seed=0, spectral_mlp=mlp)
    return mlp, ids


def test_the_spectral_mlp_is_fitted_in_place_where_it_lives(sample_dataset_dir):
    """The fit runs on a CPU copy and writes back into the MLP's own parameters (the ones peft saves and the
    optimizer will get), on its own device."""
    from datasets import load_from_disk

    train_split = load_from_disk(str(sample_dataset_dir))["train"]
    mlp, ids = _fit_on("cpu", train_split)
    assert [id(parameter) for parameter in mlp.parameters()] == ids
    assert float(mlp.output.weight.detach().abs().max()) > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a quantized refiner is on the GPU from the start")
def test_a_spectral_mlp_on_the_gpu_is_fitted_to_the_bits_of_the_cpu_fit(sample_dataset_dir):
    from datasets import load_from_disk

    train_split = load_from_disk(str(sample_dataset_dir))["train"]
    on_cpu, _ = _fit_on("cpu", train_split)
    on_gpu, ids = _fit_on("cuda", train_split)
    assert [id(parameter) for parameter in on_gpu.parameters()] == ids
    for expected, fitted in zip(on_cpu.parameters(), on_gpu.parameters()):
        assert fitted.device.type == "cuda" and torch.equal(fitted.cpu(), expected)


class _GainPerLabel(torch.nn.Module):
    """A correction told each tile's label: a gain and an offset per label, starting at no change."""

    def __init__(self):
        super().__init__()
        self.gains = torch.nn.Parameter(torch.ones(2))
        self.offsets = torch.nn.Parameter(torch.zeros(2))

    def forward(self, spectra: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = label.long()
        return spectra * self.gains[label][:, None, None, None] + self.offsets[label][:, None, None, None]


def _labelled_tiles(true_gains=(1.0, 0.5)):
    """8 tiles whose `opt_v1` is their target times the gain of their label (0, 1, 0, 1, ...): no single colour map
    fits both labels."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    target = 0.05 + 0.4 * torch.rand(8, 4, 8, 8, generator=generator)
    labels = torch.arange(8) % 2
    opt_v1 = target * torch.tensor(true_gains)[labels][:, None, None, None]
    return Dataset.from_dict({"opt_v1": opt_v1.numpy(), "target": target.numpy(), "label": labels.tolist()})


def _l1(output, target, valid_mask):
    return ((output - target).abs().mean(),)


def test_the_spectral_mlp_can_be_told_a_column_of_each_tile():
    """`mlp_columns` hands each step's tiles' values of those columns to the MLP. Told its tiles' labels, a gain and
    an offset per label fit the tiles far better than the same correction told one label for all (the affine map
    cannot fit both labels' gains), and label 1's tiles, half as bright, get the larger gain; the affine map itself
    does not see the labels."""
    from training.linear_fit import fit_spectral_correction

    def fitted_error(tiles):
        correction = _GainPerLabel()
        affine = fit_spectral_correction(tiles, loss=_l1, steps=150, batch_tiles=8, mlp_batch_tiles=4,
                                         learning_rate=0.02, seed=0, spectral_mlp=correction, mlp_columns=("label",))
        rows = tiles.with_format("torch")[:]
        with torch.no_grad():
            told = correction(affine.apply(rows["opt_v1"]).float(), rows["label"])
        return float(_l1(told, rows["target"], None)[0]), correction.gains.detach(), affine

    tiles = _labelled_tiles()
    told_error, gains, affine = fitted_error(tiles)
    one_label_error, _, one_label_affine = fitted_error(tiles.map(lambda row: {"label": 0}))
    assert torch.equal(affine.matrix, one_label_affine.matrix) and torch.equal(affine.bias, one_label_affine.bias)
    assert told_error < 0.7 * one_label_error, (told_error, one_label_error)
    assert float(gains[1] / gains[0]) > 1.5, gains


def test_mlp_columns_are_checked_before_any_fit():
    from training.linear_fit import fit_spectral_correction

    tiles = _labelled_tiles()
    with pytest.raises(ValueError, match=r"mlp_columns \['preset'\] are not columns of the dataset"):
        fit_spectral_correction(tiles, loss=_l1, steps=2, spectral_mlp=_GainPerLabel(), mlp_columns=("preset",))
    with pytest.raises(ValueError, match="mlp_columns are inputs of the spectral MLP: pass spectral_mlp too"):
        fit_spectral_correction(tiles, loss=_l1, steps=2, mlp_columns=("label",))
