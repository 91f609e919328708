"""Two CPU processes with DDP (`accelerate launch --multi_gpu --num_processes 2`, gloo) train like one process.

One process with batch 1 x accumulation 2 and two processes with batch 1 each see the same two tiles per optimizer
step (the same per-tile augmentation) and average the same per-tile gradients, so they must agree up to float
summation order. `accelerate launch --cpu --num_processes 2` would silently start a single process: DDP on a CPU
machine is `--multi_gpu` plus the training flag `--use_cpu true`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

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


def test_two_cpu_processes_with_ddp_agree_with_one(tmp_path, sample_dataset_dir, repo_root):
    config = write_config(tmp_path / "ddp.yaml", gradient_accumulation_steps=1, **SETTINGS)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(repo_root / "training" / "train.py"),
        "--config", str(config), "--use_cpu", "true", "--data_dir", str(sample_dataset_dir),
        "--output_dir", str(tmp_path / "ddp"),
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK"))}
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
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
