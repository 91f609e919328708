"""What a model's Hub download fetches and how a folder that is not the model it is taken for is refused: a model repo
holding a `stage2-export` subfolder (`stage2-push` sends `best/onnx` along) downloaded the graph with the model (2.4 GB
for the 600M refiner beside a few-MB adapter); a refused Hub adapter was named by its path in the Hub cache; an adapter
shared the usual peft way (no refiner `config.json`) was refused without saying how to share it so that it loads; and
`from_pretrained` of an adapter folder said only that it holds no `model.safetensors`."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

import _hub_helpers
import _refiner_helpers
from _refiner_helpers import assert_refused_before_any_base, save_woken_adapter, tiny_refiner_config
from modeling_stage2 import Stage2RefinerModel, load_trained_model
from modeling_stage2.adapters import ADAPTER_CONFIG_FILE
from test_plain_peft_loading import refine
from test_push_refuses_broken_folders import _export_into

hub_server, single_thread = _hub_helpers.hub_server, _refiner_helpers.single_thread  # the fixtures
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A tiny adapter folder as `save_trained_model` writes it (its base kept in the folder: no Hub base)."""
    folder = tmp_path_factory.mktemp("adapter") / "best"
    save_woken_adapter(folder)
    return folder


def _snapshot_files() -> set[str]:
    """Every file of every snapshot in the Hub cache, by its path in its repo."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)  # CACHE/models--OWNER--NAME/snapshots/COMMIT/FILE
    return {"/".join(path.relative_to(cache).parts[3:]) for path in cache.glob("*/snapshots/*/**/*") if path.is_file()}


def test_a_model_repo_s_export_comes_only_when_asked_for(hub_server, adapter, tmp_path):
    """`load_trained_model(REPO)` and `inference_stage2.load_model(REPO)` fetch the repo's top-level files only, with
    the same outputs as the folder pushed; the export comes on its own, whole, as docs/sharing.md says
    (`snapshot_download` of `onnx/*`, then `load_model` of that folder: its graph is what `load_model` reads)."""
    from huggingface_hub import HfApi, snapshot_download

    from inference_stage2 import load_model
    from model_cards.push import push_trained_model
    from modeling_stage2.onnx_runtime import resolve_export

    folder = shutil.copytree(adapter, tmp_path / "best")
    export = _export_into(folder)  # a graph's bytes are not read on the way
    repo = f"{hub_server.user}/with-export"
    push_trained_model(folder, repo)
    exported = {f"{export.name}/{path.name}" for path in export.iterdir()}
    assert exported <= set(HfApi().list_repo_files(repo))
    expected = refine(load_trained_model(adapter))
    for load in (load_trained_model, load_model):
        assert torch.equal(refine(load(repo)), expected)
    downloaded = _snapshot_files()
    assert ADAPTER_CONFIG_FILE in downloaded and not any("/" in name for name in downloaded), downloaded
    assert hub_server.count("GET", f"/{export.name}/") == 0

    graph, _, _ = resolve_export(Path(snapshot_download(repo, allow_patterns=[f"{export.name}/*"])) / export.name, None)
    assert exported <= _snapshot_files() and graph.read_bytes() == (export / graph.name).read_bytes()


def test_a_refused_hub_adapter_is_named_as_it_was_given(hub_server, adapter):
    """As `inference_stage2.load_model` names it (docs/sharing.md): `REPO/FILE`, `REPO@REVISION/FILE`, not the Hub
    cache's `.../models--OWNER--NAME/snapshots/COMMIT/FILE`, which the user never typed."""
    from huggingface_hub import HfApi

    repo = f"{hub_server.user}/peft-way"
    load_trained_model(adapter).push_to_hub(repo)  # peft's own push: no refiner config.json
    commit = HfApi().model_info(repo).sha
    for revision, name in ((None, repo), (commit, f"{repo}@{commit}")):
        with pytest.raises(FileNotFoundError, match=f"^{re.escape(name)}/config.json: missing; ") as raised:
            load_trained_model(repo, revision=revision)
        assert "snapshots" not in str(raised.value) and "\n" not in str(raised.value)


def test_an_adapter_saved_the_peft_way_is_refused_saying_how_to_share_it(adapter, tmp_path, monkeypatch):
    peft_way = tmp_path / "peft_way"
    load_trained_model(adapter).save_pretrained(peft_way)  # what PeftModel.push_to_hub uploads
    assert (peft_way / ADAPTER_CONFIG_FILE).is_file() and not (peft_way / "config.json").exists()
    fix = "save the adapter with modeling_stage2.save_trained_model and push that folder with stage2-push or " \
          "model_cards.push.push_trained_model."
    assert_refused_before_any_base(peft_way, monkeypatch, FileNotFoundError,
                                   f"^{re.escape(str(peft_way / 'config.json'))}: missing; .*{re.escape(fix)}$")


def test_from_pretrained_of_an_adapter_folder_names_the_loader_that_reads_it(adapter, tmp_path):
    """Stage2RefinerModel's and AutoModel's `from_pretrained` said "Error no file named model.safetensors, or
    pytorch_model.bin, found in directory ..."; a full refiner folder still loads."""
    from transformers import AutoModel

    torch.manual_seed(0)
    full = Stage2RefinerModel(tiny_refiner_config())
    full.save_pretrained(tmp_path / "full")
    assert torch.equal(refine(Stage2RefinerModel.from_pretrained(tmp_path / "full")), refine(full))

    loader = f"modeling_stage2.load_trained_model('{adapter}')"
    for from_pretrained in (Stage2RefinerModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(OSError, match=f"^{re.escape(str(adapter))}: a trained adapter folder .*"
                                          f"{re.escape(loader)}") as raised:
            from_pretrained(adapter)
        assert "\n" not in str(raised.value)
