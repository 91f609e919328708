"""The console scripts without a subprocess test of their own elsewhere, run as installed: `--help`, success and a
user error (exit status 2, one line naming the problem, no traceback). `stage2-train`, `-evaluate`, `-refine`,
`-build-dataset` and `-export` are run as subprocesses in their own test files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(script: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`script` as a subprocess, offline (no Hub) unless `env` says otherwise."""
    executable = BIN / script
    if not executable.exists():
        pytest.skip(f"{script} is not installed in {BIN} (pip install -e .)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.mark.parametrize("script", ["stage2-inspect", "stage2-push", "stage2-convert-prithvi",
                                    "stage2-ingest-bigearthnet"])
def test_help_names_the_command(script):
    result = run(script, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {script}")


CONSOLE_SCRIPTS = ["stage2-convert-prithvi", "stage2-ingest-bigearthnet", "stage2-build-dataset", "stage2-inspect",
                   "stage2-train", "stage2-evaluate", "stage2-push", "stage2-refine", "stage2-export"]


def test_every_console_script_is_in_the_list():
    from setuptools.config.setupcfg import read_configuration

    setup_cfg = Path(__file__).resolve().parents[1] / "setup.cfg"
    scripts = read_configuration(setup_cfg)["options"]["entry_points"]["console_scripts"]
    assert sorted(line.split("=")[0].strip() for line in scripts) == sorted(CONSOLE_SCRIPTS)


@pytest.mark.parametrize("script", CONSOLE_SCRIPTS)
def test_an_unknown_flag_is_one_line_without_the_usage_block(script):
    """The user error of argparse itself, as of every check made with `parser.error`: one line, exit 2."""
    result = run(script, "--no_such_flag", "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: ") and "usage:" not in result.stderr, lines


def test_inspect(sample_dataset_dir, tmp_path):
    result = run("stage2-inspect", str(sample_dataset_dir), "--plot", str(tmp_path / "tiles.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train" in result.stdout and (tmp_path / "tiles.png").is_file()
    assert_user_error(run("stage2-inspect", str(tmp_path / "absent")), "absent", "does not exist")


def test_push_of_a_folder_without_a_model_is_a_user_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "training_log.jsonl").write_text("{}\n")
    result = run("stage2-push", str(tmp_path / "run"), "me/nothing", "--endpoint", "http://127.0.0.1:9")
    assert_user_error(result, "no trained model to push")


@pytest.mark.parametrize("flags", [["not a repo id"], ["me/a/b"], ["me/ok", "--dataset_repo_id", "me/x..y"]])
def test_push_to_a_malformed_repo_id_is_a_user_error(tmp_path, flags):
    result = run("stage2-push", str(tmp_path), *flags, "--endpoint", "http://127.0.0.1:9")
    bad = flags[-1]
    assert_user_error(result, f"{bad!r} is not a Hub repo id: use OWNER/NAME or NAME")
    assert len(result.stderr.strip().splitlines()) == 1


def test_convert_prithvi_with_a_missing_checkpoint(tmp_path):
    result = run("stage2-convert-prithvi", str(tmp_path / "missing.pt"), str(tmp_path / "out"))
    assert_user_error(result, "missing.pt")
    assert not (tmp_path / "out").exists()


def test_ingest_bigearthnet_with_missing_metadata(tmp_path):
    result = run("stage2-ingest-bigearthnet", "--lmdb", str(tmp_path), "--metadata", str(tmp_path / "absent.parquet"),
                 "--output_dir", str(tmp_path / "tiles"))
    assert_user_error(result, "absent.parquet does not exist")
    assert not (tmp_path / "tiles").exists()
    result = run("stage2-ingest-bigearthnet", "--lmdb", str(tmp_path), "--metadata", str(tmp_path / "absent.parquet"),
                 "--output_dir", str(tmp_path / "tiles"), "--max_patches", "0")
    assert_user_error(result, "--max_patches must be at least 1, got 0")  # the flag, not the Python argument
    assert not (tmp_path / "tiles").exists()


@pytest.mark.parametrize(("flag", "value", "least"), [
    ("--max_samples", "0", 1), ("--num_proc", "0", 1), ("--dataset_seed", "-1", 0), ("--seed", "-1", 0)])
def test_build_dataset_names_the_flag_of_a_count_below_its_minimum(tmp_path, flag, value, least):
    """The errors named `max_samples`, `num_proc`, `seed` (build_dataset's arguments), not the flags typed."""
    result = run("stage2-build-dataset", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                 flag, value)
    assert_user_error(result, f"{flag} must be at least {least}, got {value}")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


QUIET_SCRIPT = """
import logging, sys
import {module}  # the package's import installs the filter before anything imports bitsandbytes
import bitsandbytes  # on CPUs with AVX512-BF16 this logs the hint itself
logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
               "`pip install kernels` and the kernels >= 0.11.1", ModuleNotFoundError("No module named 'kernels'"))
logger.warning("another bitsandbytes message")
"""


@pytest.mark.parametrize("module", ["modeling_stage2", "training.args", "training.trainer"])
def test_the_bitsandbytes_kernels_hint_is_dropped_and_nothing_else(module):
    """bitsandbytes logs a hint about the optional `kernels` package at import on AVX512-BF16 CPUs; it came before every
    command's one-line error on stderr. The packages drop that message, and only it, before bitsandbytes loads
    (transformers' TrainingArguments and Trainer import it, before training's own modules run)."""
    result = subprocess.run([sys.executable, "-c", QUIET_SCRIPT.format(module=module)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ["another bitsandbytes message"]


def test_refine_with_the_hub_out_of_reach_is_exit_1_in_one_line(sample_tiles_dir, tmp_path):
    """A Hub repo id with the Hub out of reach (a port nobody listens on) exited 2, a user error; it is the system's."""
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"
    tile = next((sample_tiles_dir / "val").glob("*.npz"))
    result = run("stage2-refine", "--model", "someone/demo", "--input", str(tile), "--output_dir", str(tmp_path / "out"),
                 "--no_progress", env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("stage2-refine: error: model someone/demo: not a local folder") and "ConnectError" in line
    assert not (tmp_path / "out").exists()
