"""Train the Stage 2 refiner: the design's command line.

    stage2-train --config configs/hardware.lowvr.yaml --data_dir D --output_dir O \\
        [--stage1_dir S] [--resume CKPT|latest] [--max_samples N] [--epochs N] [--any_trainer_flag V]
    stage2-train --num_processes 2 --multi_gpu -- ...flags...   # accelerate options before `--`
    accelerate launch training/train.py ...same flags...         # what stage2-train runs

Settings come from the YAML file given with `--config` (keys are the fields of `Stage2TrainingArguments` and
`Stage2DataArguments`, i.e. any `TrainingArguments` field plus the model, LoRA, loss and data settings) and are
overridden by the same flags on the command line (`transformers.HfArgumentParser`). Every value is checked (type,
range, the refiner config it makes, the input folders) before anything runs or is written: a mistake is one line
naming the file, key or flag (`UsageError`, exit status 2).

`stage2-train` (`launch_main`) checks the settings in its own process, then runs `accelerate launch` on this file
as a child in its own process group: SIGTERM/SIGHUP to `stage2-train` stop every process of the run, SIGINT stops
training after the current optimizer step with a checkpoint (exit status 130), and a trainer whose `stage2-train`
died (even by SIGKILL) stops itself.

`--data_dir` is either NPZ tiles (`{train,val,test}/*.npz`), converted once to an Arrow `DatasetDict` and cached
(in `OUTPUT_DIR/_dataset/<key>`, the key hashing the tiles' names, sizes and modification times and the build
options), or a `DatasetDict` saved with `save_to_disk`.

Output folder: `best/` (the best validation model: `load_trained_model("O/best")`, with `metrics.json`,
`training_config.json`, `preview.png` and the model card `README.md`), `checkpoint-N/` (complete ones carry
`checkpoint_complete.json`), `config.yaml` (the settings of this run, usable as `--config`; written when training
starts), `training_log.jsonl`, TensorBoard events in `runs/`. A run that fails before training starts leaves the
output folder as it was.
"""
import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Intel MKL picks code paths by memory alignment unless told otherwise, so two identical runs can differ in the
# last bits; "AUTO" keeps MKL's fastest branch but makes it reproducible run to run (read when MKL first runs, so
# it must be set before torch computes anything; a user's own MKL_CBWR wins).
os.environ.setdefault("MKL_CBWR", "AUTO")

import yaml  # noqa: E402

from data_builders._leaves import model_leaf  # noqa: E402
from data_builders.cache import ARROW_MARKER, dataset_cache_key, is_arrow_dataset  # noqa: E402,F401  (re-exported)
from data_builders.tiles import TRAIN_SPLIT  # noqa: E402

logger = logging.getLogger("training.train")
exit_on_termination = model_leaf("_signals").exit_on_termination  # without importing torch before MKL_CBWR is read
HubUnavailableError = model_leaf("hub").HubUnavailableError  # a Hub base out of reach: exit status 1, one line

PROG = "stage2-train"
CONFIG_NAME = "config.yaml"
DATASET_CACHE_DIR = "_dataset"  # "_*" is never pushed to the Hub by the Trainer
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
# Set by `stage2-train` for the trainer it launches: its PID (the trainer stops when it is gone) and a file where
# the trainer leaves its exit status (`accelerate launch --quiet` reports every failure as 1).
LAUNCHER_PID_ENV = "STAGE2_TRAIN_LAUNCHER_PID"
STATUS_FILE_ENV = "STAGE2_TRAIN_STATUS_FILE"
# A file `stage2-train` creates at a Ctrl-C: the trainer ignores SIGINT until it has its own handler, and a Ctrl-C in
# those seconds (accelerate and the trainer starting) would be lost; the trainer looks for the file once it has it.
INTERRUPT_FILE_ENV = "STAGE2_TRAIN_INTERRUPT_FILE"


class UsageError(ValueError):
    """A mistake in the settings or inputs of a run: reported as one line, exit status 2."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file or folder named by the settings does not exist."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT after writing a checkpoint."""


# ------------------------------------------------------------------------------------------- arguments
def _parser(prog: str | None = None):
    from transformers import HfArgumentParser

    from training.args import Stage2DataArguments, Stage2TrainingArguments

    parser = HfArgumentParser((Stage2TrainingArguments, Stage2DataArguments), prog=prog)
    parser.error = _raise_usage_error  # one line naming the flag, never a usage dump and exit
    _accept_none(parser)
    return parser


def _accept_none(parser) -> None:
    """`--max_samples none` (or `null`) unsets an optional int or float setting, e.g. one the YAML file sets, as
    `max_samples: null` does in the file (`training.args.NONE_WORDS`)."""
    from training.args import none_or, optional_number, setting_types

    types = setting_types()
    for action in parser._actions:
        kind = optional_number(types.get(action.dest))
        if kind is not None and action.nargs is None and action.type is kind:
            action.type = none_or(kind)


def _raise_usage_error(message: str):
    raise UsageError(message)


def _aliases(parser) -> dict[str, str]:
    """Option spellings -> field names (`--epochs` -> num_train_epochs, `--resume` -> resume_from_checkpoint)."""
    names = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith("--no_"):
                names[option[2:].replace("-", "_")] = action.dest
    return names


def _choices(parser) -> dict[str, list]:
    """Field name -> the values its flag accepts, for fields with a fixed set of values."""
    return {action.dest: list(action.choices) for action in parser._actions if action.choices and action.option_strings}


def _read_yaml(path: Path):
    if not path.exists():
        raise MissingInputError(f"--config {path}: no such file.")
    if not path.is_file():
        raise UsageError(f"--config {path}: not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read the file ({error}).") from None
    try:
        values = yaml.load(text, Loader=_UniqueKeyLoader)
    except _RepeatedKey as error:
        raise UsageError(f"{path}: {error}.") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({' '.join(str(error).split())}).") from None
    return {} if values is None else values  # an empty file sets nothing; `[]`, `0` or `false` is no mapping


class _RepeatedKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, but a key given twice in one mapping is an error: PyYAML keeps the last one silently, and a
    setting edited in one place would be overridden by a forgotten copy further down."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue  # not a setting name: the mapping's own check names it
            if key in lines:
                raise _RepeatedKey(f"key {key!r} is given twice (lines {lines[key]} and {key_node.start_mark.line + 1})"
                                   "; keep one")
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_config_file(path: str | os.PathLike, parser=None) -> dict:
    """Read a YAML config: a mapping of argument names to values, each converted to its field's type. An unknown key
    or a value of the wrong type is a `UsageError` naming the file and the key."""
    return _load_config(path, parser or _parser())[0]


def _load_config(path: str | os.PathLike, parser) -> tuple[dict, dict]:
    """`load_config_file`, and how the file spells each setting it sets (field name -> key: `num_train_epochs` ->
    `epochs`), to name the key it has in messages."""
    path = Path(path)
    values = _read_yaml(path)
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}.")
    from training.args import SettingTypeError, convert_setting, setting_types

    aliases, types, choices = _aliases(parser), setting_types(), _choices(parser)
    resolved = {}
    for key, value in values.items():
        if key not in aliases:
            import difflib

            # `config` is the option itself (a file cannot name another): no field is meant there
            close = difflib.get_close_matches(str(key), sorted(aliases), n=1, cutoff=0.75) if key != "config" else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"{path}: unknown key {key!r}{hint}. Keys are Stage2TrainingArguments / Stage2DataArguments fields "
                f"(any TrainingArguments field, e.g. learning_rate, num_train_epochs); see {PROG} --help-all."
            )
        name = aliases[key]
        if name in resolved:  # two spellings of one setting, e.g. epochs and num_train_epochs
            other = next(spelling for spelling in values if aliases.get(spelling) == name and spelling != key)
            raise UsageError(f"{path}: keys {other!r} and {key!r} both set {name}; keep one.")
        try:
            resolved[name] = convert_setting(value, types.get(name), choices.get(name))
        except SettingTypeError as error:
            raise UsageError(f"{path}: {key}: {error}") from None
    return resolved, {aliases[key]: key for key in values}


