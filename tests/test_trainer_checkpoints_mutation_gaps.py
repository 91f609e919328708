"""Behaviour of the trainer's checkpoints, resume and best model that plausible bugs used to get past the suite (a
mutation audit of `training/trainer.py` beyond the loss and the steps): unreadable markers, missing files and a
checkpoint of another step named and never resumed, the latest checkpoint chosen by its step, torn ones removed and
skipped without a word, a deletion that cannot leave a marker behind, an earlier run's checkpoint replaced rather than
merged into, the rotation of `save_total_limit`, the discriminator's checkpoint part round-tripping exactly, what
`train` does before the loop, the evaluation's counts and loss, and the best model picked in the metric's direction.
Hand-made checkpoint folders and trainers without a model; one tiny trainer evaluates."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training.trainer import (
    CHECKPOINT_COMPLETE_NAME,
    TRAINER_EXTRA_STATE,
    Stage2Trainer,
    checkpoint_marker,
    checkpoint_problem,
    discriminator_resume_problem,
    find_latest_checkpoint,
    list_checkpoints,
    optimizer_state_from_safetensors,
    optimizer_state_to_safetensors,
    remove_checkpoint,
    resolve_resume_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checkpoint(root: Path, step: int, marker: bool = True, extra_state: bool = True) -> Path:
    """A `checkpoint-<step>` folder of two small files (and the trainer's extra state), with its completion marker."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(np.random.default_rng(step).bytes(2048))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if extra_state:
        (folder / TRAINER_EXTRA_STATE).write_text("{}")
    if marker:
        (folder / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps(checkpoint_marker(folder, step)))
    return folder


# ----------------------------------------------------------------------------------- verification
@pytest.mark.parametrize("text", ["{not json", json.dumps({"global_step": 3}),
                                  json.dumps({"global_step": 3, "files": ["adapter_model.safetensors"]})],
                         ids=["not-json", "no-files", "files-not-a-mapping"])
def test_an_unreadable_marker_is_named_and_skipped_not_raised(text, tmp_path, caplog):
    good = _checkpoint(tmp_path, 2)
    bad = _checkpoint(tmp_path, 3)
    (bad / CHECKPOINT_COMPLETE_NAME).write_text(text)
    assert checkpoint_problem(bad).startswith(f"the checkpoint is corrupt: {CHECKPOINT_COMPLETE_NAME} is unreadable (")
    with caplog.at_level("WARNING", logger="training.trainer"):
        assert resolve_resume_checkpoint("latest", tmp_path) == str(good)
    assert f"skipping {bad}: the checkpoint is corrupt: {CHECKPOINT_COMPLETE_NAME} is unreadable" in caplog.text
    with pytest.raises(ValueError, match="is unreadable"):
        resolve_resume_checkpoint(str(bad), tmp_path)


def test_a_file_the_marker_lists_that_is_gone_is_named(tmp_path):
    folder = _checkpoint(tmp_path, 4)
    (folder / "trainer_state.json").unlink()
    assert checkpoint_problem(folder) == "the checkpoint is corrupt: trainer_state.json is missing"
    assert find_latest_checkpoint(tmp_path) is None


def test_a_file_grown_past_its_recorded_size_fails_a_marker_without_hashes(tmp_path):
    folder = _checkpoint(tmp_path, 4)
    marker = json.loads((folder / CHECKPOINT_COMPLETE_NAME).read_text())
    (folder / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps({"global_step": 4, "files": marker["files"]}))
    with open(folder / "adapter_model.safetensors", "ab") as handle:
        handle.write(b"appended")
    assert checkpoint_problem(folder) == (f"the checkpoint is corrupt: adapter_model.safetensors has 2056 bytes, "
                                          f"{CHECKPOINT_COMPLETE_NAME} records 2048")


def test_a_checkpoint_of_another_step_copied_or_renamed_is_never_resumed(tmp_path, caplog):
    """The marker records the step it was written at: checkpoint-3 copied to checkpoint-5 verified file by file, was
    taken by --resume latest, said "global step 5" and went on from step 3 under the name of step 5."""
    import shutil

    original = _checkpoint(tmp_path, 3)
    copy = tmp_path / "checkpoint-5"
    shutil.copytree(original, copy)
    assert checkpoint_problem(original) is None
    assert checkpoint_problem(copy) == (f"the checkpoint is corrupt: {CHECKPOINT_COMPLETE_NAME} records step 3, not "
                                        "the 5 of checkpoint-5")
    with caplog.at_level("WARNING", logger="training.trainer"):
        assert resolve_resume_checkpoint("latest", tmp_path) == str(original)
    assert f"skipping {copy}: the checkpoint is corrupt: {CHECKPOINT_COMPLETE_NAME} records step 3" in caplog.text
    with pytest.raises(ValueError, match="records step 3, not the 5 of checkpoint-5"):
        resolve_resume_checkpoint(str(copy), tmp_path)
    shutil.copytree(original, tmp_path / "copied")  # not named for a step: nothing to compare with
    assert checkpoint_problem(tmp_path / "copied") is None


# ----------------------------------------------------------------------------------- the latest one
def test_the_latest_checkpoint_is_the_highest_step_that_verifies(tmp_path):
    """Steps compare as numbers (checkpoint-10 is newer than checkpoint-9), and the search goes newest first: the
    newest of several complete checkpoints is taken. Folders that are no `checkpoint-<number>` folder are no
    checkpoints."""
    for step in (2, 9, 10):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 12)
    (tmp_path / "checkpoint-12" / "trainer_state.json").write_text(json.dumps({"global_step": 13}))  # same size
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-20").write_text("a file, not a folder")
    assert find_latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_resume_checkpoint("latest", tmp_path, warn=False) == str(tmp_path / "checkpoint-10")
    assert [(step, path.name, complete) for step, path, complete in list_checkpoints(tmp_path)] == [
        (2, "checkpoint-2", True), (9, "checkpoint-9", True), (10, "checkpoint-10", True),
        (12, "checkpoint-12", False)]


