"""Model and dataset cards: metadata, model-index round trip, Hub validation, folder reading, errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from huggingface_hub import EvalResult, ModelCard

from _hub_helpers import hub_server  # noqa: F401  (fixture)
from modeling_stage2 import PrithviConfig
from model_cards.cards import (
    CARD_METRICS,
    DESIGN_TARGETS,
    TABLE_METRICS,
    GENERATED_MARKER,
    CardError,
    base_model_from_config,
    build_dataset_card,
    build_model_card,
    card_for_folder,
    is_placeholder_card,
    should_regenerate_card,
    training_rows,
    validate_metrics,
    write_model_card,
)

METRICS = {
    "refined": {"ndvi_rmse": 0.041, "evi_rmse": 0.0612, "sam": 0.07, "identity_l1": 0.03, "edge_l1": 0.025,
                "psnr": 27.5, "ssim": 0.8},
    "opt_v1": {"ndvi_rmse": 0.09, "evi_rmse": 0.11, "sam": 0.15, "identity_l1": 0.0, "edge_l1": 0.0,
               "psnr": 21.0, "ssim": 0.6},
    "n_tiles": 12,
    "split": "test",
}
PRITHVI_300M = "ibm-nasa-geospatial/Prithvi-EO-2.0-300M"


def table_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_model_card_metadata_and_eval_results():
    card = build_model_card(METRICS, {"learning_rate": 2e-4}, repo_id="me/refiner", datasets="me/tiles",
                            base_model=PRITHVI_300M)
    data = card.data
    assert (data.base_model, data.license, data.library_name, data.pipeline_tag) == (
        PRITHVI_300M, "apache-2.0", "peft", "image-to-image")
    assert {"earth-observation", "sentinel-2", "prithvi", "lora", "remote-sensing", "image-to-image", "peft"} <= set(
        data.tags)
    assert data.datasets == ["me/tiles"] and data.model_name == "refiner"
    assert [(r.metric_type, r.metric_value, r.dataset_type, r.dataset_split, r.task_type) for r in data.eval_results] == [
        (name, METRICS["refined"][name], "me/tiles", "test", "image-to-image") for name in CARD_METRICS]
    model_index = data.to_dict()["model-index"]
    assert model_index[0]["name"] == "refiner" and len(model_index[0]["results"][0]["metrics"]) == 5


def test_card_names_the_split_the_metrics_record_and_never_relabels_it(tmp_path):
    validation = {**METRICS, "split": "val"}
    card = build_model_card(validation)
    assert {r.dataset_split for r in card.data.eval_results} == {"val"}
    assert "12 tiles of the `val` split" in card.text
    with pytest.raises(CardError, match="computed on the 'val' split; they cannot be labelled 'test'"):
        build_model_card(validation, split="test")
    # Metrics written before they recorded a split: the caller's split, or "unrecorded", never a guess.
    old = {key: value for key, value in METRICS.items() if key != "split"}
    assert "tiles of the `unrecorded` split" in build_model_card(old).text
    assert {r.dataset_split for r in build_model_card(old, split="val").data.eval_results} == {"val"}
    with pytest.raises(CardError, match="'split' must name the split"):
        validate_metrics({**METRICS, "split": 3})
    # A folder's metrics.json (what stage2-push rebuilds the card from) keeps its split.
    folder = _model_folder(tmp_path / "best")
    (folder / "metrics.json").write_text(json.dumps(validation))
    assert "12 tiles of the `val` split" in ModelCard.load(write_model_card(folder)).text


def test_evaluation_table_compares_refined_baseline_and_design_targets():
    text = build_model_card(METRICS).text
    assert table_row(text, "NDVI RMSE") == ["NDVI RMSE", "0.041", "0.09", "< 0.05", "yes"]
    assert table_row(text, "EVI RMSE") == ["EVI RMSE", "0.0612", "0.11", "< 0.05", "no"]
    assert table_row(text, "SAM (rad)") == ["SAM (rad)", "0.07", "0.15", "< 0.1", "yes"]
    assert table_row(text, "edge L1") == ["edge L1", "0.025", "0", "< 0.02", "no"]
    assert table_row(text, "PSNR (dB, higher is better)") == ["PSNR (dB, higher is better)", "27.5", "21", "-", "-"]
    assert "12 tiles of the `test` split" in text
    assert "B08" in text and "by design" in text and "narrow NIR" in text  # the band substitution is stated
    assert "![Refinement preview" in text and "(preview.png)" in text


def test_card_names_both_baselines_opt_v1_and_the_colour_fit():
    fit = {name: value * 0.9 for name, value in METRICS["opt_v1"].items()}
    with_fit = {**METRICS, "linear_fit": fit, "linear_fit_fitted_on": {"split": "train", "tiles": 18}}
    text = build_model_card(with_fit).text
    header = next(line for line in text.splitlines() if line.startswith("| metric |"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "metric", "refined", "`opt_v1`", "colour fit (fitted on `train`, 18 tiles)", "design target", "meets target"]
    assert table_row(text, "NDVI RMSE")[:4] == ["NDVI RMSE", "0.041", "0.09", "0.081"]
    assert "beats both `opt_v1` and the colour fit" in text
    # "baseline" only ever names the two together, never one of them alone.
    for line in text.splitlines():
        for phrase in ("(baseline", "the baseline", "opt_v1 baseline", "second baseline", "colour-fit baseline"):
            assert phrase not in line, line
    without_fit = build_model_card(METRICS).text
    assert "| metric | refined | `opt_v1` | design target | meets target |" in without_fit


def test_card_metrics_are_the_design_targets_in_order_then_psnr_and_ssim():
    assert CARD_METRICS == ("ndvi_rmse", "evi_rmse", "sam", "identity_l1", "edge_l1")
    assert DESIGN_TARGETS["sam"] == 0.1 and DESIGN_TARGETS["edge_l1"] == 0.02
    assert TABLE_METRICS == CARD_METRICS + ("psnr", "ssim")


def test_card_parses_back_with_identical_eval_results(tmp_path):
    card = build_model_card(METRICS, repo_id="me/refiner")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.eval_results == card.data.eval_results
    assert all(isinstance(r, EvalResult) for r in loaded.data.eval_results)
    assert loaded.data.to_dict() == card.data.to_dict()


def test_card_passes_the_hub_metadata_validation(hub_server):
    from huggingface_hub import HfApi

    build_model_card(METRICS, {"lora": {"r": 8}}, repo_id="me/refiner").validate()
    build_model_card(None).validate()  # no results: no model-index, still valid
    api = HfApi()
    api.create_repo(f"{hub_server.user}/cards")
    broken = str(build_model_card(METRICS)).replace("      value: 0.041", "      valeur: 0.041")
    with pytest.raises(ValueError, match=r'(?s)Invalid metadata.*metrics\[0\] needs a string "type" and a "value"'):
        api.upload_file(path_or_fileobj=broken.encode(), path_in_repo="README.md", repo_id=f"{hub_server.user}/cards")
    api.upload_file(path_or_fileobj=str(build_model_card(METRICS)).encode(), path_in_repo="README.md",
                    repo_id=f"{hub_server.user}/cards")
    assert hub_server.count("POST", "/api/validate-yaml") == 4
    assert api.model_info(f"{hub_server.user}/cards").card_data.eval_results == build_model_card(METRICS).data.eval_results


def test_nan_metrics_are_shown_as_not_measured():
    metrics = json.loads(json.dumps(METRICS))
    metrics["refined"]["edge_l1"] = math.nan
    card = build_model_card(metrics)
    assert [r.metric_type for r in card.data.eval_results] == ["ndvi_rmse", "evi_rmse", "sam", "identity_l1"]
    assert table_row(card.text, "edge L1") == ["edge L1", "n/a", "0", "< 0.02", "-"]


@pytest.mark.parametrize(("metrics", "message"), [
    ([1, 2], "expected a mapping"),
    ({"opt_v1": {}}, "key 'refined' is missing"),
    ({"refined": {"ndvi_rmse": 0.1}}, r"'refined' lacks \['evi_rmse', 'sam', 'identity_l1', 'edge_l1'\]"),
    ({"refined": {**METRICS["refined"], "sam": "low"}}, r"refined.sam: expected a number, got 'low'"),
    ({"refined": {**METRICS["refined"], "sam": True}}, "refined.sam: expected a number"),
    ({**METRICS, "n_tiles": 0}, "'n_tiles' must be a positive integer"),
    ({**METRICS, "data": "mild"}, r"m.json: data: expected \{'input_mode': one of \['synthetic', 'stage1', "
                                  r"'identity'\]"),
    ({**METRICS, "data": {"input_mode": "sar"}}, "m.json: data: expected .* got {'input_mode': 'sar'}"),
    ({**METRICS, "data": {"input_mode": "synthetic", "degradation": 2}},
     "m.json: data.degradation: expected a preset name or null, got 2"),
    ({**METRICS, "data": {"input_mode": "synthetic", "dataset_seed": True}},
     "m.json: data.dataset_seed: expected an integer or null, got True"),
    ({**METRICS, "data": {"input_mode": "synthetic", "dataset_seed": "0"}},
     "m.json: data.dataset_seed: expected an integer or null, got '0'"),
])
def test_bad_metrics_are_refused_with_the_key(metrics, message):
    with pytest.raises(CardError, match=message):
        validate_metrics(metrics, source="m.json")


def test_training_rows_flatten_and_escape():
    rows = training_rows({"lr": 1e-4, "lora": {"r": 8, "targets": ["qkv", "fc1"]}, "skip": None,
                          "note": "a|b\nc", "long": "x" * 300})
    assert rows[:4] == [("lr", "0.0001"), ("lora.r", "8"), ("lora.targets", "qkv, fc1"), ("note", "a\\|b c")]
    assert len(rows[4][1]) == 200 and rows[4][1].endswith("...")


def test_base_model_comes_from_the_backbone_weights_when_they_name_a_hub_repo(tmp_path):
    assert base_model_from_config({"backbone_weights": f"{PRITHVI_300M}/Prithvi_EO_V2_300M.pt"}) == PRITHVI_300M
    assert base_model_from_config({"backbone_weights": f"hf://{PRITHVI_300M}/x.pt"}) == PRITHVI_300M
    local = tmp_path / "converted"
    local.mkdir()
    # Weights from a local folder or file: the release with the backbone's architecture, none without one.
    architectures = {"ibm-nasa-geospatial/Prithvi-EO-2.0-600M": "prithvi_eo_v2_600m",
                     PRITHVI_300M: "prithvi_eo_v2_300m",
                     "ibm-nasa-geospatial/Prithvi-EO-2.0-100M-TL": "prithvi_eo_v2_100m_tl",
                     None: "prithvi_eo_v2_tiny"}
    for repo, preset in architectures.items():
        backbone = PrithviConfig.from_preset(preset).to_dict()
        assert base_model_from_config({"backbone_weights": str(local), "backbone_config": backbone}) == repo
    assert base_model_from_config({"backbone_weights": str(local)}) == "ibm-nasa-geospatial/Prithvi-EO-2.0-600M"
    assert base_model_from_config({"backbone_weights": None}, {"base_model_name_or_path": PRITHVI_300M}) == PRITHVI_300M
    # A randomly initialised backbone has no base model; nothing known about the backbone -> the default.
    assert base_model_from_config({"backbone_weights": None}, {"base_model_name_or_path": None}) is None
    assert base_model_from_config(None) == "ibm-nasa-geospatial/Prithvi-EO-2.0-600M"


def test_card_of_a_randomly_initialised_backbone_claims_no_pretrained_base(tmp_path):
    folder = _model_folder(tmp_path / "demo")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"backbone_weights": None}))
    card = ModelCard.load(write_model_card(folder))
    assert card.data.base_model is None and card.data.to_dict().get("base_model_relation") is None
    assert "Prithvi-EO-2.0-600M" not in card.text and "randomly initialised" in card.text
    assert "the frozen base comes from this repo" in card.text


def test_card_of_a_backbone_from_a_local_file_names_its_release_or_no_base(tmp_path):
    """A merged model whose backbone weights came from a local file: the card names the release with the backbone's
    architecture (not always the 600M) and says where the weights came from; with no such release, no base model,
    and it does not claim a random initialisation."""
    folder = _model_folder(tmp_path / "merged", adapter=False)
    config = json.loads((folder / "config.json").read_text()) | {"backbone_weights": str(tmp_path / "mine.pt")}
    (folder / "config.json").write_text(json.dumps(config))
    card = ModelCard.load(write_model_card(folder))
    assert card.data.base_model == PRITHVI_300M and "Prithvi-EO-2.0-600M" not in card.text
    assert "its weights were loaded from a local file with this release's architecture" in card.text

    tiny = PrithviConfig.from_preset("prithvi_eo_v2_tiny").to_dict()
    (folder / "config.json").write_text(json.dumps(config | {"backbone_config": tiny}))
    card = ModelCard.load(write_model_card(folder))
    assert card.data.base_model is None and "ibm-nasa-geospatial" not in card.text
    assert "loaded from a local file (`backbone_weights`)" in card.text and "randomly initialised" not in card.text


def _model_folder(folder: Path, adapter: bool = True) -> Path:
    folder.mkdir(parents=True)
    config = {"model_type": "stage2_refiner", "bands": ["B02", "B03", "B04", "B08"], "lora_r": 8,
              "lora_target_modules": ["qkv", "proj"], "unfreeze_last_n_blocks": 2,
              "backbone_weights": f"{PRITHVI_300M}/Prithvi_EO_V2_300M.pt",
              "backbone_config": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": [1, 16, 16]}}
    (folder / "config.json").write_text(json.dumps(config))
    if adapter:
        (folder / "adapter_config.json").write_text(json.dumps(
            {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "modules_to_save": ["fusion", "head"]}))
    return folder


def test_the_card_tells_fitted_modules_from_trained_ones(tmp_path):
    folder = _model_folder(tmp_path / "best")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "modules_to_save": ["fusion", "head", "spectral_range"]}))
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    text = ModelCard.load(write_model_card(folder)).text
    assert "; trained in full: fusion, head; fitted before training: spectral_range" in text


BACKBONE_300M = {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": [1, 16, 16]}


@pytest.mark.parametrize(
    "config, expected",
    [
        # A model saved before the colour parts existed (their config defaults): the head's residual only.
        ({"backbone_config": BACKBONE_300M},
         "month/biome embedding + fusion -> Prithvi-EO-2.0 encoder (embed_dim 1024, depth 24, num_heads 16, "
         "patch 1x16x16) -> ConvNeXt head adding a local residual"),
        ({"spectral_correction": "shared", "spectral_mlp_hidden_size": 32, "num_convnext_blocks": 2,
          "head_width": 32, "nonnegative_output": True},
         "month/biome embedding + fusion -> Prithvi-EO-2.0 encoder (configuration in `config.json`) -> one 4x4 + "
         "bias colour correction of `opt_v1` for every tile -> a per-pixel spectral MLP (hidden width 32), a "
         "non-linear colour correction -> ConvNeXt head (2 blocks, width 32) adding a local residual; output "
         "clamped at 0 reflectance"),
        ({"spectral_correction": "affine", "out_of_range_fallback": True, "near_black_fallback": True,
          "near_black_keep": "ndvi", "near_black_threshold": 0.02},
         "month/biome embedding + fusion -> Prithvi-EO-2.0 encoder (configuration in `config.json`) -> a 4x4 + bias "
         "colour correction of `opt_v1` per tile, from the tile's features, month and biome -> ConvNeXt head adding "
         "a local residual; keeps `opt_v1` at pixels whose spectrum lies outside the training spectra and "
         "`opt_v1`'s NDVI at near-black pixels (red + NIR reflectance up to 0.02)"),
        ({"near_black_fallback": True, "near_black_threshold": 0.05},
         "month/biome embedding + fusion -> Prithvi-EO-2.0 encoder (configuration in `config.json`) -> ConvNeXt "
         "head adding a local residual; keeps `opt_v1` at near-black pixels (red + NIR reflectance up to 0.05)"),
    ],
)
def test_the_architecture_row_names_the_parts_the_config_turns_on(config, expected):
    text = build_model_card(METRICS, model_config=config).text
    assert table_row(text, "Architecture") == ["Architecture", expected]


def test_what_the_repo_holds_points_at_the_adapters_modules_and_says_where_the_backbone_is():
    adapter = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "modules_to_save": ["head", "spectral_mlp"]}
    named = table_row(build_model_card(METRICS, adapter_config=adapter).text, "What this repo holds")[1]
    assert named == ("the LoRA adapter (`adapter_model.safetensors`, `adapter_config.json`), the non-backbone modules "
                     "trained or fitted beside it (named under Adaptation) and the refiner config; the backbone "
                     "weights are not included (they come from the base model)")
    assert "trained in full: head, spectral_mlp" in build_model_card(METRICS, adapter_config=adapter).text
    unnamed = table_row(build_model_card(METRICS).text, "What this repo holds")[1]
    assert "the non-backbone modules trained or fitted beside it and the refiner config;" in unnamed
    # A randomly initialised backbone (a demo) is saved beside the adapter, and pushed with it.
    random_init = table_row(build_model_card(METRICS, base_model=None).text, "What this repo holds")[1]
    assert random_init.endswith("; the randomly initialised backbone (`base_model.safetensors`) that the adapter "
                                "was trained on")
    full = table_row(build_model_card(METRICS, library_name="transformers").text, "What this repo holds")[1]
    assert full == "the full refiner weights (`model.safetensors`) and config"


def test_the_card_of_a_trained_demo_folder_says_what_is_in_it(tmp_path):
    from model_cards.push import files_to_upload

    folder = _model_folder(tmp_path / "best")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "backbone_weights": None}))
    (folder / "base_model.safetensors").write_bytes(b"")
    holds = table_row(ModelCard.load(write_model_card(folder)).text, "What this repo holds")[1]
    assert "`base_model.safetensors`" in holds and "base_model.safetensors" in files_to_upload(folder)


def test_write_model_card_reads_the_folder(tmp_path):
    folder = _model_folder(tmp_path / "best")
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    (folder / "training_config.json").write_text(json.dumps({"quantization": "8bit", "max_steps": 200}))
    (folder / "preview.png").write_bytes(b"\x89PNG")
    path = write_model_card(folder, repo_id="me/refiner")
    card = ModelCard.load(path)
    assert path == folder / "README.md" and card.data.base_model == PRITHVI_300M
    assert card.data.library_name == "peft" and len(card.data.eval_results) == 5
    text = card.text
    assert "| `max_steps` | 200 |" in text and "8-bit (LLM.int8" in text
    assert "LoRA r=4, alpha=8, dropout=0.05 on qkv, proj of the last 2 backbone blocks" in text
    assert "embed_dim 1024, depth 24, num_heads 16, patch 1x16x16" in text
    assert "(preview.png)" in text and 'load_trained_model("me/refiner")' in text
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_the_demo_makes_its_test_results_the_record_the_pushed_card_is_made_from(tmp_path):
    """The demo's card reports the held-out test tiles; `stage2-push` makes the card again from `metrics.json`, so
    that file must hold the same results, or the Hub would show the validation split's."""
    from training.demo import record_held_out_results

    folder = _model_folder(tmp_path / "best")
    validation = {**METRICS, "split": "val", "n_tiles": 2, "global_step": 40, "epoch": 5.0, "quantization": "none"}
    (folder / "metrics.json").write_text(json.dumps(validation))  # what the trainer wrote
    test = {**METRICS, "refined": {**METRICS["refined"], "ndvi_rmse": 0.0377}, "n_tiles": 18, "split": "test"}
    record_held_out_results(folder, test)
    assert json.loads((folder / "metrics.json").read_text()) == {**test, "global_step": 40, "epoch": 5.0,
                                                                 "quantization": "none"}
    local = ModelCard.load(folder / "README.md")
    pushed = card_for_folder(folder, repo_id="me/demo")  # what stage2-push commits
    for card in (local, pushed):
        assert "18 tiles of the `test` split" in card.text
        assert "measured with the backbone loaded in full precision (not quantized)." in card.text
        assert {r.metric_type: r.metric_value for r in card.data.eval_results}["ndvi_rmse"] == 0.0377


