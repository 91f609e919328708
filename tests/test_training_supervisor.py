"""`stage2-train`'s supervisor and the trainer process: a launcher that is PID 1, a Ctrl-C while the run is still
starting, the trainer's own checks, the output folder a failed run leaves, and the demo's user errors."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _data_helpers import make_tile_dir
from _training_helpers import children_of, refuse_exec, tiles_with_unreadable_validation, write_config

import training.train as train_module
from training.train import UsageError, launch_main, main

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process tree from /proc")


@pytest.fixture(autouse=True)
def _never_exec(monkeypatch):
    refuse_exec(monkeypatch)


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    return write_config(tmp_path / "tiny.yaml")


@pytest.fixture(name="tiles_without_validation")
def _tiles_without_validation(tmp_path) -> Path:
    """No readable `val` tile: the run fails once the tiles are converted (its dataset folder made)."""
    return tiles_with_unreadable_validation(tmp_path / "tiles")


def _default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


# ----------------------------------------------------------------------------------------------- a launcher as PID 1
@needs_proc
def test_a_launcher_that_is_pid_1_is_an_ancestor():
    """In a container whose entry point is `stage2-train`, the launcher is PID 1: the trainer took it for gone at once
    and stopped the run with 143 before any step."""
    assert os.getpid() != 1
    assert train_module._has_ancestor(1) and train_module._has_ancestor(os.getppid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not train_module._has_ancestor(child.pid)
    finally:
        child.kill()
        child.wait()


# The trainer of a launcher that is PID 1 of its PID namespace: it must go on (exit 0), not stop its group (143).
_PID_1_LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys
    assert os.getpid() == 1
    trainer = ("import sys, time; from training.train import _stop_with_launcher; _stop_with_launcher(); "
               "time.sleep(1.5); sys.exit(0)")
    env = {**os.environ, "STAGE2_TRAIN_LAUNCHER_PID": "1"}
    child = subprocess.Popen([sys.executable, "-c", trainer], env=env, start_new_session=True)
    sys.exit(child.wait() % 256)
""")


@needs_proc
def test_the_trainer_of_a_launcher_that_is_pid_1_goes_on(repo_root):
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "-r", "-p", "-f", "--mount-proc", "true"], capture_output=True) if unshare \
        else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no unprivileged PID namespaces here (unshare -r -p)")
    done = subprocess.run([unshare, "-r", "-p", "-f", "--mount-proc", sys.executable, "-c", _PID_1_LAUNCHER],
                          cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is gone" not in done.stderr


# ----------------------------------------------------------------------------------------------- an early Ctrl-C
@needs_proc
def test_a_ctrl_c_while_the_run_is_starting_stops_it(tmp_path, repo_root, sample_dataset_dir):
    """The trainer ignores SIGINT until its own handler is in place (accelerate must not die of a Ctrl-C): a Ctrl-C in
    the seconds accelerate and the trainer take to start was lost, and the run trained on for good."""
    config = write_config(tmp_path / "run.yaml", num_train_epochs=1000, eval_every_epochs=None, save_every_epochs=None,
                          eval_strategy="no", save_strategy="no", eval_on_start=False)
    out = tmp_path / "out"
    options = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--quiet"]
    training = ["--config", str(config), "--data_dir", str(sample_dataset_dir), "--output_dir", str(out)]
    code = ("import sys; from training.train import supervise; "
            f"sys.exit(supervise({[*options, '--', *training]!r}))")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("LOCAL_RANK", "ACCELERATE_LAUNCHED")}
    process = subprocess.Popen([sys.executable, "-c", code], cwd=repo_root, env={**env, "TMPDIR": str(scratch)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 180  # bounds a failure only: a loaded 2-core machine starts slowly
        while not children_of(process.pid):  # accelerate has just been started: it takes seconds to import torch
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=300) == 130  # the trainer's imports first, under whatever load CI has
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)  # the supervisor forwards it to the run
            process.wait(timeout=60)
    stderr = process.stderr.read()
    assert "stage2-train: interrupted." in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not out.exists()  # stopped before anything was written
    assert list(scratch.iterdir()) == []  # neither the status file nor the interrupt file is left


