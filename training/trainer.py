"""`Stage2Trainer`: the `transformers.Trainer` of the Stage 2 refiner.

What it adds to the Trainer (which keeps the optimizer, warmup/cosine schedule, gradient clipping, gradient
accumulation, mixed precision, DDP, RNG state and Hub pushes):

- `train` first fits what the refiner starts from on the training split (`start_fitted_modules`,
  `training.warm_start`: the spectral correction and MLP, the range of the training spectra), once, unless it resumes.
- `compute_loss` (transformers' `Trainer.compute_loss` signature) runs the refiner and `training.losses.Stage2Loss`,
  returns the weighted total
  and records every component; the overridden `log()` averages them (over steps and processes) into the logs.
- A PatchGAN discriminator with its own AdamW, trained on detached fakes. Its gradients accumulate like the
  generator's and it steps only on gradient-accumulation boundaries (diffusers#4046), every
  `disc_update_interval` optimizer steps, at `disc_learning_rate_ratio` times the generator's scheduled learning
  rate. Under DDP it is not wrapped with the generator: its gradients are all-reduced (averaged) by hand.
  Its weights (safetensors) and optimizer state (safetensors + JSON) are in every checkpoint and restored on resume.
- A non-finite loss or gradient never reaches the weights: the optimizer step is skipped (grads dropped; with an
  fp16 grad scaler, the scaler skips it), counted (`nonfinite_skipped_steps`) and logged.
- Evaluation computes `training.metrics` for the refined output and for `opt_v1` (the do-nothing baseline):
  `eval_refined_<metric>`, `eval_opt_v1_<metric>`, `eval_n_tiles`, `eval_loss`; when the metric named by
  `metric_for_best_model` improves, the model is written to `OUTPUT_DIR/best` (`save_trained_model`, atomic).
- Checkpoints get a completion marker written last, with the size and sha256 of every file; `find_latest_checkpoint`
  (used by `--resume latest`) only returns checkpoints that verify against it (and record the step of their
  `checkpoint-N` folder), falling back past corrupt ones (named in a warning, never deleted); torn ones (no marker)
  left by a killed process are removed when training starts. An earlier checkpoint of the step being saved is set
  aside until the new marker is written (put back if the save is stopped or killed: `restore_replaced_checkpoints`).
  `save_total_limit` deletes this run's oldest checkpoints only, never the newest or the best one (nor at the end of
  training); a checkpoint whose discriminator does not fit the run is refused before anything is written; and
  `load_best_model_at_end` loads `best/`.
"""
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, default_data_collator
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput

from modeling_stage2._files import fsync_folder, fsync_tree, write_json
from modeling_stage2.adapters import ADAPTER_WEIGHTS_FILE, METRICS_FILE, PREVIEW_FILE, TRAINING_CONFIG_FILE

from data_builders.augment import make_eval_transform, make_train_transform

from .args import EVAL_METRIC_GROUPS, Stage2TrainingArguments, num_update_steps_per_epoch
from .data import as_tile_dataset
from .warm_start import FITTED_MODULE_RECORDS, start_fitted_modules
from .callbacks import EpochLoggingCallback, JsonlLoggerCallback, Stage2TensorBoardCallback, write_png, render_preview

logger = logging.getLogger(__name__)

MODEL_INPUT_COLUMNS = ("opt_v1", "month", "biome")
CHECKPOINT_COMPLETE_NAME = "checkpoint_complete.json"
# An earlier run's complete `checkpoint-N` while this run saves its own step N, until the new one's marker is written
# ("_*": no checkpoint listing takes it, and the Trainer's Hub push, which runs inside the save, leaves it out).
REPLACED_CHECKPOINT_NAME = "_{}.replaced"
DISC_OPTIMIZER_TENSORS = "discriminator_optimizer.safetensors"
DISC_OPTIMIZER_META = "discriminator_optimizer.json"
TRAINER_EXTRA_STATE = "stage2_trainer_state.json"
BEST_DIR_NAME = "best"


# ------------------------------------------------------------------------------------------- checkpoints
HASH_CHUNK_BYTES = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoint files can be larger than memory should hold twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_marker(folder: Path, global_step: int) -> dict:
    """The completion marker's record of `folder`: the size and sha256 of every file in it."""
    files = [item for item in sorted(folder.iterdir()) if item.is_file() and item.name != CHECKPOINT_COMPLETE_NAME]
    return {"global_step": global_step, "files": {item.name: item.stat().st_size for item in files},
            "sha256": {item.name: file_sha256(item) for item in files}}


