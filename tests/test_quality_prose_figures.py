"""The figures of docs/quality.md's prose (and a few of the README's) that the other figure tests left unchecked:
counts of tiles, seeds and runs, the goal's thresholds, and the ratios quoted beside the tables, each recomputed
from its record in bench/results/ and asserted as the page prints it."""
from __future__ import annotations

import functools
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench`, whose rules the tests apply, run alone too

from bench.study_quality import DEGRADATION_DRAWS, DEGRADATION_PRESETS  # noqa: E402
from training.metrics import GAIN_METRICS  # noqa: E402

# The pages checked; module attributes, so that a check can be pointed at an edited copy
QUALITY = ROOT / "docs" / "quality.md"
README = ROOT / "README.md"
SPECTRAL = GAIN_METRICS  # NDVI RMSE, EVI RMSE, SAM: what the goal counts
# (preset, dataset seed) -> the study's name of that draw: the preset itself for seed 0
DRAWS = dict(sorted({**{(preset, 0): preset for preset in DEGRADATION_PRESETS},
                     **{draw: name for name, draw in DEGRADATION_DRAWS.items()}}.items()))


def _text(path: Path) -> str:
    """The file's text with line breaks and runs of spaces made single spaces (Markdown reflows freely)."""
    return " ".join(path.read_text().split())


@functools.lru_cache(maxsize=None)
def _record(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / name).read_text())


def _runs(key: str) -> list[dict]:
    return _record("quality.json")["runs"][key]


def _proxy(key: str) -> list[dict]:
    return _record("quality_proxy.json")["runs"][key]


def _to(runs: list[dict], baseline: str) -> list[float]:
    """Mean over runs of refined / `baseline` on the test split, for NDVI RMSE, EVI RMSE, SAM."""
    return [statistics.fmean(r["test"]["refined"][m] / r["test"][baseline][m] for r in runs) for m in SPECTRAL]


def _slashed(values) -> str:
    return " / ".join(f"{value:.2f}" for value in values)


def _goal(runs: list[dict], role: str = "refined") -> int:
    from bench._common import meets_goal

    return sum(meets_goal(r["test"][role], r["test"]["linear_fit"]) for r in runs)


def _beating_both(runs: list[dict]) -> int:
    """Runs beating `opt_v1` and the colour fit on the test split: the demo's own exit-0 rule."""
    from training.demo import gains, not_beaten

    return sum(not not_beaten(gains(r["test"])) for r in runs)


def _seeds(seeds: list[int]) -> str:
    """'0-2' for consecutive seeds (as the pages write them), else '0 and 1'."""
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return " and ".join(map(str, seeds))


def _train_tiles() -> int:
    """The training tiles of the quality study's demo runs, as its record's header states them."""
    header = (ROOT / "bench" / "results" / "quality.md").read_text()
    return int(header.split(" training tiles")[0].rsplit(" ", 1)[1])


def _test_tiles() -> int:
    """The shipped test split's tiles, as the quality study's runs count them."""
    return _runs("mild/after")[0]["test"]["n_tiles"]


def _bright_tiles() -> int:
    """The test tiles brighter than every training tile: the correction-bounds record's count, the same on every
    dataset (the targets are the sample's)."""
    (bright,) = {data["out_of_range_tiles"] for data in _record("correction_bounds.json")["datasets"].values()}
    return bright


def _interval_floor(preset: str) -> str:
    """The lowest upper end of the preset's demo intervals of EVI RMSE / colour fit, rounded down to the hundredth
    ("reaches 0.99 or more")."""
    highs = [r["test"]["bootstrap"]["linear_fit"]["evi_rmse"]["high"] for r in _runs(f"{preset}/after")]
    return f"{int(min(highs) * 100) / 100:.2f}"


def _sensitivity_settings() -> tuple[list[str], list[str]]:
    """The settings of the out-of-range rule the demo runs recorded ('quantile/ramp'), and those from the 99th
    percentile up."""
    keys = list(_runs("mild/after")[0]["test"]["fallback_sensitivity"])
    return keys, [key for key in keys if float(key.split("/")[0]) >= 0.99]


# Counts as the pages write them in words
WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 8: "eight", 9: "nine"}


def _label(key: tuple) -> str:
    """A draw as the page names it: "`mild` 0"."""
    return f"`{key[0]}` {key[1]}"


def _labels(keys: list[tuple]) -> str:
    """Draws named by preset, as the page lists them: "`mild` 1 and 2 and on `strong` 2"."""
    presets = dict.fromkeys(preset for preset, _ in keys)
    return " and on ".join(f"`{preset}` " + " and ".join(str(seed) for p, seed in keys if p == preset)
                           for preset in presets)


def _missing(text: str, phrases: list[str]) -> list[str]:
    return [phrase for phrase in phrases if phrase not in text]


def test_the_sample_and_its_splits_are_the_recorded_ones():
    """The intro's split sizes and the README's count of the bundled tiles, from the records' tile counts."""
    test, val = (_runs("mild/after")[0][split]["n_tiles"] for split in ("test", "val"))
    train = _train_tiles()
    pooled = {seed["n_tiles"] for summary in _record("rotation.json")["summary"].values() for seed in summary["seeds"]}
    assert pooled == {train + val + test}  # every tile of the sample held out once
    assert not _missing(_text(QUALITY), [
        f"(`data/sample/tiles`: {train} train / {val} val / {test} test BigEarthNet tiles)"])
    assert not _missing(_text(README), [
        f"`make demo` builds `data/sample/tiles` ({train + val + test} real BigEarthNet patches",
        f"how much the verdict hangs on which {test} tiles were held out"])


def test_the_goal_as_quoted_is_the_studies_rule():
    """The goal's thresholds on the page and in the README: the studies' own margins (`bench._common`)."""
    from bench._common import GOAL_MARGIN, OPT_V1_GOAL_MARGIN

    seeds = len(_record("quality.json")["seeds"])
    fit, opt_v1 = f"{1 - GOAL_MARGIN:.2f}", f"{1 - OPT_V1_GOAL_MARGIN:.2f}"
    assert not _missing(_text(QUALITY), [
        f"refined NDVI RMSE, EVI RMSE and SAM at most {fit} of the colour fit's, in each of {seeds} seeds; with "
        f"Stage 1 outputs of another generator, refined at least as good as the colour fit and at most {opt_v1} of "
        "`opt_v1`'s",
        f"(below 1 = better than the fit; the goal is {fit} or less on all three, in every seed)"])
    assert not _missing(_text(README), [
        f"the quality goal asks at most {fit} of the colour fit's on all three in every seed, and with another "
        f"generator at most {opt_v1} of `opt_v1`'s"])


def test_the_seeds_of_each_study_are_the_recorded_ones():
    """Each study's seeds (or their number) as the page and the README name them, from the study's record."""
    quality = _record("quality.json")
    three = len(quality["seeds"])
    assert all(len(runs) == three for runs in quality["runs"].values())
    assert all(len(runs) == three for runs in _record("quality_proxy.json")["runs"].values())
    assert all(len(runs) == three for runs in quality["mixture_bounds_on_mild"].values())
    weights = [_record(f"{name}.json")["seeds"] for name in ("reconstruction_weight", "identity_weight")]
    assert weights[0] == weights[1]

    def other_draws(runs: dict) -> list[int]:
        """The dataset seeds of the draws a record holds besides the first ('mild-seed1/after' -> 1)."""
        return sorted({int(key.split("/")[0].rsplit("-seed", 1)[1]) for key in runs if "-seed" in key})

    draws, proxy_draws = other_draws(quality["runs"]), other_draws(_record("quality_proxy.json")["runs"])
    every_draw = len({key.split("/")[0] for key in quality["runs"] if key.endswith("/after")})
    page = _text(QUALITY)
    assert not _missing(page, [
        f"Test split, mean of seeds {_seeds(quality['seeds'])}, NDVI RMSE / EVI RMSE / SAM:",
        f"Measured by `bench/study_quality.py` ({three} seeds, on the CPU;",
        f"`strong` and the proxy again, seeds {_seeds(_record('machines.json')['seeds'])}, on a machine other",
        f"on `mild`, `strong` and the proxy, {len(weights[0])} seeds each: `mild` EVI RMSE stays",
        f"trains the demo on each rotation with seeds {_seeds(_record('rotation.json')['seeds'])}, each rotation",
        f"({' and '.join(f'`{seed}`' for seed in draws).replace('`', '`--dataset_seed ', 1)}; {three} seeds each)",
        f"{' and '.join(f'`--seed {seed}`' for seed in proxy_draws)[1:]}, {three} seeds each)",
        f"(`--presets proxy-no-style --variants after fallback`, {three} seeds)",
        f"(`bench/study_quality.py --mixture_bounds`, {three} seeds, EVI RMSE",
        f"(rows `redraw` in `bench/results/quality.md`; {three} seeds)",
        f"with {len(_record('tile_conditioning.json')['seeds'])} seeds, and scores it on the test tiles",
        f"{_record('training_tiles.json')['steps']} steps, seeds {_seeds(_record('training_tiles.json')['seeds'])})",
        f"(seeds {_seeds(_record('mixture_label.json')['seeds'])}, the warm start's fit)",
        f"(`bench/results/tile_fallback.md`, {len(_record('tile_fallback.json')['seeds'])} seeds)",
        f"on all {WORDS[every_draw]} draws ({three} seeds each)",
        f"on the {WORDS[every_draw]} draws ({three} seeds each)",
        f"(`bench/results/quality_proxy.md`, {WORDS[1 + len(proxy_draws)]} draws, {three} seeds each)"])
    assert not _missing(_text(README), [
        f"(`bench/study_quality.py`, seeds {_seeds(quality['seeds'])} on the CPU;"])


def test_the_colour_fit_as_it_comes_is_the_recorded_ratio():
    """"not 0.75 / 0.91 / 0.79": the demo's ratios to the colour fit as every study scores it."""
    assert not _missing(_text(QUALITY), [f"(mean over seeds), not {_slashed(_to(_runs('mild/after'), 'linear_fit'))}."])


def test_the_bootstrap_intervals_reach_what_the_page_says():
    """"the `strong` ones to 0.95 or more, the `mild` ones to 0.99 or more": the lowest upper end of each preset's
    intervals, rounded down to the hundredth."""
    assert not _missing(_text(QUALITY), [f"the `strong` ones to {_interval_floor('strong')} or more, the `mild` ones "
                                         f"to {_interval_floor('mild')} or more"])


def test_the_weights_of_the_evi_term_are_the_recorded_ones():
    record = _record("evi_weight.json")
    larger = [value for value in record["values"] if float(value) != record["default"]]
    assert not _missing(_text(QUALITY), [f"Weighting the EVI term of the loss {' or '.join(larger)} times"])


def test_the_pooled_tiles_and_what_the_text_says_of_the_proxy_are_the_recorded_ones():
    """"On every tile of the sample": the tiles pooled per seed, the shipped test tiles, and against `opt_v1` on the
    proxy the shipped figure (1.14) and how far the pooled one misses the goal (about 0.10)."""
    from bench._common import OPT_V1_GOAL_MARGIN

    summary = _record("rotation.json")["summary"]
    (tiles,) = {seed["n_tiles"] for preset in summary.values() for seed in preset["seeds"]}
    shipped = _runs("mild/after")[0]["test"]["n_tiles"]
    pooled_evi = statistics.fmean(s["scores"]["refined"]["evi_rmse"] / s["scores"]["opt_v1"]["evi_rmse"]
                                  for s in summary["proxy"]["seeds"])
    assert not _missing(_text(QUALITY), [
        f"so that each of the {tiles} tiles is held out once",
        f"pools the three rotations' test tiles into one evaluation of {tiles} tiles per seed",
        f"| dataset | refined / colour fit, {tiles} tiles | refined / `opt_v1`, {tiles} tiles | seeds meeting the "
        f"goal: {tiles} tiles (the shipped {shipped}) |",
        f"On {shipped} tiles the verdict is the tiles'; on {tiles} it is a narrow pass.",
        f"over the three seeds), not {_to(_proxy('proxy/after'), 'opt_v1')[1]:.2f};",
        f"The goal asks {1 - OPT_V1_GOAL_MARGIN:.2f}: it is missed on EVI alone, by about "
        f"{pooled_evi - (1 - OPT_V1_GOAL_MARGIN):.2f}."])


def test_what_loses_to_opt_v1_on_the_other_draws_is_the_recorded_one():
    """"it loses on NDVI RMSE on `mild` 1 and 2 and on `strong` 2, and on EVI RMSE on `mild` 2": the metrics whose
    mean over seeds is not below `opt_v1`'s, draw by draw; and the runs below `opt_v1`'s without the hard pixels."""
    losing = {metric: [key for key, draw in DRAWS.items() if _to(_runs(f"{draw}/after"), "opt_v1")[index] >= 1]
              for index, metric in enumerate(SPECTRAL)}
    assert losing["ndvi_rmse"] and losing["evi_rmse"] and not losing["sam"]  # "it loses on NDVI RMSE ... and on EVI"
    every = [r["test"] for draw in DRAWS.values() for r in _runs(f"{draw}/after")]
    bright = sum(t["refined"]["ndvi_rmse_bright"] < t["opt_v1"]["ndvi_rmse_bright"] for t in every)
    in_range = sum(t["refined"]["evi_rmse_in_range"] < t["opt_v1"]["evi_rmse_in_range"] for t in every)
    assert in_range == len(every)  # "in all"
    assert not _missing(_text(QUALITY), [
        f"it loses on NDVI RMSE on {_labels(losing['ndvi_rmse'])}, and on EVI RMSE on {_labels(losing['evi_rmse'])}.",
        f"the refiner's NDVI RMSE is below `opt_v1`'s in {bright} of {len(every)} runs",
        f"(`evi_rmse_in_range`) its EVI RMSE is below `opt_v1`'s in all {in_range}."])


def test_the_bright_test_tiles_of_the_proxy_are_the_recorded_ones():
    """The 2 test tiles brighter than every training tile and the 16 in range, as the proxy's paragraphs count them
    (the correction-bounds record counts them per dataset, with the rule every study uses)."""
    data = _record("correction_bounds.json")["datasets"]["proxy"]
    bright, tiles = data["out_of_range_tiles"], data["tiles"]
    assert tiles == _proxy("proxy/after")[0]["test"]["n_tiles"]
    assert not _missing(_text(QUALITY), [
        f"Without the {bright} test tiles brighter than every training tile (`evi_rmse_in_range`)",
        f"the EVI RMSE of the {tiles - bright} test tiles in range (the {bright} others are brighter",
        f"**The loss is on the {bright} bright test tiles.** On the {tiles - bright} in range",
        f"On the {bright} cloud-covered ones the least-squares colour fit"])


def test_the_training_tiles_of_the_mixture_bounds_are_the_recorded_ones():
    bounds = _record("quality.json")["mixture_bounds_on_mild"]
    (subset,) = {run["train_tiles"] for run in bounds["mixture_mild_tiles"]}
    (both,) = {run["train_tiles"] for run in bounds["mild_and_strong"]}
    assert both % 2 == 0
    assert not _missing(_text(QUALITY), [
        f"*only the mixture's {subset} `mild` training tiles*",
        f"(all {both // 2} `mild` tiles kept, {both // 2} `strong` ones added)"])


def test_the_tile_conditioning_prose_is_the_recorded_one():
    """The tile statistics fed to the MLP (bands x quantiles), what they do to NDVI and SAM, and the tile affine
    change's EVI on `strong` and `mild`, from tile_conditioning.json."""
    record = _record("tile_conditioning.json")

    def ratios(dataset: str, variant: str) -> list[float]:
        data = record["datasets"][dataset]
        fit = data["baselines"]["colour fit"]
        return [statistics.fmean(run[m] / fit[m] for run in data["variants"][variant]) for m in SPECTRAL]

    quantiles = " / ".join(f"{100 * q:.0f}" for q in record["quantiles"])
    datasets = list(record["datasets"])
    worse = [[ratios(name, "pixel + tile statistics")[i] > ratios(name, "pixel")[i] for name in datasets]
             for i in (0, 2)]
    assert all(worse[0])  # "make NDVI worse on every dataset"
    assert not _missing(_text(QUALITY), [
        f"the same MLP also fed {4 * len(record['quantiles'])} tile statistics (each band's {quantiles} % quantile",
        f"and SAM on {WORDS[sum(worse[1])]} of the {WORDS[len(datasets)]}, while EVI moves",
        f"`strong` EVI improves too ({ratios('strong', 'tile affine + pixel')[1]:.2f} of the colour fit's)",
        f"it makes EVI much worse ({ratios('mild', 'tile affine + pixel')[1]:.2f}) by moving tiles"])


def test_the_training_sets_of_the_tiles_study_are_the_recorded_ones():
    record = _record("training_tiles.json")
    sizes = record["sizes"]
    sets = [len(record["datasets"]["mild"]["sizes"][size]) for size in sizes]
    assert all(int(size) * count == int(sizes[-1]) for size, count in zip(sizes, sets))  # disjoint, covering the pool
    assert not _missing(_text(QUALITY), [
        f"on {', '.join(sizes[:-1])} and {sizes[-1]} tiles. The {sizes[-1]} tiles of the "
        f"{' and '.join(record['pool_splits'])} splits are cut into {', '.join(map(str, sets[:-1]))} or {sets[-1]} "
        "disjoint training sets"])


def test_the_training_sets_of_the_mixture_label_study_are_the_recorded_ones():
    sizes = _record("mixture_label.json")["sizes"]
    (largest,) = {len(s["tiles"]) for s in sizes["36"]}
    assert not _missing(_text(QUALITY), [
        f"on the training sets of {' and '.join(sizes)} tiles above",
        f"`mild` tiles where the `mild` correction has {largest} (on {_train_tiles()} tiles"])


def test_what_the_text_says_of_the_correction_bounds_is_the_recorded_one():
    """"On `mild` the EVI goal sits at the bound" and the kernel colour fit on the `mixture`, from
    correction_bounds.json."""
    data = _record("correction_bounds.json")["datasets"]
    mild, mixture = data["mild"]["rows"], data["mixture"]["rows"]
    fit, oracle = mild["colour fit"]["evi_rmse_in_range"], mild["per-tile affine (oracle)"]["evi_rmse_in_range"]
    lead = 1 - mild["spectral fit"]["evi_rmse"] / mild["colour fit"]["evi_rmse"]
    assert not _missing(_text(QUALITY), [
        f"On the {data['mild']['tiles'] - data['mild']['out_of_range_tiles']} tiles in range the colour fit's EVI RMSE "
        f"({fit:.3f}) is within {100 * (fit / oracle - 1):.0f} % of a perfect per-tile affine correction's "
        f"({oracle:.3f}). The spectral fit's {100 * lead:.0f} % overall lead comes from the "
        f"{data['mild']['out_of_range_tiles']} bright tiles: in range it ties the colour fit "
        f"({mild['spectral fit']['evi_rmse_in_range']:.3f}).",
        f"(EVI RMSE {mixture['kernel colour fit']['evi_rmse']:.3f} on the `mild` tiles, against "
        f"{mixture['colour fit']['evi_rmse']:.3f} for the colour fit and {mixture['spectral fit']['evi_rmse']:.3f} for "
        "the spectral fit)"])


def test_the_out_of_range_rule_prose_is_the_recorded_one():
    """The counts the out-of-range paragraphs quote beside their table: seeds meeting the goal trained with the rule
    and applied from the 99th percentile up, the demo exiting 1 on seed 0, the rule's quantile."""
    from bench._common import meets_goal
    from bench.study_quality import SENSITIVITY

    trained = {preset: _goal(_runs(f"{preset}/fallback")) for preset in ("mild", "strong")}
    assert trained["mild"] == trained["strong"]
    keys, high = _sensitivity_settings()
    assert keys == [f"{q}/{ramp}" for q, ramp in SENSITIVITY]  # the settings the study scores, each recorded
    (met,) = {sum(meets_goal(r["test"]["fallback_sensitivity"][key], r["test"]["linear_fit"])
                  for r in _runs("mild/after")) for key in high}
    seeds = len(_runs("mild/after"))
    exits = ["0" if _beating_both([run]) else "1" for run in _runs("mild/fallback")]
    quantile = (ROOT / "bench" / "results" / "quality.md").read_text().split("beyond the ")[1].split("th percentile")[0]
    assert not _missing(_text(QUALITY), [
        f"a refiner trained with it gives most of that back, and meets the goal on both presets in "
        f"{trained['mild']} of {seeds} seeds.",
        f"`--out_of_range_fallback true` meets the goal on both presets in {trained['mild']} of {seeds} seeds",
        f"From the 99th percentile up ({len(high)} of the {len(keys)}), `mild` meets the goal in {met} of {seeds} "
        "seeds",
        f"so the demo trained with the rule exits {exits[0]} on that seed.",
        f"(Mahalanobis distance) than {quantile} % of the training pixels do."])


def test_the_near_black_prose_is_the_recorded_one():
    """The near-black threshold, and the counts the two near-black sections quote in words and figures."""
    quality = _record("quality.json")
    whole = {key: _runs(f"{draw}/near_black") for key, draw in DRAWS.items()}
    after = {key: _runs(f"{draw}/after") for key, draw in DRAWS.items()}
    ndvi = {key: _runs(f"{draw}/near_black_ndvi") for key, draw in DRAWS.items()}
    every = [sum(_beating_both(models[key]) == len(models[key]) for key in DRAWS) for models in (whole, after)]
    runs = [r for rs in ndvi.values() for r in rs]
    below = {split: sum(r[split]["refined"]["ndvi_rmse"] < r[split]["opt_v1"]["ndvi_rmse"] for r in runs)
             for split in ("test", "val")}
    assert below["test"] == below["val"]  # "each"
    (lost,) = [key for key in DRAWS if _goal(ndvi[key]) < _goal(whole[key])]  # the run keeping only the NDVI costs
    worst = max(r["test"]["refined"]["evi_rmse"] / r["test"]["linear_fit"]["evi_rmse"] for r in ndvi[lost])
    strong = [sum(_goal(rs) for key, rs in models.items() if key[0] == "strong") for models in (ndvi, whole, after)]
    strong_runs = sum(len(rs) for key, rs in ndvi.items() if key[0] == "strong")
    assert strong[0] == strong[1] == strong[2]  # "as both": the whole-pixel rule and the demo without it
    assert not _missing(_text(QUALITY), [
        f"keeps `opt_v1` where its red + NIR is at most {quality['near_black']:.2f} reflectance",
        f"every run beats both on {WORDS[every[0]]} of the {WORDS[len(DRAWS)]} draws, not {WORDS[every[1]]}.",
        f"below `opt_v1`'s in {below['test']} of {len(runs)} runs each, and "
        f"{sum(_beating_both(rs) for rs in ndvi.values())} of {len(runs)} runs beat both baselines",
        f"one {_label(lost)} run has EVI RMSE at {worst:.2f} of the colour fit's), {strong[0]} of {strong_runs} on "
        "`strong` "
        "as both."])


def test_the_reconstruction_l1_with_the_warm_start_change_is_the_recorded_one():
    """"What changed, and why" names its record for the figures after the change: the proxy's PSNR and EVI RMSE /
    `opt_v1`, `strong`'s PSNR and NDVI RMSE / colour fit at `--reconstruction_weight 5`."""
    summary = _record("reconstruction_weight.json")["summary"]["5"]
    figures = [summary["proxy"]["refined_psnr"]["psnr"][0], summary["proxy"]["ratios"]["opt_v1"][1][0],
               summary["strong"]["refined_psnr"]["psnr"][0], summary["strong"]["ratios"]["linear_fit"][0][0]]
    assert not _missing(_text(QUALITY), [
        f"with the change they are {figures[0]:.2f}, {figures[1]:.2f}, {figures[2]:.2f} and {figures[3]:.2f}"])


def test_the_readmes_runs_on_other_draws_are_the_recorded_ones():
    """"on two other draws ... it does not in any of 12 runs": every run of the other draws, none beating both."""
    others = [r for key, draw in DRAWS.items() if key[1] != 0 for r in _runs(f"{draw}/after")]
    assert _beating_both(others) == 0
    assert not _missing(_text(README), [f"it does not in any of {len(others)} runs, `mild` or `strong`"])


def test_every_count_of_test_or_training_tiles_is_the_recorded_one():
    """Wherever the page counts "N test tiles" or "N training tiles": the shipped split's (the records' tile counts),
    the test tiles in range or the bright ones (the correction-bounds record's, the same on every dataset)."""
    import re

    test, train, bright = _test_tiles(), _train_tiles(), _bright_tiles()
    found = []
    for match in re.finditer(r"\b(\d+) (test|training) tiles( in range| brighter| are brighter)?", _text(QUALITY)):
        count, split, after = int(match.group(1)), match.group(2), match.group(3)
        expected = (test - bright if after == " in range" else bright if after else
                    test if split == "test" else train)
        found.append((match.group(0), count == expected))
    assert len(found) >= 10 and all(ok for _, ok in found), [phrase for phrase, ok in found if not ok]
