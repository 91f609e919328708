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


def _train_once(argv, tmp_path, monkeypatch, capsys) -> tuple[int, str, str]:
    """The trainer process's `cli` in this process: (its exit status, the status `stage2-train` reports from the
    status file the trainer leaves, the one line on stderr)."""
    import training.train as train_module

    status_file = tmp_path / "status"
    status_file.write_text("")
    monkeypatch.setenv(train_module.STATUS_FILE_ENV, str(status_file))
    monkeypatch.delenv(train_module.LAUNCHER_PID_ENV, raising=False)
    code = train_module.cli(argv)
    reported = train_module._exit_status(1, [], status_file)  # accelerate --quiet says 1 for any failure
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stage2-train: ")]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return code, reported, lines[0]


def _train_argv(tmp_path, data, model: str) -> list[str]:
    config = write_config(tmp_path / "c.yaml", num_train_epochs=1)
    return ["--config", str(config), "--data_dir", str(data), "--output_dir", str(tmp_path / "out"),
            "--model_name_or_path", model]


def test_a_hub_base_that_does_not_exist_is_a_user_error(hub_server, tmp_path, sample_dataset_dir,  # noqa: F811
                                                         monkeypatch, capsys):
    repo = f"{hub_server.user}/nothing"
    code, reported, line = _train_once(_train_argv(tmp_path, sample_dataset_dir, repo), tmp_path, monkeypatch, capsys)
    assert (code, reported) == (2, 2)
    assert line.startswith(f"stage2-train: error: --model_name_or_path {repo}: not a local folder, and downloading "
                           "it from the Hub failed (RepositoryNotFoundError"), line
    assert not (tmp_path / "out").exists()  # a run that fails before training leaves nothing


def test_a_hub_out_of_reach_for_the_base_exits_1_in_one_line(tmp_path, sample_dataset_dir, monkeypatch, capsys):
    import socket

    from _hub_helpers import DEFAULT_TOKEN, configure_hub_client

    with socket.socket() as unused:  # a port nobody listens on once it is closed
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"
    configure_hub_client(monkeypatch, endpoint, DEFAULT_TOKEN, tmp_path / "hf_home")
    argv = _train_argv(tmp_path, sample_dataset_dir, "someone/refiner")
    code, reported, line = _train_once(argv, tmp_path, monkeypatch, capsys)
    assert (code, reported) == (1, 1)
    assert line.startswith("stage2-train: error: --model_name_or_path someone/refiner: not a local folder, and "
                           "downloading it from the Hub failed ("), line
    assert "ConnectError" in line and not (tmp_path / "out").exists()
