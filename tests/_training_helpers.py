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

import torch
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


def stage2_train_command() -> list[str]:
    """The `stage2-train` console script, or the same entry point through this Python when it is not installed."""
    script = Path(sys.executable).with_name("stage2-train")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from training.train import launch_main; sys.exit(launch_main())"]


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
    """Copies of the trainable parameters at the start and end of every optimizer step, and of their gradients as the
    optimizer receives them (accumulated, clipped)."""

    def __init__(self):
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}
        self.gradients: dict[int, dict] = {}

    @staticmethod
    def _copy(model):
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before[state.global_step + 1] = self._copy(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients[state.global_step + 1] = {
            name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = self._copy(model)


def assert_same_updates(result: dict, expected: dict, rtol: float = 1e-3) -> None:
    """Two runs made the same SGD updates: `result` and `expected` map step -> {name: gradient the optimizer got}.

    With plain SGD an update is -lr x that gradient; comparing the gradients (not the weights) keeps float32 weight
    rounding out of the comparison: a LoRA A matrix moves by ~1e-8 in a few steps, below what an `atol` on the weights
    can tell from no update at all. Each tensor must have received a non-zero gradient in some step (so it was
    updated), and over all steps its gradients in the two runs agree within `rtol` of their largest entry."""
    import torch

    assert result.keys() == expected.keys()
    steps = sorted(expected)
    for name in expected[steps[0]]:
        want = torch.stack([expected[step][name].double() for step in steps])
        got = torch.stack([result[step][name].double() for step in steps])
        scale = want.abs().max().item()
        assert scale > 0, f"{name}: never received a gradient, so it was never updated"
        error = (got - want).abs().max().item()
        assert error <= rtol * scale, f"{name}: updates differ by {error:.3g} ({error / scale:.2%} of {scale:.3g})"


def assert_same_weight_updates(start: dict, result: dict, expected: dict, rtol: float = 1e-3) -> set:
    """`result` and `expected` (name -> weights) moved from `start` by the same update, where float32 can tell.

    An update (after - start) is measurable when it reaches 8 ulp of the tensor's largest value; for those the two
    updates agree within `rtol` of the expected update plus 2 ulp (an update that did not happen differs by all of it).
    Below that, two runs cannot be told apart from the weights; returns the names that were compared."""
    assert result.keys() == expected.keys() == start.keys()
    compared = set()
    for name, before in start.items():
        update = expected[name].double() - before.double()
        other = result[name].double() - before.double()
        scale = update.abs().max().item()
        ulp = torch.finfo(before.dtype).eps * before.abs().max().item()
        if scale < 8 * ulp:
            continue
        error = (other - update).abs().max().item()
        assert error <= rtol * scale + 2 * ulp, f"{name}: updates differ by {error:.3g} ({error / scale:.2%} of {scale:.3g})"
        compared.add(name)
    return compared


# Dropout, stochastic depth and augmentation on, a checkpoint after every one of the 4 optimizer steps (2 per epoch).
RESUME_SETTINGS = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, max_samples=4,
                       save_every_epochs=0.5, eval_every_epochs=1, lora_dropout=0.1, save_total_limit=None,
                       report_to="tensorboard",
                       refiner_config_overrides={"head_width": 16, "num_convnext_blocks": 2, "drop_path_rate": 0.2})


def fake_demo_runs(monkeypatch, study_module) -> list[list[str]]:
    """Make a study's `subprocess.run` of the demo record its command and leave the `demo_results.json` a finished
    demo writes, instead of training: the list the commands are appended to."""
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        output = Path(command[command.index("--output_dir") + 1])
        output.mkdir(parents=True)
        (output / "demo_results.json").write_text("{}")

    monkeypatch.setattr(study_module.subprocess, "run", fake_run)
    return commands


def tiles_without_validation(folder: Path) -> Path:
    """A tile folder with one training tile and no `val` or `test` split (a run cannot validate)."""
    import shutil

    from _data_helpers import make_tile_dir

    data = make_tile_dir(folder, per_split=1)
    shutil.rmtree(data / "val")
    shutil.rmtree(data / "test")
    return data


def tiles_with_unreadable_validation(folder: Path) -> Path:
    """`tiles_without_validation` plus a `val/` tile that cannot be read: the split is there to the input checks, and
    found empty only by the conversion (a run then fails after it has made its dataset folder)."""
    data = tiles_without_validation(folder)
    (data / "val").mkdir()
    (data / "val" / "broken.npz").write_bytes(b"not an npz archive")
    return data


def refuse_exec(monkeypatch) -> None:
    """Make every `os.exec*` of `training.train` fail: an in-process test must never replace the test process by a
    launcher (the launcher execs itself). Test modules use it as an autouse fixture."""
    import training.train as train_module

    def refuse(*args, **kwargs):
        raise AssertionError(f"the test process would have been replaced by {args[1] if len(args) > 1 else args}")

    for name in ("execv", "execve", "execvp", "execvpe"):
        monkeypatch.setattr(train_module.os, name, refuse)


def train_run(tmp: Path, data_dir: Path, name: str, callbacks=None, extra_argv=(), **overrides):
    from training.train import parse_args, run_training

    config = write_config(tmp / f"{name}.yaml", **overrides)
    argv = ["--config", str(config), "--data_dir", str(data_dir), "--output_dir", str(tmp / name), *extra_argv]
    training_args, data_args, settings = parse_args(argv)
    return run_training(training_args, data_args, settings, callbacks=callbacks)


def resume_scenario(data_dir: Path, tmp: Path) -> None:
    """`ref`: 4 steps uninterrupted; `mid`: stopped after step 3 (mid-epoch), then resumed with --resume latest."""
    from training.warm_start import FITTED_MODULE_RECORDS

    reference = train_run(tmp, data_dir, "ref", **RESUME_SETTINGS)
    train_run(tmp, data_dir, "mid", callbacks=[StopAtStep(3)], **RESUME_SETTINGS)
    (tmp / "mid_stopped.json").write_text(json.dumps(sorted(p.name for p in (tmp / "mid").glob("checkpoint-*"))))
    trainer = train_run(tmp, data_dir, "mid", extra_argv=["--resume", "latest"], **RESUME_SETTINGS)
    fitted = {name: {key: run.training_config.get(key) for key in FITTED_MODULE_RECORDS}
              for name, run in (("ref", reference), ("mid", trainer))}
    (tmp / "mid_resumed.json").write_text(json.dumps({"resumed_from": trainer._resume_checkpoint,
                                                      "global_step": trainer.state.global_step,
                                                      "disc_steps": trainer.disc_steps, "fitted": fitted}))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "resume-scenario":
        raise SystemExit("usage: python tests/_training_helpers.py resume-scenario DATA_DIR OUT_DIR")
    resume_scenario(Path(sys.argv[2]), Path(sys.argv[3]))


def tile_rows(n: int, seed: int, valid: bool = True):
    """`n` random in-memory tiles (a `datasets.Dataset` with the columns of a batch): `opt_v1` a 1.05 gain of the
    target plus noise; `valid`: whether their pixels are valid."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    target = rng.uniform(0.02, 0.4, (n, 4, 120, 120)).astype(np.float32)
    opt_v1 = (target * 1.05 + rng.normal(0, 0.01, target.shape)).astype(np.float32)
    return datasets.Dataset.from_dict({"target": target, "opt_v1": opt_v1, "month": [1 + i % 12 for i in range(n)],
                                       "biome": [i % 5 for i in range(n)],
                                       "valid_mask": np.full((n, 120, 120), valid)})


def tiny_trainer(folder: Path, n_train: int = 4, n_eval: int = 3, eval_valid: bool = True, callbacks=None,
                 **settings):
    """A `Stage2Trainer` of the tiny training settings (`settings` override them) on `tile_rows`, writing into
    `folder/out`."""
    from data_builders import make_eval_transform
    from training.data import TileDataset
    from training.train import build_model, parse_args
    from training.trainer import Stage2Trainer

    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder / "c.yaml", **{"spectral_correction_init": "identity", **settings})
    args = parse_args(["--config", str(config), "--output_dir", str(folder / "out")])[0]
    evaluation = TileDataset(tile_rows(n_eval, 1, eval_valid), make_eval_transform()) if n_eval else None
    return Stage2Trainer(model=build_model(args, print_summary=False), args=args, callbacks=callbacks,
                         train_dataset=TileDataset(tile_rows(n_train, 0), make_eval_transform()),
                         eval_dataset=evaluation)


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found
