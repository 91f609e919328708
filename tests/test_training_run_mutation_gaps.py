"""Behaviour of how a training run reads its settings, checks its inputs and builds its data and model (`training.train`
up to the trainer's start) that plausible bugs used to get past the suite (a mutation audit; the supervisor half of
`training.train` and `training.args` have their own): blank paths, the launcher's check kept off the GPU, messages
naming the setting or flag, the token left out of `config.yaml`, the input checks (resume spellings, splits, Stage 1
folder, redraw, backbone weights), the dataset cache, the splits' settings, and the start model's quantization and
warning. No training runs: settings are parsed in process, checks called directly, and the trainer replaced."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from _training_helpers import refuse_exec, write_config

import training.train as train_module
from training.train import UsageError, parse_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _never_exec(monkeypatch):
    refuse_exec(monkeypatch)


def _error(argv, tmp_path, **settings) -> str:
    """The one-line `UsageError` of `parse_args` on the tiny settings (`settings` override them) and `argv`."""
    config = write_config(tmp_path / "x.yaml", **settings)
    with pytest.raises(UsageError) as caught:
        parse_args(["--config", str(config), *argv])
    assert "\n" not in str(caught.value)
    return str(caught.value)


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("key", ["output_dir", "data_dir"])
def test_a_path_of_blanks_is_refused_as_an_empty_one(key, tmp_path):
    """`--output_dir " "` is a folder named by a blank in the current folder, a path nobody means: refused like
    `""`, in the file and on the command line."""
    paths = {"output_dir": str(tmp_path / "out"), key: "  "}
    assert _error([], tmp_path, **paths).startswith(f"{tmp_path / 'x.yaml'}: {key} is an empty string: give a path")
    argv = [f"--{name}={value}" for name, value in paths.items()]
    assert _error(argv, tmp_path).startswith(f"--{key}: {key} is an empty string: give a path")


def test_the_launchers_check_of_the_settings_touches_no_device(tmp_path):
    """`stage2-train` checks the settings in its own process before it launches the trainer (`without_devices`):
    they must be parsed as for the CPU there, or the launcher takes a GPU the trainer then shares; the trainer's own
    parse keeps the devices the settings ask for."""
    argv = ["--config", str(write_config(tmp_path / "x.yaml")), "--output_dir", str(tmp_path / "out")]
    assert parse_args(argv, without_devices=True)[0].use_cpu is True
    assert parse_args(argv)[0].use_cpu is False


def test_the_model_check_called_on_its_own_names_the_setting(tmp_path):
    """`check_model_settings` without the sources of the settings (a Python caller) still names the setting whose
    value is wrong where the error itself does not."""
    from training.args import Stage2TrainingArguments

    args = Stage2TrainingArguments(output_dir=str(tmp_path / "out"), backbone_preset="prithvi_eo_v2_nope",
                                   report_to="none")
    with pytest.raises(UsageError, match=r"^backbone_preset: Unknown Prithvi preset 'prithvi_eo_v2_nope'; choose"):
        train_module.check_model_settings(args)


@pytest.mark.parametrize("flag, value, message", [
    ("--lora_r", "0", "--lora_r: lora_r must be a positive integer, got 0."),
    ("--lora_dropout", "1.5", "--lora_dropout: lora_dropout must be in [0, 1), got 1.5."),
])
def test_a_lora_setting_of_a_new_refiner_is_named_by_its_own_flag(flag, value, message, tmp_path):
    """The LoRA settings of a new refiner are checked before `refiner_config_overrides` are applied: a wrong one is
    named by its flag, not blamed on the overrides the run does not even set."""
    assert _error([flag, value, "--output_dir", str(tmp_path / "out")], tmp_path) == message


@pytest.mark.parametrize("value", ["[1, 2]", "5", '"head_width"'])
def test_refiner_config_overrides_that_are_no_mapping_are_named_so(value, tmp_path):
    """`--refiner_config_overrides` is JSON: valid JSON that is no object is refused as such, not read key by key
    (a list's items or a string's letters as unknown keys, an int as a traceback)."""
    line = _error(["--refiner_config_overrides", value, "--output_dir", str(tmp_path / "out")], tmp_path)
    assert line.startswith("--refiner_config_overrides: ") and "expected a mapping, got " in line, line


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_attention_implementation_is_a_refiner_config_override(attention, tmp_path):
    """`attn_implementation` is a `PretrainedConfig` argument outside its signature: an override of it is accepted
    and reaches the refiner's config."""
    config = write_config(tmp_path / "x.yaml", refiner_config_overrides={"head_width": 16,
                                                                         "attn_implementation": attention})
    training_args = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])[0]
    assert train_module.refiner_config(training_args)._attn_implementation == attention