@pytest.mark.parametrize("recorded, name", [
    ({"input_mode": "synthetic", "degradation": "strong", "dataset_seed": 5},
     "BigEarthNet v2 Sentinel-2 tiles with synthetic opt_v1 (degradation 'strong', dataset seed 5)"),
    ({"input_mode": "stage1", "degradation": None}, "BigEarthNet v2 Sentinel-2 tiles with Stage 1 outputs as opt_v1"),
    ({"input_mode": "identity"}, "BigEarthNet v2 Sentinel-2 tiles with opt_v1 = the target (identity)"),
    # records that do not say: a run of an older release, a dataset built before the presets had names
    ({"input_mode": None}, "BigEarthNet v2 Sentinel-2 tiles with synthetic opt_v1"),
    ({"input_mode": "synthetic", "dataset_seed": 0}, "BigEarthNet v2 Sentinel-2 tiles with synthetic opt_v1"),
])
def test_the_card_names_the_opt_v1_the_model_was_trained_on(recorded, name, tmp_path):
    folder = _model_folder(tmp_path / "best")
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    (folder / "training_config.json").write_text(json.dumps(recorded))
    card = ModelCard.load(write_model_card(folder))
    assert f"\nData: {name}.\n" in card.text
    assert f" split of {name}. " in card.text and card.data.eval_results[0].dataset_name == name
    # a name given by the caller wins
    assert "\nData: my tiles.\n" in card_for_folder(folder, dataset_name="my tiles").text