def test_every_newer_corrupt_checkpoint_is_named_and_torn_ones_are_passed_over_without_a_word(tmp_path, caplog):
    good = _checkpoint(tmp_path, 2)
    for step in (4, 6):
        _checkpoint(tmp_path, step)
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step + 1}))
    _checkpoint(tmp_path, 8, marker=False)  # torn: the kill came before its marker
    with caplog.at_level("WARNING", logger="training.trainer"):
        assert resolve_resume_checkpoint("latest", tmp_path) == str(good)
    skipped = [record.getMessage() for record in caplog.records if "skipping" in record.getMessage()]
    assert skipped == [f"--resume latest: skipping {tmp_path / f'checkpoint-{step}'}: the checkpoint is corrupt: "
                       f"trainer_state.json does not match its sha256 in {CHECKPOINT_COMPLETE_NAME} (the folder is "
                       "kept, not deleted)." for step in (6, 4)]
    assert "checkpoint-8" not in caplog.text and f"falling back to {good}" in caplog.text

    for step in (4, 6):  # only torn ones above the good one: nothing to say
        remove_checkpoint(tmp_path / f"checkpoint-{step}")
    caplog.clear()
    with caplog.at_level("INFO", logger="training.trainer"):
        assert resolve_resume_checkpoint("latest", tmp_path) == str(good)
    assert caplog.records == []