def test_the_hub_token_is_never_written_to_the_run_config(tmp_path):
    """`config.yaml` is the run's settings to re-run it with: a `--hub_token` given on the command line stays out of
    it (the output folder may be pushed or shared); every other setting is there."""
    argv = ["--config", str(write_config(tmp_path / "x.yaml")), "--output_dir", str(tmp_path / "out"),
            "--hub_token", "hf_secret_token", "--learning_rate", "5e-4"]
    training_args, _, settings = parse_args(argv)
    assert settings["hub_token"] == "hf_secret_token"
    (tmp_path / "out").mkdir()
    recorded = train_module.write_run_config(tmp_path / "out", settings, training_args)
    assert "hf_secret_token" not in recorded.read_text()
    written = yaml.safe_load(recorded.read_text())
    assert "hub_token" not in written and written["learning_rate"] == 5e-4
    assert set(written) == set(settings) - {"hub_token"}


def test_a_start_model_setting_given_as_a_tuple_is_not_named_unused(tmp_path):
    """`unused_model_settings` compares a setting with the start model's config as values: overrides a Python caller
    gives as a tuple equal the config's list (JSON has no tuples) and are no setting the run does not use; a value
    that differs is named with the model's own."""
    config = write_config(tmp_path / "x.yaml", refiner_config_overrides={"head_width": 16, "feature_layers": [0, 1]})
    training_args = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])[0]
    model_config = train_module.refiner_config(training_args)
    training_args.refiner_config_overrides = {"head_width": 16, "feature_layers": (0, 1)}
    assert train_module.unused_model_settings(training_args, model_config) == {}
    training_args.refiner_config_overrides = {"head_width": 16, "feature_layers": (0,)}
    assert train_module.unused_model_settings(training_args, model_config) == {"feature_layers": ((0,), [0, 1])}


# ------------------------------------------------------------------------------------------- inputs
def _inputs(tmp_path, *argv):
    """(training, data) settings of a run on one NPZ tile per split in `tmp_path/tiles`, writing to `tmp_path/out`."""
    from _data_helpers import make_tile_dir

    tiles = tmp_path / "tiles"
    if not tiles.exists():
        make_tile_dir(tiles, per_split=1)
    argv = ["--config", str(write_config(tmp_path / "x.yaml")), "--data_dir", str(tiles), "--output_dir",
            str(tmp_path / "out"), *argv]
    return parse_args(argv)[:2]


@pytest.mark.parametrize("value", ["Latest", "LAST", "True", "true"])
def test_resume_latest_is_accepted_in_any_case(value, tmp_path, monkeypatch):
    """The trainer reads `--resume` latest/last/true in any case (`resolve_resume_checkpoint`): the input check must
    not take `--resume Latest` for a folder that does not exist."""
    from training.trainer import resolve_resume_checkpoint

    monkeypatch.chdir(tmp_path)
    training_args, data_args = _inputs(tmp_path, "--resume", value)
    for check_checkpoint in (False, True):
        train_module.check_run_inputs(training_args, data_args, check_checkpoint=check_checkpoint)
    assert resolve_resume_checkpoint(value, tmp_path / "out", warn=False) is None  # nothing to resume yet