STRONG_RUN = {"input_mode": "synthetic", "degradation": "strong", "dataset_seed": 5}
STRONG_NAME = "BigEarthNet v2 Sentinel-2 tiles with synthetic opt_v1 (degradation 'strong', dataset seed 5)"
IDENTITY_NAME = "BigEarthNet v2 Sentinel-2 tiles with opt_v1 = the target (identity)"


def test_the_card_names_the_data_the_metrics_were_computed_on(tmp_path):
    folder = _model_folder(tmp_path / "best")
    (folder / "training_config.json").write_text(json.dumps({**STRONG_RUN, "max_steps": 200}))
    # stage2-evaluate on other data (here the target itself as opt_v1): the evaluation is named by its own record,
    # the training data by the training record.
    evaluated = {**METRICS, "data": {"input_mode": "identity", "degradation": None, "dataset_seed": None}}
    (folder / "metrics.json").write_text(json.dumps(evaluated))
    card = ModelCard.load(write_model_card(folder))
    assert f"\nData: {STRONG_NAME}.\n" in card.text
    assert f"12 tiles of the `test` split of {IDENTITY_NAME}. " in card.text
    assert {r.dataset_name for r in card.data.eval_results} == {IDENTITY_NAME}
    assert f" split of {STRONG_NAME}" not in card.text
    # Another draw of the same preset is other data too.
    other_seed = {**METRICS, "data": {**STRONG_RUN, "dataset_seed": 6}}
    assert card_for_folder(folder, metrics=other_seed).data.eval_results[0].dataset_name == STRONG_NAME.replace(
        "seed 5", "seed 6")
    # The data it was trained on (the demo's test split): one name for both, and a caller's name still wins.
    same = {**METRICS, "data": STRONG_RUN}
    assert f" split of {STRONG_NAME}. " in card_for_folder(folder, metrics=same).text
    named = card_for_folder(folder, metrics=same, dataset_name="my tiles")
    assert "\nData: my tiles.\n" in named.text and " split of my tiles. " in named.text
    # ... as does a caller's name of the evaluation data.
    mine = card_for_folder(folder, metrics=evaluated, eval_dataset_name="my test tiles")
    assert " split of my test tiles. " in mine.text and f"\nData: {STRONG_NAME}.\n" in mine.text
    # Metrics that record no data (written by training, or by an older release): the training data's name.
    assert f" split of {STRONG_NAME}. " in card_for_folder(folder, metrics=METRICS).text
    assert validate_metrics(evaluated)["data"] == evaluated["data"]


