"""What training reads before and around its steps (a review): the split the warm start fits, and the TensorBoard
files a resumed run leaves."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _refiner_helpers import tiny_refiner_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiles_with_two_colour_casts():
    """Six tiles: opt_v1 is twice the target in the first three, half of it in the last three."""
    import datasets

    rng = np.random.default_rng(0)
    target = rng.uniform(0.02, 0.4, (6, 4, 8, 8)).astype(np.float32)
    opt_v1 = np.concatenate([2 * target[:3], 0.5 * target[3:]])
    return datasets.Dataset.from_dict({"target": target, "opt_v1": opt_v1, "month": [1] * 6, "biome": [0] * 6,
                                       "valid_mask": np.ones((6, 8, 8), bool)})


def test_the_warm_start_fits_the_training_rows_only_not_the_dataset_a_subset_holds(tmp_path):
    """A `torch.utils.data.Subset` has a `.dataset` too (all of it): the warm start fitted that whole dataset, the
    held-out tiles included (here the fit of six tiles, far from the training tiles' 0.5 I)."""
    from data_builders import make_eval_transform

    from modeling_stage2 import Stage2RefinerModel
    from training.args import Stage2TrainingArguments
    from training.data import TileDataset
    from training.linear_fit import spectral_corrections
    from training.warm_start import start_fitted_modules

    table = _tiles_with_two_colour_casts()
    args = Stage2TrainingArguments(output_dir=str(tmp_path), quantization="none", report_to="none",
                                   spectral_correction_init="linear_fit")

    def model():
        torch.manual_seed(0)
        return Stage2RefinerModel(tiny_refiner_config(spectral_correction="shared"))

    subset = torch.utils.data.Subset(table.with_format("torch"), [0, 1, 2])
    with pytest.raises(ValueError, match=r"got a Subset\. Pass train_dataset=training\.data\.TileDataset"):
        start_fitted_modules(model(), subset, args, resuming=False)
    refiner = model()
    started = start_fitted_modules(refiner, TileDataset(table.select([0, 1, 2]), make_eval_transform()), args,
                                   resuming=False)
    assert started["spectral_correction_init"] == "linear_fit of 3 training tiles"
    correction = spectral_corrections(refiner)[0].state_dict()
    torch.testing.assert_close(correction["matrix"], 0.5 * torch.eye(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(correction["bias"], torch.zeros(4), atol=1e-5, rtol=0)


def test_an_evaluation_after_a_resumed_train_keeps_what_the_run_logged_to_tensorboard(tmp_path):
    """A resumed run's writer purges what the interrupted run logged after the checkpoint. `on_train_end` closes it;
    `trainer.evaluate()` afterwards opened a new writer with the same purge step, which hid every step the resumed
    run had logged."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainerControl

    from training.callbacks import TENSORBOARD_DIR_NAME, Stage2TensorBoardCallback

    args = SimpleNamespace(output_dir=str(tmp_path), to_json_string=lambda: "{}")

    def state(step):
        return SimpleNamespace(is_world_process_zero=True, is_hyper_param_search=False, global_step=step)

    def train(first_step, last_step, start_at, loss_offset):
        time.sleep(1.05)  # TensorBoard reads the event files in name order, which begins with the second
        callback = Stage2TensorBoardCallback()
        callback.on_train_begin(args, state(start_at), TrainerControl())
        for step in range(first_step, last_step + 1):
            callback.on_log(args, state(step), TrainerControl(), logs={"loss": loss_offset + step})
        callback.on_train_end(args, state(last_step), TrainerControl())
        return callback

    train(1, 3, 0, 0.0)  # interrupted after step 3; its checkpoint is step 2
    resumed = train(3, 4, 2, 10.0)
    time.sleep(1.05)
    resumed.on_log(args, state(4), TrainerControl(), logs={"eval_loss": 0.5})  # trainer.evaluate() after train()
    resumed.on_train_end(args, state(4), TrainerControl())

    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR_NAME))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    assert [(event.step, event.value) for event in events.Scalars("eval/loss")] == [(4, 0.5)]


def test_a_brightness_range_must_be_finite():
    """`brightness_range=(0.5, inf)` was accepted, and every row's target and opt_v1 came out infinite."""
    import datasets
    from data_builders import make_eval_transform

    from training.data import TileDataset

    tiles = np.full((2, 4, 4, 4), 0.1, np.float32)
    table = datasets.Dataset.from_dict({"target": tiles, "opt_v1": tiles, "month": [1, 2], "biome": [0, 0]})
    for bad in ((0.5, float("inf")), (float("inf"), float("inf")), (0.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError, match="brightness_range must be"):
            TileDataset(table, make_eval_transform(), brightness_range=bad)
    rows = TileDataset(table, make_eval_transform(), brightness_range=(0.5, 2.0)).__getitems__([0, 1])
    for row in rows:
        factor = float(row["target"][0, 0, 0]) / 0.1
        assert 0.5 <= factor <= 2.0
        torch.testing.assert_close(row["opt_v1"], row["target"])


def test_the_brightness_factor_is_log_uniform_one_per_row_and_epoch():
    """One factor per row, drawn log-uniformly: log(factor) is uniform on [log 0.5, log 2], so as many rows darken
    as brighten (a uniform draw on [0.5, 2] would brighten two in three, log mean +0.155)."""
    import datasets
    from data_builders import make_eval_transform

    from training.data import TileDataset

    count = 400
    tiles = np.full((count, 4, 2, 2), 0.1, np.float32)
    table = datasets.Dataset.from_dict({"target": tiles, "opt_v1": 2 * tiles, "month": [1] * count,
                                        "biome": [0] * count})
    dataset = TileDataset(table, make_eval_transform(), brightness_range=(0.5, 2.0))

    def log_factors():
        rows = dataset.__getitems__(range(count))
        for row in rows:  # one factor for the whole row: every pixel and band of target and opt_v1
            torch.testing.assert_close(row["opt_v1"], 2 * row["target"], atol=0, rtol=0)
            assert float(row["target"].max() - row["target"].min()) == 0
        return np.log(np.array([float(row["target"][0, 0, 0]) for row in rows], np.float64) / 0.1)

    first = log_factors()
    assert np.all(np.abs(first) <= np.log(2.0) + 1e-6) and len(np.unique(first)) == count
    assert abs(float(first.mean())) < 0.05  # the standard error of the mean is 0.02
    assert 0.45 < float((first < 0).mean()) < 0.55
    assert float(first.min()) < np.log(0.55) and float(first.max()) > np.log(1.8)  # spans the range
    np.testing.assert_array_equal(log_factors(), first)  # reproducible
    dataset.set_epoch(1)
    assert float(np.abs(log_factors() - first).min()) > 0  # each epoch draws anew
