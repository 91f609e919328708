"""Gaps a mutation audit of model_cards/cards.py, model_cards/push.py, training/evaluate.py and
inference_stage2/windows.py found: each test fails under a plausible bug that the other tests let pass."""
from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import numpy as np
import pytest

from _refiner_helpers import ScaledRefiner
from _training_helpers import tile_rows
from model_cards.cards import CardError, build_dataset_card, build_model_card, card_for_folder, validate_metrics
from test_model_cards import METRICS, table_row

# ----------------------------------------------------------------------------- metrics files
def test_a_boolean_tile_count_is_refused():
    """`True` is an int to Python: a metrics file saying `"n_tiles": true` must not become a card claiming 1 tile."""
    with pytest.raises(CardError, match=r"^m.json: 'n_tiles' must be a positive integer, got True$"):
        validate_metrics({**METRICS, "n_tiles": True}, source="m.json")


def test_metrics_without_a_tile_count_claim_none():
    text = build_model_card({key: value for key, value in METRICS.items() if key != "n_tiles"}).text
    assert "the tiles of the `test` split" in text and "1 tiles" not in text


# ----------------------------------------------------------------------------- the table's numbers
def test_a_value_exactly_at_the_target_does_not_meet_it():
    """The target reads "< 0.05": 0.05 itself is not below it."""
    metrics = {**METRICS, "refined": {**METRICS["refined"], "ndvi_rmse": 0.05, "sam": 0.1}}
    text = build_model_card(metrics).text
    assert table_row(text, "NDVI RMSE") == ["NDVI RMSE", "0.05", "0.09", "< 0.05", "no"]
    assert table_row(text, "SAM (rad)") == ["SAM (rad)", "0.1", "0.15", "< 0.1", "no"]


def test_the_target_rule_adds_only_the_digits_it_takes():
    """0.0499961234 beside "< 0.05" needs 5 digits ("0.049996"), not its whole repr."""
    metrics = {**METRICS, "refined": {**METRICS["refined"], "ndvi_rmse": 0.0499961234}}
    assert table_row(build_model_card(metrics).text, "NDVI RMSE")[1:5] == ["0.049996", "0.09", "< 0.05", "yes"]


# ----------------------------------------------------------------------------- backbone precision
@pytest.mark.parametrize("saved, words", [
    ({"load_in_8bit": True}, "8-bit (LLM.int8, bitsandbytes) during training"),
    ({"load_in_4bit": True}, "4-bit NF4 (bitsandbytes) during training"),
])
def test_the_precision_row_follows_the_configs_quantization_config(saved, words):
    text = build_model_card(METRICS, model_config={"quantization_config": saved}).text
    assert table_row(text, "Backbone precision") == ["Backbone precision", words]


def test_a_folder_without_a_training_record_takes_the_precision_from_its_base_description(tmp_path):
    """`stage2_base.json` records the quantization the adapter was trained with; the card of a folder that holds no
    `training_config.json` states it rather than "chosen at load time"."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "stage2_refiner", "backbone_weights": None}))
    (tmp_path / "stage2_base.json").write_text(json.dumps({"kind": "saved", "trained_quantization": "4bit"}))
    text = card_for_folder(tmp_path).text
    assert table_row(text, "Backbone precision") == ["Backbone precision", "4-bit NF4 (bitsandbytes) during training"]


# ----------------------------------------------------------------------------- dataset cards
@pytest.mark.parametrize("rows, category", [(999, "n<1K"), (1_000, "1K<n<10K"), (9_999, "1K<n<10K"),
                                            (10_000, "10K<n<100K"), (1_000_000, "1M<n<10M")])
def test_dataset_size_category_boundaries(rows, category):
    assert build_dataset_card({"splits": {"train": rows}}).data.size_categories == [category]


def test_a_license_in_the_extra_metadata_does_not_override_the_license_argument():
    card = build_dataset_card({"splits": {"train": 2}}, license="cc-by-4.0",
                              extra_metadata={"license": "mit", "configs": [{"config_name": "default"}]})
    assert card.data.license == "cc-by-4.0" and card.data.configs == [{"config_name": "default"}]


def test_the_dataset_card_names_the_recorded_dataset_seed(monkeypatch):
    import data_builders.build

    monkeypatch.setattr(data_builders.build, "recorded_opt_v1",
                        lambda dataset: {"input_mode": "synthetic", "degradation": "strong", "dataset_seed": 7})
    text = build_dataset_card(tile_rows(1, seed=0)).text
    assert ("`opt_v1` here is `target` degraded by `data_builders.degrade` (`input_mode` synthetic; preset 'strong', "
            "dataset seed 7): it stands in for a Stage 1 output and is not one.") in text


# ----------------------------------------------------------------------------- scene windows
def test_a_window_stride_that_divides_the_scene_gives_no_duplicate_last_window():
    """300 px in 120 px windows with 30 px overlap: the stride (90) lands the third window on the scene's end."""
    from inference_stage2.windows import window_starts

    assert window_starts(300, 120, 30) == [0, 90, 180]
    assert window_starts(240, 120, 0) == [0, 120]


