"""The refiner's spectral correction branch and the least-squares colour fit (issue: learn what a colour fit learns).

Known-answer tests: synthetic tiles whose `opt_v1` is a fixed band mix + gain + offset of the target plus noise.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_stage2 import Stage2RefinerModel
from training.linear_fit import LinearColorFit, set_shared_spectral_correction, spectral_corrections

from _refiner_helpers import tiny_inputs, tiny_refiner_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures"

# Reflectance spectra (B02, B03, B04, B08) of the materials the synthetic tiles are mixed from.
MATERIALS = torch.tensor([
    [0.03, 0.06, 0.04, 0.38],  # vegetation
    [0.09, 0.12, 0.15, 0.24],  # bare soil
    [0.05, 0.05, 0.03, 0.02],  # water
    [0.14, 0.15, 0.16, 0.19],  # built-up
])
# The Stage 1 generator of the known-answer tests: opt_v1 = MIX @ target + OFFSET + noise.
MIX = torch.tensor([
    [0.80, 0.15, 0.05, 0.00],
    [0.05, 0.85, 0.10, 0.00],
    [0.00, 0.10, 0.85, 0.05],
    [0.05, 0.05, -0.10, 0.70],
])
OFFSET = torch.tensor([0.030, 0.020, 0.010, -0.010])
NOISE = 0.004


def synthetic_targets(count: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """(count, 4, size, size) reflectance: smooth random abundance maps of the four materials, lit unevenly."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, len(MATERIALS), 4, 4, generator=generator) * 2.0
    abundance = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    abundance = torch.softmax(abundance, dim=1)
    # Illumination (slope, shade) varies smoothly too, so the pixels span every direction of the band space.
    coarse_light = torch.rand(count, 1, 3, 3, generator=generator) * 0.6 + 0.7
    light = torch.nn.functional.interpolate(coarse_light, size=(size, size), mode="bilinear", align_corners=False)
    return torch.einsum("bmhw,mc->bchw", abundance, MATERIALS) * light


def degrade(target: torch.Tensor, mix: torch.Tensor, offset: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(target.shape, generator=generator) * NOISE
    return torch.einsum("ij,bjhw->bihw", mix, target) + offset[None, :, None, None] + noise


def rmse(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output - target).pow(2).mean().sqrt())


def affine_model(**overrides) -> Stage2RefinerModel:
    torch.manual_seed(0)
    return Stage2RefinerModel(tiny_refiner_config(spectral_correction="affine", **overrides))