def test_resume_values_that_mean_latest_or_none(tmp_path, caplog):
    """`Trainer.train(resume_from_checkpoint=True)` (the Trainer's own spelling) and "last" mean the latest; the
    checks that only look (warn=False) say nothing, as `train` says it once."""
    _checkpoint(tmp_path, 2)
    corrupt = _checkpoint(tmp_path, 4)
    (corrupt / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    with caplog.at_level("INFO", logger="training.trainer"):
        for value in (True, "last", "LATEST"):
            assert resolve_resume_checkpoint(value, tmp_path, warn=False) == str(tmp_path / "checkpoint-2")
        for value in (None, False, "", "none", "None"):
            assert resolve_resume_checkpoint(value, tmp_path) is None
    assert caplog.records == []


def test_resuming_from_a_file_is_no_such_checkpoint_folder(tmp_path):
    (tmp_path / "checkpoint-3").write_text("a file")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-3"), tmp_path)


def test_a_deleted_checkpoint_loses_its_marker_before_any_file(tmp_path, monkeypatch):
    """A kill during the deletion must leave a torn checkpoint (removed when training starts), never a marker that
    still vouches for it: here the deletion of the files is cut short."""
    import training.trainer as trainer_module

    folder = _checkpoint(tmp_path, 3)
    monkeypatch.setattr(trainer_module.shutil, "rmtree", lambda path, ignore_errors=False: None)
    remove_checkpoint(folder)
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / CHECKPOINT_COMPLETE_NAME).exists()
    assert checkpoint_problem(folder).startswith("the checkpoint is incomplete")


def test_only_torn_checkpoints_are_removed_when_training_starts(tmp_path, caplog):
    """Torn ones (no marker) go; a corrupt one with a marker is kept for the user to look at, as is a complete one."""
    complete, corrupt, torn = _checkpoint(tmp_path, 2), _checkpoint(tmp_path, 4), _checkpoint(tmp_path, 6, marker=False)
    (corrupt / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    with caplog.at_level("WARNING", logger="training.trainer"):
        Stage2Trainer._remove_torn_checkpoints(SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path))))
    assert complete.is_dir() and corrupt.is_dir() and not torn.exists()
    assert f"Removing {torn}: an incomplete checkpoint left by an interrupted save." in caplog.text
    assert str(corrupt) not in caplog.text


# ----------------------------------------------------------------------------------- save_total_limit
def _rotating_trainer(best: Path | None, kept: set[Path]):
    return SimpleNamespace(state=SimpleNamespace(best_model_checkpoint=None if best is None else str(best)),
                           _kept_checkpoints={path.resolve() for path in kept})


def test_rotation_deletes_the_oldest_of_this_runs_checkpoints_down_to_the_limit(tmp_path):
    folders = {step: _checkpoint(tmp_path, step) for step in (1, 2, 3, 4, 5, 6)}
    # checkpoint-5 belongs to another run (kept), checkpoint-2 is the best: neither counts or goes
    trainer = _rotating_trainer(best=folders[2], kept={folders[5]})
    deleted = Stage2Trainer._rotate_checkpoints(trainer, tmp_path, 3, folders[6])
    assert deleted == [folders[1], folders[3]]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-5",
                                                                "checkpoint-6"]
    assert Stage2Trainer._rotate_checkpoints(trainer, tmp_path, 3, folders[6]) == []  # at the limit: nothing goes
    assert Stage2Trainer._rotate_checkpoints(_rotating_trainer(None, set()), tmp_path, None, folders[6]) == []


def test_a_checkpoint_replaces_an_earlier_runs_one_of_its_step_and_then_rotates(tmp_path, monkeypatch, caplog):
    """An earlier run's checkpoint at the same step is deleted before the new one is written, not merged into (its
    discriminator would stay in a run that trains none, listed by the new marker); once the new marker is written,
    `save_total_limit` applies, and is the run's setting again afterwards."""
    from transformers import Trainer

    def write_checkpoint(self, model, trial):
        assert self.args.save_total_limit is None  # no rotation by the Trainer before the marker
        folder = tmp_path / "checkpoint-3"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"new weights")

    monkeypatch.setattr(Trainer, "_save_checkpoint", write_checkpoint)
    older = _checkpoint(tmp_path, 1)
    earlier = _checkpoint(tmp_path, 3)
    (earlier / "discriminator.safetensors").write_bytes(b"the earlier run's")
    (earlier / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps(checkpoint_marker(earlier, 3)))
    trainer = Stage2Trainer.__new__(Stage2Trainer)
    trainer.args = SimpleNamespace(should_save=True, save_total_limit=1)
    trainer.state = SimpleNamespace(global_step=3, best_model_checkpoint=None)
    trainer.accelerator = SimpleNamespace(wait_for_everyone=lambda: None)
    trainer._get_output_dir = lambda trial: str(tmp_path)
    trainer._kept_checkpoints = {earlier.resolve()}
    with caplog.at_level("WARNING", logger="training.trainer"):
        trainer._save_checkpoint(model=None, trial=None)
    assert f"Replacing {earlier}, a checkpoint of an earlier run at the same step (it verifies)." in caplog.text
    assert sorted(path.name for path in earlier.iterdir()) == ["adapter_model.safetensors", CHECKPOINT_COMPLETE_NAME]
    assert json.loads((earlier / CHECKPOINT_COMPLETE_NAME).read_text())["files"] == {"adapter_model.safetensors": 11}
    assert checkpoint_problem(earlier) is None and not older.exists() and trainer.args.save_total_limit == 1


