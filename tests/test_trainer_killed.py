"""A trainer process that ends without recording how it stopped (killed by SIGKILL: the out-of-memory killer's way)
made `stage2-train` exit 1 without a word; a bug's traceback now records its status, so no status means killed."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _training_helpers import children_of, stage2_train_command, write_config

import training.train as train_module

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process tree from /proc")
KILLED = "the trainer process ended without saying why: killed (SIGKILL"


def test_a_bug_records_status_1_and_raises(tmp_path, monkeypatch):
    status = tmp_path / "status"
    monkeypatch.setenv(train_module.STATUS_FILE_ENV, str(status))
    monkeypatch.setattr(train_module, "main", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train_module.cli([])
    assert status.read_text() == "1"


@pytest.mark.parametrize("recorded, says", [("1", False), ("", True), ("2", False)])
def test_no_recorded_status_is_named(tmp_path, capsys, recorded, says):
    status = tmp_path / "status"
    status.write_text(recorded)
    assert train_module._exit_status(1, [], status) == int(recorded or 1)
    assert (KILLED in capsys.readouterr().err) is says
    assert train_module._exit_status(0, [], tmp_path / "absent") == 0 and capsys.readouterr().err == ""


def _trainer(pid: int) -> int | None:
    """The descendant of `pid` that runs `python .../training/train.py ...` (accelerate's launcher names the script
    among its own arguments)."""
    for child in children_of(pid):
        with open(f"/proc/{child}/cmdline", "rb") as cmdline:
            argv = cmdline.read().split(b"\0")
        if len(argv) > 1 and argv[1].endswith(b"training/train.py"):
            return child
        deeper = _trainer(child)
        if deeper:
            return deeper
    return None


@needs_proc
@pytest.mark.slow
def test_a_trainer_killed_by_sigkill_is_named(tmp_path, sample_dataset_dir):
    config = write_config(tmp_path / "c.yaml")
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK"))}
    run = subprocess.Popen([*stage2_train_command(), "--config", str(config), "--data_dir", str(sample_dataset_dir),
                            "--output_dir", str(out)], env=env | {"OMP_NUM_THREADS": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        trainer = None
        while trainer is None and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            trainer = _trainer(run.pid)
        assert trainer, "no trainer process started"
        os.kill(trainer, signal.SIGKILL)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(f"stage2-train: {KILLED}"), stderr[-3000:]
