"""What the tests of the `bench/study_*.py` scripts share: running a study as a subprocess and checking what it wrote."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Demo flags after `--` for a quick run of a study that trains the demo: one epoch, started at the colour fit
QUICK_DEMO_FLAGS = ["--num_train_epochs", "1", "--spectral_correction_init", "linear_fit"]


def run_study(repo_root: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """`bench/<script>` run with `args` as a user runs it (from the repository root)."""
    return subprocess.run([sys.executable, str(repo_root / "bench" / script), *args],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)


def assert_refused_before_any_work(result: subprocess.CompletedProcess, output_dir: Path, message: str) -> None:
    """The study exited 2 with `message` as its last line, built no dataset and wrote nothing in `output_dir`."""
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].endswith(message)
    assert "Building the dataset" not in result.stderr + result.stdout
    assert not list(output_dir.iterdir())


def assert_wrote_its_tables(output: Path, rendered: str) -> None:
    """What the study wrote to `output` is `rendered` (its tables of what it recorded), but for the header line, which
    holds the time and the load."""
    written, expected = output.read_text().splitlines(), rendered.splitlines()
    assert len(written) == len(expected) and written[2].startswith("Script:")
    assert written[:2] + written[3:] == expected[:2] + expected[3:]