class _Sources:
    """Where each setting of a run came from (the config file or the command line), to name it in messages."""

    def __init__(self, config: str | None, file_keys, cli_keys, spellings: dict | None = None):
        self.config, self.file_keys, self.cli_keys = config, set(file_keys), set(cli_keys)
        # How the user wrote each setting where that is not its field name (`--epochs`, `--max-samples`, a file's
        # `epochs`): a message names what they typed.
        self.spellings = dict(spellings or {})

    def key_in(self, message: str) -> str | None:
        import re

        for key in sorted(self.cli_keys | self.file_keys, key=len, reverse=True):
            if re.search(rf"(?<![A-Za-z0-9_]){re.escape(key)}(?![A-Za-z0-9_])", message):
                return key
        return None

    def explain(self, error: Exception, key: str | None = None) -> str:
        """`error`'s message prefixed with the file or flag that set `key` (by default: the key it names)."""
        message = " ".join(str(error.args[0] if isinstance(error, KeyError) and error.args else error).split())
        key = key or self.key_in(message)
        written = self.spellings.get(key, key)
        named = written if written == key or key in message else f"{written} ({key})"
        if key in self.cli_keys:
            return f"--{named}: {message}"
        if key in self.file_keys:
            plain = key in message and written == key  # the message names the setting as the file does
            return f"{self.config}: {message}" if plain else f"{self.config}: {named}: {message}"
        return f"{key}: {message}" if key and key not in message else message


def _parse_command_line(parser, argv: list[str]):
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        import difflib

        flag = next((item for item in unknown if item.startswith("-")), unknown[0])
        close = difflib.get_close_matches(flag, [o for a in parser._actions for o in a.option_strings], n=1)
        hint = f" (did you mean {close[0]}?)" if close else f" (see {PROG} --help-all)"
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return namespace


_UNSET = object()


def _given_on_command_line(parser, argv: list[str]) -> set[str]:
    """The settings the command line names, whatever their value (`--eval_strategy no` too, though it is the
    default): `argv` parsed again onto a namespace whose every setting is unset."""
    unset = argparse.Namespace(**{action.dest: _UNSET for action in parser._actions if action.option_strings})
    namespace, _ = parser.parse_known_args(argv, namespace=unset)
    return {key for key, value in vars(namespace).items() if value is not _UNSET} - {"config", "help"}


def _flags_typed(parser, argv: list[str]) -> dict[str, str]:
    """Field name -> the flag `argv` sets it with, without its `--` (`num_train_epochs` -> `epochs`); the last one
    where it is given twice, as argparse keeps the last value. Two spellings of one setting (`--epochs 2
    --num_train_epochs 3`) are refused, as two keys of one setting in a config file are: which one was meant?"""
    typed, flags = {}, {}  # field name -> as typed; -> the option it stands for (`--epoch` for `--epochs`)
    for item in argv:
        flag = _option_meant(parser, item.split("=", 1)[0]) if item.startswith("--") else None
        action = parser._option_string_actions.get(flag)
        if action is not None and action.option_strings:
            spelled = item.split("=", 1)[0][2:]
            if flags.get(action.dest, flag) != flag:
                raise UsageError(f"--{typed[action.dest]} and --{spelled} both set {action.dest}; keep one.")
            typed[action.dest], flags[action.dest] = spelled, flag
    return typed


def _option_meant(parser, typed: str) -> str | None:
    """The option `typed` stands for: itself, or the one option it abbreviates, as argparse reads it."""
    if typed in parser._option_string_actions:
        return typed
    meant = [option for option in parser._option_string_actions if option.startswith(typed)]
    return meant[0] if parser.allow_abbrev and len(meant) == 1 else None


# Path settings where an empty string would be the current folder (the repository's tiles, the checkout itself).
_PATH_SETTINGS = ("output_dir", "data_dir", "stage1_dir", "dataset_cache_dir", "model_name_or_path", "backbone_weights")


def _check_settings_apply(training_args, values: dict, given: set[str], sources: _Sources) -> None:
    """Settings that would be quietly ignored: an empty path, and an eval/save strategy or step interval given while
    `eval_every_epochs` / `save_every_epochs` (which win) are set."""
    for key in _PATH_SETTINGS:
        if isinstance(values.get(key), str) and not values[key].strip():
            unset = "" if key == "output_dir" else f" or leave {key} unset"
            raise UsageError(sources.explain(ValueError(f"{key} is an empty string: give a path{unset}."), key=key))
    for unit in ("eval", "save"):
        every = getattr(training_args, f"{unit}_every_epochs")
        for key in (f"{unit}_strategy", f"{unit}_steps"):
            if every is not None and key in given:
                raise UsageError(sources.explain(ValueError(
                    f"{key} has no effect while {unit}_every_epochs is {every:g} (it sets {unit}_steps once the steps "
                    f"per epoch are known): set {unit}_every_epochs to 0 to use {key}, or leave {key} out."), key=key))


def parse_args(argv=None, *, without_devices: bool = False):
    """`--config FILE` (YAML) + command-line overrides -> (Stage2TrainingArguments, Stage2DataArguments, settings).

    `settings` holds what this run sets explicitly (the config file's values and the command-line overrides):
    it is written to `OUTPUT_DIR/config.yaml`. Every mistake (unknown key or flag, a value of the wrong type or
    out of range, a refiner config that cannot be built) is a `UsageError` naming the file, key or flag.
    `without_devices`: check the settings without touching a GPU (what `stage2-train` does before it launches).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.error = _raise_usage_error
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = _parser()
    file_values, spellings = _load_config(known.config, parser) if known.config else ({}, {})  # `config`: no key
    parser.add_argument("--config", default=None, help="YAML file of settings; command-line flags override it.")
    parser.set_defaults(**file_values)
    values = vars(_parse_command_line(parser, rest))
    values.pop("config", None)
    # `is` first: a NaN from the file is its own default, though nan != nan
    overrides = {key: value for key, value in values.items()
                 if value is not parser.get_default(key) and value != parser.get_default(key)}
    settings = {**file_values, **overrides}
    given = _given_on_command_line(parser, rest)
    cli_keys = given | set(overrides)
    spellings = {**{key: spelled for key, spelled in spellings.items() if key not in cli_keys},
                 **_flags_typed(parser, rest)}  # the command line's spelling of what it overrides
    sources = _Sources(known.config, file_values, cli_keys, spellings)
    if without_devices:
        values["use_cpu"] = True
    try:
        training_args, data_args = parser.parse_dict(values)
    except ValueError as error:
        raise UsageError(sources.explain(error)) from None
    _check_settings_apply(training_args, values, given | set(file_values), sources)
    check_model_settings(training_args, sources)
    return training_args, data_args, settings


def _refiner_config_keys() -> set[str]:
    import inspect

    from transformers import PretrainedConfig

    from modeling_stage2 import Stage2RefinerConfig

    names = set()
    for cls in (Stage2RefinerConfig, PretrainedConfig):
        names |= {name for name, p in inspect.signature(cls.__init__).parameters.items()
                  if p.kind == p.POSITIONAL_OR_KEYWORD}
    return (names - {"self"}) | {"attn_implementation"}


def _model_settings(training_args) -> dict:
    """The refiner config values the run's flags set (besides the backbone and LoRA ones)."""
    return {"spectral_correction": training_args.spectral_correction,
            "nonnegative_output": training_args.nonnegative_output,
            "spectral_mlp_hidden_size": training_args.spectral_mlp_hidden_size,
            "out_of_range_fallback": training_args.out_of_range_fallback,
            "out_of_range_ramp": training_args.out_of_range_ramp,
            "near_black_fallback": training_args.near_black_fallback,
            "near_black_keep": training_args.near_black_keep}


def unused_model_settings(training_args, config) -> dict:
    """With `--model_name_or_path` the saved refiner's own config applies: the run's model settings (flags and
    `refiner_config_overrides`) whose values differ from that `config`'s, which the run therefore does not use, as
    {key: (asked, the model's)}."""
    def plain(value):
        return [plain(item) for item in value] if isinstance(value, (list, tuple)) else value

    asked = {**_model_settings(training_args), **(training_args.refiner_config_overrides or {})}
    return {key: (value, getattr(config, key, None)) for key, value in asked.items()
            if plain(value) != plain(getattr(config, key, None))}


def refiner_config(training_args, *, overrides: bool = True, lora: bool = False):
    """The `Stage2RefinerConfig` of a new refiner with the run's settings; `refiner_config_overrides` win over the
    other settings. `lora`: the LoRA settings in the config too (to check them; `build_model` passes them to
    `build_trainable_model` instead)."""
    from modeling_stage2 import Stage2RefinerConfig

    settings = _model_settings(training_args)
    if lora:
        settings.update(lora_r=training_args.lora_r, lora_alpha=training_args.lora_alpha,
                        lora_dropout=training_args.lora_dropout,
                        lora_target_modules=list(training_args.lora_target_modules),
                        unfreeze_last_n_blocks=training_args.unfreeze_last_n_blocks)
    if overrides:
        settings.update(training_args.refiner_config_overrides or {})
    return Stage2RefinerConfig(backbone_config=training_args.backbone_preset,
                               backbone_weights=training_args.backbone_weights, **settings)


