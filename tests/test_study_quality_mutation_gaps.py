"""Behaviour of the quality study (`bench/study_quality.py`, the record behind every quality figure) that plausible
bugs used to get past the suite (a mutation audit): `score` fits the colour fit on the training split alone and scores
the test and validation splits (the bootstrap on the test split only), takes the training spectra and the brightest
training tile from the split the model learnt from, and reports each role's near-black-free NDVI, in-range EVI and
`opt_v1`-kept-out-of-range scores as their definitions say; a training whose demo exits 1 (no baseline beaten) still
counts while one that wrote no results fails naming its command; `main` records each run under its preset and variant
in seed order, scores the mixture on `mild` with its own training spectra, keeps what it trained over a reused record's
runs, and exits 0; the tables' ratios, baselines and verdicts; re-rendering a record without training. No study runs:
the training is faked and `score` reads a six-tile dataset and an untrained tiny model."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from _data_helpers import copy_sample_subset
from _refiner_helpers import tiny_refiner_config, wake_up

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METRICS = ("ndvi_rmse", "evi_rmse", "sam", "psnr", "ssim")


@pytest.fixture(scope="module")
def study_quality(repo_root):
    sys.path.insert(0, str(repo_root))
    from bench import study_quality

    return study_quality


# ----------------------------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def scored_data(sample_tiles_dir, tmp_path_factory):
    """Two datasets of 2 real tiles a split: `own`, whose first test tile is 4x brighter than every training tile and
    whose test targets are near-black in a corner (and not valid in a part of it and a band), and `other`, the same
    with its training tiles 4x brighter (every test tile in range, other training spectra); and a saved untrained tiny
    refiner."""
    import numpy as np
    from datasets import load_from_disk

    from data_builders import build_dataset
    from modeling_stage2.adapters import build_trainable_model, save_trained_model

    root = tmp_path_factory.mktemp("scored")
    build_dataset(copy_sample_subset(sample_tiles_dir, root / "tiles", 2), root / "built", seed=0)
    built = load_from_disk(str(root / "built"))

    def changed(split, change):
        def apply(row, index):
            return change({**row, "opt_v1": np.array(row["opt_v1"]), "target": np.array(row["target"])}, index)

        return built[split].map(apply, with_indices=True, features=built[split].features)

    def test_row(row, index):
        row["target"][2:4, :40, :40] *= 0.02  # red + NIR under NEAR_BLACK in a corner
        row["valid_mask"] = np.array(row["valid_mask"])
        row["valid_mask"][:20, :20] = row["valid_mask"][:, 60:80] = False  # some near-black, some not
        if index == 0:
            row["opt_v1"] = row["opt_v1"] * 4.0
        return row

    def brighter(row, index):
        row["opt_v1"] = row["opt_v1"] * 4.0
        return row

    own = {**built, "test": changed("test", test_row)}
    folders = {"own": root / "own", "other": root / "other"}
    type(built)(own).save_to_disk(str(folders["own"]))
    type(built)({**own, "train": changed("train", brighter)}).save_to_disk(str(folders["other"]))
    model = build_trainable_model(tiny_refiner_config(), quantization="none", print_summary=False)
    wake_up(model)
    return folders, save_trained_model(model.eval(), root / "best"), model


def _spectral_start():
    from training.linear_fit import ColorFitResult

    return ColorFitResult(matrix=torch.eye(4, dtype=torch.float64) * 1.1, bias=torch.full((4,), -0.03,
                          dtype=torch.float64), pixels=1, tiles=1)


@pytest.fixture
def spectral_starts(study_quality, monkeypatch):
    """The spectral fit replaced by a fixed map (its own tests check it); the list of the splits it was given."""
    import training.linear_fit

    given = []
    monkeypatch.setattr(training.linear_fit, "fit_spectral_correction",
                        lambda dataset, **kwargs: given.append((dataset, kwargs)) or _spectral_start())
    study_quality.spectral_fit.cache_clear()
    yield given
    study_quality.spectral_fit.cache_clear()


def _expected(study_quality, model, dataset_dir, trained_on, split):
    """Each role's scores on `split` of `dataset_dir` computed from their definitions, the training spectra and
    tiles from `trained_on`."""
    from datasets import load_from_disk

    from modeling_stage2.configuration_stage2 import OUT_OF_RANGE_RAMP
    from modeling_stage2.modeling_stage2 import keep_opt_v1, out_of_range_weight
    from training.data import model_input_opt_v1
    from training.linear_fit import LinearColorFit
    from training.losses import ndvi
    from training.metrics import evaluate_pair
    from training.spectral_range import OUT_OF_RANGE_QUANTILE, fit_spectral_range

    dataset = load_from_disk(str(dataset_dir))
    rows = dataset[split].with_format("torch")[:]
    train = load_from_disk(str(trained_on))["train"].with_format("torch")[:]
    opt_v1, target, valid = rows["opt_v1"], rows["target"], rows["valid_mask"]
    with torch.no_grad():  # given the invalid pixels filled, as `evaluate_model` gives them (`model_input_opt_v1`)
        refined = model(model_input_opt_v1(opt_v1, valid), rows["month"], rows["biome"]).refined
    quantile, ramp = OUT_OF_RANGE_QUANTILE, OUT_OF_RANGE_RAMP  # training's own rule

    def weight(quantile, ramp):
        fitted = fit_spectral_range(lambda: [(train["opt_v1"], train["valid_mask"])],
                                    model.config.spectral_mlp_log_offset, quantile)
        return out_of_range_weight(fitted.distance(opt_v1, model.config.spectral_mlp_log_offset), fitted.threshold,
                                   ramp)[:, None]

    outputs = {"opt_v1": opt_v1, "linear_fit": LinearColorFit.from_dataset(dataset["train"]).apply(opt_v1),
               "spectral_fit": _spectral_start().apply(opt_v1).clamp(min=0.0), "refined": refined,
               "refined_fallback": keep_opt_v1(refined, opt_v1, weight(quantile, ramp))}
    bright = valid & (target[:, 2] + target[:, 3] >= study_quality.NEAR_BLACK)
    brightness = [(image * mask[:, None]).sum(dim=(1, 2, 3)) / (4 * mask.sum(dim=(1, 2)))
                  for image, mask in ((opt_v1, valid), (train["opt_v1"], train["valid_mask"]))]
    in_range = brightness[0] <= brightness[1].max()
    expected = {}
    for role, output in outputs.items():
        expected[role] = {m: evaluate_pair(output, target, opt_v1, valid)["refined"][m] for m in METRICS}
        expected[role]["ndvi_rmse_bright"] = float((ndvi(output) - ndvi(target))[bright].pow(2).mean().sqrt())
        expected[role]["evi_rmse_in_range"] = None if not in_range.any() else evaluate_pair(
            output[in_range], target[in_range], opt_v1[in_range], valid[in_range])["refined"]["evi_rmse"]
    expected["bright_fraction"] = float(bright.sum() / valid.sum())
    expected["out_of_range_fraction"] = float(((weight(quantile, ramp)[:, 0] > 0) & valid).sum() / valid.sum())
    expected["sensitivity"] = {f"{q}/{r}": evaluate_pair(keep_opt_v1(refined, opt_v1, weight(q, r)), target, opt_v1,
                                                         valid)["refined"]["evi_rmse"]
                               for q, r in study_quality.SENSITIVITY}
    return expected, in_range


def _assert_scores(scores, expected) -> None:
    for role in ("opt_v1", "linear_fit", "spectral_fit", "refined", "refined_fallback"):
        for metric in (*METRICS, "ndvi_rmse_bright", "evi_rmse_in_range"):
            wanted = expected[role][metric]
            # SSIM near 0 and float32 sums taken in other batches: an absolute floor too
            assert scores[role][metric] == (None if wanted is None else pytest.approx(wanted, rel=1e-5, abs=1e-6)), \
                (role, metric)
    for key in ("bright_fraction", "out_of_range_fraction"):
        assert scores[key] == pytest.approx(expected[key], rel=1e-6), key


@pytest.mark.parametrize("trained_on", ["own", "other"])
def test_score_fits_the_colour_fit_on_the_training_split_and_scores_test_and_val(study_quality, scored_data,
                                                                                 spectral_starts, trained_on):
    """The baselines are `own`'s (the colour fit and the spectral fit of its training split only); the training
    spectra and tiles are those of the split the model learnt from (`trained_on`): with `other`'s brighter training
    tiles every test tile is in range and other pixels are out of it."""
    from training.bootstrap import DEFAULT_RESAMPLES

    folders, model_dir, model = scored_data
    scored = study_quality.score(model_dir, folders["own"],
                                 trained_on=None if trained_on == "own" else folders[trained_on])
    for split in ("test", "val"):
        expected, _ = _expected(study_quality, model, folders["own"], folders[trained_on], split)
        _assert_scores(scored[split], expected)
        assert scored[split]["n_tiles"] == 2
    (fitted_on, arguments), = spectral_starts
    assert arguments == {}  # the default model's start: seed 0, its defaults
    assert sorted(fitted_on["tile_id"]) == sorted(_split_ids(folders["own"], "train"))
    assert scored["test"]["bootstrap"]["resamples"] == DEFAULT_RESAMPLES and "bootstrap" not in scored["val"]
    assert set(scored["test"]["fallback_sensitivity"]) == {f"{q}/{r}" for q, r in study_quality.SENSITIVITY}
    expected, in_range = _expected(study_quality, model, folders["own"], folders[trained_on], "test")
    assert sorted(in_range.tolist()) == ([True, True] if trained_on == "other" else [False, True])  # tells them apart
    for key, evi in expected["sensitivity"].items():
        assert scored["test"]["fallback_sensitivity"][key]["evi_rmse"] == pytest.approx(evi, rel=1e-5), key
    assert "fallback_sensitivity" not in scored["val"]


def _split_ids(folder, split) -> list:
    from datasets import load_from_disk

    return load_from_disk(str(folder))[split]["tile_id"]


# ---------------------------------------------------------------------------------------------------- training
class _Finished:
    returncode, stderr = 1, "demo: the refined output did not beat the colour fit\n"


def test_a_demo_that_exits_1_with_its_results_counts_and_one_without_fails_naming_its_command(study_quality,
                                                                                            monkeypatch, tmp_path):
    """Exit 1 only says the demo beat no baseline: its best model is scored. A demo that wrote no results raises
    with its command and the end of its stderr. Every training runs on one thread, in a folder of its own."""
    calls = []

    def finished(command, **kwargs):
        calls.append((command, kwargs))
        output = tmp_path / command[command.index("--output_dir") + 1]
        output.mkdir(parents=True)
        (output / "demo_results.json").write_text("{}")
        return _Finished()

    monkeypatch.setattr(study_quality.subprocess, "run", finished)
    best = study_quality.train("strong", 1, "per_tile", tmp_path, tag="-short")
    assert best == tmp_path / "strong-per_tile-short-seed1" / "best"
    (command, kwargs), = calls
    assert command[command.index("--seed") + 1] == "1"
    assert command[-len(study_quality.VARIANT_FLAGS["per_tile"]):] == study_quality.VARIANT_FLAGS["per_tile"]
    assert kwargs["env"]["OMP_NUM_THREADS"] == "1" and kwargs["env"]["MKL_NUM_THREADS"] == "1"
    assert kwargs["cwd"] == study_quality.REPO

    monkeypatch.setattr(study_quality.subprocess, "run", lambda command, **kwargs: _Finished())
    with pytest.raises(RuntimeError, match=r"--output_dir \S*mild-after-seed0 .* failed:\ndemo: the refined output"):
        study_quality.train("mild", 0, "after", tmp_path)


# ---------------------------------------------------------------------------------------------- the whole study
def _scores(value: float) -> dict:
    return {"ndvi_rmse": value, "ndvi_rmse_bright": value, "evi_rmse": value, "evi_rmse_in_range": value,
            "sam": value, "psnr": 30.0, "ssim": 0.9}


def _run(refined: float, fit: float = 0.1, opt_v1: float = 0.2, val_refined: float | None = None) -> dict:
    """One seed's record: every metric of a role at one value (the validation split's refined at `val_refined`)."""
    return {split: {"opt_v1": _scores(opt_v1), "linear_fit": _scores(fit), "spectral_fit": _scores(fit),
                    "refined": _scores(refined if split == "test" or val_refined is None else val_refined),
                    "bright_fraction": 0.9, "n_tiles": 2} for split in ("test", "val")}


def _fake_study(study_quality, monkeypatch, tmp_path) -> dict:
    """The study's datasets, trainings and scores faked: what each was asked ("datasets", "trained", "scored")."""
    asked = {"datasets": [], "trained": [], "scored": []}

    def build_datasets(presets, workdir):
        asked["datasets"].append(list(presets))
        return {preset: tmp_path / f"data-{preset}" for preset in presets}

    def train(preset, seed, variant, workdir):
        asked["trained"].append((preset, seed, variant))
        return tmp_path / f"{preset}-{variant}-seed{seed}" / "best"

    def score(model_dir, dataset_dir, trained_on=None):
        asked["scored"].append((model_dir.parent.name, dataset_dir.name, trained_on and trained_on.name))
        return _run((0.05, 0.06, 0.07)[int(model_dir.parent.name[-1])])  # by seed

    monkeypatch.setattr(study_quality, "build_datasets", build_datasets)
    monkeypatch.setattr(study_quality, "build_mixture_bounds", lambda folders, workdir: {
        name: tmp_path / f"data-{name}" for name in study_quality.MIXTURE_BOUNDS})
    monkeypatch.setattr(study_quality, "train", train)
    monkeypatch.setattr(study_quality, "score", score)
    monkeypatch.setattr(study_quality, "training_tiles", lambda folder: 7)
    return asked