# ----------------------------------------------------------------------------------- the discriminator's part
def test_the_fitted_record_of_a_resumed_run_comes_from_its_checkpoint(tmp_path):
    from training.trainer import _fitted_modules_record

    folder = _checkpoint(tmp_path, 2)
    fitted = {"spectral_correction_init": "least_squares", "out_of_range_fallback": "training_range"}
    (folder / TRAINER_EXTRA_STATE).write_text(json.dumps({"disc_steps": 2, "fitted_modules": {**fitted, "x": 1}}))
    assert _fitted_modules_record(folder) == fitted
    for state in ({"disc_steps": 2}, {"fitted_modules": None}, {"fitted_modules": ["least_squares"]}):
        (folder / TRAINER_EXTRA_STATE).write_text(json.dumps(state))  # written before it was kept, or damaged
        assert _fitted_modules_record(folder) == {}
    (folder / TRAINER_EXTRA_STATE).unlink()
    assert _fitted_modules_record(folder) == {}


def test_a_discriminator_that_does_not_fit_is_named_however_its_config_is_broken(tmp_path):
    from training.discriminator import CONFIG_NAME, PatchDiscriminator

    folder = _checkpoint(tmp_path, 2)
    PatchDiscriminator(base_channels=8, num_layers=2).save_pretrained(folder)
    same, other = PatchDiscriminator(base_channels=8, num_layers=2), PatchDiscriminator(base_channels=8, num_layers=3)
    assert discriminator_resume_problem(folder, same) is None
    assert discriminator_resume_problem(folder, None) is None  # the run trains none: nothing to fit
    assert "(disc_num_layers 2 there, 3 here)" in discriminator_resume_problem(folder, other)
    (folder / CONFIG_NAME).write_text("[8, 2]")
    assert discriminator_resume_problem(folder, same).startswith(
        "its discriminator does not fit the one these settings build (in_channels None there, 4 here, "
        "disc_base_channels None there, 8 here, disc_num_layers None there, 2 here,")
    (folder / CONFIG_NAME).write_text("{base_channels: 8")
    assert discriminator_resume_problem(folder, same).startswith(f"its {CONFIG_NAME} is unreadable (")

    model_only = _checkpoint(tmp_path, 4, extra_state=False)  # save_only_model: refused, with its own reason, elsewhere
    assert discriminator_resume_problem(model_only, same) is None


def test_optimizer_state_with_scalar_entries_round_trips_through_safetensors_and_json(tmp_path):
    from safetensors.torch import load_file, save_file

    exp_avg = torch.randn(3, 2)
    state = {"state": {0: {"step": 7, "exp_avg": exp_avg}, 1: {"step": 7.5, "flag": True}},
             "param_groups": [{"lr": 0.01, "betas": (0.5, 0.999), "params": [0, 1]}]}
    tensors, meta = optimizer_state_to_safetensors(state)
    save_file(tensors, str(tmp_path / "o.safetensors"))
    restored = optimizer_state_from_safetensors(load_file(str(tmp_path / "o.safetensors")),
                                                json.loads(json.dumps(meta)))
    assert set(restored["state"]) == {0, 1} and restored["state"][1] == {"step": 7.5, "flag": True}
    assert restored["state"][0]["step"] == 7 and torch.equal(restored["state"][0]["exp_avg"], exp_avg)
    assert restored["param_groups"] == [{"lr": 0.01, "betas": (0.5, 0.999), "params": [0, 1]}]


