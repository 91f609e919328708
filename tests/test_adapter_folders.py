"""Adapter folders on disk: the folders a save must not replace, saving through a link, and an adapter folder whose
config.json is missing or describes another refiner, named before any base is built."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from _refiner_helpers import single_thread  # noqa: F401  (fixture)
from _refiner_helpers import (assert_refused_before_any_base, tiny_backbone_config, tiny_inputs, tiny_refiner_config,
                              wake_up)
from modeling_stage2 import PrithviEncoder
from modeling_stage2 import adapters
from modeling_stage2.adapters import build_trainable_model, load_trained_model, save_trained_model

pytestmark = pytest.mark.usefixtures("single_thread")


def refine(model, seed: int = 3):
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28), seed=seed)
    with torch.no_grad():
        return model(opt_v1=opt_v1, month=month, biome=biome).refined


@pytest.mark.parametrize("writer", ["save_trained_model", "export_merged_model"])
def test_an_adapter_is_never_written_over_the_backbone_checkpoint_it_needs(tmp_path, writer):
    """A local `backbone_weights` folder holds config.json, so it passed for an earlier save and was replaced: the
    adapter then had no backbone to load."""
    PrithviEncoder(tiny_backbone_config()).save_pretrained(tmp_path / "converted")
    before = {path.name: path.read_bytes() for path in (tmp_path / "converted").iterdir()}
    config = tiny_refiner_config(backbone_weights=str(tmp_path / "converted"))
    model = build_trainable_model(config, quantization="none", print_summary=False)
    if writer == "export_merged_model":
        model = load_trained_model(save_trained_model(model, tmp_path / "best"))
    with pytest.raises(FileExistsError, match=rf"^{writer}: .*converted holds the backbone weights "
                                              r"\(config.backbone_weights\) this adapter was built on"):
        getattr(adapters, writer)(model, tmp_path / "converted")
    assert {path.name: path.read_bytes() for path in (tmp_path / "converted").iterdir()} == before


@pytest.mark.parametrize("writer", ["save_trained_model", "export_merged_model"])
def test_a_save_through_a_link_replaces_the_linked_folder(tmp_path, writer):
    """The link was replaced by a new folder, and the folder it named kept the previous model."""
    model = build_trainable_model(tiny_refiner_config(), quantization="none", print_summary=False)
    save_trained_model(model, tmp_path / "disk" / "best")
    (tmp_path / "best").symlink_to(tmp_path / "disk" / "best")
    wake_up(model)
    expected = refine(model.eval())
    if writer == "export_merged_model":
        model = load_trained_model(save_trained_model(model, tmp_path / "adapter"))
    getattr(adapters, writer)(model, tmp_path / "best")
    assert (tmp_path / "best").is_symlink()
    names = {"save_trained_model": ["best", "disk"], "export_merged_model": ["adapter", "best", "disk"]}[writer]
    assert sorted(path.name for path in tmp_path.iterdir()) == names
    torch.testing.assert_close(refine(load_trained_model(tmp_path / "disk" / "best")), expected, atol=1e-5, rtol=0)


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        target = config
        *parents, last = key.split("__")
        for parent in parents:
            target = target[parent]
        target[last] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, error, message", [
    (lambda folder: (folder / "config.json").unlink(), FileNotFoundError,
     r"/config.json: missing; a trained adapter folder holds the refiner's config beside adapter_config.json"),
    (lambda folder: _edit_config(folder, model_type="prithvi_eo_v2"), ValueError,
     r"/config.json: key 'model_type' is 'prithvi_eo_v2', not 'stage2_refiner'"),
    (lambda folder: _edit_config(folder, head_width=32), ValueError,
     r"/adapter_model.safetensors: tensor 'base_model\.model\.head\.\S+' has shape \[16(, \d+)*\] where "
     r"\S+/config.json describes \[32(, \d+)*\]: the config does not describe these weights"),
    (lambda folder: _edit_config(folder, backbone_config__depth=3), ValueError,
     r"/base_model.safetensors: no tensor 'blocks\.2\.\S+', which \S+/config.json describes"),
], ids=["config_missing", "model_type", "head_width", "backbone_depth"])
def test_an_adapter_folder_whose_config_does_not_fit_is_named_before_any_base_is_built(
        tmp_path, monkeypatch, damage, error, message):
    """A missing config.json built the default 600M refiner and failed in its backbone's load_state_dict (32 lines);
    another refiner's config, a table of mismatches from peft once the base was built."""
    model = build_trainable_model(tiny_refiner_config(), quantization="none", print_summary=False)
    folder = save_trained_model(model, tmp_path / "good")
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    damage(damaged)
    assert_refused_before_any_base(damaged, monkeypatch, error, message)
    assert adapters.check_model_folder(folder) == "adapter"  # the folder as saved passes
    with pytest.raises(error, match=message):
        adapters.check_model_folder(damaged)
