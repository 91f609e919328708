"""Behaviour of the training settings (`training.args`) and the Trainer callbacks (`training.callbacks`) that plausible
bugs used to get past the suite (a mutation audit; `test_training_mutation_gaps.py` covers the trainer core): the
checks and defaults of the settings, the epoch intervals, the log and previews of the main process only. No training
runs: the settings are built directly and the callbacks called by hand."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------- callbacks
def _state(step: int, main: bool = True):
    return SimpleNamespace(is_world_process_zero=main, is_hyper_param_search=False, global_step=step, epoch=1.0)


def test_only_the_main_process_truncates_or_writes_the_training_log(tmp_path):
    """Under DDP every process runs the callbacks: the others must neither rewrite `training_log.jsonl` on a resumed
    start (the main process's own truncation races theirs) nor append their own copy of each line."""
    from training.callbacks import TRAINING_LOG_NAME, JsonlLoggerCallback

    log = tmp_path / TRAINING_LOG_NAME
    before = "".join(json.dumps({"event": "train", "step": step}) + "\n" for step in (1, 2, 3))
    log.write_text(before)
    args = SimpleNamespace(output_dir=str(tmp_path))
    other = JsonlLoggerCallback()
    other.on_train_begin(args, _state(2, main=False), None)
    other.on_log(args, _state(2, main=False), None, logs={"loss": 0.5, "learning_rate": 1e-3})
    assert log.read_text() == before
    main = JsonlLoggerCallback()
    main.on_train_begin(args, _state(2), None)
    main.on_log(args, _state(3), None, logs={"loss": 0.5, "learning_rate": 1e-3})
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_a_new_train_call_forgets_the_last_runs_learning_rate(tmp_path):
    """An evaluation before the first step of a second `train()` (eval_on_start) gives the rate that step will use
    (the scheduler's), not the rate of the last step of the previous call."""
    from training.callbacks import JsonlLoggerCallback

    callback = JsonlLoggerCallback(tmp_path / "log.jsonl")
    optimizer = SimpleNamespace(param_groups=[{"lr": 3e-5}])
    callback.on_optimizer_step(None, _state(4), None, optimizer=optimizer)
    callback.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), _state(0), None)
    scheduler = SimpleNamespace(get_last_lr=lambda: [1e-3])
    callback.on_log(None, _state(0), None, lr_scheduler=scheduler, logs={"eval_refined_ndvi_rmse": 0.1,
                                                                        "eval_n_tiles": 2})
    (line,) = (tmp_path / "log.jsonl").read_text().splitlines()
    assert json.loads(line)["lr"] == 1e-3


def _preview(count: int, size: int = 8):
    rng = np.random.default_rng(0)
    return {name: rng.uniform(0.0, 0.4, (count, 4, size, size)).astype(np.float32)
            for name in ("opt_v1", "refined", "target")}


def test_only_the_main_process_renders_previews():
    """Another process has no TensorBoard writer; rendering there opened one of its own in `runs/` (duplicate
    events) and spent the time of a preview on every process."""
    from training.callbacks import Stage2TensorBoardCallback

    calls = []

    class Writer:
        def add_image(self, tag, image, step, dataformats):
            calls.append((tag, image.shape, step))

        def flush(self):
            pass

    def source():
        calls.append("source")
        return _preview(2)

    callback = Stage2TensorBoardCallback(preview_source=source, tb_writer=Writer())
    callback.on_evaluate(SimpleNamespace(output_dir="unused"), _state(6, main=False), None)
    assert calls == []
    callback.on_evaluate(SimpleNamespace(output_dir="unused"), _state(6), None)
    assert [call[0] for call in calls[1:]] == ["preview/rgb", "preview/ndvi"] and calls[1][2] == 6


def test_the_preview_shows_at_most_max_tiles_rows():
    from training.callbacks import LABEL_HEIGHT, render_preview

    tiles = _preview(6, size=8)
    grids = render_preview(tiles["opt_v1"], tiles["refined"], tiles["target"], max_tiles=2, gap=4)
    assert grids["rgb"].shape[:2] == (LABEL_HEIGHT + 2 * 8 + 4, 3 * 8 + 2 * 4)


