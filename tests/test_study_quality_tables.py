"""`bench/study_quality.py`'s tables: the rows of a model with `opt_v1` kept out of range sit beside the model's own,
only for runs that recorded them, and the sensitivity section counts the seeds meeting the goal per setting."""
from __future__ import annotations

import sys

import pytest
from _study_helpers import assert_refused_before_any_work, run_study
from _training_helpers import fake_demo_runs


@pytest.fixture(scope="module")
def study_quality(repo_root):
    sys.path.insert(0, str(repo_root))
    from bench import study_quality

    return study_quality


def _scores(evi: float, other: float = 0.05) -> dict:
    """Scores with this EVI RMSE; NDVI RMSE and SAM at `other` (half the colour fit's by default: they pass)."""
    return {"ndvi_rmse": other, "ndvi_rmse_bright": other, "evi_rmse": evi, "evi_rmse_in_range": evi, "sam": other,
            "psnr": 30.0, "ssim": 0.9}


def _run(study_quality, refined: float, fallback: float | None, sensitivity: dict | None = None) -> dict:
    run = {}
    for split in ("test", "val"):
        scores = {"opt_v1": _scores(0.2), "linear_fit": _scores(0.1, 0.1), "spectral_fit": _scores(0.1, 0.1),
                  "refined": _scores(refined), "bright_fraction": 0.9, "n_tiles": 3}
        if fallback is not None:
            scores["refined_fallback"] = _scores(fallback)
            scores["out_of_range_fraction"] = 0.05
        run[split] = scores
    if sensitivity is not None:
        run["test"]["fallback_sensitivity"] = {f"{q}/{r}": _scores(sensitivity.get((q, r), refined))
                                               for q, r in study_quality.SENSITIVITY}
    return run


def test_fallback_rows_follow_the_model_only_where_recorded(study_quality):
    runs = {("mild", "before"): [_run(study_quality, 0.12, None)],
            ("mild", "after"): [_run(study_quality, 0.095, 0.085)]}
    text = study_quality.render(runs, {}, [0], 60.0, "0.0")
    assert "| refined, after, opt_v1 out of range |" in text
    assert "| refined, before, opt_v1 out of range |" not in text
    assert "- `after`: 0 of 1 seeds beat the colour fit" in text  # 0.095 > 0.9 * 0.1
    assert "- `after, opt_v1 out of range`: 1 of 1 seeds beat the colour fit" in text  # 0.085 <= 0.09
    assert "5.0 % are outside the training spectra" in text
    assert "How much the two numbers" not in text  # no run recorded the sensitivity


def test_the_bootstrap_section_lists_the_runs_that_recorded_one_with_their_seeds(study_quality):
    def interval(ratio):
        return {"ratio": ratio, "low": ratio - 0.1, "high": ratio + 0.15, "share_below_1": 0.9}

    recorded = _run(study_quality, 0.095, None)
    recorded["test"]["bootstrap"] = {"resamples": 500, "confidence": 0.8, "seed": 0,
                                     "linear_fit": {m: interval(0.95) for m in ("ndvi_rmse", "evi_rmse", "sam")},
                                     "opt_v1": {"ndvi_rmse": None, "evi_rmse": interval(0.5), "sam": interval(0.4)}}
    runs = {("mild", "before"): [_run(study_quality, 0.12, None)] * 2,
            ("mild", "after"): [_run(study_quality, 0.095, None), recorded]}
    lines = study_quality.render(runs, {}, [3, 7], 60.0, "0.0").splitlines()
    assert "the 80 % interval of a paired tile bootstrap" in next(l for l in lines if "tile bootstrap (" in l)
    assert "drawn with replacement 500 times" in "\n".join(lines)
    rows = [line for line in lines if line.startswith("| `mild/")]
    assert rows == ["| `mild/after` | 7 | 0.95 (0.85-1.10) | 0.95 (0.85-1.10) | 0.95 (0.85-1.10) | n/a | "
                    "0.50 (0.40-0.65) | 0.40 (0.30-0.55) |"]  # the second seed only; an undefined ratio is n/a
    without = study_quality.render({("mild", "after"): [_run(study_quality, 0.095, None)]}, {}, [0], 60.0, "0.0")
    assert "How much each run's verdict hangs" not in without


