"""A save at the step of an earlier complete checkpoint (another run's in the folder, or one a resumed run fell back
past) replaces it without ever losing it: the earlier one is set aside until the new one's marker is written. A save
stopped before that (a second Ctrl-C, SIGTERM) puts it back at once; a kill (SIGKILL, power loss) leaves it set aside,
and it goes back when training next starts, before `--resume latest` looks for the checkpoint to go on from. The kill
is the state of the folder at that moment of the real save (a copy made there), the Trainer's own save patched."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_second_interrupt_save import _fake_trainer
from test_trainer_checkpoints_mutation_gaps import _checkpoint

import training.trainer as trainer_module
from training.trainer import (CHECKPOINT_COMPLETE_NAME, REPLACED_CHECKPOINT_NAME, Stage2Trainer, checkpoint_marker,
                              file_sha256, find_latest_checkpoint, is_complete_checkpoint, list_checkpoints,
                              resolve_resume_checkpoint, restore_replaced_checkpoints)

STEP = 3


def _hashes(folder: Path) -> dict[str, str]:
    return {path.name: file_sha256(path) for path in sorted(folder.iterdir())}


def _earlier_run(run: Path) -> tuple[Path, dict[str, str]]:
    """A run folder with an older checkpoint and the complete `checkpoint-STEP` of an earlier run (with a
    discriminator: the new save must not merge into it), and the sha256 of each of its files."""
    _checkpoint(run, 1)
    earlier = _checkpoint(run, STEP, marker=False)
    (earlier / "discriminator.safetensors").write_bytes(b"the earlier run's")
    (earlier / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps(checkpoint_marker(earlier, STEP)))
    assert is_complete_checkpoint(earlier)
    return earlier, _hashes(earlier)


def _set_aside(folder: Path) -> Path:
    return folder.with_name(REPLACED_CHECKPOINT_NAME.format(folder.name))


def _write_new_checkpoint(folder: Path) -> None:
    """Part of what the Trainer's save writes (the earlier folder is not merged into: it is not there)."""
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"new weights")


