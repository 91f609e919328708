"""Behaviour of the Stage 2 losses and the PatchGAN discriminator that plausible bugs used to get past the suite (a
mutation audit of `training/losses.py` and `training/discriminator.py`): the index floors reaching NDVI and EVI, the
Sobel magnitude over both directions and the edge term's mean over bands, the mask of the generator's adversarial term,
the LSGAN gradients, the degenerate-spectrum threshold, clear errors on bad inputs and weights; the discriminator's
forward against a functional reference, its init, config checks and files. Hand-computed values on a few pixels;
discriminators of a few channels."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from test_losses import pixels

from training.discriminator import CONFIG_NAME, WEIGHTS_NAME, PatchDiscriminator, PatchDiscriminatorConfig
from training.losses import (
    SpectralLoss,
    Stage2Loss,
    edge_l1,
    evi,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    ndvi,
    sobel_magnitude,
    spectral_angle,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- spectral terms
# NIR + R = 0.002: NDVI 0.001 / 0.002 = 0.5 at the default floor (1e-4), 0.001 / 0.01 = 0.1 at a floor of 0.01.
DARK = (0.0, 0.0, 0.0005, 0.0015)
# EVI denominator 0.2 + 0.6 - 1.6 + 1 = 0.2: 2.5 * 0.1 / 0.2 = 1.25, clipped to 1 at the default floor (0.01);
# 2.5 * 0.1 / 0.5 = 0.5 at a floor of 0.5.
BRIGHT_BLUE = (1.6 / 7.5, 0.0, 0.1, 0.2)
NIR_EQUALS_RED = (0.0, 0.0, 0.1, 0.1)  # NDVI and EVI 0 at any floor


def test_the_index_floors_reach_ndvi_and_evi_in_every_loss():
    """`ndvi_floor` / `evi_floor` of the losses (the knob the docs give for dark water pixels) must reach the index
    each belongs to; the defaults stay what they are."""
    refined, target = pixels(DARK, BRIGHT_BLUE), pixels(NIR_EQUALS_RED, NIR_EQUALS_RED)
    assert ndvi(refined)[0, 0, 0].item() == pytest.approx(0.5, rel=1e-9)
    assert ndvi(refined, floor=0.01)[0, 0, 0].item() == pytest.approx(0.1, rel=1e-9)
    assert evi(refined)[0, 0, 1].item() == 1.0
    assert evi(refined, floor=0.5)[0, 0, 1].item() == pytest.approx(0.5, rel=1e-9)
    first, second = torch.tensor([[[True, False]]]), torch.tensor([[[False, True]]])
    floors = {"ndvi_floor": 0.01, "evi_floor": 0.5}
    for loss_fn in (SpectralLoss(**floors), Stage2Loss(**floors)):
        arguments = (refined, target) if isinstance(loss_fn, SpectralLoss) else (refined, target, refined)
        assert loss_fn(*arguments, valid_mask=first)[1]["spectral/ndvi"].item() == pytest.approx(0.1, rel=1e-9)
        assert loss_fn(*arguments, valid_mask=second)[1]["spectral/evi"].item() == pytest.approx(0.5, rel=1e-9)
    assert SpectralLoss()(refined, target, valid_mask=second)[1]["spectral/evi"].item() == 1.0


def test_a_spectrum_pair_just_above_the_degenerate_product_keeps_its_angle():
    """Only |a| |b| <= 1e-12 is "no spectrum" (angle 0): 1e-5 against 1e-6 (product 1e-11) is a right angle."""
    a = pixels((1e-5, 0, 0, 0), (1e-7, 0, 0, 0))
    b = pixels((0, 1e-6, 0, 0), (0, 1e-6, 0, 0))
    assert spectral_angle(a, b)[0, 0].tolist() == pytest.approx([math.pi / 2, 0.0], abs=1e-9)
    assert spectral_angle(a.float(), b.float())[0, 0].tolist() == pytest.approx([math.pi / 2, 0.0], abs=1e-6)


def test_half_precision_passed_by_keyword_is_computed_in_float32():
    x = pixels(BRIGHT_BLUE, (0.05, 0.08, 0.1, 0.5), dtype=torch.float32)
    for index in (ndvi, evi):
        value = index(x=x.half())
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, index(x.half().float()), rtol=0, atol=0)


# ----------------------------------------------------------------------------- identity / edge guard
def test_the_sobel_magnitude_is_the_euclidean_norm_of_both_directions():
    """A plane rising 0.03 per column and 0.04 per row has a gradient of 0.05 per pixel (not 0.07, nor 0.03)."""
    rows, cols = torch.meshgrid(torch.arange(6.0, dtype=torch.float64), torch.arange(6.0, dtype=torch.float64),
                                indexing="ij")
    plane = (0.03 * cols + 0.04 * rows).expand(1, 4, 6, 6)
    interior = sobel_magnitude(plane)[0, :, 1:-1, 1:-1]
    torch.testing.assert_close(interior, torch.full_like(interior, 0.05), rtol=0, atol=1e-12)


def test_the_edge_term_is_the_mean_over_bands():
    """Band b rises 0.01 (b + 1) per column against a flat reference: per band the mean |S| is 7/8 of its slope (half
    on the two border columns of 8), and the term is the mean of the bands' (not the largest)."""
    slopes = torch.tensor([0.01, 0.02, 0.03, 0.04], dtype=torch.float64)
    refined = (slopes[:, None, None] * torch.arange(8.0, dtype=torch.float64)).expand(1, 4, 8, 8)
    flat = torch.full_like(refined, 0.2)
    assert edge_l1(refined, flat).item() == pytest.approx(0.025 * 7 / 8, rel=1e-9)