def test_the_sensitivity_section_scores_every_setting(study_quality):
    worse = {(0.95, 1.5): 0.2}
    runs = {("mild", "after"): [_run(study_quality, 0.095, 0.085, {**worse, (0.99, 2.0): 0.085}),
                                _run(study_quality, 0.08, 0.07, {**worse, (0.99, 2.0): 0.07})]}
    mixture = {"after": [_run(study_quality, 0.14, 0.12, {(0.95, 1.5): 0.3})]}
    text = study_quality.render(runs, mixture, [0, 1], 60.0, "0.0")
    header = next(line for line in text.splitlines() if line.startswith("| trained on | without |"))
    assert header.count("|") == len(study_quality.SENSITIVITY) + 3
    mild = next(line for line in text.splitlines() if line.startswith("| `mild` |")).split(" | ")
    assert mild[1] == "0.0875 (1 of 2)"  # without the rule: only the second seed meets the goal
    assert mild[2] == "0.2000 (0 of 2)"  # 95 % / 1.5x
    assert mild[1 + 1 + study_quality.SENSITIVITY.index((0.99, 2.0))] == "0.0775 (2 of 2)"
    row = next(line for line in text.splitlines() if line.startswith("| `mixture` (scored on `mild`) |"))
    assert row.split(" | ")[1:3] == ["0.1400", "0.3000"]  # EVI only: the mixture's goal is the mild model's score


def test_a_model_with_the_rule_inside_gets_its_own_row_and_reused_runs_are_not_counted(study_quality, tmp_path):
    import json

    in_model = _run(study_quality, 0.084, None)
    for split in ("test", "val"):
        in_model[split]["out_of_range_fraction"] = 0.05  # from the model's own weight map
    runs = {("mild", "after"): [_run(study_quality, 0.095, 0.085)], ("mild", "fallback"): [in_model]}
    earlier = tmp_path / "quality.json"
    # an earlier study recorded the mixture as a list of `after` runs; this one trains the mixture's `fallback`
    earlier.write_text(json.dumps({"runs": {}, "mixture_on_mild": [_run(study_quality, 0.14, 0.12)] * 2}))
    mixture = {"fallback": [_run(study_quality, 0.13, None)]}
    assert study_quality.reuse_mixture(study_quality.read_earlier(earlier), mixture) == ["mixture/after"]
    assert list(mixture) == ["after", "fallback"] and len(mixture["after"]) == 2
    text = study_quality.render(runs, mixture, [0], 60.0, "0.0", reused=["mild/after", "mixture/after"])
    assert "Script: `bench/study_quality.py --seeds 0`; 2 demo trainings" in text  # the two fallback runs are new
    assert "Runs of `mild/after`, `mixture/after` reused" in text
    rows = [line.split(" | ")[0] for line in text.split("## Trained on `mixture`")[1].splitlines() if line.startswith("| ")]
    assert rows[2:] == ["| mild", "| mild, opt_v1 out of range", "| mixture", "| mixture, opt_v1 out of range",
                        "| mild, fallback", "| mixture, fallback"]
    assert "| refined, fallback | 0.0500" in text
    assert "- `fallback`: 1 of 1 seeds beat the colour fit" in text  # 0.084 <= 0.09
    assert "fallback, opt_v1 out of range" not in text  # the rule is not applied twice
    assert study_quality.VARIANT_FLAGS["fallback"] == ["--out_of_range_fallback", "true"]


