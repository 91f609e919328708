"""The discriminator's side of `Stage2Trainer` and the valid-pixel mask: the masks the losses accept, and the mean
scores logged beside the LSGAN losses. Tiny tensors, no training run."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from training.discriminator import PatchDiscriminator
from training.losses import lsgan_discriminator_loss
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


def test_logged_discriminator_scores_are_means_over_the_patches_its_loss_counts():
    """`adversarial_real_score` / `adversarial_fake_score` weigh each patch score by its valid fraction, as the LSGAN
    losses logged beside them do: a tile without a valid pixel (which the losses leave out) does not count."""
    torch.manual_seed(0)
    real, fake, mask = _images_and_mask()
    mask[0] = True  # tile 0 all valid, tile 1 all invalid: the scores are those of tile 0 alone
    discriminator = PatchDiscriminator(base_channels=8, num_layers=1)
    trainer = SimpleNamespace(discriminator=discriminator, _window_components=defaultdict(list),
                              current_gradient_accumulation_steps=2, _step_has_nonfinite=False)
    Stage2Trainer._discriminator_backward(trainer, real, fake, mask)
    with torch.no_grad():
        real_scores, fake_scores = discriminator(real[:1]), discriminator(fake[:1])
        empty_tile_score = discriminator(torch.zeros(1, 4, 32, 32)).mean()
        expected_loss, _ = lsgan_discriminator_loss(real_scores, fake_scores)
    logged = {name: values[0].item() for name, values in trainer._window_components.items()}
    assert logged["adversarial_discriminator"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert logged["adversarial_real_score"] == pytest.approx(real_scores.mean().item(), rel=1e-5)
    assert logged["adversarial_fake_score"] == pytest.approx(fake_scores.mean().item(), rel=1e-5)
    # what the mean over both tiles was: the empty tile's score pulled it half-way
    both = (real_scores.mean().item() + empty_tile_score.item()) / 2
    assert abs(logged["adversarial_real_score"] - both) > 1e-3
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in discriminator.parameters())