def test_write_model_card_without_results_or_preview(tmp_path):
    folder = _model_folder(tmp_path / "merged", adapter=False)
    card = ModelCard.load(write_model_card(folder))
    assert card.data.library_name == "transformers" and card.data.eval_results is None
    assert "No evaluation results were recorded" in card.text and "preview.png" not in card.text
    assert not is_placeholder_card(card.content)


def test_bad_metrics_file_is_named_and_nothing_is_written(tmp_path):
    folder = _model_folder(tmp_path / "best")
    (folder / "metrics.json").write_text('{"refined": {"ndvi_rmse": 0.1}')
    with pytest.raises(CardError, match=r"metrics.json: cannot read the evaluation metrics"):
        write_model_card(folder)
    (folder / "metrics.json").write_text(json.dumps({"refined": {"ndvi_rmse": 0.1}}))
    with pytest.raises(CardError, match=r"best/metrics.json: 'refined' lacks"):
        write_model_card(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "config.json", "metrics.json"]
    with pytest.raises(CardError, match="not a folder"):
        write_model_card(tmp_path / "missing")


def test_placeholder_and_generated_cards_are_regenerated_hand_written_ones_are_not():
    peft_card = "# Model Card for Model ID\n\n- **Developed by:** [More Information Needed]"
    generated = str(build_model_card(METRICS))
    assert is_placeholder_card(peft_card) and should_regenerate_card(peft_card)
    assert not is_placeholder_card(generated) and should_regenerate_card(generated)
    hand_edited = "\n".join(line for line in generated.splitlines() if GENERATED_MARKER not in line)
    assert not should_regenerate_card(hand_edited)