def test_the_mixture_bounds_are_rows_of_the_mixture_table_and_can_be_reused(study_quality, tmp_path):
    import json

    runs = {("mild", "after"): [_run(study_quality, 0.088, 0.084)]}
    mixture = {"after": [_run(study_quality, 0.14, 0.12)]}
    subset = {**_run(study_quality, 0.096, 0.09), "train_tiles": 8}
    bounds = {"mixture_mild_tiles": [subset, subset]}
    earlier = tmp_path / "quality.json"
    earlier.write_text(json.dumps({"runs": {}, study_quality.BOUNDS_KEY: {
        "mild_and_strong": [_run(study_quality, 0.118, 0.11)], "mixture_mild_tiles": [_run(study_quality, 0.5, 0.5)]}}))
    assert study_quality.reuse_bounds(study_quality.read_earlier(earlier), bounds) == [
        f"{study_quality.BOUNDS_KEY}/mild_and_strong"]
    assert len(bounds["mixture_mild_tiles"]) == 2  # trained now: the earlier runs are not taken
    text = study_quality.render(runs, mixture, [0, 1], 60.0, "0.0", reused=["mild/after", "mixture/after",
                                f"{study_quality.BOUNDS_KEY}/mild_and_strong"], bounds=bounds)
    assert "; 2 demo trainings" in text  # the two new bound runs only
    assert "are the 8 of 18 training tiles the mixture degrades with `mild`" in text
    table = text.split("## Trained on `mixture`")[1].split("\n\n## ")[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[3] for line in table.splitlines() if line.startswith("| ")}
    assert rows["mild"] == "0.0880" and rows["mixture"] == "0.1400"
    assert rows[study_quality.MIXTURE_BOUNDS["mixture_mild_tiles"]] == "0.0960 (0.0960-0.0960)"  # two seeds
    assert rows[study_quality.MIXTURE_BOUNDS["mild_and_strong"]] == "0.1180"
    assert list(rows)[-2:] == list(study_quality.MIXTURE_BOUNDS.values())
    trained_now = study_quality.render(runs, mixture, [0, 1], 60.0, "0.0", reused=["mild/after", "mixture/after"],
                                       bounds=bounds)
    assert "; 3 demo trainings, 1 of them twice as long (36 training tiles), (`configs/demo.yaml`" in trained_now
    without = study_quality.render(runs, mixture, [0, 1], 60.0, "0.0")
    assert "--mixture_bounds" not in without and "mild and strong" not in without


def test_the_mixture_bound_sets_are_the_mixtures_mild_tiles_and_both_presets(study_quality, tmp_path):
    from datasets import Dataset, DatasetDict, load_from_disk

    from data_builders.degrade import mixture_choice

    ids = [f"tile_{index}" for index in range(12)]
    folders = {}
    for preset in ("mild", "strong"):
        folders[preset] = tmp_path / preset
        DatasetDict({split: Dataset.from_dict({"tile_id": ids, "opt_v1": [f"{preset}-{split}"] * len(ids)})
                     for split in ("train", "val", "test")}).save_to_disk(str(folders[preset]))
    built = study_quality.build_mixture_bounds(folders, tmp_path)
    subset, both = (load_from_disk(str(built[name])) for name in ("mixture_mild_tiles", "mild_and_strong"))
    expected = [tile for tile in ids if mixture_choice(study_quality.DATASET_SEED, tile) == "mild"]
    assert 0 < len(expected) < len(ids)  # the choice splits these ids: the test can tell a subset from the whole
    assert subset["train"]["tile_id"] == expected
    assert set(subset["train"]["opt_v1"]) == {"mild-train"}
    assert subset["val"]["tile_id"] == ids and subset["test"]["opt_v1"] == ["mild-test"] * len(ids)
    for split in ("train", "val"):
        assert both[split]["tile_id"] == ids + ids
        assert both[split]["opt_v1"] == [f"mild-{split}"] * len(ids) + [f"strong-{split}"] * len(ids)
    assert both["test"]["opt_v1"] == ["mild-test"] * len(ids)  # scored on `mild` tiles only
    assert study_quality.training_tiles(built["mixture_mild_tiles"]) == len(expected)


