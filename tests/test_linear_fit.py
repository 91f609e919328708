"""The least-squares colour fit against numpy's float64 lstsq, and the mask shapes the training-split fits accept."""
import numpy as np
import pytest
import torch

from training.linear_fit import LinearColorFit
from training.spectral_range import fit_spectral_range


def _numpy_fit(opt_v1, target, valid):
    """The minimum-norm least-squares (matrix, bias) of the valid pixels, by numpy on the float64 design."""
    inputs = opt_v1.transpose(0, 2, 3, 1)[valid].astype(np.float64)
    outputs = target.transpose(0, 2, 3, 1)[valid].astype(np.float64)
    solution = np.linalg.lstsq(np.c_[inputs, np.ones(len(inputs))], outputs, rcond=None)[0]
    return solution[:-1].T, solution[-1]


def _tiles(rng, tiles=2, size=16):
    opt_v1 = rng.uniform(0.0, 0.5, (tiles, 4, size, size)).astype(np.float32)
    mix = rng.normal(size=(4, 4))
    target = np.einsum("ij,bjhw->bihw", mix, opt_v1) + 0.05 + 0.02 * rng.normal(size=opt_v1.shape)
    return opt_v1, target.astype(np.float32)


def test_the_fit_is_numpys_least_squares_of_the_valid_finite_pixels_in_any_batches():
    rng = np.random.default_rng(0)
    opt_v1, target = _tiles(rng, tiles=5)
    valid_mask = rng.uniform(size=(5, 16, 16)) > 0.3
    opt_v1[0, 1, 2, 3], target[3, 0, 4, 5] = np.nan, np.inf  # on valid pixels: they do not count either
    fit = LinearColorFit()
    for rows in (slice(0, 2), slice(2, 3), slice(3, 5)):
        fit.update(opt_v1[rows], target[rows], valid_mask[rows])
    result = fit.solve()
    valid = valid_mask & np.isfinite(opt_v1).all(axis=1) & np.isfinite(target).all(axis=1)
    matrix, bias = _numpy_fit(opt_v1, target, valid)
    assert result.pixels == int(valid.sum()) == int(valid_mask.sum()) - 2 and result.tiles == 5
    np.testing.assert_allclose(result.matrix.numpy(), matrix, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.bias.numpy(), bias, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_a_constant_band_gets_the_minimum_norm_fit(seed):
    """A band constant on every training pixel leaves one direction of (matrix, bias) undetermined. The float64 sums
    do not make the normal equations exactly singular (~1e-14 of their scale), and solved at that noise the direction
    took an arbitrary size: entries O(1) away from the minimum-norm fit (numpy's), which a band that varies on
    other tiles then multiplies."""
    rng = np.random.default_rng(seed)
    opt_v1, target = _tiles(rng)
    opt_v1[:, 2] = np.float32(rng.uniform(0.5, 1.0))
    fit = LinearColorFit()
    fit.update(opt_v1, target)
    result = fit.solve()
    matrix, bias = _numpy_fit(opt_v1, target, np.ones((2, 16, 16), dtype=bool))
    np.testing.assert_allclose(result.matrix.numpy(), matrix, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.bias.numpy(), bias, rtol=0, atol=1e-9)


@pytest.mark.parametrize("spread, atol", [(1e-4, 1e-6), (3e-5, 1e-4)])
def test_a_band_that_varies_little_is_still_fitted(spread, atol):
    """Only directions at float noise are dropped (`_RCOND`, ~1e-15 of the normal equations' scale for a constant
    band): a band varying by 1e-4 reflectance (normal equations at ~2e-9 of their scale, the bundled tiles' smallest
    at 7e-7) or by 3e-5 (~2e-10: a cut of 1e-9 would drop it) is determined, and an exact affine map is recovered."""
    rng = np.random.default_rng(0)
    opt_v1, _ = _tiles(rng)
    opt_v1[:, 2] = (0.3 + spread * rng.uniform(-1, 1, (2, 16, 16))).astype(np.float32)
    mix = rng.normal(size=(4, 4))
    target = np.einsum("ij,bjhw->bihw", mix, opt_v1.astype(np.float64)) + 0.05  # no noise: exact
    fit = LinearColorFit()
    fit.update(opt_v1, target)
    result = fit.solve()
    np.testing.assert_allclose(result.matrix.numpy(), mix, rtol=0, atol=atol)
    np.testing.assert_allclose(result.bias.numpy(), np.full(4, 0.05), rtol=0, atol=atol)


def test_few_valid_pixels_give_the_minimum_norm_fit_that_reproduces_them():
    rng = np.random.default_rng(1)
    opt_v1, target = _tiles(rng)
    valid_mask = np.zeros((2, 16, 16), dtype=bool)
    valid_mask[1, 3, 4:7] = True  # 3 pixels for 5 unknowns per band
    fit = LinearColorFit()
    fit.update(opt_v1, target, valid_mask)
    result = fit.solve()
    matrix, bias = _numpy_fit(opt_v1, target, valid_mask)
    np.testing.assert_allclose(result.matrix.numpy(), matrix, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.bias.numpy(), bias, rtol=0, atol=1e-9)
    corrected = result.apply(torch.from_numpy(opt_v1).double()).numpy()
    np.testing.assert_allclose(corrected.transpose(0, 2, 3, 1)[valid_mask],
                               target.transpose(0, 2, 3, 1)[valid_mask], rtol=0, atol=1e-6)


def test_the_spectral_range_refuses_a_mask_of_another_shape():
    """An (H, W) mask used to be broadcast to every tile of the batch, as `LinearColorFit.update` refuses to."""
    opt_v1 = torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4] = True
    with pytest.raises(ValueError, match=r"valid_mask must be \(batch, height, width\) = \(3, 8, 8\), got \(8, 8\)"):
        fit_spectral_range(lambda: [(opt_v1, mask)], log_offset=0.05)
    fitted = fit_spectral_range(lambda: [(opt_v1, mask.expand(3, 8, 8))], log_offset=0.05)
    assert fitted.pixels == 96 and fitted.tiles == 3
