"""Tests from a review with mutations of the Hub / adapter-folder change: a refused Hub adapter's damaged weights
(a `ValueError`, as docs/sharing.md writes it) named `REPO@REVISION/FILE` with no Hub cache path anywhere in the
printed traceback; and the folders `Stage2RefinerModel.from_pretrained` must not take for a trained adapter folder
(an adapter saved the peft way onto a local base refiner, a sharded full refiner holding an embedded adapter, no
folder at all with `state_dict=`) beside the one it must (an adapter folder given as `subfolder=`)."""
from __future__ import annotations

import copy
import re
import shutil
import traceback

import pytest
import torch

import _hub_helpers
import _refiner_helpers
import test_hub_model_files
from _refiner_helpers import tiny_refiner_config
from modeling_stage2 import Stage2RefinerModel, load_trained_model
from modeling_stage2.adapters import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, save_trained_model
from test_plain_peft_loading import refine, trained_on

hub_server, single_thread = _hub_helpers.hub_server, _refiner_helpers.single_thread  # the fixtures
adapter = test_hub_model_files.adapter  # the fixture: a tiny adapter folder as save_trained_model writes it
pytestmark = pytest.mark.usefixtures("single_thread")


def test_a_hub_adapter_s_damaged_weights_are_named_as_the_repo_was_given(hub_server, adapter, tmp_path):
    """docs/sharing.md: `load_trained_model("me/refiner", revision="v1")` -> `ValueError: me/refiner@v1/
    adapter_model.safetensors: ...`; the traceback a user reads chains no error naming the Hub cache's path."""
    from huggingface_hub import HfApi

    folder = shutil.copytree(adapter, tmp_path / "best")
    weights = folder / ADAPTER_WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    repo = f"{hub_server.user}/truncated"
    HfApi().create_repo(repo)
    HfApi().upload_folder(repo_id=repo, folder_path=str(folder))
    commit = HfApi().model_info(repo).sha
    name = f"{repo}@{commit}/{ADAPTER_WEIGHTS_FILE}"
    with pytest.raises(ValueError, match=f"^{re.escape(name)}: not a readable safetensors file") as raised:
        load_trained_model(repo, revision=commit)
    printed = "".join(traceback.format_exception(raised.value))
    assert "snapshots" not in printed and "\n" not in str(raised.value)


def test_an_adapter_folder_given_as_a_subfolder_names_the_loader_that_reads_it(adapter):
    """`from_pretrained(PARENT, subfolder="best")` reads PARENT/best: refused as `from_pretrained(PARENT/best)` is."""
    loader = f"modeling_stage2.load_trained_model('{adapter}')"
    with pytest.raises(OSError, match=f"^{re.escape(str(adapter))}: a trained adapter folder .*{re.escape(loader)}"):
        Stage2RefinerModel.from_pretrained(adapter.parent, subfolder=adapter.name)


@pytest.fixture(scope="module")
def on_a_local_base(tmp_path_factory):
    """(an adapter trained on a local base refiner folder, saved by `save_trained_model`; its outputs)."""
    root = tmp_path_factory.mktemp("on_a_local_base")
    torch.manual_seed(0)
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(root / "base")
    model = trained_on(model_name_or_path=root / "base")
    expected = refine(model)
    assert not torch.allclose(expected, refine(Stage2RefinerModel.from_pretrained(root / "base")), atol=1e-3)
    return save_trained_model(model, root / "best"), expected


def test_from_pretrained_loads_an_adapter_saved_the_peft_way_onto_its_base(on_a_local_base, tmp_path):
    """No refiner config.json (peft's own `save_pretrained`): transformers loads the base `adapter_config.json` names,
    with the adapter (docs/sharing.md), rather than a refusal pointing at `load_trained_model`, which refuses it."""
    folder, expected = on_a_local_base
    load_trained_model(folder).save_pretrained(tmp_path / "peft_way")
    assert not (tmp_path / "peft_way" / "config.json").exists()
    torch.testing.assert_close(refine(Stage2RefinerModel.from_pretrained(tmp_path / "peft_way")), expected,
                               rtol=1e-5, atol=1e-6)  # transformers' LoRA layers, not peft's: rounding apart


def test_a_peft_way_adapter_naming_no_base_is_refused_with_what_loads_it(tmp_path):
    """A base built from a config (`Stage2RefinerModel(config)`), wrapped and saved by peft: `adapter_config.json`
    names no base (null), and transformers asked the Hub for a repo "None" (~30 s of retries, then "couldn't
    connect"). Refused at once on one line naming the file, with the loading the message names shown to work.
    (`AutoModel.from_pretrained` follows the adapter's base before it knows the class: transformers' own.)"""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = Stage2RefinerModel(tiny_refiner_config())
    _refiner_helpers.wake_up(base)
    built_again = copy.deepcopy(base)  # the user's base, built again
    tuned = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["qkv"]))
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    tuned.save_pretrained(tmp_path / "peft_way")
    adapter_config = tmp_path / "peft_way" / ADAPTER_CONFIG_FILE
    assert '"base_model_name_or_path": null' in adapter_config.read_text()
    with pytest.raises(OSError) as raised:
        Stage2RefinerModel.from_pretrained(tmp_path / "peft_way")
    message = str(raised.value)
    assert message.startswith(f"{adapter_config}: base_model_name_or_path names no base model") and \
        "\n" not in message and "peft.PeftModel.from_pretrained(base, " in message
    without_adapter = refine(built_again)
    loaded = PeftModel.from_pretrained(built_again, tmp_path / "peft_way")
    assert torch.equal(refine(loaded), refine(tuned))
    assert not torch.allclose(refine(loaded), without_adapter, atol=1e-3)  # the adapter was loaded, and counts


def test_a_sharded_full_refiner_with_an_embedded_adapter_is_no_adapter_folder(on_a_local_base, tmp_path):
    """Model weights beside `adapter_config.json` (sharded: an index, no model.safetensors) make a full refiner folder,
    which transformers loads with its adapter; and with no folder at all (`state_dict=`) nothing is looked for."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    folder, expected = on_a_local_base
    base = Stage2RefinerModel.from_pretrained(folder.parent / "base")
    embedded = tmp_path / "embedded"
    base.save_pretrained(embedded, max_shard_size="100KB")
    assert not (embedded / SAFE_WEIGHTS_NAME).exists() and (embedded / SAFE_WEIGHTS_INDEX_NAME).is_file()
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        shutil.copy(folder / name, embedded / name)
    torch.testing.assert_close(refine(Stage2RefinerModel.from_pretrained(embedded)), expected, rtol=1e-5, atol=1e-6)
    rebuilt = Stage2RefinerModel.from_pretrained(None, config=base.config, state_dict=base.state_dict())
    assert torch.equal(refine(rebuilt), refine(base))


def test_a_peft_way_adapter_config_that_cannot_be_read_is_left_to_transformers(tmp_path):
    """Only an `adapter_config.json` that reads and names no base is said to name none; one that is no JSON gets
    transformers' or peft's own error, not a message blaming a null base."""
    folder = tmp_path / "peft_way"
    folder.mkdir()
    (folder / ADAPTER_CONFIG_FILE).write_text("{not json")
    with pytest.raises(Exception) as raised:
        Stage2RefinerModel.from_pretrained(folder)
    assert "names no base model" not in str(raised.value)
