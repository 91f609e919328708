"""Shared test fixtures: paths to the bundled sample and to ../shared, deterministic torch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
SAMPLE_TILES_DIR = REPO_ROOT / "data" / "sample" / "tiles"


@pytest.fixture(autouse=True)
def _seed_everything():
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """For tests of small tensors (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on the shared
    2-core machine intra-op threads only add contention there. Not global: the training tests compare runs in
    subprocesses bit for bit, with torch's default threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def default_dispositions():
    """SIGTERM and SIGHUP at their default and Python's SIGINT handler, as a console script (or the trainer process)
    starts; put back after (after a signal `exit_on_termination` leaves them ignored: the process is on its way
    out)."""
    import signal

    from modeling_stage2 import _signals

    signums = (*_signals.TERMINATING_SIGNALS, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in signums}
    for signum in _signals.TERMINATING_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def bench(repo_root, monkeypatch):
    """Imports a benchmark script as its own run does (`_common` is its neighbour): `bench("bench_export")`."""
    import importlib

    monkeypatch.syspath_prepend(str(repo_root))
    monkeypatch.syspath_prepend(str(repo_root / "bench"))
    return importlib.import_module


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the checkout; tests that need it skip cleanly where it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent")
    return SHARED_DIR


@pytest.fixture(scope="session")
def prithvi_fixtures_dir(shared_dir: Path) -> Path:
    path = shared_dir / "fixtures" / "prithvi_reference"
    if not (path / "tiny_checkpoint.pt").is_file():
        pytest.skip(f"{path} has no Prithvi reference fixtures")
    return path


@pytest.fixture(scope="session")
def sample_tiles_dir() -> Path:
    """The bundled real BigEarthNet sample (data/sample/tiles), shipped in the repo."""
    assert SAMPLE_TILES_DIR.is_dir(), f"bundled sample missing: {SAMPLE_TILES_DIR}"
    return SAMPLE_TILES_DIR


@pytest.fixture(scope="session")
def sample_dataset_dir(sample_tiles_dir: Path, tmp_path_factory) -> Path:
    """The bundled sample built once per session into an Arrow DatasetDict (synthetic opt_v1)."""
    from data_builders import build_dataset

    out = tmp_path_factory.mktemp("sample_dataset") / "ds"
    build_dataset(sample_tiles_dir, out, seed=0)
    return out
