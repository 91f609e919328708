"""Train the Stage 2 refiner: the design's command line.

    accelerate launch training/train.py --config configs/hardware.lowvr.yaml --data_dir D \\
        [--stage1_dir S] --output_dir O [--resume CKPT|latest] [--max_samples N] [--epochs N] [--any_trainer_flag V]
    stage2-train ...same flags...                      # re-executes itself through `accelerate launch`
    stage2-train --num_processes 2 -- ...flags...      # accelerate options before `--`

Settings come from the YAML file given with `--config` (keys are the fields of `Stage2TrainingArguments` and
`Stage2DataArguments`, i.e. any `TrainingArguments` field plus the model, LoRA, loss and data settings) and are
overridden by the same flags on the command line (`transformers.HfArgumentParser`).

`--data_dir` is either NPZ tiles (`{train,val,test}/*.npz`), converted once to an Arrow `DatasetDict` and cached
(in `OUTPUT_DIR/_dataset/<key>`, the key hashing the tiles' names, sizes and modification times and the build
options), or a `DatasetDict` saved with `save_to_disk`.

Output folder: `best/` (the best validation model: `load_trained_model("O/best")`, with `metrics.json`,
`training_config.json`, `preview.png` and the model card `README.md`), `checkpoint-N/` (complete ones carry
`checkpoint_complete.json`), `config.yaml` (the settings of this run, usable as `--config`),
`training_log.jsonl`, TensorBoard events in `runs/`.
"""
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

# Intel MKL picks code paths by memory alignment unless told otherwise, so two identical runs can differ in the
# last bits; "AUTO" keeps MKL's fastest branch but makes it reproducible run to run (read when MKL first runs, so
# it must be set before torch computes anything; a user's own MKL_CBWR wins).
os.environ.setdefault("MKL_CBWR", "AUTO")

import yaml  # noqa: E402

logger = logging.getLogger("training.train")

CONFIG_NAME = "config.yaml"
DATASET_CACHE_DIR = "_dataset"  # "_*" is never pushed to the Hub by the Trainer
ARROW_MARKER = "dataset_dict.json"
_CACHE_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------- arguments
def _parser():
    from transformers import HfArgumentParser

    from training.args import Stage2DataArguments, Stage2TrainingArguments

    return HfArgumentParser((Stage2TrainingArguments, Stage2DataArguments))


def _aliases(parser) -> dict[str, str]:
    """Option spellings -> field names (`--epochs` -> num_train_epochs, `--resume` -> resume_from_checkpoint)."""
    names = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith("--no_"):
                names[option[2:].replace("-", "_")] = action.dest
    return names


def load_config_file(path: str | os.PathLike, parser=None) -> dict:
    """Read a YAML config: a mapping of argument names to values. Unknown keys are an error naming the file."""
    parser = parser or _parser()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error}).") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}.")
    aliases = _aliases(parser)
    resolved = {}
    for key, value in values.items():
        if key not in aliases:
            raise ValueError(
                f"{path}: unknown key {key!r}. Keys are Stage2TrainingArguments / Stage2DataArguments fields "
                f"(any TrainingArguments field, e.g. learning_rate, num_train_epochs); see --help."
            )
        resolved[aliases[key]] = value
    return resolved


