"""What a `Stage2Trainer` run leaves as a transformers user meets it: the best model when no evaluation
gave a comparable metric, `training_log.jsonl`, TensorBoard and checkpoints. Tiny in-memory tiles, the tiny training
settings of `_training_helpers`."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from _training_helpers import records, tiny_trainer as _trainer

from training.train import finish_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_run_whose_every_validation_gives_nan_ends_with_the_final_model_in_best(tmp_path, caplog, capsys):
    """Validation tiles without a valid pixel (or a model that diverged): every `eval_loss` is NaN, which never beats
    the Trainer's starting best (inf), so best/ was never written; `finish_run` took best_metric (inf, not None) for a
    validated run and failed on the missing folder (CardError traceback) after the whole run."""
    trainer = _trainer(tmp_path, eval_valid=False, metric_for_best_model="loss")
    trainer.train()
    assert [r["val"]["loss"] for r in records(tmp_path / "out" / "training_log.jsonl", "eval")] == [None] * 3
    assert trainer.state.best_metric == float("inf") and not trainer.best_model_dir.exists()
    with caplog.at_level(logging.WARNING, logger="training.train"):
        finish_run(trainer)
    assert "best/ holds the final model: every validation gave a NaN loss." in caplog.text
    assert (trainer.best_model_dir / "adapter_model.safetensors").is_file()
    assert (trainer.best_model_dir / "README.md").is_file()
    assert "(the final model: every validation gave a NaN loss)" in capsys.readouterr().out


@pytest.mark.parametrize("settings, why", [
    ({"metric_for_best_model": None}, "no metric_for_best_model picks one of the validations"),
    ({"eval_strategy": "no", "eval_every_epochs": None, "eval_on_start": False, "metric_for_best_model": None,
      "load_best_model_at_end": False},
     "no validation ran (eval strategy 'no')"),
])
def test_the_final_model_in_best_says_why_no_validation_picked_one(tmp_path, caplog, settings, why):
    """With `metric_for_best_model: null` the validations ran (and were logged), yet the warning said "no validation
    ran (eval strategy 'no')"."""
    trainer = _trainer(tmp_path, **settings)
    trainer.train()
    ran = records(tmp_path / "out" / "training_log.jsonl", "eval")
    assert len(ran) == (0 if settings.get("eval_strategy") == "no" else 3)
    with caplog.at_level(logging.WARNING, logger="training.train"):
        finish_run(trainer)
    assert f"best/ holds the final model: {why}." in caplog.text
    assert (trainer.best_model_dir / "adapter_model.safetensors").is_file()


def test_the_best_models_metrics_record_the_precision_they_were_measured_at(tmp_path):
    """`best/metrics.json` said nothing of the backbone's precision, so its card could not state it (as it does for
    `stage2-evaluate --json`)."""
    import json

    trainer = _trainer(tmp_path)
    trainer.train()
    best = json.loads((trainer.best_model_dir / "metrics.json").read_text())
    assert best["quantization"] == trainer.args.quantization == "none" and best["split"] == "val"
    card = (trainer.best_model_dir / "README.md").read_text()
    assert "measured with the backbone loaded in full precision (not quantized)." in card


def test_an_evaluation_line_gives_the_learning_rate_of_its_step(tmp_path):
    """The `lr` of an `eval` line was the scheduler's next rate (0.0 after the last step), the `train` line of the same
    step the rate that step used: two values at one step. Cosine over 4 steps from 1e-3, one evaluation per epoch."""
    _trainer(tmp_path).train()
    log = tmp_path / "out" / "training_log.jsonl"
    train = {r["step"]: r["lr"] for r in records(log, "train")}
    evals = {r["step"]: r["lr"] for r in records(log, "eval")}
    assert sorted(evals) == [0, 2, 4] and sorted(train) == [1, 2, 3, 4]
    assert evals[0] == pytest.approx(1e-3)  # before the first step: the rate it will use
    assert evals[2] == train[2] == pytest.approx(1e-3 * (1 + np.cos(np.pi / 4)) / 2)
    assert evals[4] == train[4] == pytest.approx(1e-3 * (1 + np.cos(3 * np.pi / 4)) / 2)


def test_an_evaluation_with_another_metric_key_prefix_is_an_eval_line(tmp_path):
    """`trainer.evaluate(test_set, metric_key_prefix="test")` (how a transformers user scores a test split) was
    written as a `summary` line of flat `test_...` keys, which the docs keep for the end of a `train()` call."""
    trainer = _trainer(tmp_path, num_train_epochs=1)
    trainer.train()
    metrics = trainer.evaluate(metric_key_prefix="test")
    line = records(tmp_path / "out" / "training_log.jsonl")[-1]
    assert line["event"] == "eval" and line["step"] == 2 and "val" not in line
    assert line["test"]["ndvi_rmse"] == metrics["test_refined_ndvi_rmse"]
    assert line["test"]["opt_v1"]["ndvi_rmse"] == metrics["test_opt_v1_ndvi_rmse"]
    assert line["test"]["n_tiles"] == 3 and line["test"]["loss"] == metrics["test_loss"]
    assert [r["event"] for r in records(tmp_path / "out" / "training_log.jsonl", "summary")] == ["summary"]
