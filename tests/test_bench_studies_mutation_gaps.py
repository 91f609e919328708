"""Behaviour of the studies behind the quality and design figures that plausible bugs used to get past the suite (a
mutation audit of `bench/study_tile_conditioning.py`, `study_tile_fallback.py`, `study_mixture_label.py`,
`study_training_tiles.py`, `study_correction_bounds.py`, `study_loss_weight.py`, `study_rotation.py`,
`study_machines.py`, `bench/_after_runs.py` and the held-out generator `bench/stage1_proxy.py`): each study scores the
test split (not the validation split) of the dataset it is told, against baselines fitted on the training tiles it is
told (the colour fit of the set, as it comes; the spectral fit clamped at 0, with its steps and seed), a correction on
top of the affine fit and clamped at 0, bright tiles counted against the training split; the tile-conditioning study
records each dataset scored on its own test set, by variant, in seed order; the mixture's corrections fitted on their
own tiles, told `mild` when scored, the preset classifier scored on the test split; the training-tiles study's set
baselines, per-set ratios and the mixture's verdict when it is better; the tile fallback's seeds and tiles; the
loss-weight study's PSNR columns only where every run has them; the machines study's runs beside their own seed's
record and its seed check; the after-runs' demo flags, run folders and training counts; the proxy generator's output
(known values on a bundled tile), its determinism, its donor tiles of the same split, its masked pixels and its style
spread 0. Mutations a later audit ran: the kernel colour fit's leave-one-tile-out losses and its tie going to the
smoother fit, and its change added to the spectral fit (not to the colour fit); the machines study's runs in the
order of the seeds given (the after-runs' trainings keep it); the after-runs' two trainings at a time by default. No
study runs: the fits and trainings are faked, and the scoring reads a six-tile dataset."""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from _data_helpers import copy_sample_subset
from _refiner_helpers import ScaledRefiner
from _training_helpers import fake_demo_runs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECTRAL = ("ndvi_rmse", "evi_rmse", "sam")
MACHINE = {"cpu": "a CPU", "cpu_capability": "AVX2", "torch": "2"}


@pytest.fixture(scope="module")
def bench(repo_root):
    """`bench(name)`: the module `bench/<name>.py`."""
    import importlib

    sys.path.insert(0, str(repo_root))
    return lambda name: importlib.import_module(f"bench.{name}")


@pytest.fixture(scope="module")
def datasets(sample_tiles_dir, tmp_path_factory):
    """Two datasets of 2 real tiles a split: `own`, whose validation tiles are 8x brighter (than every test tile: read
    against them, no test tile is out of range; its second test tile, cloud, is brighter than every training tile),
    and `other`, the same with its training tiles' `opt_v1` 4x brighter and 0.05 more (another colour fit, one with
    a negative offset: it takes dark pixels below 0)."""
    import numpy as np
    from datasets import load_from_disk

    from data_builders import build_dataset

    root = tmp_path_factory.mktemp("studies")
    build_dataset(copy_sample_subset(sample_tiles_dir, root / "tiles", 2), root / "built", seed=0)
    built = load_from_disk(str(root / "built"))

    def changed(split, gain, offset=0.0):
        def apply(row):
            return {**row, "opt_v1": np.array(row["opt_v1"]) * gain + offset, "target": np.array(row["target"])}

        return built[split].map(apply, features=built[split].features)

    own = {**built, "val": changed("val", 8.0)}
    folders = {"own": root / "own", "other": root / "other"}
    type(built)(own).save_to_disk(str(folders["own"]))
    type(built)({**own, "train": changed("train", 4.0, 0.05)}).save_to_disk(str(folders["other"]))
    return folders


def _split(folder, split="train"):
    from datasets import load_from_disk

    return load_from_disk(str(folder))[split]


def _rows(folder, split="test"):
    rows = _split(folder, split).with_format("torch")[:]
    return rows["opt_v1"].float(), rows["target"].float(), rows["valid_mask"]


def _scores(output, rows) -> dict:
    """The goal's metrics of `output` against the rows' target (`training.metrics`)."""
    from training.metrics import evaluate_pair

    opt_v1, target, valid = rows
    scores = evaluate_pair(output.float(), target, opt_v1, valid)["refined"]
    return {metric: scores[metric] for metric in SPECTRAL}