def test_the_colour_bar_spans_exactly_the_ramp_of_the_ndvi_preview():
    """The bar's end labels are NDVI_PREVIEW_RANGE: beyond the ramp `ndvi_colour` clamps, so a range wider than its
    -0.2..1 would label a flat stretch of brown as NDVI -1..-0.2."""
    from training.callbacks import NDVI_PREVIEW_RANGE, _tiles_with_ndvi, ndvi_colour

    low, high = NDVI_PREVIEW_RANGE
    colours = ndvi_colour(_tiles_with_ndvi(np.array([low - 0.05, low, low + 0.05, high - 0.05, high, high + 0.05],
                                                    dtype=np.float32)))[0, 0].astype(int)
    assert (colours[0] == colours[1]).all() and (colours[1] != colours[2]).any()  # the ramp starts at low ...
    assert (colours[4] == colours[5]).all() and (colours[3] != colours[4]).any()  # ... and ends at high


# ----------------------------------------------------------------------------------- settings
def _args(tmp_path, **values):
    from training.args import Stage2TrainingArguments

    return Stage2TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", **values)


def test_the_design_defaults_the_class_docstring_states(tmp_path):
    """`Stage2TrainingArguments`: batch 1, gradient accumulation 8, learning rate 1e-4, cosine schedule after a warmup
    over 5 % of the steps, clipping 1.0, 100 epochs, evaluation batch 4, best model on the refined NDVI RMSE (smaller
    is better), the starting model validated too; validation every 5 epochs and a checkpoint every 10
    (`docs/training.md`)."""
    args = _args(tmp_path)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.learning_rate) == (1, 8, 1e-4)
    assert args.lr_scheduler_type == "cosine" and args.max_grad_norm == 1.0 and args.num_train_epochs == 100
    assert args.warmup_steps == 0.05 and args.per_device_eval_batch_size == 4
    assert args.metric_for_best_model == "eval_refined_ndvi_rmse" and args.greater_is_better is False
    assert args.eval_on_start is True and (args.eval_every_epochs, args.save_every_epochs) == (5.0, 10.0)


@pytest.mark.parametrize("name, value, message", [
    ("out_of_range_quantile", 1.0, "out_of_range_quantile must be in (0, 1), got 1.0."),
    ("out_of_range_quantile", 0.0, "out_of_range_quantile must be in (0, 1), got 0.0."),
    ("disc_learning_rate_ratio", -0.1, "disc_learning_rate_ratio must be a finite number >= 0, got -0.1."),
    ("eval_every_epochs", -1.0, "eval_every_epochs must be a finite number > 0, or 0 / null"),
    ("save_every_epochs", -0.5, "save_every_epochs must be a finite number > 0, or 0 / null"),
    ("adam_beta2", -0.1, "adam_beta2 must be in [0, 1), got -0.1."),
    ("data_seed", 2**32, "data_seed must be in 0..4294967295 (numpy's seed range) or unset, got 4294967296."),
    ("logging_steps", 0, "logging_steps must be a finite number > 0"),
    ("save_total_limit", -1, "save_total_limit must be >= 0 (0 or null: every checkpoint is kept), got -1."),
    ("warmup_steps", float("inf"), "warmup_steps must be a finite number >= 0"),
])
def test_a_setting_just_out_of_its_range_is_refused(name, value, message, tmp_path):
    """Each bound itself: a quantile of 1 puts the fallback threshold at the farthest training pixel, a negative
    interval or discriminator rate or -1 checkpoints would start a run that cannot do what was asked."""
    with pytest.raises(ValueError) as error:
        _args(tmp_path, **{name: value})
    assert str(error.value).startswith(message)


def test_a_discriminator_rate_of_0_is_accepted(tmp_path):
    """`>= 0`: 0 keeps the discriminator as it starts (the docs' range), refused by a `> 0` check."""
    assert _args(tmp_path, disc_learning_rate_ratio=0.0).disc_learning_rate_ratio == 0.0


def test_step_intervals_the_epoch_intervals_replace_are_not_checked(tmp_path):
    """`eval_steps` / `save_steps` are replaced where `eval_every_epochs` / `save_every_epochs` is set (the default):
    their own values are not refused there; with the epoch intervals off and the `steps` strategy they are."""
    args = _args(tmp_path, eval_steps=0, save_steps=0)
    assert (args.eval_strategy, args.eval_steps, args.save_strategy, args.save_steps) == ("steps", 1, "steps", 1)
    for name in ("eval_steps", "save_steps"):
        with pytest.raises(ValueError, match=f"^{name} must be a finite number > 0"):
            _args(tmp_path, eval_every_epochs=None, save_every_epochs=None, eval_strategy="steps",
                  save_strategy="steps", **{name: 0})