def test_a_missing_stage1_folder_beside_npz_tiles_is_named(tmp_path):
    """NPZ tiles with `--stage1_dir` converted without the Stage 1 outputs would be a run on the wrong opt_v1: a
    folder that does not exist is refused before anything runs."""
    from training.train import MissingInputError

    training_args, data_args = _inputs(tmp_path, "--stage1_dir", str(tmp_path / "stage1"))
    stage1 = re.escape(str(tmp_path / "stage1"))
    with pytest.raises(MissingInputError, match=rf"^--stage1_dir {stage1}: no such folder\.$"):
        train_module.check_run_inputs(training_args, data_args)
    (tmp_path / "stage1").mkdir()
    train_module.check_run_inputs(training_args, data_args)


def test_backbone_weights_are_checked_only_for_a_new_refiner(tmp_path):
    """With `--model_name_or_path` the saved refiner brings its own backbone and `--backbone_weights` is not used:
    a path there that does not exist is no reason to refuse the run; without a start model it is."""
    from training.train import MissingInputError

    missing = str(tmp_path / "nope" / "Prithvi_EO_V2_600M.pt")
    training_args, data_args = _inputs(tmp_path, "--backbone_weights", missing)
    with pytest.raises(MissingInputError, match="^--backbone_weights "):
        train_module.check_run_inputs(training_args, data_args)
    training_args, data_args = _inputs(tmp_path, "--backbone_weights", missing, "--model_name_or_path",
                                       "someone/refiner")  # a Hub repo: checked once downloaded
    train_module.check_run_inputs(training_args, data_args)


@pytest.mark.parametrize("splits, eval_split, missing", [
    (["val", "test"], "val", "train"), (["train", "val"], "test", "test"), (["train", "test"], "test", None)])
def test_a_saved_dataset_needs_the_training_and_the_chosen_validation_split(splits, eval_split, missing, tmp_path):
    """An Arrow `--data_dir` is checked before the run for the splits it lists: 'train' and the one `--eval_split`
    names (not always 'val')."""
    import datasets

    data = tmp_path / "arrow"  # saved whole: a `dataset_dict.json` alone is refused as a damaged dataset first
    datasets.DatasetDict({split: datasets.Dataset.from_dict({"tile_id": ["a"]}) for split in splits}).save_to_disk(
        str(data))
    argv = ["--config", str(write_config(tmp_path / "x.yaml")), "--data_dir", str(data), "--output_dir",
            str(tmp_path / "out"), "--eval_split", eval_split]
    training_args, data_args, _ = parse_args(argv)
    if missing is None:
        train_module.check_run_inputs(training_args, data_args)
        return
    where = re.escape(str(data))
    with pytest.raises(UsageError, match=rf"^--data_dir {where}: the dataset has no '{missing}' split \(it has "):
        train_module.check_run_inputs(training_args, data_args)


def test_npz_tiles_are_converted_into_the_cache_folder_once_per_dataset_seed(tmp_path):
    """`--dataset_cache_dir` is where NPZ tiles are converted (the output folder is left alone), and the dataset
    seed, which draws the synthetic opt_v1, is part of the cache entry: another seed is another dataset."""
    from data_builders.build import BUILD_INFO_FILE

    cache = tmp_path / "cache"
    _, data_args = _inputs(tmp_path, "--dataset_cache_dir", str(cache), "--dataset_seed", "1")
    first = train_module.ensure_arrow_dataset(data_args, tmp_path / "out")
    assert first.parent == cache and not (tmp_path / "out").exists()
    data_args.dataset_seed = 2
    second = train_module.ensure_arrow_dataset(data_args, tmp_path / "out")
    assert second != first and second.parent == cache
    assert [json.loads((built / BUILD_INFO_FILE).read_text())["opt_v1"]["seed"] for built in (first, second)] == [1, 2]
    data_args.dataset_seed = 1
    assert train_module.ensure_arrow_dataset(data_args, tmp_path / "out", build=False) == first  # reused