def _metric(value: float) -> dict:
    return {metric: value for metric in SPECTRAL}


def _fixed_fit():
    """A spectral fit that darkens the darkest pixels below 0 (so that a clamp shows)."""
    from training.linear_fit import ColorFitResult

    return ColorFitResult(matrix=torch.eye(4, dtype=torch.float64) * 1.1, bias=torch.full((4,), -0.05,
                          dtype=torch.float64), pixels=1, tiles=1)


@pytest.fixture
def spectral_fits(monkeypatch):
    """`training.linear_fit.fit_spectral_correction` replaced by `_fixed_fit` (its own tests check the fit): the list
    of (tile ids, keyword arguments) it was given."""
    import training.linear_fit

    given = []
    monkeypatch.setattr(training.linear_fit, "fit_spectral_correction",
                        lambda dataset, **kwargs: given.append((list(dataset["tile_id"]), kwargs)) or _fixed_fit())
    return given


# ------------------------------------------------------------------------------------------- tile conditioning
def test_tile_conditioning_baselines_are_the_training_sets_fits_on_the_test_split_it_is_scored_on(bench, datasets,
                                                                                                 spectral_fits):
    """`baselines(other, own)`: `other`'s training tiles fit the colour fit and the spectral fit (clamped at 0, with
    the study's steps); `own`'s test split (not its 8x validation split) is scored."""
    from training.linear_fit import LinearColorFit

    study = bench("study_tile_conditioning")
    train, rows = _split(datasets["other"]), _rows(datasets["own"])
    scored = study.baselines(datasets["other"], datasets["own"], steps=7)
    assert bool((_fixed_fit().apply(rows[0]) < 0).any())  # the clamp shows
    expected = {"opt_v1": rows[0], "colour fit": LinearColorFit.from_dataset(train).apply(rows[0]),
                "spectral fit": _fixed_fit().apply(rows[0]).clamp(min=0.0)}
    for name, output in expected.items():
        assert scored[name] == pytest.approx(_scores(output, rows), rel=1e-6), name
    assert spectral_fits == [(train["tile_id"], {"steps": 7})]


def test_tile_conditioning_fits_the_correction_on_the_training_split_with_its_seed_on_top_of_the_affine_fit(
        bench, datasets, spectral_fits):
    """The correction (the pixel MLP starts as no correction) is applied on top of the affine fit and clamped at 0,
    as the refiner's output is; the fit gets the training split, the steps and the seed."""
    study = bench("study_tile_conditioning")
    rows = _rows(datasets["own"])
    scored = study.fit_and_score(datasets["other"], datasets["own"], "pixel", 3, 5)
    assert scored == pytest.approx(_scores(_fixed_fit().apply(rows[0]).clamp(min=0.0), rows), rel=1e-5)
    (tile_ids, arguments), = spectral_fits
    assert tile_ids == _split(datasets["other"])["tile_id"]
    assert arguments["steps"] == 5 and arguments["seed"] == 3 and isinstance(arguments["spectral_mlp"], torch.nn.Module)


def test_tile_conditioning_counts_the_goal_and_renders_the_ratios_against_the_colour_fit(bench):
    study = bench("study_tile_conditioning")
    baselines = {"opt_v1": _metric(0.2), "colour fit": _metric(0.1), "spectral fit": _metric(0.05)}
    runs = [_metric(0.08), _metric(0.1)]
    assert study.seeds_meeting_goal(runs, baselines, "mild") == 1  # 0.8 of the colour fit; not of the spectral fit
    record = {"seeds": [0, 1], "steps": 300, "datasets": {"mild": {"scored_on": "mild", "baselines": baselines,
                                                                   "variants": {"pixel": runs}}}}
    text = study.render(record, 60.0, "0.0")
    assert "| opt_v1 | 0.2000 | 0.2000 | 0.2000 | 2.00 | 2.00 | 2.00 | |" in text
    assert "| spectral fit | 0.0500 | 0.0500 | 0.0500 | 0.50 | 0.50 | 0.50 | |" in text
    assert "| pixel | 0.0900 (0.0800-0.1000) | 0.0900 (0.0800-0.1000) | 0.0900 (0.0800-0.1000) | 0.90 (0.80-1.00) | " \
        "0.90 (0.80-1.00) | 0.90 (0.80-1.00) | 1 of 2 |" in text