def check_model_settings(training_args, sources: _Sources | None = None) -> None:
    """The refiner config the settings make can be built: the backbone preset, the LoRA settings, and every key and
    value of `refiner_config_overrides`. `UsageError` naming the file or flag and the key."""
    sources = sources or _Sources(None, (), ())
    if training_args.model_name_or_path is not None:
        _check_start_model_lora(training_args, sources)
        return  # the saved refiner's own config.json applies (checked with the input folders)
    from modeling_stage2 import PrithviConfig

    try:
        PrithviConfig.from_preset(training_args.backbone_preset)
    except (ValueError, KeyError) as error:
        raise UsageError(sources.explain(error, key="backbone_preset")) from None
    try:
        refiner_config(training_args, overrides=False, lora=True)
    except (ValueError, TypeError) as error:
        raise UsageError(sources.explain(error)) from None
    overrides = training_args.refiner_config_overrides or {}
    key = "refiner_config_overrides"
    if not isinstance(overrides, dict):
        raise UsageError(sources.explain(ValueError(f"{key}: expected a mapping, got {overrides!r}."), key=key))
    unknown = sorted(set(overrides) - _refiner_config_keys())
    if unknown:
        raise UsageError(sources.explain(ValueError(
            f"{key}: unknown key {unknown[0]!r}; keys are Stage2RefinerConfig arguments (e.g. head_width, "
            f"num_convnext_blocks, drop_path_rate)."), key=key))
    try:
        refiner_config(training_args, lora=True)
    except (ValueError, TypeError) as error:
        raise UsageError(sources.explain(ValueError(f"{key}: {error}"), key=key)) from None


def _check_start_model_lora(training_args, sources: _Sources) -> None:
    """With `--model_name_or_path`, the LoRA settings `build_model` gives the saved refiner (`record_lora`): a local
    folder's against its own config.json (its backbone depth), a Hub repo's but for the depth, known once it is
    downloaded. A config.json that does not load is named by `check_run_inputs`."""
    from modeling_stage2 import Stage2RefinerConfig

    folder = Path(training_args.model_name_or_path)
    backbone, blocks = None, training_args.unfreeze_last_n_blocks
    if (folder / "config.json").is_file():
        try:
            backbone = Stage2RefinerConfig.from_pretrained(folder).backbone_config
        except (ValueError, TypeError, KeyError, OSError):
            return
    elif blocks is not None and blocks >= 1:
        blocks = None
    try:
        Stage2RefinerConfig(backbone_config=backbone, lora_r=training_args.lora_r, lora_alpha=training_args.lora_alpha,
                            lora_dropout=training_args.lora_dropout,
                            lora_target_modules=list(training_args.lora_target_modules),
                            unfreeze_last_n_blocks=blocks)
    except (ValueError, TypeError) as error:
        raise UsageError(sources.explain(error)) from None


def write_run_config(output_dir: str | os.PathLike, settings: dict, training_args) -> Path:
    """`OUTPUT_DIR/config.yaml`: the explicit settings of the run (loadable with `--config`)."""
    path = Path(output_dir) / CONFIG_NAME
    body = {key: _yaml_value(value) for key, value in sorted(settings.items()) if key not in ("hub_token",)}
    launcher = (f"--multi_gpu --num_processes {training_args.world_size} -- "
                if training_args.world_size > 1 else "")  # the processes it ran with (the training flags are below)
    header = (f"# Settings of this Stage 2 training run ({training_args.precision_note})\n"
              f"# Re-run from the folder it was started in: {PROG} {launcher}--config {path}\n")
    from modeling_stage2._files import write_text  # the run has started: the model package is loaded anyway

    return write_text(path, header + yaml.safe_dump(body, sort_keys=False))