def train(model, opt_v1, target, month, biome, steps: int, learning_rate: float, batch: int = 8, seed: int = 0):
    """Adam on the reflectance MSE, linear learning-rate decay, fixed batches (the test's training loop)."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randperm(len(opt_v1), generator=generator)[:batch]
        refined = model(opt_v1[index], month[index], biome[index]).refined
        loss = torch.nn.functional.mse_loss(refined, target[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def refine(model, opt_v1, month, biome) -> torch.Tensor:
    return model(opt_v1, month, biome).refined


# ------------------------------------------------------------------------------------------------ the colour fit
def test_linear_fit_recovers_an_exact_affine_map_and_ignores_invalid_pixels():
    target = synthetic_targets(6, seed=1)
    inverse = torch.linalg.inv(MIX)
    opt_v1 = torch.einsum("ij,bjhw->bihw", MIX, target) + OFFSET[None, :, None, None]  # no noise: exact
    valid = torch.ones(6, 28, 28, dtype=torch.bool)
    valid[:, :3] = False
    opt_v1[:, :, :3] = 7.0  # invalid pixels with absurd values must not count
    opt_v1[0, 1, 10, 10] = float("nan")  # nor must non-finite ones
    fit = LinearColorFit()
    fit.update(opt_v1[:4], target[:4], valid[:4])
    fit.update(opt_v1[4:], target[4:], valid[4:])
    result = fit.solve()
    assert result.pixels == 6 * 25 * 28 - 1 and result.tiles == 6
    assert torch.allclose(result.matrix, inverse.double(), atol=1e-6)
    assert torch.allclose(result.bias, -(inverse.double() @ OFFSET.double()), atol=1e-7)
    assert rmse(result.apply(opt_v1[1:, :, 3:]), target[1:, :, 3:]) < 1e-6  # tile 0 holds the NaN pixel


def test_linear_fit_of_a_dataset_equals_the_fit_of_its_tensors(sample_dataset_dir):
    from datasets import load_from_disk

    train = load_from_disk(str(sample_dataset_dir))["train"]
    result = LinearColorFit.from_dataset(train)
    rows = train.with_format("torch")[:]
    direct = LinearColorFit()
    direct.update(rows["opt_v1"], rows["target"], rows["valid_mask"])
    expected = direct.solve()
    assert result.tiles == len(train) == expected.tiles and result.pixels == expected.pixels
    assert torch.allclose(result.matrix, expected.matrix, atol=1e-12)
    assert torch.allclose(result.bias, expected.bias, atol=1e-12)
    # It is the least-squares optimum: any nudge of the matrix raises the squared error of the valid pixels.
    valid = rows["valid_mask"][:, None].expand_as(rows["target"])
    error = lambda fit: float((fit.apply(rows["opt_v1"]) - rows["target"])[valid].double().pow(2).sum())  # noqa: E731
    nudged = type(result)(result.matrix + 1e-3 * torch.eye(4, dtype=torch.float64), result.bias, 0, 0)
    assert error(result) < error(nudged)


def test_linear_fit_without_pixels_says_so():
    with pytest.raises(ValueError, match="no valid pixel"):
        LinearColorFit().solve()
    with pytest.raises(ValueError, match=r"\(batch, 4, height, width\)"):
        LinearColorFit().update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("mask_shape", [(4, 4), (2, 1, 4, 4)])
def test_linear_fit_refuses_a_mask_of_another_shape(mask_shape):
    """An (H, W) mask was broadcast to every tile of the batch, silently; a (B, 1, H, W) one failed inside indexing."""
    with pytest.raises(ValueError, match=r"valid_mask must be \(batch, height, width\) = \(2, 4, 4\), got"):
        LinearColorFit().update(torch.rand(2, 4, 4, 4), torch.rand(2, 4, 4, 4),
                                torch.ones(mask_shape, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- the model branch
def test_config_default_keeps_the_model_without_the_branch():
    config = tiny_refiner_config()
    assert config.spectral_correction == "none"
    model = Stage2RefinerModel(config)
    assert model.spectral_correction is None
    assert not any("spectral_correction" in name for name in model.state_dict())
    with pytest.raises(ValueError, match="spectral_correction must be one of"):
        tiny_refiner_config(spectral_correction="matrix")
    with pytest.raises(ValueError, match="spectral_correction_hidden_size"):
        tiny_refiner_config(spectral_correction_hidden_size=0)


def test_a_model_saved_before_the_branch_loads_and_computes_the_same(tmp_path):
    folder = FIXTURES / "refiner_v0"
    assert "spectral_correction" not in json.loads((folder / "config.json").read_text())
    model = Stage2RefinerModel.from_pretrained(folder).eval()
    assert model.config.spectral_correction == "none" and model.spectral_correction is None
    expected = load_file(str(folder / "expected_io.safetensors"))
    output = model(expected["opt_v1"], expected["month"], expected["biome"])
    assert output.corrected is None
    torch.testing.assert_close(output.refined, expected["refined"], rtol=0, atol=1e-6)
    assert float((expected["refined"] - expected["opt_v1"]).abs().max()) > 0.1  # the fixture's head is awake
    model.save_pretrained(tmp_path / "resaved")  # saved again, it now says so explicitly
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["spectral_correction"] == "none"


def test_untrained_branch_returns_opt_v1_then_the_shared_correction_exactly():
    model = affine_model().eval()
    opt_v1, month, biome = tiny_inputs(batch=3, size=(40, 33))
    output = model(opt_v1, month, biome)
    assert torch.equal(output.refined, opt_v1) and torch.equal(output.corrected, opt_v1)
    matrix = torch.linalg.inv(MIX)
    bias = -(matrix @ OFFSET)
    model.spectral_correction.set_shared_correction(matrix, bias)
    expected = torch.einsum("ij,bjhw->bihw", matrix, opt_v1) + bias[None, :, None, None]
    output = model(opt_v1, month, biome)
    torch.testing.assert_close(output.refined, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(output.corrected, expected, rtol=0, atol=1e-6)
    assert model(opt_v1, month, biome, return_dict=False)[1] is not None  # (refined, corrected)
    with pytest.raises(ValueError, match=r"\(4, 4\) matrix"):
        model.spectral_correction.set_shared_correction(torch.eye(3), torch.zeros(3))


def test_nonnegative_output_clamps_at_zero_with_a_straight_through_gradient():
    assert tiny_refiner_config().nonnegative_output is False  # models saved before the option: unbounded
    with pytest.raises(ValueError, match="nonnegative_output must be True or False"):
        tiny_refiner_config(nonnegative_output="yes")
    model = affine_model(nonnegative_output=True).eval()
    model.spectral_correction.set_shared_correction(torch.eye(4), torch.full((4,), -0.05))  # darkens by 0.05
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    opt_v1 = opt_v1.clone().requires_grad_(True)
    refined = model(opt_v1, month, biome).refined
    expected = (opt_v1.detach() - 0.05).clamp(min=0.0)
    assert bool((opt_v1 < 0.05).any())  # some pixels would go negative
    torch.testing.assert_close(refined.detach(), expected, rtol=0, atol=1e-6)
    refined.sum().backward()  # d refined / d opt_v1 is the identity through the clamp
    torch.testing.assert_close(opt_v1.grad, torch.ones_like(opt_v1), rtol=0, atol=1e-6)
    unbounded = affine_model().eval()
    unbounded.spectral_correction.set_shared_correction(torch.eye(4), torch.full((4,), -0.05))
    assert float(unbounded(opt_v1.detach(), month, biome).refined.min()) < -0.04


def test_the_per_tile_correction_depends_on_month_biome_and_content():
    model = affine_model().eval()
    with torch.no_grad():
        model.spectral_correction.tile_correction.weight.normal_(std=0.05)
    opt_v1, _, _ = tiny_inputs(batch=2, size=(28, 28))
    pair = opt_v1[:1].expand(2, -1, -1, -1)
    by_month = model(pair, torch.tensor([1, 7]), torch.tensor([3, 3])).corrected
    by_biome = model(pair, torch.tensor([1, 1]), torch.tensor([3, 12])).corrected
    by_content = model(opt_v1, torch.tensor([1, 1]), torch.tensor([3, 3])).corrected
    for corrected in (by_month, by_biome):
        assert float((corrected[0] - corrected[1]).abs().max()) > 1e-3
    # The content changes the correction itself, not only the pixels it is applied to: apply tile 1's
    # correction, recovered by least squares from its output, to tile 0 and compare with tile 0's own.
    fit = LinearColorFit()
    fit.update(opt_v1[1:], by_content[1:])
    assert float((fit.solve().apply(opt_v1[:1]) - by_content[:1]).abs().max()) > 1e-3


@torch.no_grad()
def _reference_correction(branch, opt_v1, bands, features, metadata_features) -> torch.Tensor:
    """The documented per-tile correction in float64, from the branch's weights: (M + dM) opt_v1 + (b + db), dM and db
    from the MLP of [LN(mean features), LN(metadata), per-band mean, per-band std (population) of the normalised
    bands]."""
    def linear(layer, x):
        return x @ layer.weight.double().T + layer.bias.double()

    def layer_norm(norm, x):
        centred = x - x.mean(-1, keepdim=True)
        scaled = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
        return scaled * norm.weight.double() + norm.bias.double()

    normalised = bands.double().flatten(2)
    mean = normalised.mean(-1)
    spread = (normalised - mean[..., None]).pow(2).mean(-1).sqrt()
    context = torch.cat([layer_norm(branch.feature_norm, features.double().mean(dim=(1, 2))),
                         layer_norm(branch.metadata_norm, metadata_features.double()), mean, spread], dim=-1)
    correction = linear(branch.tile_correction, torch.nn.functional.gelu(linear(branch.context[0], context)))
    count = opt_v1.shape[1]
    matrix = branch.matrix.double() + correction[:, : count * count].reshape(-1, count, count)  # row i: output band i
    bias = branch.bias.double() + correction[:, count * count :]
    return (matrix[:, :, :, None] * opt_v1.double().flatten(2)[:, None]).sum(2).reshape(opt_v1.shape) \
        + bias[:, :, None, None]


def test_the_per_tile_correction_is_the_documented_affine_map_of_its_context():
    """(M + dM) x + (b + db) computed independently in float64 from the branch's inputs and weights: a transposed dM,
    context parts in another order or a sample standard deviation change the corrected bands by far more than 1e-5."""
    model = affine_model().eval()
    branch = model.spectral_correction
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        weight = branch.tile_correction.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
        branch.tile_correction.bias.copy_(torch.randn(20, generator=generator) * 0.01)
        branch.matrix.copy_(torch.linalg.inv(MIX))
        branch.bias.copy_(-(torch.linalg.inv(MIX) @ OFFSET))
    captured = []
    hook = branch.register_forward_hook(lambda module, args, output: captured.append((args, output)))
    opt_v1, month, biome = tiny_inputs(batch=3, size=(28, 28))
    with torch.no_grad():
        corrected = model(opt_v1, month, biome).corrected
    hook.remove()
    [(args, output)] = captured
    assert torch.equal(args[0], opt_v1) and torch.equal(output, corrected)
    expected = _reference_correction(branch, *args)
    torch.testing.assert_close(corrected.double(), expected, rtol=0, atol=1e-5)
    # dM and db are of the size the test needs to see: tile by tile they move the bands by far more than the tolerance
    shared = torch.einsum("ij,bjhw->bihw", branch.matrix.double(), opt_v1.double())
    shared = shared + branch.bias.double()[:, None, None]
    assert float((expected - shared).abs().amax(dim=(1, 2, 3)).min()) > 0.01
    # "shared": every tile gets (M, b), row i of M giving output band i
    shared_model = Stage2RefinerModel(tiny_refiner_config(spectral_correction="shared")).eval()
    shared_model.spectral_correction.set_shared_correction(branch.matrix.detach(), branch.bias.detach())
    with torch.no_grad():
        torch.testing.assert_close(shared_model(opt_v1, month, biome).corrected.double(), shared, rtol=0, atol=1e-6)


def test_known_answer_fixed_mix_reaches_the_least_squares_fit():
    """opt_v1 = fixed band mix + gain + offset of the target plus noise: trained from the identity for a bounded
    number of steps, the refiner's error on held-out tiles is within 10 % of the least-squares fit's."""
    target = synthetic_targets(48, seed=0)
    opt_v1 = degrade(target, MIX, OFFSET, seed=1)
    month = torch.full((48,), 6)
    biome = torch.full((48,), 4)
    fit = LinearColorFit()
    fit.update(opt_v1[:32], target[:32])
    fit = fit.solve()
    model = train(affine_model(), opt_v1[:32], target[:32], month[:32], biome[:32], steps=300, learning_rate=3e-3)
    held_out = slice(32, 48)
    fit_error = rmse(fit.apply(opt_v1[held_out]), target[held_out])
    start_error = rmse(opt_v1[held_out], target[held_out])
    refined_error = rmse(refine(model, opt_v1[held_out], month[held_out], biome[held_out]), target[held_out])
    assert fit_error < 0.25 * start_error  # the task: the mix is far from the identity
    assert refined_error <= 1.10 * fit_error, (refined_error, fit_error, start_error)


def test_known_answer_month_dependent_mix_beats_a_single_global_fit():
    """The mix depends on the month: one global fit cannot follow it, the refiner's month conditioning can."""
    target = synthetic_targets(64, seed=2)
    month = torch.tensor([1, 7] * 32)
    winter_mix = MIX.clone()
    winter_mix[3] = torch.tensor([0.15, 0.10, -0.05, 0.55])  # NIR much darker, contaminated by the visible bands
    winter_offset = torch.tensor([0.06, 0.045, 0.03, 0.0])  # and a strong haze
    opt_v1 = torch.where((month == 1)[:, None, None, None], degrade(target, winter_mix, winter_offset, seed=3),
                         degrade(target, MIX, OFFSET, seed=3))
    biome = torch.full((64,), 4)
    train_tiles, held_out = slice(0, 48), slice(48, 64)
    global_fit = LinearColorFit()
    global_fit.update(opt_v1[train_tiles], target[train_tiles])
    global_fit = global_fit.solve()
    model = affine_model()
    set_shared_spectral_correction(model, global_fit)  # the training default: start at the global fit
    model = train(model, opt_v1[train_tiles], target[train_tiles], month[train_tiles], biome[train_tiles],
                  steps=150, learning_rate=3e-3)
    fit_error = rmse(global_fit.apply(opt_v1[held_out]), target[held_out])
    refined_error = rmse(refine(model, opt_v1[held_out], month[held_out], biome[held_out]), target[held_out])
    swapped_error = rmse(refine(model, opt_v1[held_out], 8 - month[held_out], biome[held_out]), target[held_out])
    assert refined_error < 0.6 * fit_error, (refined_error, fit_error)
    assert swapped_error > 1.5 * refined_error  # it is the month that tells the two mixes apart