def test_redraw_degradation_without_a_synthetic_opt_v1_is_refused_before_the_run(tmp_path):
    """`--redraw_degradation` draws the synthetic opt_v1 anew: NPZ tiles converted as `identity`, or an Arrow dataset
    without the record of a synthetic draw (made another way, or a record without its opt_v1), are refused by the
    input check in one line, not when training starts (or with a KeyError traceback)."""
    import datasets

    from data_builders.build import BUILD_INFO_FORMAT

    training_args, data_args = _inputs(tmp_path, "--redraw_degradation", "true", "--input_mode", "identity")
    with pytest.raises(UsageError, match=r"^--data_dir .*: --redraw_degradation cannot draw opt_v1 again: .*identity"):
        train_module.check_run_inputs(training_args, data_args)
    for name, description in (("plain", None), ("no_opt_v1", json.dumps({"format": BUILD_INFO_FORMAT}))):
        info = datasets.DatasetInfo(description=description)
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"tile_id": ["a"]}, info=info),
                              "val": datasets.Dataset.from_dict({"tile_id": ["b"]}, info=info)}
                             ).save_to_disk(str(tmp_path / name))
        data_args.data_dir, data_args.input_mode = str(tmp_path / name), None
        where = re.escape(str(tmp_path / name))
        with pytest.raises(UsageError, match=rf"^--data_dir {where}: --redraw_degradation cannot draw "):
            train_module.check_run_inputs(training_args, data_args)


# ------------------------------------------------------------------------------------------- splits
def _splits(train_rows: int = 3, eval_rows: int = 3):
    import datasets
    from _training_helpers import tile_rows

    return datasets.DatasetDict({"train": tile_rows(train_rows, 0), "val": tile_rows(eval_rows, 1)})


@pytest.mark.parametrize("augment", [False, True])
def test_the_splits_of_a_run_take_its_data_settings(augment, tmp_path):
    """`prepare_splits`: `max_samples` larger than the split keeps all of it, `max_eval_samples` cuts the validation
    split; the training split alone is augmented (flips with `--augment`, brightness), with the run's seed."""
    from training.args import Stage2DataArguments

    data_args = Stage2DataArguments(data_dir=str(tmp_path), max_samples=10, max_eval_samples=2, augment=augment,
                                    brightness_augment=[0.8, 1.25])
    train, evaluation = train_module.prepare_splits(_splits(), data_args, seed=7)
    assert (len(train), len(evaluation)) == (3, 2)
    assert train.transform.augment is augment and evaluation.transform.augment is False
    assert train.brightness_range == (0.8, 1.25) and evaluation.brightness_range is None
    assert train.seed == 7 and train.redraw is None
    cut = Stage2DataArguments(data_dir=str(tmp_path), max_samples=2, max_eval_samples=None)
    assert [len(split) for split in train_module.prepare_splits(_splits(), cut)] == [2, 3]


def test_a_dataset_without_a_batch_column_is_named_before_training(tmp_path):
    """A split lacking a column a batch needs is one line naming it (the valid mask may be absent: all valid)."""
    from training.args import Stage2DataArguments

    data_args = Stage2DataArguments(data_dir=str(tmp_path))
    dataset_dict = _splits()
    dataset_dict["train"] = dataset_dict["train"].remove_columns(["month", "valid_mask"])
    where = re.escape(str(tmp_path))
    with pytest.raises(UsageError, match=rf"^--data_dir {where}: the dataset lacks the columns \['month'\]; "):
        train_module.prepare_splits(dataset_dict, data_args)
    dataset_dict["train"] = _splits()["train"].remove_columns(["valid_mask"])
    train, _ = train_module.prepare_splits(dataset_dict, data_args)
    assert train.columns == ["target", "opt_v1", "month", "biome"]