# ----------------------------------------------------------------------------- LSGAN
def _images(size: int = 4):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, 1, 4, size, size, generator=generator)


def test_the_objective_weighs_its_adversarial_term_by_the_valid_mask():
    """Stage2Loss must hand `valid_mask` to the generator's LSGAN term: the right half of the 4x4 tile is invalid, so
    only the left column of the 2x2 score map counts ((0 - 1)^2 = 1), not the mean over all four scores (0.5)."""
    refined, target, opt_v1 = _images()
    fake = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True
    _, parts = Stage2Loss()(refined, target, opt_v1, valid_mask=mask, fake_scores=fake)
    assert parts["adversarial/generator"].item() == pytest.approx(1.0)
    _, parts = Stage2Loss()(refined, target, opt_v1, fake_scores=fake)
    assert parts["adversarial/generator"].item() == pytest.approx(0.5)
    # a (B, 1, H, W) mask is the same mask for the patch weights as for the pixel losses
    assert lsgan_generator_loss(fake, mask[:, None])[0].item() == pytest.approx(1.0)
    assert lsgan_discriminator_loss(fake, fake, mask[:, None])[0].item() == pytest.approx(0.5 * (1.0 + 0.0))


def test_the_lsgan_gradients_pull_scores_to_their_targets():
    """Known gradients over n = 4 scores: the generator's term (weight w) pulls fake scores to 1 (w 2 (s - 1) / n);
    the discriminator's pulls real ones to 1 and fake ones to 0 (0.5 * 2 (s - t) / n)."""
    values = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])
    refined, target, opt_v1 = _images()
    fake = values.clone().requires_grad_()
    total, _ = Stage2Loss(adversarial_weight=0.3)(refined, target, opt_v1, fake_scores=fake)
    total.backward()
    torch.testing.assert_close(fake.grad, 0.3 * 2 * (values - 1) / 4)
    real, fake = values.clone().requires_grad_(), (values + 1).requires_grad_()
    lsgan_discriminator_loss(real, fake)[0].backward()
    torch.testing.assert_close(real.grad, (values - 1) / 4)
    torch.testing.assert_close(fake.grad, (values + 1) / 4)


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_to_the_losses_raise_clear_errors():
    with pytest.raises(ValueError, match=r"x has shape \(1, 4, 8\); expected \(B, 4, H, W\)"):
        ndvi(torch.rand(1, 4, 8))
    with pytest.raises(ValueError, match="x has dtype torch.int64; expected a floating dtype"):
        evi(torch.ones(1, 4, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="same shape"):
        spectral_angle(torch.rand(1, 4, 1, 2), torch.rand(1, 4, 1, 1))
    scores = torch.rand(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"real_scores \(2, 1, 2, 2\) and fake_scores \(2, 1, 2, 3\)"):
        lsgan_discriminator_loss(scores, torch.rand(2, 1, 2, 3))
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"scores have shape \(2, 4\); expected a \(B, 1, h, w\) patch map"):
        lsgan_generator_loss(torch.rand(2, 4), mask)
    with pytest.raises(ValueError, match="dtype torch.float32; expected a bool"):
        lsgan_generator_loss(scores, mask.float())
    with pytest.raises(ValueError, match=r"valid_mask has shape \(1, 4, 4\).*B = 2"):
        lsgan_discriminator_loss(scores, scores, mask[:1])


