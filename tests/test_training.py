"""Stage 2 training system: arguments, Trainer, checkpoints and resume, logs, outputs (tiny configs, CPU)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _training_helpers import (
    assert_same_updates,
    RESUME_SETTINGS,
    TINY_SETTINGS,
    SnapshotTrainable,
    records,
    tensors,
    train_run,
    write_config,
)

from training.args import Stage2TrainingArguments, num_update_steps_per_epoch
from training.train import build_model, load_config_file, load_or_build_dataset, main, parse_args
from training.trainer import (
    CHECKPOINT_COMPLETE_NAME,
    find_latest_checkpoint,
    is_complete_checkpoint,
    optimizer_state_from_safetensors,
    optimizer_state_to_safetensors,
    resolve_resume_checkpoint,
)

COMPONENTS = {
    "spectral_ndvi", "spectral_evi", "spectral_sam", "identity_l1", "identity_edge", "reconstruction_l1",
    "adversarial_generator", "adversarial_discriminator", "adversarial_real_score", "adversarial_fake_score",
}


_train = train_run


# ----------------------------------------------------------------------------------------------- arguments
def test_yaml_config_and_command_line_overrides(tmp_path):
    config = write_config(tmp_path / "c.yaml", learning_rate=5e-4, lora_r=4)
    training_args, data_args, settings = parse_args([
        "--config", str(config), "--data_dir", "D", "--output_dir", str(tmp_path / "o"), "--epochs", "7",
        "--lora_r", "2", "--resume", "latest", "--max_samples", "3", "--weight_decay", "0.01",
    ])
    assert training_args.learning_rate == 5e-4  # from the file
    assert training_args.lora_r == 2  # command line wins over the file
    assert training_args.num_train_epochs == 7  # --epochs alias
    assert training_args.resume_from_checkpoint == "latest"
    assert training_args.weight_decay == 0.01  # any TrainingArguments field
    assert training_args.refiner_config_overrides == TINY_SETTINGS["refiner_config_overrides"]
    assert training_args.remove_unused_columns is False
    assert (data_args.data_dir, data_args.max_samples) == ("D", 3)
    assert settings["lora_r"] == 2 and settings["num_train_epochs"] == 7 and settings["learning_rate"] == 5e-4


def test_config_file_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1e-4\nlearning_rat: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key 'learning_rat'"):
        load_config_file(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list\.yaml: expected a mapping"):
        load_config_file(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_lowvr_config_has_the_design_values(repo_root):
    values = load_config_file(repo_root / "configs" / "hardware.lowvr.yaml")
    expected = {
        "backbone_preset": "prithvi_eo_v2_600m", "quantization": "8bit", "lora_r": 8, "lora_alpha": 16,
        "lora_dropout": 0.1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "fp16": True,
        "learning_rate": 1e-4, "num_train_epochs": 100, "max_grad_norm": 1.0, "save_every_epochs": 10,
        "eval_every_epochs": 5,
    }
    assert {key: values[key] for key in expected} == expected


def test_fp16_on_cpu_trains_in_fp32_and_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        args = Stage2TrainingArguments(output_dir=str(tmp_path), fp16=True, report_to="none")
    assert not torch.cuda.is_available()
    assert args.fp16 is False and args.bf16 is False and args.mixed_precision == "no"
    assert "fp32" in args.precision_note and "fp16 was requested" in caplog.text


def test_epoch_intervals_become_steps(tmp_path):
    args = Stage2TrainingArguments(output_dir=str(tmp_path), report_to="none", eval_every_epochs=5,
                                   save_every_epochs=10, per_device_train_batch_size=1, gradient_accumulation_steps=8)
    steps = num_update_steps_per_epoch(18, 1, 1, 8)  # 18 batches -> 3 optimizer steps (the last one partial)
    assert steps == 3
    args.resolve_epoch_intervals(steps)
    assert (args.eval_steps, args.save_steps) == (15, 30)
    assert args.metric_for_best_model == "eval_refined_ndvi_rmse" and args.greater_is_better is False


def test_best_model_direction_follows_the_metrics_rule(tmp_path):
    from training.args import greater_is_better
    from training.metrics import HIGHER_IS_BETTER, METRIC_NAMES

    for name in METRIC_NAMES:
        assert greater_is_better(f"eval_refined_{name}") is HIGHER_IS_BETTER[name] is greater_is_better(name)
    assert greater_is_better("eval_refined_psnr") and greater_is_better("eval_ssim")
    assert not greater_is_better("eval_loss") and not greater_is_better("eval_refined_sam")
    args = Stage2TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                   metric_for_best_model="eval_refined_psnr")
    assert args.greater_is_better is True


def test_gradient_checkpointing_is_non_reentrant(tmp_path):
    args = Stage2TrainingArguments(output_dir=str(tmp_path), report_to="none", activation_checkpointing=True)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}


# ----------------------------------------------------------------------------------------------- checkpoints
def _fake_checkpoint(folder: Path, complete: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 10)
    if complete:
        marker = {"global_step": int(folder.name.split("-")[1]), "files": {"adapter_model.safetensors": 10}}
        (folder / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps(marker))
    return folder


def test_latest_checkpoint_ignores_torn_ones(tmp_path):
    good = _fake_checkpoint(tmp_path / "checkpoint-4", complete=True)
    _fake_checkpoint(tmp_path / "checkpoint-6", complete=False)
    _fake_checkpoint(tmp_path / "checkpoint-10", complete=True)
    (tmp_path / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"x" * 3)  # truncated after marking
    assert not is_complete_checkpoint(tmp_path / "checkpoint-10")
    assert find_latest_checkpoint(tmp_path) == str(good)
    assert resolve_resume_checkpoint("latest", tmp_path) == str(good)
    assert resolve_resume_checkpoint(None, tmp_path) is None
    with pytest.raises(ValueError, match="checkpoint-6: the checkpoint is incomplete"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-6"), tmp_path)
    assert resolve_resume_checkpoint("latest", tmp_path / "empty") is None


def _overwrite_in_place(path: Path, offset: int, length: int = 4096) -> None:
    """Invert `length` bytes of `path` from `offset`, keeping its size: damage that a size check cannot see."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        original = handle.read(length)
        handle.seek(offset)
        handle.write(bytes(255 - byte for byte in original))