def test_the_record_holds_each_run_by_preset_variant_and_seed_and_keeps_new_runs_over_reused(study_quality,
                                                                                              monkeypatch, tmp_path,
                                                                                              capsys):
    """Runs of the same preset and variant in seed order; the mixture and its bounds scored on `mild` with the
    training spectra of their own sets; a reused record's runs only where nothing was trained now; exit 0."""
    asked = _fake_study(study_quality, monkeypatch, tmp_path)
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"runs": {"mild/after": [_run(0.5)] * 2, "strong/redraw": [_run(0.07)] * 2},
                                   "mixture_on_mild": {"after": [_run(0.5)] * 2, "fallback": [_run(0.08)] * 2},
                                   "seeds": [0, 1]}))
    output = tmp_path / "out" / "quality.md"
    output.parent.mkdir()
    assert study_quality.main(["--presets", "mild", "--variants", "after", "before", "--seeds", "0", "1",
                               "--mixture_bounds", "--jobs", "1", "--reuse", str(earlier),
                               "--output", str(output)]) == 0
    assert asked["datasets"] == [["mild", "mixture", "strong"]]
    record = json.loads(output.with_suffix(".json").read_text())
    assert list(record["runs"]) == ["mild/before", "mild/after", "strong/redraw"]
    assert [run["test"]["refined"]["evi_rmse"] for run in record["runs"]["mild/after"]] == [0.05, 0.06]
    assert [run["test"]["refined"]["evi_rmse"] for run in record["runs"]["mild/before"]] == [0.05, 0.06]
    assert record["runs"]["strong/redraw"] == [_run(0.07)] * 2
    assert list(record["mixture_on_mild"]) == ["after", "fallback"]
    assert [run["test"]["refined"]["evi_rmse"] for run in record["mixture_on_mild"]["after"]] == [0.05, 0.06]
    assert record["mixture_on_mild"]["fallback"] == [_run(0.08)] * 2
    bounds = record[study_quality.BOUNDS_KEY]
    assert list(bounds) == list(study_quality.MIXTURE_BOUNDS)
    assert [[run["train_tiles"] for run in runs] for runs in bounds.values()] == [[7, 7], [7, 7]]
    assert record["seeds"] == [0, 1] and record["near_black"] == study_quality.NEAR_BLACK
    assert ("mild-after-seed1", "data-mild", None) in asked["scored"]
    assert ("mixture-after-seed0", "data-mild", "data-mixture") in asked["scored"]
    assert ("mild_and_strong-after-seed1", "data-mild", "data-mild_and_strong") in asked["scored"]
    printed = capsys.readouterr().out
    assert "mild after seed 0: test refined/fit ndvi_rmse 0.500, evi_rmse 0.500, sam 0.500\n" in printed
    tables = output.read_text()
    assert "Runs of `strong/redraw`, `mixture/fallback` reused" in tables and "; 10 demo trainings, 2 of them" in tables