def test_dataset_card_from_a_dataset_dict(tmp_path):
    import datasets

    features = datasets.Features({"opt_v1": datasets.Array3D((4, 120, 120), "float32"),
                                  "month": datasets.Value("int64"), "extra": datasets.Value("string")})
    rows = {"opt_v1": [[[[0.0] * 120] * 120] * 4], "month": [7], "extra": ["x"]}
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features),
                               "train": datasets.Dataset.from_dict({k: v * 2 for k, v in rows.items()},
                                                                   features=features)})
    card = build_dataset_card(dd, repo_id="me/tiles", extra_metadata={"configs": [{"config_name": "default"}]})
    assert card.data.task_categories == ["image-to-image"] and card.data.size_categories == ["n<1K"]
    assert card.data.configs == [{"config_name": "default"}] and "sentinel-2" in card.data.tags
    text = card.text
    assert text.index("| train | 2 |") < text.index("| test | 1 |") and "3 tiles" in text
    assert "| `opt_v1` | float32 (4, 120, 120): the image to refine" in text
    # no build record: the card claims no origin for opt_v1
    assert card.data.pretty_name == "Stage 2 refinement tiles (Sentinel-2)" and "`opt_v1` here is" not in text
    assert "a Stage 1 output or a stand-in for one (this dataset does not record which)" in text
    assert "| `extra` | string |" in text and 'load_dataset("me/tiles")' in text

    dd.save_to_disk(str(tmp_path / "ds"))
    assert build_dataset_card(tmp_path / "ds").data.to_dict() == build_dataset_card(dd).data.to_dict()