def _disc_trainer(seed: int):
    """What the saving and loading of a checkpoint's discriminator part use of the trainer: a PatchGAN and its AdamW,
    one step into training (`seed` draws both), and the trainer's counters."""
    from training.discriminator import PatchDiscriminator

    torch.manual_seed(seed)
    trainer = Stage2Trainer.__new__(Stage2Trainer)
    trainer.args = SimpleNamespace(should_save=True)
    trainer.discriminator = PatchDiscriminator(base_channels=4, num_layers=1)
    trainer.disc_optimizer = torch.optim.AdamW(trainer.discriminator.parameters(), lr=0.01, betas=(0.5, 0.999))
    trainer.discriminator(torch.rand(1, 4, 16, 16)).square().mean().backward()
    trainer.disc_optimizer.step()
    trainer.nonfinite_skipped_steps, trainer.disc_skipped_steps, trainer.disc_steps = seed, seed + 1, seed + 2
    trainer.training_config = {"spectral_correction_init": "least_squares", "out_of_range_fallback": None}
    return trainer


def test_the_discriminator_and_its_optimizer_resume_exactly_from_a_checkpoint(tmp_path, monkeypatch):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", lambda self, output_dir: None)
    monkeypatch.setattr(Trainer, "_load_optimizer_and_scheduler", lambda self, checkpoint: None)
    saved, resumed = _disc_trainer(3), _disc_trainer(11)
    Stage2Trainer._save_optimizer_and_scheduler(saved, str(tmp_path))
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))  # no pickle
    assert json.loads((tmp_path / TRAINER_EXTRA_STATE).read_text()) == {
        "nonfinite_skipped_steps": 3, "disc_skipped_steps": 4, "disc_steps": 5,
        "fitted_modules": {"spectral_correction_init": "least_squares", "out_of_range_fallback": None}}
    Stage2Trainer._load_optimizer_and_scheduler(resumed, str(tmp_path))
    assert (resumed.nonfinite_skipped_steps, resumed.disc_skipped_steps, resumed.disc_steps) == (3, 4, 5)
    for name, weight in saved.discriminator.state_dict().items():
        assert torch.equal(resumed.discriminator.state_dict()[name], weight), name
    want, got = saved.disc_optimizer.state_dict(), resumed.disc_optimizer.state_dict()
    assert got["param_groups"] == want["param_groups"] and want["state"].keys() == got["state"].keys()
    for index, entry in want["state"].items():
        for key, value in entry.items():
            assert torch.equal(got["state"][index][key], value), (index, key)


# ----------------------------------------------------------------------------------- the best model
@pytest.mark.parametrize("metric, values, best", [
    ("eval_refined_psnr", [20.0, 19.0, 21.0, 21.0], [20.0, 21.0]),
    ("eval_loss", [0.5, 0.6, 0.4, 0.45], [0.5, 0.4]),
])
def test_best_is_written_when_the_configured_metric_improves_in_its_direction(metric, values, best, tmp_path):
    from transformers import TrainerState

    from training.args import Stage2TrainingArguments

    trainer = Stage2Trainer.__new__(Stage2Trainer)
    trainer.args = Stage2TrainingArguments(output_dir=str(tmp_path), report_to="none", metric_for_best_model=metric)
    trainer.state = TrainerState()
    written = []
    trainer.save_best_model = lambda metrics: written.append(metrics[metric])
    for value in values:
        trainer._determine_best_metric({metric: value, "eval_n_tiles": 2}, trial=None)
    assert written == best and trainer.state.best_metric == best[-1]


