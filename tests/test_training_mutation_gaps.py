"""Behaviour of the training modules that plausible bugs used to get past the suite (a mutation audit): the colour
fit's masks and batches, the warm start's settings, the discriminator's step, the logged components, the JSONL log
and the previews. Tiny tensors and at most a few tiny optimizer steps each."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _arrays(count: int, size: int = 4, seed: int = 0):
    """(target, opt_v1) of `count` random tiles: opt_v1 a 1.5 gain of the target plus 0.02 and noise."""
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.02, 0.4, (count, 4, size, size)).astype(np.float32)
    return target, (1.5 * target + 0.02 + rng.normal(0, 0.01, target.shape)).astype(np.float32)


def _table(count: int, size: int = 4, seed: int = 0, valid=None, opt_v1=None):
    import datasets

    target, noisy = _arrays(count, size, seed)
    opt_v1 = noisy if opt_v1 is None else opt_v1
    valid = np.ones((count, size, size), bool) if valid is None else valid
    return datasets.Dataset.from_dict({"target": target, "opt_v1": opt_v1, "month": [1] * count,
                                       "biome": [0] * count, "valid_mask": valid})


# ----------------------------------------------------------------------------------- the colour fit
def test_the_fit_of_a_split_leaves_out_its_invalid_pixels():
    """`from_dataset` must pass each batch's `valid_mask` on: garbage under invalid pixels must not move the fit."""
    from training.linear_fit import LinearColorFit

    valid = np.ones((3, 4, 4), bool)
    valid[:, :, :2] = False
    target, garbage = _arrays(3)
    garbage[:, :, :, :2] = 5.0  # invalid pixels: far off the gain the valid ones follow
    result = LinearColorFit.from_dataset(_table(3, valid=valid, opt_v1=garbage))
    expected = LinearColorFit()
    expected.update(garbage, target, valid)
    assert result.pixels == int(valid.sum()) == 24 and result.tiles == 3
    torch.testing.assert_close(result.matrix, expected.solve().matrix, rtol=0, atol=1e-9)
    torch.testing.assert_close(result.matrix, torch.eye(4, dtype=torch.float64) / 1.5, rtol=0, atol=0.05)


def test_the_fit_of_a_split_reads_every_row_across_its_batches():
    """A split longer than one batch of `split_batches` (32 tiles): every tile and pixel counts once."""
    from training.data import SPLIT_BATCH_TILES, split_batches
    from training.linear_fit import LinearColorFit

    count = 2 * SPLIT_BATCH_TILES + 5
    table = _table(count, size=2)
    seen = [len(batch["target"]) for batch in split_batches(table, ["target", "absent"])]
    assert seen == [SPLIT_BATCH_TILES, SPLIT_BATCH_TILES, 5]
    result = LinearColorFit.from_dataset(table)
    assert result.tiles == count and result.pixels == 4 * count


def _spectral_fit(table, **kwargs):
    from training.linear_fit import fit_spectral_correction

    return fit_spectral_correction(table, steps=3, batch_tiles=2, learning_rate=1e-2, **kwargs)


def test_the_spectral_fit_draws_its_tiles_from_its_seed_and_gives_back_the_threads():
    """The seed (`--seed`) picks the tiles of each Adam step; the fit runs on one thread and restores the caller's."""
    table = _table(8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, again, other = _spectral_fit(table, seed=0), _spectral_fit(table, seed=0), _spectral_fit(table, seed=5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first.matrix, again.matrix)
    assert float((first.matrix - other.matrix).abs().max()) > 1e-6


def test_the_spectral_mlp_is_fitted_on_batches_of_mlp_batch_tiles():
    """The MLP's steps take `mlp_batch_tiles` tiles each, the affine fit's `batch_tiles`."""
    table = _table(8)
    sizes = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(()))

        def forward(self, spectra):
            sizes.append(spectra.shape[0])
            return spectra * self.gain

    _spectral_fit(table, spectral_mlp=Recording(), mlp_batch_tiles=5)
    assert sizes == [5, 5, 5]


# ----------------------------------------------------------------------------------- the warm start
def _affine_model(**overrides):
    from _refiner_helpers import tiny_refiner_config

    from modeling_stage2 import Stage2RefinerModel

    torch.manual_seed(0)
    return Stage2RefinerModel(tiny_refiner_config(spectral_correction="shared", **overrides))


