"""Stage 2 losses: hand-computed values, an independent NDVI/EVI implementation, masks, and
finite values and gradients on adversarial inputs in fp32, fp16 inputs and bf16 autocast."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import (
    IdentityEdgeLoss,
    SpectralLoss,
    Stage2Loss,
    edge_l1,
    evi,
    identity_l1,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    mean_spectral_angle,
    ndvi,
    reconstruction_l1,
    sobel_magnitude,
    spectral_angle,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Two hand-checked pixels, band order B02 (blue), B03, B04 (red), B08 (NIR).
VEGETATION = (0.05, 0.08, 0.1, 0.5)  # NDVI 0.4/0.6 = 2/3; EVI 1.0/1.725
BARE = (0.1, 0.1, 0.3, 0.2)  # NDVI -0.1/0.5 = -0.2; EVI -0.25/2.25 = -1/9
BRIGHTER_NIR = (0.1, 0.1, 0.1, 0.3)  # NDVI 0.2/0.4 = 0.5; EVI 0.5/1.15


def pixels(*spectra, dtype=torch.float64) -> torch.Tensor:
    """(1, 4, 1, N) image whose columns are the given spectra."""
    return torch.tensor(spectra, dtype=dtype).T[None, :, None, :].contiguous()


# ----------------------------------------------------------------------------- indices
def test_ndvi_and_evi_hand_values():
    x = pixels(VEGETATION, BARE, BRIGHTER_NIR)
    assert ndvi(x)[0, 0].tolist() == pytest.approx([2 / 3, -0.2, 0.5], abs=1e-12)
    assert evi(x)[0, 0].tolist() == pytest.approx([1.0 / 1.725, -1 / 9, 0.5 / 1.15], abs=1e-12)


def _numpy_indices(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blue, red, nir = x[:, 0], x[:, 2], x[:, 3]
    return (nir - red) / (nir + red), 2.5 * (nir - red) / (nir + 6.0 * red - 7.5 * blue + 1.0)


def test_ndvi_evi_match_independent_numpy_formula():
    rng = np.random.default_rng(0)
    shape = (3, 1, 16, 16)
    x = np.concatenate(
        [rng.uniform(0.0, 0.15, shape), rng.uniform(0.0, 0.2, shape), rng.uniform(0.005, 0.3, shape), rng.uniform(0.02, 0.6, shape)],
        axis=1,
    )
    expected_ndvi, expected_evi = _numpy_indices(x)
    # The only departure from the formula is the documented clip to [-1, 1] (bright-blue pixels).
    assert np.abs(expected_ndvi).max() <= 1 and 0 < (np.abs(expected_evi) > 1).mean() < 0.1
    expected_evi = np.clip(expected_evi, -1, 1)
    np.testing.assert_allclose(ndvi(torch.from_numpy(x)).numpy(), expected_ndvi, rtol=0, atol=1e-12)
    np.testing.assert_allclose(evi(torch.from_numpy(x)).numpy(), expected_evi, rtol=0, atol=1e-12)
    # float32 inputs agree to float32 precision
    np.testing.assert_allclose(ndvi(torch.from_numpy(x).float()).numpy(), expected_ndvi, atol=1e-6)
    np.testing.assert_allclose(evi(torch.from_numpy(x).float()).numpy(), expected_evi, atol=1e-6)


def test_index_guards_on_zero_and_negative_denominators():
    # NDVI: NIR + R = 0 with NIR > R -> floored denominator, clipped to 1; all zeros -> 0.
    x = pixels((0.0, 0.0, -0.3, 0.3), (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.3, -0.3))
    assert ndvi(x)[0, 0].tolist() == [1.0, 0.0, -1.0]
    # EVI: NIR + 6R + 1 = 1.8, so blue 0.24 puts the denominator at 0. Just below and just above
    # the crossing the value is the same (+1): a one-sided floor keeps EVI continuous where a
    # sign-preserving clamp would jump from +1 to -1.
    crossing = [(blue, 0.0, 0.1, 0.2) for blue in (0.24 - 1e-4, 0.24, 0.24 + 1e-4, 1.0)]
    assert evi(pixels(*crossing))[0, 0].tolist() == [1.0, 1.0, 1.0, 1.0]
    # Between the floor and the clip the formula holds: denominator 0.02 -> 2.5 * 0.001 / 0.02.
    blue = (0.101 + 0.6 + 1.0 - 0.02) / 7.5
    assert evi(pixels((blue, 0.0, 0.1, 0.101)))[0, 0, 0].item() == pytest.approx(2.5 * 0.001 / 0.02, rel=1e-9)
    # Below the EVI floor (1e-2) the denominator is the floor: 0.005 -> 2.5 * 0.001 / 0.01, not / 0.005.
    blue = (0.101 + 0.6 + 1.0 - 0.005) / 7.5
    assert evi(pixels((blue, 0.0, 0.1, 0.101)))[0, 0, 0].item() == pytest.approx(2.5 * 0.001 / 0.01, rel=1e-9)
    # NDVI floor (1e-4, one DN): 2 DN and 1 DN keep the formula (1/3); NIR + R = 0.8 DN divides by the floor.
    dark = ndvi(pixels((0.0, 0.0, 1e-4, 2e-4), (0.0, 0.0, 2e-5, 6e-5)))[0, 0].tolist()
    assert dark == pytest.approx([1 / 3, 4e-5 / 1e-4], rel=1e-9)


# ----------------------------------------------------------------------------- spectral angle
def test_spectral_angle_hand_values():
    a = pixels((1, 0, 0, 0), (1, 1, 0, 0), (0.1, 0.2, 0.3, 0.4), (0.1, 0.2, 0.3, 0.4), (0, 0, 0, 0), (0.2, 0.1, 0.4, 0.3))
    b = pixels((0, 1, 0, 0), (1, 0, 0, 0), (0.2, 0.4, 0.6, 0.8), (-0.1, -0.2, -0.3, -0.4), (0.3, 0.1, 0.2, 0.5), (0.2, 0.1, 0.4, 0.3))
    angles = spectral_angle(a, b)[0, 0].tolist()
    assert angles == pytest.approx([math.pi / 2, math.pi / 4, 0.0, math.pi, 0.0, 0.0], abs=1e-12)
    assert angles[2] == 0.0 and angles[5] == 0.0  # parallel and identical spectra: exactly zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_angle_of_dark_spectra(dtype):
    # Spectra of a few DN (1e-4 reflectance each) are real data: their angle counts. Only |a| |b| <= 1e-12
    # (here 1e-7 * 1e-6) is "no spectrum", angle 0.
    a = pixels((1e-4, 0, 0, 0), (1e-4, 1e-4, 0, 0), (3e-4, 1e-4, 2e-4, 5e-4), (1e-7, 0, 0, 0), dtype=dtype)
    b = pixels((0, 1e-4, 0, 0), (1e-4, 0, 0, 0), (-3e-4, -1e-4, -2e-4, -5e-4), (0, 1e-6, 0, 0), dtype=dtype)
    assert spectral_angle(a, b)[0, 0].tolist() == pytest.approx([math.pi / 2, math.pi / 4, math.pi, 0.0], abs=1e-6)


def test_spectral_angle_matches_arccos_and_is_accurate_for_tiny_angles_in_fp32():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.01, 0.6, (2, 2, 4, 8, 8))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(spectral_angle(torch.from_numpy(a), torch.from_numpy(b)).numpy(), np.arccos(cos), atol=1e-10)
    # b at a known angle theta from a: b = cos(theta) a_hat + sin(theta) e_hat with e orthogonal to a.
    # acos(cos(theta)) in fp32 resolves only ~3e-4 rad (1e-5 comes out 0); atan2 stays within 1e-6.
    a_hat = np.array([0.1, 0.2, 0.3, 0.4]) / math.sqrt(0.3)
    e_hat = np.array([0.4, -0.3, 0.2, -0.1]) / math.sqrt(0.3)
    for theta in (1e-3, 1e-5):
        b_vec = math.cos(theta) * a_hat + math.sin(theta) * e_hat
        angle = spectral_angle(pixels(tuple(a_hat), dtype=torch.float32), pixels(tuple(b_vec), dtype=torch.float32))
        assert angle.item() == pytest.approx(theta, abs=1e-6)


# ----------------------------------------------------------------------------- loss values
def test_spectral_loss_hand_values_and_mask():
    target = pixels(VEGETATION, BARE)
    refined = pixels(VEGETATION, BRIGHTER_NIR)
    ndvi_err, evi_err = 0.5 - (-0.2), 0.5 / 1.15 - (-1 / 9)
    # angle between BRIGHTER_NIR and BARE: dot 0.11, norms sqrt(0.12) and sqrt(0.15)
    angle = math.acos(0.11 / math.sqrt(0.12 * 0.15))
    total, parts = SpectralLoss(ndvi_weight=1.0, evi_weight=2.0, sam_weight=3.0)(refined, target)
    assert parts["spectral/ndvi"].item() == pytest.approx(math.sqrt(ndvi_err**2 / 2), rel=1e-9)
    assert parts["spectral/evi"].item() == pytest.approx(math.sqrt(evi_err**2 / 2), rel=1e-9)
    assert parts["spectral/sam"].item() == pytest.approx(angle / 2, rel=1e-9)
    expected_total = math.sqrt(ndvi_err**2 / 2) + 2 * math.sqrt(evi_err**2 / 2) + 3 * angle / 2
    assert total.item() == pytest.approx(expected_total, rel=1e-9)
    # Masking the identical first pixel leaves one pixel: RMSE = |error|, SAM = angle.
    mask = torch.tensor([[[False, True]]])
    _, parts = SpectralLoss()(refined, target, valid_mask=mask)
    assert parts["spectral/ndvi"].item() == pytest.approx(ndvi_err, rel=1e-9)
    assert parts["spectral/evi"].item() == pytest.approx(evi_err, rel=1e-9)
    assert parts["spectral/sam"].item() == pytest.approx(angle, rel=1e-9)
    # a (B, 1, H, W) mask is the same mask
    assert SpectralLoss()(refined, target, valid_mask=mask[:, None])[1] == parts


def _ramp(width=8, height=8, slope=0.01) -> torch.Tensor:
    """(1, 4, H, W) image rising by `slope` per column in every band."""
    return (torch.arange(width, dtype=torch.float64) * slope).expand(1, 4, height, width).clone()


def test_sobel_magnitude_is_slope_per_pixel():
    magnitude = sobel_magnitude(_ramp())[0, 0]
    # interior: the slope; first and last columns (replicate padding): half of it
    assert magnitude[:, 1:-1] == pytest.approx(torch.full((8, 6), 0.01, dtype=torch.float64), abs=1e-12)
    assert magnitude[:, [0, -1]] == pytest.approx(torch.full((8, 2), 0.005, dtype=torch.float64), abs=1e-12)


def test_identity_edge_loss_hand_values_and_mask():
    refined, opt_v1 = _ramp(), torch.full((1, 4, 8, 8), 0.2, dtype=torch.float64)
    total, parts = IdentityEdgeLoss(identity_weight=2.0, edge_weight=10.0)(refined, opt_v1)
    # |0.01 j - 0.2| for j = 0..7 is 0.20, 0.19, ..., 0.13: mean 0.165
    assert parts["identity/l1"].item() == pytest.approx(0.165, rel=1e-9)
    # Sobel magnitudes: 0.01 inside, 0.005 on the two border columns; opt_v1 is flat
    assert parts["identity/edge"].item() == pytest.approx((6 * 0.01 + 2 * 0.005) / 8, rel=1e-9)
    assert total.item() == pytest.approx(2 * 0.165 + 10 * 0.07 / 8, rel=1e-9)
    # Column 3 invalid: identity over 7 columns; the edge term also drops the columns whose 3x3
    # window touches column 3 (2, 3, 4), leaving 0.005, 0.01, 0.01, 0.01, 0.005.
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    mask[:, :, 3] = False
    refined_with_garbage = refined.clone()
    refined_with_garbage[:, :, :, 3] = float("nan")
    _, parts = IdentityEdgeLoss()(refined_with_garbage, opt_v1, valid_mask=mask)
    assert parts["identity/l1"].item() == pytest.approx((1.32 - 0.17) / 7, rel=1e-9)
    assert parts["identity/edge"].item() == pytest.approx(0.04 / 5, rel=1e-9)


def test_reconstruction_l1_hand_values():
    refined = torch.full((1, 4, 2, 2), 0.3)
    target = torch.full((1, 4, 2, 2), 0.1)
    target[0, :, 0, 0] = 0.7  # error 0.4 on one pixel, 0.2 on three
    loss, parts = reconstruction_l1(refined, target)
    assert loss.item() == pytest.approx((0.4 + 3 * 0.2) / 4, rel=1e-6)
    assert parts == {"reconstruction/l1": pytest.approx(loss.item())}
    mask = torch.tensor([[[False, True], [True, True]]])
    assert reconstruction_l1(refined, target, mask)[0].item() == pytest.approx(0.2, rel=1e-6)


def test_lsgan_losses_hand_values_and_mask_weights():
    loss, parts = lsgan_generator_loss(torch.full((2, 1, 3, 3), 0.5))
    assert loss.item() == pytest.approx(0.25) and parts["adversarial/generator"].item() == pytest.approx(0.25)
    loss, parts = lsgan_discriminator_loss(torch.full((2, 1, 3, 3), 0.8), torch.full((2, 1, 3, 3), 0.3))
    assert loss.item() == pytest.approx(0.5 * (0.04 + 0.09))
    assert parts["adversarial/discriminator_real"].item() == pytest.approx(0.04)
    assert parts["adversarial/discriminator_fake"].item() == pytest.approx(0.09)
    assert lsgan_discriminator_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))[0].item() == 0.0
    # A 4x4 image whose right half is invalid maps to a 2x2 score map whose right column has
    # weight 0: only the left column (scores 0 -> (0 - 1)^2 = 1) counts.
    fake = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True
    assert lsgan_generator_loss(fake)[0].item() == pytest.approx(0.5)
    assert lsgan_generator_loss(fake, mask)[0].item() == pytest.approx(1.0)
    # One invalid pixel in the top-left cell: that score weighs 3/4.
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = False
    fake = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    assert lsgan_generator_loss(fake, mask)[0].item() == pytest.approx(0.75 / 3.75)


def test_stage2_loss_is_the_weighted_sum_of_its_components():
    torch.manual_seed(0)
    target, opt_v1 = torch.rand(2, 2, 4, 12, 12) * 0.5
    refined = (opt_v1 + 0.05 * torch.randn_like(opt_v1)).requires_grad_()
    fake_scores = torch.randn(2, 1, 3, 3)
    loss_fn = Stage2Loss(
        spectral_weight=0.7, identity_weight=0.3, adversarial_weight=0.2, reconstruction_weight=0.4,
        ndvi_weight=1.5, evi_weight=0.5, sam_weight=2.0, edge_weight=3.0,
    )
    total, parts = loss_fn(refined, target, opt_v1, fake_scores=fake_scores)
    assert set(parts) == {
        "spectral/ndvi", "spectral/evi", "spectral/sam", "identity/l1", "identity/edge",
        "reconstruction/l1", "adversarial/generator", "total",
    }
    assert all(not value.requires_grad for value in parts.values())
    expected = (
        0.7 * (1.5 * parts["spectral/ndvi"] + 0.5 * parts["spectral/evi"] + 2.0 * parts["spectral/sam"])
        + 0.3 * (parts["identity/l1"] + 3.0 * parts["identity/edge"])
        + 0.4 * parts["reconstruction/l1"]
        + 0.2 * parts["adversarial/generator"]
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["total"].item() == pytest.approx(total.item())
    # components equal the standalone functions
    assert parts["identity/l1"].item() == pytest.approx(identity_l1(refined, opt_v1).item(), rel=1e-6)
    assert parts["identity/edge"].item() == pytest.approx(edge_l1(refined, opt_v1).item(), rel=1e-6)
    assert parts["adversarial/generator"].item() == pytest.approx(((fake_scores - 1) ** 2).mean().item(), rel=1e-6)
    # no fake scores: no adversarial term; the default reconstruction weight (0, the design's objective) drops that
    # term from the total, which still logs it
    total, parts = Stage2Loss()(refined, target, opt_v1)
    assert "adversarial/generator" not in parts and parts["reconstruction/l1"] > 0
    expected = (parts["spectral/ndvi"] + parts["spectral/evi"] + parts["spectral/sam"]) + 0.5 * (
        parts["identity/l1"] + parts["identity/edge"]
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert torch.isfinite(refined.grad).all() and refined.grad.abs().sum() > 0


def test_the_target_terms_are_the_spectral_loss_and_the_weighted_reconstruction_l1():
    """What the warm start fits: the terms that compare the output with the target, weighted as in the objective;
    without a reconstruction term exactly the spectral loss (so a default warm start is the one it always was)."""
    torch.manual_seed(0)
    target, refined = torch.rand(2, 2, 4, 12, 12) * 0.5
    mask = torch.rand(2, 12, 12) > 0.2
    spectral, spectral_parts = SpectralLoss()(refined, target, mask)
    value, parts = Stage2Loss().target_terms(refined, target, mask)
    assert torch.equal(value, spectral) and parts.keys() == spectral_parts.keys()
    value, parts = Stage2Loss(spectral_weight=2.0, reconstruction_weight=5.0, identity_weight=3.0,
                              adversarial_weight=1.0).target_terms(refined, target, mask)
    l1 = (refined - target).abs().mean(dim=1)[mask].mean()
    assert set(parts) == {"spectral/ndvi", "spectral/evi", "spectral/sam", "reconstruction/l1"}
    assert value.item() == pytest.approx(2.0 * spectral.item() + 5.0 * l1.item(), rel=1e-6)
    assert 5.0 * l1.item() > 1e-3 * value.item()  # the L1 is a real share of the value the check above weighs


def test_the_target_terms_honour_a_spectral_weight_of_zero():
    """With spectral_weight 0 and no reconstruction term the objective has no term against the target, but the warm
    start was given the whole spectral loss to fit (a weight of 0 is not the constant factor Adam ignores)."""
    torch.manual_seed(0)
    target, refined = torch.rand(2, 2, 4, 12, 12) * 0.5
    refined.requires_grad_()
    assert Stage2Loss(spectral_weight=0.0)(refined, target, refined.detach())[0].item() == 0.0  # no target term
    value, _ = Stage2Loss(spectral_weight=0.0).target_terms(refined, target)
    value.backward()
    assert value.item() == 0.0 and torch.equal(refined.grad, torch.zeros_like(refined))


def test_design_default_weights():
    loss_fn = Stage2Loss()
    assert (loss_fn.spectral_weight, loss_fn.identity_weight, loss_fn.adversarial_weight) == (1.0, 0.5, 0.05)
    with pytest.raises(ValueError, match="adversarial_weight"):
        Stage2Loss(adversarial_weight=-1.0)


# ----------------------------------------------------------------------------- masks
def test_invalid_pixels_change_neither_value_nor_gradient():
    torch.manual_seed(0)
    target, opt_v1, refined = torch.rand(3, 2, 4, 16, 16) * 0.4
    mask = torch.ones(2, 16, 16, dtype=torch.bool)
    mask[0, 5:9, 2:6] = False
    mask[1, :, 12:] = False
    fake = torch.randn(2, 1, 4, 4)
    corrupted_target = torch.where(mask[:, None], target, torch.tensor(float("nan")))
    corrupted_refined = torch.where(mask[:, None], refined, torch.tensor(1e6))

    def run(refined_values, target_values):
        leaf = refined_values.clone().requires_grad_()
        total, parts = Stage2Loss()(leaf, target_values, opt_v1, valid_mask=mask, fake_scores=fake)
        total.backward()
        return total, parts, leaf.grad

    clean_total, clean_parts, clean_grad = run(refined, target)
    total, parts, grad = run(corrupted_refined, corrupted_target)
    assert torch.isfinite(total) and total.item() == pytest.approx(clean_total.item(), rel=1e-6)
    for name in clean_parts:
        assert parts[name].item() == pytest.approx(clean_parts[name].item(), rel=1e-6, abs=1e-9), name
    assert torch.isfinite(grad).all()
    assert torch.all(grad.permute(1, 0, 2, 3)[:, ~mask] == 0)
    torch.testing.assert_close(grad, clean_grad)


def test_all_invalid_batch_gives_zero_not_nan():
    refined = torch.rand(2, 4, 8, 8, requires_grad=True)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    total, parts = Stage2Loss()(refined, torch.rand(2, 4, 8, 8), torch.rand(2, 4, 8, 8), mask, fake_scores=torch.rand(2, 1, 2, 2))
    assert total.item() == 0.0 and all(value.item() == 0.0 for value in parts.values())
    total.backward()
    assert torch.equal(refined.grad, torch.zeros_like(refined))
    assert lsgan_discriminator_loss(torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2), mask)[0].item() == 0.0


def test_bad_inputs_raise_clear_errors():
    x = torch.rand(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"refined has shape \(1, 3, 8, 8\)"):
        Stage2Loss()(torch.rand(1, 3, 8, 8), x, x)
    with pytest.raises(ValueError, match="same shape"):
        Stage2Loss()(x, torch.rand(1, 4, 8, 9), x)
    with pytest.raises(ValueError, match="valid_mask has shape"):
        SpectralLoss()(x, x, valid_mask=torch.ones(1, 8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.bool"):
        SpectralLoss()(x, x, valid_mask=torch.ones(1, 8, 8))


# ----------------------------------------------------------------------------- adversarial inputs
def _adversarial_case(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(refined, target, opt_v1), (2, 4, 12, 12), float32."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 12, 12)
    rand = torch.rand(shape, generator=g) * 0.5
    if name == "zeros":
        return torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    if name == "identical_spectra":
        return rand.clone(), rand.clone(), rand.clone()
    if name == "nearly_identical_spectra":
        return rand + 1e-7, rand.clone(), rand - 1e-7
    if name == "refined_zero_target_not":
        return torch.zeros(shape), rand, rand
    if name == "constant_images":
        return torch.full(shape, 0.2), torch.full(shape, 0.3), torch.full(shape, 0.2)
    if name == "negative_reflectance":
        return rand - 0.3, -rand, rand - 0.25
    if name == "ndvi_denominator_zero":
        x = rand.clone()
        x[:, 3] = -x[:, 2]  # NIR = -R
        return x, x.flip(-1), rand
    if name == "evi_denominator_zero":
        x = rand.clone()
        x[:, 0] = (x[:, 3] + 6 * x[:, 2] + 1) / 7.5  # blue on the pole
        return x, x.flip(-2), x
    if name == "huge_values":
        return rand * 1e4, rand * 1e3, -rand * 1e4
    raise KeyError(name)


ADVERSARIAL_CASES = (
    "zeros", "identical_spectra", "nearly_identical_spectra", "refined_zero_target_not", "constant_images",
    "negative_reflectance", "ndvi_denominator_zero", "evi_denominator_zero", "huge_values",
)


@pytest.mark.parametrize("precision", ["fp32", "fp16_inputs", "bf16_autocast"])
@pytest.mark.parametrize("case", ADVERSARIAL_CASES)
def test_finite_values_and_gradients_on_adversarial_inputs(case, precision):
    refined, target, opt_v1 = _adversarial_case(case)
    leaf = refined.clone().requires_grad_()
    scores_leaf = torch.zeros(2, 1, 3, 3, requires_grad=True)
    mask = torch.ones(2, 12, 12, dtype=torch.bool)
    mask[1, :4] = False
    half = {"fp32": torch.float32, "fp16_inputs": torch.float16, "bf16_autocast": torch.bfloat16}[precision]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16_autocast" else torch.autocast("cpu", enabled=False)
    with context:
        refined_in, target_in, opt_v1_in, scores_in = (t.to(half) for t in (leaf, target, opt_v1, scores_leaf))
        total, parts = Stage2Loss()(refined_in, target_in, opt_v1_in, valid_mask=mask, fake_scores=scores_in)
        d_loss, _ = lsgan_discriminator_loss(scores_in, scores_in * 0.5, valid_mask=mask)
        per_pixel = ndvi(refined_in).sum() + evi(refined_in).sum() + spectral_angle(refined_in, target_in).sum()
        per_pixel = per_pixel + sobel_magnitude(refined_in).sum()
    assert total.dtype == torch.float32
    assert torch.isfinite(total) and torch.isfinite(d_loss) and torch.isfinite(per_pixel)
    assert all(torch.isfinite(value) for value in parts.values()), parts
    (total + d_loss + per_pixel).backward()
    assert torch.isfinite(leaf.grad).all(), f"{case}/{precision}: non-finite gradient"
    assert torch.isfinite(scores_leaf.grad).all()


def test_autocast_does_not_change_the_loss():
    torch.manual_seed(0)
    target, opt_v1, refined = torch.rand(3, 2, 4, 16, 16) * 0.4
    scores = torch.rand(2, 1, 3, 3)
    reference, _ = Stage2Loss()(refined, target, opt_v1, fake_scores=scores)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = Stage2Loss()(refined, target, opt_v1, fake_scores=scores)
    # fp32 inputs stay fp32: the Sobel convolution and the ratios did not drop to bf16
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(reference.item(), rel=1e-6)


def test_spectral_angle_gradient_is_bitwise_repeatable_without_deterministic_mode():
    """Resumed runs must reproduce an uninterrupted one bit for bit: the spectral angle's backward may not depend
    on thread timing even where torch's deterministic mode is off."""
    previous_threads, previous_mode = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    try:
        generator = torch.Generator().manual_seed(0)
        # one padded tile: with advanced indexing (index_put accumulation) this shape's backward differed run to run
        a = torch.rand(1, 4, 126, 126, generator=generator)
        b = torch.rand(1, 4, 126, 126, generator=generator)
        gradients = []
        for _ in range(20):
            x = a.clone().requires_grad_()
            mean_spectral_angle(x, b).backward()
            gradients.append(x.grad)
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_mode)
    assert all(torch.equal(gradients[0], g) for g in gradients[1:])
    assert gradients[0].abs().sum() > 0
