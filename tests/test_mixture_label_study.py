"""`bench/study_mixture_label.py`: the told correction uses the preset it is told and starts as no correction, the
presets it is told are the ones the `mixture` dataset used, its classifier and tables say what their numbers are, it
runs as a script, and the figures the docs quote are the recorded ones."""
from __future__ import annotations

import json
import re
import statistics
import sys

import pytest
import torch

from _study_helpers import assert_refused_before_any_work, assert_wrote_its_tables, run_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def study(repo_root):
    sys.path.insert(0, str(repo_root))
    from bench import study_mixture_label

    return study_mixture_label


# ------------------------------------------------------------------------------------------------ the told correction
def test_the_told_correction_starts_as_no_correction_and_follows_the_preset_it_is_told(study):
    torch.manual_seed(0)
    correction = study.PresetConditionedMLP()
    spectra = 0.02 + 0.4 * torch.rand(2, 4, 6, 6)
    mild, strong = torch.tensor([0, 0]), torch.tensor([1, 1])
    for told in (mild, strong):
        assert torch.equal(correction(spectra, told), spectra)
    with torch.no_grad():  # a change for `strong` alone (the second one-hot input) leaves `mild` tiles alone
        correction.preset_affine.weight[-4:, 1] = 0.05
    assert torch.equal(correction(spectra, mild), spectra)
    assert torch.allclose(correction(spectra, strong), spectra + 0.05)
    assert torch.allclose(correction(spectra, torch.tensor([0, 1]))[1], spectra[1] + 0.05)
    with torch.no_grad():  # the preset also reaches the MLP: its first layer's inputs beside the log spectrum
        correction.preset_affine.weight.zero_()
        correction.output.weight.normal_(std=0.1)
        correction.first.weight[:, 4:] = 0.0
    assert torch.equal(correction(spectra, strong), correction(spectra, mild))
    with torch.no_grad():
        correction.first.weight[:, 5] = 3.0
    assert not torch.allclose(correction(spectra, strong), correction(spectra, mild), atol=1e-3)


def test_the_presets_told_are_the_ones_the_mixture_dataset_used(study, sample_tiles_dir, tmp_path):
    """Each tile's `mixture` `opt_v1` is exactly its `opt_v1` under the preset the study tells the correction."""
    from datasets import load_from_disk

    from data_builders import build_dataset

    built = {}
    for preset in ("mild", "strong", "mixture"):
        build_dataset(sample_tiles_dir, tmp_path / preset, degradation=preset, seed=study.DATASET_SEED)
        built[preset] = load_from_disk(str(tmp_path / preset))["train"]
    ids = built["mixture"]["tile_id"]
    assert ids == built["mild"]["tile_id"] == built["strong"]["tile_id"]
    told = [study.MIXTURE_PRESETS[study.preset_index(tile_id)] for tile_id in ids]
    assert set(told) == {"mild", "strong"}
    assert study.reference_tiles(ids) == [tile_id for tile_id, preset in zip(ids, told) if preset == "mild"]
    opt_v1 = {preset: rows.with_format("numpy")["opt_v1"] for preset, rows in built.items()}
    for index, preset in enumerate(told):
        assert (opt_v1["mixture"][index] == opt_v1[preset][index]).all()
        other = "strong" if preset == "mild" else "mild"
        assert not (opt_v1["mixture"][index] == opt_v1[other][index]).all()


