"""Helpers of the training tests: a tiny training configuration and small readers of the outputs."""
from __future__ import annotations

import json
from pathlib import Path

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