def test_an_explicit_greater_is_better_is_kept(tmp_path):
    """The metric's own direction fills `greater_is_better` only where it is unset."""
    assert _args(tmp_path, metric_for_best_model="eval_refined_psnr").greater_is_better is True
    assert _args(tmp_path, metric_for_best_model="eval_refined_psnr", greater_is_better=False).greater_is_better \
        is False


@pytest.mark.parametrize("eval_epochs, save_epochs, expected", [
    (0.5, 2.5, (2, 8)),  # 1.5 and 7.5 steps: rounded, not truncated to 1 and 7
    (0.1, 0.1, (1, 1)),  # 0.3 steps: at least one step
])
def test_epoch_intervals_round_to_whole_steps_of_at_least_one(eval_epochs, save_epochs, expected, tmp_path):
    args = _args(tmp_path, eval_every_epochs=eval_epochs, save_every_epochs=save_epochs)
    args.resolve_epoch_intervals(3)
    assert (args.eval_steps, args.save_steps) == expected


def test_steps_per_epoch_count_the_last_partial_batch_per_process_unless_dropped():
    """docs/training.md: 5 tiles, batch 1 on 2 processes: 3 steps, the third with a duplicate."""
    from training.args import num_update_steps_per_epoch

    assert num_update_steps_per_epoch(5, 1, 2, 1) == 3
    assert num_update_steps_per_epoch(5, 2, 1, 1) == 3  # the last batch of 1 tile
    assert num_update_steps_per_epoch(5, 2, 1, 1, drop_last=True) == 2


def test_every_loss_weight_that_is_set_reaches_the_loss(tmp_path):
    names = ("spectral_weight", "ndvi_weight", "evi_weight", "sam_weight", "identity_weight", "edge_weight",
             "adversarial_weight", "reconstruction_weight")
    values = {name: 0.1 * (index + 1) for index, name in enumerate(names)}
    assert _args(tmp_path, **values).loss_weights() == values
    assert _args(tmp_path, reconstruction_weight=2.0).loss_weights() == {"reconstruction_weight": 2.0}


def test_a_boolean_word_is_its_value_and_a_boolean_is_no_number():
    """What a YAML file may write for a setting: `no` (quoted, or from a tool that writes strings) is false, and
    `lora_r: true` is no rank of 1."""
    from training.args import SettingTypeError, convert_setting

    assert [convert_setting(word, bool) for word in ("no", "No", "n", "f", "0", "false")] == [False] * 6
    assert [convert_setting(word, bool) for word in ("yes", "y", "t", "1", "TRUE")] == [True] * 5
    for kind in (int, float):
        with pytest.raises(SettingTypeError, match=f"expected {'an integer' if kind is int else 'a float'}, got True"):
            convert_setting(True, kind)


def test_a_yaml_no_turns_a_flag_off(tmp_path):
    from _training_helpers import write_config

    from training.train import parse_args

    config = write_config(tmp_path / "x.yaml", augment="no", redraw_degradation="yes")
    _, data_args, _ = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "o")])
    assert data_args.augment is False and data_args.redraw_degradation is True


def test_the_data_settings_bounds():
    """Equal brightness bounds are a constant factor (accepted); 0 tiles and a negative dataset seed are refused
    here, before the data are converted."""
    from training.args import Stage2DataArguments

    assert Stage2DataArguments(brightness_augment=[0.8, 0.8]).brightness_augment == [0.8, 0.8]
    for name in ("max_samples", "max_eval_samples"):
        with pytest.raises(ValueError, match=f"^{name} must be >= 1 \\(or unset\\), got 0.$"):
            Stage2DataArguments(**{name: 0})
    with pytest.raises(ValueError, match="^dataset_seed must be >= 0, got -1.$"):
        Stage2DataArguments(dataset_seed=-1)


def test_deterministic_and_no_pinned_memory_wherever_the_run_is_on_the_cpu(tmp_path, monkeypatch):
    """Unset, `deterministic` is on for a CPU run: also `--use_cpu` on a machine that has CUDA; and there is no memory
    to pin for."""
    import torch

    import training.args  # noqa: F401  (imported before CUDA is faked: bitsandbytes probes it on import)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = _args(tmp_path, use_cpu=True)
    assert args.deterministic is True and "CPU" in args.precision_note and args.dataloader_pin_memory is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA: transformers itself would pin
    args = _args(tmp_path)
    assert args.deterministic is True and "CPU" in args.precision_note and args.dataloader_pin_memory is False