def test_each_proxy_draw_is_the_proxy_generator_with_its_own_seed(study_quality, tmp_path):
    """`proxy-seed1` is `bench/stage1_proxy.py --seed 1` on the bundled tiles: the same targets as `proxy` (seed 0),
    other Stage 1 errors."""
    import numpy as np
    from datasets import load_from_disk

    from bench import stage1_proxy

    assert study_quality.PROXY_DRAWS == {"proxy": 0, "proxy-seed1": 1, "proxy-seed2": 2}
    folders = study_quality.build_datasets(["proxy", "proxy-seed1"], tmp_path)
    seed0, seed1 = (load_from_disk(str(folders[name]))["test"].with_format("numpy")[:]
                    for name in ("proxy", "proxy-seed1"))
    assert seed0["tile_id"].tolist() == seed1["tile_id"].tolist()
    assert np.array_equal(seed0["target"], seed1["target"])
    assert np.abs(seed0["opt_v1"] - seed1["opt_v1"]).mean() > 0.005  # another draw of the errors, not a copy
    assert stage1_proxy.main(["--output_dir", str(tmp_path / "direct"), "--seed", "1"]) == 0
    tile = sorted((tmp_path / "direct").rglob("*.npz"))[0]
    drawn = study_quality.proxy_stage1_dir(tmp_path, "proxy-seed1") / tile.relative_to(tmp_path / "direct")
    with np.load(tile) as direct, np.load(drawn) as built:
        assert np.array_equal(direct["opt_v1"], built["opt_v1"])


def test_the_no_style_proxy_is_the_first_draw_without_its_random_per_tile_style(study_quality, tmp_path):
    """`proxy-no-style` is `bench/stage1_proxy.py --seed 0 --style_spread 0` on the bundled tiles: the targets of
    `proxy`, another `opt_v1`; every other preset of the generator keeps the documented spread."""
    import numpy as np
    from datasets import load_from_disk

    from bench import stage1_proxy

    assert study_quality.PROXY_PRESETS == {"proxy": (0, 1.0), "proxy-seed1": (1, 1.0), "proxy-seed2": (2, 1.0),
                                           "proxy-no-style": (0, 0.0)}
    assert "proxy-no-style" in study_quality.TRAINED_PRESETS
    folders = study_quality.build_datasets(["proxy-no-style"], tmp_path)
    assert stage1_proxy.main(["--output_dir", str(tmp_path / "direct"), "--style_spread", "0"]) == 0
    assert stage1_proxy.main(["--output_dir", str(tmp_path / "styled")]) == 0
    tile = sorted((tmp_path / "direct").rglob("*.npz"))[0]
    drawn = study_quality.proxy_stage1_dir(tmp_path, "proxy-no-style") / tile.relative_to(tmp_path / "direct")
    with np.load(tile) as direct, np.load(drawn) as built, np.load(tmp_path / "styled" / tile.name) as styled:
        assert np.array_equal(direct["opt_v1"], built["opt_v1"])
        assert np.abs(direct["opt_v1"] - styled["opt_v1"]).mean() > 0.003  # the style is gone, not kept
    dataset = load_from_disk(str(folders["proxy-no-style"]))["test"]
    assert dataset.num_rows == 18 and dataset.with_format("numpy")[:]["opt_v1"].std() > 0.01


class _FixedDraws:
    """A stand-in random generator whose every normal draw is loc + scale and every uniform draw its lower end."""

    def normal(self, loc, scale, size=None):
        import numpy as np

        return np.full(size, loc + scale, dtype=float) if size is not None else loc + scale

    def uniform(self, low, high, size=None):
        import numpy as np

        return np.full(size, low, dtype=float) if size is not None else low