def test_a_recorded_study_is_rendered_again_without_training(study_quality, monkeypatch, tmp_path):
    """`--presets --no-mixture --reuse <record>` trains nothing and writes the record's runs again: the reused runs
    of every preset, variant, mixture variant and bound (a mixture variant with no runs left out: its row would have
    no mean)."""
    asked = _fake_study(study_quality, monkeypatch, tmp_path)
    recorded = {"runs": {"strong/after": [_run(0.07)], "mild/per_tile": [_run(0.08)], "mild/after": [_run(0.06)]},
                "mixture_on_mild": {"after": [_run(0.09)], "fallback": []}, study_quality.BOUNDS_KEY: {
                    "mild_and_strong": [{**_run(0.1), "train_tiles": 36}]}, "seeds": [4], "near_black": 0.02}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(recorded))
    arguments = ["--presets", "--no-mixture", "--seeds", "4", "--reuse", str(earlier), "--output",
                 str(tmp_path / "quality.md")]
    assert study_quality.planned_jobs(study_quality.parse_args(arguments)) == []
    assert study_quality.main(arguments) == 0
    assert asked["trained"] == [] and asked["scored"] == []
    record = json.loads((tmp_path / "quality.json").read_text())
    assert record == {**recorded, "runs": {key: recorded["runs"][key]
                                           for key in ("mild/per_tile", "mild/after", "strong/after")},
                      "mixture_on_mild": {"after": [_run(0.09)]}}  # a variant without runs is not one
    assert "; 0 demo trainings (" in (tmp_path / "quality.md").read_text()