def test_dataset_card_says_how_opt_v1_was_made(sample_dataset_dir, tmp_path):
    from _data_helpers import make_tile_dir

    from data_builders import build_dataset

    text = build_dataset_card(sample_dataset_dir).text
    assert ("\n`opt_v1` here is `target` degraded by `data_builders.degrade` (`input_mode` synthetic; preset 'mild', "
            "dataset seed 0): it stands in for a Stage 1 output and is not one.\n") in text
    card = build_dataset_card(sample_dataset_dir)
    assert card.data.pretty_name == "Stage 2 refinement tiles (Sentinel-2, synthetic opt_v1)"
    assert "- `opt_v1` is the target degraded by `data_builders.degrade`, not a Stage 1 output" in card.text
    identity = build_dataset(make_tile_dir(tmp_path / "tiles", per_split=1), tmp_path / "identity",
                             input_mode="identity")
    card = build_dataset_card(identity)
    assert "\n`opt_v1` here is `target` itself (`input_mode` identity)" in card.text
    assert card.data.pretty_name == "Stage 2 refinement tiles (Sentinel-2, opt_v1 = target)"
    assert "- `opt_v1` is the target itself: there is nothing to refine" in card.text
    assert not any(word in card.text for word in ("synthetic", "Stage 1 made", "generated from SAR"))
    # an info mapping, or a DatasetDict made another way, has no build record to tell
    assert "`opt_v1` here is" not in build_dataset_card({"splits": {"train": 2}}).text