@pytest.mark.parametrize("nonnegative", [False, True])
def test_the_spectral_fit_gets_the_runs_seed_clamp_mlp_and_redraw(tmp_path, monkeypatch, nonnegative):
    import training.warm_start as warm_start
    from training.args import Stage2TrainingArguments
    from training.linear_fit import LinearColorFit, spectral_mlps

    seen = {}

    def fake_fit(split, loss, **kwargs):
        seen.update(kwargs)
        return LinearColorFit.from_dataset(split)

    monkeypatch.setattr(warm_start, "fit_spectral_correction", fake_fit)
    model = _affine_model(nonnegative_output=nonnegative, spectral_mlp_hidden_size=8)
    redraw = object()
    args = Stage2TrainingArguments(output_dir=str(tmp_path), quantization="none", report_to="none", seed=7)
    warm_start.start_spectral_correction(model, _table(2), args, redraw=redraw)
    assert seen["nonnegative"] is nonnegative and seen["seed"] == 7 and seen["redraw"] is redraw
    assert seen["spectral_mlp"] is spectral_mlps(model)[0]


def test_resuming_false_fits_even_where_the_arguments_name_a_checkpoint(tmp_path):
    """`resuming` given by the caller (the trainer, which knows whether `train()` resumes) wins over
    `resume_from_checkpoint` in the arguments: a trainer whose `train()` starts anew must start fitted."""
    from training.args import Stage2TrainingArguments
    from training.trainer import CHECKPOINT_COMPLETE_NAME
    from training.warm_start import start_spectral_correction

    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / CHECKPOINT_COMPLETE_NAME).write_text('{"global_step": 4, "files": {}}')
    args = Stage2TrainingArguments(output_dir=str(tmp_path), quantization="none", report_to="none",
                                   resume_from_checkpoint="latest", spectral_correction_init="linear_fit")
    assert start_spectral_correction(_affine_model(), _table(2), args) is None
    started = start_spectral_correction(_affine_model(), _table(2), args, resuming=False)
    assert started == "linear_fit of 2 training tiles"


def test_an_identity_start_reads_no_training_split(tmp_path):
    """Only a fit reads the split: a trainer started at the identity accepts any dataset (a Subset)."""
    from training.args import Stage2TrainingArguments
    from training.warm_start import needs_training_split, start_fitted_modules

    args = Stage2TrainingArguments(output_dir=str(tmp_path), quantization="none", report_to="none",
                                   spectral_correction_init="identity")
    model = _affine_model()
    assert not needs_training_split(model, args)
    subset = torch.utils.data.Subset(_table(3).with_format("torch"), [0, 1])
    assert start_fitted_modules(model, subset, args, resuming=False) == {
        "spectral_correction_init": "identity", "out_of_range_fallback": None}


# ----------------------------------------------------------------------------------- the discriminator's step
def _fake_trainer(ratio=0.5, max_grad_norm=1.0, scheduled_lr=0.02):
    from training.discriminator import PatchDiscriminator

    torch.manual_seed(0)
    discriminator = PatchDiscriminator(base_channels=4, num_layers=1)
    return SimpleNamespace(
        discriminator=discriminator, accelerator=SimpleNamespace(num_processes=1),
        disc_optimizer=torch.optim.SGD(discriminator.parameters(), lr=123.0),
        args=SimpleNamespace(disc_learning_rate_ratio=ratio, max_grad_norm=max_grad_norm, learning_rate=1.0),
        _get_learning_rate=lambda: scheduled_lr, disc_steps=0, disc_skipped_steps=0)


def test_the_discriminator_steps_at_its_ratio_of_the_scheduled_rate_with_clipped_gradients():
    """The update is -(ratio x the generator's *scheduled* rate) x the gradient clipped to `max_grad_norm` (the
    docs' step 3); its gradients are dropped after the step."""
    from training.trainer import Stage2Trainer

    trainer = _fake_trainer()
    parameters = list(trainer.discriminator.parameters())
    before = [p.detach().clone() for p in parameters]
    gradients = [torch.full_like(p, 0.1) for p in parameters]
    for p, g in zip(parameters, gradients):
        p.grad = g.clone()
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in gradients)))
    assert norm > 2  # clipping to 1 matters
    Stage2Trainer._discriminator_step(trainer, skip=False)
    assert trainer.disc_steps == 1 and trainer.disc_skipped_steps == 0
    assert trainer.disc_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    for p, b, g in zip(parameters, before, gradients):
        torch.testing.assert_close(p.detach(), b - 0.01 * g / norm, rtol=0, atol=1e-7)
        assert p.grad is None


@pytest.fixture
def tiny_run(tmp_path):
    """A tiny `Stage2Trainer` (`_training_helpers.tiny_trainer`) without evaluation or checkpoints."""
    from _training_helpers import tiny_trainer

    def build(**settings):
        settings = {"eval_strategy": "no", "save_strategy": "no", "eval_every_epochs": None,
                    "save_every_epochs": None, **settings}
        return tiny_trainer(tmp_path, n_eval=0, **settings)
    return build


