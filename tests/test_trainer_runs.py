"""What a `Stage2Trainer` run leaves in its folder, beyond one uninterrupted run: a plain `evaluate()`, a second run in
the same folder, checkpoints saved with `save_only_model`, `dataloader_drop_last`, uneven accumulation windows and
the card of `best/` before the run's end. Tiny in-memory tiles, the tiny training settings."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from _data_helpers import folder_digest
from _training_helpers import StopAtStep, records, tile_rows, tiny_trainer as _trainer, write_config
from transformers import TrainerCallback

from model_cards.cards import GENERATED_MARKER
from training.trainer import is_complete_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_evaluate_outside_training_only_measures(tmp_path):
    """A plain `Trainer.evaluate()` at step 0 (a new trainer on a finished run's folder, as a transformers user
    measures a model) replaced the run's best/ with the untrained model."""
    trainer = _trainer(tmp_path)
    assert trainer.evaluate()["eval_n_tiles"] == 3
    assert not trainer.best_model_dir.exists()
    trainer.best_model_dir.mkdir()
    (trainer.best_model_dir / "metrics.json").write_text('{"global_step": 2}')
    before = folder_digest(trainer.best_model_dir)
    trainer.evaluate()
    assert folder_digest(trainer.best_model_dir) == before


def test_dataloader_drop_last_drops_no_validation_tile(tmp_path):
    """`dataloader_drop_last` is for the training batches: with it, 3 validation tiles in batches of 2 were scored as
    2, and best/ was chosen on them."""
    trainer = _trainer(tmp_path, per_device_eval_batch_size=2, dataloader_drop_last=True)
    assert trainer.evaluate()["eval_n_tiles"] == 3
    assert len(trainer.get_train_dataloader()) == 2 and trainer.args.dataloader_drop_last  # training keeps it


def test_a_checkpoint_saved_with_save_only_model_is_refused_on_resume(tmp_path):
    """It has no optimizer, discriminator or counters: the resume failed with "this checkpoint has no discriminator,
    but this run trains one", whatever the settings."""
    settings = dict(eval_every_epochs=1, save_every_epochs=0.5, save_only_model=True)
    _trainer(tmp_path, callbacks=[StopAtStep(2)], **settings).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    with pytest.raises(ValueError) as error:
        _trainer(tmp_path, **settings).train(resume_from_checkpoint="latest")
    assert str(error.value) == (f"{checkpoint}: it holds the model only (saved with save_only_model): no optimizer, "
                                "discriminator or training counters to go on from, so it cannot be resumed; start a "
                                "new run, or train with save_only_model false to resume later")


def test_a_new_run_in_a_used_folder_keeps_none_of_its_log_and_names_its_checkpoints(tmp_path, caplog):
    """Run B in run A's folder: the log kept run A's step-0 evaluation, and nothing said that run A's newer
    checkpoint is what --resume latest would take."""
    _trainer(tmp_path, seed=0).train()  # run A: 2 epochs of 2 steps, checkpoints 2 and 4
    log = tmp_path / "out" / "training_log.jsonl"
    assert [r["step"] for r in records(log, "eval")] == [0, 2, 4]
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        _trainer(tmp_path, seed=1, num_train_epochs=1).train()  # run B: 1 epoch
    assert [r["step"] for r in records(log, "eval")] == [0, 2]
    assert f"{tmp_path / 'out'} holds checkpoints of an earlier run (checkpoint-2, checkpoint-4); this run starts " \
           "anew and replaces those at its own steps only" in caplog.text
    assert (tmp_path / "out" / "checkpoint-4").is_dir()  # kept: nothing that existed is deleted


def test_the_logged_total_is_the_loss_when_the_last_window_is_shorter(tmp_path):
    """5 tiles, batches of 1, accumulation 2: the epoch's last optimizer step has one micro-batch. The components were
    averaged over micro-batches, the Trainer's loss over optimizer steps, so `total` and `loss` differed."""
    trainer = _trainer(tmp_path, n_train=5, n_eval=0, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                       logging_steps=3, num_train_epochs=1, eval_every_epochs=None, save_every_epochs=None,
                       eval_strategy="no", save_strategy="no", max_samples=None)
    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(range(5))
    trainer.train()
    [logged] = records(tmp_path / "out" / "training_log.jsonl", "train")
    assert logged["step"] == 3 and logged["total"] == pytest.approx(logged["loss"], rel=1e-5)


def test_best_carries_the_project_card_before_the_run_ends(tmp_path):
    """best/README.md was peft's placeholder ("More Information Needed") until `finish_run`: after an interrupted
    run, and always through the Python API."""
    trainer = _trainer(tmp_path, callbacks=[StopAtStep(2)])
    trainer.train()
    card = (trainer.best_model_dir / "README.md").read_text()
    assert GENERATED_MARKER in card and "More Information Needed" not in card
    assert json.loads((trainer.best_model_dir / "metrics.json").read_text())["global_step"] in (0, 2)