def test_the_proxy_style_spread_scales_only_the_random_style(study_quality):
    """Known answer on a flat tile (no detail to hallucinate), with every normal draw at +1 standard deviation:
    without the style blue is the target through the correlated field (x exp(0.04)) plus the white noise (+0.01);
    with it, also the mixing (+0.06 from each band in log space) and the cast (+0.08)."""
    import math

    import numpy as np

    from bench import stage1_proxy

    flat = np.full((4, 8, 8), 0.1, dtype=np.float32)
    plain = stage1_proxy.generate(flat, flat, _FixedDraws(), style_spread=0.0)
    assert np.allclose(plain[0], 0.1 * math.exp(0.04) + 0.01, atol=1e-5)
    styled = stage1_proxy.generate(flat, flat, _FixedDraws())
    log = math.log(0.1 + stage1_proxy.LOG_EPSILON)
    blue = math.exp(log * (1 + 4 * 0.06) + 0.08) - stage1_proxy.LOG_EPSILON
    assert np.allclose(styled[0], blue * math.exp(0.04) + 0.01, atol=1e-5)
    assert abs(blue - 0.1) > 0.01  # the two answers are far apart at this tolerance
    halved = stage1_proxy.generate(flat, flat, _FixedDraws(), style_spread=0.5)
    half_blue = math.exp(log * (1 + 4 * 0.03) + 0.04) - stage1_proxy.LOG_EPSILON
    assert np.allclose(halved[0], half_blue * math.exp(0.04) + 0.01, atol=1e-5)