# ------------------------------------------------------------------------------------------ adapters and training
def test_lora_model_trains_and_saves_the_branch(tmp_path):
    from modeling_stage2.adapters import build_trainable_model, load_trained_model, save_trained_model

    model = build_trainable_model(tiny_refiner_config(spectral_correction="affine"), quantization="none",
                                  print_summary=False)
    assert "spectral_correction" in model.peft_config["default"].modules_to_save
    fit = LinearColorFit()
    target = synthetic_targets(4)
    fit.update(degrade(target, MIX, OFFSET, seed=0), target)
    fit = fit.solve()
    set_shared_spectral_correction(model, fit)
    trained = model.base_model.model.spectral_correction.modules_to_save["default"]
    assert spectral_corrections(model) == [trained]  # the copy peft trains and saves, not the frozen original
    assert trained.matrix.requires_grad
    torch.testing.assert_close(trained.matrix.detach(), fit.matrix.float())
    original = model.base_model.model.spectral_correction.original_module
    assert torch.equal(original.matrix.detach(), torch.eye(4))  # the frozen base is left as it was
    save_trained_model(model, tmp_path / "saved")
    reloaded = load_trained_model(tmp_path / "saved")
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(opt_v1, month, biome).refined, model(opt_v1, month, biome).refined,
                                   rtol=0, atol=0)
        torch.testing.assert_close(reloaded(opt_v1, month, biome).refined, fit.apply(opt_v1).float(),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_base_keeps_the_branch_in_full_precision(quantization, tmp_path):
    from modeling_stage2.adapters import build_trainable_model, load_trained_model, save_trained_model

    model = build_trainable_model(tiny_refiner_config(spectral_correction="affine", nonnegative_output=True),
                                  quantization=quantization, print_summary=False)
    branch = model.base_model.model.spectral_correction.modules_to_save["default"]
    assert type(branch.context[0]) is torch.nn.Linear and type(branch.tile_correction).__name__ == "Stage2ZeroInitLinear"
    assert branch.matrix.dtype == torch.float32 and branch.matrix.requires_grad
    with torch.no_grad():
        branch.tile_correction.weight.normal_(std=0.05)
        branch.bias.fill_(-0.02)
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    model.eval()
    with torch.no_grad():
        refined = model(opt_v1=opt_v1, month=month, biome=biome).refined
    assert float(refined.min()) >= 0.0 and bool((refined == 0).any())  # clamped where the offset went below 0
    save_trained_model(model, tmp_path / "saved")
    reloaded = load_trained_model(tmp_path / "saved", quantization=quantization)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(opt_v1, month, biome).refined, refined, rtol=0, atol=1e-6)