def test_tile_conditioning_records_each_dataset_scored_on_its_test_set_by_variant_in_seed_order(bench, monkeypatch,
                                                                                              tmp_path):
    """`mixture` is fitted on its own data and scored on `mild`'s test split (built for it); each variant's runs in
    the order of `--seeds`; the steps go to every fit and are recorded."""
    study = bench("study_tile_conditioning")
    asked = {"built": [], "fitted": [], "baselines": []}
    monkeypatch.setattr(study, "ProcessPoolExecutor", ThreadPoolExecutor)  # the fakes below stay in this process
    monkeypatch.setattr(study, "build_datasets", lambda names, workdir: asked["built"].append(list(names)) or {
        name: tmp_path / f"data-{name}" for name in names})

    def fit_and_score(train_dir, test_dir, variant, seed, steps):
        asked["fitted"].append((train_dir.name, test_dir.name, variant, seed, steps))
        return _metric(0.01 * (seed + 1))

    monkeypatch.setattr(study, "fit_and_score", fit_and_score)
    monkeypatch.setattr(study, "baselines", lambda train_dir, test_dir, steps: asked["baselines"].append(
        (train_dir.name, test_dir.name, steps)) or {name: _metric(0.1) for name in study.BASELINES})
    output = tmp_path / "tile_conditioning.md"
    assert study.main(["--datasets", "mixture", "--seeds", "2", "0", "--variants", "pixel", "--steps", "4", "--jobs",
                       "1", "--output", str(output)]) == 0
    assert asked["built"] == [["mild", "mixture"]]
    assert sorted(asked["fitted"]) == [("data-mixture", "data-mild", "pixel", seed, 4) for seed in (0, 2)]
    assert asked["baselines"] == [("data-mixture", "data-mild", 4)]
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["seeds"] == [2, 0] and record["steps"] == 4
    assert record["datasets"]["mixture"]["scored_on"] == "mild"
    assert [run["evi_rmse"] for run in record["datasets"]["mixture"]["variants"]["pixel"]] == [0.03, 0.01]


# ----------------------------------------------------------------------------------------------- tile fallback
def test_tile_fallback_reads_out_of_range_against_the_training_tiles(bench, datasets, monkeypatch):
    """The second test tile is brighter than every training tile (not than the 8x validation tiles): the colour fit
    of the training split replaces the refined output there."""
    import modeling_stage2
    from training.linear_fit import LinearColorFit

    study = bench("study_tile_fallback")
    monkeypatch.setattr(modeling_stage2, "load_trained_model", lambda folder: ScaledRefiner(0.9))
    record = study.score(Path("unused"), datasets["own"])
    test_ids = _split(datasets["own"], "test")["tile_id"]
    assert record["out_of_range_tiles"] == test_ids[1:]
    rows = _rows(datasets["own"])
    fit = LinearColorFit.from_dataset(_split(datasets["own"])).apply(rows[0])
    kept = torch.cat([0.9 * rows[0][:1], fit[1:]])
    assert record["colour fit kept"]["refined"] == pytest.approx(_scores(kept, rows), rel=1e-5)


def test_tile_fallback_counts_every_seeds_goal_and_names_every_seeds_out_of_range_tiles(bench):
    study = bench("study_tile_fallback")

    def run(tiles, refined):
        return {"out_of_range_tiles": tiles, **{variant: {"refined": _metric(refined), "linear_fit": _metric(0.1),
                                                          "opt_v1": _metric(0.2)} for variant in study.VARIANTS}}

    record = {"seeds": [0, 1], "presets": {"mild": [run(["a"], 0.08), run(["b"], 0.09)]}, "machine": MACHINE,
              "demo_flags": []}
    record["summary"] = study.summarise(record)
    assert record["summary"]["mild"]["refined"]["goal"] == 2
    text = study.render(record, 60.0, "0.0")
    assert "## `mild`: 2 test tiles out of range (a, b)" in text and "| 2 of 2 |" in text