# ----------------------------------------------------------------------------------------------- the trainer's checks
def test_the_trainer_process_requires_an_output_dir_too(tmp_path, tiny_config, tiles_without_validation, capsys,
                                                        monkeypatch):
    """`accelerate launch training/train.py` without --output_dir trained into ./trainer_output (only stage2-train
    checked it), though the trainer process repeats the checks."""
    monkeypatch.chdir(tmp_path)
    argv = ["--config", str(tiny_config), "--data_dir", str(tiles_without_validation)]
    with pytest.raises(UsageError, match="^--output_dir is required"):
        main(argv)
    assert train_module.cli(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["stage2-train: error: --output_dir is required (or output_dir in the --config file): the folder "
                     "the run writes its checkpoints, best/ and logs to."]
    assert not (tmp_path / "trainer_output").exists()


@pytest.mark.parametrize("flags, message", [
    (["--logging_steps", "inf"], "--logging_steps: logging_steps must be a finite number > 0"),
    (["--logging_steps", "nan"], "--logging_steps: logging_steps must be a finite number > 0"),
    (["--eval_every_epochs", "0", "--eval_strategy", "steps", "--eval_steps", "inf"],
     "--eval_steps: eval_steps must be a finite number > 0"),
    (["--save_every_epochs", "0", "--save_strategy", "steps", "--save_steps", "inf"],
     "--save_steps: save_steps must be a finite number > 0"),
    (["--dataset_seed", "-1"], "--dataset_seed: dataset_seed must be >= 0, got -1."),
])
def test_intervals_and_the_dataset_seed_out_of_range_are_one_line_before_the_run(flags, message, tmp_path,
                                                                                 tiny_config, capsys):
    """An infinite interval was an OverflowError traceback out of transformers (status 1); a negative dataset seed
    passed every check and failed with a traceback once the trainer converted the tiles."""
    tiles = make_tile_dir(tmp_path / "tiles", per_split=1)
    argv = ["--config", str(tiny_config), "--data_dir", str(tiles), "--output_dir", str(tmp_path / "out"), *flags]
    assert launch_main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"stage2-train: error: {message}"), lines
    assert not (tmp_path / "out").exists()


def test_a_config_file_cannot_name_another_config_file(tmp_path, capsys):
    """A `config:` key was accepted and silently ignored (and copied into the run's config.yaml)."""
    config = tmp_path / "x.yaml"
    config.write_text("config: base.yaml\nlora_r: 4\n")
    tiles = make_tile_dir(tmp_path / "tiles", per_split=1)
    argv = ["--config", str(config), "--data_dir", str(tiles), "--output_dir", str(tmp_path / "out")]
    assert launch_main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"stage2-train: error: {config}: unknown key 'config'."), lines
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- output folder
def test_a_failed_run_removes_the_parent_folders_it_created(tmp_path, tiny_config, tiles_without_validation):
    """A run into new/deeper/out that failed before training removed out/ but left new/deeper/ behind."""
    (tmp_path / "runs" / "other").mkdir(parents=True)
    for out, left in ((tmp_path / "new" / "deeper" / "out", []), (tmp_path / "runs" / "a" / "b", ["other"])):
        with pytest.raises(UsageError, match="no 'val' split"):
            main(["--config", str(tiny_config), "--data_dir", str(tiles_without_validation), "--output_dir",
                  str(out)])
        assert not out.exists()
        assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["other"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs", "tiles", "tiny.yaml"]


# ----------------------------------------------------------------------------------------------- the demo
@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "fast"], "--learning_rate"),
    (["--data_dir", "no/such/tiles"], "--data_dir no/such/tiles not found"),
    (["--lerning_rate", "3"], "unrecognized arguments: --lerning_rate 3 (did you mean --learning_rate?)"),
])
def test_the_demo_says_a_mistake_in_one_line_with_status_2(flags, message, tmp_path, capsys):
    """A bad training flag was a 49-line UsageError traceback and a missing input a bare SystemExit, both status 1,
    the demo's "a baseline was not beaten"."""
    from training.demo import main as demo_main

    out = tmp_path / "demo"
    assert demo_main(["--output_dir", str(out), *flags]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("python -m training.demo: error: ") and message in lines[0], lines
    assert "Traceback" not in captured.err and not out.exists()