# ----------------------------------------------------------------------------------- evaluation
def test_the_eval_metrics_count_every_tile_and_the_loss_only_those_with_a_valid_pixel(tmp_path):
    """`eval_n_tiles` counts the split's tiles; `eval_loss` is the mean over those with a valid pixel (an empty tile
    has no loss, it is not a 0 pulling the mean down). The metrics of the empty tile's split are those of the others."""
    import datasets
    from _training_helpers import tile_rows, tiny_trainer

    from data_builders import make_eval_transform
    from training.args import EVAL_METRIC_GROUPS
    from training.data import TileDataset
    from training.metrics import METRIC_NAMES

    trainer = tiny_trainer(tmp_path, n_train=2, n_eval=2, per_device_eval_batch_size=2)
    valid = trainer.evaluate()
    mixed = datasets.concatenate_datasets([tile_rows(2, 1), tile_rows(1, 2, valid=False)])
    metrics = trainer.evaluate(TileDataset(mixed, make_eval_transform()))
    names = {f"eval_{group}_{name}" for group in EVAL_METRIC_GROUPS for name in METRIC_NAMES}
    assert set(metrics) >= names | {"eval_loss", "eval_n_tiles"}
    assert (valid["eval_n_tiles"], metrics["eval_n_tiles"]) == (2, 3)
    assert valid["eval_loss"] > 0.01
    for name in names | {"eval_loss"}:
        assert metrics[name] == pytest.approx(valid[name], rel=1e-5, abs=1e-7), name


# ----------------------------------------------------------------------------------- train()
@pytest.mark.parametrize("resume", [None, "latest"])
def test_train_resumes_the_latest_clears_torn_ones_and_protects_only_newer_ones(resume, tmp_path, monkeypatch,
                                                                                  caplog):
    """What `train` does before the Trainer's loop: torn checkpoints removed; a resumed run goes on from the latest
    one that verifies, without evaluating its starting point again (the run that saved it did), and may rotate it
    and older ones but not the newer corrupt one; a new run says that the folder holds an earlier run's checkpoints."""
    from transformers import Trainer

    from training.args import Stage2TrainingArguments

    calls = []
    monkeypatch.setattr(Trainer, "train", lambda self, **kwargs: calls.append(kwargs) or "trained")
    complete, newer = _checkpoint(tmp_path, 2), _checkpoint(tmp_path, 4)
    (newer / "trainer_state.json").write_text(json.dumps({"global_step": 5}))  # corrupt: kept, never resumed
    torn = _checkpoint(tmp_path, 6, marker=False)
    trainer = Stage2Trainer.__new__(Stage2Trainer)
    trainer.args = Stage2TrainingArguments(output_dir=str(tmp_path), report_to="none", eval_on_start=True)
    trainer.eval_dataset, trainer.discriminator = ["a tile"], None
    trainer.start_fitted_modules = lambda checkpoint: {}
    with caplog.at_level("WARNING", logger="training.trainer"):
        assert trainer.train(resume_from_checkpoint=resume) == "trained"
    assert not torn.exists() and complete.is_dir() and newer.is_dir()
    assert calls[0]["resume_from_checkpoint"] == (None if resume is None else str(complete))
    assert trainer.args.eval_on_start is (resume is None)
    earlier = "holds checkpoints of an earlier run (checkpoint-2, checkpoint-4)"
    assert (earlier in caplog.text) is (resume is None)
    protected = {complete.resolve(), newer.resolve()} if resume is None else {newer.resolve()}
    assert trainer._kept_checkpoints == protected


@pytest.mark.parametrize("step, kwargs, candidate", [
    (0, {}, True), (0, {"metric_key_prefix": "test"}, False), (0, {"eval_dataset": ["a tile"]}, False),
    (1, {}, False)])