def test_the_discriminator_learns_every_disc_update_interval_steps_only(tiny_run, tmp_path, monkeypatch):
    """4 optimizer steps, `disc_update_interval` 2: its loss is back-propagated and it steps at steps 1 and 3 only
    (global steps 0 and 2 before them), and nothing is counted as skipped; the logs count its steps."""
    from _training_helpers import records

    from training.trainer import Stage2Trainer

    trainer = tiny_run(disc_update_interval=2)
    backward_at = []
    original = Stage2Trainer._discriminator_backward

    def counting(self, *arguments):
        backward_at.append(self.state.global_step)
        return original(self, *arguments)

    monkeypatch.setattr(Stage2Trainer, "_discriminator_backward", counting)
    trainer.train()
    assert trainer.state.global_step == 4 and backward_at == [0, 2]
    assert trainer.disc_steps == 2 and trainer.disc_skipped_steps == 0
    logged = records(tmp_path / "out" / "training_log.jsonl", "train")
    assert [r["disc_steps"] for r in logged] == [1, 1, 2, 2]


def test_each_train_line_gives_the_components_of_its_own_steps(tiny_run, tmp_path):
    """`logging_steps` 1: every line's `total` is its step's loss, not a mean over the run so far."""
    from _training_helpers import records

    tiny_run().train()
    logged = records(tmp_path / "out" / "training_log.jsonl", "train")
    assert len(logged) == 4 and len({r["loss"] for r in logged}) == 4
    for record in logged:
        assert record["total"] == pytest.approx(record["loss"], rel=1e-5)


def _poisoned_trainer(tmp_path, poisoned_tile: int):
    """A tiny trainer over 4 tiles in order, batches of 1, whose loss is NaN for the batch of `poisoned_tile` (its
    components stay finite, as when only the adversarial term overflows)."""
    import datasets
    from _training_helpers import SnapshotTrainable, tile_rows, write_config
    from data_builders import make_eval_transform

    from training.data import TileDataset
    from training.losses import Stage2Loss
    from training.train import build_model, parse_args
    from training.trainer import Stage2Trainer

    columns = tile_rows(4, 0).with_format("numpy")[:]
    columns["target"][poisoned_tile, 0, 0, 0] = 0.5
    table = datasets.Dataset.from_dict(columns)

    class PoisonedLoss(Stage2Loss):
        def forward(self, refined, target, opt_v1, valid_mask=None, fake_scores=None):
            total, components = super().forward(refined, target, opt_v1, valid_mask, fake_scores)
            return (total * float("nan") if bool((target[:, 0, 0, 0] == 0.5).any()) else total), components

    config = write_config(tmp_path / "c.yaml", eval_every_epochs=None, save_every_epochs=None, eval_strategy="no",
                          save_strategy="no", num_train_epochs=1, per_device_train_batch_size=1,
                          spectral_correction_init="identity")
    args = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])[0]
    snapshots = SnapshotTrainable()
    trainer = Stage2Trainer(model=build_model(args, print_summary=False), args=args, loss_fn=PoisonedLoss(),
                            train_dataset=TileDataset(table, make_eval_transform()), callbacks=[snapshots])
    trainer._get_train_sampler = lambda *arguments, **kwargs: torch.utils.data.SequentialSampler(range(4))
    return trainer, snapshots


def test_only_the_poisoned_step_is_skipped_and_it_logs_no_components(tmp_path):
    """Step 2 of 4 has a NaN loss: it alone is skipped (the steps after it train), and its line carries no loss
    component (those of a step that did not happen would read as a normal step)."""
    from _training_helpers import records

    trainer, snapshots = _poisoned_trainer(tmp_path, poisoned_tile=1)
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.nonfinite_skipped_steps == 1
    unchanged = [step for step in range(1, 5) if all(torch.equal(snapshots.before[step][n], snapshots.after[step][n])
                                                     for n in snapshots.after[step])]
    assert unchanged == [2]
    assert trainer.disc_steps == 3 and trainer.disc_skipped_steps == 1
    logged = records(tmp_path / "out" / "training_log.jsonl", "train")
    assert [r["nonfinite_skipped_steps"] for r in logged] == [0, 1, 1, 1]
    assert ["total" in r for r in logged] == [True, False, True, True]


# ----------------------------------------------------------------------------------- the JSONL log and previews
def _state(step: int):
    return SimpleNamespace(is_world_process_zero=True, global_step=step, epoch=1.0)


