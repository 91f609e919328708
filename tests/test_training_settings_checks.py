"""How `stage2-train` reads and checks its settings, as a transformers user expects it (`HfArgumentParser`): a typo
in the YAML file named with the closest setting; settings that would be ignored or crash the run later (fp16 and
bf16 both true, an eval/save strategy overridden by the interval in epochs, an empty path, `report_to: null`, a bad
scheduler or checkpointing kwargs) refused in one line naming the file or flag, exit status 2, before any work."""
from __future__ import annotations

import dataclasses
import subprocess

import pytest
import yaml
from _training_helpers import refuse_exec, stage2_train_command, write_config

import training.train as train_module
from training.train import UsageError, launch_main, parse_args


@pytest.fixture(autouse=True)
def _never_exec(monkeypatch):
    refuse_exec(monkeypatch)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert captured.out == "" and len(lines) == 1, lines
    assert lines[0].startswith("stage2-train: ") and "Traceback" not in lines[0]
    return lines[0]


def _refused(argv, capsys, out) -> str:
    """`stage2-train ARGV` (in process): exit status 2, one line, no output folder; the line."""
    assert launch_main(argv) == 2
    line = _one_error_line(capsys)
    assert not out.exists()
    return line


def test_an_unknown_yaml_key_names_the_closest_setting(tmp_path, sample_tiles_dir, capsys):
    config = tmp_path / "x.yaml"
    config.write_text("lerning_rate: 1.0e-3\n")
    out = tmp_path / "out"
    line = _refused(["--config", str(config), "--data_dir", str(sample_tiles_dir), "--output_dir", str(out)], capsys,
                    out)
    assert line.startswith(f"stage2-train: error: {config}: unknown key 'lerning_rate' "
                           "(did you mean 'learning_rate'?). ")


@pytest.mark.parametrize("where", ["file", "flags", "full eval"])
def test_fp16_and_bf16_both_true_are_refused_on_any_machine(where, tmp_path, sample_tiles_dir, capsys):
    """On a machine without CUDA both were dropped (fp32) and the run went on; on a GPU the trainer failed after
    `stage2-train` had launched it (transformers refuses both), or picked fp16 where bf16 is unsupported."""
    out = tmp_path / "out"
    names = ("fp16_full_eval", "bf16_full_eval") if where == "full eval" else ("fp16", "bf16")
    if where == "flags":
        config, extra, source = write_config(tmp_path / "x.yaml"), ["--fp16", "--bf16"], "--"
    else:
        config, extra = write_config(tmp_path / "x.yaml", **dict.fromkeys(names, True)), []
        source = f"{config}: "
    line = _refused(["--config", str(config), "--data_dir", str(sample_tiles_dir), "--output_dir", str(out), *extra],
                    capsys, out)
    assert line.startswith(f"stage2-train: error: {source}")
    assert line.endswith(f"{names[0]} and {names[1]} are both true: set only one of them.")


def test_an_unknown_lr_scheduler_names_the_file_and_key(tmp_path, capsys):
    """transformers' own message named neither the file nor the key: "cosin is not a valid SchedulerType"."""
    config = write_config(tmp_path / "x.yaml", lr_scheduler_type="cosin")
    with pytest.raises(UsageError, match=rf"^{config}: lr_scheduler_type: expected one of \['linear', 'cosine'"):
        parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(UsageError, match=r"^argument --lr_scheduler_type.*invalid choice: 'cosin'"):
        parse_args(["--output_dir", str(tmp_path / "out"), "--lr_scheduler_type", "cosin"])
    training_args, _, _ = parse_args(["--output_dir", str(tmp_path / "out"), "--lr_scheduler_type", "linear"])
    assert training_args.lr_scheduler_type == "linear"


@pytest.mark.parametrize("value", ["{bad", "[1]"])
def test_bad_gradient_checkpointing_kwargs_name_the_key(value, tmp_path):
    """A JSON error without a name (or, for a JSON list, a TypeError traceback)."""
    config = write_config(tmp_path / "x.yaml", gradient_checkpointing=True, gradient_checkpointing_kwargs=value)
    with pytest.raises(UsageError, match=rf"^{config}: gradient_checkpointing_kwargs must be a mapping or a JSON "
                                         "object string"):
        parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    config = write_config(tmp_path / "ok.yaml", gradient_checkpointing=True,
                          gradient_checkpointing_kwargs='{"use_reentrant": true}')
    training_args, _, _ = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    assert training_args.activation_checkpointing_kwargs == {"use_reentrant": True}


@pytest.mark.parametrize("flag, value, unit", [("--eval_strategy", "no", "eval"),  # no: also the default value
                                               ("--eval_strategy", "epoch", "eval"), ("--save_strategy", "no", "save"),
                                               ("--eval_steps", "100", "eval"), ("--save_steps", "500", "save")])
