"""PatchGAN discriminator: output shape on 120x120 tiles, receptive field, configuration,
safetensors save/load, and that it learns with the LSGAN loss."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.discriminator import CONFIG_NAME, WEIGHTS_NAME, PatchDiscriminator, PatchDiscriminatorConfig
from training.losses import lsgan_discriminator_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_default_discriminator_on_a_120_pixel_tile():
    model = PatchDiscriminator(in_channels=4, base_channels=64, num_layers=3)
    scores = model(torch.rand(2, 4, 120, 120))
    # 120 -> 60 -> 30 -> 15 (stride 2) -> 14 -> 13 (4x4, stride 1, padding 1)
    assert scores.shape == (2, 1, 13, 13)
    assert model.output_size(120, 120) == (13, 13)
    assert model.receptive_field == 70  # the pix2pix "70x70 PatchGAN"
    widths = [block.conv.out_channels for block in model.blocks]
    assert widths == [64, 128, 256, 512, 1]


@pytest.mark.parametrize(
    "num_layers, base_channels, expected_side, expected_field",
    [(1, 8, 58, 16), (2, 8, 28, 34), (4, 4, 5, 142), (5, 4, 1, 286)],
)
def test_depth_and_width_are_configurable(num_layers, base_channels, expected_side, expected_field):
    model = PatchDiscriminator(base_channels=base_channels, num_layers=num_layers)
    assert model(torch.rand(1, 4, 120, 120)).shape == (1, 1, expected_side, expected_side)
    assert model.receptive_field == expected_field
    assert model.blocks[0].conv.out_channels == base_channels
    assert len(model.blocks) == num_layers + 2


def test_receptive_field_matches_the_gradient_footprint():
    """Through the convolutions, one score sees exactly `receptive_field` x `receptive_field` pixels.

    (Instance norm's statistics span the whole map, so they are taken out for this check.)
    """
    model = PatchDiscriminator(base_channels=4, num_layers=2)
    for block in model.blocks:
        block.norm = torch.nn.Identity()
    x = torch.rand(1, 4, 96, 96, requires_grad=True)
    scores = model(x)
    centre = scores.shape[-1] // 2
    scores[0, 0, centre, centre].backward()
    touched = x.grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = touched.any(dim=1).nonzero(), touched.any(dim=0).nonzero()
    assert int(rows.max() - rows.min() + 1) == model.receptive_field == 34
    assert int(cols.max() - cols.min() + 1) == model.receptive_field


def test_init_weights_and_norms():
    model = PatchDiscriminator(base_channels=32, num_layers=3, init_std=0.02)
    first = model.blocks[0].conv
    assert first.bias is not None and torch.all(first.bias == 0)
    assert model.blocks[1].conv.bias is None  # instance norm follows
    assert abs(first.weight.std().item() - 0.02) < 0.004
    assert isinstance(model.blocks[1].norm, torch.nn.InstanceNorm2d) and torch.all(model.blocks[1].norm.weight == 1)
    assert isinstance(model.blocks[0].norm, torch.nn.Identity) and isinstance(model.blocks[-1].norm, torch.nn.Identity)
    assert model.blocks[0].activation.negative_slope == 0.2
    assert isinstance(model.blocks[-1].activation, torch.nn.Identity)  # raw scores for the LSGAN loss


def test_save_and_load_as_safetensors(tmp_path):
    model = PatchDiscriminator(base_channels=8, num_layers=2)
    with torch.no_grad():
        model.blocks[1].norm.weight.add_(0.5)  # not the init value
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["num_layers"] == 2
    assert set(load_file(tmp_path / WEIGHTS_NAME)) == set(model.state_dict())
    loaded = PatchDiscriminator.from_pretrained(tmp_path)
    x = torch.rand(2, 4, 64, 64)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_loading_mismatched_files_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        PatchDiscriminator.from_pretrained(tmp_path)
    PatchDiscriminator(base_channels=8, num_layers=2).save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"base_channels": 16, "num_layers": 2}))
    with pytest.raises(ValueError, match="shape mismatches"):
        PatchDiscriminator.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"base_channels": 8, "depth": 2}))
    with pytest.raises(ValueError, match="unknown PatchDiscriminatorConfig keys"):
        PatchDiscriminator.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"base_channels": 8, "num_layers": 2}))
    state = load_file(tmp_path / WEIGHTS_NAME)
    state.pop("blocks.0.conv.weight")
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.conv.weight'\]"):
        PatchDiscriminator.from_pretrained(tmp_path)


def test_bad_config_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="num_layers"):
        PatchDiscriminatorConfig(num_layers=0)
    with pytest.raises(ValueError, match="negative_slope"):
        PatchDiscriminator(negative_slope=1.5)
    config = PatchDiscriminatorConfig(base_channels=8, num_layers=2)
    assert PatchDiscriminator.from_config(config).config == config
    assert PatchDiscriminator(4, 8, 2).config == config
    model = PatchDiscriminator(base_channels=4, num_layers=3)
    with pytest.raises(ValueError, match=r"expected \(B, 4, H, W\)"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="too small for num_layers=3"):
        model(torch.rand(1, 4, 16, 16))


def test_discriminator_learns_to_separate_real_from_fake():
    torch.manual_seed(0)
    model = PatchDiscriminator(base_channels=8, num_layers=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.999))
    smooth = torch.linspace(0, 0.5, 32).expand(8, 4, 32, 32)  # "real": smooth ramps
    losses = []
    for _ in range(30):
        real = smooth + 0.01 * torch.randn_like(smooth)
        fake = smooth + 0.2 * torch.randn_like(smooth)  # "fake": noisy
        loss, _ = lsgan_discriminator_loss(model(real), model(fake))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    with torch.no_grad():
        assert model(smooth).mean() > model(smooth + 0.2 * torch.randn_like(smooth)).mean() + 0.5


# ----------------------------------------------------------------------------- in the trainer
def test_the_logged_discriminator_terms_are_means_over_optimizer_steps(tmp_path, monkeypatch):
    """5 tiles, batches of 1, accumulation 2: windows of 2, 2 and 1 micro-batches. The discriminator's components
    were averaged over micro-batches (its last one counted half as much as the generator's), not over optimizer steps
    as the generator's components and the Trainer's loss are."""
    import datasets
    import numpy as np
    from _training_helpers import records, write_config
    from data_builders import make_eval_transform

    import training.losses
    from training.data import TileDataset
    from training.train import build_model, parse_args
    from training.trainer import Stage2Trainer

    seen = []  # (optimizer step, the discriminator's components of one micro-batch)

    def recording(real_scores, fake_scores, valid_mask=None):
        loss, components = lsgan_discriminator(real_scores, fake_scores, valid_mask)
        values = {name.replace("/", "_"): float(value) for name, value in components.items()}
        values.update(adversarial_real_score=float(real_scores.detach().mean()),
                      adversarial_fake_score=float(fake_scores.detach().mean()))
        seen.append((trainer.state.global_step, values))
        return loss, components

    lsgan_discriminator = training.losses.lsgan_discriminator_loss
    monkeypatch.setattr(training.losses, "lsgan_discriminator_loss", recording)
    rng = np.random.default_rng(0)
    target = rng.uniform(0.02, 0.4, (5, 4, 120, 120)).astype(np.float32)
    table = datasets.Dataset.from_dict({
        "target": target, "opt_v1": (target * 1.05 + rng.normal(0, 0.01, target.shape)).astype(np.float32),
        "month": [1, 2, 3, 4, 5], "biome": [0, 1, 2, 3, 4], "valid_mask": np.ones((5, 120, 120), bool)})
    config = write_config(tmp_path / "c.yaml", per_device_train_batch_size=1, gradient_accumulation_steps=2,
                          logging_steps=3, num_train_epochs=1, eval_every_epochs=None, save_every_epochs=None,
                          eval_strategy="no", save_strategy="no", max_samples=None, spectral_correction_init="identity")
    args = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])[0]
    trainer = Stage2Trainer(model=build_model(args, print_summary=False), args=args,
                            train_dataset=TileDataset(table, make_eval_transform()))
    trainer._get_train_sampler = lambda *arguments, **kwargs: torch.utils.data.SequentialSampler(range(5))
    trainer.train()
    assert [step for step, _ in seen] == [0, 0, 1, 1, 2] and trainer.disc_steps == 3
    [logged] = records(tmp_path / "out" / "training_log.jsonl", "train")
    for name in seen[0][1]:
        windows = [[values[name] for step, values in seen if step == window] for window in range(3)]
        assert logged[name] == pytest.approx(np.mean([np.mean(w) for w in windows]), rel=1e-5, abs=2e-6), name
    assert logged["total"] == pytest.approx(logged["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- on resume
@pytest.mark.parametrize("trained, resumed, problem", [
    ([], ["--disc_base_channels", "16"],
     "its discriminator does not fit the one these settings build (disc_base_channels 8 there, 16 here)"),
    (["--adversarial_weight", "0"], [],
     "it has no discriminator, but these settings train one (adversarial_weight > 0)"),
])
def test_a_checkpoint_whose_discriminator_does_not_fit_is_refused_before_anything_is_written(tmp_path, trained,
                                                                                             resumed, problem):
    """The Trainer found out when it loaded the checkpoint (a size-mismatch traceback, or a missing file), after
    stage2-train had rewritten the run's config.yaml with the settings that cannot go on."""
    import datasets
    import numpy as np
    from _data_helpers import folder_digest
    from _training_helpers import write_config

    from training.train import UsageError, main

    rng = np.random.default_rng(0)
    target = rng.uniform(0.02, 0.4, (6, 4, 120, 120)).astype(np.float32)
    table = datasets.Dataset.from_dict({
        "target": target, "opt_v1": (target * 1.05 + rng.normal(0, 0.01, target.shape)).astype(np.float32),
        "month": [1, 2, 3, 4, 5, 6], "biome": [0, 1, 2, 3, 4, 0], "valid_mask": np.ones((6, 120, 120), bool)})
    datasets.DatasetDict({"train": table.select(range(4)), "val": table.select([4, 5])}).save_to_disk(tmp_path / "d")
    out = tmp_path / "out"
    argv = ["--config", str(write_config(tmp_path / "c.yaml", spectral_correction_init="identity")), "--data_dir",
            str(tmp_path / "d"), "--output_dir", str(out), "--num_train_epochs", "1"]
    main([*argv, *trained])
    before = folder_digest(out)
    with pytest.raises(UsageError) as error:  # one line and exit status 2 from stage2-train
        main([*argv, *resumed, "--resume", "latest"])
    assert str(error.value) == (f"{out / 'checkpoint-2'}: {problem}; resume with the settings it was trained with (the "
                                "run's config.yaml), or start a new run.")
    assert folder_digest(out) == before  # config.yaml included