def test_a_run_gives_the_trainer_its_seeded_splits_and_their_record(tmp_path, monkeypatch):
    """`run_training` hands the trainer the training split augmented under the run's `--seed` (not seed 0) and
    records the splits it trains and validates on; a failure there leaves no output folder."""
    import training.trainer as trainer_module

    given = {}

    class Stop(Exception):
        pass

    def trainer(**kwargs):
        given.update(kwargs)
        raise Stop

    monkeypatch.setattr(trainer_module, "Stage2Trainer", trainer)
    _splits(3, 3).save_to_disk(str(tmp_path / "d"))
    argv = ["--config", str(write_config(tmp_path / "x.yaml")), "--data_dir", str(tmp_path / "d"), "--output_dir",
            str(tmp_path / "out"), "--seed", "5", "--max_eval_samples", "2"]
    training_args, data_args, settings = parse_args(argv)
    with pytest.raises(Stop):
        train_module.run_training(training_args, data_args, settings)
    assert given["train_dataset"].seed == 5 and given["train_dataset"].transform.augment is True
    assert {key: given["training_config"][key] for key in ("data_dir", "train_tiles", "eval_tiles", "eval_split")} == {
        "data_dir": str(tmp_path / "d"), "train_tiles": 3, "eval_tiles": 2, "eval_split": "val"}
    assert given["training_config"]["redraw_degradation"] is None and "input_mode" in given["training_config"]
    assert not (tmp_path / "out").exists()


def _start_model_settings(tmp_path, *argv):
    """The tiny settings starting from a saved tiny refiner (spectral MLP of 8) in `tmp_path/start`."""
    from _refiner_helpers import tiny_refiner_config

    from modeling_stage2 import Stage2RefinerModel

    start = tmp_path / "start"
    Stage2RefinerModel(tiny_refiner_config(spectral_mlp_hidden_size=8)).save_pretrained(start)
    return parse_args(["--config", str(write_config(tmp_path / "x.yaml")), "--output_dir", str(tmp_path / "out"),
                       "--model_name_or_path", str(start), *argv])[0]


def test_only_the_process_that_logs_names_the_settings_a_start_model_does_not_use(tmp_path, caplog):
    """`build_model(print_summary=False)` (the processes of a distributed run that do not log) is quiet about the
    settings the start model's own config overrides: the warning comes once, from the process that logs."""
    training_args = _start_model_settings(tmp_path, "--spectral_mlp_hidden_size", "32")
    for print_summary in (False, True):
        caplog.clear()
        with caplog.at_level("WARNING", logger="training.train"):
            model = train_module.build_model(training_args, print_summary=print_summary)
        assert model.get_base_model().config.spectral_mlp_hidden_size == 8
        assert ("spectral_mlp_hidden_size 32 (the model's: 8)" in caplog.text) is print_summary


def test_a_start_model_is_built_with_the_runs_quantization(tmp_path):
    """`--quantization none` applies to a start model too (not `build_trainable_model`'s default, 8-bit)."""
    training_args = _start_model_settings(tmp_path)
    assert training_args.quantization == "none"
    model = train_module.build_model(training_args, print_summary=False)
    assert model.stage2_base_source.trained_quantization == "none"
    assert model.get_base_model().backbone.blocks[0].attn.qkv.base_layer.weight.dtype == torch.float32


@pytest.mark.parametrize("flag, value, what", [
    ("--backbone_weights", "someone/backbone", "downloading it from the Hub failed"),
    ("--model_name_or_path", "someone/refiner", "not a local folder, and downloading it from the Hub failed")])
def test_a_failed_hub_download_of_the_base_names_the_flag_that_asked_for_it(flag, value, what, tmp_path):
    """A Hub download of the run's base that fails is one line naming the flag of what was downloaded: the backbone
    weights of a new refiner, or the start model."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    from modeling_stage2.hub import HubUnavailableError

    argv = ["--config", str(write_config(tmp_path / "x.yaml")), "--output_dir", str(tmp_path / "out"), flag, value]
    training_args = parse_args(argv)[0]
    with pytest.raises(HubUnavailableError, match=rf"^{flag} {value}: {what} \(OfflineModeIsEnabled: "):
        with train_module._hub_base_failures(training_args):
            raise OfflineModeIsEnabled("offline mode is enabled")