def test_checkpoint_corrupted_in_place_is_reported_by_file_name(tmp_path, caplog):
    from training.trainer import checkpoint_marker

    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(np.random.default_rng(step).bytes(3 * 4096))
        (folder / "trainer_state.json").write_text("{}")
        (folder / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps(checkpoint_marker(folder, step)))
    latest, previous = tmp_path / "checkpoint-4", tmp_path / "checkpoint-2"
    _overwrite_in_place(latest / "adapter_model.safetensors", 4096)
    assert (latest / "adapter_model.safetensors").stat().st_size == 3 * 4096  # the sizes still match

    with caplog.at_level("WARNING", logger="training.trainer"):
        assert resolve_resume_checkpoint("latest", tmp_path) == str(previous)
    assert (f"skipping {latest}: the checkpoint is corrupt: adapter_model.safetensors does not match its sha256 in "
            f"{CHECKPOINT_COMPLETE_NAME}") in caplog.text
    assert f"falling back to {previous}, the newest checkpoint that verifies" in caplog.text
    assert find_latest_checkpoint(tmp_path) == str(previous) and not is_complete_checkpoint(latest)
    with pytest.raises(ValueError, match=r"checkpoint-4: the checkpoint is corrupt: adapter_model\.safetensors does "
                                         r"not match its sha256") as error:
        resolve_resume_checkpoint(str(latest), tmp_path)
    assert "\n" not in str(error.value)  # one line
    assert (latest / "adapter_model.safetensors").is_file()  # reported, never deleted

    (previous / "trainer_state.json").write_text("[]")  # same size too: only the hash sees it
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.trainer"):
        assert resolve_resume_checkpoint("latest", tmp_path) is None
    assert "trainer_state.json does not match" in caplog.text and "starting from scratch" in caplog.text


def test_older_checkpoints_go_only_once_the_new_one_is_complete(sample_dataset_dir, tmp_path, monkeypatch):
    """`save_total_limit: 1`: when the new checkpoint's marker is written, the previous complete checkpoint is still
    there, so a kill in that moment leaves one to resume from; afterwards the limit holds."""
    import training.trainer as trainer_module

    seen = []
    marker = trainer_module.checkpoint_marker

    def recording_marker(folder, step):
        seen.append((folder.name, sorted(p.name for p in folder.parent.glob("checkpoint-*")),
                     [p.name for p in folder.parent.glob("checkpoint-*") if is_complete_checkpoint(p)]))
        return marker(folder, step)

    monkeypatch.setattr(trainer_module, "checkpoint_marker", recording_marker)
    train_run(tmp_path, sample_dataset_dir, "run", save_total_limit=1, max_samples=2, max_eval_samples=1,
              per_device_train_batch_size=1, num_train_epochs=1, save_every_epochs=0.5, eval_every_epochs=1,
              eval_on_start=False, load_best_model_at_end=False)
    assert [name for name, _, _ in seen] == ["checkpoint-1", "checkpoint-2"]
    assert seen[1][1] == ["checkpoint-1", "checkpoint-2"] and seen[1][2] == ["checkpoint-1"]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    assert is_complete_checkpoint(tmp_path / "run" / "checkpoint-2")


def test_checkpoint_markers_without_hashes_are_checked_by_size(tmp_path):
    """Markers written before hashes were recorded (sizes only) still resume: old runs are not stranded."""
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(bytes(8192))
    (folder / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps({"global_step": 3,
                                                               "files": {"adapter_model.safetensors": 8192}}))
    _overwrite_in_place(folder / "adapter_model.safetensors", 0)  # invisible without a recorded hash
    assert resolve_resume_checkpoint(str(folder), tmp_path) == str(folder)
    assert resolve_resume_checkpoint("latest", tmp_path) == str(folder)
    (folder / "adapter_model.safetensors").write_bytes(bytes(100))
    with pytest.raises(ValueError, match=r"corrupt: adapter_model\.safetensors has 100 bytes, "
                                         rf"{CHECKPOINT_COMPLETE_NAME} records 8192"):
        resolve_resume_checkpoint(str(folder), tmp_path)


def test_checkpoint_file_hash_is_streamed_in_chunks(tmp_path):
    import hashlib

    from training.trainer import HASH_CHUNK_BYTES, file_sha256

    data = np.random.default_rng(0).bytes(2 * HASH_CHUNK_BYTES + 123)
    (tmp_path / "big.bin").write_bytes(data)
    assert file_sha256(tmp_path / "big.bin") == hashlib.sha256(data).hexdigest()