# ----------------------------------------------------------------------------------------------- mixture label
def test_mixture_label_fits_each_correction_on_its_own_tiles_and_scores_it_on_mild(bench, monkeypatch):
    study = bench("study_mixture_label")
    calls = []
    monkeypatch.setattr(study, "fit_on_set", lambda data, test, tile_ids, variant, seed, steps: calls.append(
        ("set", data, test, tile_ids, variant, seed, steps)) or {})
    monkeypatch.setattr(study, "fit_told", lambda data, test, tile_ids, seed, steps, start: calls.append(
        ("told", data, test, tile_ids, start, seed, steps)) or {})
    tile_ids = study.sample_pool_ids()[:12]
    mild = study.reference_tiles(tile_ids)
    assert 0 < len(mild) < len(tile_ids)
    folders = {"mild": "M", "strong": "S", "mixture": "X"}
    for name in study.CORRECTIONS:
        study.fit_correction(name, folders, tile_ids, 1, 5)
    assert calls == [("set", "M", "M", tile_ids, "pixel", 1, 5), ("set", "X", "M", tile_ids, "pixel", 1, 5),
                     *[("told", "X", "M", tile_ids, start, 1, 5) for start in ("zero", "own", "own, kept")],
                     ("set", "M", "M", mild, "pixel", 1, 5)]


def test_mixture_label_tells_each_tile_its_preset_and_scores_the_correction_told_mild_clamped(bench, datasets,
                                                                                              monkeypatch):
    from data_builders.degrade import MIXTURE_PRESETS, mixture_choice

    study = bench("study_mixture_label")
    seen = {}

    class Told(torch.nn.Module):
        def forward(self, spectra, preset):
            seen["told"] = preset.tolist()
            return spectra

    def told_correction(tiles, seed, steps, start):
        seen.update(ids=tiles["tile_id"], labels=tiles[study.PRESET_COLUMN], arguments=(seed, steps, start))
        return Told(), _fixed_fit()

    monkeypatch.setattr(study, "told_correction", told_correction)
    tile_ids = [*_split(datasets["own"])["tile_id"], _split(datasets["own"], "val")["tile_id"][0]]
    rows = _rows(datasets["own"])
    scored = study.fit_told(datasets["own"], datasets["own"], tile_ids, 2, 3, "own")
    assert scored == pytest.approx(_scores(_fixed_fit().apply(rows[0]).clamp(min=0.0), rows), rel=1e-6)
    assert sorted(seen["ids"]) == sorted(tile_ids) and seen["arguments"] == (2, 3, "own")
    labels = [MIXTURE_PRESETS.index(mixture_choice(study.DATASET_SEED, tile_id)) for tile_id in seen["ids"]]
    assert seen["labels"] == labels and len(set(labels)) == 2
    assert seen["told"] == [MIXTURE_PRESETS.index("mild")] * 2


def test_mixture_label_classifies_the_presets_on_the_pool_and_scores_the_test_split(bench, monkeypatch):
    study = bench("study_mixture_label")
    asked = []
    counts = {("train", "val"): 6, ("test",): 3}

    def statistics(folder, splits):
        asked.append((folder, tuple(splits)))
        noise = torch.randn(counts[tuple(splits)], 12, generator=torch.Generator().manual_seed(len(asked)))
        return noise + (4.0 if folder == "S" else -4.0)

    monkeypatch.setattr(study, "opt_v1_statistics", statistics)
    scores = study.preset_classification({"mild": "M", "strong": "S"})
    assert sorted(asked) == [("M", ("test",)), ("M", ("train", "val")), ("S", ("test",)), ("S", ("train", "val"))]
    assert scores["pool"]["tiles"] == 12
    assert scores["test"] == {"tiles": 6, "accuracy": 1.0, "mild": "3 of 3", "strong": "3 of 3"}


