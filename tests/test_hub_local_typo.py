"""A mistyped local model path of two parts (`run1/bestx` for `run1/best`) is also a Hub repo id: its failed download
said only the Hub's reason ('check your internet connection') in stage2-evaluate and stage2-train, not that no local
folder has that name. Every command that resolves a model so (stage2-evaluate, stage2-refine, stage2-export,
stage2-train --model_name_or_path) says it first (`hub.download_failure`), on one line, with the exit status of the
Hub's failure (1 out of reach, 2 no such repo)."""
from __future__ import annotations

import _hub_helpers
import pytest
import test_hub
from _data_helpers import make_tile_dir
from test_hub import _one_error_line
from test_training_hub import _train_argv, _train_once

from modeling_stage2.hub import download_failure

hub_server, dead_hub = _hub_helpers.hub_server, test_hub.dead_hub  # the fixtures (a loopback Hub, a Hub out of reach)

TYPO = "run1/bestx"
SAID = f"{TYPO}: not a local folder (run1/ holds best), and downloading it from the Hub failed ("
"""How the line names the model: no local folder first (and what the local `run1/` holds), then the Hub's reason."""


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from data_builders import build_dataset

    root = tmp_path_factory.mktemp("typo_data")
    build_dataset(make_tile_dir(root / "tiles", per_split=1), root / "ds1")
    return root / "ds1"


@pytest.fixture
def in_a_run_folder(tmp_path, monkeypatch):
    """The working folder holds `run1/best` (a run's folder), so `run1/bestx` is a mistyped local path."""
    (tmp_path / "run1" / "best").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _evaluate(model: str, data) -> int:
    from training.evaluate import main

    return main(["--model", model, "--data", str(data), "--max_samples", "1", "--no-baselines", "--bootstrap", "0",
                 "--device", "cpu"])


def test_evaluate_says_no_local_folder_has_the_name_when_the_hub_is_out_of_reach(dead_hub, in_a_run_folder,
                                                                                 tiny_dataset, capsys):
    assert _evaluate(TYPO, tiny_dataset) == 1  # the Hub out of reach: still the system's failure
    line = _one_error_line(capsys, "stage2-evaluate")
    assert line.startswith(f"stage2-evaluate: error: --model {SAID}") and "ConnectError" in line, line


def test_evaluate_says_it_for_a_repo_that_does_not_exist_too(hub_server, in_a_run_folder, tiny_dataset,
                                                             capsys):
    assert _evaluate(TYPO, tiny_dataset) == 2  # no such repo: the user's
    line = _one_error_line(capsys, "stage2-evaluate")
    assert line.startswith(f"stage2-evaluate: error: --model {SAID}RepositoryNotFoundError"), line


def test_refine_says_no_local_folder_has_the_name(dead_hub, in_a_run_folder, sample_tiles_dir, capsys):
    from inference_stage2.cli import main

    tile = next((sample_tiles_dir / "val").glob("*.npz"))
    assert main(["--model", TYPO, "--input", str(tile), "--output_dir", "out", "--no_progress"]) == 1
    line = _one_error_line(capsys, "stage2-refine")
    assert line.startswith(f"stage2-refine: error: model {SAID}") and "ConnectError" in line, line
    assert not (in_a_run_folder / "out").exists()


def test_train_says_no_local_folder_has_the_name(dead_hub, in_a_run_folder, tiny_dataset, monkeypatch,
                                                 capsys):
    code, reported, line = _train_once(_train_argv(in_a_run_folder, tiny_dataset, TYPO), in_a_run_folder,
                                       monkeypatch, capsys)
    assert (code, reported) == (1, 1)
    assert line.startswith(f"stage2-train: error: --model_name_or_path {SAID}") and "ConnectError" in line, line


def test_a_local_folder_s_failure_is_its_base_s(in_a_run_folder):
    """A local folder whose download failed is an adapter whose base is on the Hub: its line says so, not 'not a
    local folder'."""
    assert download_failure("run1/best") == "downloading its base from the Hub failed"
    assert download_failure(TYPO) == SAID.removeprefix(f"{TYPO}: ").removesuffix(" (")


def test_what_a_local_owner_folder_holds_is_said_and_nothing_where_there_is_none(tmp_path, monkeypatch):
    """`runs/tny` for `runs/tiny`: the folders `runs/` holds (hidden ones left out, five at most) point at the typo;
    a repo id whose owner is no local folder reads as before."""
    monkeypatch.chdir(tmp_path)
    assert download_failure("someone/refiner") == "not a local folder, and downloading it from the Hub failed"
    (tmp_path / "runs").mkdir()
    assert download_failure("runs/tny").startswith("not a local folder (runs/ holds no folder), and downloading")
    for name in ("tiny", ".ipynb_checkpoints", "a", "b", "c", "d", "e"):
        (tmp_path / "runs" / name).mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("x")
    assert download_failure("runs/tny") == ("not a local folder (runs/ holds a, b, c, d, e ...), and downloading it "
                                            "from the Hub failed")


def test_a_bare_name_lists_nothing_and_only_the_owner_s_folders_are_named(tmp_path, monkeypatch):
    """A name with no OWNER (`bestx`) says nothing of the working folder; `runs/` naming its folders leaves its files
    out (a typo is a folder's); the root is `/`, not `//`; an unknown user's home (`~nobody/x`) is no local folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "0_notes.txt").write_text("x")
    assert download_failure("bestx") == "not a local folder, and downloading it from the Hub failed"
    assert download_failure("runs/tny") == ("not a local folder (runs/ holds tiny), and downloading it from the Hub "
                                            "failed")
    assert download_failure("/no-such-model").startswith("not a local folder (/ holds ")
    assert download_failure("~no-such-user-s47/x") == "not a local folder, and downloading it from the Hub failed"