def test_a_lora_model_without_the_branch_saves_no_such_module():
    from modeling_stage2.adapters import build_trainable_model

    model = build_trainable_model(tiny_refiner_config(), quantization="none", print_summary=False)
    assert "spectral_correction" not in model.peft_config["default"].modules_to_save
    with pytest.raises(ValueError, match="no spectral correction branch"):
        set_shared_spectral_correction(model, LinearColorFit.solve(_one_pixel_fit()))


def _one_pixel_fit() -> LinearColorFit:
    fit = LinearColorFit()
    fit.update(torch.rand(1, 4, 3, 3), torch.rand(1, 4, 3, 3))
    return fit


def test_training_starts_the_branch_at_the_fit_of_the_training_split(sample_dataset_dir, tmp_path):
    from datasets import load_from_disk

    from training.args import Stage2TrainingArguments
    from training.warm_start import start_spectral_correction
    from training.trainer import CHECKPOINT_COMPLETE_NAME

    train_split = load_from_disk(str(sample_dataset_dir))["train"]
    arguments = dict(output_dir=str(tmp_path), quantization="none", report_to="none")
    model = affine_model()
    said = start_spectral_correction(model, train_split, Stage2TrainingArguments(spectral_correction_init="linear_fit",
                                                                                 **arguments))
    assert said == f"linear_fit of {len(train_split)} training tiles"
    expected = LinearColorFit.from_dataset(train_split)
    torch.testing.assert_close(model.spectral_correction.matrix.detach(), expected.matrix.float())
    identity = affine_model()
    assert start_spectral_correction(identity, train_split, Stage2TrainingArguments(
        spectral_correction_init="identity", **arguments)) == "identity"
    assert torch.equal(identity.spectral_correction.matrix.detach(), torch.eye(4))
    # "--resume latest" with no checkpoint yet is a fresh start: the fit is computed ...
    fresh = affine_model()
    assert start_spectral_correction(fresh, train_split, Stage2TrainingArguments(
        resume_from_checkpoint="latest", spectral_correction_init="linear_fit", **arguments)).startswith("linear_fit")
    # ... and with one, the checkpoint holds the correction: nothing is computed.
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / CHECKPOINT_COMPLETE_NAME).write_text('{"global_step": 4, "files": {}}')
    resumed = affine_model()
    assert start_spectral_correction(resumed, train_split, Stage2TrainingArguments(
        resume_from_checkpoint="latest", **arguments)) is None
    assert torch.equal(resumed.spectral_correction.matrix.detach(), torch.eye(4))
    assert start_spectral_correction(Stage2RefinerModel(tiny_refiner_config()), train_split,
                                     Stage2TrainingArguments(**arguments)) is None
    with pytest.raises(ValueError, match="spectral_correction_init must be one of"):
        Stage2TrainingArguments(spectral_correction_init="fit", **arguments)