# ---------------------------------------------------------------------------------------------- training tiles
def test_training_tiles_baselines_are_the_sets_colour_fit_and_the_test_tiles_brighter_than_the_set(bench, datasets):
    from bench._common import in_range_tiles
    from training.linear_fit import LinearColorFit

    """A set of one of `other`'s bright training tiles: its own colour fit (not the pool's); no test tile brighter."""
    study = bench("study_training_tiles")
    train = _split(datasets["other"])
    rows = _rows(datasets["own"])
    result = study.set_baselines(datasets["other"], datasets["own"], train["tile_id"][:1])
    fit = LinearColorFit.from_dataset(train.select([0])).apply(rows[0])
    assert result["colour fit"] == pytest.approx(_scores(fit, rows), rel=1e-6)
    first = train.select([0]).with_format("torch")[:]
    assert not (~in_range_tiles(rows[0], rows[2], first["opt_v1"].float(), first["valid_mask"])).any()
    assert result["out_of_range"] == 0


def test_training_tiles_reads_each_set_against_its_own_colour_fit_and_a_better_mixture_as_within(bench):
    study = bench("study_training_tiles")
    data = {"opt_v1": _metric(0.2), "sizes": {"18": [
        {"colour fit": _metric(0.1), "variants": {"pixel": [_metric(0.08)]}},
        {"colour fit": _metric(0.2), "variants": {"pixel": [_metric(0.09)]}}]}}
    assert [run["linear_fit"]["evi_rmse"] for run in study.runs_of(data, "18", "pixel")] == [0.1, 0.2]
    better = study.evi_comparison([[_metric(0.05), _metric(0.06)]], [[_metric(0.10), _metric(0.11)]])
    assert better["difference"] == pytest.approx(-0.05) and better["within_spread"] is True


# -------------------------------------------------------------------------------------------- correction bounds
def test_correction_bounds_scores_the_colour_fit_as_it_comes_and_clamped_and_counts_bright_tiles(bench, datasets,
                                                                                                 spectral_fits):
    from training.linear_fit import LinearColorFit

    """Fitted on `other`'s training tiles (whose colour fit takes dark pixels below 0, and which no test tile is
    brighter than), scored on `own`'s test split."""
    study = bench("study_correction_bounds")
    result = study.study_dataset(datasets["other"], datasets["own"], steps=3)
    rows = _rows(datasets["own"])
    fit = LinearColorFit.from_dataset(_split(datasets["other"])).apply(rows[0])
    assert bool((fit < 0).any())  # the clamp shows
    expected = {"colour fit": fit, "colour fit, clamped at 0": fit.clamp(min=0.0),
                "spectral fit": _fixed_fit().apply(rows[0]).clamp(min=0.0)}
    for name, output in expected.items():
        assert {m: result["rows"][name][m] for m in SPECTRAL} == pytest.approx(_scores(output, rows), rel=1e-5), name
    assert result["tiles"] == 2 and result["out_of_range_tiles"] == 0
    assert spectral_fits == [(_split(datasets["other"])["tile_id"], {"steps": 3})]


def test_correction_bounds_renders_ratios_to_the_colour_fit_as_it_comes(bench):
    study = bench("study_correction_bounds")
    rows = {name: {**_metric(0.1), "evi_rmse_in_range": None}
            for name in (*study.REFERENCES, *study.BOUNDS, *study.BLIND)}
    rows["opt_v1"] = {**_metric(0.2), "evi_rmse_in_range": 0.2}
    rows["colour fit, clamped at 0"] = {**_metric(0.05), "evi_rmse_in_range": 0.05}
    record = {"steps": 3, "datasets": {"mild": {"tiles": 18, "out_of_range_tiles": 2, "kernel_bandwidth": "inf",
                                                "grey_world_slope": [0.1] * 4, "rows": rows}}}
    text = study.render(record, 60.0, "0.0")
    assert "| opt_v1 | 0.2000 | 0.2000 | 0.2000 | 0.2000 | 2.00 | 2.00 | 2.00 |" in text
    assert "| colour fit, clamped at 0 | 0.0500 | 0.0500 | 0.0500 | 0.0500 | 0.50 | 0.50 | 0.50 |" in text
    assert "| grey world | 0.1000 | 0.1000 | 0.1000 | - | 1.00 | 1.00 | 1.00 |" in text


