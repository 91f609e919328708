"""Adapter folders as a peft user meets them: an adapter on a saved base refiner keeps the LoRA it was
trained with when reloaded; an adapter whose weights its adapter_config.json does not describe, a base_model.safetensors
with a tensor too many, and a base folder replaced by another refiner are named on one line before any base is built."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from _refiner_helpers import single_thread  # noqa: F401  (fixture)
from _refiner_helpers import (assert_refused_before_any_base, save_woken_adapter, tiny_inputs, tiny_refiner_config,
                              wake_up)
from modeling_stage2 import Stage2RefinerModel
from modeling_stage2 import adapters
from modeling_stage2.adapters import build_trainable_model, export_merged_model, load_trained_model, save_trained_model

pytestmark = pytest.mark.usefixtures("single_thread")


def refine(model, seed: int = 3):
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28), seed=seed)
    with torch.no_grad():
        return model(opt_v1=opt_v1, month=month, biome=biome).refined


def test_an_adapter_on_a_saved_base_keeps_its_lora_settings_when_reloaded(tmp_path):
    """The base was rebuilt with the base folder's own config (lora_r 8, alpha 16), so a re-save wrote r=8 into
    config.json beside an adapter_config.json of r=4, and the merged export's config and card said r=8."""
    from model_cards.cards import card_for_folder

    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "base")
    model = build_trainable_model(model_name_or_path=tmp_path / "base", quantization="none", print_summary=False,
                                  lora_r=4, lora_alpha=8)
    wake_up(model)
    expected = refine(model.eval())
    folder = save_trained_model(model, tmp_path / "best")
    loaded = load_trained_model(folder)
    assert (loaded.get_base_model().config.lora_r, loaded.get_base_model().config.lora_alpha) == (4, 8)
    assert torch.equal(refine(loaded), expected)
    again = save_trained_model(loaded, tmp_path / "again")
    saved = json.loads((again / "config.json").read_text())
    assert (saved["lora_r"], saved["lora_alpha"]) == (4, 8)
    export_merged_model(load_trained_model(folder), tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (merged["lora_r"], merged["lora_alpha"]) == (4, 8)
    assert "LoRA r=4, alpha=8" in card_for_folder(tmp_path / "merged").text


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    return save_woken_adapter(tmp_path_factory.mktemp("adapter") / "good")


def _edit_adapter_config(**changes):
    def edit(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | changes))
    return edit


def _edit_weights(file, change):
    def edit(folder):
        save_file(change(load_file(folder / file)), str(folder / file))
    return edit


def _without(part):
    return _edit_weights("adapter_model.safetensors", lambda weights: {
        name: value for name, value in weights.items() if part not in name})


ADAPTER = r"\S+/adapter_model.safetensors"
DESCRIBES = r"\S+/adapter_config.json describes"


@pytest.mark.parametrize("damage, message", [
    (_edit_adapter_config(r=16), rf"^{ADAPTER}: tensor '\S+\.lora_A\.weight' has shape \[8, 64\] where {DESCRIBES} "
                                 r"\[16, 64\]: the adapter_config.json does not describe these weights"),
    (_edit_adapter_config(target_modules=["qkv"]),
     rf"^{ADAPTER}: tensor '\S+\.attn\.proj\.lora_A\.weight' is not one {DESCRIBES} .*so it would be dropped"),
    (_without("lora_B"), rf"^{ADAPTER}: no tensor '\S+\.lora_B\.weight', which {DESCRIBES}"),
    (_without(".head."), rf"^{ADAPTER}: no tensor 'base_model\.model\.head\.\S+', which {DESCRIBES}"),
    (_edit_weights("adapter_model.safetensors", lambda weights: {
        name: (value * 100).to(torch.int32) for name, value in weights.items()}),
     rf"^{ADAPTER}: tensor '\S+' is I32, not floating point; the file is damaged"),
    (_edit_weights("base_model.safetensors", lambda weights: weights | {"extra.weight": torch.zeros(2)}),
     r"^\S+/base_model.safetensors: tensor 'extra.weight', which \S+/config.json does not describe"),
], ids=["rank_edited", "targets_edited", "lora_missing", "trained_module_missing", "integer_weights", "base_extra"])
def test_adapter_weights_their_configs_do_not_describe_are_named_before_any_base_is_built(
        saved_adapter, tmp_path, monkeypatch, damage, message):
    """peft raised a multi-line table for another rank, a bare KeyError for a missing trained module (which
    stage2-refine did not catch), only warned for a missing LoRA tensor and silently dropped those the targets no
    longer name or cast integers: the last three loaded a model with other outputs."""
    damaged = tmp_path / "damaged"
    shutil.copytree(saved_adapter, damaged)
    damage(damaged)
    assert_refused_before_any_base(damaged, monkeypatch, ValueError, message)
    assert adapters.check_model_folder(saved_adapter) == "adapter"


def test_an_adapter_loads_what_peft_loads_and_half_precision_weights_still_load(saved_adapter, tmp_path):
    """What the check lets through: the folder as saved, the adapter cast to float16, and modules_to_save left out of
    adapter_config.json (peft then loads the trained modules' tensors into the base as they are)."""
    expected = refine(load_trained_model(saved_adapter))
    half = tmp_path / "half"
    shutil.copytree(saved_adapter, half)
    _edit_weights("adapter_model.safetensors", lambda weights: {k: v.half() for k, v in weights.items()})(half)
    torch.testing.assert_close(refine(load_trained_model(half)), expected, atol=2e-3, rtol=0)
    unlisted = tmp_path / "unlisted"
    shutil.copytree(saved_adapter, unlisted)
    _edit_adapter_config(modules_to_save=None)(unlisted)
    assert torch.equal(refine(load_trained_model(unlisted)), expected)


def test_a_base_folder_replaced_by_another_refiner_is_named_on_one_line(tmp_path, capfd):
    """transformers printed a table of every mismatched tensor of the base, then raised."""
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "base")
    model = build_trainable_model(model_name_or_path=tmp_path / "base", quantization="none", print_summary=False)
    folder = save_trained_model(model, tmp_path / "best")
    shutil.rmtree(tmp_path / "base")
    Stage2RefinerModel(tiny_refiner_config(head_width=32)).save_pretrained(tmp_path / "base")
    capfd.readouterr()
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'base' / 'model.safetensors'}: tensor 'head\.\S+' has shape "
                                         rf"\[32(, \d+)*\] where {folder / 'config.json'} describes \[16(, \d+)*\]: .*"
                                         "the base refiner is not the one this adapter was trained on") as raised:
        load_trained_model(folder)
    assert "\n" not in str(raised.value) and "LOAD REPORT" not in "".join(capfd.readouterr())
