"""`stage2-push` refuses, before the Hub hears of it (no repo created, nothing uploaded), a folder that the loaders
(`load_trained_model`: `stage2-refine`, `stage2-export`) refuse: it published them with exit status 0 and a card
describing files that were not there. An export inside the model folder goes whole (graph included) or not at all."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _hub_helpers import hub_server  # noqa: F401  (fixture)
from _refiner_helpers import save_woken_adapter, tiny_backbone_config, tiny_refiner_config, wake_up
from modeling_stage2.adapters import ADAPTER_WEIGHTS_FILE, BASE_SOURCE_FILE, BASE_WEIGHTS_FILE
from modeling_stage2.export import EXPORT_INFO_FILE, GRAPH_FILES


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """A tiny adapter folder, a tiny full refiner folder and a Prithvi backbone folder, each as saved."""
    from modeling_stage2 import Stage2RefinerModel
    from modeling_stage2.modeling_prithvi import PrithviEncoder

    root = tmp_path_factory.mktemp("good")
    save_woken_adapter(root / "adapter")
    torch.manual_seed(0)
    full = Stage2RefinerModel(tiny_refiner_config())
    wake_up(full)
    full.save_pretrained(root / "full")
    PrithviEncoder(tiny_backbone_config()).save_pretrained(root / "prithvi")
    return {name: root / name for name in ("adapter", "full", "prithvi")}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# (the good folder it starts from, what breaks it, the file the error names, the problem it states (all its parts))
BROKEN = {
    "a Prithvi backbone, not a refiner": ("prithvi", None, "config.json", "key 'model_type' is 'prithvi_eo_v2'"),
    "truncated adapter weights": ("adapter", lambda f: _truncate(f / ADAPTER_WEIGHTS_FILE), ADAPTER_WEIGHTS_FILE,
                                  "not a readable safetensors file"),
    "truncated full weights": ("full", lambda f: _truncate(f / "model.safetensors"), "model.safetensors",
                               "not a readable safetensors file"),
    "the saved base missing": ("adapter", lambda f: (f / BASE_WEIGHTS_FILE).unlink(), BASE_WEIGHTS_FILE,
                               "is missing: ", BASE_SOURCE_FILE, "says the base backbone weights are stored there"),
    "no base description": ("adapter", lambda f: (f / BASE_SOURCE_FILE).unlink(), BASE_SOURCE_FILE, "is missing"),
}


def _nothing_reached_the_hub(hub) -> bool:
    return hub.repos == {} and hub.count("POST") == hub.count("PUT") == 0  # create, preupload, commit, LFS


@pytest.mark.parametrize("case", BROKEN)
def test_a_folder_the_loaders_refuse_is_refused_before_the_hub_hears_of_it(hub_server, good, tmp_path, capsys,
                                                                           case):
    from model_cards.push import main

    source, breakage, file, *problem = BROKEN[case]
    folder = shutil.copytree(good[source], tmp_path / "model")
    if breakage is not None:
        breakage(folder)
    assert main([str(folder), "broken"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"stage2-push: error: {folder / file}") and all(part in line for part in problem), line
    assert _nothing_reached_the_hub(hub_server)


def test_good_folders_still_push(hub_server, good, capsys):
    """The check refuses what is broken, not every folder."""
    from huggingface_hub import HfApi

    from model_cards.push import main

    for source, weights in (("adapter", ADAPTER_WEIGHTS_FILE), ("full", "model.safetensors")):
        assert main([str(good[source]), source]) == 0, capsys.readouterr().err
        assert weights in HfApi().list_repo_files(f"{hub_server.user}/{source}")


def _export_into(folder: Path, format: str = "onnx") -> Path:
    """What `stage2-export MODEL MODEL/onnx` writes (the graph's bytes are never read by a push)."""
    export = folder / "onnx"
    export.mkdir(exist_ok=True)
    for old in GRAPH_FILES.values():
        (export / old).unlink(missing_ok=True)
    (export / GRAPH_FILES[format]).write_bytes(b"graph")
    (export / EXPORT_INFO_FILE).write_text(json.dumps({"format": format, "graph_file": GRAPH_FILES[format]}))
    shutil.copyfile(folder / "config.json", export / "config.json")
    (export / "README.md").write_text("# exported\n")
    return export


def test_an_export_inside_the_model_folder_goes_whole_and_other_subfolders_stay_home(hub_server, good, tmp_path):
    """It went as its README, config and export.json without the graph they describe; a second push with another
    format leaves no graph of the first beside its export.json."""
    from huggingface_hub import HfApi

    from model_cards.push import main

    folder = shutil.copytree(good["full"], tmp_path / "model")
    export = _export_into(folder)
    (folder / "notes").mkdir()
    (folder / "notes" / "extra.json").write_text("{}")
    repo = f"{hub_server.user}/with-export"
    assert main([str(folder), repo]) == 0
    files = set(HfApi().list_repo_files(repo))
    assert {f"onnx/{name.name}" for name in export.iterdir()} <= files
    assert not any(f.startswith("notes/") for f in files)
    _export_into(folder, "torch_export")
    assert main([str(folder), repo]) == 0
    exported = {f for f in HfApi().list_repo_files(repo) if f.startswith("onnx/")}
    assert exported == {f"onnx/{name.name}" for name in export.iterdir()} and "onnx/model.onnx" not in exported


def test_an_export_goes_without_the_files_that_are_not_an_export_s(good, tmp_path):
    """What `stage2-export` writes into the folder (`EXPORT_FILES`) goes; a note or a debug dump beside it stays home,
    as the other subfolders' files do."""
    from model_cards.push import files_to_upload
    from modeling_stage2.export import EXPORT_FILES

    folder = shutil.copytree(good["full"], tmp_path / "model")
    export = _export_into(folder)
    written = {f"onnx/{path.name}" for path in export.iterdir()}
    (export / "debug.txt").write_text("trace\n")
    (export / "notes.json").write_text("{}")
    uploaded = {name for name in files_to_upload(folder) if name.startswith("onnx/")}
    assert uploaded == written and all(name.rpartition("/")[2] in EXPORT_FILES for name in uploaded)


def test_an_export_without_its_graph_is_refused_before_the_hub_hears_of_it(hub_server, good, tmp_path, capsys):
    from model_cards.push import main

    folder = shutil.copytree(good["adapter"], tmp_path / "model")
    graph = _export_into(folder) / GRAPH_FILES["onnx"]
    graph.unlink()
    assert main([str(folder), "half-export"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"stage2-push: error: {graph}: missing (named by "), line
    assert _nothing_reached_the_hub(hub_server)