def test_the_spectral_fit_lowers_the_spectral_loss_of_the_least_squares_fit(sample_dataset_dir):
    """The default start of training: the least-squares fit refined under the spectral loss (the training
    objective), deterministic for a seed, and never worse than where it started on the tiles it was fitted on."""
    from datasets import load_from_disk

    from modeling_stage2.modeling_stage2 import clamp_min_straight_through
    from training.args import Stage2TrainingArguments
    from training.linear_fit import fit_spectral_correction
    from training.losses import SpectralLoss
    from training.warm_start import start_spectral_correction

    train_split = load_from_disk(str(sample_dataset_dir))["train"]
    spectral = fit_spectral_correction(train_split, steps=60, seed=0)
    again = fit_spectral_correction(train_split, steps=60, seed=0)
    assert torch.equal(spectral.matrix, again.matrix) and torch.equal(spectral.bias, again.bias)
    least_squares = LinearColorFit.from_dataset(train_split)
    rows = train_split.with_format("torch")[:]

    def loss(fit) -> float:
        corrected = clamp_min_straight_through(fit.apply(rows["opt_v1"]), 0.0)
        return float(SpectralLoss()(corrected, rows["target"], rows["valid_mask"])[0])

    assert loss(spectral) < 0.95 * loss(least_squares), (loss(spectral), loss(least_squares))
    model = affine_model(nonnegative_output=True)
    said = start_spectral_correction(model, train_split, Stage2TrainingArguments(
        output_dir="unused", quantization="none", report_to="none"))
    assert said == f"spectral_fit of {len(train_split)} training tiles"  # the default
    assert not torch.allclose(model.spectral_correction.matrix.detach(), least_squares.matrix.float(), atol=1e-3)