def test_the_proxy_rejects_a_negative_style_spread(repo_root, tmp_path):
    """A user error: exit 2 with one line naming the flag, nothing written."""
    import subprocess

    output = tmp_path / "out"
    result = subprocess.run([sys.executable, str(repo_root / "bench" / "stage1_proxy.py"), "--output_dir",
                             str(output), "--style_spread", "-0.5"], capture_output=True, text=True, cwd=repo_root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["stage1_proxy: error: --style_spread must be 0 or more, got -0.5"]
    assert not output.exists()


def test_each_degradation_draw_is_the_preset_with_its_own_dataset_seed(study_quality, tmp_path, monkeypatch):
    """`mild-seed1` is the `mild` dataset built with seed 1: the same targets, other errors; its trainings are told
    the same (`--degradation mild --dataset_seed 1`), and a plain preset's the study's own dataset seed."""
    import numpy as np
    from datasets import load_from_disk

    from data_builders import build_dataset

    assert study_quality.DEGRADATION_DRAWS == {"mild-seed1": ("mild", 1), "mild-seed2": ("mild", 2),
                                               "strong-seed1": ("strong", 1), "strong-seed2": ("strong", 2)}
    folders = study_quality.build_datasets(["mild", "mild-seed1"], tmp_path)
    build_dataset(study_quality.SAMPLE_TILES, tmp_path / "direct", degradation="mild", seed=1)
    seed0, seed1, direct = (load_from_disk(str(folder))["test"].with_format("numpy")[:]
                            for folder in (folders["mild"], folders["mild-seed1"], tmp_path / "direct"))
    assert np.array_equal(seed0["target"], seed1["target"])
    assert np.abs(seed0["opt_v1"] - seed1["opt_v1"]).mean() > 0.001
    assert np.array_equal(seed1["opt_v1"], direct["opt_v1"])

    commands = fake_demo_runs(monkeypatch, study_quality)
    study_quality.train("mild-seed1", 2, "after", tmp_path)
    study_quality.train("mild", 2, "after", tmp_path)
    drawn, plain = commands
    assert drawn[drawn.index("--degradation"):][:4] == ["--degradation", "mild", "--dataset_seed", "1"]
    assert plain[plain.index("--degradation"):][:4] == ["--degradation", "mild", "--dataset_seed",
                                                         str(study_quality.DATASET_SEED)]


def test_an_unknown_preset_exits_2_before_any_work(repo_root, tmp_path):
    import subprocess

    output = tmp_path / "quality.md"
    result = subprocess.run([sys.executable, str(repo_root / "bench" / "study_quality.py"), "--presets", "mild-seed3",
                             "--output", str(output)], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice: 'mild-seed3'" in result.stderr
    assert not output.exists() and not output.with_suffix(".json").exists()


def test_benchmarks_gives_the_number_of_trainings_the_defaults_run(study_quality, repo_root, tmp_path):
    """BENCHMARKS.md's count of the quality study's trainings is what its defaults plan: every variant on both presets
    and the mixture's variants, each with every seed (and what `--mixture_bounds` adds)."""
    args = study_quality.parse_args(["--output", str(tmp_path / "quality.md")])
    jobs = study_quality.planned_jobs(args)
    presets, variants, seeds = len(args.presets), len(args.variants), len(args.seeds)
    assert args.mixture and args.mixture_variants == ["after"] and not args.mixture_bounds
    assert variants == len(study_quality.VARIANT_FLAGS) and len(jobs) == variants * presets * seeds + seeds
    bounds = study_quality.planned_jobs(study_quality.parse_args(["--mixture_bounds", "--output", args.output]))
    benchmarks = " ".join((repo_root / "BENCHMARKS.md").read_text().split())
    assert (f"`bench/study_quality.py` ({len(jobs)} trainings by default: {variants} variants x {presets} presets x "
            f"{seeds} seeds, and `after` on the `mixture` x {seeds} seeds;") in benchmarks
    assert f"`--mixture_bounds` for {len(bounds) - len(jobs)} more" in benchmarks


@pytest.mark.parametrize("arguments, message", [
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--reuse", "{tmp}/missing.json"], "--reuse {tmp}/missing.json: not readable ([Errno 2] No such file or "
                                        "directory: '{tmp}/missing.json')"),
    (["--reuse", "{tmp}/quality.md"], "--reuse {tmp}/quality.md: not valid JSON (Expecting value: line 1 column 1 "
                                      "(char 0))"),
    (["--reuse", "{tmp}/list.json"], "--reuse {tmp}/list.json: no 'runs' object of 'preset/variant' -> list of runs "
                                     "(not a record of this study)"),
    (["--reuse", "{tmp}/bounds.json"], "--reuse {tmp}/bounds.json: 'mixture_bounds_on_mild' is not an object"),
    # the record has one list of seeds: reused runs of others would be reported (and checked) as these seeds'
    (["--presets", "--no-mixture", "--seeds", "0", "1", "--reuse", "{tmp}/seeds.json"],
     "--reuse {tmp}/seeds.json: recorded with --seeds 0 1 2, not 0 1"),
    # nothing to train or reuse: the record at --output would be replaced by an empty one
    (["--presets", "--no-mixture"], "nothing to train (no --presets, --no-mixture, no --mixture_bounds) and nothing "
                                    "to --reuse"),
])
def test_a_bad_argument_exits_2_before_any_training(repo_root, tmp_path, arguments, message):
    """Checked before the datasets are built: a `--reuse` record is read only after every training otherwise."""
    for name, text in (("quality.md", "# tables, not the record\n"), ("list.json", "[1, 2]"),
                       ("bounds.json", '{"runs": {"mild/after": []}, "mixture_bounds_on_mild": [1]}'),
                       ("seeds.json", '{"runs": {"mild/after": [{}, {}, {}]}, "seeds": [0, 1, 2]}')):
        (tmp_path / name).write_text(text)  # `--reuse` files beside the output folder, which stays empty
    output = tmp_path / "out"
    output.mkdir()
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    result = run_study(repo_root, "study_quality.py", *arguments, "--output", str(output / "quality.md"))
    assert_refused_before_any_work(result, output, message.replace("{tmp}", str(tmp_path)))