def test_the_defaults_and_the_script_line_without_presets(study_quality, tmp_path):
    args = study_quality.parse_args(["--presets", "--no-mixture", "--mixture_bounds", "--output",
                                     str(tmp_path / "quality.md")])
    variants = " ".join(study_quality.VARIANT_FLAGS)
    line = f"--presets --seeds 0 1 2 --variants {variants} --no-mixture --mixture_bounds"
    assert study_quality.command_line(args) == line
    assert args.jobs == 2 and args.seeds == [0, 1, 2] and args.earlier is None
    assert study_quality.planned_jobs(args) == [(name, seed, "after") for name in study_quality.MIXTURE_BOUNDS
                                                for seed in (0, 1, 2)]


@pytest.mark.parametrize("folder, message", [("missing", "the folder {tmp}/missing does not exist"),
                                             ("", "quality.json is a folder; give a file path")])
def test_an_output_that_cannot_be_written_exits_2_before_any_work(study_quality, tmp_path, capsys, folder, message):
    """Found after hours of training the record would be lost: `--output` is checked with the arguments."""
    (tmp_path / "quality.json").mkdir()
    with pytest.raises(SystemExit) as exit_status:
        study_quality.parse_args(["--output", str(tmp_path / folder / "quality.md")])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message.replace("{tmp}", str(tmp_path)))