def _yaml_value(value):
    if isinstance(value, (list, tuple)):
        return [_yaml_value(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _yaml_value(v) for k, v in value.items()}
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value  # enums
    return value


# ------------------------------------------------------------------------------------------- data
def _check_data_folder(data_args, tiles: bool = True) -> None:
    """`--data_dir` is a folder of NPZ tiles or an Arrow dataset, and `--stage1_dir` and `--input_mode` fit it.
    `tiles`: that it holds tiles the conversion reads, by its own reading (`False` where the caller computes the
    cache key next, which says the same)."""
    if data_args.data_dir is None:
        raise UsageError("--data_dir is required: NPZ tiles ({train,val,test}/*.npz) or a saved Arrow DatasetDict.")
    data_dir = Path(data_args.data_dir)
    if not data_dir.is_dir():
        raise MissingInputError(f"--data_dir {data_dir}: no such folder.")
    if is_arrow_dataset(data_dir):
        from data_builders.build import saved_opt_v1_problem
        from data_builders.cache import saved_dataset_problem

        problem = saved_dataset_problem(data_dir) or saved_opt_v1_problem(data_dir, data_args.stage1_dir,
                                                                          data_args.input_mode)
        if problem is not None:
            raise UsageError(problem)
        return
    if tiles:
        tiles_cache_key(data_dir, flag="--data_dir")  # the conversion's own reading: no tile it would read, no run
    if data_args.stage1_dir is not None and not Path(data_args.stage1_dir).is_dir():
        raise MissingInputError(f"--stage1_dir {data_args.stage1_dir}: no such folder.")


def tiles_cache_key(data_dir: str | os.PathLike, *args, flag: str, **kwargs) -> str:
    """`dataset_cache_key` of the NPZ tiles in `data_dir`, whose error for a folder holding no tile the conversion
    would read (a split folder too) is a `MissingInputError`: a user error, exit 2."""
    try:
        return dataset_cache_key(data_dir, *args, flag=flag, **kwargs)
    except FileNotFoundError as error:
        raise MissingInputError(str(error)) from None


def _check_splits(data_args) -> None:
    """The dataset has the training and the validation split: a saved Arrow dataset by its `dataset_dict.json`, NPZ
    tiles by the conversion's own discovery (`discover_tiles`: the split folders and the sidecars' `split`, one small
    JSON read per tile), before any tile is converted. `prepare_splits` checks again once they are: a tile can still be
    rejected when its pixels are read."""
    data_dir = Path(data_args.data_dir)
    if is_arrow_dataset(data_dir):
        try:
            splits = json.loads((data_dir / ARROW_MARKER).read_text(encoding="utf-8")).get("splits", [])
        except (OSError, ValueError, AttributeError) as error:
            raise UsageError(f"--data_dir {data_dir}: unreadable {ARROW_MARKER} ({error}).") from None
    else:
        from data_builders.discovery import discover_tiles

        # (a folder without any tile the conversion reads: refused by `_check_data_folder` first)
        splits = list(discover_tiles(data_dir, stage1_dir=data_args.stage1_dir)[0])
    _require_splits(splits, data_args.eval_split, f"--data_dir {data_dir}")


def _check_redraw(data_args) -> None:
    """`--redraw_degradation` needs a synthetic `opt_v1`: NPZ tiles converted without Stage 1 outputs, or an Arrow
    dataset whose build record says it was synthesised."""
    if not data_args.redraw_degradation:
        return
    data_dir = Path(data_args.data_dir)
    if is_arrow_dataset(data_dir):
        from datasets import load_from_disk

        degradation_redraw(load_from_disk(str(data_dir)), data_args)
        return
    from data_builders.build import resolve_input_mode
    from data_builders.degrade import DegradationRedraw

    try:
        DegradationRedraw.check_input_mode(resolve_input_mode(data_args.input_mode, data_args.stage1_dir))
    except ValueError as error:
        raise UsageError(f"--data_dir {data_dir}: --redraw_degradation cannot draw opt_v1 again: {error}.") from None


def _require_splits(splits, eval_split: str, where: str) -> None:
    for split in (TRAIN_SPLIT, eval_split):
        if split not in splits:
            raise UsageError(f"{where}: the dataset has no {split!r} split (it has {sorted(splits)}); training "
                             f"needs 'train' and the validation split (--eval_split).")


_RESUME_NONE = (None, False, "", "none", "None")
_RESUME_LATEST = ("latest", "last", "true")


def _check_resume(training_args, complete: bool) -> None:
    """`--resume PATH` names a checkpoint folder; `complete`: also a complete one (the trainer's own check)."""
    value = training_args.resume_from_checkpoint
    if value in _RESUME_NONE or value is True or str(value).lower() in _RESUME_LATEST:
        return
    if not Path(value).is_dir():
        raise MissingInputError(f"--resume {value}: no such checkpoint folder.")
    if complete:
        from training.trainer import resolve_resume_checkpoint

        try:
            resolve_resume_checkpoint(value, training_args.output_dir, warn=False)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from None


def _check_start_model(training_args) -> None:
    """A local `--model_name_or_path` folder holds a full refiner (`save_pretrained`): a valid `config.json` and
    readable weights. A trained adapter folder (a run's `best/`) is refused with what to do instead."""
    name = training_args.model_name_or_path
    if name is None or not Path(name).is_dir():
        return  # a Hub repo: checked when it is downloaded
    config_file = Path(name) / "config.json"
    if not config_file.is_file():
        raise MissingInputError(f"--model_name_or_path {name}: no config.json there (a saved Stage2RefinerModel "
                                f"folder has one).")
    from modeling_stage2 import Stage2RefinerConfig
    from modeling_stage2.adapters import check_model_folder

    try:
        Stage2RefinerConfig.from_pretrained(name)
    except (ValueError, TypeError, KeyError, OSError) as error:
        message = " ".join(str(error).split())  # named once where the message names it already (another model's)
        raise UsageError(message if message.startswith(f"{config_file}: ") else f"{config_file}: {message}") from None
    try:
        kind = check_model_folder(name)
    except FileNotFoundError as error:
        raise MissingInputError(f"--model_name_or_path {error}") from None
    except ValueError as error:
        raise UsageError(f"--model_name_or_path {error}") from None
    if kind == "adapter":
        raise UsageError(
            f"--model_name_or_path {name}: a trained adapter (LoRA + trained modules, as in a run's best/), not a "
            "full refiner. To go on with that run, --resume one of its checkpoints; to start a new run from it, "
            "merge it first: export_merged_model(load_trained_model(DIR), OUT), then --model_name_or_path OUT.")


def _check_backbone_weights(training_args) -> None:
    """`--backbone_weights` of a new refiner names a converted folder, an official `.pt` file or a Hub id (the Hub's
    answer is for the run itself)."""
    if training_args.backbone_weights is None or training_args.model_name_or_path is not None:
        return
    from modeling_stage2.modeling_stage2 import backbone_weights_location

    try:
        backbone_weights_location(training_args.backbone_weights)
    except FileNotFoundError as error:
        raise MissingInputError(f"--{error}") from None
    except ValueError as error:
        raise UsageError(f"--backbone_weights {training_args.backbone_weights}: {error}") from None


def check_run_inputs(training_args, data_args, check_checkpoint: bool = True) -> None:
    """The folders and files the settings name exist and fit, before anything runs or is written: the data, the
    Stage 1 outputs, the checkpoint to resume from (`check_checkpoint`: that it is complete too), a saved refiner
    to start from and the backbone weights of a new one. `UsageError` (`MissingInputError`) naming the flag."""
    _check_data_folder(data_args)
    _check_splits(data_args)
    _check_redraw(data_args)
    _check_resume(training_args, complete=check_checkpoint)
    _check_start_model(training_args)
    _check_backbone_weights(training_args)
    problem = model_leaf("_files").output_path_problem(training_args.output_dir, folder=True)  # without torch
    if problem is not None:
        raise UsageError(f"--output_dir {training_args.output_dir}: {problem}")
    cache_dir = data_args.dataset_cache_dir
    if cache_dir is not None and not is_arrow_dataset(Path(data_args.data_dir)):  # where NPZ tiles are converted
        problem = model_leaf("_files").output_path_problem(cache_dir, folder=True)
        if problem is not None:
            raise UsageError(f"--dataset_cache_dir {cache_dir}: {problem}")


def ensure_arrow_dataset(data_args, output_dir: str | os.PathLike, build: bool = True) -> Path:
    """The folder of the Arrow `DatasetDict` of `data_args.data_dir`: the folder itself if it is one, else the
    cached conversion of its NPZ tiles (built on first use; with `build=False`, a `UsageError` where it is not
    there: the other processes of a distributed run, whose main process converts or has failed)."""
    _check_data_folder(data_args, tiles=False)  # the tiles: by the key below
    data_dir = Path(data_args.data_dir)
    if is_arrow_dataset(data_dir):
        return data_dir
    cache_root = _cache_root(data_args, output_dir)
    cached = cache_root / tiles_cache_key(data_dir, data_args.stage1_dir, data_args.input_mode,
                                          data_args.dataset_seed, degradation=data_args.degradation, flag="--data_dir")
    if is_arrow_dataset(cached):
        logger.info(f"Using the cached Arrow dataset {cached} (converted from {data_dir}).")
        if build:  # the main process (the only one of a single-process run) says it, once
            _warn_rejected_tiles(cached, data_dir)
        return cached
    if not build:
        raise UsageError(f"--data_dir {data_dir}: the main process did not convert the tiles to {cached} (it "
                         "stopped with an error, which it reports)")
    from data_builders import build_dataset

    logger.info(f"Converting the NPZ tiles of {data_dir} to Arrow in {cached} (once; later runs reuse it).")
    cache_root.mkdir(parents=True, exist_ok=True)
    build_dataset(data_dir, cached, stage1_dir=data_args.stage1_dir, input_mode=data_args.input_mode,
                  seed=data_args.dataset_seed, degradation=data_args.degradation)
    _warn_rejected_tiles(cached, data_dir)
    return cached


def _warn_rejected_tiles(converted: Path, data_dir) -> None:
    """A warning naming how many NPZ tiles of `data_dir` the conversion `converted` left out, and where their reasons
    are: the run trains without them (exit status 0: one bad tile of many does not fail a run)."""
    from data_builders.build import REJECTED_FILE, read_rejected

    count = len(read_rejected(converted))
    if count:
        logger.warning(f"--data_dir {data_dir}: {count} NPZ tile(s) rejected by the conversion, not in this run "
                       f"(reasons in {converted / REJECTED_FILE}).")


def _cache_root(data_args, output_dir: str | os.PathLike) -> Path:
    return Path(data_args.dataset_cache_dir or Path(output_dir) / DATASET_CACHE_DIR)


def load_or_build_dataset(data_args, output_dir: str | os.PathLike, build: bool = True):
    """The `DatasetDict` of `data_args.data_dir`: loaded if it is Arrow, else converted from NPZ once and cached
    (`build`: see `ensure_arrow_dataset`)."""
    from datasets import load_from_disk

    return load_from_disk(str(ensure_arrow_dataset(data_args, output_dir, build=build)))


def prepare_splits(dataset_dict, data_args, seed: int = 0):
    """(train, eval) `TileDataset`s: the training columns as tensors, the training split augmented."""
    from data_builders import make_eval_transform, make_train_transform

    from training.data import BATCH_COLUMNS, TileDataset

    _require_splits(list(dataset_dict), data_args.eval_split, f"--data_dir {data_args.data_dir}")
    train, evaluation = dataset_dict[TRAIN_SPLIT], dataset_dict[data_args.eval_split]
    if data_args.max_samples is not None:
        train = train.select(range(min(data_args.max_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    columns = [name for name in BATCH_COLUMNS if name in train.column_names]
    missing = sorted(set(BATCH_COLUMNS) - {"valid_mask"} - set(columns))
    if missing:
        raise UsageError(f"--data_dir {data_args.data_dir}: the dataset lacks the columns {missing}; build it with "
                         "stage2-build-dataset.")
    train_transform = make_train_transform() if data_args.augment else make_eval_transform()
    redraw = degradation_redraw(dataset_dict, data_args) if data_args.redraw_degradation else None
    return (TileDataset(train, train_transform, seed=seed, brightness_range=data_args.brightness_augment,
                        redraw=redraw),
            TileDataset(evaluation, make_eval_transform()))


def degradation_redraw(dataset_dict, data_args):
    """The `DegradationRedraw` of the dataset's synthetic `opt_v1` (`--redraw_degradation`); a UsageError naming
    the data when it has none."""
    from data_builders.build import read_build_info
    from data_builders.degrade import DegradationRedraw

    try:
        return DegradationRedraw.from_record(read_build_info(dataset_dict)["opt_v1"])
    except (KeyError, ValueError) as error:
        raise UsageError(f"--data_dir {data_args.data_dir}: --redraw_degradation cannot draw opt_v1 again: "
                         f"{error}.") from None


# ------------------------------------------------------------------------------------------- model
def build_model(training_args, print_summary: bool = True):
    """The trainable refiner of the run's settings (`modeling_stage2.build_trainable_model`), built after
    `transformers.set_seed(training_args.seed)`: the same model (a random-init backbone, the LoRA weights' start) in
    every process and on resume, however it is called."""
    from transformers import set_seed

    from modeling_stage2 import build_trainable_model

    set_seed(training_args.seed)
    lora = dict(lora_r=training_args.lora_r, lora_alpha=training_args.lora_alpha,
                lora_dropout=training_args.lora_dropout, target_modules=list(training_args.lora_target_modules),
                unfreeze_last_n_blocks=training_args.unfreeze_last_n_blocks,
                revision=_resumed_base_revision(training_args))
    with _hub_base_failures(training_args):
        if training_args.model_name_or_path is not None:
            model = build_trainable_model(model_name_or_path=training_args.model_name_or_path,
                                          quantization=training_args.quantization, print_summary=print_summary,
                                          **lora)
        else:
            model = build_trainable_model(refiner_config(training_args), quantization=training_args.quantization,
                                          print_summary=print_summary, **lora)
    if training_args.model_name_or_path is not None:
        unused = unused_model_settings(training_args, model.get_base_model().config)
        if unused and print_summary:  # once, from the process that logs
            logger.warning(f"--model_name_or_path {training_args.model_name_or_path}: its own config.json applies, so "
                           "these settings are not used: " + ", ".join(
                               f"{key} {asked!r} (the model's: {own!r})" for key, (asked, own) in unused.items()))
    return model


@contextlib.contextmanager
def _hub_base_failures(training_args):
    """A Hub download of the run's base (`--model_name_or_path` or `--backbone_weights` on the Hub) that fails, as one
    line naming the flag: a `UsageError` (exit status 2) for no such repo, revision or file, or no access; a
    `HubUnavailableError` (exit status 1) for a Hub out of reach or failing, with nothing cached."""
    from modeling_stage2 import hub

    try:
        yield
    except hub.hub_download_errors() as error:
        name = training_args.model_name_or_path
        flag = "--model_name_or_path" if name is not None else "--backbone_weights"
        what = hub.download_failure(name) if name is not None else "downloading it from the Hub failed"
        message = (f"{flag} {name if name is not None else training_args.backbone_weights}: {what} "
                   f"({hub.hub_failure_line(error)})")
        if hub.hub_failure_is_users(error):
            raise UsageError(message) from None
        raise HubUnavailableError(message) from error


def _resumed_base_revision(training_args) -> str | None:
    """The Hub commit the frozen base of the checkpoint being resumed was built from: a resumed run goes on with the
    base it started with, whatever was committed to the base's repo (a refiner, or the backbone's checkpoint) since."""
    from modeling_stage2.adapters import trained_base_revision
    from training.trainer import resolve_resume_checkpoint

    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir, warn=False)
    return None if checkpoint is None else trained_base_revision(checkpoint)


# ------------------------------------------------------------------------------------------- main
def run_training(training_args, data_args, settings: dict | None = None, callbacks=None):
    """Build data and model, train, and finish the output folder. Returns the trainer.

    Until training starts, a failure leaves the output folder as it was (what this run created there, the dataset
    conversion included, is removed); `config.yaml` is written when training starts. With an `InterruptCallback`
    that stopped training (SIGINT), raises `TrainingInterrupted` once the checkpoint is written."""
    from training.trainer import Stage2Trainer, restore_replaced_checkpoints

    output_dir = Path(training_args.output_dir)
    if training_args.should_save:  # before any lookup of the checkpoint to resume (the others wait for the data)
        restore_replaced_checkpoints(output_dir)  # and outside what a failed start undoes: it existed before
    with _undone_on_failure(output_dir, _cache_root(data_args, output_dir), enabled=training_args.should_save):
        def load_data(build: bool):
            dataset_dict = load_or_build_dataset(data_args, output_dir, build=build)
            return (dataset_dict, *prepare_splits(dataset_dict, data_args, seed=training_args.seed))

        dataset_dict, train_dataset, eval_dataset = _main_process_first(training_args, load_data)
        model = build_model(training_args, print_summary=training_args.should_log)
        _check_resume_fits(model, training_args)
        _check_resumable(training_args)
        trainer = Stage2Trainer(
            model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            training_config={"data_dir": str(data_args.data_dir), "train_tiles": len(train_dataset),
                             "eval_tiles": len(eval_dataset), "eval_split": data_args.eval_split,
                             **training_opt_v1(dataset_dict, data_args, warn=training_args.should_log),
                             "redraw_degradation": _redraw_description(train_dataset.redraw)},
            callbacks=callbacks,
        )
        _check_discriminator_fits(trainer, training_args)
        # Here rather than in `train`, so that a failing fit still leaves the output folder as it was.
        trainer.start_fitted_modules(training_args.resume_from_checkpoint)
        if training_args.should_save:
            write_run_config(output_dir, settings or {}, training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    interrupt = next((item for item in callbacks or () if isinstance(item, InterruptCallback)), None)
    if interrupt is not None and interrupt.stopped_at is not None:
        step = interrupt.stopped_at
        raise TrainingInterrupted(f"interrupted: training stopped after optimizer step {step} with a checkpoint "
                                  f"({output_dir / f'checkpoint-{step}'}); continue with --resume latest.")
    finish_run(trainer)
    return trainer


def _check_resumable(training_args) -> None:
    """The checkpoint a run resumes holds what a resume needs (not one saved with `save_only_model`): the Trainer
    would find out inside `train`, with a traceback."""
    from training.trainer import model_only_checkpoint_problem, resolve_resume_checkpoint

    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir, warn=False)
    problem = None if checkpoint is None else model_only_checkpoint_problem(checkpoint)
    if problem is not None:
        raise UsageError(f"--resume {checkpoint}: {problem}.")


def _check_discriminator_fits(trainer, training_args) -> None:
    """The checkpoint a run resumes holds a discriminator of the size these settings build (or none where they train
    none): one line and exit status 2, not the trainer's own ValueError (a traceback) when it starts."""
    from training.trainer import discriminator_resume_problem, resolve_resume_checkpoint

    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir, warn=False)
    problem = None if checkpoint is None else discriminator_resume_problem(checkpoint, trainer.discriminator)
    if problem is not None:
        raise UsageError(f"{checkpoint}: {problem}.")


def _check_resume_fits(model, training_args) -> None:
    """The checkpoint a run resumes holds the trainable weights of the model these settings build (the same LoRA
    rank, targets and blocks, the same trained modules): the Trainer finds out only inside `train`, with a traceback,
    once `config.yaml` is rewritten with the settings that do not fit."""
    from training.trainer import resolve_resume_checkpoint

    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir, warn=False)
    if checkpoint is None or not hasattr(model, "peft_config"):
        return
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    from modeling_stage2.adapters import ADAPTER_WEIGHTS_FILE

    weights = Path(checkpoint) / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        return
    expected = {name: tuple(tensor.shape) for name, tensor in get_peft_model_state_dict(model).items()}
    with safe_open(str(weights), "pt") as saved_file:
        saved = {name: tuple(saved_file.get_slice(name).get_shape()) for name in saved_file.keys()}
    if saved == expected:
        return
    differ = [name for name in expected if name in saved and saved[name] != expected[name]]
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    detail = (f"{differ[0]} is {list(saved[differ[0]])} there, {list(expected[differ[0]])} here" if differ
              else f"{len(missing)} of this model's tensors are not there, e.g. {missing[0]}" if missing
              else f"it holds {len(extra)} tensors this model lacks, e.g. {extra[0]}")
    raise UsageError(f"--resume {checkpoint}: its weights do not fit the model these settings build ({detail}); "
                     "resume with the settings it was trained with (the run's config.yaml), or start a new run.")


def training_opt_v1(dataset_dict, data_args, warn: bool = True) -> dict:
    """What the training data's `opt_v1` is, for the training record (`training_config.json`, the model card): the
    dataset's build record, not the flags, which an Arrow `--data_dir` does not use (`warn`: say so where they
    differ). A dataset without a build record is recorded by the flags' `input_mode`."""
    from data_builders.build import recorded_opt_v1

    built = recorded_opt_v1(dataset_dict)
    if built is None:
        return {"input_mode": data_args.input_mode}
    for flag in ("degradation", "dataset_seed"):  # each the flag of stage2-build-dataset that sets it too
        asked = getattr(data_args, flag)
        if warn and built[flag] is not None and asked != built[flag]:
            logger.warning(f"--{flag} {asked} is not used: --data_dir {data_args.data_dir} is an Arrow dataset whose "
                           f"opt_v1 was synthesised with {flag} {built[flag]!r} (stage2-build-dataset "
                           f"--{flag}); the run is recorded with the dataset's.")
    return built


def _redraw_description(redraw) -> str | None:
    """What `--redraw_degradation` drew the training tiles' `opt_v1` from (training_config.json), or None."""
    return None if redraw is None else f"degradation {redraw.preset!r} of dataset seed {redraw.seed}, a draw per epoch"


def _entries(folder: Path) -> set[Path]:
    return set(folder.iterdir()) if folder.is_dir() else set()


@contextlib.contextmanager
def _undone_on_failure(output_dir: Path, cache_root: Path, enabled: bool = True):
    """On an exception inside the block, remove what the block created in `output_dir` (all of it if the block
    created the folder; else the new entries, and the new entries of the dataset cache when it is inside)."""
    if not enabled:
        yield
        return
    from modeling_stage2._files import parents_removed_on_failure  # the trainer process: the package is loaded

    existed = output_dir.exists()
    inside = output_dir.resolve() in cache_root.resolve().parents
    before = {folder: _entries(folder) for folder in ((cache_root,) if inside else ()) + (output_dir,)}
    with parents_removed_on_failure(output_dir):
        try:
            yield
        except BaseException:
            if not existed:
                shutil.rmtree(output_dir, ignore_errors=True)
            else:
                for folder, entries in before.items():
                    for path in _entries(folder) - entries:
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            raise


def finish_run(trainer) -> None:
    """After training: the best weights back in the model, the model card in `best/`, the Hub push."""
    metric, best_metric = trainer.args.metric_for_best_model, trainer.state.best_metric
    # The Trainer starts best_metric at inf (-inf where greater is better) and replaces it only by a better value:
    # still there, every validation gave NaN (a model that diverged, no valid pixel) and best/ was never written.
    never_best = best_metric is None or best_metric == (-math.inf if trainer.args.greater_is_better else math.inf)
    why = _why_no_best(trainer.args.eval_strategy, metric, best_metric)
    if never_best and trainer.args.should_save:
        logger.warning(f"best/ holds the final model: {why}.")
        trainer.save_best_model()
    trainer.accelerator.wait_for_everyone()
    trainer.load_best_model()
    best = trainer.best_model_dir
    if trainer.args.should_save:
        trainer.write_card(best)
        from modeling_stage2.adapters import METRICS_FILE

        metrics_path = best / METRICS_FILE
        if metrics_path.is_file():
            from training.metrics import format_metrics_table

            print(f"Best model: {best} (" + (f"the final model: {why}" if never_best else f"{metric} = {best_metric}")
                  + ")")
            print(format_metrics_table(json.loads(metrics_path.read_text())))
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message="End of training: best model")


