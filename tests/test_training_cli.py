"""`stage2-train` as a user meets it: `--help`, one-line user errors with exit status 2, settings checked before
anything runs or is written, and the process tree under `accelerate launch` stopped by SIGTERM, SIGINT and the
launcher's death (issue 11, items 2, 3, 4 and 9)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _data_helpers import folder_digest, make_tile_dir
from _hub_helpers import hub_server  # noqa: F401  (fixture)
from _training_helpers import (TINY_SETTINGS, refuse_exec, stage2_train_command, tiles_with_unreadable_validation,
                               write_config)

import training.train as train_module
from training.args import Stage2TrainingArguments
from training.train import UsageError, launch_main, main, parse_args

ACCELERATE_WARNING = "were not passed to `accelerate launch`"


@pytest.fixture(autouse=True)
def _never_exec(monkeypatch):
    refuse_exec(monkeypatch)




def _error_lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""
    return [line for line in captured.err.splitlines() if line.strip()]


def _assert_one_line(lines: list[str], *fragments: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith("stage2-train: ") and "Traceback" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ----------------------------------------------------------------------------------------------- --help
def test_help_is_instant_names_the_command_and_the_separator(repo_root):
    # Instant: answered without importing torch, transformers or accelerate (those take 10-35 s to import).
    code = ("import sys; from training.train import launch_main; code = launch_main(['--help']); "
            "heavy = sorted({'torch', 'transformers', 'accelerate'} & set(sys.modules)); "
            "assert not heavy, heavy; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    script_help = subprocess.run([*stage2_train_command(), "--help"], cwd=repo_root, capture_output=True, text=True,
                                 timeout=120).stdout
    for output in (result.stdout, script_help):
        assert output.startswith("usage: stage2-train [ACCELERATE_OPTIONS --]")
        assert "Train the Stage 2 refiner" in output  # a description
        assert "Options before a `--` go to `accelerate launch`" in output
        assert "--help-all" in output and "exit status" in output


def test_help_flags_are_real_training_flags(capsys):
    real = train_module._aliases(train_module._parser())
    listed = [option for action in train_module._help_parser()._actions for option in action.option_strings
              if option.startswith("--") and option not in ("--help", "--help-all")]
    assert len(listed) >= 6
    assert [flag for flag in listed if flag[2:] not in real and flag != "--config"] == []
    assert launch_main(["--help-all"]) == 0
    output = capsys.readouterr().out
    assert output.startswith("usage: stage2-train") and "--brightness_augment" in output and "--config" in output


# ----------------------------------------------------------------------------------------------- user mistakes
@pytest.fixture
def tiny_config(tmp_path) -> Path:
    return write_config(tmp_path / "tiny.yaml")


def _user_mistakes(tmp_path: Path, tiny_config: Path, dataset: Path) -> dict:
    out = ["--output_dir", str(tmp_path / "out")]
    data = ["--data_dir", str(dataset)]
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"learning_rat": 3.0}))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    return {
        "output_dir under a file": (["--config", str(tiny_config), *data, "--output_dir", str(a_file / "out")],
                                    ["--output_dir", f"{a_file} is a file, so nothing can be written under it"]),
        "output_dir is a file": (["--config", str(tiny_config), *data, "--output_dir", str(a_file)],
                                 ["--output_dir", "is a file; give a folder path"]),
        "yaml key typo": (["--config", str(typo), *data, *out], [str(typo), "unknown key 'learning_rat'"]),
        "bad --data_dir": (["--config", str(tiny_config), "--data_dir", str(tmp_path / "nowhere"), *out],
                           ["--data_dir", "nowhere", "no such folder"]),
        "cli flag typo": (["--config", str(tiny_config), *data, *out, "--lerning_rate", "3"],
                          ["--lerning_rate", "did you mean --learning_rate"]),
        "cli value type": (["--config", str(tiny_config), *data, *out, "--learning_rate", "fast"],
                           ["--learning_rate", "'fast'"]),
        "unreadable config": (["--config", str(binary), *data, *out], [str(binary), "cannot read"]),
        "config is a folder": (["--config", str(tmp_path), *data, *out], ["--config", str(tmp_path), "not a file"]),
        "missing config": (["--config", str(tmp_path / "absent.yaml"), *data, *out], ["absent.yaml", "no such file"]),
        "range on the command line": (["--config", str(tiny_config), *data, *out, "--disc_update_interval", "0"],
                                      ["--disc_update_interval", ">= 1"]),
        "inherited range on the command line": (
            ["--config", str(tiny_config), *data, *out, "--per_device_train_batch_size", "0"],
            ["--per_device_train_batch_size: per_device_train_batch_size must be >= 1, got 0."]),
        "missing resume checkpoint": (["--config", str(tiny_config), *data, *out, "--resume", str(tmp_path / "ck")],
                                      ["--resume", "no such checkpoint folder"]),
        "accelerate option typo": (["--num_procs", "2", "--", "--config", str(tiny_config), *data, *out],
                                   ["accelerate option", "--num_procs"]),
        "training flag before --": (["--config", str(tiny_config), "--", *data, *out],
                                    ["accelerate option", "--config"]),
        # an Arrow dataset holds its own opt_v1: flags that would make another one are refused, not ignored
        "stage1_dir with an Arrow dataset": (["--config", str(tiny_config), *data, *out, "--stage1_dir", str(tmp_path)],
                                             [f"--stage1_dir applies to NPZ tiles; --data_dir {dataset} is an Arrow "
                                              "dataset, which holds its own opt_v1 (input_mode 'synthetic'): build "
                                              "one from the Stage 1 outputs with stage2-build-dataset --stage1_dir "
                                              f"{tmp_path}, or give the NPZ tiles."]),
        "input_mode unlike the Arrow dataset's": (
            ["--config", str(tiny_config), *data, *out, "--input_mode", "identity"],
            [f"--input_mode identity: --data_dir {dataset} is an Arrow dataset, which holds its own opt_v1 "
             "(input_mode 'synthetic'); drop the flag, or build the dataset again with stage2-build-dataset "
             "--input_mode identity."]),
    }


MISTAKES = ["output_dir under a file", "output_dir is a file", "yaml key typo", "bad --data_dir", "cli flag typo", "cli value type", "unreadable config",
            "config is a folder", "missing config", "range on the command line", "inherited range on the command line",
            "missing resume checkpoint", "accelerate option typo", "training flag before --",
            "stage1_dir with an Arrow dataset", "input_mode unlike the Arrow dataset's"]


@pytest.mark.parametrize("case", MISTAKES)
def test_user_mistakes_are_one_line_and_status_2(case, tmp_path, tiny_config, sample_dataset_dir, capsys):
    argv, fragments = _user_mistakes(tmp_path, tiny_config, sample_dataset_dir)[case]
    assert launch_main(argv) == 2
    _assert_one_line(_error_lines(capsys), *fragments)
    assert not (tmp_path / "out").exists()  # nothing was started or written


@pytest.mark.parametrize("settings, message", [
    ({"refiner_config_overrides": {"head_width": "sixteen", "num_convnext_blocks": 2}},
     "refiner_config_overrides: head_width must be a positive integer, got 'sixteen'"),
    ({"refiner_config_overrides": {"head_widht": 16}}, "refiner_config_overrides: unknown key 'head_widht'"),
    ({"brightness_augment": 0.5}, "brightness_augment: expected a list of floats or null, got 0.5"),
    ({"brightness_augment": [0.5, float("inf")]},
     "brightness_augment must be LOW HIGH with 0 < LOW <= HIGH, both finite"),
    ({"learning_rate": "fast"}, "learning_rate: expected a float, got 'fast'"),
    ({"per_device_train_batch_size": 2.5}, "per_device_train_batch_size: expected an integer, got 2.5"),
    ({"fp16": "maybe"}, "fp16: expected true or false, got 'maybe'"),
    ({"num_train_epochs": None}, "num_train_epochs: expected a float, got null"),
    ({"quantization": "2bit"}, "quantization: expected one of ['8bit', '4bit', 'none'], got '2bit'"),
    ({"near_black_keep": "bands"}, "near_black_keep: expected one of ['pixel', 'ndvi'], got 'bands'"),
    ({"backbone_preset": "prithvi_eo_v9"}, "backbone_preset: Unknown Prithvi preset 'prithvi_eo_v9'"),
    ({"disc_update_interval": 0}, "disc_update_interval must be >= 1, got 0"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1, got 0"),
    ({"learning_rate": -1.0}, "learning_rate must be a finite number > 0, got -1.0"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0, got nan"),  # named as the file's
])
def test_config_type_errors_name_file_and_key(settings, message, tmp_path, sample_dataset_dir, capsys):
    config = write_config(tmp_path / "x.yaml", **settings)
    with pytest.raises(UsageError) as error:
        parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    assert str(error.value).startswith(f"{config}: ") and message in str(error.value)
    argv = ["--config", str(config), "--data_dir", str(sample_dataset_dir), "--output_dir", str(tmp_path / "out")]
    assert launch_main(argv) == 2
    _assert_one_line(_error_lines(capsys), f"{config}: ", message)
    assert not (tmp_path / "out").exists()


# Inherited TrainingArguments values that transformers leaves unchecked and that crashed a started run (a zero batch
# size, an optimizer or numpy refusing the value) or trained nothing with exit status 0.
BAD_TRAINER_VALUES = [
    ("learning_rate", float("nan"), {}), ("learning_rate", -1.0, {}), ("learning_rate", 0.0, {}),
    ("learning_rate", float("inf"), {}),
    ("per_device_train_batch_size", 0, {}), ("per_device_eval_batch_size", 0, {}),
    ("gradient_accumulation_steps", 0, {}),
    ("max_steps", -5, {"num_train_epochs": 0.0}), ("max_steps", 0, {}),
    ("num_train_epochs", -3.0, {}), ("num_train_epochs", 0.0, {}), ("num_train_epochs", float("nan"), {}),
    ("warmup_steps", -1.0, {}), ("warmup_steps", float("nan"), {}),
    ("weight_decay", -1.0, {}), ("weight_decay", float("nan"), {}),
    ("adam_beta1", 1.0, {}), ("adam_beta1", -0.1, {}), ("adam_beta2", 1.0, {}),
    ("adam_epsilon", 0.0, {}), ("max_grad_norm", -1.0, {}), ("dataloader_num_workers", -1, {}),
    ("seed", -1, {}), ("seed", 2**32, {}), ("data_seed", -1, {}), ("save_total_limit", -2, {}),
]


@pytest.mark.parametrize("name, value, others", BAD_TRAINER_VALUES,
                         ids=[f"{name}={value}" for name, value, _ in BAD_TRAINER_VALUES])
def test_inherited_trainer_values_out_of_range_are_refused(name, value, others, tmp_path):
    with pytest.raises(ValueError) as error:
        Stage2TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", **{name: value, **others})
    assert str(error.value).startswith(f"{name} must be ") and str(error.value).endswith(f", got {value}.")


@pytest.mark.parametrize("values", [
    {"learning_rate": 1e-9}, {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1},
    {"gradient_accumulation_steps": 1}, {"max_steps": -1, "num_train_epochs": 1},
    {"max_steps": 5, "num_train_epochs": 0},  # max_steps > 0: the epochs are not used
    {"warmup_steps": 0}, {"warmup_steps": 0.5}, {"warmup_steps": 10}, {"weight_decay": 0.0},
    {"adam_beta1": 0.0, "adam_beta2": 0.999999}, {"adam_epsilon": 1e-12}, {"max_grad_norm": 0.0},
    {"dataloader_num_workers": 0}, {"seed": 0}, {"seed": 2**32 - 1}, {"data_seed": 0}, {"data_seed": 2**32 - 1},
    {"save_total_limit": 0}, {"save_total_limit": None}, {"save_total_limit": 1},
], ids=str)
def test_inherited_trainer_values_at_their_bounds_are_accepted(values, tmp_path):
    args = Stage2TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", **values)
    assert {name: getattr(args, name) for name in values} == values


@pytest.mark.parametrize("where", ["flag", "config key"])
def test_stage2_train_refuses_an_inherited_value_before_any_work(where, tmp_path, sample_tiles_dir, repo_root):
    """The console script: one line naming the flag or the file and key, exit status 2, and neither the output folder
    nor a converted dataset (NPZ tiles are converted into OUTPUT_DIR/_dataset) is left behind."""
    out = tmp_path / "out"
    if where == "flag":
        config = write_config(tmp_path / "run.yaml")
        extra, expected = ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps: "
    else:
        config = write_config(tmp_path / "run.yaml", seed=-1)
        extra, expected = [], f"{config}: "
    result = subprocess.run([*stage2_train_command(), "--config", str(config), "--data_dir", str(sample_tiles_dir),
                             "--output_dir", str(out), *extra], cwd=repo_root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    message = ("gradient_accumulation_steps must be >= 1, got 0." if where == "flag"
               else "seed must be in 0..4294967295 (numpy's seed range), got -1.")
    assert lines == [f"stage2-train: error: {expected}{message}"]
    assert result.stdout == "" and not out.exists()


def test_yaml_values_are_converted_to_their_field_types(tmp_path):
    config = write_config(tmp_path / "x.yaml", learning_rate="2e-4", per_device_train_batch_size=2.0, fp16="no",
                          brightness_augment=[1, 2], report_to=["tensorboard"])
    training_args, data_args, settings = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "o")])
    assert training_args.learning_rate == 2e-4 and training_args.per_device_train_batch_size == 2
    assert isinstance(training_args.per_device_train_batch_size, int) and training_args.fp16 is False
    assert data_args.brightness_augment == [1.0, 2.0] and training_args.report_to == ["tensorboard"]
    assert settings["learning_rate"] == 2e-4


def test_model_config_json_type_error_names_file_and_key(tmp_path, tiny_config, sample_dataset_dir, capsys):
    from modeling_stage2 import Stage2RefinerConfig

    folder = tmp_path / "model"
    Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", head_width=16).save_pretrained(folder)
    values = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**values, "head_width": "sixteen"}))
    with pytest.raises(ValueError, match=r"^head_width must be a positive integer, got 'sixteen'"):
        Stage2RefinerConfig.from_pretrained(folder)
    for key, value in (("layer_scale_init_value", "tiny"), ("feature_layers", ["a", 1])):
        with pytest.raises(ValueError, match=key):
            Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", **{key: value})
    argv = ["--config", str(tiny_config), "--model_name_or_path", str(folder), "--data_dir", str(sample_dataset_dir),
            "--output_dir", str(tmp_path / "out")]
    assert launch_main(argv) == 2
    _assert_one_line(_error_lines(capsys), f"{folder / 'config.json'}: head_width must be a positive integer")


def test_start_model_must_be_a_readable_full_refiner(tmp_path, tiny_config, sample_dataset_dir, capsys):
    import torch

    from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel
    from modeling_stage2.adapters import build_trainable_model, save_trained_model

    torch.manual_seed(0)
    config = Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", head_width=16, num_convnext_blocks=1)
    adapter = save_trained_model(build_trainable_model(config, quantization="none", print_summary=False),
                                 tmp_path / "best")
    full = tmp_path / "full"
    Stage2RefinerModel(config).save_pretrained(full)
    weights = full / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "out"
    for folder, fragments in (
            (adapter, [f"--model_name_or_path {adapter}: a trained adapter", "export_merged_model"]),
            (full, [f"--model_name_or_path {weights}: not a readable safetensors file"])):
        argv = ["--config", str(tiny_config), "--model_name_or_path", str(folder), "--data_dir",
                str(sample_dataset_dir), "--output_dir", str(out)]
        assert launch_main(argv) == 2
        _assert_one_line(_error_lines(capsys), *fragments)
        assert not out.exists()


@pytest.mark.parametrize("weights, fragment", [
    ("{tmp}/nope/Prithvi_EO_V2_600M.pt", "--backbone_weights '{tmp}/nope/Prithvi_EO_V2_600M.pt' is neither an "
                                         "existing folder or file nor a Hub id"),
    ("checkpoints/Prithvi_EO_V2_600M.pt", "--backbone_weights 'checkpoints/Prithvi_EO_V2_600M.pt' is neither"),
    ("someone/my-backbone", "--backbone_weights someone/my-backbone: Cannot infer the checkpoint file"),
    ("{tmp}", "--backbone_weights folder {tmp} has no config.json"),
])
def test_backbone_weights_are_checked_before_the_run(weights, fragment, tmp_path, tiny_config, sample_dataset_dir,
                                                     capsys):
    argv = ["--config", str(tiny_config), "--data_dir", str(sample_dataset_dir), "--output_dir",
            str(tmp_path / "out"), "--backbone_weights", weights.format(tmp=tmp_path)]
    assert launch_main(argv) == 2
    _assert_one_line(_error_lines(capsys), fragment.format(tmp=tmp_path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--report_to", "wandbx"], "report_to: 'wandbx' is not an integration transformers has; choose among"),
    (["--report_to", "tensorbord"], "report_to: 'tensorbord' is not an integration"),
    (["--push_to_hub", "true", "--hub_model_id", "bad id!"], "hub_model_id 'bad id!' is not a Hub repo id"),
    (["--spectral_weight", "-1"], "spectral_weight must be a finite number >= 0, got -1"),
    (["--disc_num_layers", "0"], "disc_num_layers must be an integer >= 1, got 0"),
    (["--disc_base_channels", "0"], "disc_base_channels must be an integer >= 1, got 0"),
    (["--dataloader_num_workers", "1", "--dataloader_persistent_workers", "true"],
     "dataloader_persistent_workers must be false (the data are drawn per epoch in the workers"),
])
def test_settings_built_only_by_the_trainer_are_checked_before_the_run(flags, fragment, tmp_path, tiny_config, sample_dataset_dir, capsys):
    argv = ["--config", str(tiny_config), "--data_dir", str(sample_dataset_dir), "--output_dir",
            str(tmp_path / "out"), *flags]
    assert launch_main(argv) == 2
    _assert_one_line(_error_lines(capsys), fragment)
    assert not (tmp_path / "out").exists()
    for good in (["--report_to", "none"], ["--report_to", "tensorboard"], ["--hub_model_id", "me/stage2"]):
        parse_args(["--config", str(tiny_config), "--output_dir", str(tmp_path / "o"), *good])


def test_output_dir_is_required(tmp_path, tiny_config, sample_dataset_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert launch_main(["--config", str(tiny_config), "--data_dir", str(sample_dataset_dir)]) == 2
    _assert_one_line(_error_lines(capsys), "--output_dir is required")
    assert not (tmp_path / "trainer_output").exists()


@pytest.mark.parametrize("name", ["eval_nonsense", "refined_ndvi", "eval_linear_fit_sam"])
def test_metric_for_best_model_must_be_an_evaluation_metric(name, tmp_path, tiny_config, sample_dataset_dir, capsys):
    argv = ["--config", str(tiny_config), "--data_dir", str(sample_dataset_dir), "--output_dir",
            str(tmp_path / "out"), "--metric_for_best_model", name]
    assert launch_main(argv) == 2
    _assert_one_line(_error_lines(capsys), "metric_for_best_model must be one of the evaluation's metrics",
                     "eval_loss, eval_refined_ndvi_rmse", f"got {name!r}")
    assert not (tmp_path / "out").exists()
    for good in ("loss", "eval_loss", "refined_psnr", "eval_opt_v1_sam"):
        args, _, _ = parse_args(["--config", str(tiny_config), "--output_dir", str(tmp_path / "o"),
                                 "--metric_for_best_model", good])
        assert args.metric_for_best_model == good
    assert args.greater_is_better is False and parse_args(
        ["--config", str(tiny_config), "--output_dir", str(tmp_path / "o"), "--metric_for_best_model",
         "refined_psnr"])[0].greater_is_better is True


# ----------------------------------------------------------------------------------------------- output folder
@pytest.fixture(name="tiles_without_validation")
def _tiles_without_validation(tmp_path) -> Path:
    """No readable `val` tile: the run fails once the tiles are converted (its dataset folder made)."""
    return tiles_with_unreadable_validation(tmp_path / "tiles")


def test_failed_run_does_not_create_the_output_folder(tmp_path, tiny_config, tiles_without_validation):
    out = tmp_path / "new"
    with pytest.raises(UsageError, match="no 'val' split"):  # found once the tiles are converted
        main(["--config", str(tiny_config), "--data_dir", str(tiles_without_validation), "--output_dir", str(out)])
    assert not out.exists()  # neither config.yaml nor the dataset conversion is left behind


def test_failed_run_leaves_an_existing_output_folder_unchanged(tmp_path, tiny_config, tiles_without_validation):
    out = tmp_path / "existing"
    (out / "_dataset" / "0123456789abcdef").mkdir(parents=True)
    (out / "_dataset" / "0123456789abcdef" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (out / "notes.txt").write_text("mine")
    (out / "config.yaml").write_text("learning_rate: 0.001\n")
    before = folder_digest(out)
    with pytest.raises(UsageError, match="no 'val' split"):
        main(["--config", str(tiny_config), "--data_dir", str(tiles_without_validation), "--output_dir", str(out)])
    assert folder_digest(out) == before
    assert sorted(path.name for path in (out / "_dataset").iterdir()) == ["0123456789abcdef"]


# ----------------------------------------------------------------------------------------------- review fixes
@pytest.mark.parametrize("flags, fragment", [
    (["--eval_every_epochs", "nan"], "--eval_every_epochs: eval_every_epochs must be a finite number > 0, or 0 / null"),
    (["--save_every_epochs", "inf"], "--save_every_epochs: save_every_epochs must be a finite number > 0, or 0 / null"),
    (["--disc_learning_rate_ratio", "nan"], "--disc_learning_rate_ratio: disc_learning_rate_ratio must be a finite "
                                            "number >= 0, got nan."),
    (["--disc_learning_rate_ratio", "inf"], "disc_learning_rate_ratio must be a finite number >= 0, got inf."),
])
def test_non_finite_intervals_and_discriminator_ratio_are_refused_before_the_run(flags, fragment, tmp_path,
                                                                                  tiny_config, sample_dataset_dir,
                                                                                  capsys):
    """They passed every check and crashed the started run (`round(nan)` when the intervals are converted to steps,
    AdamW refusing a NaN learning rate) with a traceback, or trained the discriminator at an infinite rate."""
    argv = ["--config", str(tiny_config), "--data_dir", str(sample_dataset_dir), "--output_dir",
            str(tmp_path / "out"), *flags]
    assert launch_main(argv) == 2
    _assert_one_line(_error_lines(capsys), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, kind", [("[]\n", "list"), ("0\n", "int"), ("false\n", "bool"), ("''\n", "str")])
def test_a_config_file_that_is_not_a_mapping_is_refused(text, kind, tmp_path, sample_dataset_dir, capsys):
    """An empty YAML file sets nothing; an empty list, 0, false or '' is no mapping of settings (it was read as an
    empty one and the run went ahead on the defaults)."""
    message = f"expected a mapping of argument names to values, got {kind}."
    config = _assert_config_refused(text, message, tmp_path, sample_dataset_dir, capsys)
    config.write_text("# nothing set yet\n")
    assert parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])[0].lora_r == 8


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 1.0e-3\nlora_r: 4\nlearning_rate: 5.0e-4\n",
     "key 'learning_rate' is given twice (lines 1 and 3); keep one."),
    ("refiner_config_overrides:\n  head_width: 16\n  head_width: 32\n",
     "key 'head_width' is given twice (lines 2 and 3); keep one."),
    ("epochs: 3\nnum_train_epochs: 5\n", "keys 'epochs' and 'num_train_epochs' both set num_train_epochs; keep one."),
])
def test_a_setting_given_twice_in_a_config_file_is_refused(text, message, tmp_path, sample_dataset_dir, capsys):
    """PyYAML keeps the last of two equal keys silently: a value edited in one place lost to a forgotten copy."""
    _assert_config_refused(text, message, tmp_path, sample_dataset_dir, capsys)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "2", "--num_train_epochs", "3"], "--epochs and --num_train_epochs both set num_train_epochs"),
    (["--max_samples=4", "--max-samples", "2"], "--max_samples and --max-samples both set max_samples"),
    (["--epoch", "2", "--num_train_epochs", "3"], "--epoch and --num_train_epochs both set num_train_epochs"),
    (["--num_train_epoch", "3", "--epochs", "2"], "--num_train_epoch and --epochs both set num_train_epochs"),
])
def test_two_spellings_of_one_setting_on_the_command_line_are_refused(flags, message, tmp_path, sample_dataset_dir,
                                                                       capsys):
    """The last one won silently (3 epochs above), as two keys of one setting in a file did; the same flag given
    twice is argparse's (the last value), and one flag overriding the config file's key is what --config says."""
    argv = ["--data_dir", str(sample_dataset_dir), "--output_dir", str(tmp_path / "out"), *flags]
    assert launch_main(argv) == 2
    _assert_one_line(_error_lines(capsys), f"{message}; keep one.")
    assert not (tmp_path / "out").exists()
    assert parse_args([*argv[:4], "--epochs", "2", "--epochs", "3"])[0].num_train_epochs == 3
    assert parse_args([*argv[:4], "--epoch", "2", "--epochs", "3"])[0].num_train_epochs == 3  # one flag, abbreviated


def test_the_demo_takes_both_spellings_of_its_own_folders(tmp_path, capsys):
    """`--output-dir` (stage2-train's other spelling) was passed on to stage2-train beside the demo's own
    `--output_dir`: now refused there as two spellings of one setting, naming a flag the user never typed."""
    from training.demo import main as demo_main

    out = tmp_path / "demo"
    assert demo_main(["--output-dir", str(out), "--data-dir", str(tmp_path / "no_tiles")]) == 2
    [line] = _error_lines(capsys)
    assert line.startswith(f"python -m training.demo: error: --data-dir {tmp_path / 'no_tiles'} not found ")
    assert not out.exists()
    # stage2-train's own messages name the spelling typed too (the demo passes it on)
    assert demo_main(["--output-dir", "", "--data-dir", str(tmp_path)]) == 2
    [line] = _error_lines(capsys)
    assert line.startswith("python -m training.demo: error: --output-dir: "), line
    assert demo_main(["--output_dir", "", "--data-dir", str(tmp_path)]) == 2
    assert _error_lines(capsys)[0].startswith("python -m training.demo: error: --output_dir: ")


def _assert_config_refused(text: str, message: str, tmp_path: Path, dataset: Path, capsys) -> Path:
    """`stage2-train` with a config file holding `text`: exit 2, one line `CONFIG: message`, nothing written."""
    config = tmp_path / "x.yaml"
    config.write_text(text)
    argv = ["--config", str(config), "--data_dir", str(dataset), "--output_dir", str(tmp_path / "out")]
    assert launch_main(argv) == 2
    _assert_one_line(_error_lines(capsys), f"{config}: {message}")
    assert not (tmp_path / "out").exists()
    return config


@pytest.fixture
def tiny_full_model(tmp_path) -> Path:
    from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel

    folder = tmp_path / "full"
    Stage2RefinerModel(Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", head_width=16,
                                           num_convnext_blocks=1)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("flags, fragment", [
    (["--lora_r", "0"], "--lora_r: lora_r must be a positive integer, got 0."),
    (["--lora_dropout", "1.5"], "--lora_dropout: lora_dropout must be in [0, 1), got 1.5."),
    (["--unfreeze_last_n_blocks", "5"], "--unfreeze_last_n_blocks: unfreeze_last_n_blocks=5 exceeds the backbone "
                                        "depth 4"),  # the saved refiner's tiny backbone, not the 600M preset's 32
    (["--lora_target_modules", "patch_embed"], "--lora_target_modules: lora_target_modules must be a non-empty"),
])
def test_lora_settings_of_a_start_model_are_checked_before_the_run(flags, fragment, tmp_path, tiny_config,
                                                                   tiny_full_model, sample_dataset_dir, capsys):
    """With --model_name_or_path the LoRA settings went unchecked until `build_model`, after the data: a traceback."""
    capsys.readouterr()
    argv = ["--config", str(tiny_config), "--model_name_or_path", str(tiny_full_model), "--data_dir",
            str(sample_dataset_dir), "--output_dir", str(tmp_path / "out"), *flags]
    assert launch_main(argv) == 2
    _assert_one_line(_error_lines(capsys), fragment)
    assert not (tmp_path / "out").exists()
    parse_args(["--config", str(tiny_config), "--model_name_or_path", str(tiny_full_model), "--output_dir",
                str(tmp_path / "out"), "--unfreeze_last_n_blocks", "4", "--lora_target_modules", "qkv"])
    parse_args(["--config", str(tiny_config), "--model_name_or_path", "someone/refiner", "--output_dir",
                str(tmp_path / "out"), "--unfreeze_last_n_blocks", "40"])  # a Hub repo's depth: known once downloaded


def test_an_unusable_dataset_cache_dir_is_refused_before_the_run(tmp_path, tiny_config, capsys):
    """NPZ tiles are converted into --dataset_cache_dir: a file there was a FileExistsError traceback (status 1)."""
    tiles = make_tile_dir(tmp_path / "tiles", per_split=1)
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for cache, problem in ((a_file, "is a file; give a folder path"),
                           (a_file / "cache", f"{a_file} is a file, so nothing can be written under it")):
        argv = ["--config", str(tiny_config), "--data_dir", str(tiles), "--output_dir", str(tmp_path / "out"),
                "--dataset_cache_dir", str(cache)]
        assert launch_main(argv) == 2
        _assert_one_line(_error_lines(capsys), f"--dataset_cache_dir {cache}: {problem}")
        with pytest.raises(UsageError, match="^--dataset_cache_dir "):  # the trainer process checks it too
            main(argv)
    assert not (tmp_path / "out").exists() and a_file.read_text() == "mine"


def test_resume_with_settings_that_do_not_fit_the_checkpoint(tmp_path, tiny_config, sample_dataset_dir):
    """--resume latest with another LoRA rank failed inside `train` with a size-mismatch traceback, after the run's
    config.yaml had been rewritten with the settings that do not fit: now one line, and the run is left as it was."""
    from training.train import _check_resume_fits, build_model
    from training.trainer import CHECKPOINT_COMPLETE_NAME, checkpoint_marker

    out = tmp_path / "run"
    base = ["--config", str(tiny_config), "--data_dir", str(sample_dataset_dir), "--output_dir", str(out)]
    training_args = parse_args([*base, "--resume", "latest"])[0]
    model = build_model(training_args, print_summary=False)
    checkpoint = out / "checkpoint-2"
    model.save_pretrained(checkpoint)  # the trainable weights as a checkpoint holds them
    (checkpoint / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps(checkpoint_marker(checkpoint, 2)))
    (out / "config.yaml").write_text("lora_r: 8\n")
    _check_resume_fits(model, training_args)  # the settings it was trained with: accepted
    before = folder_digest(out)
    with pytest.raises(UsageError) as error:
        main([*base, "--resume", "latest", "--lora_r", "4"])
    assert str(error.value).startswith(f"--resume {checkpoint}: its weights do not fit the model these settings "
                                       "build (base_model.model.backbone.blocks.0.attn.qkv.lora_A.weight is [8, 64] "
                                       "there, [4, 64] here); resume with the settings it was trained with")
    with pytest.raises(UsageError, match=r"its weights do not fit .* \(it holds \d+ tensors this model lacks, e\.g\. "):
        main([*base, "--resume", str(checkpoint), "--lora_target_modules", "qkv"])
    assert folder_digest(out) == before


def test_a_resumed_run_keeps_the_hub_backbone_commit_it_started_with(hub_server, tmp_path, tiny_config,
                                                                       sample_dataset_dir):
    """A commit to the backbone's Hub repo between a run and its resume: the resumed run rebuilds the frozen base from
    the commit its checkpoint records (stage2_base.json), not from the repo's new main."""
    from _hub_helpers import publish_tiny_prithvi
    from modeling_stage2.adapters import save_trained_model
    from training.train import build_model
    from training.trainer import CHECKPOINT_COMPLETE_NAME, checkpoint_marker

    repo = f"{hub_server.user}/Prithvi-EO-2.0-tiny"

    def qkv(model):
        return model.get_base_model().backbone.blocks[0].attn.qkv.weight

    first = publish_tiny_prithvi(repo, tmp_path, seed=0)
    out = tmp_path / "run"
    base = ["--config", str(tiny_config), "--data_dir", str(sample_dataset_dir), "--output_dir", str(out),
            "--backbone_weights", repo]
    started = build_model(parse_args(base)[0], print_summary=False)
    checkpoint = save_trained_model(started, out / "checkpoint-2")
    (checkpoint / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps(checkpoint_marker(checkpoint, 2)))
    assert publish_tiny_prithvi(repo, tmp_path, seed=1) != first

    resumed = build_model(parse_args([*base, "--resume", "latest"])[0], print_summary=False)
    assert resumed.stage2_base_source.revision == first and torch.equal(qkv(resumed), qkv(started))
    fresh = build_model(parse_args(base)[0], print_summary=False)  # a new run takes the repo's main
    assert fresh.stage2_base_source.revision != first and not torch.equal(qkv(fresh), qkv(started))


def test_settings_a_start_model_does_not_use_are_named(tmp_path, tiny_config, sample_dataset_dir, caplog):
    """With --model_name_or_path the saved refiner's config applies: settings that differ from it were silently
    ignored; the run now says which, once, and keeps the model's."""
    from _refiner_helpers import tiny_refiner_config
    from modeling_stage2 import Stage2RefinerModel
    from training.train import build_model, unused_model_settings

    start = tmp_path / "start"
    Stage2RefinerModel(tiny_refiner_config(spectral_mlp_hidden_size=8, spectral_correction="shared",
                                           nonnegative_output=True)).save_pretrained(start)
    base = ["--config", str(tiny_config), "--data_dir", str(sample_dataset_dir), "--output_dir", str(tmp_path / "o"),
            "--model_name_or_path", str(start), "--spectral_correction", "shared", "--spectral_mlp_hidden_size", "8",
            "--refiner_config_overrides", '{"head_width": 16, "num_convnext_blocks": 2, "drop_path_rate": 0.0}']
    training_args = parse_args(base)[0]
    with caplog.at_level("WARNING", logger="training.train"):
        model = build_model(training_args, print_summary=True)
    assert unused_model_settings(training_args, model.get_base_model().config) == {}
    assert "are not used" not in caplog.text

    caplog.clear()
    training_args = parse_args([*base, "--spectral_mlp_hidden_size", "32", "--refiner_config_overrides",
                                '{"head_width": 64}'])[0]
    with caplog.at_level("WARNING", logger="training.train"):
        model = build_model(training_args, print_summary=True)
    assert model.get_base_model().config.spectral_mlp_hidden_size == 8  # the model's own
    assert f"--model_name_or_path {start}: its own config.json applies, so these settings are not used: " \
           "spectral_mlp_hidden_size 32 (the model's: 8), head_width 64 (the model's: 16)" in caplog.text


# ----------------------------------------------------------------------------------------------- accelerate options
def test_accelerate_gets_explicit_defaults_and_no_warning(monkeypatch, tmp_path, caplog):
    from accelerate.commands import config as accelerate_config
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "no_accelerate_config.yaml"))
    options = train_module.accelerate_arguments([])
    assert options == ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no", "--quiet"]
    command = train_module.accelerate_command(options, ["--config", "c.yaml", "--epochs", "3"])
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and command[3:12] == options
    assert command[12].endswith("training/train.py") and command[13:] == ["--config", "c.yaml", "--epochs", "3"]
    with caplog.at_level("WARNING"):
        _validate_launch_command(launch_command_parser().parse_args(["train.py"]))
    assert ACCELERATE_WARNING in caplog.text  # what every run printed before
    caplog.clear()
    with caplog.at_level("WARNING"):
        _validate_launch_command(launch_command_parser().parse_args([*options, "train.py"]))
    assert ACCELERATE_WARNING not in caplog.text

    user = train_module.accelerate_arguments(["--num_processes", "2", "--multi_gpu", "--mixed_precision", "fp16"])
    assert user == ["--num_processes", "2", "--multi_gpu", "--mixed_precision", "fp16", "--num_machines", "1",
                    "--dynamo_backend", "no", "--quiet"]
    assert train_module.accelerate_arguments(["--config_file", "acc.yaml", "-q"]) == ["--config_file", "acc.yaml",
                                                                                       "-q"]
    assert train_module.split_launcher_arguments(["--cpu", "--", "--epochs", "1"]) == (["--cpu"], ["--epochs", "1"])
    assert train_module.split_launcher_arguments(["--epochs", "1"]) == ([], ["--epochs", "1"])