def test_the_warm_start_fits_the_reconstruction_term_of_the_objective(sample_dataset_dir, monkeypatch):
    """With a `reconstruction_weight` the warm start fits the L1 to the target too, as training will: its correction
    lands nearer the target's reflectance than the spectral loss alone takes it. Without one it is the spectral fit
    to the bit, so the default start is the one every record was made with."""
    from datasets import load_from_disk

    import training.warm_start as warm_start
    from modeling_stage2.modeling_stage2 import clamp_min_straight_through
    from training.args import Stage2TrainingArguments
    from training.linear_fit import fit_spectral_correction
    from training.losses import SpectralLoss, Stage2Loss, reconstruction_l1

    train_split = load_from_disk(str(sample_dataset_dir))["train"]
    rows = train_split.with_format("torch")[:]
    spectral_only = fit_spectral_correction(train_split, loss=SpectralLoss(), steps=60, seed=0)
    default = fit_spectral_correction(train_split, loss=Stage2Loss().target_terms, steps=60, seed=0)
    assert torch.equal(default.matrix, spectral_only.matrix) and torch.equal(default.bias, spectral_only.bias)
    with_l1 = fit_spectral_correction(train_split, loss=Stage2Loss(reconstruction_weight=5.0).target_terms, steps=60,
                                      seed=0)

    def losses(fit) -> tuple[float, float]:
        corrected = clamp_min_straight_through(fit.apply(rows["opt_v1"]), 0.0)
        return (float(reconstruction_l1(corrected, rows["target"], rows["valid_mask"])[0]),
                float(SpectralLoss()(corrected, rows["target"], rows["valid_mask"])[0]))

    (l1_spectral, spectral_spectral), (l1_with, spectral_with) = losses(spectral_only), losses(with_l1)
    assert l1_with < 0.995 * l1_spectral, (l1_with, l1_spectral)  # 1 % here; float noise is 1e-6 of it
    assert spectral_with > spectral_spectral  # it traded some spectral loss for it: a fit of another objective

    seen = {}

    def fake_fit(split, loss, **kwargs):
        seen["loss"] = loss
        return LinearColorFit.from_dataset(split)

    monkeypatch.setattr(warm_start, "fit_spectral_correction", fake_fit)
    warm_start.start_spectral_correction(affine_model(), train_split, Stage2TrainingArguments(
        output_dir="unused", quantization="none", report_to="none", reconstruction_weight=5.0, spectral_weight=2.0))
    torch.manual_seed(0)
    refined, target = torch.rand(2, 1, 4, 8, 8)
    expected = Stage2Loss(spectral_weight=2.0, reconstruction_weight=5.0).target_terms(refined, target)[0]
    assert torch.equal(seen["loss"](refined, target)[0], expected)