def _why_no_best(eval_strategy, metric: str | None, best_metric: float | None) -> str:
    """Why no validation picked a model for best/: none ran, none was asked to pick (`metric_for_best_model` unset),
    or every one gave NaN."""
    if str(getattr(eval_strategy, "value", eval_strategy)) == "no":
        return "no validation ran (eval strategy 'no')"
    if metric is None:
        return "no metric_for_best_model picks one of the validations"
    return f"every validation gave a NaN {metric}" if best_metric is not None else "no validation ran"


# ------------------------------------------------------------------------------------------- the trainer process
class InterruptCallback:
    """SIGINT handling of the trainer process. During training, the first SIGINT stops training after the current
    optimizer step with a checkpoint (all processes together); before training starts, or the second time, it
    interrupts at once (`KeyboardInterrupt`). `handle` is the signal handler; the instance is a Trainer callback."""

    def __init__(self):
        self.training = False
        self.requested = False
        self.stopped_at = None

    def handle(self, signum, frame):
        if not self.training or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if _is_main_process():
            os.write(2, f"{PROG}: interrupt: stopping after the current optimizer step, with a checkpoint (interrupt "
                        f"again to stop at once).\n".encode())

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_step_end(self, args, state, control, **kwargs):
        if _any_process(self.requested, args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def __getattr__(self, name: str):
        if name.startswith("on_"):  # the other Trainer events: nothing to do
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def _main_process_first(training_args, work):
    """`work(build=True)` on the main process, then `work(build=False)` on the others once it succeeded there. Where
    it failed (and removed what it made), the others raise a `UsageError` without running it, instead of converting
    the data again or reading what is being removed; the main process reports why."""
    if training_args.world_size == 1:
        return work(True)
    if training_args.process_index == 0:
        try:
            result = work(True)
        except BaseException:
            _any_process(True, training_args)  # releases the others, who learn that it failed
            raise
        _any_process(False, training_args)
        return result
    if _any_process(False, training_args):  # waits for the main process
        raise UsageError("the main process stopped before training (it reports why)")
    return work(False)


def _any_process(flag: bool, args) -> bool:
    """`flag` of any process of a distributed run (every process stops at the same step)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=args.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def require_output_dir(settings: dict) -> None:
    """The run's settings name its output folder: transformers would write into ./trainer_output unasked."""
    if settings.get("output_dir") is None:
        raise UsageError("--output_dir is required (or output_dir in the --config file): the folder the run "
                         "writes its checkpoints, best/ and logs to.")


def main(argv=None, callbacks=None):
    """Train with the settings of `argv` in this process. Returns the trainer; `UsageError` on a mistake in the
    settings or inputs (raised before anything runs or is written)."""
    training_args, data_args, settings = parse_args(argv)
    require_output_dir(settings)
    check_run_inputs(training_args, data_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    return run_training(training_args, data_args, settings, callbacks=callbacks)


@exit_on_termination
def cli(argv=None) -> int:
    """The trainer process (`accelerate launch training/train.py ARGS`): exit status 0 trained, 2 a mistake in the
    settings or inputs (one line; a Hub base that does not exist too), 1 a Hub base that could not be downloaded (the
    Hub out of reach: one line), 130 interrupted, 128 + N stopped by SIGTERM / SIGHUP (forwarded to the run's group
    by `stage2-train`: the cleanups run, a `best/` being written and the temporary files of the run are removed); a
    bug raises (status 1)."""
    _stop_with_launcher()
    interrupt = InterruptCallback()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupt.handle) if in_main_thread else None
    try:
        if _interrupted_before_start():  # a Ctrl-C came while SIGINT was still ignored: stop at once
            raise KeyboardInterrupt
        main(argv, callbacks=[interrupt])
        code = 0
    except UsageError as error:
        _say_error(error, once=True)
        code = EXIT_USAGE
    except HubUnavailableError as error:  # the run's base on a Hub out of reach: not a mistake in the settings
        _say_error(error, once=True)
        code = EXIT_FAILURE
    except TrainingInterrupted as stop:
        _say(stop, once=True)
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say("interrupted.", once=True)
        code = EXIT_INTERRUPTED
    except Exception:  # a bug: its traceback follows; recorded, so that no status means a trainer killed
        _record_exit_status(EXIT_FAILURE)
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    _record_exit_status(code)
    return code


def _interrupted_before_start() -> bool:
    path = os.environ.get(INTERRUPT_FILE_ENV)
    return bool(path) and Path(path).exists()


def _say_error(error, once: bool = False) -> None:
    """A mistake or failure the run stops on, as every command words one: `stage2-train: error: ...`."""
    _say(f"error: {error}", once=once)


def _say(message, once: bool = False) -> None:
    """One line on stderr (`once`: from the first process of a distributed run only)."""
    if not once or _is_main_process():
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _is_main_process() -> bool:
    """The first process of a distributed run (the only one of a single-process run)."""
    return os.environ.get("RANK", "0") == "0"


def _record_exit_status(code: int) -> None:
    """The status `stage2-train` exits with, from the main process only: it is the one that reports why it stopped;
    another's (e.g. "the main process stopped before training", 2) would overwrite it, or stand where the main process
    failed with a traceback (1, which accelerate reports)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if path and code and _is_main_process():
        with contextlib.suppress(OSError):
            Path(path).write_text(str(code))


def _proc_stat(pid: int | str) -> list[str] | None:
    """The fields of `/proc/PID/stat` after the command name (state, ppid, pgrp, ...); None without the process
    (or without /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces


def _parent_of(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[1]) if fields else None


def _has_ancestor(pid: int) -> bool:
    """Whether `pid` is an ancestor of this process (Linux /proc)."""
    current = os.getpid()
    for _ in range(64):
        current = _parent_of(current)
        if current is None or current < 1:  # past PID 1 (whose parent is 0)
            return False
        if current == pid:  # PID 1 too: a launcher that is a container's entry point
            return True
    return False


def _set_parent_death_signal(signum: int) -> None:
    """Linux: the kernel sends `signum` to this process when its parent dies (`prctl(PR_SET_PDEATHSIG)`)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signum, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def _stop_with_launcher() -> None:
    """In a trainer started by `stage2-train`: stop (with every process of the run's process group) when the
    launcher is gone, however it died; the parent's death (`accelerate launch`) stops this process too."""
    value = os.environ.get(LAUNCHER_PID_ENV)
    if not value or not value.isdigit():
        return
    launcher = int(value)
    _set_parent_death_signal(signal.SIGTERM)
    on_linux = Path("/proc/self/stat").is_file()
    parent = os.getppid()
    try:
        own_group = os.getpgid(launcher) != os.getpgrp()  # stage2-train starts the run in a group of its own
    except OSError:
        own_group = True

    def alive() -> bool:
        return _has_ancestor(launcher) if on_linux else os.getppid() == parent

    def stop() -> None:
        _say(f"the launcher (PID {launcher}) is gone: stopping.")
        with contextlib.suppress(OSError):
            os.killpg(os.getpgrp(), signal.SIGTERM) if own_group else os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        os._exit(128 + signal.SIGTERM)

    def watch() -> None:
        while alive():
            time.sleep(0.5)
        stop()

    if not alive():
        stop()
    threading.Thread(target=watch, name="stage2-launcher-watch", daemon=True).start()


# ------------------------------------------------------------------------------------------- stage2-train
_HELP_DESCRIPTION = """\
Train the Stage 2 refiner (Prithvi-EO-2.0 backbone, LoRA, ConvNeXt head) on Sentinel-2 tiles.

Checks the settings (the YAML file and the flags) and the input folders, then runs the trainer
(training/train.py) under `accelerate launch`. Keys of the YAML file are the flags without `--`;
flags override the file."""

_HELP_EPILOG = """\
accelerate options:
  Options before a `--` go to `accelerate launch`, everything after it to training:
    stage2-train --num_processes 2 --multi_gpu -- --config configs/hardware.lowvr.yaml \\
        --data_dir DATA --output_dir runs/x
  On a machine without a GPU add the training flag --use_cpu true (DDP over gloo): without it,
  or without --multi_gpu, accelerate does not start the processes asked for, and stage2-train
  refuses. Without options (and without an `accelerate config` file) one process runs:
  --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no (the training
  settings choose the precision: fp16 / bf16). `accelerate launch --help` lists accelerate's options.

all training flags:
  Every TrainingArguments field and every Stage 2 setting (model, LoRA, loss, discriminator, data)
  is a flag: `stage2-train --help-all` lists them (slower: it loads transformers).

exit status:
  0 trained; 2 a mistake in the settings or inputs (one line names the file, key or flag; nothing
  is started or written); 130 interrupted (SIGINT / Ctrl-C: training stops after the current
  optimizer step and writes a checkpoint; `--resume latest` continues); 128+N stopped by signal N
  (SIGTERM and SIGHUP stop every process of the run); 1 training failed (its traceback is above)."""

_HELP_FLAGS = (
    ("--config", "FILE", "YAML file of settings; flags on the command line override it."),
    ("--data_dir", "DIR", "NPZ tiles ({train,val,test}/*.npz; converted once and cached) or a saved Arrow "
                          "DatasetDict."),
    ("--output_dir", "DIR", "where checkpoints, best/, the logs and config.yaml go."),
    ("--stage1_dir", "DIR", "Stage 1 outputs (<tile>.npz with opt_v1); without it opt_v1 is synthesised."),
    ("--resume", "CKPT|latest", "resume from a checkpoint folder, or from the newest complete one in --output_dir."),
    ("--epochs", "N", "number of training epochs (alias of --num_train_epochs)."),
    ("--max_samples", "N", "use only the first N training tiles."),
    ("--learning_rate", "LR", "peak learning rate of the generator."),
)


def _help_parser() -> argparse.ArgumentParser:
    """The summary `stage2-train --help` prints: no torch or transformers import, so it is instant."""
    parser = argparse.ArgumentParser(
        prog=PROG, usage="%(prog)s [ACCELERATE_OPTIONS --] [--config FILE] --data_dir DIR --output_dir DIR "
                         "[TRAINING_FLAGS]",
        description=_HELP_DESCRIPTION, epilog=_HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False)
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit.")
    parser.add_argument("--help-all", action="store_true", help="list every training flag and exit.")
    for flag, metavar, text in _HELP_FLAGS:
        parser.add_argument(flag, metavar=metavar, help=text)
    return parser


def split_launcher_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate options, training flags): the options before the first `--`, the flags after it; without `--`
    every argument is a training flag."""
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1:]
    return [], list(argv)


# Values accelerate would otherwise pick itself, with a warning at every start ("`--num_processes` was set to a
# value of `0`"); passed only when neither the user nor an accelerate config file sets them.
_ACCELERATE_DEFAULTS = (("num_processes", "1"), ("num_machines", "1"), ("mixed_precision", "no"),
                        ("dynamo_backend", "no"))


def parse_accelerate_options(launcher: list[str]) -> argparse.Namespace:
    """The user's `accelerate launch` options (those before `--`) as accelerate's own parser reads them; a mistake
    is a `UsageError` (one line)."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    parser.error = lambda message: _raise_usage_error(
        f"accelerate option: {message}" + (" (training flags go after `--`)" if "unrecognized" in message else ""))
    parser.allow_abbrev = False  # `--config FILE` before `--` is a misplaced training flag, not `--config_file`
    placeholder = "<training script>"
    options = parser.parse_args([*launcher, placeholder])
    if options.training_script != placeholder:
        raise UsageError(f"accelerate option: unexpected argument {options.training_script!r} before `--` (only "
                         f"`accelerate launch` options go there; training flags go after it).")
    return options


def accelerate_arguments(launcher: list[str], options: argparse.Namespace | None = None) -> list[str]:
    """The `accelerate launch` options of a run: the user's `launcher` (`options`: as `parse_accelerate_options`
    read them; read here if not given), the defaults they leave unset, and `--quiet` (a failed trainer reports
    itself; accelerate would add a traceback)."""
    from accelerate.commands import config as accelerate_config

    options = parse_accelerate_options(launcher) if options is None else options
    added = []
    if options.config_file is None and not os.path.isfile(accelerate_config.default_config_file):
        for name, value in _ACCELERATE_DEFAULTS:
            if name == "num_processes" and options.multi_gpu:
                continue  # accelerate counts the GPUs
            if getattr(options, name, None) is None:
                added += [f"--{name}", value]
    return [*launcher, *added, *([] if options.quiet else ["--quiet"])]


# accelerate's launchers of several processes besides `--multi_gpu` (GPU-only): with none of them, accelerate
# starts ONE process whatever `--num_processes` says (`--cpu`, or a config file's `MULTI_CPU` / `NO`)
_OTHER_MULTI_PROCESS = ("use_deepspeed", "use_fsdp", "use_megatron_lm", "tpu")


def process_count_problem(options: argparse.Namespace, use_cpu: bool, cuda: bool | None = None) -> str | None:
    """Why the accelerate options `options` (`parse_accelerate_options`) would not run the several processes they ask
    for, as one line, or None.
    `--num_processes N` without `--multi_gpu` starts one process; `--multi_gpu` on a machine without a GPU (`cuda`:
    default `torch.cuda.is_available()`) and without the training flag `use_cpu` starts N separate trainings writing
    into one output folder. An accelerate config file (`--config_file`, or the default one) counts as accelerate
    reads it, under the command line's options."""
    from accelerate.commands import config as accelerate_config
    from accelerate.commands.config.config_args import load_config_from_file

    processes, multi_gpu = options.num_processes, options.multi_gpu
    other = any(getattr(options, name, False) for name in _OTHER_MULTI_PROCESS)
    config_file = options.config_file or (accelerate_config.default_config_file
                                          if os.path.isfile(accelerate_config.default_config_file) else None)
    if config_file is not None:
        config = load_config_from_file(config_file)
        processes = processes if processes is not None else getattr(config, "num_processes", None)
        kind = str(getattr(config, "distributed_type", "NO")).rsplit(".", 1)[-1]
        multi_gpu = multi_gpu or kind == "MULTI_GPU"
        other = other or kind not in ("NO", "MULTI_CPU", "MULTI_GPU")
    if processes is None or int(processes) < 2 or other:
        return None
    if not multi_gpu:
        return (f"accelerate options: {processes} processes without --multi_gpu start ONE process (accelerate's "
                f"--cpu, or a config file's MULTI_CPU); for {processes} processes give --multi_gpu --num_processes "
                f"{processes}, and on a machine without a GPU the training flag --use_cpu true after `--`.")
    cuda = _cuda_available() if cuda is None else cuda
    if not cuda and not use_cpu:
        return (f"accelerate options: --multi_gpu --num_processes {processes} on a machine without a GPU start "
                f"{processes} separate trainings into one output folder; add the training flag --use_cpu true (after "
                f"`--`) for {processes} CPU processes that train together (DDP over gloo).")
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def _quiet():
    """No log records or warnings while the launcher checks the settings (the trainer prints its own)."""
    import warnings

    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def check_before_launch(training: list[str], accelerate_options: argparse.Namespace | None = None) -> None:
    """What the trainer will check, in this process and without touching a GPU: the settings and the inputs; and that
    the accelerate options (`parse_accelerate_options`; none given: none) start the processes they ask for
    (`process_count_problem`)."""
    with _quiet():
        training_args, data_args, settings = parse_args(training, without_devices=True)
        require_output_dir(settings)
        if accelerate_options is None:
            accelerate_options = parse_accelerate_options([])
        problem = process_count_problem(accelerate_options, use_cpu=bool(settings.get("use_cpu")))
        if problem is not None:
            raise UsageError(problem)
        check_run_inputs(training_args, data_args, check_checkpoint=False)


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def _group_running(group: int) -> bool:
    """Whether a process of `group` still runs (on Linux, exited ones waiting to be reaped do not count)."""
    if not Path("/proc/self/stat").is_file():
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in Path("/proc").iterdir():
        fields = _proc_stat(entry.name) if entry.name.isdigit() else None
        if fields and int(fields[2]) == group and fields[0] not in "ZX":
            return True
    return False


def _stop_group(group: int, grace: float = 10.0) -> None:
    """Stop whatever is left in the process group of the run (SIGTERM, then SIGKILL after `grace` seconds)."""
    if not _group_running(group):
        return
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_running(group):
            return
        time.sleep(0.1)
    _signal_group(group, signal.SIGKILL)


def run_accelerate(command: list[str], env: dict) -> tuple[int, list[int]]:
    """Run `command` (`accelerate launch ...`) in a new session and process group and wait for it, forwarding
    SIGINT, SIGTERM and SIGHUP to the group (a second SIGINT becomes SIGTERM: stop at once), except one this process
    was started ignoring (SIGHUP under `nohup`), which the run keeps ignoring. accelerate itself ignores SIGINT, so
    the trainer alone decides how to stop. Returns (exit status, the signals received); the
    group is empty when it returns."""
    received: list[int] = []
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in forwarded} if in_main_thread else {}
    if in_main_thread:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by accelerate (and the trainer, which sets its own)
    try:
        child = subprocess.Popen(command, env=env, start_new_session=True)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])

    def forward(signum, frame):
        send = signal.SIGTERM if signum == signal.SIGINT and signal.SIGINT in received else signum
        received.append(signum)
        if signum == signal.SIGINT and env.get(INTERRUPT_FILE_ENV):  # before the signal: see INTERRUPT_FILE_ENV
            with contextlib.suppress(OSError):
                Path(env[INTERRUPT_FILE_ENV]).touch()
        _signal_group(child.pid, send)

    try:
        for signum in previous:
            if previous[signum] is not signal.SIG_IGN:  # an ignored signal stays ignored (`nohup stage2-train`)
                signal.signal(signum, forward)
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop_group(child.pid)
    return code, received


