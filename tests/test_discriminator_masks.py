"""The discriminator's side of `Stage2Trainer` and the valid-pixel mask: the masks the losses accept, and the mean
scores logged beside the LSGAN losses. Tiny tensors, no training run."""
from __future__ import annotations

import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from training.discriminator import PatchDiscriminator
from training.trainer import Stage2Trainer, _masked


def _images_and_mask():
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(2, 4, 32, 32, generator=generator)
    fake = torch.rand(2, 4, 32, 32, generator=generator)
    mask = torch.ones(2, 32, 32, dtype=torch.bool)
    mask[0, :, :8] = False
    mask[1] = False  # a tile without a valid pixel
    return real, fake, mask


def test_the_discriminator_input_takes_a_one_channel_mask_as_the_losses_do():
    """The losses accept a (B, 1, H, W) mask; the discriminator's input broadcast it to (B, B, 4, H, W)."""
    real, _, mask = _images_and_mask()
    masked = _masked(real, mask[:, None])
    assert masked.shape == real.shape
    assert torch.equal(masked, _masked(real, mask))
    assert torch.equal(masked[0, :, :, :8], torch.zeros(4, 32, 8)) and torch.equal(masked[1], torch.zeros(4, 32, 32))
    assert torch.equal(masked[0, :, :, 8:], real[0, :, :, 8:])
    assert _masked(real, None) is real


def _area_weights(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Valid fraction of the pixels each of size x size scores maps to (windows [floor(i n / s), ceil((i + 1) n / s)),
    as adaptive average pooling takes them), in float64."""
    side = mask.shape[-1]
    bounds = [(i * side // size, -(-(i + 1) * side // size)) for i in range(size)]
    valid = mask.double()
    return torch.stack([torch.stack([valid[:, r0:r1, c0:c1].mean(dim=(1, 2)) for c0, c1 in bounds], dim=-1)
                        for r0, r1 in bounds], dim=-2)[:, None]


def test_logged_discriminator_scores_are_means_over_the_patches_its_loss_counts():
    """`adversarial_real_score` / `adversarial_fake_score` weigh each patch score by its valid fraction, as the LSGAN
    losses logged beside them do: a tile without a valid pixel (which the losses leave out) does not count. Both the
    real and the fake image reach the discriminator with their invalid pixels at 0, and the loss's gradient is
    divided by the accumulation steps."""
    torch.manual_seed(0)
    real, fake, mask = _images_and_mask()  # tile 0: a quarter invalid; tile 1: nothing valid
    real, fake = torch.where(mask[:, None], real, 5.0), torch.where(mask[:, None], fake, -3.0)  # garbage where invalid
    discriminator = PatchDiscriminator(base_channels=8, num_layers=1)
    reference = copy.deepcopy(discriminator)
    trainer = SimpleNamespace(discriminator=discriminator, _window_components=defaultdict(list),
                              current_gradient_accumulation_steps=2, _step_has_nonfinite=False)
    Stage2Trainer._discriminator_backward(trainer, real, fake, mask)
    real_scores = reference(real * mask[:, None]).double()
    fake_scores = reference(fake * mask[:, None]).double()
    weights = _area_weights(mask, real_scores.shape[-1])  # tile 1: all 0
    assert weights[0].min() == 0 and weights[0].max() == 1 and 0 < weights[0, 0, 0, 3] < 1
    real_term = (weights * (real_scores - 1) ** 2).sum() / weights.sum()
    fake_term = (weights * fake_scores**2).sum() / weights.sum()
    expected_loss = 0.5 * (real_term + fake_term)
    logged = {name: values[0].item() for name, values in trainer._window_components.items()}
    assert logged["adversarial_discriminator"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert logged["adversarial_discriminator_real"] == pytest.approx(real_term.item(), rel=1e-5)
    assert logged["adversarial_discriminator_fake"] == pytest.approx(fake_term.item(), rel=1e-5)
    real_mean = float((weights * real_scores.detach()).sum() / weights.sum())
    fake_mean = float((weights * fake_scores.detach()).sum() / weights.sum())
    assert logged["adversarial_real_score"] == pytest.approx(real_mean, rel=1e-5)
    assert logged["adversarial_fake_score"] == pytest.approx(fake_mean, rel=1e-5)
    # what the plain mean over both tiles was: the empty tile's scores pulled it far off
    assert abs(logged["adversarial_real_score"] - real_scores.mean().item()) > 1e-3
    # the gradient is that of loss / accumulation steps (2), to the float rounding
    (expected_loss / 2).backward()
    for (name, parameter), expected in zip(discriminator.named_parameters(), reference.parameters()):
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-4, atol=1e-7, msg=name)