@pytest.mark.parametrize("record, message", [
    ({"runs": {"mild/after/x": []}}, "no 'runs' object of 'preset/variant'"),
    ({"runs": {"mild/after": {}}}, "no 'runs' object of 'preset/variant'"),
    ({"runs": {}, "mixture_on_mild": 3}, "'mixture_on_mild' is neither an object nor a list of runs"),
])
def test_an_earlier_record_that_is_not_this_studys_is_refused(study_quality, tmp_path, record, message):
    (tmp_path / "earlier.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=message):
        study_quality.read_earlier(tmp_path / "earlier.json")


# ------------------------------------------------------------------------------------------------------ tables
def test_the_tables_give_each_seeds_ratio_the_newest_baselines_and_the_test_splits_verdicts(study_quality):
    """Ratios refined / colour fit over seeds (mean (min-max)), '-' for a run that predates a column; the baselines
    of the last variant's runs; the goal counted on the test split (the validation split's refined scores differ)."""
    old = _run(0.05, opt_v1=0.3, val_refined=0.2)
    del old["test"]["refined"]["evi_rmse_in_range"]
    runs = {("mild", "before"): [old, _run(0.1, opt_v1=0.3, val_refined=0.2)],
            ("mild", "after"): [_run(0.08, val_refined=0.2), _run(0.09, val_refined=0.01)]}
    text = study_quality.render(runs, {}, [0, 1], 60.0, "0.0")
    test = text.split("## mild: test split")[1].split("## mild: val split")[0]
    assert "| opt_v1 | 0.2000 | 0.2000 | 0.2000 | 0.2000 | 0.2000 | 30.00 | 0.9000 |" in test
    assert "| refined / colour fit, before | 0.75 (0.50-1.00) | 0.75 (0.50-1.00) | 0.75 (0.50-1.00) | - | " in test
    assert "| refined / colour fit, after | 0.85 (0.80-0.90) |" in test
    assert "- `after`: 2 of 2 seeds beat the colour fit" in test and "- `before`: 1 of 2 seeds" in test
    assert "| refined, after | 0.0850 (0.0800-0.0900) |" in test
    assert "| refined, after | 0.1050 (0.0100-0.2000) |" in text.split("## mild: val split")[1]
    bounds = {"mixture_mild_tiles": [{**_run(0.1), "train_tiles": 8}, {**_run(0.1), "train_tiles": 9}]}
    assert "are the ? of 18 training tiles" in study_quality.render(runs, {}, [0, 1], 60.0, "0.0", bounds=bounds)


def test_a_variant_shown_with_opt_v1_kept_out_of_range_only_where_each_of_its_runs_recorded_it(study_quality):
    """A reused run that predates `refined_fallback` beside a new one that has it: no such row (a mean over some
    seeds only would read as all of them)."""
    new = _run(0.08)
    for split in ("test", "val"):
        new[split]["refined_fallback"] = _scores(0.07)
    text = study_quality.render({("mild", "after"): [_run(0.09), new]}, {}, [0, 1], 60.0, "0.0")
    assert "| refined, after | 0.0850 (0.0800-0.0900) |" in text and "| refined, after, opt_v1 out of range" not in text


def test_the_mixture_is_scored_on_mild_tiles_when_mild_is_not_trained(study_quality, monkeypatch, tmp_path):
    """`--presets strong` with the mixture: the `mild` dataset is built all the same (the mixture's test split)."""
    asked = _fake_study(study_quality, monkeypatch, tmp_path)
    assert study_quality.main(["--presets", "strong", "--variants", "after", "--seeds", "0", "--output",
                               str(tmp_path / "quality.md")]) == 0
    assert asked["datasets"] == [["mild", "mixture", "strong"]]
    assert asked["scored"] == [("strong-after-seed0", "data-strong", None),
                               ("mixture-after-seed0", "data-mild", "data-mixture")]