@pytest.mark.parametrize("value", [math.inf, math.nan, "0.5", -0.1])
def test_a_weight_that_is_not_a_finite_number_at_least_zero_is_refused(value):
    with pytest.raises(ValueError, match=r"edge_weight must be a finite number >= 0, got "):
        Stage2Loss(edge_weight=value)
    with pytest.raises(ValueError, match=r"reconstruction_weight must be a finite number >= 0"):
        Stage2Loss(reconstruction_weight=value)


@pytest.mark.parametrize("value", [0.0, -1e-4, math.nan, math.inf, "0.01"])
@pytest.mark.parametrize("loss_class", [SpectralLoss, Stage2Loss])
def test_an_index_floor_that_is_not_a_finite_number_above_zero_is_refused(loss_class, value):
    """A floor of 0 turns a valid pixel with NIR + R = 0 into 0 / 0 (a NaN loss found steps later): refused when the
    loss is built. A positive floor is kept as given."""
    with pytest.raises(ValueError, match=r"ndvi_floor must be a finite number > 0, got "):
        loss_class(ndvi_floor=value)
    with pytest.raises(ValueError, match=r"evi_floor must be a finite number > 0, got "):
        loss_class(evi_floor=value)
    loss = loss_class(ndvi_floor=0.01, evi_floor=1)
    spectral = loss if isinstance(loss, SpectralLoss) else loss.spectral
    assert (spectral.ndvi_floor, spectral.evi_floor) == (0.01, 1.0)


# ----------------------------------------------------------------------------- discriminator
def _reference_forward(model: PatchDiscriminator, x: torch.Tensor, slope: float) -> torch.Tensor:
    """The documented network in plain functional calls: conv 4x4 (stride 2, then stride 1 for the last two), instance
    norm (affine, statistics of each image) on all but the first and last, LeakyReLU(slope) on all but the last."""
    blocks = model.blocks
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        stride = 1 if i >= last - 1 else 2
        x = F.conv2d(x, block.conv.weight, block.conv.bias, stride=stride, padding=1)
        if 0 < i < last:
            x = F.instance_norm(x, weight=block.norm.weight, bias=block.norm.bias, eps=1e-5)
        if i < last:
            x = F.leaky_relu(x, slope)
    return x


def test_the_discriminator_matches_a_functional_reference_in_train_and_eval_mode():
    """Layer order (conv, norm, activation), the configured slope in every block, instance statistics per image (no
    running statistics: eval mode scores the same), and the widths' cap."""
    torch.manual_seed(0)
    model = PatchDiscriminator(base_channels=3, num_layers=3, negative_slope=0.3, max_channel_multiplier=2)
    assert [block.conv.out_channels for block in model.blocks] == [3, 6, 6, 6, 1]
    assert [block.conv.stride[0] for block in model.blocks] == [2, 2, 2, 1, 1]
    with torch.no_grad():
        for block in model.blocks[1:-1]:
            block.norm.weight.uniform_(0.5, 1.5)
            block.norm.bias.uniform_(-0.5, 0.5)
    x = torch.rand(2, 4, 40, 40)
    expected = _reference_forward(model, x, 0.3)
    assert expected.shape == (2, 1, 3, 3)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    model.eval()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert not any("running" in name for name in model.state_dict())


