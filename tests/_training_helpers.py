"""Helpers of the training tests: a tiny training configuration, small readers of the outputs, and
(`python tests/_training_helpers.py resume-scenario DATA OUT`) the reference / stop / resume runs that the resume
tests compare, in a fresh process whose Intel MKL is reproducible run to run (`MKL_CBWR=AUTO`, which only takes
effect when set before the first MKL call of a process)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("MKL_CBWR", "AUTO")

import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

# Tiny and fast: 0.3M-parameter backbone, a narrow head, an 8-channel 2-layer discriminator, 4 training tiles.
TINY_SETTINGS = {
    "backbone_preset": "prithvi_eo_v2_tiny",
    "quantization": "none",
    "refiner_config_overrides": {"head_width": 16, "num_convnext_blocks": 2, "drop_path_rate": 0.0},
    "lora_dropout": 0.0,
    "disc_base_channels": 8,
    "disc_num_layers": 2,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1.0e-3,
    "warmup_steps": 0,
    "num_train_epochs": 2,
    "eval_every_epochs": 1,
    "save_every_epochs": 1,
    "logging_steps": 1,
    "max_samples": 4,
    "max_eval_samples": 2,
    "report_to": "none",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "seed": 0,
}


def write_config(path: Path, **overrides) -> Path:
    settings = {**TINY_SETTINGS, **overrides}
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def records(log_path: Path, event: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    return [line for line in lines if event is None or line.get("event") == event]


def tensors(path: Path) -> dict:
    return load_file(str(path))


class StopAtStep(TrainerCallback):
    """Stops training after optimizer step `step` (its checkpoint, if any, is written first)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


class SnapshotTrainable(TrainerCallback):
    """Copies of the trainable parameters at the start and end of every optimizer step."""

    def __init__(self):
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    @staticmethod
    def _copy(model):
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before[state.global_step + 1] = self._copy(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = self._copy(model)


# Dropout, stochastic depth and augmentation on, a checkpoint after every one of the 4 optimizer steps (2 per epoch).
RESUME_SETTINGS = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, max_samples=4,
                       save_every_epochs=0.5, eval_every_epochs=1, lora_dropout=0.1, save_total_limit=None,
                       report_to="tensorboard",
                       refiner_config_overrides={"head_width": 16, "num_convnext_blocks": 2, "drop_path_rate": 0.2})


def train_run(tmp: Path, data_dir: Path, name: str, callbacks=None, extra_argv=(), **overrides):
    from training.train import parse_args, run_training

    config = write_config(tmp / f"{name}.yaml", **overrides)
    argv = ["--config", str(config), "--data_dir", str(data_dir), "--output_dir", str(tmp / name), *extra_argv]
    training_args, data_args, settings = parse_args(argv)
    return run_training(training_args, data_args, settings, callbacks=callbacks)


def resume_scenario(data_dir: Path, tmp: Path) -> None:
    """`ref`: 4 steps uninterrupted; `mid`: stopped after step 3 (mid-epoch), then resumed with --resume latest."""
    train_run(tmp, data_dir, "ref", **RESUME_SETTINGS)
    train_run(tmp, data_dir, "mid", callbacks=[StopAtStep(3)], **RESUME_SETTINGS)
    (tmp / "mid_stopped.json").write_text(json.dumps(sorted(p.name for p in (tmp / "mid").glob("checkpoint-*"))))
    trainer = train_run(tmp, data_dir, "mid", extra_argv=["--resume", "latest"], **RESUME_SETTINGS)
    (tmp / "mid_resumed.json").write_text(json.dumps({"resumed_from": trainer._resume_checkpoint,
                                                      "global_step": trainer.state.global_step,
                                                      "disc_steps": trainer.disc_steps}))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "resume-scenario":
        raise SystemExit("usage: python tests/_training_helpers.py resume-scenario DATA_DIR OUT_DIR")
    resume_scenario(Path(sys.argv[2]), Path(sys.argv[3]))