# ----------------------------------------------------------------------------------------------- process tree
def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in "ZX"


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _is_trainer(pid: int) -> bool:
    command = _command_line(pid)
    return "training/train.py" in command and "accelerate" not in command


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process tree from /proc")


class _Run:
    """`stage2-train` on the tiny config in a subprocess, and every process it started."""

    def __init__(self, tmp_path: Path, repo_root: Path, dataset: Path, extra=(), nohup: bool = False, **settings):
        self.out = tmp_path / "out"
        self.config = write_config(tmp_path / "run.yaml", **settings)
        self.stderr_path = tmp_path / "stderr.txt"
        command = [*stage2_train_command(), "--config", str(self.config), "--data_dir", str(dataset),
                   "--output_dir", str(self.out), *extra]
        env = {key: value for key, value in os.environ.items() if key not in ("LOCAL_RANK", "ACCELERATE_LAUNCHED")}
        with open(self.stderr_path, "w") as stderr:
            # Default signal dispositions, however pytest was started (`nohup` would leave SIGHUP ignored), or
            # SIGHUP ignored as `nohup stage2-train` starts it.
            self.process = subprocess.Popen(command, cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                            preexec_fn=_nohup_signals if nohup else _default_signals)
        self.tree: list[int] = []

    def wait_for(self, ready, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.tree = sorted(set(self.tree) | set(_descendants(self.process.pid)))
            if any(_is_trainer(pid) for pid in self.tree) and ready():
                return
            assert self.process.poll() is None, self.stderr()[-3000:]
            assert time.monotonic() < deadline, f"not ready within {timeout} s: {self.stderr()[-3000:]}"
            time.sleep(0.05)

    def running_descendants(self, within: float) -> list[str]:
        deadline = time.monotonic() + within
        while any(_running(pid) for pid in self.tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        return [f"{pid}: {_command_line(pid)[:150]}" for pid in self.tree if _running(pid)]

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def cleanup(self) -> None:
        for pid in [self.process.pid, *self.tree]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=30)


def _default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _nohup_signals() -> None:
    _default_signals()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@pytest.fixture
def run_stage2_train(tmp_path, repo_root, sample_dataset_dir):
    runs = []

    def start(extra=(), nohup: bool = False, **settings) -> _Run:
        # Long enough never to finish during a test; no validation or checkpoint unless interrupted.
        defaults = dict(num_train_epochs=1000, eval_every_epochs=None, save_every_epochs=None, eval_strategy="no",
                        save_strategy="no", eval_on_start=False)
        runs.append(_Run(tmp_path, repo_root, sample_dataset_dir, extra, nohup, **{**defaults, **settings}))
        return runs[-1]

    yield start
    for run in runs:
        run.cleanup()


@needs_proc
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_to_stage2_train_stops_every_process(signum, run_stage2_train, tmp_path, monkeypatch):
    """... and the trainer's cleanups run: it was killed outright by the forwarded signal, leaving the random
    backbone's temporary weights (and a best/ being written) behind."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    run = run_stage2_train()
    run.wait_for(lambda: any(scratch.glob("stage2-random-backbone-*")))  # the trainer process has built its base
    os.kill(run.process.pid, signum)
    assert run.process.wait(timeout=30) == 128 + signum
    assert run.running_descendants(within=5) == []
    assert "Traceback" not in run.stderr() and ACCELERATE_WARNING not in run.stderr()
    assert sorted(path.name for path in scratch.iterdir()) == []


def test_a_signal_before_the_supervisor_forwards_signals_leaves_no_status_file(tmp_path, repo_root):
    """Between its status file and the forwarding of signals, a SIGTERM killed the supervisor outright, leaving the
    file in the temporary folder (and a Python parent saw -15, not 143)."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        import training.train as train

        def signal_comes_first(command, env):  # the signal arrives before the forwarding handlers are in place
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            return 0, []

        train.run_accelerate = signal_comes_first
        sys.exit(train.supervise(["--", "--output_dir", "x"]))
    """)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=_default_signals)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert list(scratch.iterdir()) == []


@needs_proc
def test_under_nohup_sighup_is_ignored_by_the_whole_run(run_stage2_train):
    run = run_stage2_train(nohup=True)
    run.wait_for(lambda: True)
    os.kill(run.process.pid, signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):  # the run goes on ...
        run.process.wait(timeout=3)
    assert [pid for pid in run.tree if _is_trainer(pid) and _running(pid)]
    os.kill(run.process.pid, signal.SIGTERM)  # ... and still stops on SIGTERM, saying so
    assert run.process.wait(timeout=30) == 128 + signal.SIGTERM
    assert run.running_descendants(within=5) == []
    assert "stopped by SIGTERM" in run.stderr() and "SIGHUP" not in run.stderr()


def test_exit_status_of_one_and_of_two_interrupts(tmp_path, capsys):
    """Ctrl-C: the trainer records 130 after its checkpoint. Ctrl-C twice: the run is stopped at once (SIGTERM to its
    group), records nothing, and dies by SIGTERM; that is still an interrupt, 130, and said so."""
    from training.train import EXIT_INTERRUPTED, _exit_status

    recorded = tmp_path / "status"
    recorded.write_text("130")
    assert _exit_status(1, [signal.SIGINT], recorded) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == ""
    nothing = tmp_path / "absent"
    assert _exit_status(-signal.SIGTERM, [signal.SIGINT, signal.SIGINT], nothing) == 130
    assert "interrupted again: stopped at once, without a checkpoint." in capsys.readouterr().err
    assert _exit_status(-signal.SIGTERM, [signal.SIGTERM], nothing) == 128 + signal.SIGTERM
    assert _exit_status(-signal.SIGKILL, [], nothing) == 128 + signal.SIGKILL


def test_sigkill_of_stage2_train_stops_the_trainer(run_stage2_train):
    run = run_stage2_train()
    run.wait_for(lambda: True)
    os.kill(run.process.pid, signal.SIGKILL)
    assert run.process.wait(timeout=30) == -signal.SIGKILL
    assert run.running_descendants(within=10) == []  # no trainer re-parented to PID 1 trains on
    assert "the launcher" in run.stderr() and "is gone" in run.stderr()


@needs_proc
def test_sigint_stops_training_after_a_checkpoint(run_stage2_train):
    from training.trainer import is_complete_checkpoint

    run = run_stage2_train()
    log = run.out / "training_log.jsonl"
    run.wait_for(lambda: log.is_file() and '"event": "train"' in log.read_text())  # training steps are running
    os.kill(run.process.pid, signal.SIGINT)
    assert run.process.wait(timeout=120) == 130
    assert run.running_descendants(within=5) == []
    checkpoints = sorted(run.out.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert checkpoints and is_complete_checkpoint(checkpoints[-1]), run.stderr()[-3000:]
    step = int(checkpoints[-1].name.split("-")[1])
    assert f"stopped after optimizer step {step} with a checkpoint" in run.stderr()
    assert not (run.out / "best" / "README.md").exists()  # the run did not finish as if it had completed
    assert "Traceback" not in run.stderr()


@needs_proc
def test_trainer_side_user_error_is_status_2_without_accelerate_traceback(tmp_path, run_stage2_train):
    torn = tmp_path / "torn-checkpoint"
    torn.mkdir()  # exists (the launcher's check), but is no complete checkpoint (the trainer's check)
    run = run_stage2_train(extra=["--resume", str(torn)])
    assert run.process.wait(timeout=240) == 2
    lines = [line for line in run.stderr().splitlines() if line.startswith("stage2-train: ")]
    assert len(lines) == 1 and "--resume" in lines[0] and str(torn) in lines[0], run.stderr()[-3000:]
    assert "Traceback" not in run.stderr() and "CalledProcessError" not in run.stderr()
    assert not run.out.exists()


def test_a_run_with_out_of_range_fallback_as_the_user_starts_it(tmp_path, run_stage2_train, sample_dataset_dir,
                                                                 sample_tiles_dir, repo_root):
    """`stage2-train --out_of_range_fallback true --near_black_fallback true` and then `stage2-refine` with its model,
    both as subprocesses: the range is fitted on the training split, both rules travel with the adapter, and the
    refined tiles say where it kept opt_v1 (entirely at every near-black pixel)."""
    from data_builders.tiles import read_tile
    from datasets import load_from_disk

    from modeling_stage2 import load_trained_model
    from training.spectral_range import fit_spectral_range_of_dataset

    run = run_stage2_train(extra=["--out_of_range_fallback", "true", "--out_of_range_quantile", "0.9",
                                  "--near_black_fallback", "true", "--max_steps", "1"])
    assert run.process.wait(timeout=600) == 0, run.stderr()[-3000:]
    best = run.out / "best"
    recorded = json.loads((best / "training_config.json").read_text())
    train_split = load_from_disk(str(sample_dataset_dir))["train"].select(range(TINY_SETTINGS["max_samples"]))
    assert recorded["out_of_range_fallback"] == f"90th percentile of {len(train_split)} training tiles"
    model = load_trained_model(best)
    assert model.config.out_of_range_fallback and model.config.near_black_fallback
    expected = fit_spectral_range_of_dataset(train_split, model.config.spectral_mlp_log_offset, quantile=0.9)
    assert float(model.spectral_range.threshold) == pytest.approx(expected.threshold, rel=1e-6)

    refine = Path(sys.executable).with_name("stage2-refine")
    command = [str(refine)] if refine.is_file() else [sys.executable, "-m", "inference_stage2"]
    tiles = sample_tiles_dir / "test"
    result = subprocess.run([*command, "--model", str(best), "--input", str(tiles), "--output_dir",
                             str(tmp_path / "refined"), "--device", "cpu", "--no_progress"],
                            cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = [np.load(path)["out_of_range_weight"] for path in sorted((tmp_path / "refined").glob("*.npz"))]
    assert len(weights) == len(list(tiles.glob("*.npz")))
    red, nir = model.config.near_black_band_indices
    inputs = [read_tile(path).target for path in sorted(tiles.glob("*.npz"))]  # identity input: opt_v1 = S2
    near_black = np.concatenate([(image[red] + image[nir] <= model.config.near_black_threshold).ravel()
                                 for image in inputs])
    every_weight = np.concatenate([weight.ravel() for weight in weights])
    assert near_black.sum() > 100 and np.all(every_weight[near_black] == 1)
    share = float(np.mean(np.concatenate([weight.ravel() for weight in weights]) > 0))
    assert 0 < share < 1  # 4 training tiles: many test pixels lie outside their spectra, not all
    assert f"(outside the training spectra, or near-black): {100 * share:.1f} % of valid pixels" in result.stdout


# ----------------------------------------------------------------------------------------------- stage2-evaluate
def _evaluate_status(argv) -> int:
    from training.evaluate import main as evaluate_main

    try:
        return evaluate_main(argv)
    except SystemExit as exit_:  # argparse's parser.error
        return exit_.code


def test_evaluate_flags_all_have_a_help_text():
    from training.evaluate import build_parser

    assert [action.option_strings for action in build_parser()._actions
            if action.option_strings and not (action.help or "").strip()] == []


@pytest.mark.parametrize("flags, fragment", [
    (["--max_samples", "0"], "--max_samples must be >= 1 (or left out: every tile), got 0"),
    (["--max_samples", "-2"], "--max_samples must be >= 1 (or left out: every tile), got -2"),
    (["--cache_dir", "{file}"], "--cache_dir {file}: is a file; give a folder path"),
    (["--cache_dir", "{file}/cache"], "--cache_dir {file}/cache: {file} is a file, so nothing can be written under it"),
])
def test_evaluate_refuses_bad_flags_before_any_work(flags, fragment, tmp_path, capsys):
    """--max_samples 0 converted the data and fitted the baseline, then said "split 'val' is empty"; a --cache_dir
    that is a file was a FileExistsError traceback. Now: refused before the model and the data are looked at."""
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"),
            *[flag.format(file=a_file) for flag in flags]]
    assert _evaluate_status(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"stage2-evaluate: error: {fragment.format(file=a_file)}"
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_evaluate_names_a_bad_device_before_the_data_are_read(device, tmp_path, capsys, monkeypatch):
    """The model loads after the data are converted and the colour baseline fitted: torch's own refusal of the
    device came after both."""
    import training.evaluate as evaluate_module

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("torch sees a CUDA GPU here")

    def no_data_work(*args, **kwargs):
        raise AssertionError("the data were read before the device was checked")

    monkeypatch.setattr(evaluate_module, "load_dataset_dict", no_data_work)
    assert _evaluate_status(["--model", str(tmp_path / "model"), "--data", str(tmp_path), "--device", device]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    expected = "is not a torch device" if device == "gpu" else "was asked for, but torch sees no CUDA GPU"
    assert line.startswith(f"stage2-evaluate: error: device '{device}' ") and expected in line


def test_evaluate_refuses_a_revision_of_a_local_model(tmp_path, capsys):
    """It was ignored: the local folder was evaluated as it is, as if at that revision."""
    (tmp_path / "best").mkdir()
    assert _evaluate_status(["--model", str(tmp_path / "best"), "--revision", "v1", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"stage2-evaluate: error: --revision v1: {tmp_path / 'best'} is a local path, read as it is; a revision "
        "applies to a Hub repo id: leave it out"]


def test_evaluate_says_when_degradation_flags_do_not_apply_to_an_arrow_dataset(tmp_path, sample_dataset_dir, capsys):
    """`--degradation strong --dataset_seed 3` with a saved Arrow --data were ignored without a word (stage2-train
    warns): the results were of the dataset's mild draw of seed 0. Said once per flag; the same values, or none
    given, say nothing."""
    missing = tmp_path / "best"  # the warning comes before the model is looked for: no model needed
    data = str(sample_dataset_dir)
    assert _evaluate_status(["--model", str(missing), "--data", data, "--degradation", "strong",
                             "--dataset_seed", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"stage2-evaluate: warning: --degradation strong is not used: --data {data} is an Arrow dataset whose opt_v1 "
        "was synthesised with degradation 'mild' (stage2-build-dataset --degradation); the results are recorded "
        "with the dataset's.",
        f"stage2-evaluate: warning: --dataset_seed 3 is not used: --data {data} is an Arrow dataset whose opt_v1 was "
        "synthesised with dataset_seed 0 (stage2-build-dataset --dataset_seed); the results are recorded with the "
        "dataset's.",
        f"stage2-evaluate: error: --model {missing}: no such folder (nor a Hub repo id OWNER/NAME)."]
    for flags in ([], ["--degradation", "mild", "--dataset_seed", "0"]):
        assert _evaluate_status(["--model", str(missing), "--data", data, *flags]) == 2
        assert "warning" not in capsys.readouterr().err


def test_evaluate_names_a_missing_model_before_converting_the_data(tmp_path, sample_dataset_dir, capsys, monkeypatch):
    """A mistyped --model path was found only after the NPZ tiles were converted and the colour baseline fitted."""
    import data_builders

    def no_conversion(*args, **kwargs):
        raise AssertionError("the tiles were converted before the model was looked for")

    monkeypatch.setattr(data_builders, "build_dataset", no_conversion)
    tiles = make_tile_dir(tmp_path / "tiles", per_split=1)
    missing = tmp_path / "runs" / "demo" / "best"
    for data in (tiles, sample_dataset_dir):
        assert _evaluate_status(["--model", str(missing), "--data", str(data)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"stage2-evaluate: error: --model {missing}: no such folder (nor a Hub repo id OWNER/NAME)."]


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_the_demo_names_each_folder_it_looked_in_once(where, tmp_path, capsys, monkeypatch):
    """Run from the checkout (as `make demo` does) it said `looked in /work/main and /work/main`."""
    from training.demo import REPO_ROOT
    from training.demo import main as demo_main

    monkeypatch.chdir(REPO_ROOT if where == "checkout" else tmp_path)
    assert demo_main(["--data_dir", "no_such_tiles", "--output_dir", str(tmp_path / "out")]) == 2
    places = str(REPO_ROOT) if where == "checkout" else f"{tmp_path} and {REPO_ROOT}"
    assert _error_lines(capsys) == [f"python -m training.demo: error: --data_dir no_such_tiles not found (looked in "
                                    f"{places})."]
