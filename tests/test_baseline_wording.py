"""Sharing and evaluation output: what a model card says about the baselines its metrics hold."""
from __future__ import annotations

from huggingface_hub import ModelCard

from model_cards.cards import build_model_card

REFINED = {"ndvi_rmse": 0.041, "evi_rmse": 0.0612, "sam": 0.07, "identity_l1": 0.03, "edge_l1": 0.025,
           "psnr": 27.5, "ssim": 0.8}
OPT_V1 = {"ndvi_rmse": 0.09, "evi_rmse": 0.11, "sam": 0.15, "identity_l1": 0.0, "edge_l1": 0.0, "psnr": 21.0,
          "ssim": 0.6}
# What training writes to best/metrics.json: its validation records `opt_v1` only, no colour fit.
TRAINING_METRICS = {"refined": REFINED, "opt_v1": OPT_V1, "n_tiles": 18, "split": "val", "global_step": 40,
                    "epoch": 5.0}


def test_a_card_without_the_colour_fit_says_it_was_not_evaluated():
    """The card of a training run's metrics has no colour-fit column: its notes say the colour fit was not evaluated
    (rather than calling both baselines the yardstick and leaving the reader to look for the missing one)."""
    text = ModelCard(str(build_model_card(TRAINING_METRICS))).text
    header = next(line for line in text.splitlines() if line.startswith("| metric |"))
    assert "colour fit" not in header and "18 tiles of the `val` split" in text
    assert "These metrics hold no colour fit (`linear_fit`): it was not evaluated on these tiles" in text
    assert "These are the two baselines" not in text  # it followed a note on the one baseline column shown
    assert "worth using where it beats both `opt_v1` and the colour fit, the two baselines." in text
    fit = {name: value * 0.9 for name, value in OPT_V1.items()}
    with_fit = {**TRAINING_METRICS, "linear_fit": fit, "linear_fit_fitted_on": {"split": "train", "tiles": 18}}
    text = build_model_card(with_fit).text
    assert "colour fit (fitted on `train`, 18 tiles)" in text and "hold no colour fit" not in text
    assert "The colour fit column scores the colour fit" in text
    assert "No evaluation results" in build_model_card(None).text  # no metrics: no note about their baselines
    assert "hold no colour fit" not in build_model_card(None).text


def _table(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows if not row.startswith("| ---")]


def test_a_card_without_opt_v1_scores_has_no_opt_v1_column_and_says_so():
    """Hand-written metrics may hold no `opt_v1` block: the table had an `opt_v1` column of "-" and notes describing
    it. Now the column is left out (every row as wide as the header) and the notes say the input was not scored."""
    fit = {name: value * 0.9 for name, value in OPT_V1.items()}
    metrics = {"refined": REFINED, "linear_fit": fit, "linear_fit_fitted_on": {"split": "train", "tiles": 18},
               "n_tiles": 18, "split": "test"}
    text = build_model_card(metrics).text
    table = _table(text.split("## Evaluation", 1)[1])
    assert table[0] == ["metric", "refined", "colour fit (fitted on `train`, 18 tiles)", "design target",
                        "meets target"]
    assert {len(row) for row in table} == {5} and table[1][:3] == ["NDVI RMSE", "0.041", "0.081"]
    assert "These metrics hold no `opt_v1` scores" in text and "The `opt_v1` column scores" not in text
    assert "hold no colour fit" not in text
    both = build_model_card({**metrics, "opt_v1": OPT_V1}).text
    header = _table(both.split("## Evaluation", 1)[1])[0]
    assert header[:4] == ["metric", "refined", "`opt_v1`", "colour fit (fitted on `train`, 18 tiles)"]
    assert "The `opt_v1` column scores the unrefined input" in both and "hold no `opt_v1` scores" not in both
    neither = build_model_card({"refined": REFINED, "n_tiles": 18, "split": "test"}).text
    assert _table(neither.split("## Evaluation", 1)[1])[0] == ["metric", "refined", "design target", "meets target"]
    assert "hold no `opt_v1` scores" in neither and "hold no colour fit" in neither


def test_evaluate_help_says_quantization_applies_to_full_models_too():
    """`load_trained_model` quantizes a full model's backbone as well (docs/training.md): the flag's help says so."""
    from training.evaluate import build_parser

    action = next(a for a in build_parser()._actions if "--quantization" in a.option_strings)
    assert "or of a full model" in action.help and "adapter" in action.help
