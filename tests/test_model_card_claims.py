"""Model cards and `stage2-push`: what a card says is true of the model it describes, and a push refuses a
folder whose config cannot be loaded in one line, exit status 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from model_cards.cards import base_model_from_config, build_model_card, write_model_card

REFINED = {"ndvi_rmse": 0.041, "evi_rmse": 0.0612, "sam": 0.07, "identity_l1": 0.03, "edge_l1": 0.025, "psnr": 27.5,
           "ssim": 0.8}
OPT_V1 = {"ndvi_rmse": 0.09, "evi_rmse": 0.11, "sam": 0.15, "identity_l1": 0.0, "edge_l1": 0.0, "psnr": 21.0,
          "ssim": 0.6}
TINY_BACKBONE = {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": [1, 14, 14]}


def table_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.parametrize("value, shown, meets", [
    (0.049996, "0.049996", "yes"),  # 4 digits would show "0.05" next to "< 0.05" and "yes"
    (0.0500001, "0.05", "no"),      # "0.05", not below 0.05: 4 digits are on the right side
    (0.04123456, "0.04123", "yes"),
])
def test_the_refined_value_shown_is_on_the_side_of_the_target_that_meets_target_says(value, shown, meets):
    metrics = {"refined": {**REFINED, "ndvi_rmse": value, "sam": value * 2}, "opt_v1": OPT_V1, "n_tiles": 4,
               "split": "test"}
    text = build_model_card(metrics).text
    assert table_row(text, "NDVI RMSE") == ["NDVI RMSE", shown, "0.09", "< 0.05", meets]
    assert table_row(text, "EVI RMSE") == ["EVI RMSE", "0.0612", "0.11", "< 0.05", "no"]
    sam = {0.049996: "0.09999", 0.0500001: "0.1", 0.04123456: "0.08247"}[value]  # twice the value, target 0.1
    assert table_row(text, "SAM (rad)") == ["SAM (rad)", sam, "0.15", "< 0.1", meets]
    # the model-index keeps the value itself
    assert build_model_card(metrics).data.eval_results[0].metric_value == value


def _adapter_on_a_local_refiner(folder: Path, base: Path) -> Path:
    """What `save_trained_model` writes for `build_trainable_model(model_name_or_path=FOLDER)` when that refiner's
    backbone was randomly initialised: the adapter names the folder, the config no backbone weights."""
    base.mkdir(parents=True)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "stage2_refiner", "backbone_weights": None, "backbone_config": TINY_BACKBONE, "lora_r": 2,
        "lora_alpha": 12, "lora_target_modules": ["qkv", "proj", "fc1", "fc2"], "unfreeze_last_n_blocks": 1}))
    (folder / "adapter_config.json").write_text(json.dumps({
        "r": 2, "lora_alpha": 12, "lora_dropout": 0.0, "base_model_name_or_path": str(base),
        "modules_to_save": ["metadata_embedding", "fusion", "head"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"adapter")
    (folder / "stage2_base.json").write_text(json.dumps(
        {"kind": "model", "model_name_or_path": str(base), "trained_quantization": "none"}))
    return folder


def test_an_adapter_on_a_local_refiner_claims_no_hub_base_and_names_its_folder(tmp_path):
    """It named Prithvi-EO-2.0-600M as its base (the default for 'nothing known'), for a tiny randomly initialised
    backbone, said the backbone came from that repo, and the snippet said so too."""
    base = tmp_path / "merged"
    folder = _adapter_on_a_local_refiner(tmp_path / "best", base)
    assert base_model_from_config(json.loads((folder / "config.json").read_text()),
                                  json.loads((folder / "adapter_config.json").read_text())) is None
    card = ModelCard.load(write_model_card(folder, repo_id="me/adapter"))
    assert card.data.base_model is None and card.data.to_dict().get("base_model_relation") is None
    assert "ibm-nasa-geospatial" not in str(card)
    assert table_row(card.text, "Base model")[1] == (
        f"none on the Hub: the frozen base is the Stage 2 refiner folder `{base}` on the machine this adapter was "
        "trained on (`stage2_base.json`); push that refiner and train on its repo, or merge the adapter "
        "(`export_merged_model`), to share it")
    holds = table_row(card.text, "What this repo holds")[1]
    assert holds.endswith(f"; the base refiner (`{base}`) is not included") and "base_model.safetensors" not in holds
    assert f"the frozen base comes from `{base}` (a folder on the training machine)" in card.text
    # an adapter on a randomly initialised backbone of its own keeps saying so
    (folder / "stage2_base.json").write_text(json.dumps({"kind": "saved", "model_name_or_path": None}))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 12, "lora_dropout": 0.0}))
    text = ModelCard.load(write_model_card(folder)).text
    assert "randomly initialised" in table_row(text, "Base model")[1] and "the frozen base comes from this repo" in text


def _full_model(folder: Path, config_text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config_text)
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("config_text, problem", [
    ("{not json", "cannot read the model config (Expecting property name enclosed in double quotes"),
    ("[1]", "the model config must be a JSON object, got list"),
    (json.dumps({"model_type": "stage2_refiner", "spectral_correction": "foo"}),
     "spectral_correction must be one of ('none', 'affine', 'shared'), got 'foo'"),
])
def test_include_code_with_a_config_that_does_not_load_is_one_line_and_exit_status_2(tmp_path, capsys, config_text,
                                                                                    problem):
    """It was a traceback (JSONDecodeError, AttributeError, ValueError) from building the code's auto_map."""
    from model_cards.push import main

    folder = _full_model(tmp_path / "merged", config_text)
    argv = [str(folder), "me/full", "--include_code", "--token", "t", "--endpoint", "http://127.0.0.1:9"]
    assert main(argv) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"stage2-push: error: {folder / 'config.json'}: {problem}")