def test_a_resumed_log_keeps_the_lines_up_to_its_step_and_drops_later_and_torn_ones(tmp_path):
    import json

    from training.callbacks import TRAINING_LOG_NAME, JsonlLoggerCallback

    log = tmp_path / TRAINING_LOG_NAME
    lines = [json.dumps({"event": "train", "step": step}) for step in (1, 2, 3)]
    log.write_text("\n".join([*lines, '{"event": "eval", "step": 2}', '{"event": "tr']) + "\n")
    JsonlLoggerCallback().on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), _state(2), None)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"event": "train", "step": 1}, {"event": "train", "step": 2}, {"event": "eval", "step": 2}]


def test_an_infinite_value_is_written_as_a_string_and_nan_as_null():
    from training.callbacks import JsonlLoggerCallback

    record = JsonlLoggerCallback.make_record({"loss": float("inf"), "grad_norm": float("nan"),
                                              "learning_rate": 1e-3, "total": float("-inf")}, _state(3))
    assert record == {"epoch": 1.0, "step": 3, "event": "train", "lr": 1e-3, "loss": "inf", "grad_norm": None,
                      "total": "-inf"}


def test_every_epoch_end_logs_unless_logging_is_off():
    from transformers import TrainerControl
    from transformers.trainer_utils import IntervalStrategy

    from training.callbacks import EpochLoggingCallback

    for strategy, expected in ((IntervalStrategy.STEPS, True), (IntervalStrategy.NO, False)):
        control = TrainerControl()
        EpochLoggingCallback().on_epoch_end(SimpleNamespace(logging_strategy=strategy), _state(2), control)
        assert control.should_log is expected


def test_the_preview_stretches_every_column_by_the_targets_2_to_98_percentiles():
    """One colour scale per tile, the target's: 2nd percentile -> 0, 98th -> 255, so opt_v1 twice as bright as the
    target shows brighter, not re-stretched to look the same."""
    from modeling_stage2.bands import TRUE_COLOUR_BANDS

    from training.callbacks import true_colour

    target = np.zeros((1, 4, 10, 10), np.float32)
    target[0, list(TRUE_COLOUR_BANDS)] = np.linspace(0.0, 0.99, 100, dtype=np.float32).reshape(10, 10)
    low, high = np.percentile(target[0, list(TRUE_COLOUR_BANDS)], (2, 98))
    expected = np.clip((target[0, list(TRUE_COLOUR_BANDS)] - low) / (high - low), 0, 1)
    np.testing.assert_allclose(true_colour(target)[0].astype(int), expected.transpose(1, 2, 0) * 255, atol=1)
    brighter = true_colour(2 * target, reference=target)[0]
    # 0.6 twice over: past the target's 98th percentile (on its own scale, 1.2 is 61 % of the way)
    assert brighter[6, 0, 0] == 255 and true_colour(2 * target)[0][6, 0, 0] == 156


def test_the_ndvi_preview_is_green_for_vegetation_and_brown_for_bare_soil():
    from modeling_stage2.bands import NIR, RED

    from training.callbacks import ndvi_colour

    tiles = np.zeros((2, 4, 1, 1), np.float32)
    tiles[0, RED], tiles[0, NIR] = 0.05, 0.95  # NDVI 0.9: dense vegetation
    tiles[1, RED], tiles[1, NIR] = 0.60, 0.40  # NDVI -0.2: the ramp's low end
    colours = ndvi_colour(tiles)[:, 0, 0].astype(int)
    assert colours[0, 1] > colours[0, 0] + 60  # green
    np.testing.assert_array_equal(colours[1], [120, 80, 40])  # brown


def test_the_discriminators_own_adamw_has_the_documented_betas_and_no_decay(tmp_path):
    """`docs/training.md`: the discriminator steps with its own AdamW, betas (0.5, 0.999) (the GAN convention), at
    `disc_learning_rate_ratio` of the generator's rate; nothing pinned the betas or the decay."""
    from _training_helpers import tiny_trainer

    trainer = tiny_trainer(tmp_path, adversarial_weight=0.1, disc_learning_rate_ratio=0.5)
    assert trainer.discriminator is not None and isinstance(trainer.disc_optimizer, torch.optim.AdamW)
    (group,) = trainer.disc_optimizer.param_groups
    assert group["betas"] == (0.5, 0.999) and group["weight_decay"] == 0.0
    assert group["lr"] == pytest.approx(0.5 * trainer.args.learning_rate)
    assert {id(p) for p in group["params"]} == {id(p) for p in trainer.discriminator.parameters()}