def test_the_discriminator_init_follows_its_config():
    model = PatchDiscriminator(base_channels=16, num_layers=2, init_std=0.1)
    for block in model.blocks:
        assert block.conv.weight.mean().abs() < 0.02 and abs(block.conv.weight.std().item() - 0.1) < 0.01
        assert block.conv.bias is None or torch.equal(block.conv.bias, torch.zeros_like(block.conv.bias))
    for block in model.blocks[1:-1]:
        assert torch.equal(block.norm.weight, torch.ones_like(block.norm.weight))
        assert torch.equal(block.norm.bias, torch.zeros_like(block.norm.bias))


@pytest.mark.parametrize("settings, field", [
    ({"num_layers": True}, "num_layers"), ({"base_channels": 8.0}, "base_channels"),
    ({"negative_slope": 1.0}, "negative_slope"), ({"negative_slope": -0.1}, "negative_slope"),
    ({"init_std": 0.0}, "init_std"), ({"init_std": -0.02}, "init_std"),
])
def test_bad_discriminator_settings_are_refused(settings, field):
    with pytest.raises(ValueError, match=f"PatchDiscriminatorConfig.{field} must be"):
        PatchDiscriminatorConfig(**settings)


def test_a_slope_of_zero_is_a_relu():
    model = PatchDiscriminator(base_channels=2, num_layers=1, negative_slope=0.0)
    assert all(block.activation.negative_slope == 0.0 for block in model.blocks[:-1])


def test_the_discriminator_files_sit_beside_the_generators_and_are_readable(tmp_path):
    """Fixed names that are not the generator's (`config.json`, `model.safetensors`, the adapter's), written with
    mode 0644 into a folder made on the way; the generator's files stay as they were."""
    assert (CONFIG_NAME, WEIGHTS_NAME) == ("discriminator_config.json", "discriminator.safetensors")
    folder = tmp_path / "checkpoint-2" / "nested"
    folder.mkdir(parents=True)
    generator_files = {"config.json": "{}\n", "model.safetensors": "weights", "adapter_model.safetensors": "adapter"}
    for name, text in generator_files.items():
        (folder / name).write_text(text)
    model = PatchDiscriminator(base_channels=2, num_layers=1)
    model.save_pretrained(folder)
    assert {name: (folder / name).read_text() for name in generator_files} == generator_files
    assert sorted(p.name for p in folder.iterdir()) == sorted([*generator_files, CONFIG_NAME, WEIGHTS_NAME])
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert os.stat(folder / name).st_mode & 0o777 == 0o644
    fresh = tmp_path / "not" / "yet"
    model.save_pretrained(fresh)
    assert sorted(p.name for p in fresh.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_a_failed_discriminator_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    import training.discriminator as discriminator_module

    def failing(state, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(discriminator_module, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        PatchDiscriminator(base_channels=2, num_layers=1).save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_loading_names_what_does_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    model = PatchDiscriminator(base_channels=2, num_layers=1)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    save_file({**state, "extra": torch.zeros(1)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['extra'\]"):
        PatchDiscriminator.from_pretrained(tmp_path)
    for text in ("null", "[1, 2]"):
        (tmp_path / CONFIG_NAME).write_text(text)
        with pytest.raises(ValueError, match=f"{CONFIG_NAME}: invalid discriminator config"):
            PatchDiscriminator.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(model.config.to_dict()))
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME} not found: expected a folder written by"):
        PatchDiscriminator.from_pretrained(tmp_path)