def test_dataset_card_from_info_and_its_errors(hub_server):
    card = build_dataset_card({"splits": {"train": 12_000, "val": 500}})
    assert card.data.size_categories == ["10K<n<100K"]
    card.validate()
    with pytest.raises(CardError, match="'splits' must map split name"):
        build_dataset_card({"splits": {"train": -1}})
    with pytest.raises(CardError, match="not a saved dataset folder"):
        build_dataset_card("/nonexistent/ds")
    with pytest.raises(CardError, match="expected a DatasetDict"):
        build_dataset_card(42)


# ------------------------------------------------------------------------------------ stage2-push
@pytest.fixture(scope="module")
def loadable_adapter(tmp_path_factory) -> Path:
    """A tiny adapter folder the loaders accept, for tests that push: `stage2-push` refuses what `load_trained_model`
    would (`model_cards.push.refuse_what_loaders_refuse`)."""
    from _refiner_helpers import save_woken_adapter

    return save_woken_adapter(tmp_path_factory.mktemp("loadable") / "adapter")


def _loadable(adapter: Path, folder: Path) -> Path:
    """A copy of the `loadable_adapter` with metrics, in `folder`."""
    import shutil

    shutil.copytree(adapter, folder)
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    return folder


def _pushable(folder: Path) -> Path:
    """A model folder as `stage2-push` selects its files (the adapter's bytes are not a loadable adapter: a push
    refuses it, see `_loadable`)."""
    _model_folder(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"adapter")
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    return folder


def _dead_pid() -> int:
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_push_leaves_out_what_an_interrupted_write_left(tmp_path):
    """A killed `atomic_file` / `staged_folder` leaves hidden partial files and staging folders that match the upload
    patterns (`.metrics.json.partial-PID-X.json`): none of them is part of the model."""
    from model_cards.push import files_to_upload

    folder = _pushable(tmp_path / "model")
    (folder / ".metrics.json.partial-7-0123abcd.json").write_text('{"refined": ')
    (folder / ".adapter_model.safetensors.partial-7-0123abcd.safetensors").write_bytes(b"half")
    (folder / ".best.tmp-7-0123abcd").mkdir()
    (folder / ".best.tmp-7-0123abcd" / "adapter_model.safetensors").write_bytes(b"half")
    assert sorted(files_to_upload(folder)) == ["adapter_config.json", "adapter_model.safetensors", "config.json",
                                               "metrics.json"]


def test_push_refuses_a_checkpoint_an_interrupted_save_tore(hub_server, tmp_path, capsys):
    from model_cards.push import find_model_folder, main
    from training.trainer import CHECKPOINT_COMPLETE_NAME, checkpoint_marker

    checkpoint = _pushable(tmp_path / "run" / "checkpoint-40")  # no completion marker: torn
    assert main([str(checkpoint), "torn", "--endpoint", hub_server.url]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"stage2-push: error: {checkpoint}: the checkpoint is incomplete (no valid {CHECKPOINT_COMPLETE_NAME}; it was "
        "torn by an interrupted save); push the run's best/ or a complete checkpoint instead"]
    assert hub_server.repos == {}
    (checkpoint / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps(checkpoint_marker(checkpoint, 40)))
    assert find_model_folder(checkpoint) == (checkpoint, "adapter")
    (checkpoint / "adapter_model.safetensors").write_bytes(b"adapt")  # truncated after the marker was written
    with pytest.raises(CardError, match="adapter_model.safetensors has 5 bytes, checkpoint_complete.json records 7"):
        find_model_folder(checkpoint)


def test_push_finds_the_best_model_a_killed_save_set_aside(tmp_path):
    """A run killed between the two renames of its `best/` save has no `best/`, only `.best.previous-PID-X`: the push
    puts it back (as training does) rather than pushing the run's root or finding no model."""
    from model_cards.push import find_model_folder
    from modeling_stage2._files import SET_ASIDE_MARKER

    run = tmp_path / "run"
    _pushable(run / f".best{SET_ASIDE_MARKER}{_dead_pid()}-0123abcd")
    assert find_model_folder(run) == (run / "best", "adapter")
    assert (run / "best" / "adapter_model.safetensors").read_bytes() == b"adapter"