def test_a_strategy_the_epoch_interval_would_override_is_refused(flag, value, unit, tmp_path):
    """`--save_strategy no` still saved every 10 epochs, `--eval_strategy epoch` still validated every 5: the
    `*_every_epochs` defaults replaced them without a word."""
    key = flag[2:]
    with pytest.raises(UsageError) as error:
        parse_args(["--output_dir", str(tmp_path / "out"), flag, value])
    assert str(error.value).startswith(f"{flag}: {key} has no effect while {unit}_every_epochs is ")
    assert f"set {unit}_every_epochs to 0 to use {key}" in str(error.value)
    config = write_config(tmp_path / "x.yaml", **{key: value if key.endswith("strategy") else int(value)})
    with pytest.raises(UsageError, match=rf"^{config}: {key} has no effect while {unit}_every_epochs"):
        parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    # with the interval in epochs off, the strategy applies
    training_args, _, _ = parse_args(["--output_dir", str(tmp_path / "out"), f"--{unit}_every_epochs", "0",
                                      f"--{unit}_strategy", "epoch"])
    assert getattr(training_args, f"{unit}_strategy") == "epoch"


def test_stage2_train_refuses_save_strategy_no_with_save_every_epochs(tmp_path, sample_tiles_dir, repo_root):
    """The console script: exit status 2, one line naming the flag, no output folder."""
    config, out = write_config(tmp_path / "run.yaml"), tmp_path / "out"
    result = subprocess.run([*stage2_train_command(), "--config", str(config), "--data_dir", str(sample_tiles_dir),
                             "--output_dir", str(out), "--save_strategy", "no"], cwd=repo_root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("stage2-train: error: --save_strategy: save_strategy has no "
                                                   "effect while save_every_epochs is 1"), lines
    assert result.stdout == "" and not out.exists()


@pytest.mark.parametrize("key", ["data_dir", "output_dir", "stage1_dir"])
def test_an_empty_path_is_refused(key, tmp_path, sample_tiles_dir, capsys, monkeypatch):
    """An empty path is the current folder: `data_dir: ""` converted every NPZ file under it (the bundled sample,
    from the checkout), `output_dir ''` wrote the run there."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    paths = {"data_dir": str(sample_tiles_dir), "output_dir": str(out), key: ""}
    config = write_config(tmp_path / "x.yaml", **paths)
    line = _refused(["--config", str(config)], capsys, out)
    assert line.startswith(f"stage2-train: error: {config}: {key} is an empty string: give a path")
    line = _refused(["--config", str(write_config(tmp_path / "y.yaml")), *(f"--{k}={v}" for k, v in paths.items())],
                    capsys, out)
    assert line.startswith(f"stage2-train: error: --{key}: {key} is an empty string: give a path")


def test_report_to_null_reports_to_nothing(tmp_path):
    """`report_to: null` passed the check and became [None], which the Trainer refuses once data and model are
    built."""
    from transformers.integrations.integration_utils import get_reporting_integration_callbacks

    config = write_config(tmp_path / "x.yaml", report_to=None)
    training_args, _, settings = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    assert training_args.report_to == [] and get_reporting_integration_callbacks(training_args.report_to) == []
    assert settings["report_to"] is None


def test_a_training_flag_before_the_separator_says_where_it_goes(tmp_path, sample_tiles_dir, capsys):
    config, out = write_config(tmp_path / "x.yaml"), tmp_path / "out"
    line = _refused(["--config", str(config), "--", "--data_dir", str(sample_tiles_dir), "--output_dir", str(out)],
                    capsys, out)
    assert line == ("stage2-train: error: accelerate option: unrecognized arguments: --config (training flags go after "
                    "`--`)")


# ----------------------------------------------------------------------------------------------- what the docs say
def test_relative_paths_in_the_yaml_file_are_relative_to_the_current_folder(tmp_path, sample_tiles_dir, monkeypatch):
    """docs/training.md: relative to the current directory, as on the command line, not to the file."""
    (tmp_path / "here").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "here" / "tiles").symlink_to(sample_tiles_dir)
    config = write_config(tmp_path / "configs" / "x.yaml", data_dir="tiles", output_dir="out")
    monkeypatch.chdir(tmp_path / "here")
    training_args, data_args, _ = parse_args(["--config", str(config)])
    train_module.check_run_inputs(training_args, data_args, check_checkpoint=False)  # ./tiles, not configs/tiles
    assert (data_args.data_dir, training_args.output_dir) == ("tiles", "out")
    assert "relative to the current directory" in " ".join(
        (train_module.Path(__file__).parents[1] / "docs" / "training.md").read_text(encoding="utf-8").split())


def test_the_recorded_config_reloads_to_the_same_settings_and_flags_win(tmp_path):
    config = write_config(tmp_path / "x.yaml", learning_rate="3e-4", augment="yes", eval_every_epochs=0,
                          eval_strategy="epoch", lora_target_modules=["qkv"], report_to=None)
    argv = ["--config", str(config), "--output_dir", str(tmp_path / "out"), "--learning_rate", "5e-4", "--no_augment",
            "--epochs", "3", "--fp16", "--brightness_augment", "0.5", "2", "--refiner_config_overrides",
            '{"head_width": 8}', "--lr_scheduler_type", "linear"]
    training_args, data_args, settings = parse_args(argv)
    assert training_args.learning_rate == 5e-4 and data_args.augment is False and training_args.num_train_epochs == 3
    (tmp_path / "out").mkdir()
    recorded = train_module.write_run_config(tmp_path / "out", settings, training_args)
    assert yaml.safe_load(recorded.read_text())["learning_rate"] == 5e-4
    again, data_again, settings_again = parse_args(["--config", str(recorded)])
    assert again.to_dict() == training_args.to_dict() and settings_again == settings
    assert dataclasses.asdict(data_again) == dataclasses.asdict(data_args)