def test_optimizer_state_round_trips_through_safetensors():
    parameters = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(parameters, lr=0.01, betas=(0.5, 0.999))
    for _ in range(2):
        sum((p**2).sum() for p in parameters).backward()
        optimizer.step()
    tensors_, meta = optimizer_state_to_safetensors(optimizer.state_dict())
    meta = json.loads(json.dumps(meta))  # through JSON, as written
    restored = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in parameters], lr=0.5)
    restored.load_state_dict(optimizer_state_from_safetensors(tensors_, meta))
    original = optimizer.state_dict()
    again = restored.state_dict()
    assert again["param_groups"][0]["betas"] == (0.5, 0.999) and again["param_groups"][0]["lr"] == 0.01
    for index in original["state"]:
        for key, value in original["state"][index].items():
            assert torch.equal(value, again["state"][index][key])


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def e2e(tmp_path_factory, sample_tiles_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    config = write_config(tmp / "tiny.yaml", report_to="tensorboard")
    trainer = main(["--config", str(config), "--data_dir", str(sample_tiles_dir), "--output_dir", str(tmp / "out")])
    return trainer, tmp / "out", config


def test_end_to_end_writes_every_output(e2e):
    trainer, out, _ = e2e
    best = out / "best"
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.json", "README.md", "preview.png",
                 "metrics.json", "training_config.json"):
        assert (best / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all(is_complete_checkpoint(p) for p in out.glob("checkpoint-*"))
    assert find_latest_checkpoint(out) == str(out / "checkpoint-4")
    for name in ("discriminator.safetensors", "discriminator_optimizer.safetensors", "optimizer.pt"):
        assert (out / "checkpoint-4" / name).is_file(), name

    from PIL import Image

    from training.callbacks import COLOUR_BAR_HEIGHT, LABEL_HEIGHT

    with Image.open(best / "preview.png") as png:
        assert png.format == "PNG" and png.mode == "RGB"
        width, height = png.size
    # 2 tiles x (opt_v1 | refined | target) under a header, the RGB grid and the NDVI grid (with its colour bar)
    assert height == LABEL_HEIGHT + 2 * 120 + 4 + 2 + COLOUR_BAR_HEIGHT + LABEL_HEIGHT
    assert width == 2 * (3 * 120 + 2 * 4) + 12

    card = (best / "README.md").read_text()
    assert "ndvi_rmse" in card.lower() or "NDVI RMSE" in card
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["n_tiles"] == 2 and set(metrics["refined"]) >= {"ndvi_rmse", "evi_rmse", "sam"}
    assert metrics["split"] == "val" and "tiles of the `val` split" in card  # computed on the eval split, named so
    assert trainer.state.best_metric == pytest.approx(metrics["refined"]["ndvi_rmse"])

    settings = yaml.safe_load((out / "config.yaml").read_text())
    assert settings["backbone_preset"] == "prithvi_eo_v2_tiny" and settings["max_samples"] == 4
    assert load_config_file(out / "config.yaml")["lora_dropout"] == 0.0  # usable as --config


def test_saved_best_model_loads_and_refines(e2e):
    from modeling_stage2 import load_trained_model

    _, out, _ = e2e
    model = load_trained_model(out / "best")
    opt_v1 = torch.rand(1, 4, 120, 120) * 0.3
    refined = model(opt_v1=opt_v1, month=torch.tensor([6]), biome=torch.tensor([4])).refined
    assert refined.shape == (1, 4, 120, 120) and torch.isfinite(refined).all()
    assert not torch.equal(refined, opt_v1)


def test_the_starting_point_is_kept_when_training_only_makes_it_worse(tmp_path, sample_tiles_dir):
    """eval_on_start: the model before the first step (at the spectral fit) is a candidate for best/. A learning
    rate far too high wrecks every later step, so best/ must be the start, and it is the spectral fit (with the
    spectral MLP fitted on it) exactly."""
    from modeling_stage2 import load_trained_model
    from training.linear_fit import fit_spectral_correction, spectral_mlps

    config = write_config(tmp_path / "wild.yaml", learning_rate=5.0, max_grad_norm=0.0, warmup_steps=0,
                          metric_for_best_model="eval_loss")
    trainer = main(["--config", str(config), "--data_dir", str(sample_tiles_dir), "--output_dir", str(tmp_path / "o")])
    evals = records(tmp_path / "o" / "training_log.jsonl", "eval")
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert min(r["val"]["loss"] for r in evals[1:]) > evals[0]["val"]["loss"]  # training made it worse
    best = json.loads((tmp_path / "o" / "best" / "metrics.json").read_text())
    assert best["global_step"] == 0 and trainer.state.best_metric == pytest.approx(evals[0]["val"]["loss"])
    dataset = load_or_build_dataset(_data_args(sample_tiles_dir), tmp_path / "o")
    start = fit_spectral_correction(dataset["train"].select(range(4)), seed=0)
    model = load_trained_model(tmp_path / "o" / "best")
    rows = dataset["val"].with_format("torch")[:2]
    (mlp,) = spectral_mlps(model)  # fitted on top of the affine start (its own test: tests/test_spectral_mlp.py)
    assert float(mlp.output.weight.abs().max()) > 1e-3
    with torch.no_grad():
        refined = model(rows["opt_v1"], rows["month"], rows["biome"]).refined
        expected = mlp(start.apply(rows["opt_v1"]).float()).clamp(min=0)
    torch.testing.assert_close(refined, expected, rtol=0, atol=1e-5)  # the start: no head, no per-tile term


def _data_args(data_dir):
    from training.args import Stage2DataArguments

    return Stage2DataArguments(data_dir=str(data_dir))


def test_training_log_is_jsonl_with_components_and_validation(e2e):
    _, out, _ = e2e
    train = records(out / "training_log.jsonl", "train")
    evals = records(out / "training_log.jsonl", "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for record in train:
        assert COMPONENTS <= set(record), COMPONENTS - set(record)
        assert {"epoch", "lr", "loss", "grad_norm", "cpu_fallback_count", "nonfinite_skipped_steps"} <= set(record)
        assert np.isfinite(record["loss"]) and record["nonfinite_skipped_steps"] == 0
    # eval_on_start: the model as training starts it (at the spectral fit) is validated too, a candidate for best/
    assert [(r["step"], r["epoch"]) for r in evals] == [(0, 0.0), (2, 1.0), (4, 2.0)]
    for record in evals:
        val = record["val"]
        assert {"ndvi_rmse", "evi_rmse", "sam", "identity_l1", "edge_l1", "psnr", "ssim", "loss"} <= set(val)
        assert set(val["opt_v1"]) >= {"ndvi_rmse", "evi_rmse", "sam"} and val["n_tiles"] == 2
        assert val["opt_v1"]["identity_l1"] == 0.0 and val["identity_l1"] > 0


def test_preview_labels_its_columns_and_shows_the_ndvi_scale(tmp_path):
    from PIL import Image

    from training.callbacks import (COLOUR_BAR_HEIGHT, LABEL_HEIGHT, NDVI_PREVIEW_RANGE, ndvi_colour,
                                    render_preview, true_colour, write_png)

    rng = np.random.default_rng(0)
    tiles = [rng.uniform(0.0, 0.4, (2, 4, 32, 32)).astype(np.float32) for _ in range(3)]
    grids = render_preview(*tiles, gap=4)
    rgb, ndvi = grids["rgb"], grids["ndvi"]
    for grid in (rgb, ndvi):  # a label (dark text) above each of the three columns
        header = grid[:LABEL_HEIGHT]
        for column in range(3):
            left = column * (32 + 4)
            assert (header[:, left:left + 32] < 100).any(), column
    # The colour bar spans the NDVI range: its colours are those of ndvi_colour at evenly spaced NDVI values.
    bar_top = LABEL_HEIGHT + 2 * 32 + 4 + 2
    bar = ndvi[bar_top:bar_top + COLOUR_BAR_HEIGHT]
    width = bar.shape[1]
    for position in (0, width // 2, width - 1):
        value = NDVI_PREVIEW_RANGE[0] + (NDVI_PREVIEW_RANGE[1] - NDVI_PREVIEW_RANGE[0]) * position / (width - 1)
        tile = np.zeros((1, 4, 1, 1), dtype=np.float32)
        tile[0, 2], tile[0, 3] = 1 - value, 1 + value  # red, NIR with that NDVI
        np.testing.assert_allclose(bar[:, position].astype(int), ndvi_colour(tile)[0, 0, 0].astype(int)[None].repeat(
            COLOUR_BAR_HEIGHT, 0), atol=1)
    assert (ndvi[bar_top + COLOUR_BAR_HEIGHT:] < 100).any()  # the tick labels
    # The tiles themselves sit under the header, unchanged by it.
    np.testing.assert_array_equal(rgb[LABEL_HEIGHT:LABEL_HEIGHT + 32, :32],
                                  true_colour(tiles[0], reference=tiles[2])[0])
    path = write_png(tmp_path / "preview.png", grids["combined"])
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), grids["combined"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.png"]


def test_tensorboard_has_scalars_and_previews(e2e):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = e2e
    events = EventAccumulator(str(out / "runs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {"train/loss", "train/spectral_ndvi", "eval/refined_ndvi_rmse", "eval/opt_v1_ndvi_rmse"}
    assert scalars <= set(tags["scalars"])
    assert {"preview/rgb", "preview/ndvi"} <= set(tags["images"])
    assert [event.step for event in events.Images("preview/rgb")] == [0, 2, 4]


def test_base_weights_frozen_and_adapter_and_head_trained(e2e):
    from modeling_stage2 import load_trained_model

    trainer, out, _ = e2e
    fresh = dict(build_model(trainer.args, print_summary=False).named_parameters())
    current = dict(trainer.model.named_parameters())
    assert fresh.keys() == current.keys()
    frozen = [name for name, p in current.items() if not p.requires_grad]
    trainable = [name for name, p in current.items() if p.requires_grad]
    assert any(".backbone." in name for name in frozen) and frozen
    for name in frozen:
        assert torch.equal(fresh[name], current[name]), name
    # What training changed: the last checkpoint (best/, now in the trainer's model, may be the starting point,
    # which eval_on_start makes a candidate).
    trained = dict(load_trained_model(out / "checkpoint-4").named_parameters())
    changed = {name for name in trainable if not torch.equal(fresh[name], trained[name])}
    assert any("lora_B" in name for name in changed)
    assert any(".head." in name for name in changed) and any("fusion" in name for name in changed)
    assert len(changed) >= 0.9 * len(trainable)


def test_dataset_conversion_is_cached(e2e, sample_tiles_dir):
    from training.args import Stage2DataArguments

    _, out, _ = e2e
    cached = list((out / "_dataset").iterdir())
    assert len(cached) == 1 and (cached[0] / "dataset_dict.json").is_file()
    stamp = (cached[0] / "dataset_dict.json").stat().st_mtime_ns
    dataset = load_or_build_dataset(Stage2DataArguments(data_dir=str(sample_tiles_dir)), out)
    assert (cached[0] / "dataset_dict.json").stat().st_mtime_ns == stamp
    assert len(list((out / "_dataset").iterdir())) == 1 and len(dataset["train"]) == 18


def test_evaluate_cli_writes_the_documented_json(e2e, tmp_path, capsys):
    from training.args import Stage2DataArguments
    from training.evaluate import main as evaluate_main
    from training.linear_fit import LinearColorFit
    from training.metrics import evaluate_pair

    _, out, _ = e2e
    data = next((out / "_dataset").iterdir())
    code = evaluate_main(["--model", str(out / "best"), "--data", str(data), "--split", "val",
                          "--max_samples", "2", "--json", str(tmp_path / "r.json")])
    assert code == 0
    written = json.loads((tmp_path / "r.json").read_text())
    keys = {"ndvi_rmse", "evi_rmse", "sam", "identity_l1", "edge_l1", "psnr", "ssim"}
    assert set(written) == {"refined", "opt_v1", "linear_fit", "linear_fit_fitted_on", "n_tiles", "split",
                            "bootstrap", "data", "quantization"}
    assert written["n_tiles"] == 2 and written["linear_fit_fitted_on"] == {"split": "train", "tiles": 18}
    assert written["split"] == "val"  # recorded with the metrics, for the model card
    assert written["quantization"] == "none"  # the precision they were measured at, for the model card
    # What the evaluated data's opt_v1 is (its build record), for the model card: here the data the run trained on.
    assert written["data"] == {"input_mode": "synthetic", "degradation": "mild", "dataset_seed": 0}
    trained_on = json.loads((out / "best" / "training_config.json").read_text())
    assert {key: trained_on[key] for key in written["data"]} == written["data"]
    assert set(written["refined"]) == keys and set(written["opt_v1"]) == keys and set(written["linear_fit"]) == keys
    best = json.loads((out / "best" / "metrics.json").read_text())
    for name in keys:  # the same model on the same tiles as the trainer's evaluation of the best step
        assert written["refined"][name] == pytest.approx(best["refined"][name], rel=1e-5, abs=1e-7)
    # The colour-fit block: the least-squares fit of the train split, applied to the two evaluated tiles.
    dataset = load_or_build_dataset(Stage2DataArguments(data_dir=str(data)), out)
    fit = LinearColorFit.from_dataset(dataset["train"])
    rows = dataset["val"].with_format("torch")[:2]
    expected = evaluate_pair(fit.apply(rows["opt_v1"]), rows["target"], rows["opt_v1"], rows["valid_mask"])
    for name in keys:
        assert written["linear_fit"][name] == pytest.approx(expected["refined"][name], rel=1e-6, abs=1e-9)
    assert written["linear_fit"]["identity_l1"] > 0.005  # the fit moves the colours
    # The bootstrap block: refined / each baseline of the blocks above, 1000 resamples of the two tiles by default.
    assert written["bootstrap"]["resamples"] == 1000 and set(written["bootstrap"]) == {
        "resamples", "confidence", "seed", "opt_v1", "linear_fit"}
    for role in ("opt_v1", "linear_fit"):
        for name in ("ndvi_rmse", "evi_rmse", "sam"):
            cell = written["bootstrap"][role][name]
            assert cell["ratio"] == pytest.approx(written["refined"][name] / written[role][name], rel=1e-9)
            assert cell["low"] <= cell["ratio"] <= cell["high"] and 0 <= cell["share_below_1"] <= 1
    printed = capsys.readouterr().out
    assert "| ndvi_rmse |" in printed and "| colour fit (train) |" in printed
    assert "these 2 tiles, with the 90 % interval of a paired tile bootstrap (1000 resamples" in printed
    assert "| metric | / opt_v1 | / colour fit (train) |" in printed

    assert evaluate_main(["--model", str(out / "best"), "--data", str(data), "--split", "val", "--max_samples", "1",
                          "--no-baselines", "--json", str(tmp_path / "plain.json")]) == 0
    assert "linear_fit" not in json.loads((tmp_path / "plain.json").read_text())
    assert "bootstrap" not in json.loads((tmp_path / "plain.json").read_text())  # one tile: nothing to resample
    assert evaluate_main(["--model", str(out / "best"), "--data", str(data), "--split", "val", "--max_samples", "2",
                          "--bootstrap", "0", "--json", str(tmp_path / "off.json")]) == 0
    assert "bootstrap" not in json.loads((tmp_path / "off.json").read_text())
    assert "paired tile bootstrap" not in capsys.readouterr().out


def test_evaluate_names_a_damaged_model_before_converting_the_data(sample_tiles_dir, tmp_path, capsys, monkeypatch):
    import training.evaluate as evaluate_module
    from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel

    folder = tmp_path / "model"
    Stage2RefinerModel(Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", head_width=16,
                                           num_convnext_blocks=1)).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()

    def no_data_work(*args, **kwargs):
        raise AssertionError("the data were converted before the model was checked")

    monkeypatch.setattr(evaluate_module, "load_dataset_dict", no_data_work)
    assert evaluate_module.main(["--model", str(folder), "--data", str(sample_tiles_dir), "--split", "val"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"stage2-evaluate: error: {weights}: not a readable safetensors file (")


def test_evaluate_names_its_own_flag_for_a_folder_without_tiles(tmp_path, capsys):
    from training.evaluate import main as evaluate_main

    (tmp_path / "empty").mkdir()
    assert evaluate_main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "empty")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"stage2-evaluate: error: --data {tmp_path / 'empty'}: no NPZ tiles")


def test_resume_from_an_explicit_corrupt_checkpoint_is_a_usage_error(tmp_path):
    from types import SimpleNamespace

    from training.train import UsageError, _check_resume
    from training.trainer import CHECKPOINT_COMPLETE_NAME, checkpoint_marker

    checkpoint = tmp_path / "out" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (checkpoint / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps(checkpoint_marker(checkpoint, 3)))
    args = SimpleNamespace(resume_from_checkpoint=str(checkpoint), output_dir=str(tmp_path / "out"))
    _check_resume(args, complete=True)  # intact: accepted
    data = bytearray((checkpoint / "adapter_model.safetensors").read_bytes())
    data[4096:4196] = bytes(100)  # same size, other content
    (checkpoint / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UsageError, match="adapter_model.safetensors"):
        _check_resume(args, complete=True)
    assert (checkpoint / "adapter_model.safetensors").is_file()  # reported, never deleted


def test_evaluate_on_npz_tiles_names_the_tiles_it_left_out(e2e, sample_tiles_dir, tmp_path, capsys, monkeypatch):
    from training.evaluate import main as evaluate_main

    _, out, _ = e2e
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    tiles = tmp_path / "tiles"
    for split in ("train", "val"):
        (tiles / split).mkdir(parents=True)
        for path in sorted((sample_tiles_dir / split).glob("*.npz"))[:2]:
            shutil.copy(path, tiles / split / path.name)
    (tiles / "val" / "broken.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert evaluate_main(["--model", str(out / "best"), "--data", str(tiles), "--split", "val", "--degradation",
                          "strong", "--dataset_seed", "3", "--json", str(tmp_path / "r.json")]) == 1  # a partial one
    # NPZ tiles are evaluated with the opt_v1 the flags make, and the JSON says which (for the model card).
    recorded = json.loads((tmp_path / "r.json").read_text())["data"]
    assert recorded == {"input_mode": "synthetic", "degradation": "strong", "dataset_seed": 3}
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("stage2-evaluate: rejected")]
    broken = tiles / "val" / "broken.npz"  # named as the builder names it: no placeholder for the missing key
    assert line.startswith(f"stage2-evaluate: rejected {broken}: corrupt or truncated file, not a readable NPZ (")
    assert line.endswith(") (not evaluated)")
    assert not list((tmp_path / "tmp").iterdir())  # the NPZ conversion left nothing behind


def test_evaluation_reads_numpy_rows_and_collates_them_like_training(e2e):
    from data_builders import make_eval_transform
    from modeling_stage2 import load_trained_model
    from training.evaluate import evaluate_model, load_split

    _, out, _ = e2e
    data = next((out / "_dataset").iterdir())
    dataset = load_split(str(data), "val", max_samples=3)
    assert dataset.format["type"] == "numpy"  # zero-copy Arrow reads, not set_transform's Python lists
    model = load_trained_model(out / "best")
    fast = evaluate_model(model, dataset, batch_size=2, progress=False)
    reference = dataset.with_format(None)  # the former path: set_transform over Python lists
    reference.set_transform(make_eval_transform())
    slow = evaluate_model(model, reference, batch_size=2, progress=False)
    assert fast == slow


def test_evaluate_console_script_exit_status(e2e, tmp_path, repo_root):
    _, out, _ = e2e
    data = next((out / "_dataset").iterdir())
    script = [sys.executable, "-c", "import sys; from training.evaluate import main; sys.exit(main())"]
    ok = subprocess.run([*script, "--model", str(out / "best"), "--data", str(data), "--split", "test",
                         "--max_samples", "1"], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "colour fit (train)" in ok.stdout
    bad_split = subprocess.run([*script, "--model", str(out / "best"), "--data", str(data), "--split", "validation"],
                               cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert bad_split.returncode == 2
    assert bad_split.stderr.strip().splitlines()[-1].startswith("stage2-evaluate: error:")
    assert "'validation'" in bad_split.stderr and "Traceback" not in bad_split.stderr
    missing = subprocess.run([*script, "--model", str(out / "best"), "--data", str(tmp_path / "nowhere")],
                             cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
    negative = subprocess.run([*script, "--model", str(out / "best"), "--data", str(data), "--bootstrap", "-1"],
                              cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert negative.returncode == 2 and "--bootstrap must be >= 0" in negative.stderr.strip().splitlines()[-1]
    usage = subprocess.run([*script, "--help"], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert usage.returncode == 0 and "--baselines" in usage.stdout and "--bootstrap" in usage.stdout


def test_evaluate_refuses_opt_v1_flags_that_an_arrow_dataset_cannot_use(sample_dataset_dir, tmp_path, capsys):
    """A saved Arrow dataset holds its own opt_v1: --stage1_dir, or another --input_mode, would be silently ignored
    (the refiner scored on other inputs than the user asked for), so they are refused, before a model loads."""
    from training.evaluate import load_dataset_dict, main

    with pytest.raises(ValueError) as error:
        load_dataset_dict(str(sample_dataset_dir), stage1_dir=str(tmp_path))
    assert str(error.value) == (
        f"--stage1_dir applies to NPZ tiles; --data {sample_dataset_dir} is an Arrow dataset, which holds its own "
        f"opt_v1 (input_mode 'synthetic'): build one from the Stage 1 outputs with stage2-build-dataset --stage1_dir "
        f"{tmp_path}, or give the NPZ tiles.")
    with pytest.raises(ValueError, match=r"^--input_mode identity: --data .*\(input_mode 'synthetic'\); drop the flag"):
        load_dataset_dict(str(sample_dataset_dir), input_mode="identity")
    assert load_dataset_dict(str(sample_dataset_dir), input_mode="synthetic")["test"].num_rows == 18
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "no_model"), "--data", str(sample_dataset_dir), "--stage1_dir",
                 str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"stage2-evaluate: error: {error.value}"]


# ----------------------------------------------------------------------------------------------- resume
# Every compared run happens in a fresh process with MKL_CBWR=AUTO (set by training/train.py and by the helper
# script): in a process whose MKL already ran without it (other tests), identical runs can differ in the last bits.
@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, sample_dataset_dir, repo_root):
    tmp = tmp_path_factory.mktemp("resume")
    env = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
    result = subprocess.run([sys.executable, str(repo_root / "tests" / "_training_helpers.py"), "resume-scenario",
                             str(sample_dataset_dir), str(tmp)], cwd=repo_root, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp


def _assert_same_training(reference: Path, other: Path, final_step: int = 4):
    for name in ("adapter_model.safetensors", "discriminator.safetensors", "discriminator_optimizer.safetensors"):
        expected = tensors(reference / f"checkpoint-{final_step}" / name)
        actual = tensors(other / f"checkpoint-{final_step}" / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}:{key}"
    strip = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    train_lines = lambda path: [{k: v for k, v in r.items() if k not in strip}
                                for r in records(path / "training_log.jsonl", "train")]
    expected, actual = train_lines(reference), train_lines(other)
    assert [r["step"] for r in actual] == [1, 2, 3, 4]
    assert actual == expected
    val = lambda path: [r["val"] | {"runtime": 0, "samples_per_second": 0, "steps_per_second": 0}
                        for r in records(path / "training_log.jsonl", "eval")]
    assert val(other) == val(reference)


def test_resume_mid_epoch_is_bit_identical(resume_runs):
    # Step 3 is in the middle of epoch 2 (2 optimizer steps per epoch): the hardest case for RNG and data order.
    assert json.loads((resume_runs / "mid_stopped.json").read_text()) == [f"checkpoint-{k}" for k in (1, 2, 3)]
    resumed = json.loads((resume_runs / "mid_resumed.json").read_text())
    fitted = resumed.pop("fitted")
    assert resumed == {"resumed_from": str(resume_runs / "mid" / "checkpoint-3"), "global_step": 4, "disc_steps": 4}
    _assert_same_training(resume_runs / "ref", resume_runs / "mid")
    # the record of what was fitted before the first step comes back with the checkpoint (best/, the card)
    assert fitted["mid"] == fitted["ref"] and fitted["ref"]["spectral_correction_init"].startswith("spectral_fit of")


def test_resume_after_sigkill_ignores_torn_checkpoint(resume_runs, tmp_path, sample_dataset_dir, repo_root):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", **RESUME_SETTINGS)
    command = [sys.executable, "-m", "training.train", "--config", str(config), "--data_dir", str(sample_dataset_dir),
               "--output_dir", str(out)]
    env = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
    process = subprocess.Popen(command, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 300
        while not is_complete_checkpoint(out / "checkpoint-2"):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-2 within 300 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    # A torn checkpoint newer than the last complete one, as a kill in the middle of a save leaves it.
    for later in ("checkpoint-3", "checkpoint-4"):
        shutil.rmtree(out / later, ignore_errors=True)
    torn = out / "checkpoint-3"
    shutil.copytree(out / "checkpoint-2", torn)
    (torn / CHECKPOINT_COMPLETE_NAME).unlink()
    (torn / "adapter_model.safetensors").write_bytes(b"torn")
    assert find_latest_checkpoint(out) == str(out / "checkpoint-2")

    result = subprocess.run([*command, "--resume", "latest"], cwd=repo_root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Removing" in result.stderr and "checkpoint-3" in result.stderr  # the torn one was dropped, not used
    assert f"Resuming from {out / 'checkpoint-2'} (global step 2)." in result.stderr  # says where it resumed
    _assert_same_training(resume_runs / "ref", out)

    # TensorBoard: what the killed run logged after checkpoint-2 is purged, each step appears once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    expected = [(r["step"], r["loss"]) for r in records(resume_runs / "ref" / "training_log.jsonl", "train")]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_resume_latest_falls_back_past_a_checkpoint_corrupted_in_place(resume_runs, tmp_path, sample_dataset_dir,
                                                                      repo_root):
    out = tmp_path / "run"
    shutil.copytree(resume_runs / "ref", out)
    corrupt = out / "checkpoint-4" / "adapter_model.safetensors"
    size = corrupt.stat().st_size
    assert size > 3 * 4096
    _overwrite_in_place(corrupt, size // 2)  # 4 KiB of garbage, same size
    assert corrupt.stat().st_size == size
    # checkpoint-3 with a marker as the previous version wrote it (sizes only): old runs still resume
    marker = json.loads((out / "checkpoint-3" / CHECKPOINT_COMPLETE_NAME).read_text())
    assert set(marker) == {"global_step", "files", "sha256"}
    (out / "checkpoint-3" / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps({"global_step": 3,
                                                                             "files": marker["files"]}))

    config = write_config(tmp_path / "run.yaml", **RESUME_SETTINGS)
    env = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
    result = subprocess.run([sys.executable, "-m", "training.train", "--config", str(config), "--data_dir",
                             str(sample_dataset_dir), "--output_dir", str(out), "--resume", "latest"],
                            cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (f"skipping {out / 'checkpoint-4'}: the checkpoint is corrupt: adapter_model.safetensors does not match its "
            "sha256") in result.stderr
    assert f"falling back to {out / 'checkpoint-3'}, the newest checkpoint that verifies" in result.stderr
    assert f"Resuming from {out / 'checkpoint-3'} (global step 3)." in result.stderr
    assert f"Removing {out / 'checkpoint-4'}" not in result.stderr  # kept at the start ...
    assert f"Replacing {out / 'checkpoint-4'}" in result.stderr  # ... until this run wrote its own step 4
    assert is_complete_checkpoint(out / "checkpoint-4")
    _assert_same_training(resume_runs / "ref", out)  # trained on from the good checkpoint, not from the garbage


# ----------------------------------------------------------------------------------------------- training step
def test_gradient_accumulation_matches_a_larger_batch(tmp_path, sample_dataset_dir):
    # Terms linear in the pixels (the RMSE terms pool over the batch, so they are off here); SGD so that the
    # update is proportional to the gradient.
    # Three steps: the head's zero-initialised output layer, then LoRA B, then LoRA A start to receive gradients.
    common = dict(max_samples=4, num_train_epochs=3, eval_every_epochs=None, save_every_epochs=None,
                  eval_strategy="no", save_strategy="no", optim="sgd", learning_rate=0.05, ndvi_weight=0.0,
                  evi_weight=0.0, disc_learning_rate_ratio=0.1)
    big_snapshots, snapshots = SnapshotTrainable(), SnapshotTrainable()
    big = _train(tmp_path, sample_dataset_dir, "big", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                 callbacks=[big_snapshots], **common)
    small = _train(tmp_path, sample_dataset_dir, "small", per_device_train_batch_size=1, gradient_accumulation_steps=4,
                   callbacks=[snapshots], **common)
    assert big.state.global_step == small.state.global_step == 3
    assert big.disc_steps == small.disc_steps == 3  # the discriminator steps once per accumulated batch
    start = snapshots.before[1]
    assert all(torch.equal(start[name], big_snapshots.before[1][name]) for name in start)  # the same initial weights
    # Every trainable tensor was updated, by the same update as with the larger batch.
    assert_same_updates(snapshots.gradients, big_snapshots.gradients, rtol=1e-3)
    # The discriminator's AdamW divides each gradient by its magnitude: where a gradient is ~0, float noise can flip
    # the sign of that entry's update. So: nearly every entry equal within float noise, and none off by more than
    # the 3 updates of lr 0.005 it made.
    big_disc, small_disc = big.discriminator.state_dict(), small.discriminator.state_dict()
    for name in big_disc:
        difference = (small_disc[name] - big_disc[name]).abs()
        assert difference.max() <= 3 * 0.005 * 1.01, name
        assert (difference <= 1e-5 + 1e-3 * big_disc[name].abs()).float().mean() >= 0.99, name
    for log_big, log_small in zip(records(tmp_path / "big" / "training_log.jsonl", "train"),
                                  records(tmp_path / "small" / "training_log.jsonl", "train"), strict=True):
        for name in ("loss", "spectral_sam", "identity_l1", "reconstruction_l1", "adversarial_generator",
                     "adversarial_discriminator", "adversarial_real_score", "adversarial_fake_score"):
            assert log_small[name] == pytest.approx(log_big[name], rel=1e-4, abs=1e-7), name


def test_nonfinite_loss_never_reaches_the_weights(tmp_path):
    import datasets
    from data_builders import make_eval_transform

    from training.losses import Stage2Loss
    from training.data import TileDataset
    from training.trainer import Stage2Trainer

    class PoisonedLoss(Stage2Loss):
        """NaN for batches holding the marked tile (as an overflow or a corrupt tile would give)."""

        def forward(self, refined, target, opt_v1, valid_mask=None, fake_scores=None):
            total, components = super().forward(refined, target, opt_v1, valid_mask, fake_scores)
            if bool((target[:, 0, 0, 0] == 0.5).any()):
                total = total * float("nan")
            return total, components

    rng = np.random.default_rng(0)
    target = rng.uniform(0.02, 0.4, (4, 4, 120, 120)).astype(np.float32)
    target[2, 0, 0, 0] = 0.5  # tile 2 poisons the second optimizer step (batch 2, in order)
    opt_v1 = (target * 1.05).astype(np.float32)
    table = datasets.Dataset.from_dict({"target": target, "opt_v1": opt_v1, "month": [1, 2, 3, 4],
                                        "biome": [0, 1, 2, 3], "valid_mask": np.ones((4, 120, 120), bool)})
    config = write_config(tmp_path / "c.yaml", eval_every_epochs=None, save_every_epochs=None, eval_strategy="no",
                          save_strategy="no", num_train_epochs=1, spectral_correction_init="identity")
    training_args, _, _ = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    snapshots = SnapshotTrainable()
    model = build_model(training_args, print_summary=False)
    trainer = Stage2Trainer(model=model, args=training_args, train_dataset=TileDataset(table, make_eval_transform()),
                            loss_fn=PoisonedLoss(), callbacks=[snapshots])
    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(range(4))
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.nonfinite_skipped_steps == 1
    unchanged = [step for step in (1, 2) if all(torch.equal(snapshots.before[step][n], snapshots.after[step][n])
                                                for n in snapshots.after[step])]
    assert unchanged == [2]  # step 1 trained, the poisoned step 2 left every weight as it was
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.discriminator.parameters())
    assert trainer.disc_steps == 1 and trainer.disc_skipped_steps == 1
    logged = records(tmp_path / "out" / "training_log.jsonl", "train")
    assert [r["nonfinite_skipped_steps"] for r in logged] == [0, 1]


def _python_trainer(tmp_path: Path, train_dataset, **overrides):
    """A `Stage2Trainer` built in Python, as docs/training.md shows, for one optimizer step."""
    from training.trainer import Stage2Trainer

    config = write_config(tmp_path / "c.yaml", eval_every_epochs=None, save_every_epochs=None, eval_strategy="no",
                          save_strategy="no", max_steps=1, **overrides)
    training_args, _, _ = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    return Stage2Trainer(model=build_model(training_args, print_summary=False), args=training_args,
                         train_dataset=train_dataset)


def test_eval_loss_guards_against_opt_v1_as_documented(tmp_path):
    """`eval_loss` (which picks best/) is the objective with opt_v1 as the identity/edge guard's reference, where
    training uses the colour-corrected opt_v1 (docs/losses_and_metrics.md): it also charges the correction."""
    import datasets
    from data_builders import make_eval_transform
    from training.data import TileDataset
    from training.linear_fit import spectral_corrections

    rng = np.random.default_rng(0)
    target = rng.uniform(0.02, 0.4, (3, 4, 120, 120)).astype(np.float32)
    opt_v1 = (target * 0.75 + 0.01).astype(np.float32)
    tiles = TileDataset(datasets.Dataset.from_dict({"target": target, "opt_v1": opt_v1, "month": [1, 5, 9],
                                                    "biome": [0, 3, 7], "valid_mask": np.ones((3, 120, 120), bool)}),
                        make_eval_transform())
    trainer = _python_trainer(tmp_path, tiles, spectral_correction="shared", spectral_correction_init="identity",
                              per_device_eval_batch_size=2)
    correction, = spectral_corrections(trainer.model)
    with torch.no_grad():
        correction.matrix.copy_(torch.eye(4) / 0.75)  # undoes most of the gain: far from opt_v1, near the target
    model = trainer.model.eval()
    trained, charged = [], []
    for index in range(3):
        inputs = {name: value.unsqueeze(0) for name, value in tiles[index].items()}
        with torch.no_grad():
            trained.append(float(trainer.compute_loss(model, inputs)))
            refined = model(**{name: inputs[name] for name in ("opt_v1", "month", "biome")}).refined
            charged.append(float(trainer.loss_fn(refined, inputs["target"], inputs["opt_v1"],
                                                 valid_mask=inputs["valid_mask"])[0]))
    metrics = trainer.evaluate(tiles)
    assert metrics["eval_loss"] == pytest.approx(np.mean(charged), rel=1e-5)  # per tile, mean over tiles
    assert np.mean(charged) > np.mean(trained) + 0.02  # the correction is charged, as documented

    # A fourth tile without a valid pixel has no loss: it was counted as a loss of 0 (eval_loss 0.75 of the above).
    empty = TileDataset(datasets.Dataset.from_dict({
        "target": np.concatenate([target, target[:1]]), "opt_v1": np.concatenate([opt_v1, opt_v1[:1]]),
        "month": [1, 5, 9, 1], "biome": [0, 3, 7, 0],
        "valid_mask": np.concatenate([np.ones((3, 120, 120), bool), np.zeros((1, 120, 120), bool)])}),
        make_eval_transform())
    with_empty = trainer.evaluate(empty)
    assert with_empty["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    assert with_empty["eval_n_tiles"] == 4


def test_a_trainer_built_in_python_starts_from_the_fits_of_its_training_split(sample_dataset_dir, tmp_path):
    """`train()` fits the spectral correction and the range of the training spectra on the training split before
    the first step, as `stage2-train` does (a trainer built in Python used to start at the identity, unfitted)."""
    import datasets

    from data_builders import make_eval_transform
    from training.data import TileDataset
    from training.linear_fit import LinearColorFit, spectral_corrections
    from training.spectral_range import fit_spectral_range_of_dataset, spectral_ranges

    split = datasets.load_from_disk(str(sample_dataset_dir))["train"].select(range(4))
    trainer = _python_trainer(tmp_path, TileDataset(split, make_eval_transform()), spectral_correction="shared",
                              spectral_correction_init="linear_fit", out_of_range_fallback=True)
    correction, = spectral_corrections(trainer.model)
    spectral_range, = spectral_ranges(trainer.model)
    assert torch.equal(correction.matrix.detach(), torch.eye(4)) and not spectral_range.is_fitted
    trainer.train()
    expected = LinearColorFit.from_dataset(split)
    assert float((expected.matrix - torch.eye(4, dtype=expected.matrix.dtype)).abs().max()) > 0.05
    # One Adam step at lr 1e-3 moves each entry by about 1e-3: the start was the fit, not the identity.
    torch.testing.assert_close(correction.matrix.detach(), expected.matrix.float(), atol=3e-3, rtol=0)
    expected_range = fit_spectral_range_of_dataset(split, spectral_range.log_offset, quantile=0.99)
    assert float(spectral_range.threshold) == pytest.approx(expected_range.threshold, rel=1e-6)
    records = {"spectral_correction_init": "linear_fit of 4 training tiles",
               "out_of_range_fallback": "99th percentile of 4 training tiles"}
    assert {key: trainer.training_config[key] for key in records} == records
    assert {key: trainer.training_config_record()[key] for key in records} == records  # best/training_config.json
    # Once: a second start (or a second train()) does not fit again over what training reached.
    with torch.no_grad():
        correction.matrix.add_(0.5)
    reached = correction.matrix.detach().clone()
    assert trainer.start_fitted_modules() == records
    assert torch.equal(correction.matrix.detach(), reached)


def test_build_model_gives_the_same_model_for_the_same_seed_however_it_is_called(tmp_path):
    """A random-init backbone and the LoRA weights' start come from the seed, not from the RNG's state: a trainer
    built in Python resumes onto the model it saved, and every process of a run builds the same one."""
    config = write_config(tmp_path / "c.yaml")
    args, _, _ = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    first = dict(build_model(args, print_summary=False).state_dict())
    torch.rand(1000)  # the RNG moves on between two builds
    second = dict(build_model(args, print_summary=False).state_dict())
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    other, _, _ = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--seed", "1"])
    third = dict(build_model(other, print_summary=False).state_dict())
    differ = [name for name in first if not torch.equal(first[name], third[name])]
    assert any(".backbone." in name for name in differ) and any("lora_A" in name for name in differ)


def test_a_trainer_that_cannot_read_its_training_split_says_how_to_fix_it(tmp_path):
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise AssertionError("no row is read before the check")

    trainer = _python_trainer(tmp_path, Rows(), spectral_correction="shared", spectral_correction_init="spectral_fit")
    with pytest.raises(ValueError, match=r"spectral_correction_init='spectral_fit'.*got a Rows\. Pass "
                                         r"train_dataset=training\.data\.TileDataset\(split, transform\)"):
        trainer.train()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("checkpoint-*"))
    # Started at the identity and without the range, nothing is fitted, so any dataset will do.
    assert _python_trainer(tmp_path, Rows(), spectral_correction="shared", spectral_correction_init="identity"
                           ).start_fitted_modules() == {"spectral_correction_init": "identity",
                                                        "out_of_range_fallback": None}


def test_demo_trains_evaluates_and_reports(tmp_path, sample_tiles_dir, capsys, repo_root):
    from training.demo import main as demo_main

    out = tmp_path / "demo"
    code = demo_main(["--output_dir", str(out), "--data_dir", str(sample_tiles_dir), "--num_train_epochs", "1",
                      "--eval_every_epochs", "1", "--max_samples", "4", "--report_to", "none",
                      "--disable_tqdm", "true"])
    results = json.loads((out / "demo_results.json").read_text())
    assert results["val"]["n_tiles"] == 18 and results["test"]["n_tiles"] == 18
    for split in ("val", "test"):
        assert results[split]["linear_fit_fitted_on"] == {"split": "train", "tiles": 18}
        for name, row in results["gains"][split].items():
            assert row["refined"] == results[split]["refined"][name]
            assert row["linear_fit"] == results[split]["linear_fit"][name]
            assert row["reduction"] == pytest.approx((row["opt_v1"] - row["refined"]) / row["opt_v1"])
            assert row["reduction_vs_linear_fit"] == pytest.approx(
                (row["linear_fit"] - row["refined"]) / row["linear_fit"])
    # The colour fit is the least-squares fit of the 18 training tiles (not of the 4 the run trained on).
    assert results["test"]["linear_fit"]["sam"] == pytest.approx(0.0693, abs=5e-4)
    beats = all(row["reduction"] > 0 and row["reduction_vs_linear_fit"] > 0
                for row in results["gains"]["test"].values())
    assert code == (0 if beats else 1)
    for name in ("README.md", "preview.png", "adapter_model.safetensors"):
        assert (out / "best" / name).is_file()
    card = (out / "best" / "README.md").read_text()
    assert "colour fit (fitted on `train`, 18 tiles)" in card
    # The test metrics record their data, the data the run trained on: the card names it once for both.
    assert results["test"]["data"] == {"input_mode": "synthetic", "degradation": "mild", "dataset_seed": 0}
    name = "BigEarthNet v2 Sentinel-2 tiles with synthetic opt_v1 (degradation 'mild', dataset seed 0)"
    assert f"\nData: {name}.\n" in card
    assert f"18 tiles of the `test` split of {name}, measured with the backbone loaded in full precision " in card
    assert "bootstrap" not in card and "share_below_1" not in card  # the card takes the metric blocks only
    captured = capsys.readouterr()
    printed = captured.out
    # Exit 1 says which baseline is not beaten and where the page on what limits it is; exit 0 says nothing of it.
    assert ("docs/quality.md says what limits it" in captured.err) == (code == 1)
    assert (repo_root / "docs" / "quality.md").is_file()
    assert "== val split" in printed and "== test split" in printed
    assert "Refined vs the baselines on the held-out test tiles" in printed and "| colour fit (train) |" in printed
    # How much the verdict hangs on the 18 held-out tiles: the paired tile bootstrap of the test split, printed.
    test_bootstrap = results["test"]["bootstrap"]
    assert test_bootstrap["resamples"] == 1000 and results["val"]["bootstrap"]["resamples"] == 1000
    evi = test_bootstrap["linear_fit"]["evi_rmse"]
    assert evi["ratio"] == pytest.approx(results["gains"]["test"]["evi_rmse"]["refined"]
                                         / results["gains"]["test"]["evi_rmse"]["linear_fit"], rel=1e-9)
    assert f"| evi_rmse | {test_bootstrap['opt_v1']['evi_rmse']['ratio']:.2f} (" in printed
    assert f"| {evi['ratio']:.2f} ({evi['low']:.2f}-{evi['high']:.2f}) |" in printed