# ----------------------------------------------------------------------------------- (a) a save that raises
@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("stopped_in", ["trainer save", "marker write"])
def test_a_replacing_save_stopped_before_its_marker_puts_the_earlier_checkpoint_back_intact(
        tmp_path, monkeypatch, caplog, stop, stopped_in):
    """Before: the earlier `checkpoint-3` was deleted before the new one was written, and a second Ctrl-C (or
    SIGTERM) in the save removed the torn new one too: nothing of step 3 was left, `--resume latest` went back to
    step 1."""
    from transformers import Trainer

    run = tmp_path / "run"
    earlier, hashes = _earlier_run(run)

    def write_checkpoint(self, model, trial):
        _write_new_checkpoint(earlier)
        if stopped_in == "trainer save":
            raise stop()

    def stop_writing(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(Trainer, "_save_checkpoint", write_checkpoint)
    if stopped_in == "marker write":
        monkeypatch.setattr(trainer_module, "write_json", stop_writing)
    with caplog.at_level("WARNING", logger="training.trainer"), pytest.raises(stop):
        _fake_trainer(run, STEP)._save_checkpoint(model=None, trial=None)
    assert sorted(path.name for path in run.iterdir()) == ["checkpoint-1", "checkpoint-3"]  # nothing set aside left
    assert _hashes(earlier) == hashes and is_complete_checkpoint(earlier)  # byte for byte the earlier one
    assert f"Restoring {earlier} from {_set_aside(earlier).name}" in caplog.text
    assert find_latest_checkpoint(run) == str(earlier)


# ----------------------------------------------------------------------------------- (b) a kill
@pytest.mark.parametrize("killed", ["before the trainer writes", "with part of it written"])
def test_a_replacing_save_killed_leaves_the_earlier_checkpoint_which_the_next_start_resumes(
        tmp_path, monkeypatch, caplog, killed):
    """What a SIGKILL in the save leaves (no `checkpoint-3`, or a torn one, and the earlier one set aside) is
    repaired when training next starts, before the checkpoint to resume from is looked for: `--resume latest` goes on
    from the earlier `checkpoint-3`, byte for byte. Before: the earlier one was already deleted, and the next start
    removed the torn one and went back to step 1."""
    from transformers import Trainer

    from training.args import Stage2TrainingArguments

    run, after_kill = tmp_path / "run", tmp_path / "after_kill"
    earlier, hashes = _earlier_run(run)

    def write_checkpoint(self, model, trial):
        if killed == "with part of it written":
            _write_new_checkpoint(earlier)
        shutil.copytree(run, after_kill)  # what a kill here leaves on the disk

    monkeypatch.setattr(Trainer, "_save_checkpoint", write_checkpoint)
    _fake_trainer(run, STEP)._save_checkpoint(model=None, trial=None)
    kept = after_kill / earlier.name
    assert [path.name for _, path, _ in list_checkpoints(after_kill)] == ["checkpoint-1"] + (
        [kept.name] if killed == "with part of it written" else [])  # the set-aside one is no checkpoint to list

    # the next start: `train` as `stage2-train --resume latest` calls it, the Trainer's loop patched
    calls, looked_for = [], []
    monkeypatch.setattr(Trainer, "train", lambda self, **kwargs: calls.append(kwargs) or "trained")
    trainer = Stage2Trainer.__new__(Stage2Trainer)
    trainer.args = Stage2TrainingArguments(output_dir=str(after_kill), report_to="none")
    trainer.eval_dataset, trainer.discriminator = ["a tile"], None
    trainer.start_fitted_modules = lambda checkpoint: looked_for.append(
        resolve_resume_checkpoint(checkpoint, after_kill, warn=False))
    with caplog.at_level("WARNING", logger="training.trainer"):
        assert trainer.train(resume_from_checkpoint="latest") == "trained"
    assert looked_for == [str(kept)] and calls[0]["resume_from_checkpoint"] == str(kept)
    assert _hashes(kept) == hashes
    assert sorted(path.name for path in after_kill.iterdir()) == ["checkpoint-1", "checkpoint-3"]
    assert f"Restoring {kept} from {_set_aside(kept).name}" in caplog.text


# ----------------------------------------------------------------------------------- (c) a complete replacement
def test_a_replacement_keeps_the_earlier_checkpoint_aside_until_the_new_marker_then_deletes_it(
        tmp_path, monkeypatch, caplog):
    """While the new `checkpoint-3` is written, the earlier one waits intact under another name that no listing
    takes; once the new marker is written it is deleted. A kill between the two (the new one complete, the earlier
    one still there) is settled at the next start the other way round: the new one stays, the earlier one goes."""
    from transformers import Trainer

    run, after_kill = tmp_path / "run", tmp_path / "after_kill"
    earlier, hashes = _earlier_run(run)
    during = []

    def write_checkpoint(self, model, trial):
        during.append((_hashes(_set_aside(earlier)), find_latest_checkpoint(run)))
        _write_new_checkpoint(earlier)

    write_json = trainer_module.write_json

    def write_marker_then_copy(*args, **kwargs):
        write_json(*args, **kwargs)
        shutil.copytree(run, after_kill)  # what a kill right after the marker leaves on the disk

    monkeypatch.setattr(Trainer, "_save_checkpoint", write_checkpoint)
    monkeypatch.setattr(trainer_module, "write_json", write_marker_then_copy)
    trainer = _fake_trainer(run, STEP)
    trainer.args.save_total_limit = None
    with caplog.at_level("WARNING", logger="training.trainer"):
        trainer._save_checkpoint(model=None, trial=None)
    assert during == [(hashes, str(run / "checkpoint-1"))]
    assert f"It is kept as {_set_aside(earlier).name} until the new one is complete." in caplog.text
    assert sorted(path.name for path in run.iterdir()) == ["checkpoint-1", "checkpoint-3"]
    assert is_complete_checkpoint(earlier) and _hashes(earlier) != hashes
    assert not (earlier / "discriminator.safetensors").exists()

    new = _hashes(after_kill / earlier.name)
    assert _set_aside(after_kill / earlier.name).is_dir()
    assert restore_replaced_checkpoints(after_kill) == []
    assert sorted(path.name for path in after_kill.iterdir()) == ["checkpoint-1", "checkpoint-3"]
    assert _hashes(after_kill / earlier.name) == new == _hashes(earlier)


def test_stage2_train_puts_a_set_aside_checkpoint_back_before_its_checks_look_for_it(tmp_path, monkeypatch):
    """`run_training` looks for the checkpoint to resume (whether it fits the settings, its base's revision, the
    fitted start) before `Stage2Trainer.train` runs: after a kill during a replacement those checks saw no
    `checkpoint-3`. It is back before the first of them, and stays back when the start then fails."""
    from types import SimpleNamespace

    import training.train as train_module
    from training.args import Stage2TrainingArguments

    run = tmp_path / "run"
    earlier, hashes = _earlier_run(run)
    earlier.rename(_set_aside(earlier))  # what a kill right after setting it aside leaves
    seen = []

    def first_step_of_the_start(training_args, work):
        seen.append(resolve_resume_checkpoint(training_args.resume_from_checkpoint, run, warn=False))
        raise RuntimeError("the start fails here")

    monkeypatch.setattr(train_module, "_main_process_first", first_step_of_the_start)
    args = Stage2TrainingArguments(output_dir=str(run), report_to="none", resume_from_checkpoint="latest")
    with pytest.raises(RuntimeError, match="the start fails here"):
        train_module.run_training(args, SimpleNamespace(dataset_cache_dir=None))
    assert seen == [str(earlier)] and _hashes(earlier) == hashes
    assert sorted(path.name for path in run.iterdir()) == ["checkpoint-1", "checkpoint-3"]