def test_stage2_train_refuses_to_resume_a_model_only_checkpoint_before_anything_is_written(tmp_path,
                                                                                          sample_dataset_dir):
    from _data_helpers import folder_digest as digest
    from training.train import UsageError, main

    argv = ["--config", str(write_config(tmp_path / "tiny.yaml")), "--data_dir", str(sample_dataset_dir), "--output_dir", str(tmp_path / "o"),
            "--save_only_model", "true"]
    main(argv)
    before = digest(tmp_path / "o")
    with pytest.raises(UsageError, match=r"^--resume \S+checkpoint-\d+: it holds the model only \(saved with "
                                         r"save_only_model\)"):
        main([*argv, "--resume", "latest"])
    assert digest(tmp_path / "o") == before


class _EvaluateOnlyAtStep1(TrainerCallback):
    """Validation after step 1 only (no starting point): the best checkpoint is checkpoint-1."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_evaluate = state.global_step == 1
        return control


def test_a_stopped_run_keeps_the_checkpoint_it_stopped_at_under_save_total_limit_1(tmp_path):
    """save_total_limit 1, the best checkpoint older than the step a Ctrl-C (here `StopAtStep`) stopped at: the end of
    `train()` deleted every checkpoint but the best one, the one just written to resume from included, so
    `--resume latest` went back to step 1 (and stage2-train's message named a checkpoint that was gone)."""
    from training.trainer import find_latest_checkpoint

    trainer = _trainer(tmp_path, callbacks=[_EvaluateOnlyAtStep1(), StopAtStep(3)], save_total_limit=1,
                       save_every_epochs=0.5, eval_every_epochs=0.5, eval_on_start=False, num_train_epochs=3)
    trainer.train()
    out = tmp_path / "out"
    assert trainer.state.global_step == 3 and trainer.state.best_model_checkpoint == str(out / "checkpoint-1")
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    assert find_latest_checkpoint(out) == str(out / "checkpoint-3")


@pytest.mark.parametrize("earlier_run_mtime", [1e9, 2e9])  # older than run B's checkpoints / newer (clock skew)
def test_save_total_limit_rotates_only_this_runs_checkpoints_and_keeps_its_newest(tmp_path, earlier_run_mtime):
    """Run B (save_total_limit 1) in the folder of run A (checkpoints 1 to 4), which docs/training.md says keeps A's
    checkpoints but those at B's own steps: transformers' rotation, by modification time, deleted A's checkpoints at
    B's first save, or B's new checkpoints where A's looked newer (a clock skew; or saves less than a second apart,
    ordered by step: A's checkpoint-4 outranked B's)."""
    _trainer(tmp_path, seed=0, save_every_epochs=0.5, save_total_limit=None).train()
    out = tmp_path / "out"
    for path in out.glob("checkpoint-*"):
        os.utime(path, (earlier_run_mtime + _step(path), earlier_run_mtime + _step(path)))
    _trainer(tmp_path, seed=1, callbacks=[StopAtStep(2)], save_every_epochs=0.5, save_total_limit=1).train()
    seeds = {path.name: json.loads((path / "training_args.json").read_text())["seed"]
             for path in out.glob("checkpoint-*")}
    assert seeds == {"checkpoint-2": 1, "checkpoint-3": 0, "checkpoint-4": 0}  # B's newest; A's kept, not rotated
    assert all(is_complete_checkpoint(out / name) for name in seeds)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


@pytest.mark.parametrize("scripted_loss", [None, {1: 4.0, 2: 3.0, 3: 1.0, 4: 2.0}])
def test_load_best_model_at_end_puts_back_the_weights_of_best(tmp_path, scripted_loss):
    """`load_best_model_at_end` loaded the Trainer's best checkpoint: none when the starting point was the best (the
    model kept its last weights), and checkpoint-2 when step 3, which wrote no checkpoint, was the best."""
    trainer = _trainer(tmp_path, load_best_model_at_end=True, eval_every_epochs=0.5, save_every_epochs=1,
                       metric_for_best_model="eval_loss", eval_on_start=scripted_loss is None)
    if scripted_loss is not None:  # the best step, by a validation loss written for it, and the checkpoints
        measured = trainer.evaluate

        def evaluate(*args, **kwargs):
            return {**measured(*args, **kwargs), "eval_loss": scripted_loss[trainer.state.global_step]}

        trainer.evaluate = evaluate
    trainer.train()
    out = tmp_path / "out"
    best = json.loads((out / "best" / "metrics.json").read_text())
    if scripted_loss is None:
        assert trainer.state.best_global_step == best["global_step"] == 0
    else:
        assert trainer.state.best_global_step == best["global_step"] == 3
        assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")  # the Trainer's, from step 2
        trainer.evaluate = measured
    metrics = trainer.evaluate()
    for name in ("ndvi_rmse", "evi_rmse", "sam", "identity_l1"):  # the model of best/, not that of another step
        assert metrics[f"eval_refined_{name}"] == pytest.approx(best["refined"][name], rel=1e-6, abs=1e-9), name


def test_the_card_of_best_keeps_the_split_its_metrics_record(tmp_path):
    """The demo writes its test metrics into best/ after training; a resumed run that found no better model ends by
    writing best/'s card, which labelled them 'val': CardError after training had finished (exit 1, a traceback;
    reproduced with `stage2-train --resume latest --epochs 32` on the demo's folder)."""
    from huggingface_hub import ModelCard

    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train()
    best = trainer.best_model_dir
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["split"] == "val"
    (best / "metrics.json").write_text(json.dumps({**metrics, "split": "test", "n_tiles": 18}))
    card = ModelCard.load(trainer.write_card(best))
    assert {result.dataset_split for result in card.data.eval_results} == {"test"}
    assert "18 tiles of the `test` split" in card.text
    (best / "metrics.json").write_text(json.dumps({key: value for key, value in metrics.items() if key != "split"}))
    card = ModelCard.load(trainer.write_card(best))  # metrics that record no split: the evaluation's
    assert {result.dataset_split for result in card.data.eval_results} == {"val"}


def test_the_card_pushed_with_the_run_shows_its_own_records_and_their_split(tmp_path):
    """`Trainer.push_to_hub` writes the card through `create_model_card`, which copied best/'s records into the output
    folder only where best/ had them: an earlier run's metrics.json there stayed, was pushed, and its numbers shown. It
    also labelled best/'s test metrics (the demo's, kept by a resume that found no better model) with the validation
    split: CardError at the end of the run."""
    from training.metrics import METRIC_NAMES

    def metrics(ndvi_rmse: float, **extra) -> dict:
        refined = {name: 0.2 for name in METRIC_NAMES} | {"ndvi_rmse": ndvi_rmse}
        return {"refined": refined, "opt_v1": {name: 0.3 for name in METRIC_NAMES}, **extra}

    trainer = _trainer(tmp_path, n_eval=0, eval_strategy="no", save_strategy="no", eval_every_epochs=None,
                       save_every_epochs=None)
    out, best = Path(trainer.args.output_dir), trainer.best_model_dir
    trainer.save_best_model()  # no validation ran: best/ has no metrics.json
    assert not (best / "metrics.json").exists()
    (out / "metrics.json").write_text(json.dumps(metrics(0.0123, n_tiles=99)))  # an earlier run's
    trainer.create_model_card()
    assert not (out / "metrics.json").exists() and "0.0123" not in (out / "README.md").read_text()
    test_metrics = metrics(0.0456, n_tiles=18, split="test")
    (best / "metrics.json").write_text(json.dumps(test_metrics))
    trainer.create_model_card()
    assert json.loads((out / "metrics.json").read_text()) == test_metrics
    card = (out / "README.md").read_text()
    assert "0.0456" in card and "`test`" in card


def test_a_datasets_split_trains_as_stage2_train_wraps_it(tmp_path):
    """`Stage2Trainer(train_dataset=ds["train"], eval_dataset=ds["val"])` with the splits as `datasets` gives them
    (string columns among them), as docs/training.md allows: the default collator failed on the sidecar's labels
    ("too many dimensions 'str'") at the first batch. They are read as `stage2-train` reads them: the same losses
    and weights as the `TileDataset`s of the training (augmented, seed `args.seed`) and evaluation transforms."""
    from data_builders import make_eval_transform, make_train_transform
    from training.data import TileDataset
    from training.train import build_model, parse_args
    from training.trainer import Stage2Trainer

    def with_ids(rows, prefix):  # the string columns of a built dataset (`tile_id`, the sidecar's `labels` ...)
        rows = rows.add_column("tile_id", [f"{prefix}_{i}" for i in range(len(rows))])
        return rows.add_column("labels", [["Coniferous forest", "Pastures"]] * len(rows))

    train, evaluation = with_ids(tile_rows(4, 0), "train"), with_ids(tile_rows(3, 1), "val")
    results = {}
    for kind in ("datasets", "tile datasets"):
        config = write_config(tmp_path / "c.yaml", spectral_correction_init="identity")
        args = parse_args(["--config", str(config), "--output_dir", str(tmp_path / kind)])[0]
        splits = (train, evaluation) if kind == "datasets" else (
            TileDataset(train, make_train_transform(), seed=args.seed), TileDataset(evaluation, make_eval_transform()))
        trainer = Stage2Trainer(model=build_model(args, print_summary=False), args=args, train_dataset=splits[0],
                                eval_dataset=splits[1])
        trainer.train()
        losses = [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]
        weights = {name: value.detach().clone() for name, value in trainer.model.named_parameters()
                   if value.requires_grad}
        results[kind] = (losses, weights, trainer.evaluate(evaluation)["eval_n_tiles"])
    (losses, weights, tiles), (expected_losses, expected_weights, expected_tiles) = results.values()
    assert losses and losses == expected_losses and tiles == expected_tiles == 3
    assert weights.keys() == expected_weights.keys() and all(torch.equal(weights[n], expected_weights[n])
                                                             for n in weights)