def test_the_own_start_turns_the_shared_fit_into_each_presets_own(study):
    """`change_between` gives the change of the shared fit's output that yields the other fit's output exactly."""
    from training.linear_fit import ColorFitResult

    generator = torch.Generator().manual_seed(0)

    def random(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    shared, own = (ColorFitResult(matrix=torch.eye(4, dtype=torch.float64) + 0.2 * random(4, 4), bias=0.05 * random(4),
                                  pixels=1, tiles=1) for _ in range(2))
    opt_v1 = random(2, 4, 5, 5)
    change = study.change_between(shared, own).double()[None].expand(2, -1)
    assert torch.allclose(study.apply_affine_change(shared.apply(opt_v1), change), own.apply(opt_v1), atol=1e-6)
    assert torch.allclose(study.change_between(own, own), torch.zeros(20), atol=1e-6)


def test_an_unknown_correction_is_refused(study):
    with pytest.raises(ValueError, match="unknown correction 'pixel'"):
        study.fit_correction("pixel", {"mild": None, "mixture": None}, [], 0, 1)
    with pytest.raises(ValueError, match="unknown start 'own, fitted'"):
        study.told_correction(None, 0, 1, "own, fitted")


@pytest.mark.parametrize("start", ["zero", "own", "own, kept"])
def test_the_told_corrections_start_and_fit_their_changes_as_named(study, sample_dataset_dir, start):
    """`zero` and `own` fit the per-preset changes from zero or from each preset's own fit; `own, kept` keeps them at
    the latter (what turns the affine fit of all tiles into each preset's own) and fits the MLP alone."""
    from datasets import load_from_disk

    from training.linear_fit import fit_spectral_correction

    tiles = load_from_disk(str(sample_dataset_dir))["train"].select(range(8))
    tiles = tiles.add_column(study.PRESET_COLUMN, [index % 2 for index in range(8)])
    correction, affine = study.told_correction(tiles, seed=0, steps=3, start=start)
    assert torch.equal(affine.matrix, fit_spectral_correction(tiles, steps=3, seed=0).matrix)
    assert float(correction.output.weight.detach().abs().max()) > 0  # the MLP was fitted
    own_starts = torch.stack([study.change_between(affine, fit_spectral_correction(
        tiles.select([row for row in range(8) if row % 2 == index]), steps=3, seed=0)) for index in (0, 1)], dim=1)
    changes = correction.preset_affine.weight.detach()
    if start == "own, kept":
        assert torch.equal(changes, own_starts)
    else:
        started = own_starts if start == "own" else torch.zeros_like(own_starts)
        moved = (changes - started).abs()
        assert float(moved.max()) > 1e-4 and float(moved.max()) < 0.01  # 3 Adam steps of 1e-3 each


# ------------------------------------------------------------------------------------------------ the classifier
def test_the_logistic_regression_tells_separable_classes_apart_and_follows_the_labels(study):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    features = torch.randn(40, 12, generator=generator) + 3.0 * labels[:, None]
    predict = study.fit_logistic(features, labels)
    held_out = torch.randn(20, 12, generator=generator) + 3.0 * (torch.arange(20) % 2)[:, None]
    assert torch.equal(predict(held_out), (torch.arange(20) % 2).bool())
    flipped = study.fit_logistic(features, 1 - labels)
    assert torch.equal(flipped(held_out), ~(torch.arange(20) % 2).bool())


# ------------------------------------------------------------------------------------------------ the tables
def _scores(evi: float) -> dict:
    return {"ndvi_rmse": 0.1, "evi_rmse": evi, "sam": 0.05}


def test_the_comparison_pairs_sets_and_seeds_and_uses_the_mean_seed_spread(study):
    reference = [[_scores(0.10), _scores(0.12)], [_scores(0.20), _scores(0.21)]]
    runs = [[_scores(0.11), _scores(0.12)], [_scores(0.30), _scores(0.21)]]
    compared = study.evi_comparison(runs, reference)
    ratios = [1.1, 1.0, 1.5, 1.0]
    assert compared["ratio"] == pytest.approx(statistics.fmean(ratios))
    assert compared["ratios"] == pytest.approx(ratios)
    assert compared["seed_spread"] == pytest.approx((0.02 + 0.01) / 2)
    assert compared["difference"] == pytest.approx((0.74 - 0.63) / 4)
    assert compared["within_spread"] is False  # 0.0275 > 0.015
    assert study.evi_comparison(reference, reference)["within_spread"] is True


def test_the_tables_say_what_the_record_holds(study):
    reference = [_scores(0.10), _scores(0.12)]
    corrections = ["mild", "mixture", "mixture, told the preset", "mild, the mixture's mild tiles only"]
    record = {"seeds": [0, 1], "steps": 300, "corrections": corrections, "sizes": {"36": [{
        "tiles": ["a", "b", "c"], "mild_tiles": ["a"], "corrections": {
            "mild": reference, "mixture": [_scores(0.16), _scores(0.18)],
            "mixture, told the preset": [_scores(0.11), _scores(0.12)],
            "mild, the mixture's mild tiles only": [_scores(0.13), _scores(0.15)]}}]},
        "preset_classification": {"pool": {"tiles": 72, "accuracy": 0.75, "mild": "30 of 36", "strong": "24 of 36"},
                                  "test": {"tiles": 36, "accuracy": 0.5, "mild": "9 of 18", "strong": "9 of 18"}}}
    text = study.render(record, seconds=600, load="0 0 0")
    assert "`bench/study_mixture_label.py --sizes 36 --seeds 0 1 --steps 300`; 8 fits" in text
    assert "## 36 training tiles (1 set; `mild` tiles under `mixture`: 1)" in text
    assert "| mild | 0.1000 (0.1000-0.1000) | 0.1100 (0.1000-0.1200) | 0.0500 (0.0500-0.0500) | 1 | " \
        "seed spread 0.0200 | |" in text
    assert "| mixture | 0.1000 (0.1000-0.1000) | 0.1700 (0.1600-0.1800) | 0.0500 (0.0500-0.0500) | 1.55 (1.50-1.60) " \
        "| +0.0600 | no |" in text
    assert "| mixture, told the preset | 0.1000 (0.1000-0.1000) | 0.1150 (0.1100-0.1200) | 0.0500 (0.0500-0.0500) " \
        "| 1.05 (1.00-1.10) | +0.0050 | yes |" in text
    assert "| pool | 72 | 0.75 | 30 of 36 | 24 of 36 |" in text
    assert "| test | 36 | 0.50 | 9 of 18 | 9 of 18 |" in text


# ------------------------------------------------------------------------------------------------ the script
def _run(repo_root, *args):
    return run_study(repo_root, "study_mixture_label.py", *args)


@pytest.mark.parametrize("args, message", [
    (["--sizes", "18", "7"], "--sizes: a training set size must divide the pool's 36 tiles, got 7"),
    (["--sizes", "1"], "--sizes: a set of 1 tiles lacks tiles of one of the mixture's presets (mild, strong)"),
    (["--seeds", "0"], "--seeds: the seed spread needs at least 2 seeds"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_bad_arguments_exit_2_before_any_work(repo_root, tmp_path, args, message):
    assert_refused_before_any_work(_run(repo_root, *args, "--output", str(tmp_path / "x.md")), tmp_path, message)


def test_the_study_runs_as_a_script_on_the_whole_pool(study, repo_root, tmp_path, sample_dataset_dir):
    """On the one set of 36 tiles, the `mild` correction scores what `bench/study_training_tiles.py` fits on the
    sample's train and val splits (the dataset built apart from the script), the `mild` tiles are the ones the mixture
    degrades with `mild`, and what it writes is the tables of what it records."""
    from datasets import concatenate_datasets, load_from_disk

    from bench.study_training_tiles import fit_on_set

    output = tmp_path / "label.md"
    result = _run(repo_root, "--sizes", "36", "--seeds", "0", "1", "--steps", "2", "--jobs", "1",
                  "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(output.with_suffix(".json").read_text())
    (training_set,) = record["sizes"]["36"]
    dataset = load_from_disk(str(sample_dataset_dir))
    pool_ids = sorted(concatenate_datasets([dataset["train"], dataset["val"]])["tile_id"])
    assert training_set["tiles"] == pool_ids
    assert training_set["mild_tiles"] == study.reference_tiles(pool_ids) and 0 < len(training_set["mild_tiles"]) < 36
    assert set(training_set["corrections"]) == set(study.CORRECTIONS)
    assert all(len(runs) == 2 for runs in training_set["corrections"].values())
    apart = fit_on_set(sample_dataset_dir, sample_dataset_dir, pool_ids, "pixel", 1, 2)
    assert training_set["corrections"]["mild"][1] == pytest.approx(apart, rel=1e-6)
    classified = record["preset_classification"]
    assert (classified["pool"]["tiles"], classified["test"]["tiles"]) == (72, 36)
    assert_wrote_its_tables(output, study.render(record, 0, ""))


# ------------------------------------------------------------------------------------------------ recorded figures
@pytest.fixture(scope="module")
def recorded(repo_root) -> dict:
    return json.loads((repo_root / "bench" / "results" / "mixture_label.json").read_text())


def test_the_recorded_study_covers_every_size_set_correction_and_seed(recorded, study):
    from bench.study_training_tiles import sample_pool_ids, training_sets

    assert recorded["sizes"].keys() == {"18", "36"} and recorded["seeds"] == [0, 1, 2] and recorded["steps"] == 300
    for size, sets in recorded["sizes"].items():
        assert [s["tiles"] for s in sets] == training_sets(sample_pool_ids(), int(size))
        for training_set in sets:
            assert training_set["mild_tiles"] == study.reference_tiles(training_set["tiles"])
            assert set(training_set["corrections"]) == set(study.CORRECTIONS)
            assert all(len(runs) == 3 for runs in training_set["corrections"].values())


def test_the_recorded_fits_repeat_the_training_tiles_study(recorded, repo_root):
    """The `mild` and `mixture` corrections are `bench/study_training_tiles.py`'s `pixel` fits on the same sets with
    the same seeds: one thread, the same draws, the same scores."""
    tiles_study = json.loads((repo_root / "bench" / "results" / "training_tiles.json").read_text())
    for size, sets in recorded["sizes"].items():
        for name in ("mild", "mixture"):
            earlier = tiles_study["datasets"][name]["sizes"][size]
            for training_set, earlier_set in zip(sets, earlier):
                assert training_set["tiles"] == earlier_set["tiles"]
                for seed, run in zip(recorded["seeds"], training_set["corrections"][name]):
                    if seed in tiles_study["seeds"]:
                        earlier_run = earlier_set["variants"]["pixel"][tiles_study["seeds"].index(seed)]
                        assert run == pytest.approx(earlier_run, rel=1e-6)


def _compared(study, recorded: dict, size: str, name: str) -> dict:
    sets = recorded["sizes"][size]
    return study.evi_comparison([s["corrections"][name] for s in sets], [s["corrections"]["mild"] for s in sets])


def test_docs_quote_the_recorded_study(study, recorded, repo_root):
    training = " ".join((repo_root / "docs" / "quality.md").read_text().split())
    assert ("in that order (not told, told, told from own fits, own fits kept, each preset apart)" in training
            and list(study.CORRECTIONS[1:]) == ["mixture", *study.TOLD, "mild, the mixture's mild tiles only"])
    quoted = [f"on {size} tiles " + " / ".join(f"{_compared(study, recorded, size, name)['ratio']:.2f}"
                                                  for name in study.CORRECTIONS[1:]) for size in ("18", "36")]
    spreads = [_compared(study, recorded, size, "mild")["seed_spread"] for size in ("18", "36")]
    assert f"{quoted[0]}, {quoted[1]} (seed spread {spreads[0]:.4f} and {spreads[1]:.4f})" in training
    kept, apart, started = (f"{_compared(study, recorded, '36', name)['ratio']:.2f}" for name in (
        "mixture, told the preset, own fits kept", "mild, the mixture's mild tiles only",
        "mixture, told the preset, own fits as starts"))
    assert f"fitted on all the tiles scores {kept} on 36 tiles" in training
    assert f"on the same affine fit, scores {apart}" in training
    assert f"drifts away from them too ({started})" in training
    routed = _compared(study, recorded, "36", "mild, the mixture's mild tiles only")
    assert not routed["within_spread"]
    assert (f"+{routed['difference']:.3f} of EVI RMSE against a seed spread of {routed['seed_spread']:.3f}. It has the "
            f"mixture's {len(recorded['sizes']['36'][0]['mild_tiles'])} `mild` tiles") in training
    few = sorted(len(s["mild_tiles"]) for s in recorded["sizes"]["18"])
    short = _compared(study, recorded, "18", "mild, the mixture's mild tiles only")["ratio"]
    assert f"{few[0]} and {few[1]} `mild` tiles are too few: {short:.2f})" in training
    classified = recorded["preset_classification"]
    assert (f"names the right preset for {classified['pool']['accuracy']:.0%} of the pool's tiles and "
            f"{classified['test']['accuracy']:.0%} of the test tiles, each tile taken under both presets") in training
    assert (classified["pool"]["tiles"], classified["test"]["tiles"]) == (72, 36)
    assert not any(_compared(study, recorded, size, name)["within_spread"]
                   for size in ("18", "36") for name in study.CORRECTIONS[1:])


def test_benchmarks_quote_the_recorded_run(repo_root):
    header = (repo_root / "bench" / "results" / "mixture_label.md").read_text()
    fits, minutes = re.search(r"; (\d+) fits on one thread each in (\d+) min", header).groups()
    benchmarks = " ".join((repo_root / "BENCHMARKS.md").read_text().split())
    assert f"`bench/study_mixture_label.py` ({fits} fits, ~{minutes} min with 2 jobs)" in benchmarks