def parse_args(argv=None):
    """`--config FILE` (YAML) + command-line overrides -> (Stage2TrainingArguments, Stage2DataArguments, settings).

    `settings` holds what this run sets explicitly (the config file's values and the command-line overrides):
    it is written to `OUTPUT_DIR/config.yaml`.
    """
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = _parser()
    parser.add_argument("--config", default=None, help="YAML file of settings; command-line flags override it.")
    file_values = load_config_file(known.config, parser) if known.config else {}
    parser.set_defaults(**file_values)
    namespace, unknown = parser.parse_known_args(rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(namespace)
    values.pop("config", None)
    overrides = {key: value for key, value in values.items() if value != parser.get_default(key)}
    settings = {**file_values, **overrides}
    training_args, data_args = parser.parse_dict(values)
    return training_args, data_args, settings


def write_run_config(output_dir: str | os.PathLike, settings: dict, training_args) -> Path:
    """`OUTPUT_DIR/config.yaml`: the explicit settings of the run (loadable with `--config`)."""
    path = Path(output_dir) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {key: _yaml_value(value) for key, value in sorted(settings.items()) if key not in ("hub_token",)}
    header = (f"# Settings of this Stage 2 training run ({training_args.precision_note})\n"
              f"# Re-run with: accelerate launch training/train.py --config {path}\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _yaml_value(value):
    if isinstance(value, (list, tuple)):
        return [_yaml_value(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _yaml_value(v) for k, v in value.items()}
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value  # enums
    return value


# ------------------------------------------------------------------------------------------- data
def is_arrow_dataset(path: str | os.PathLike) -> bool:
    return (Path(path) / ARROW_MARKER).is_file()


def _tree_fingerprint(folder: Path, digest) -> int:
    count = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".npz", ".json"):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count += path.suffix == ".npz"
    return count


def dataset_cache_key(data_dir: str | os.PathLike, stage1_dir=None, input_mode: str | None = None,
                      seed: int = 0, degradation: str = "mild") -> str:
    """Key of a converted dataset: the tiles' (and Stage 1 files') names, sizes and modification times, and the
    build options (with the degradation preset, `DEGRADATION_CHOICES`). Any change to the tiles makes a new key
    (and a new conversion). `"mild"` keeps the key it had before presets existed (its opt_v1 is unchanged)."""
    from data_builders.degrade import DEGRADATION_CHOICES

    if degradation not in DEGRADATION_CHOICES:
        raise ValueError(f"degradation must be one of {DEGRADATION_CHOICES}, got {degradation!r}.")
    digest = hashlib.sha256(f"v{_CACHE_FORMAT_VERSION}\0{input_mode}\0{seed}\n".encode())
    if degradation != "mild":
        digest.update(f"degradation\0{degradation}\n".encode())
    if _tree_fingerprint(Path(data_dir), digest) == 0:
        raise FileNotFoundError(
            f"--data_dir {data_dir}: no NPZ tiles ({{train,val,test}}/*.npz) and no saved Arrow dataset "
            f"({ARROW_MARKER}) there."
        )
    if stage1_dir is not None:
        digest.update(b"stage1\n")
        _tree_fingerprint(Path(stage1_dir), digest)
    return digest.hexdigest()[:16]


def ensure_arrow_dataset(data_args, output_dir: str | os.PathLike) -> Path:
    """The folder of the Arrow `DatasetDict` of `data_args.data_dir`: the folder itself if it is one, else the
    cached conversion of its NPZ tiles (built on first use)."""
    if data_args.data_dir is None:
        raise ValueError("--data_dir is required: NPZ tiles ({train,val,test}/*.npz) or a saved Arrow DatasetDict.")
    data_dir = Path(data_args.data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir}: no such folder.")
    if is_arrow_dataset(data_dir):
        if data_args.stage1_dir is not None:
            raise ValueError(f"--stage1_dir applies to NPZ tiles; {data_dir} is already an Arrow dataset.")
        return data_dir
    cache_root = Path(data_args.dataset_cache_dir or Path(output_dir) / DATASET_CACHE_DIR)
    cached = cache_root / dataset_cache_key(data_dir, data_args.stage1_dir, data_args.input_mode,
                                            data_args.dataset_seed, degradation=data_args.degradation)
    if is_arrow_dataset(cached):
        logger.info(f"Using the cached Arrow dataset {cached} (converted from {data_dir}).")
        return cached
    from data_builders import build_dataset

    logger.info(f"Converting the NPZ tiles of {data_dir} to Arrow in {cached} (once; later runs reuse it).")
    cache_root.mkdir(parents=True, exist_ok=True)
    build_dataset(data_dir, cached, stage1_dir=data_args.stage1_dir, input_mode=data_args.input_mode,
                  seed=data_args.dataset_seed, degradation=data_args.degradation)
    return cached


def load_or_build_dataset(data_args, output_dir: str | os.PathLike):
    """The `DatasetDict` of `data_args.data_dir`: loaded if it is Arrow, else converted from NPZ once and cached."""
    from datasets import load_from_disk

    return load_from_disk(str(ensure_arrow_dataset(data_args, output_dir)))


def prepare_splits(dataset_dict, data_args, seed: int = 0):
    """(train, eval) `TileDataset`s: the training columns as tensors, the training split augmented."""
    from data_builders import make_eval_transform, make_train_transform

    from training.trainer import BATCH_COLUMNS, TileDataset

    for split in ("train", data_args.eval_split):
        if split not in dataset_dict:
            raise ValueError(f"The dataset has no {split!r} split (it has {sorted(dataset_dict)}); "
                             f"training needs 'train' and the validation split (--eval_split).")
    train, evaluation = dataset_dict["train"], dataset_dict[data_args.eval_split]
    if data_args.max_samples is not None:
        train = train.select(range(min(data_args.max_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    columns = [name for name in BATCH_COLUMNS if name in train.column_names]
    missing = sorted(set(BATCH_COLUMNS) - {"valid_mask"} - set(columns))
    if missing:
        raise ValueError(f"The dataset lacks the columns {missing}; build it with stage2-build-dataset.")
    train_transform = make_train_transform() if data_args.augment else make_eval_transform()
    return (TileDataset(train, train_transform, seed=seed, brightness_range=data_args.brightness_augment),
            TileDataset(evaluation, make_eval_transform()))


# ------------------------------------------------------------------------------------------- model
def build_model(training_args, print_summary: bool = True):
    """The trainable refiner of the run's settings (`modeling_stage2.build_trainable_model`)."""
    from modeling_stage2 import Stage2RefinerConfig, build_trainable_model

    lora = dict(lora_r=training_args.lora_r, lora_alpha=training_args.lora_alpha,
                lora_dropout=training_args.lora_dropout, target_modules=list(training_args.lora_target_modules),
                unfreeze_last_n_blocks=training_args.unfreeze_last_n_blocks)
    if training_args.model_name_or_path is not None:
        return build_trainable_model(model_name_or_path=training_args.model_name_or_path,
                                     quantization=training_args.quantization, print_summary=print_summary, **lora)
    settings = {"spectral_correction": training_args.spectral_correction,
                "nonnegative_output": training_args.nonnegative_output,
                **(training_args.refiner_config_overrides or {})}
    config = Stage2RefinerConfig(backbone_config=training_args.backbone_preset,
                                 backbone_weights=training_args.backbone_weights, **settings)
    return build_trainable_model(config, quantization=training_args.quantization, print_summary=print_summary,
                                 **lora)


def start_spectral_correction(model, train_split, training_args) -> str | None:
    """Start the refiner's shared spectral correction as `spectral_correction_init` says; returns what it did
    ("spectral_fit of N tiles", "linear_fit of N tiles", "identity"), or None for a refiner without the branch or
    a resumed run."""
    from training.linear_fit import (
        LinearColorFit,
        fit_spectral_correction,
        set_shared_spectral_correction,
        spectral_corrections,
    )
    from training.trainer import build_loss, resolve_resume_checkpoint

    init = training_args.spectral_correction_init
    if not spectral_corrections(model):
        return None
    if resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir, warn=False):
        return None  # the checkpoint holds the correction reached so far
    if init == "identity":
        return "identity"
    if init == "spectral_fit":
        nonnegative = bool(getattr(model.config, "nonnegative_output", False))
        fit = fit_spectral_correction(train_split, loss=build_loss(training_args).spectral, nonnegative=nonnegative,
                                      seed=training_args.seed)
    else:
        fit = LinearColorFit.from_dataset(train_split)
    set_shared_spectral_correction(model, fit)
    logger.info(f"The spectral correction starts at the {init} colour correction of {fit.tiles} training tiles "
                f"({fit.pixels:,} valid pixels).")
    return f"{init} of {fit.tiles} training tiles"


# ------------------------------------------------------------------------------------------- main
def run_training(training_args, data_args, settings: dict | None = None, callbacks=None):
    """Build data and model, train, and finish the output folder. Returns the trainer."""
    from transformers import set_seed

    from training.trainer import Stage2Trainer

    output_dir = Path(training_args.output_dir)
    if training_args.should_save:
        write_run_config(output_dir, settings or {}, training_args)
    with training_args.main_process_first(local=False, desc="dataset conversion"):
        dataset_dict = load_or_build_dataset(data_args, output_dir)
    train_dataset, eval_dataset = prepare_splits(dataset_dict, data_args, seed=training_args.seed)
    set_seed(training_args.seed)  # the same base (and random-init backbone) in every process and on resume
    model = build_model(training_args, print_summary=training_args.should_log)
    spectral_start = start_spectral_correction(model, train_dataset.dataset, training_args)
    trainer = Stage2Trainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        training_config={"data_dir": str(data_args.data_dir), "train_tiles": len(train_dataset),
                         "eval_tiles": len(eval_dataset), "eval_split": data_args.eval_split,
                         "input_mode": data_args.input_mode, "spectral_correction_init": spectral_start},
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish_run(trainer)
    return trainer


def finish_run(trainer) -> None:
    """After training: the best weights back in the model, the model card in `best/`, the Hub push."""
    if trainer.state.best_metric is None and trainer.args.should_save:
        logger.warning("No validation ran (eval strategy 'no'): best/ holds the final model.")
        trainer.save_best_model()
    trainer.accelerator.wait_for_everyone()
    trainer.load_best_model()
    best = trainer.best_model_dir
    if trainer.args.should_save:
        from model_cards.cards import write_model_card

        write_model_card(best, repo_id=trainer.args.hub_model_id,
                         split=trainer.training_config.get("eval_split", "val"))
        metrics_path = best / "metrics.json"
        if metrics_path.is_file():
            from training.metrics import format_metrics_table

            print(f"Best model: {best} ({trainer.args.metric_for_best_model} = {trainer.state.best_metric})")
            print(format_metrics_table(json.loads(metrics_path.read_text())))
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message="End of training: best model")


def main(argv=None):
    training_args, data_args, settings = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    return run_training(training_args, data_args, settings)


def _under_launcher() -> bool:
    return any(name in os.environ for name in ("ACCELERATE_LAUNCHED", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"))


def launch_main(argv=None):
    """Console script `stage2-train`: re-executes `accelerate launch training/train.py ARGS`.

    Options before a `--` go to `accelerate launch` (e.g. `--num_processes 2 --multi_gpu`), the rest to training.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if _under_launcher():
        main(argv)
        return
    launcher, training = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(Path(__file__).resolve()),
               *training]
    os.execvpe(sys.executable, command, {**os.environ, "ACCELERATE_LAUNCHED": "1"})


if __name__ == "__main__":
    main()