def test_the_identity_guard_measures_the_head_against_the_corrected_image():
    """With the branch, the identity/edge guard compares the output with the colour-corrected opt_v1: a model whose
    correction moved the colours but whose head adds nothing pays no identity loss."""
    from training.losses import Stage2Loss
    from training.trainer import Stage2Trainer

    model = affine_model()
    model.spectral_correction.set_shared_correction(torch.linalg.inv(MIX), -(torch.linalg.inv(MIX) @ OFFSET))
    trainer = Stage2Trainer.__new__(Stage2Trainer)  # compute_loss needs only the loss and no discriminator
    trainer.loss_fn = Stage2Loss(adversarial_weight=0.0)
    trainer.discriminator = None
    target = synthetic_targets(2)
    opt_v1 = degrade(target, MIX, OFFSET, seed=0)
    inputs = {"opt_v1": opt_v1, "target": target, "month": torch.tensor([3, 4]), "biome": torch.tensor([1, 2])}
    model.train()
    trainer.compute_loss(model, inputs)
    assert float(trainer._pending_components["identity/l1"]) == 0.0
    assert float(trainer._pending_components["identity/edge"]) == 0.0
    # Without the branch the guard still measures against opt_v1 itself.
    plain = Stage2RefinerModel(tiny_refiner_config()).train()
    with torch.no_grad():
        plain.head.output_projection.bias.fill_(0.01)
    trainer.compute_loss(plain, inputs)
    assert float(trainer._pending_components["identity/l1"]) == pytest.approx(0.01, rel=1e-4)