def _read_marker(folder: Path) -> tuple[dict, dict, object]:
    """(sizes, sha256s, global step) of the marker; sha256s is empty for markers written before hashes were
    recorded."""
    record = json.loads((folder / CHECKPOINT_COMPLETE_NAME).read_text())
    sizes, hashes = record["files"], record.get("sha256", {})
    if not isinstance(sizes, dict) or not isinstance(hashes, dict):
        raise TypeError("'files' and 'sha256' must be mappings")
    return sizes, hashes, record.get("global_step")


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint `path` cannot be resumed from, naming the file; None when every file the marker lists is
    there with its recorded size and sha256 (size only for markers of older versions, which have no hashes), and a
    `checkpoint-N` folder's marker records step N (a checkpoint of another step copied or renamed there does not)."""
    folder = Path(path)
    if not (folder / CHECKPOINT_COMPLETE_NAME).is_file():
        return (f"the checkpoint is incomplete (no valid {CHECKPOINT_COMPLETE_NAME}; it was torn by an interrupted "
                "save)")
    try:
        sizes, hashes, recorded_step = _read_marker(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"the checkpoint is corrupt: {CHECKPOINT_COMPLETE_NAME} is unreadable ({error})"
    step = _checkpoint_step(folder)
    if step is not None and recorded_step != step:
        return (f"the checkpoint is corrupt: {CHECKPOINT_COMPLETE_NAME} records step {recorded_step!r}, not the "
                f"{step} of {folder.name}")
    for name, size in sizes.items():  # sizes first: cheap, and they catch truncation
        if not (folder / name).is_file():
            return f"the checkpoint is corrupt: {name} is missing"
        if (folder / name).stat().st_size != size:
            return (f"the checkpoint is corrupt: {name} has {(folder / name).stat().st_size} bytes, "
                    f"{CHECKPOINT_COMPLETE_NAME} records {size}")
    for name, expected in hashes.items():
        if not (folder / name).is_file():
            return f"the checkpoint is corrupt: {name} is missing"
        if file_sha256(folder / name) != expected:
            return f"the checkpoint is corrupt: {name} does not match its sha256 in {CHECKPOINT_COMPLETE_NAME}"
    return None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` has the completion marker and every file it lists, with the recorded size and sha256."""
    return checkpoint_problem(path) is None


def _checkpoint_step(path: Path) -> int | None:
    return _named_step(path.name) if path.is_dir() else None


def _named_step(name: str) -> int | None:
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    if not name.startswith(prefix) or not name[len(prefix):].isdigit():
        return None
    return int(name[len(prefix):])


def _checkpoint_folders(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(_checkpoint_step(path), path) for path in folder.iterdir()]
    return sorted((step, path) for step, path in found if step is not None)


def remove_checkpoint(folder: str | os.PathLike) -> None:
    """Delete a checkpoint folder, its completion marker first: a deletion cut short by a kill leaves a torn
    checkpoint (removed when training starts), never a marker that lists files which are gone."""
    folder = Path(folder)
    (folder / CHECKPOINT_COMPLETE_NAME).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def _replaced_path(folder: Path) -> Path:
    return folder.with_name(REPLACED_CHECKPOINT_NAME.format(folder.name))


def restore_replaced_checkpoint(folder: str | os.PathLike) -> bool:
    """Settle what a save of `folder` stopped or killed while it replaced an earlier checkpoint left: the earlier one,
    set aside (`REPLACED_CHECKPOINT_NAME`), goes back to `folder` (with a warning; a torn `folder` is removed) unless
    `folder` is complete; it is deleted where `folder` is complete, or where it lost its marker (its deletion, which
    removes the marker first, was cut short). Returns whether it was put back."""
    folder = Path(folder)
    replaced = _replaced_path(folder)
    if not replaced.is_dir():
        return False
    if not (replaced / CHECKPOINT_COMPLETE_NAME).exists() or is_complete_checkpoint(folder):
        remove_checkpoint(replaced)
        return False
    problem = checkpoint_problem(folder) if folder.is_dir() else "it is missing"
    logger.warning(f"Restoring {folder} from {replaced.name}, where it was kept while a save of the same step replaced "
                   f"it: that save was interrupted ({problem}).")
    if folder.is_dir():
        remove_checkpoint(folder)
    os.replace(replaced, folder)
    fsync_folder(folder.parent)
    return True


def restore_replaced_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`restore_replaced_checkpoint` for every checkpoint of `output_dir` that was being replaced; returns those put
    back. Run when training starts, before the checkpoint to resume from is looked for."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    prefix, suffix = REPLACED_CHECKPOINT_NAME.split("{}")
    names = [path.name[len(prefix):len(path.name) - len(suffix)] for path in output_dir.iterdir()
             if path.is_dir() and path.name.startswith(prefix) and path.name.endswith(suffix)]
    folders = sorted(output_dir / name for name in names if _named_step(name) is not None)
    return [folder for folder in folders if restore_replaced_checkpoint(folder)]


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) of every `checkpoint-N` folder of `output_dir`, oldest first (verifies every one)."""
    return [(step, path, is_complete_checkpoint(path)) for step, path in _checkpoint_folders(output_dir)]


def _latest_verified(output_dir) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the (path, problem) of newer ones that have a marker but do not
    (torn ones, without a marker, are skipped without a word: an interrupted save, removed when training starts)."""
    rejected = []
    for _, path in reversed(_checkpoint_folders(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, rejected
        if (path / CHECKPOINT_COMPLETE_NAME).exists():
            rejected.append((path, problem))
    return None, rejected


def find_latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint of `output_dir` that verifies (torn or corrupt ones are never returned)."""
    latest, _ = _latest_verified(output_dir)
    return str(latest) if latest is not None else None


def model_only_checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why a checkpoint saved with `save_only_model` cannot be resumed (None for one that can): it holds no optimizer,
    discriminator or training counters (`TRAINER_EXTRA_STATE` is written beside every optimizer state saved here)."""
    if (Path(folder) / TRAINER_EXTRA_STATE).is_file():
        return None
    return ("it holds the model only (saved with save_only_model): no optimizer, discriminator or training counters "
            "to go on from, so it cannot be resumed; start a new run, or train with save_only_model false to resume "
            "later")


def discriminator_resume_problem(folder: str | os.PathLike, discriminator) -> str | None:
    """Why the checkpoint `folder` cannot be resumed with `discriminator` (the PatchGAN of the run, None when it
    trains none), or None: the checkpoint has none where the run trains one, or one of another size. Checked before
    anything is written; the Trainer would find out only when it loads the checkpoint, with a traceback."""
    from .discriminator import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(folder)
    if discriminator is None or not (folder / TRAINER_EXTRA_STATE).is_file():  # save_only_model: refused elsewhere
        return None
    if not (folder / WEIGHTS_NAME).is_file():
        return ("it has no discriminator, but these settings train one (adversarial_weight > 0); resume with the "
                "settings it was trained with (the run's config.yaml), or start a new run")
    try:
        saved = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as error:
        return f"its {CONFIG_NAME} is unreadable ({error})"
    wanted = discriminator.config.to_dict()
    differ = [key for key in wanted if saved.get(key) != wanted[key]] if isinstance(saved, dict) else list(wanted)
    if not differ:
        return None
    flags = {"base_channels": "disc_base_channels", "num_layers": "disc_num_layers"}
    shown = ", ".join(f"{flags.get(key, key)} {saved.get(key) if isinstance(saved, dict) else None!r} there, "
                      f"{wanted[key]!r} here" for key in differ)
    return (f"its discriminator does not fit the one these settings build ({shown}); resume with the settings it "
            "was trained with (the run's config.yaml), or start a new run")


def resolve_resume_checkpoint(value, output_dir: str | os.PathLike, warn: bool = True) -> str | None:
    """`--resume`: None/False -> None; "latest"/True -> newest checkpoint that verifies (None if there is none; with
    `warn`, a warning names every newer corrupt checkpoint and the file that fails, and says what is used instead);
    a path -> that checkpoint, which must verify (ValueError naming the file otherwise)."""
    if value in (None, False, "", "none", "None"):
        return None
    if value is True or str(value).lower() in ("latest", "last", "true"):
        latest, rejected = _latest_verified(output_dir)
        if warn:
            _warn_skipped(rejected, latest, output_dir)
        return str(latest) if latest is not None else None
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {value}: no such checkpoint folder.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"--resume {value}: {problem}. Resume from an earlier checkpoint or use --resume latest.")
    return str(path)


def _warn_skipped(rejected: list[tuple[Path, str]], latest: Path | None, output_dir) -> None:
    for path, problem in rejected:
        logger.warning(f"--resume latest: skipping {path}: {problem} (the folder is kept, not deleted).")
    if latest is None:
        logger.warning(f"--resume latest: no complete checkpoint in {output_dir} that verifies; starting from scratch.")
    elif rejected:
        logger.warning(f"--resume latest: falling back to {latest}, the newest checkpoint that verifies.")


# ------------------------------------------------------------------------------------------- optimizer state
def optimizer_state_to_safetensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a torch optimizer state dict into tensors (for safetensors) and JSON-able metadata."""
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            name = f"state.{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_state_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = defaultdict(dict)
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        _, index, key = name.split(".", 2)
        state[int(index)][key] = value
    param_groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group
                    for group in meta["param_groups"]]
    return {"state": dict(state), "param_groups": param_groups}


# ------------------------------------------------------------------------------------------- helpers
def _fitted_modules_record(checkpoint: Path) -> dict[str, str | None]:
    """What the run that wrote `checkpoint` fitted before its first step (`FITTED_MODULE_RECORDS`), as its trainer
    state keeps it; empty for a checkpoint written before it was kept."""
    extra = checkpoint / TRAINER_EXTRA_STATE
    record = json.loads(extra.read_text()).get("fitted_modules") if extra.is_file() else None
    return {key: record.get(key) for key in FITTED_MODULE_RECORDS} if isinstance(record, dict) else {}


def build_loss(args: Stage2TrainingArguments):
    from .losses import Stage2Loss

    weights = args.loss_weights()
    return Stage2Loss(**weights)


def build_discriminator(args: Stage2TrainingArguments):
    from .discriminator import PatchDiscriminator

    return PatchDiscriminator(in_channels=4, base_channels=args.disc_base_channels, num_layers=args.disc_num_layers)


@contextmanager
def _frozen(module: torch.nn.Module):
    """Gradients flow through `module` to its input but not into its parameters."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(module.parameters(), flags):
            parameter.requires_grad_(flag)


@contextmanager
def _keep_last_batch(args):
    drop_last, args.dataloader_drop_last = args.dataloader_drop_last, False
    try:
        yield
    finally:
        args.dataloader_drop_last = drop_last


def _masked(image: torch.Tensor, valid_mask: torch.Tensor | None) -> torch.Tensor:
    """Invalid target pixels set to 0 in both real and fake images, so the discriminator cannot use them. The mask is
    (B, H, W) or (B, 1, H, W), as the losses take it."""
    from .losses import check_valid_mask, zero_invalid

    return zero_invalid(image, check_valid_mask(valid_mask, image))


def _metrics_record_a_split(folder: Path) -> bool:
    """Whether `folder`'s metrics.json names the split it was computed on (an unreadable one: the card reports it)."""
    from modeling_stage2.adapters import METRICS_FILE

    try:
        metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and metrics.get("split") is not None


def _component_name(name: str) -> str:
    return name.replace("/", "_")


def _nonfinite(tensors) -> bool:
    """True if any tensor holds inf or NaN (one reduction, one host sync)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return False
    return not bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors)]).sum()))


class _EpochCallback(TrainerCallback):
    """Tells the training dataset which epoch starts (for its per-row augmentation seeds)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-9))


class Stage2Trainer(Trainer):
    """Trainer of the Stage 2 refiner. See the module docstring for what it adds.

    Args:
        model: the `peft.PeftModel` of `modeling_stage2.build_trainable_model` (or any module whose
            `forward(opt_v1, month, biome)` returns an object with `.refined`).
        args (`Stage2TrainingArguments`): training arguments.
        train_dataset, eval_dataset: datasets whose items hold `target`, `opt_v1`, `month`, `biome`, `valid_mask`
            as tensors (e.g. `training.data.TileDataset` of the data builders' Arrow splits with
            `make_train_transform` / `make_eval_transform`); a `datasets.Dataset` split is wrapped so, with
            `make_train_transform()` (seed `args.seed`) for training and `make_eval_transform()` for evaluation.
        loss_fn: the generator objective (default `Stage2Loss` with the weights set in `args`).
        discriminator: the PatchGAN (default: built from `args`; none when the adversarial weight is 0).
        preview_tiles: how many validation tiles the previews show.
        training_config: settings recorded in `best/training_config.json` (and the model card).
        Other keyword arguments go to `transformers.Trainer`.
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args: Stage2TrainingArguments | None = None, train_dataset=None, eval_dataset=None,
                 *, loss_fn=None, discriminator=None, preview_tiles: int = 4, training_config: dict | None = None,
                 data_collator=None, callbacks=None, **kwargs):
        if args is None:
            raise ValueError("Stage2Trainer needs Stage2TrainingArguments (args=...).")
        if getattr(args, "deterministic", False):
            # Before anything runs: some CPU backward kernels (index_put with accumulation) are otherwise
            # thread-order dependent, and resumed runs would not be bit-identical.
            torch.use_deterministic_algorithms(True, warn_only=True)
        if args.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns must be False: `target` and `valid_mask` are not forward arguments of the "
                "refiner and the Trainer would drop them."
            )
        self.loss_fn = loss_fn if loss_fn is not None else build_loss(args)
        adversarial = float(getattr(self.loss_fn, "adversarial_weight", 0.0)) > 0
        if discriminator is None and adversarial:
            discriminator = build_discriminator(args)
        self.discriminator = discriminator if adversarial else None
        self.preview_tiles = preview_tiles
        self.training_config = dict(training_config or {})
        self._fitted_modules_started = False
        # a split as `datasets` gives it: its rows as `stage2-train` reads them (training augmented, by default)
        train_dataset = as_tile_dataset(train_dataset, make_train_transform(), seed=args.seed)
        eval_dataset = as_tile_dataset(eval_dataset, make_eval_transform())
        super().__init__(model=model, args=args, data_collator=data_collator or default_data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=callbacks, **kwargs)

        self._metrics = {"train": defaultdict(list)}
        self._window_components = defaultdict(list)  # the micro-batches' components until the accumulation boundary
        self._step_has_nonfinite = False
        self._pending_disc = None
        self._resume_checkpoint = None
        self._kept_checkpoints: set[Path] = set()  # another run's (or a later, corrupt) checkpoint: never rotated
        self.nonfinite_skipped_steps = 0
        self.disc_skipped_steps = 0
        self.disc_steps = 0
        self.eval_preview = None
        self.last_eval_results = None
        self.disc_optimizer = None
        if self.discriminator is not None:
            self.discriminator.to(self.args.device)
            self.disc_optimizer = torch.optim.AdamW(
                self.discriminator.parameters(), lr=self.args.learning_rate * self.args.disc_learning_rate_ratio,
                betas=(0.5, 0.999), weight_decay=0.0,
            )
        if "tensorboard" in (self.args.report_to or []):
            self.remove_callback(TensorBoardCallback)
            self.add_callback(Stage2TensorBoardCallback(preview_source=lambda: self.eval_preview,
                                                        max_tiles=preview_tiles))
        self.add_callback(JsonlLoggerCallback())
        self.add_callback(EpochLoggingCallback())
        if hasattr(train_dataset, "set_epoch"):
            self.add_callback(_EpochCallback(train_dataset))
        if train_dataset is not None and hasattr(train_dataset, "__len__"):
            self.args.resolve_epoch_intervals(num_update_steps_per_epoch(
                len(train_dataset), self.args.per_device_train_batch_size, self.args.world_size,
                self.args.gradient_accumulation_steps, drop_last=self.args.dataloader_drop_last))
        logger.warning(f"Stage 2 training precision: {getattr(self.args, 'precision_note', 'see TrainingArguments')}")

    # --------------------------------------------------------------------------------------- training
    def start_fitted_modules(self, resume_from_checkpoint=None) -> dict[str, str | None]:
        """Fit what the refiner starts from on the training split (`training.warm_start`: the spectral correction
        as `spectral_correction_init` says, the range of the training spectra with `out_of_range_fallback`), once:
        `train` calls it before the first step, and a later call, or one that resumes a checkpoint (which holds what
        was fitted), fits nothing. Returns what was done, as recorded in `best/training_config.json`."""
        if self._fitted_modules_started:
            return {key: self.training_config.get(key) for key in FITTED_MODULE_RECORDS}
        resume = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir, warn=False)
        self._check_resumable(resume)
        started = start_fitted_modules(self.model, self.train_dataset, self.args, resuming=resume is not None)
        if resume is not None:  # nothing is fitted now: the record of the run that fitted it, kept in its checkpoint
            started = {**started, **_fitted_modules_record(Path(resume))}
        self.training_config.update(started)
        self._fitted_modules_started = True
        return started

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, with `resume_from_checkpoint="latest"`/True meaning the newest *complete* checkpoint, from
        the fitted start of `start_fitted_modules` (as `stage2-train` starts)."""
        # First, before any process looks for the checkpoint to resume from: a checkpoint that a killed save of the
        # same step had set aside goes back (`restore_replaced_checkpoints`; the others wait for the saving process).
        with self.args.main_process_first(local=self.args.save_on_each_node, desc="restoring replaced checkpoints"):
            if self.args.should_save:
                restore_replaced_checkpoints(self.args.output_dir)
        self.start_fitted_modules(resume_from_checkpoint)
        resume = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        self._check_resumable(resume)
        if resume is not None:
            if self.is_world_process_zero():  # once for the run, not once per process
                logger.warning(f"Resuming from {resume} (global step {_checkpoint_step(Path(resume))}).")
            self.args.eval_on_start = False  # the starting point was evaluated by the run that saved the checkpoint
        if self.eval_dataset is None:
            self.args.eval_on_start = False  # nothing to validate the starting point on
        if self.args.should_save:
            self._remove_torn_checkpoints()
            if resume is None:
                self._warn_earlier_checkpoints()
        # The checkpoints save_total_limit may delete are this run's: what a resumed run goes on from and the older
        # ones, and what this call writes. Another run's in the folder, and a resumed run's newer (corrupt) ones, are
        # kept until this run writes its own checkpoint at their step.
        resumed_step = _checkpoint_step(Path(resume)) if resume is not None else -1
        self._kept_checkpoints = {path.resolve() for step, path in _checkpoint_folders(self.args.output_dir)
                                  if step > resumed_step}
        self._resume_checkpoint = resume
        return super().train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                             **kwargs)

    def _check_resumable(self, checkpoint: str | None) -> None:
        """A checkpoint whose discriminator does not fit this trainer's is refused (ValueError naming it) before
        anything is written: `stage2-train` would otherwise rewrite `config.yaml` with settings that cannot go on."""
        problem = None if checkpoint is None else discriminator_resume_problem(checkpoint, self.discriminator)
        if problem is not None:
            raise ValueError(f"{checkpoint}: {problem}.")
        from .discriminator import WEIGHTS_NAME

        if checkpoint is not None and self.discriminator is None and (Path(checkpoint) / WEIGHTS_NAME).is_file():
            # Allowed (a run may drop its adversarial loss for its last epochs), but not without a word.
            logger.warning(f"{checkpoint} holds a discriminator, but these settings train none (adversarial_weight "
                           "0): the run goes on without it and without its adversarial loss.")

    def _warn_earlier_checkpoints(self) -> None:
        """A new run in a folder that holds another run's checkpoints: they are kept (nothing that existed is lost),
        but `--resume latest` after this run is interrupted could take the newest of them and go on with that run."""
        earlier = [path.name for _, path in _checkpoint_folders(self.args.output_dir)]
        if earlier:
            logger.warning(f"{self.args.output_dir} holds checkpoints of an earlier run ({', '.join(earlier)}); this "
                           "run starts anew and replaces those at its own steps only, so --resume latest could go on "
                           "with the earlier run: use a new --output_dir, or delete them.")

    def _remove_torn_checkpoints(self) -> None:
        """Remove checkpoints without a completion marker (written last: the save was interrupted). Ones with a
        marker that fail verification are kept: the problem is reported by `resolve_resume_checkpoint`."""
        for _, path in _checkpoint_folders(self.args.output_dir):
            if not (path / CHECKPOINT_COMPLETE_NAME).exists():
                logger.warning(f"Removing {path}: an incomplete checkpoint left by an interrupted save.")
                shutil.rmtree(path, ignore_errors=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        opt_v1 = inputs["opt_v1"]
        target = inputs["target"]
        valid_mask = inputs.get("valid_mask")
        outputs = model(**{name: inputs[name] for name in MODEL_INPUT_COLUMNS})
        refined = outputs.refined.float()
        fake_scores = None
        if self.discriminator is not None and model.training:
            with _frozen(self.discriminator):
                fake_scores = self.discriminator(_masked(refined, valid_mask))
        # The identity/edge guard keeps the head's local residual faithful to the geometry of its input: the colour-
        # corrected opt_v1 when the refiner has a spectral correction (a colour change is the point, not a drift).
        corrected = getattr(outputs, "corrected", None)
        reference = opt_v1.float() if corrected is None else corrected.detach().float()
        loss, components = self.loss_fn(refined, target.float(), reference, valid_mask=valid_mask,
                                        fake_scores=fake_scores)
        if model.training:
            self._pending_components = components
            if self.discriminator is not None:
                self._pending_disc = (target.float(), refined.detach(), valid_mask)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._pending_components = None
        self._pending_disc = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = bool(torch.isfinite(loss))
        if finite and self._pending_components is not None:
            for name, value in self._pending_components.items():
                self._window_components[_component_name(name)].append(value.detach().float())
        elif not finite:
            self._step_has_nonfinite = True
        if self._pending_disc is not None and self.state.global_step % self.args.disc_update_interval == 0:
            self._discriminator_backward(*self._pending_disc)
        self._pending_disc = None
        if self.accelerator.sync_gradients:
            self._record_window_components()
            self._end_of_accumulation(model)
        return loss

    def _record_window_components(self) -> None:
        """Each component's mean over the accumulation window, recorded once per optimizer step: the Trainer's `loss`
        is a mean over optimizer steps too, so `total` equals it when the last window of an epoch is shorter."""
        for name, values in self._window_components.items():
            self._metrics["train"][name].append(torch.stack(values).mean())
        self._window_components.clear()

    def _discriminator_backward(self, real: torch.Tensor, fake: torch.Tensor, valid_mask) -> None:
        from .losses import _score_weights, _weighted_mean, lsgan_discriminator_loss

        real_scores = self.discriminator(_masked(real, valid_mask))
        fake_scores = self.discriminator(_masked(fake, valid_mask))
        loss, components = lsgan_discriminator_loss(real_scores, fake_scores, valid_mask)
        if not torch.isfinite(loss):
            self._step_has_nonfinite = True
            return
        (loss / self.current_gradient_accumulation_steps).backward()
        # Recorded per accumulation window like the generator's components (a mean over optimizer steps in the logs).
        for name, value in components.items():
            self._window_components[_component_name(name)].append(value.detach().float())
        # Mean scores over the patches the loss counts (weighted by their valid fraction), not over invalid areas.
        weights = _score_weights(valid_mask, real_scores.detach().float())
        self._window_components["adversarial_real_score"].append(_weighted_mean(real_scores.detach().float(), weights))
        self._window_components["adversarial_fake_score"].append(_weighted_mean(fake_scores.detach().float(), weights))

    def _any_process(self, flag: bool) -> bool:
        value = self.accelerator.reduce(torch.tensor([float(flag)], device=self.args.device), reduction="sum")
        return bool(value.item() > 0)

    def _end_of_accumulation(self, model) -> None:
        """On the accumulation boundary, before the Trainer clips and steps: drop a poisoned generator step and
        step the discriminator."""
        parameters = [p for p in model.parameters() if p.requires_grad]
        poisoned = self._any_process(self._step_has_nonfinite or _nonfinite(p.grad for p in parameters))
        self._step_has_nonfinite = False
        if poisoned:
            self.nonfinite_skipped_steps += 1
            logger.warning(
                f"Non-finite loss or gradient at step {self.state.global_step + 1}: the optimizer step is skipped "
                f"({self.nonfinite_skipped_steps} skipped so far)."
            )
            if getattr(self.accelerator, "scaler", None) is not None:
                # The grad scaler skips steps with inf/NaN gradients (and lowers its scale); make sure it sees them.
                for p in parameters:
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
            else:
                for p in parameters:
                    p.grad = None  # AdamW leaves parameters without gradients untouched (no moment or decay update)
        if self.discriminator is not None and self.state.global_step % self.args.disc_update_interval == 0:
            self._discriminator_step(skip=poisoned)

    def _discriminator_step(self, skip: bool) -> None:
        if self.accelerator.num_processes > 1:
            self._average_discriminator_gradients()
        parameters = [p for p in self.discriminator.parameters() if p.grad is not None]
        if skip or not parameters or _nonfinite(p.grad for p in parameters):
            self.disc_skipped_steps += 1
        else:
            lr = self._get_learning_rate() * self.args.disc_learning_rate_ratio
            for group in self.disc_optimizer.param_groups:
                group["lr"] = lr
            if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, self.args.max_grad_norm)
            self.disc_optimizer.step()
            self.disc_steps += 1
        self.disc_optimizer.zero_grad(set_to_none=True)

    def _average_discriminator_gradients(self) -> None:
        """D is not wrapped in DDP: average its gradients over the processes here. Every process joins with every
        parameter (zeros where it has no gradient, as after a non-finite loss) and a count of the processes that had
        some, so the collective always matches; the gradients stay None where no process had any."""
        parameters = list(self.discriminator.parameters())
        had = any(p.grad is not None for p in parameters)
        flat = torch.cat([torch.tensor([float(had)], device=self.args.device),
                          *[(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters]])
        flat = self.accelerator.reduce(flat, reduction="mean")
        if flat[0] == 0:
            return
        offset = 1
        for p in parameters:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    # --------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (every process gets here together)
            logs.update(self._reduced_train_metrics())
            counters = torch.tensor([float(self._cpu_fallback_count())], device=self.args.device)
            logs["cpu_fallback_count"] = int(self.accelerator.reduce(counters, reduction="sum")[0].item())
            logs["nonfinite_skipped_steps"] = self.nonfinite_skipped_steps
            if self.discriminator is not None:
                logs["disc_steps"] = self.disc_steps
        super().log(logs, start_time)

    def _reduced_train_metrics(self) -> dict[str, float]:
        """Each loss component's mean over the processes that recorded it. Every process reduces the same names in
        the same order (the union of theirs: one that skipped a non-finite step may have recorded none)."""
        recorded = self._metrics["train"]
        names = set(recorded)
        if self.accelerator.num_processes > 1:
            everyone = [None] * self.accelerator.num_processes
            torch.distributed.all_gather_object(everyone, sorted(names))
            names = set().union(*everyone)
        names = sorted(names)
        if not names:
            return {}
        rows = [torch.stack([torch.stack(recorded[name]).mean().cpu(), torch.tensor(1.0)]) if recorded.get(name)
                else torch.zeros(2) for name in names]  # (mean, 1) or (0, 0) where this process has none
        totals = self.accelerator.reduce(torch.stack(rows).to(self.args.device), reduction="sum")
        recorded.clear()
        return {name: round(float(total / count), 6) for name, (total, count) in zip(names, totals.tolist()) if count}

    def _cpu_fallback_count(self) -> int:
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return int(getattr(base, "cpu_fallback_count", 0))

    # --------------------------------------------------------------------------------------- evaluation
    def get_eval_dataloader(self, eval_dataset=None):
        """The Trainer's, but never dropping the last incomplete batch: `dataloader_drop_last` is for training, and
        the metrics (and the choice of `best/`) are those of every tile of the split."""
        with _keep_last_batch(self.args):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with _keep_last_batch(self.args):
            return super().get_test_dataloader(test_dataset)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval") -> EvalLoopOutput:
        from .metrics import MetricAccumulator, paired_tile_statistics

        model = self._wrap_model(self.model, training=False)
        if len(self.accelerator._models) == 0 and model is self.model:
            model = self.accelerator.prepare_model(model, evaluation_mode=True)
            if model is not self.model:
                self.model_wrapped = model
        model.eval()
        self.callback_handler.eval_dataloader = dataloader
        accumulator = MetricAccumulator()
        loss_sum, tiles, scored_tiles = 0.0, 0, 0
        preview = {"opt_v1": [], "refined": [], "target": []}
        for inputs in dataloader:
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                refined = model(**{name: inputs[name] for name in MODEL_INPUT_COLUMNS}).refined.float()
            target, opt_v1 = inputs["target"].float(), inputs["opt_v1"].float()
            valid_mask = inputs.get("valid_mask")
            # Per-tile statistics and losses, so that gather_for_metrics drops the padding duplicates of DDP.
            statistics = paired_tile_statistics(refined, target, opt_v1, valid_mask)
            # The guard's reference here is opt_v1, not the corrected image training uses: eval_loss also charges
            # how far the colour correction moved. Every recorded run picked best/ this way (docs/losses_and_metrics.md;
            # the training reference would move one of them).
            losses = torch.stack([
                self.loss_fn(refined[i:i + 1], target[i:i + 1], opt_v1[i:i + 1],
                             valid_mask=None if valid_mask is None else valid_mask[i:i + 1])[0].detach().float()
                for i in range(refined.shape[0])
            ])
            # A tile without a valid pixel has no loss (its components are 0): left out of the mean, not counted as 0.
            scored = (torch.ones(refined.shape[0], dtype=torch.bool, device=refined.device) if valid_mask is None
                      else valid_mask.flatten(1).any(dim=1))
            statistics, losses, scored = self.accelerator.gather_for_metrics((statistics, losses, scored))
            accumulator.add_statistics(statistics)
            loss_sum += float(losses.double()[scored].sum())
            scored_tiles += int(scored.sum())
            tiles += int(losses.numel())
            kept = sum(len(a) for a in preview["target"])  # the same in every process: counted after gathering
            if kept < self.preview_tiles:  # the first tiles of the split, from every process, padding dropped
                shown = self.accelerator.gather_for_metrics((opt_v1, refined, target))
                for name, tensor in zip(("opt_v1", "refined", "target"), shown):
                    preview[name].append(tensor[: self.preview_tiles - kept].cpu().numpy())
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        if tiles == 0:
            raise ValueError("The evaluation dataset is empty: give a non-empty validation split.")
        results = accumulator.compute()
        self.last_eval_results = results
        self.eval_preview = {name: np.concatenate(parts) for name, parts in preview.items()}
        metrics = {f"{metric_key_prefix}_loss": loss_sum / scored_tiles if scored_tiles else float("nan"),
                   f"{metric_key_prefix}_n_tiles": tiles}
        for group in EVAL_METRIC_GROUPS:
            for name, value in results[group].items():
                metrics[f"{metric_key_prefix}_{group}_{name}"] = float(value)
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=tiles)

    # --------------------------------------------------------------------------------------- best model
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`; in training, before the first step (`eval_on_start`), the model as training starts it
        (for instance at the spectral fit) also becomes a candidate for `best/`: training that only makes it worse
        keeps it. Called outside `train()` it only measures."""
        eval_dataset = as_tile_dataset(eval_dataset, make_eval_transform())
        metrics = super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                   metric_key_prefix=metric_key_prefix)
        if self.is_in_train and self.state.global_step == 0 and eval_dataset is None and metric_key_prefix == "eval":
            self._determine_best_metric(metrics, trial=None)  # a plain evaluate() only measures: best/ is training's
        return metrics

    # Private override (transformers 5.24, setup.cfg pins the tested range): the one place that knows "this evaluation
    # is a new best" before the checkpoint of the step is written; a callback would recompute the Trainer's rule.
    def _determine_best_metric(self, metrics, trial) -> bool:
        is_new_best = super()._determine_best_metric(metrics, trial)
        if is_new_best and self.args.should_save:
            self.save_best_model(metrics)
        return is_new_best

    @property
    def best_model_dir(self) -> Path:
        return Path(self.args.output_dir) / BEST_DIR_NAME

    def save_best_model(self, metrics: dict | None = None) -> Path:
        """Write the current model to `OUTPUT_DIR/best` (`save_trained_model`), with `metrics.json` (the
        `stage2-evaluate --json` format), `training_config.json` and `preview.png`. Atomic (`staged_folder`): the
        folder is replaced only once complete, and the next save restores one that a kill left set aside."""
        from modeling_stage2._files import staged_folder
        from modeling_stage2.adapters import save_trained_model

        best = self.best_model_dir
        with staged_folder(best) as staging:  # a save killed half-way leaves the previous best/ for the next one
            save_trained_model(self.accelerator.unwrap_model(self.model), staging)
            if self.last_eval_results is not None:
                results = {"refined": self.last_eval_results["refined"], "opt_v1": self.last_eval_results["opt_v1"],
                           "n_tiles": int(self.last_eval_results["n_tiles"]),
                           "split": self.training_config.get("eval_split", "val"),
                           "global_step": self.state.global_step, "epoch": self.state.epoch,
                           "quantization": self.args.quantization}  # the precision they were measured at
                write_json(staging / METRICS_FILE, results, sort_keys=True)
            write_json(staging / TRAINING_CONFIG_FILE, self.training_config_record(), sort_keys=True)
            if self.eval_preview is not None:
                grids = render_preview(self.eval_preview["opt_v1"], self.eval_preview["refined"],
                                       self.eval_preview["target"], self.preview_tiles)
                write_png(staging / PREVIEW_FILE, grids["combined"])
            self.write_card(staging)  # not peft's placeholder, should the run stop before its end
        logger.info(f"New best model ({self.args.metric_for_best_model}={self.state.best_metric}) saved to {best}.")
        return best

    def write_card(self, folder: str | os.PathLike, repo_id: str | None = None) -> Path:
        """The project's model card (`model_cards.write_model_card`) in a model folder of this run (`repo_id`: the
        repo it names, default `hub_model_id`). The evaluation split labels only metrics that record none: `best/`
        may hold test metrics written after training (the demo does), which a resumed run that found no better model
        keeps, and a card never relabels them."""
        from model_cards.cards import write_model_card

        split = None if _metrics_record_a_split(Path(folder)) else self.training_config.get("eval_split", "val")
        return write_model_card(folder, repo_id=repo_id or self.args.hub_model_id, split=split)

    def training_config_record(self) -> dict:
        args = self.args
        record = {
            "backbone_preset": args.backbone_preset,
            "backbone_weights": args.backbone_weights,
            "quantization": args.quantization,
            "lora_r": args.lora_r,
            "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout,
            "lora_target_modules": list(args.lora_target_modules),
            "unfreeze_last_n_blocks": args.unfreeze_last_n_blocks,
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps,
            "num_train_epochs": args.num_train_epochs,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": args.world_size,
            "max_grad_norm": args.max_grad_norm,
            "precision": args.precision_note,
            "loss_weights": {k: getattr(self.loss_fn, k) for k in ("spectral_weight", "identity_weight",
                             "adversarial_weight", "reconstruction_weight") if hasattr(self.loss_fn, k)},
            "disc_learning_rate_ratio": args.disc_learning_rate_ratio if self.discriminator is not None else None,
            "disc_update_interval": args.disc_update_interval if self.discriminator is not None else None,
            "global_step": self.state.global_step,
            "seed": args.seed,
        }
        record.update(self.training_config)
        return record

    def load_best_model(self) -> bool:
        """Put the weights of `best/` back into the model being trained (like `load_best_model_at_end`); a `best/`
        that a kill left set aside between the renames of its last save is restored first."""
        from modeling_stage2._files import restore_set_aside

        best = self.best_model_dir
        restore_set_aside(best)
        if not (best / ADAPTER_WEIGHTS_FILE).is_file():
            return False
        model = self.accelerator.unwrap_model(self.model)
        model.load_adapter(str(best), adapter_name=model.active_adapter, is_trainable=True)
        return True

    # --------------------------------------------------------------------------------------- saving
    # Private override: `_save` is what both `save_model` and checkpoints call to write the model files.
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Checkpoints and the final model in `save_trained_model`'s layout (adapter + refiner config + base
        source), so any of them loads with `load_trained_model` and resumes with the Trainer's adapter loading."""
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        from peft import PeftModel

        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            return super()._save(str(output_dir), state_dict=state_dict)
        from modeling_stage2.adapters import save_trained_model

        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=output_dir)) / "model"
        try:
            save_trained_model(model, staging)
            for item in staging.iterdir():
                os.replace(item, output_dir / item.name)
        finally:
            shutil.rmtree(staging.parent, ignore_errors=True)
        (output_dir / "training_args.json").write_text(self.args.to_json_string())

    # Private overrides: the discriminator's optimizer state is saved and restored with the Trainer's own, at the same
    # moment and in the same checkpoint, which no public hook offers for a second optimizer.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        folder = Path(output_dir)
        if self.discriminator is not None:
            self.discriminator.save_pretrained(folder)
            tensors, meta = optimizer_state_to_safetensors(self.disc_optimizer.state_dict())
            save_file(tensors, str(folder / DISC_OPTIMIZER_TENSORS), metadata={"format": "pt"})
            write_json(folder / DISC_OPTIMIZER_META, meta, sort_keys=True)
        write_json(folder / TRAINER_EXTRA_STATE, {
            "nonfinite_skipped_steps": self.nonfinite_skipped_steps,
            "disc_skipped_steps": self.disc_skipped_steps,
            "disc_steps": self.disc_steps,
            "fitted_modules": {key: self.training_config.get(key) for key in FITTED_MODULE_RECORDS},
        }, sort_keys=True)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        extra = folder / TRAINER_EXTRA_STATE
        if extra.is_file():
            counters = json.loads(extra.read_text())
            self.nonfinite_skipped_steps = int(counters.get("nonfinite_skipped_steps", 0))
            self.disc_skipped_steps = int(counters.get("disc_skipped_steps", 0))
            self.disc_steps = int(counters.get("disc_steps", 0))
        problem = model_only_checkpoint_problem(folder)
        if problem is not None:
            raise ValueError(f"{folder}: {problem}")
        if self.discriminator is None:
            return
        from .discriminator import WEIGHTS_NAME, PatchDiscriminator

        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{folder / WEIGHTS_NAME} is missing: this checkpoint has no discriminator, but this run trains one "
                "(adversarial_weight > 0). Resume with the settings the checkpoint was made with."
            )
        saved = PatchDiscriminator.from_pretrained(folder)
        self.discriminator.load_state_dict(saved.state_dict())
        meta = json.loads((folder / DISC_OPTIMIZER_META).read_text())
        # On the CPU: under DDP args.device is "cpu:0", which safetensors refuses; load_state_dict moves the state
        # to the parameters' device.
        tensors = load_file(str(folder / DISC_OPTIMIZER_TENSORS))
        self.disc_optimizer.load_state_dict(optimizer_state_from_safetensors(tensors, meta))

    # Private override: the completion marker must be written after every file of the checkpoint (trainer state and
    # RNG states included) on every process, and before older checkpoints are deleted (`save_total_limit`, which the
    # Trainer applies at the end of its save); an older checkpoint of the same step is replaced, not merged into: it
    # is set aside (`REPLACED_CHECKPOINT_NAME`) until the new marker is written, then deleted, and put back by a save
    # that raises (or, after a kill, when training starts: `restore_replaced_checkpoints`).
    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then (after every process wrote its part) the completion marker, then the
        rotation of older checkpoints: a kill at any moment leaves a complete checkpoint to resume from. A save that
        raises before its marker (a second Ctrl-C, SIGTERM or SIGHUP: their handlers raise) removes its folder, and
        puts back the earlier checkpoint of its step that it was replacing."""
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        replaced = _replaced_path(folder)
        if self.args.should_save:
            restore_replaced_checkpoint(folder)  # what a killed save of this step left, if training did not start
            if (folder / CHECKPOINT_COMPLETE_NAME).exists():  # not torn: say that an earlier run's one is replaced
                logger.warning(f"Replacing {folder}, a checkpoint of an earlier run at the same step "
                               f"({checkpoint_problem(folder) or 'it verifies'}). It is kept as {replaced.name} "
                               "until the new one is complete.")
                os.replace(folder, replaced)
                fsync_folder(run_dir)
            elif folder.exists():
                remove_checkpoint(folder)
        self._kept_checkpoints.discard(folder.resolve())  # this run's from now on
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # no rotation before the marker
        try:
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            self.accelerator.wait_for_everyone()
            if self.args.should_save and folder.is_dir():
                fsync_tree(folder)  # on the disk before the marker vouches for it and older checkpoints are deleted
                write_json(folder / CHECKPOINT_COMPLETE_NAME, checkpoint_marker(folder, self.state.global_step),
                           sort_keys=True)
                if replaced.is_dir():  # the new one is complete: the one it replaces goes
                    remove_checkpoint(replaced)
        except BaseException:  # a second Ctrl-C, SIGTERM / SIGHUP (`SystemExit`), a full disk: none of it stays
            if self.args.should_save:
                if folder.is_dir() and not is_complete_checkpoint(folder):
                    logger.warning(f"Removing {folder}: its save was interrupted.")
                    remove_checkpoint(folder)
                restore_replaced_checkpoint(folder)  # the earlier checkpoint it was replacing goes back
            raise
        if self.args.should_save and folder.is_dir():
            self._rotate_checkpoints(run_dir, limit, folder)

    def _rotate_checkpoints(self, run_dir: Path, limit: int | None, newest: Path) -> list[Path]:
        """`save_total_limit` over this run's checkpoints, oldest step first: never `newest` (the one just written),
        the Trainer's best checkpoint, or a kept one (`_kept_checkpoints`). transformers' `rotate_checkpoints` keeps
        the newest by modification time, or by step where those are less than a second apart: another run's
        checkpoint at a later step then outranked the one just written, which was deleted."""
        if not limit or limit <= 0:
            return []
        best = self.state.best_model_checkpoint
        protected = {newest.resolve()} | ({Path(best).resolve()} if best else set())
        own = [(step, path) for step, path in _checkpoint_folders(run_dir)
               if path.resolve() not in self._kept_checkpoints]
        excess, deleted = len(own) - limit, []
        for _, path in own:
            if excess <= 0:
                break
            if path.resolve() not in protected:
                remove_checkpoint(path)
                deleted.append(path)
                excess -= 1
        return deleted

    # Private overrides of the end of training. transformers deletes every checkpoint but the best one when
    # save_total_limit is 1, the newest included: the one a run stopped by Ctrl-C (or StopAtStep) has just written to
    # be resumed from. And `load_best_model_at_end` loads its best checkpoint, which is none (nothing is loaded) when
    # the best is the starting point, and an older one when the best step wrote no checkpoint: `best/` is the best.
    def _finalize_training(self, trial, num_train_samples, start_time):
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is None:
            self._load_best_model()  # the Trainer loads only where it has a best checkpoint
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # the newest stays (`_rotate_checkpoints`)
        try:
            return super()._finalize_training(trial, num_train_samples, start_time)
        finally:
            self.args.save_total_limit = limit

    def _load_best_model(self) -> None:
        self.accelerator.wait_for_everyone()  # best/ is written by the main process
        if not self.load_best_model() and self.state.best_model_checkpoint is not None:
            super()._load_best_model()

    # --------------------------------------------------------------------------------------- Hub
    def create_model_card(self, **kwargs) -> None:
        """The project's model card (`model_cards.write_model_card`) instead of the Trainer's generic one."""
        if not self.is_world_process_zero():
            return
        folder = Path(self.args.output_dir)
        best = self.best_model_dir
        for name in (METRICS_FILE, TRAINING_CONFIG_FILE, PREVIEW_FILE):
            if (best / name).is_file():
                shutil.copyfile(best / name, folder / name)
            else:  # an earlier run's in the same folder: the push would publish it, and the card show it, as this one's
                (folder / name).unlink(missing_ok=True)
        self.write_card(folder, repo_id=getattr(self, "hub_model_id", None))
