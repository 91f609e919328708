"""A second Ctrl-C while the checkpoint the first one asked for is written (`stage2-train` passes it on to the trainer
as SIGTERM, which stops it as SIGHUP does) leaves no part of that checkpoint behind and keeps the complete earlier one,
which `--resume latest` goes on from. In-process, the signals raised from inside the step and the save (no timing)."""
from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest
from _training_helpers import refuse_exec, write_config

import training.train as train_module
from training.trainer import (CHECKPOINT_COMPLETE_NAME, Stage2Trainer, checkpoint_marker, is_complete_checkpoint,
                              resolve_resume_checkpoint)


@pytest.fixture(autouse=True)
def _never_exec(monkeypatch):
    refuse_exec(monkeypatch)


def _interrupt_twice(monkeypatch, step: int, second: int) -> None:
    """Ctrl-C (SIGINT) as optimizer step `step` starts, `second` inside the save of its checkpoint once part of it is
    written (the model, the optimizer state)."""
    train_step, save_state = Stage2Trainer.training_step, Stage2Trainer._save_optimizer_and_scheduler
    sent = []

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 == step and not sent:
            sent.append(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return train_step(self, *args, **kwargs)

    def save_optimizer_and_scheduler(self, output_dir):
        save_state(self, output_dir)
        if self.state.global_step == step and sent == [signal.SIGINT]:
            sent.append(second)
            signal.raise_signal(second)  # its handler raises here, in the middle of the checkpoint

    monkeypatch.setattr(Stage2Trainer, "training_step", training_step)
    monkeypatch.setattr(Stage2Trainer, "_save_optimizer_and_scheduler", save_optimizer_and_scheduler)


# A checkpoint at each of the 2 optimizer steps (one epoch), one validation at its end, no other saves.
SETTINGS = dict(max_samples=2, max_eval_samples=1, per_device_train_batch_size=1, num_train_epochs=1,
                save_every_epochs=0.5, eval_every_epochs=1, eval_on_start=False, load_best_model_at_end=False)


def test_a_second_ctrl_c_during_the_checkpoint_save_removes_it_and_keeps_the_earlier_one(
        sample_dataset_dir, tmp_path, monkeypatch, caplog, default_dispositions):
    """Ctrl-C as step 2 starts, then a second one while its checkpoint is written, which `stage2-train` passes on to
    the trainer as SIGTERM (which stops it as SIGHUP does; the trainer's own Ctrl-C under `accelerate launch
    stage2-train` raises `KeyboardInterrupt` there instead: see the next test). Before: the torn `checkpoint-2`
    stayed, and the next `--resume latest` removed it with a warning ("an incomplete checkpoint left by an
    interrupted save")."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", **SETTINGS)
    argv = ["--config", str(config), "--data_dir", str(sample_dataset_dir), "--output_dir", str(out)]
    _interrupt_twice(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        train_module.cli(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert is_complete_checkpoint(out / "checkpoint-1")
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]  # no hidden leftovers either
    assert f"Removing {out / 'checkpoint-2'}" in caplog.text
    assert resolve_resume_checkpoint("latest", out) == str(out / "checkpoint-1")  # what --resume latest takes


def _fake_trainer(run_dir, step: int):
    """A `Stage2Trainer` with just what `_save_checkpoint` reads (the Trainer's own save is patched by the test)."""
    trainer = Stage2Trainer.__new__(Stage2Trainer)
    trainer.args = SimpleNamespace(should_save=True, save_total_limit=1)
    trainer.state = SimpleNamespace(global_step=step, best_model_checkpoint=None)
    trainer.accelerator = SimpleNamespace(wait_for_everyone=lambda: None)
    trainer._get_output_dir = lambda trial: str(run_dir)
    trainer._kept_checkpoints = set()
    return trainer


@pytest.mark.parametrize("stop, stopped_in", [(KeyboardInterrupt, "trainer save"), (SystemExit, "trainer save"),
                                              (SystemExit, "after the marker")])
def test_a_save_stopped_before_its_marker_goes_and_one_stopped_after_it_stays(tmp_path, monkeypatch, stop,
                                                                              stopped_in):
    """A second Ctrl-C (`KeyboardInterrupt`) or SIGTERM (`SystemExit`) inside the Trainer's save: the folder goes, the
    complete earlier checkpoint stays. Once the marker is in place (the signal came as its write flushed the folder)
    the checkpoint is complete: it stays."""
    from transformers import Trainer

    import training.trainer as trainer_module

    earlier = tmp_path / "checkpoint-2"
    earlier.mkdir()
    (earlier / "adapter_model.safetensors").write_bytes(b"earlier weights")
    (earlier / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps(checkpoint_marker(earlier, 2)))

    def write_checkpoint(self, model, trial):
        (tmp_path / "checkpoint-3").mkdir()
        (tmp_path / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"new weights")
        if stopped_in == "trainer save":
            raise stop()

    write_json = trainer_module.write_json

    def write_then_stop(*args, **kwargs):
        write_json(*args, **kwargs)
        raise stop()

    monkeypatch.setattr(Trainer, "_save_checkpoint", write_checkpoint)
    monkeypatch.setattr(trainer_module, "write_json", write_then_stop)
    trainer = _fake_trainer(tmp_path, 3)
    with pytest.raises(stop):
        trainer._save_checkpoint(model=None, trial=None)
    assert trainer.args.save_total_limit == 1
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left == (["checkpoint-2"] if stopped_in == "trainer save" else ["checkpoint-2", "checkpoint-3"])
    assert all(is_complete_checkpoint(tmp_path / name) for name in left)