def _exit_status(code: int, received: list[int], status_file: Path) -> int:
    """The status of `stage2-train`: stopped by SIGTERM/SIGHUP: 128 + N; else the trainer's own (recorded in
    `status_file`: accelerate --quiet reports every failure as 1), else accelerate's."""
    stopping = [signum for signum in received if signum != signal.SIGINT]
    if stopping:
        _say(f"stopped by {signal.Signals(stopping[0]).name}.")
        return 128 + stopping[0]
    with contextlib.suppress(OSError, ValueError):
        recorded = status_file.read_text().strip()
        if recorded:
            return int(recorded)
    if code and signal.SIGINT in received:  # Ctrl-C, or twice: the second stopped the run at once (by SIGTERM)
        if received.count(signal.SIGINT) > 1:
            _say("interrupted again: stopped at once, without a checkpoint.")
        return EXIT_INTERRUPTED
    if code < 0:
        return 128 - code
    if code:  # the trainer records every way it stops, a bug's traceback included: it was killed, or never started
        _say("the trainer process ended without saying why: killed (SIGKILL, e.g. by the system's out-of-memory "
             "killer: see dmesg), or it failed to start (a traceback above says why); the checkpoints written "
             "before are whole.")
    return code


def _under_launcher() -> bool:
    return any(name in os.environ for name in ("ACCELERATE_LAUNCHED", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"))


def launch_main(argv=None) -> int:
    """Console script `stage2-train`: check the settings in this process, then (`launch`, same PID) run
    `accelerate launch training/train.py ARGS` in a process group of its own and exit with the trainer's status
    (see `_HELP_EPILOG`); returns 0 for `--help`, 2 for a mistake in the settings or inputs.

    Options before a `--` go to `accelerate launch` (e.g. `--num_processes 2 --multi_gpu`), the rest to training.
    Already under a launcher (`accelerate launch stage2-train ...`): trains in this process (`cli`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if _under_launcher():
        return cli(argv)
    launcher, training = split_launcher_arguments(argv)
    if "-h" in argv or "--help" in argv:
        _help_parser().print_help()
        return 0
    if "--help-all" in argv:
        parser = _parser(prog=PROG)
        parser.add_argument("--config", default=None, help="YAML file of settings; command-line flags override it.")
        parser.print_help()
        return 0
    try:
        accelerate_options = parse_accelerate_options(launcher)
        options = accelerate_arguments(launcher, accelerate_options)
        check_before_launch(training, accelerate_options)
    except UsageError as error:
        _say_error(error)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say("interrupted.")
        return EXIT_INTERRUPTED
    return launch(options, training)


def launch(options: list[str], training: list[str]):
    """Replace this process (same PID; its settings checked, transformers loaded) by a lean one that runs the
    trainer under `accelerate launch` and waits for it (`supervise`): the memory of the check is not held for the
    whole run."""
    sys.stdout.flush()
    sys.stderr.flush()
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            "from training.train import supervise; sys.exit(supervise(sys.argv[1:]))")
    os.execv(sys.executable, [sys.executable, "-c", code, *options, "--", *training])


def accelerate_command(options: list[str], training: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *options, str(Path(__file__).resolve()), *training]


@exit_on_termination
def supervise(argv: list[str]) -> int:
    """Run `accelerate launch OPTIONS training/train.py TRAINING` (`argv`: OPTIONS -- TRAINING, already checked)
    in its own process group and return the trainer's exit status; signals are forwarded (`run_accelerate`). One that
    comes before the forwarding starts (or after it ends) stops this process with 128 + N, its status file removed."""
    options, training = split_launcher_arguments(argv)
    handle, status_path = tempfile.mkstemp(prefix="stage2-train-status-")
    os.close(handle)
    status_file = Path(status_path)
    interrupt_file = status_file.with_name(f"{status_file.name}.interrupted")
    env = {**os.environ, "ACCELERATE_LAUNCHED": "1", LAUNCHER_PID_ENV: str(os.getpid()),
           STATUS_FILE_ENV: str(status_file), INTERRUPT_FILE_ENV: str(interrupt_file)}
    try:
        code, received = run_accelerate(accelerate_command(options, training), env)
        return _exit_status(code, received, status_file)
    finally:
        status_file.unlink(missing_ok=True)
        interrupt_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(cli())