def _kernel_tiles():
    """(opt_v1, target, valid) of 4 tiles of 4x8x8 reflectance, each with its own gain: tile fits that differ."""
    generator = torch.Generator().manual_seed(0)
    target = 0.1 + 0.3 * torch.rand(4, 4, 8, 8, generator=generator)
    gains = torch.tensor([0.8, 1.0, 1.2, 1.5])[:, None, None, None]
    return target * gains, target, torch.ones(4, 8, 8, dtype=torch.bool)


def test_correction_bounds_kernel_scores_each_tile_left_out_and_a_tie_goes_to_the_smoother_fit(bench):
    """Each bandwidth's loss is that of every training tile corrected by the fit of the others (at an infinite
    bandwidth: the colour fit of the other three); with every loss equal, the smoothest fit (inf) is chosen."""
    import math

    study = bench("study_correction_bounds")
    opt_v1, target, valid = _kernel_tiles()
    outputs = []
    kernel = study.KernelColourFit(opt_v1, target, valid, 0.01,
                                   loss=lambda output, *_: outputs.append(output) or (torch.tensor(0.5),))
    assert kernel.bandwidth == math.inf and len(outputs) == len(study.BANDWIDTHS)
    others = study.weighted_fit(study.tile_fits(opt_v1, target, valid), torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert torch.allclose(outputs[-1][:1], others.apply(opt_v1[:1]).float(), atol=1e-5)


def test_correction_bounds_adds_the_kernel_change_to_the_spectral_fit(bench, datasets, spectral_fits):
    """`spectral fit + kernel change`: the spectral fit (here `_fixed_fit`) plus each tile's kernel fit minus the
    colour fit, clamped at 0 (on the colour fit itself it would be the kernel colour fit's row)."""
    from training.linear_fit import LinearColorFit

    study = bench("study_correction_bounds")
    result = study.study_dataset(datasets["other"], datasets["own"], steps=3)
    train, rows = _rows(datasets["other"], "train"), _rows(datasets["own"])
    kernel = study.KernelColourFit(*train, study.study_refiner_config().spectral_mlp_log_offset)
    changed = kernel.change_on(_fixed_fit(), LinearColorFit.from_dataset(_split(datasets["other"])), rows[0])
    scored = {m: result["rows"]["spectral fit + kernel change"][m] for m in SPECTRAL}
    assert scored == pytest.approx(_scores(changed.clamp(min=0.0), rows), rel=1e-5)
    assert scored != pytest.approx({m: result["rows"]["kernel colour fit"][m] for m in SPECTRAL}, rel=1e-3)


# ---------------------------------------------------------------------------------------------------- loss weight
def test_loss_weight_reads_the_test_tiles_in_range_against_the_training_split(bench, datasets):
    assert bench("study_loss_weight").in_range_test_tiles(datasets["own"]) == [True, False]


def test_loss_weight_gives_psnr_only_where_every_run_recorded_it(bench):
    study = bench("study_loss_weight")
    scored = {"refined": _metric(0.08), "linear_fit": _metric(0.1), "opt_v1": _metric(0.2)}
    reflected = {role: {"psnr": 30.0, "psnr_in_range": 31.0} for role in ("refined", "linear_fit", "opt_v1")}
    record = {"runs": {"1": {"mild": [study.run_record("mild", scored, reflected), study.run_record("mild", scored)]}}}
    summary = study.summarise(record)["1"]["mild"]
    assert summary["seeds_meeting_goal"] == 2 and "refined_psnr" not in summary


# ------------------------------------------------------------------------------------------------------- rotation
def test_the_proxy_goal_is_met_at_exactly_the_colour_fits_scores(bench):
    """"At most 1 against the colour fit": a refined output that scores as the colour fit does (and a tenth of
    `opt_v1`) meets the proxy's goal; the proxy's goal is not the presets' 0.90."""
    study = bench("study_rotation")
    scored = {"refined": _metric(0.1), "linear_fit": _metric(0.1), "opt_v1": _metric(1.0)}
    assert study.meets_preset_goal("proxy", scored) is True and study.meets_preset_goal("mild", scored) is False


# ------------------------------------------------------------------------------------------------------ machines
def test_machines_puts_each_run_beside_its_own_seeds_record_and_refuses_unrecorded_seeds(bench, monkeypatch, tmp_path,
                                                                                         capsys):
    study = bench("study_machines")
    recorded = study.recorded_runs("mild")
    trained = []
    monkeypatch.setattr(study, "train_after_runs", lambda args, flags, workdir: trained.append(args.seeds) or (
        {"mild": tmp_path / "data-mild"}, {("mild", seed): tmp_path / f"mild-{seed}" for seed in args.seeds}))
    monkeypatch.setattr(study, "held_out_tile_statistics", lambda model_dir, data_dir: {"tile_ids": [model_dir.name]})
    monkeypatch.setattr(study, "scores", lambda statistics: recorded[0])
    output = tmp_path / "machines.md"
    assert study.main(["--presets", "mild", "--seeds", "1", "--output", str(output)]) == 0
    (run,), = json.loads(output.with_suffix(".json").read_text())["presets"].values()
    assert run["recorded"] == recorded[1] and run["here"] == recorded[0]
    with pytest.raises(SystemExit) as exit_status:
        study.main(["--presets", "mild", "--seeds", str(len(recorded)), "--output", str(output)])
    assert exit_status.value.code == 2 and trained == [[1]]
    assert f"the quality study recorded seeds 0-{len(recorded) - 1} only" in capsys.readouterr().err


def test_machines_rows_follow_the_seeds_in_the_order_given(bench, monkeypatch, tmp_path):
    """`--seeds 1 0`: the trainings come back in that order, so that the record's runs sit beside the seeds it names
    (the tables zip the two)."""
    after_runs, study_quality, study = bench("_after_runs"), bench("study_quality"), bench("study_machines")
    fake_demo_runs(monkeypatch, study_quality)
    monkeypatch.setattr(after_runs, "build_datasets", lambda presets, workdir: {p: workdir / f"data-{p}"
                                                                                for p in presets})
    recorded = study.recorded_runs("mild")
    monkeypatch.setattr(study, "held_out_tile_statistics", lambda model_dir, data_dir: {
        "tile_ids": [model_dir.parent.name]})
    monkeypatch.setattr(study, "scores", lambda statistics: recorded[int(statistics["tile_ids"][0][-1])])
    output = tmp_path / "machines.md"
    assert study.main(["--presets", "mild", "--seeds", "1", "0", "--jobs", "1", "--output", str(output)]) == 0
    record = json.loads(output.with_suffix(".json").read_text())
    runs = record["presets"]["mild"]
    assert record["seeds"] == [1, 0] and [run["recorded"] for run in runs] == [recorded[1], recorded[0]]
    assert [run["tile_statistics"]["tile_ids"] for run in runs] == [["mild-after-seed1"], ["mild-after-seed0"]]


# ---------------------------------------------------------------------------------------------------- after runs
def test_after_runs_hand_the_flags_after_the_separator_to_each_demo_in_its_own_folder(bench, monkeypatch, tmp_path):
    after_runs, study_quality = bench("_after_runs"), bench("study_quality")
    commands = fake_demo_runs(monkeypatch, study_quality)
    monkeypatch.setattr(after_runs, "build_datasets", lambda presets, workdir: {p: workdir / f"data-{p}"
                                                                                for p in presets})
    _, args, demo_flags = after_runs.parse_arguments("d", ["--presets", "mild", "--seeds", "0", "1", "--jobs", "1",
                                                           "--", "--max_steps", "3"], tmp_path / "x.md")
    assert demo_flags == ["--max_steps", "3"] and args.presets == ["mild"] and args.seeds == [0, 1]
    _, trained = after_runs.train_after_runs(args, demo_flags, tmp_path)
    assert trained == {("mild", seed): tmp_path / f"mild-after-seed{seed}" / "best" for seed in (0, 1)}
    assert all(command[-2:] == ["--max_steps", "3"] for command in commands) and len(commands) == 2


def test_after_runs_script_line_counts_every_settings_trainings(bench):
    record = {"presets": ["mild", "strong"], "seeds": [0, 1], "machine": MACHINE, "demo_flags": []}
    line = bench("_after_runs").script_line("study_loss_weight.py", record, 60.0, "0.0", "--values 0 1 ", 2)
    assert line.startswith("Script: `bench/study_loss_weight.py --values 0 1 --presets mild strong --seeds 0 1`; "
                           "8 demo trainings")


def test_after_runs_train_two_at_a_time_unless_told(bench, tmp_path):
    assert bench("_after_runs").parse_arguments("d", [], tmp_path / "x.md")[1].jobs == 2


# ------------------------------------------------------------------------------------------------ proxy generator
# The first test tile of the bundled sample under seed 0 (its donor: the second test tile): each band's mean and
# spread, and three pixels (row, column) of each band, as the recorded `proxy` figures were made with.
PROXY_TILE_MEAN = [0.01038, 0.015643, 0.027918, 0.007935]
PROXY_TILE_STD = [0.008545, 0.009552, 0.010192, 0.007858]
PROXY_PIXELS = [[0.007598, 0.036781, 0.043796, 0.024706], [0.024863, 0.004061, 0.042572, 0.0],
                [0.00774, 0.029084, 0.038799, 0.013993]]


def _proxy_of_first_test_tile(stage1_proxy, sample_tiles_dir):
    from data_builders.tiles import read_tile

    first, donor = (read_tile(path) for path in sorted((sample_tiles_dir / "test").glob("*.npz"))[:2])
    return stage1_proxy.generate(first.target, donor.target, stage1_proxy._rng(0, first.tile_id))


def test_the_proxy_generator_makes_the_recorded_stage1_outputs(bench, sample_tiles_dir):
    """Known values: a change to the generator's transform or its draws changes every `proxy` figure."""
    import numpy as np

    opt_v1 = _proxy_of_first_test_tile(bench("stage1_proxy"), sample_tiles_dir)
    assert opt_v1.dtype == np.float32 and opt_v1.shape[0] == 4
    assert opt_v1.mean(axis=(1, 2)).tolist() == pytest.approx(PROXY_TILE_MEAN, rel=1e-4, abs=2e-6)
    assert opt_v1.std(axis=(1, 2)).tolist() == pytest.approx(PROXY_TILE_STD, rel=1e-4, abs=2e-6)
    for (row, column), pixel in zip(((0, 0), (37, 81), (119, 5)), PROXY_PIXELS):
        assert opt_v1[:, row, column].tolist() == pytest.approx(pixel, abs=2e-5), (row, column)


def test_the_proxy_script_draws_each_tile_with_a_donor_of_its_split_masks_it_and_repeats_itself(bench,
                                                                                               sample_tiles_dir,
                                                                                               tmp_path):
    import numpy as np

    from data_builders.tiles import read_tile

    stage1_proxy = bench("stage1_proxy")
    tiles = copy_sample_subset(sample_tiles_dir, tmp_path / "tiles", 2)
    path = sorted((tiles / "train").glob("*.npz"))[0]  # with a corner of no data (non-finite reflectance)
    with np.load(path) as arrays:
        data = dict(arrays)
    for key in ("s2_b2", "s2_b3", "s2_b4", "s2_b8"):
        data[key] = data[key].astype(np.float32) / 10000
        data[key][:10, :20] = np.nan
    np.savez(path, **data)
    for name in ("a", "b"):
        assert stage1_proxy.main(["--data_dir", str(tiles), "--output_dir", str(tmp_path / name), "--seed", "3",
                                  "--style_spread", "0"]) == 0
    masked = 0
    for split in ("train", "val", "test"):
        first, second = (read_tile(path) for path in sorted((tiles / split).glob("*.npz")))
        for tile, donor in ((first, second), (second, first)):
            expected = stage1_proxy.generate(tile.target, donor.target, stage1_proxy._rng(3, tile.tile_id), 0.0)
            expected[:, ~tile.valid_mask] = 0.0
            masked += int((~tile.valid_mask).sum())
            with np.load(tmp_path / "a" / f"{tile.tile_id}.npz") as written:
                assert np.array_equal(written["opt_v1"], expected), tile.tile_id
            assert (tmp_path / "a" / f"{tile.tile_id}.npz").read_bytes() == \
                (tmp_path / "b" / f"{tile.tile_id}.npz").read_bytes()
    assert masked == 200  # the mask shows
