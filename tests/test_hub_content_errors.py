"""A Hub model whose files are broken (truncated weights, another model's config) was named in stage2-refine,
stage2-evaluate and stage2-export by its Hub cache snapshot (`.../hub/models--OWNER--NAME/snapshots/COMMIT/FILE`), a
path the user never typed. The line names the repo id (at the revision asked) and the file in the repo
(`OWNER/NAME[@REVISION]/FILE`, `hub.hub_snapshot_paths_named`), with exit status 2 as before."""
from __future__ import annotations

import shutil

import _hub_helpers
import pytest
import test_hub_local_typo
import test_push_refuses_broken_folders
from test_hub import _one_error_line
from test_hub_local_typo import _evaluate
from test_push_refuses_broken_folders import BROKEN

hub_server, good = _hub_helpers.hub_server, test_push_refuses_broken_folders.good  # the fixtures
tiny_dataset = test_hub_local_typo.tiny_dataset  # (a loopback Hub, good model folders, a tiny dataset)

CASES = ("truncated adapter weights", "a Prithvi backbone, not a refiner")
"""Of the folders the loaders refuse: broken weights, and another model's config."""


@pytest.fixture(autouse=True)
def no_hub_progress_bars():
    """The upload's and the download's bars on stderr would hide the one line."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    were_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    yield
    if not were_disabled:
        enable_progress_bars()


def _publish_broken(hub, good, tmp_path, case: str, revision: str | None = None) -> str:
    """A repo holding the broken folder `case`, uploaded raw (stage2-push refuses it), on `revision` if given."""
    from huggingface_hub import HfApi

    source, breakage, *_ = BROKEN[case]
    folder = shutil.copytree(good[source], tmp_path / "broken")
    if breakage is not None:
        breakage(folder)
    repo_id = f"{hub.user}/broken"
    api = HfApi()
    api.create_repo(repo_id)
    if revision is not None:
        api.create_branch(repo_id, branch=revision)
    api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision)
    return repo_id


def _names_the_repo_file(line: str, shown: str, case: str) -> None:
    """The line names `shown/FILE` and states the problem, and says nothing of the Hub cache."""
    from huggingface_hub import constants

    _, _, file, *problem = BROKEN[case]
    assert f"{shown}/{file}: " in line and all(part in line for part in problem), line
    assert constants.HF_HUB_CACHE not in line and "snapshots" not in line, line


def _refine(repo_id: str, tile, out, *revision: str) -> int:
    from inference_stage2.cli import main

    return main(["--model", repo_id, *revision, "--input", str(tile), "--output_dir", str(out), "--no_progress"])


@pytest.mark.parametrize("case", CASES)
def test_refine_names_the_repo_and_its_file(hub_server, good, sample_tiles_dir, tmp_path, capsys, case):
    repo_id = _publish_broken(hub_server, good, tmp_path, case)
    tile = next((sample_tiles_dir / "val").glob("*.npz"))
    assert _refine(repo_id, tile, tmp_path / "out") == 2
    line = _one_error_line(capsys, "stage2-refine")
    assert line.startswith(f"stage2-refine: error: model {repo_id}: could not be loaded ("), line
    _names_the_repo_file(line, repo_id, case)
    assert not (tmp_path / "out").exists()


def test_refine_names_the_revision_asked(hub_server, good, sample_tiles_dir, tmp_path, capsys):
    case = CASES[0]
    repo_id = _publish_broken(hub_server, good, tmp_path, case, revision="v1")
    tile = next((sample_tiles_dir / "val").glob("*.npz"))
    assert _refine(repo_id, tile, tmp_path / "out", "--revision", "v1") == 2
    _names_the_repo_file(_one_error_line(capsys, "stage2-refine"), f"{repo_id}@v1", case)


@pytest.mark.parametrize("case", CASES)
def test_evaluate_names_the_repo_and_its_file(hub_server, good, tiny_dataset, tmp_path, capsys, case):
    repo_id = _publish_broken(hub_server, good, tmp_path, case)
    assert _evaluate(repo_id, tiny_dataset) == 2
    _names_the_repo_file(_one_error_line(capsys, "stage2-evaluate"), repo_id, case)


@pytest.mark.parametrize("case", CASES)
def test_export_names_the_repo_and_its_file(hub_server, good, tmp_path, capsys, case):
    from modeling_stage2.export import main

    repo_id = _publish_broken(hub_server, good, tmp_path, case)
    assert main([repo_id, str(tmp_path / "exported")]) == 2
    line = _one_error_line(capsys, "stage2-export")
    assert line.startswith(f"stage2-export: error: MODEL {repo_id}: could not be loaded ("), line
    _names_the_repo_file(line, repo_id, case)
    assert not (tmp_path / "exported").exists()
