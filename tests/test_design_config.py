"""The design's configuration (`configs/hardware.lowvr.yaml`) trained end to end, with the tiny random-init backbone in
place of the 600M download: 8-bit backbone + LoRA, the per-tile correction and the spectral MLP started at their fit,
fp16, batch 1 x accumulation 8, the discriminator. Then the best model is loaded 8-bit and refines a tile.

On the CPU fp16 is ignored (fp32, said in the log); where CUDA is available the same run goes through the GPU, where
a quantized refiner sits from the moment it is built (a path no CPU test reaches).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from _refiner_helpers import single_thread  # noqa: F401  (fixture)

pytestmark = [pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"), pytest.mark.usefixtures("single_thread")]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: the design's 8-bit fp16 run on a GPU"))]

# What the test changes of the design: a backbone it can build offline, a small head, few tiles, no extra logging.
TEST_OVERRIDES = {
    "backbone_preset": "prithvi_eo_v2_tiny",
    "backbone_weights": None,
    "refiner_config_overrides": {"head_width": 16, "num_convnext_blocks": 2},
    "max_samples": 8,  # one optimizer step an epoch: batch 1 x accumulation 8
    "max_eval_samples": 2,
    "num_train_epochs": 2,
    "eval_every_epochs": 1,
    "save_every_epochs": 1,
    "logging_steps": 1,
    "report_to": "none",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}


@pytest.mark.parametrize("device", DEVICES)
def test_the_design_configuration_trains_and_its_model_refines(device, repo_root, sample_tiles_dir, tmp_path):
    from data_builders.tiles import read_tile
    from inference_stage2 import refine_arrays
    from modeling_stage2 import load_trained_model
    from training.train import main

    design = yaml.safe_load((repo_root / "configs" / "hardware.lowvr.yaml").read_text())
    assert design["quantization"] == "8bit" and design["fp16"] and design["spectral_correction_init"] == "spectral_fit"
    config = tmp_path / "design.yaml"
    config.write_text(yaml.safe_dump({**design, **TEST_OVERRIDES, "use_cpu": device == "cpu"}))
    out = tmp_path / "out"
    trainer = main(["--config", str(config), "--data_dir", str(sample_tiles_dir), "--output_dir", str(out)])

    assert trainer.state.global_step == 2 and trainer.nonfinite_skipped_steps == 0
    assert trainer.args.device.type == device
    recorded = json.loads((out / "best" / "training_config.json").read_text())
    assert recorded["spectral_correction_init"] == "spectral_fit of 8 training tiles"
    assert recorded["quantization"] == "8bit"

    model = load_trained_model(out / "best", quantization="8bit", device=device)
    assert {parameter.device.type for parameter in model.parameters()} == {device}
    tile = read_tile(next((sample_tiles_dir / "test").glob("*.npz")))
    refined = refine_arrays(model, tile.target, tile.month, tile.biome, device=device)
    assert refined.shape == tile.target.shape and np.isfinite(refined).all()
    assert refined.min() >= 0  # nonnegative_output
    # The fitted colour parts reached the saved model: its output is not the tile it was given.
    assert float(np.abs(refined - tile.target).mean()) > 1e-3