def test_only_the_evaluation_of_the_starting_point_in_training_is_a_candidate_for_best(step, kwargs, candidate,
                                                                                          monkeypatch):
    """Later evaluations are judged by the Trainer itself; one of another split or prefix (a test split measured in
    a callback) is no candidate: its metrics do not even hold `metric_for_best_model`."""
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "evaluate", lambda self, eval_dataset=None, ignore_keys=None,
                        metric_key_prefix="eval": {f"{metric_key_prefix}_loss": 0.5})
    judged = []
    trainer = Stage2Trainer.__new__(Stage2Trainer)
    trainer.is_in_train, trainer.state = True, SimpleNamespace(global_step=step)
    trainer._determine_best_metric = lambda metrics, trial: judged.append(metrics)
    metrics = trainer.evaluate(**kwargs)
    assert judged == ([metrics] if candidate else [])


def _best_trainer(output_dir: Path, training_config: dict):
    """What `Stage2Trainer.save_best_model` uses of the trainer, after an evaluation of 3 tiles at step 7."""
    results = {"refined": {"psnr": 30.0}, "opt_v1": {"psnr": 25.0}, "n_tiles": np.int64(3)}
    return SimpleNamespace(best_model_dir=output_dir / "best", model="model", last_eval_results=results,
                           accelerator=SimpleNamespace(unwrap_model=lambda model: model), eval_preview=None,
                           training_config=training_config, training_config_record=lambda: {"global_step": 7},
                           write_card=lambda folder: None, args=SimpleNamespace(metric_for_best_model="eval_loss",
                                                                                 quantization="none"),
                           state=SimpleNamespace(best_metric=0.5, global_step=7, epoch=1.5))


@pytest.mark.parametrize("training_config, split", [({}, "val"), ({"eval_split": "test"}, "test")])
def test_the_metrics_of_best_record_their_split_step_and_precision(training_config, split, tmp_path, monkeypatch):
    from modeling_stage2 import adapters

    monkeypatch.setattr(adapters, "save_trained_model", lambda model, folder: Path(folder).mkdir(exist_ok=True))
    best = Stage2Trainer.save_best_model(_best_trainer(tmp_path, training_config))
    assert json.loads((best / "metrics.json").read_text()) == {
        "refined": {"psnr": 30.0}, "opt_v1": {"psnr": 25.0}, "n_tiles": 3, "split": split, "global_step": 7,
        "epoch": 1.5, "quantization": "none"}


@pytest.mark.parametrize("adversarial", [False, True])
def test_the_training_record_names_discriminator_settings_only_for_a_run_that_trains_one(adversarial, tmp_path):
    from training.args import Stage2TrainingArguments

    args = Stage2TrainingArguments(output_dir=str(tmp_path), report_to="none", disc_learning_rate_ratio=0.5,
                                   disc_update_interval=2, seed=5)
    trainer = SimpleNamespace(args=args, loss_fn=SimpleNamespace(spectral_weight=1.0, adversarial_weight=0.1),
                              discriminator="a PatchGAN" if adversarial else None,
                              state=SimpleNamespace(global_step=9), training_config={"data_dir": "tiles"})
    record = Stage2Trainer.training_config_record(trainer)
    assert record["loss_weights"] == {"spectral_weight": 1.0, "adversarial_weight": 0.1}
    assert (record["disc_learning_rate_ratio"], record["disc_update_interval"]) == ((0.5, 2) if adversarial
                                                                                     else (None, None))
    assert (record["global_step"], record["seed"], record["data_dir"]) == (9, 5, "tiles")


def test_load_best_model_puts_back_a_best_folder_a_kill_left_set_aside(tmp_path):
    """A kill between the two renames of the last save of `best/` leaves it set aside: `load_best_model` (the end of
    training) restores and loads it, not the weights the model ended with."""
    from test_atomic_files import kill_between_renames

    best = tmp_path / "best"
    best.mkdir()
    (best / "adapter_model.safetensors").write_bytes(b"weights")
    kill_between_renames(best)
    loaded = []
    model = SimpleNamespace(active_adapter="default", load_adapter=lambda path, **kwargs: loaded.append((path, kwargs)))
    trainer = SimpleNamespace(best_model_dir=best, model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    assert Stage2Trainer.load_best_model(trainer) is True
    assert loaded == [(str(best), {"adapter_name": "default", "is_trainable": True})]
    assert (best / "adapter_model.safetensors").read_bytes() == b"weights"