def test_a_ramp_longer_than_half_the_window_is_cut_to_half():
    """An overlap between half the window and the window (allowed: overlap < window) ramps over half from each end,
    symmetric, rising to 1 in the middle."""
    from inference_stage2.windows import blend_ramp

    ramp = blend_ramp(10, 8)
    np.testing.assert_array_equal(ramp, blend_ramp(10, 5))
    np.testing.assert_array_equal(ramp, ramp[::-1])
    assert (np.diff(ramp[:5]) > 0).all() and ramp[4] == ramp[5] < 1


def test_popped_weights_are_those_of_the_rows_handed_out():
    from inference_stage2.windows import StripAccumulator

    accumulator = StripAccumulator(bands=1, rows=4, width=1)
    row_weights = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    accumulator.add(0, 0, np.full((1, 4, 1), 6.0, np.float32), row_weights)
    blended, weights = accumulator.pop(2)
    np.testing.assert_array_equal(weights, [[1.0], [2.0]])
    np.testing.assert_allclose(blended, 6.0)
    _, rest = accumulator.pop(4)
    np.testing.assert_array_equal(rest, [[3.0], [4.0]])


# ----------------------------------------------------------------------------- stage2-evaluate


def _half_valid_rows(n: int, seed: int):
    """Tiles whose right half is invalid, with a target there (10x the reflectance) that would swamp any metric."""
    rows = tile_rows(n, seed).with_format("numpy")[:]
    rows["valid_mask"][:, :, 60:] = False
    rows["target"][:, :, :, 60:] *= 10
    return datasets.Dataset.from_dict(rows).with_format("numpy")


def test_evaluate_model_scores_refined_and_colour_fit_on_the_valid_pixels_only():
    from training.evaluate import evaluate_model, fit_color_baseline
    from training.metrics import evaluate_pair

    fit = fit_color_baseline(datasets.DatasetDict({"train": tile_rows(4, seed=0)}))
    evaluated = _half_valid_rows(3, seed=1)
    results = evaluate_model(ScaledRefiner(0.97), evaluated, batch_size=2, progress=False, color_fit=fit, split="val")
    assert results["n_tiles"] == 3 and results["split"] == "val"
    assert results["linear_fit_fitted_on"] == {"split": "train", "tiles": 4}
    rows = evaluated.with_format("torch")[:]
    valid = rows["valid_mask"]
    expected = evaluate_pair(rows["opt_v1"] * 0.97, rows["target"], rows["opt_v1"], valid)
    fitted = evaluate_pair(fit.apply(rows["opt_v1"]), rows["target"], rows["opt_v1"], valid)["refined"]
    for name in ("ndvi_rmse", "evi_rmse", "sam", "identity_l1", "edge_l1", "psnr", "ssim"):
        assert results["refined"][name] == pytest.approx(expected["refined"][name], rel=1e-5), name
        assert results["opt_v1"][name] == pytest.approx(expected["opt_v1"][name], rel=1e-5, abs=1e-12), name
        assert results["linear_fit"][name] == pytest.approx(fitted[name], rel=1e-5), name
    # sanity of the setup: the invalid half would change the scores
    assert evaluate_pair(rows["opt_v1"] * 0.97, rows["target"], rows["opt_v1"])["refined"]["ndvi_rmse"] != (
        pytest.approx(results["refined"]["ndvi_rmse"], rel=1e-3))


def test_an_empty_train_split_gives_no_colour_fit():
    from training.evaluate import fit_color_baseline

    assert fit_color_baseline(datasets.DatasetDict({"train": tile_rows(2, seed=0).select([])})) is None
    assert fit_color_baseline(datasets.DatasetDict({"val": tile_rows(2, seed=0)})) is None


def test_max_samples_evaluates_exactly_that_many_tiles():
    from training.evaluate import load_split

    dataset_dict = datasets.DatasetDict({"val": tile_rows(5, seed=0)})
    assert len(load_split("d", "val", max_samples=3, dataset_dict=dataset_dict)) == 3
    assert len(load_split("d", "val", max_samples=9, dataset_dict=dataset_dict)) == 5
    with pytest.raises(ValueError, match=r"^d: split 'val' is empty\.$"):
        load_split("d", "val", dataset_dict=datasets.DatasetDict({"val": tile_rows(2, seed=0).select([])}))


# ----------------------------------------------------------------------------- stage2-push
def test_a_private_push_to_a_repo_already_private_changes_nothing_and_warns_nothing(caplog):
    from model_cards.push import _make_private

    calls = []
    api = SimpleNamespace(repo_info=lambda repo_id, repo_type: SimpleNamespace(private=True),
                          update_repo_settings=lambda *args, **kwargs: calls.append((args, kwargs)))
    with caplog.at_level("WARNING", logger="model_cards.push"):
        _make_private(api, "me/refiner")
    assert calls == [] and caplog.records == []