def test_push_without_private_leaves_the_visibility_to_the_namespace(hub_server, tmp_path, monkeypatch,
                                                                      loadable_adapter):
    """`private=False` would make `create_repo` ask for a public repo, overriding an organisation whose repos are
    private by default; only `--private` is sent."""
    import datasets
    from huggingface_hub import HfApi

    from model_cards.push import push_dataset, push_trained_model

    asked = []
    create_repo = HfApi.create_repo
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *args, **kwargs: (
        asked.append((kwargs.get("repo_type"), kwargs.get("private"))), create_repo(self, *args, **kwargs))[1])
    folder = _loadable(loadable_adapter, tmp_path / "model")
    push_trained_model(folder, "default-visibility")
    push_trained_model(folder, "asked-private", private=True)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"month": [1, 2]})}).save_to_disk(str(tmp_path / "ds"))
    push_dataset(tmp_path / "ds", "default-tiles")
    assert asked == [("model", None), ("model", True), ("dataset", None)]
    assert HfApi().repo_info(f"{hub_server.user}/asked-private").private is True


def test_a_push_the_hub_refuses_is_one_line_and_exit_status_1(hub_server, tmp_path, capsys, loadable_adapter):
    from model_cards.push import main

    folder = _loadable(loadable_adapter, tmp_path / "model")
    assert main([str(folder), "refused", "--endpoint", hub_server.url, "--token", "not-the-token"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("stage2-push: error: ") and "401" in line and "Invalid credentials" in line


def test_a_push_without_a_token_is_a_user_error_before_anything_is_created(hub_server, tmp_path, capsys,
                                                                          monkeypatch, loadable_adapter):
    """It was the Hub's 401 (exit status 1, a refusal), after a --dataset had been looked at."""
    from model_cards.push import main

    monkeypatch.delenv("HF_TOKEN")
    folder = _loadable(loadable_adapter, tmp_path / "model")
    assert main([str(folder), "tokenless", "--endpoint", hub_server.url]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "stage2-push: error: no Hub token to push with: pass --token, set HF_TOKEN, or log in (hf auth login)"]
    assert hub_server.repos == {}
    assert main([str(folder), "tokenless", "--endpoint", hub_server.url, "--token", hub_server.token]) == 0


def test_a_push_replaces_the_packages_code_and_keeps_the_owners(hub_server, tmp_path, loadable_adapter):
    """An earlier `--include_code` push's modules go with the model they came with; other code in the repo (an
    Inference Endpoints `handler.py`) is the owner's and stays."""
    from huggingface_hub import HfApi

    from model_cards.push import push_trained_model

    repo = f"{hub_server.user}/with-handler"
    api = HfApi()
    api.create_repo(repo)
    for name in ("modeling_stage2.py", "handler.py"):
        api.upload_file(path_or_fileobj=b"# code\n", path_in_repo=name, repo_id=repo)
    push_trained_model(_loadable(loadable_adapter, tmp_path / "model"), repo)
    files = set(api.list_repo_files(repo))
    assert "handler.py" in files and "modeling_stage2.py" not in files


def test_the_base_of_an_adapter_trained_on_a_refiner_repo_is_that_refiner(tmp_path):
    """`build_trainable_model("me/refiner-full")`: the adapter goes onto that refiner (its head and colour parts
    included), which `load_trained_model` fetches; its config still names the backbone it was built on."""
    folder = _model_folder(tmp_path / "best")
    (folder / "stage2_base.json").write_text(json.dumps(
        {"kind": "model", "model_name_or_path": "me/refiner-full", "revision": "0" * 40}))
    card = ModelCard.load(write_model_card(folder, repo_id="me/adapter"))
    assert (card.data.base_model, card.data.to_dict()["base_model_relation"]) == ("me/refiner-full", "adapter")
    assert table_row(card.text, "Base model")[1] == ("[me/refiner-full](https://huggingface.co/me/refiner-full) "
                                                     "(the Stage 2 refiner this adapter was trained on, frozen)")
    assert "the frozen base comes from me/refiner-full" in card.text and PRITHVI_300M not in card.text
    # an adapter on a backbone: the backbone's repo, as before
    (folder / "stage2_base.json").write_text(json.dumps({"kind": "backbone_weights"}))
    assert "(pretrained backbone, frozen)" in ModelCard.load(write_model_card(folder)).text


def test_results_on_other_data_do_not_name_the_training_datasets_repo():
    """`model-index` `dataset.type` links the results to a Hub dataset: the training data's repo only for results
    computed on that data."""
    on_stage1 = {**METRICS, "data": {"input_mode": "stage1", "degradation": None, "dataset_seed": None}}
    card = build_model_card(on_stage1, STRONG_RUN, datasets="me/tiles")
    assert card.data.datasets == ["me/tiles"]
    assert {(r.dataset_type, r.dataset_name) for r in card.data.eval_results} == {
        ("bigearthnet-v2", "BigEarthNet v2 Sentinel-2 tiles with Stage 1 outputs as opt_v1")}
    same = build_model_card({**METRICS, "data": STRONG_RUN}, STRONG_RUN, datasets="me/tiles", dataset_name="tiles")
    assert {(r.dataset_type, r.dataset_name) for r in same.data.eval_results} == {("me/tiles", "tiles")}
