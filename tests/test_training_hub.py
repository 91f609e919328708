"""`--push_to_hub --hub_model_id` during training, through the Trainer's own mechanism, against the loopback Hub."""
from __future__ import annotations

import subprocess
import sys

import torch
from _hub_helpers import hub_server  # noqa: F401  (fixture)
from _training_helpers import write_config


def test_push_to_hub_during_training_uploads_a_loadable_model(hub_server, tmp_path, sample_tiles_dir):  # noqa: F811
    from huggingface_hub import HfApi

    from modeling_stage2 import load_trained_model

    repo_id = f"{hub_server.user}/stage2-tiny"
    config = write_config(tmp_path / "c.yaml", num_train_epochs=1, eval_every_epochs=1, save_every_epochs=1)
    out = tmp_path / "out"
    # A fresh process, as `stage2-train` runs: it reads the loopback endpoint from the environment that the
    # fixture set, whatever Hub clients earlier tests left behind in this process.
    subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(config), "--data_dir", str(sample_tiles_dir),
         "--output_dir", str(out), "--push_to_hub", "true", "--hub_model_id", repo_id],
        check=True, timeout=600,
    )

    files = set(HfApi().list_repo_files(repo_id))
    expected = {"adapter_model.safetensors", "adapter_config.json", "config.json", "stage2_base.json", "README.md",
                "preview.png", "metrics.json", "training_log.jsonl", "best/adapter_model.safetensors"}
    assert expected <= files, expected - files
    assert not any(name.startswith(("checkpoint-", "_dataset")) for name in files)  # no checkpoints, no data cache
    card = hub_server.file_bytes(repo_id, "README.md").decode()
    assert "ndvi_rmse" in card and "prithvi" in card.lower() and "preview.png" in card
    commits = hub_server.count("POST", "/commit/")
    assert commits >= 2  # the checkpoint push during training and the final push

    pulled = load_trained_model(repo_id)
    local = load_trained_model(out / "best")
    opt_v1 = torch.rand(2, 4, 120, 120) * 0.3
    month, biome = torch.tensor([1, 12]), torch.tensor([0, 16])
    with torch.no_grad():
        assert torch.equal(pulled(opt_v1=opt_v1, month=month, biome=biome).refined,
                           local(opt_v1=opt_v1, month=month, biome=biome).refined)
