"""Two CPU processes with DDP (`accelerate launch --multi_gpu --num_processes 2`, gloo) train like one process.

One process with batch 1 x accumulation 2 and two processes with batch 1 each see the same two tiles per optimizer
step (the same per-tile augmentation) and average the same per-tile gradients, so they must agree up to float
summation order. `accelerate launch --cpu --num_processes 2` would silently start a single process: DDP on a CPU
machine is `--multi_gpu` plus the training flag `--use_cpu true`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _training_helpers import SnapshotTrainable, assert_same_weight_updates, records, tensors, write_config

from training.train import parse_args, run_training

SETTINGS = dict(per_device_train_batch_size=1, max_samples=4, max_eval_samples=3, num_train_epochs=1,
                eval_every_epochs=1, save_every_epochs=1, optim="sgd", learning_rate=0.05, lora_dropout=0.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two(repo_root: Path, config: Path, data_dir: Path, output_dir: Path, *flags: str):
    """`train.py` in two CPU processes (DDP over gloo), as `accelerate launch` starts them."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(repo_root / "training" / "train.py"),
        "--config", str(config), "--use_cpu", "true", "--data_dir", str(data_dir), "--output_dir", str(output_dir),
        *flags,
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK"))}
    return subprocess.run(command, cwd=repo_root, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_two_cpu_processes_with_ddp_agree_with_one(tmp_path, sample_dataset_dir, repo_root):
    config = write_config(tmp_path / "ddp.yaml", gradient_accumulation_steps=1, **SETTINGS)
    result = _launch_two(repo_root, config, sample_dataset_dir, tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-4000:]

    single_config = write_config(tmp_path / "single.yaml", gradient_accumulation_steps=2, **SETTINGS)
    training_args, data_args, settings = parse_args(["--config", str(single_config), "--data_dir",
                                                     str(sample_dataset_dir), "--output_dir", str(tmp_path / "one")])
    snapshots = SnapshotTrainable()
    single = run_training(training_args, data_args, settings, callbacks=[snapshots])
    assert single.state.global_step == 2

    ddp_config = json.loads((tmp_path / "ddp" / "best" / "training_config.json").read_text())
    one_config = json.loads((tmp_path / "one" / "best" / "training_config.json").read_text())
    # the same best step (the start included, eval_on_start) chosen by both
    assert ddp_config["world_size"] == 2 and ddp_config["global_step"] == one_config["global_step"]

    ddp_weights = tensors(tmp_path / "ddp" / "checkpoint-2" / "adapter_model.safetensors")
    one_weights = tensors(tmp_path / "one" / "checkpoint-2" / "adapter_model.safetensors")
    # Both start from the same seeded weights: compare the updates (after - start), not the weights, so that a tensor
    # that DDP never updated cannot pass inside a tolerance.
    from peft import get_peft_model_state_dict

    start = get_peft_model_state_dict(single.model, state_dict=snapshots.before[1])
    compared = assert_same_weight_updates(start, ddp_weights, one_weights, rtol=1e-3)
    # In two steps LoRA A (whose gradient is proportional to LoRA B, zero at the start) and the ConvNeXt blocks behind
    # their 1e-6 layer scale move by less than float32 can resolve; every other tensor is compared.
    assert {name for name in start if "lora_B" in name} <= compared
    assert len(compared) >= 0.7 * len(start)
    # The discriminator's gradients are all-reduced by hand (it is not wrapped with the generator).
    ddp_disc = tensors(tmp_path / "ddp" / "checkpoint-2" / "discriminator.safetensors")
    one_disc = tensors(tmp_path / "one" / "checkpoint-2" / "discriminator.safetensors")
    for name in one_disc:
        torch.testing.assert_close(ddp_disc[name], one_disc[name], rtol=1e-3, atol=1e-4)

    for ddp_log, one_log in zip(records(tmp_path / "ddp" / "training_log.jsonl", "train"),
                                records(tmp_path / "one" / "training_log.jsonl", "train"), strict=True):
        assert ddp_log["step"] == one_log["step"]
        for name in ("loss", "spectral_ndvi", "spectral_sam", "identity_l1", "adversarial_generator",
                     "adversarial_discriminator"):
            assert ddp_log[name] == pytest.approx(one_log[name], rel=1e-4, abs=1e-7), name
    ddp_val = records(tmp_path / "ddp" / "training_log.jsonl", "eval")[-1]["val"]
    one_val = records(tmp_path / "one" / "training_log.jsonl", "eval")[-1]["val"]
    assert ddp_val["n_tiles"] == one_val["n_tiles"] == 3  # every tile once, the DDP padding duplicate dropped
    for name in ("ndvi_rmse", "evi_rmse", "sam", "psnr"):
        assert ddp_val[name] == pytest.approx(one_val[name], rel=1e-4), name
        assert ddp_val["opt_v1"][name] == pytest.approx(one_val["opt_v1"][name], rel=1e-9), name
    # The preview shows the split's first tiles from both processes (3 rows), not the main process's own batches
    # (tiles 0 and 1 only, with 2 tiles per process and batch).
    assert _png_size(tmp_path / "ddp" / "best" / "preview.png") == _png_size(tmp_path / "one" / "best" / "preview.png")


def _with_a_nan_target(dataset_dir: Path, out: Path, tile: int = 0) -> Path:
    """A copy of an Arrow dataset whose training tile `tile` has a NaN at a valid target pixel (a corrupt tile)."""
    import datasets
    import numpy as np

    dataset = datasets.load_from_disk(str(dataset_dir))

    def poison(target, index):
        if index != tile:
            return {"target": target}
        target = np.array(target, dtype=np.float32)
        target[:, 60, 60] = np.nan
        return {"target": target.tolist()}

    train = dataset["train"].map(poison, with_indices=True, input_columns=["target"],
                                 features=dataset["train"].features)
    assert dataset["train"][tile]["valid_mask"][60][60]
    datasets.DatasetDict({**dataset, "train": train}).save_to_disk(str(out))
    for path in Path(dataset_dir).iterdir():
        if path.is_file() and not (out / path.name).exists():
            shutil.copyfile(path, out / path.name)  # the build record
    return out


def test_a_nan_tile_and_a_resume_in_two_processes(tmp_path, sample_dataset_dir, repo_root):
    """A step that is non-finite in one process only is skipped by both (the discriminator's gradients and the loss
    components are reduced by every process, with or without values), and a resumed two-process run equals the
    uninterrupted one."""
    data = _with_a_nan_target(sample_dataset_dir, tmp_path / "nan_ds")
    # One tile per process and step: the process holding the NaN tile has no loss component and no discriminator
    # gradient at all in that step.
    config = write_config(tmp_path / "ddp.yaml", per_device_train_batch_size=1, gradient_accumulation_steps=1,
                          max_samples=4, max_eval_samples=2, num_train_epochs=2, save_every_epochs=0.5,
                          save_total_limit=None, optim="sgd", learning_rate=0.05, spectral_correction_init="identity")
    full = _launch_two(repo_root, config, data, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-4000:]
    logged = records(tmp_path / "full" / "training_log.jsonl", "train")
    assert [record["step"] for record in logged] == [1, 2, 3, 4]
    assert logged[-1]["nonfinite_skipped_steps"] == 2  # tile 0, once per epoch
    assert all(math.isfinite(record["loss"]) or record["nonfinite_skipped_steps"] for record in logged)

    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for step in (3, 4):
        shutil.rmtree(tmp_path / "resumed" / f"checkpoint-{step}")
    resumed = _launch_two(repo_root, config, data, tmp_path / "resumed", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stderr.count("Resuming from ") == 1  # once for the run (it was once per process)
    for name in ("adapter_model.safetensors", "discriminator.safetensors"):
        expected, actual = (tensors(tmp_path / run / "checkpoint-4" / name) for run in ("full", "resumed"))
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name


def test_only_the_main_process_converts_and_the_others_stop_where_it_failed(monkeypatch, tmp_path, sample_tiles_dir):
    """The other processes neither convert the tiles again nor read what a failed main process is removing: they
    learn whether it succeeded (one collective, which they wait on) and stop with a UsageError where it did not."""
    from types import SimpleNamespace

    from training import train
    from training.args import Stage2DataArguments
    from training.train import UsageError, _main_process_first, ensure_arrow_dataset

    told = []
    main_failed = {"value": False}
    monkeypatch.setattr(train, "_any_process", lambda flag, args: told.append(flag) or flag or main_failed["value"])
    ran = []

    def work(build):
        ran.append(build)
        return "data"

    def failing(build):
        raise UsageError("--data_dir D: no 'val' split")

    main, other = SimpleNamespace(world_size=2, process_index=0), SimpleNamespace(world_size=2, process_index=1)
    assert _main_process_first(main, work) == "data" and ran == [True] and told == [False]
    with pytest.raises(UsageError, match="no 'val' split"):
        _main_process_first(main, failing)
    assert told == [False, True]  # the others are told, then the error goes on
    assert _main_process_first(other, work) == "data" and ran == [True, False]
    main_failed["value"] = True
    with pytest.raises(UsageError, match="the main process stopped before training"):
        _main_process_first(other, work)
    assert ran == [True, False]  # not run where the main process failed

    data_args = Stage2DataArguments(data_dir=str(sample_tiles_dir))
    with pytest.raises(UsageError, match="the main process did not convert the tiles"):
        ensure_arrow_dataset(data_args, tmp_path / "run", build=False)
    assert not (tmp_path / "run").exists()
