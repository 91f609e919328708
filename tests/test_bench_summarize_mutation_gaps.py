"""Behaviour of BENCHMARKS.md's generator (`bench/summarize.py`) and the benchmarks' shared helpers (`bench/_common.py`)
that plausible bugs used to get past the suite (a mutation audit; `test_benchmark_figures.py` checks the committed
records and a few edits of them): a results file the parsers cannot read exits 2 naming it rather than with a traceback
(or an exit 1 that `--check` reads as "out of date"), and the figures, verdicts and goal counts of the rows on edge
cases the committed records do not hold. Every input is a small synthetic results file or record, no benchmark runs."""
from __future__ import annotations

import json
import sys

import pytest


@pytest.fixture(scope="module")
def summarize(repo_root):
    sys.path.insert(0, str(repo_root))
    from bench import summarize

    return summarize


def _metrics(ndvi: float, evi: float, sam: float) -> dict:
    return {"ndvi_rmse": ndvi, "evi_rmse": evi, "sam": sam}


def _run(refined, linear_fit=(1.0, 1.0, 1.0), opt_v1=(1.0, 1.0, 1.0)) -> dict:
    """One seed's result as the quality studies record it: test scores of each output (NDVI RMSE, EVI RMSE, SAM)."""
    return {"test": {"refined": _metrics(*refined), "linear_fit": _metrics(*linear_fit), "opt_v1": _metrics(*opt_v1)}}


# ----------------------------------------------------------------------------------- parsing the results files
def test_a_number_keeps_its_thousands(summarize, tmp_path):
    """The benchmarks write counts with thousands separators ('2,420'): the cell's number is 2420, not 2."""
    assert summarize.number("**2,420 tiles/s**", tmp_path, "rate") == 2420
    assert summarize.number("1,234.5", tmp_path, "rate") == 1234.5


def test_an_undecodable_results_file_exits_2_naming_it(summarize, tmp_path):
    """A results file that is no text (a broken copy) is named, exit 2, not a UnicodeDecodeError's traceback."""
    (tmp_path / "prithvi_forward.md").write_bytes(b"\xff\xfe\x00| input |")
    with pytest.raises(summarize.ResultsError, match="prithvi_forward.md: not readable"):
        summarize.prithvi_forward(tmp_path)


def test_a_record_that_is_no_object_exits_2_naming_it(summarize, tmp_path):
    """A record holding a JSON list (or number) is named, not an AttributeError's traceback further on."""
    (tmp_path / "rotation.json").write_text("[1, 2]")
    with pytest.raises(summarize.ResultsError, match="rotation.json: not a JSON object"):
        summarize.rotation(tmp_path)


def test_a_row_is_found_by_the_start_of_its_label(summarize, tmp_path):
    """`fp32` is the row starting so, not an earlier one naming fp32 further on (its figures would be the 8-bit's)."""
    table = summarize.find_table("| backbone | samples/s |\n| --- | --- |\n| 8-bit (fp32 scales) + LoRA | 0.27 |\n"
                                 "| **fp32** + LoRA | 0.34 |\n", tmp_path, "backbone")
    assert summarize.find_row(table, tmp_path, "backbone", "fp32")["samples/s"] == "0.34"


def _data_throughput(tmp_path, build_rows: str, read_rows: str):
    """data_throughput.md with the build table's and the read table's rows given (the benchmark's layout)."""
    (tmp_path / "data_throughput.md").write_text(
        "Input: 20 real tiles.\n\n"
        "| num_proc | wall seconds | tiles/s (wall) | 160k tiles at this wall rate |\n| --- | --- | --- | --- |\n"
        f"{build_rows}\nGoal: 160k tiles in under 10 minutes.\n\n| path | tiles/s |\n| --- | --- |\n{read_rows}\n")


BUILD_ROWS = "| 1 | 7.7 | 260 | 10.3 min |\n| 2 | 4.5 | 445 | 6.0 min |\n"
READ_ROWS = ("| numpy format + transform in collate_fn, 0 workers | 1640 |\n"
             "| set_transform(make_train_transform()), 0 workers | 86 |\n")


def test_a_build_table_without_rows_or_reads_without_a_path_exits_2_naming_it(summarize, tmp_path):
    """An empty build table, or a read table without the numpy (or `set_transform`) rows, is named, exit 2, not a
    ValueError of max() over nothing."""
    _data_throughput(tmp_path, BUILD_ROWS, READ_ROWS)
    assert summarize.data_throughput(tmp_path).best_build_minutes == 6.0
    _data_throughput(tmp_path, "", READ_ROWS)
    with pytest.raises(summarize.ResultsError, match="data_throughput.md: the build table has no rows"):
        summarize.data_throughput(tmp_path)
    _data_throughput(tmp_path, BUILD_ROWS, READ_ROWS.splitlines()[1])
    with pytest.raises(summarize.ResultsError, match="no read-table row starting with 'numpy format'"):
        summarize.data_throughput(tmp_path)


@pytest.mark.parametrize(("floor_gb", "reachable"), [(0.22, True), (0.25, True), (0.251, False), (0.19, True)])
def test_the_design_memory_is_reachable_when_the_8bit_floor_is_within_its_top(summarize, floor_gb, reachable):
    """"the design's 200-250 MB is reachable in 8-bit" where the block linears' floor is at most 250 MB."""
    precisions = dict.fromkeys(summarize.REFINER_PRECISIONS, 1.0)
    memory = summarize.RefinerMemory(total_gb=precisions, block_weights=220_000_000, floor_gb=floor_gb,
                                     design_mb=(200, 250), forward_min_s=precisions, step_min_s=precisions, rounds=5)
    _, row, _ = summarize.refiner_memory_row(memory)
    assert row.endswith(f"the design's 200-250 MB is {'' if reachable else 'not '}reachable in 8-bit)")


EXPORT_RATES = [(model, runtime, batch) for model in ("tiny", "600m")
                for runtime in ("eager fp32 (torch)", "eager 8-bit (bitsandbytes)", "ONNX Runtime (CPU)")
                for batch in (1, 8)]


def _export(tmp_path, rates) -> None:
    (tmp_path / "export.md").write_text(
        "2 thread(s)\n\n| model | runtime | batch | tiles/s |\n| --- | --- | ---: | ---: |\n"
        + "".join(f"| {model} | {runtime} | {batch} | 1.5 |\n" for model, runtime, batch in rates)
        + "\n| model | ONNX export time | ONNX files | max abs(ONNX - eager) | peak RSS |\n"
        "| --- | --- | --- | --- | --- |\n| 600m | 61.0 s | 2419.6 MiB | 3.0e-07 | 6.08 GiB |\n")


def test_an_export_table_missing_a_rate_exits_2_naming_it(summarize, tmp_path):
    """The row quotes every model and runtime at every batch: one missing is named (exit 2), not a KeyError later."""
    _export(tmp_path, EXPORT_RATES)
    assert summarize.export(tmp_path).batches == [1, 8]
    _export(tmp_path, [rate for rate in EXPORT_RATES if rate != ("600m", "eager 8-bit (bitsandbytes)", 8)])
    with pytest.raises(summarize.ResultsError, match="export.md: no 600m 'eager 8-bit' rate at batch 8"):
        summarize.export(tmp_path)


def test_a_training_table_without_a_backbones_matmul_fraction_exits_2_naming_it(summarize, tmp_path):
    (tmp_path / "training.md").write_text(
        "| backbone | samples/s (mean) | peak RSS while training (GiB) |\n| --- | --- | --- |\n"
        "| 8-bit + LoRA | 0.269 | 2.89 |\n| fp32 + LoRA | 0.337 | 3.65 |\n\n"
        "matmul rate: **180.4 GFLOP/s**.\n\ntraining step on one tile: **232.2 GFLOP**.\n\n"
        "| backbone | fraction of the measured matmul rate |\n| --- | --- |\n| 8bit | 35% |\n")
    with pytest.raises(summarize.ResultsError, match="training.md: no matmul-rate fraction for the backbone 'none'"):
        summarize.training(tmp_path)


def _loss_weight_record(tmp_path, spreads=None, **changes) -> dict:
    """evi_weight.json of three values (default 1) on `mild` and `strong`, written under tmp_path. `spreads`: value ->
    (mean, min, max) of refined / colour fit on every metric (default: the same spread for every value)."""
    values = ["0.5", "1", "2"]
    spreads = {value: (0.8, 0.75, 0.85) for value in values} | (spreads or {})
    record = {"parameter": "evi_weight", "default": 1.0, "values": values, "presets": ["mild", "strong"],
              "seeds": [0, 1, 2],
              "summary": {value: {preset: {"ratios": {"linear_fit": [list(spreads[value])] * 3},
                                           "seeds_meeting_goal": 1} for preset in ("mild", "strong")}
                          for value in values}}
    record.update(changes)
    (tmp_path / "evi_weight.json").write_text(json.dumps(record))
    return record


@pytest.mark.parametrize(("change", "problem"), [
    ({"seeds": []}, "'seeds' is not a list of integers"),  # the row would say "mean of 0 seeds"
    ({"presets": []}, "'presets' is not a list of strings"),
])
def test_a_loss_weight_record_without_seeds_or_presets_exits_2(summarize, tmp_path, change, problem):
    _loss_weight_record(tmp_path, **change)
    with pytest.raises(summarize.ResultsError, match=f"evi_weight.json: {problem}"):
        summarize.loss_weight(tmp_path, "evi_weight")


def test_a_loss_weight_summary_without_a_ratio_per_metric_exits_2(summarize, tmp_path):
    """Two ratios for three metrics would print as 'NDVI / EVI' under the heading 'NDVI RMSE / EVI RMSE / SAM'."""
    record = _loss_weight_record(tmp_path)
    summarize.loss_weight(tmp_path, "evi_weight")
    record["summary"]["2"]["strong"]["ratios"]["linear_fit"].pop()
    (tmp_path / "evi_weight.json").write_text(json.dumps(record))
    with pytest.raises(summarize.ResultsError, match="the summary of value 2 on 'strong' has no 'ratios' 'linear_fit'"):
        summarize.loss_weight(tmp_path, "evi_weight")


@pytest.mark.parametrize(("spread", "within"), [
    ((0.9, 0.86, 0.95), False),  # above the default's spread (0.75-0.85)
    ((0.65, 0.6, 0.7), False),  # below it
    ((0.9, 0.85, 0.95), True),  # touching it: overlaps
    ((0.7, 0.6, 0.75), True),
])
def test_the_loss_weight_verdict_reads_the_spread_on_both_sides_of_the_defaults(summarize, tmp_path, spread, within):
    record = _loss_weight_record(tmp_path, spreads={"2": spread})
    assert summarize.within_default_spread(record) is within
    _, row, _ = summarize.loss_weight_row(tmp_path, "evi_weight")
    assert row.endswith(f": {'' if within else 'not '}every value within the seed spread of the default's")


def test_the_loss_weight_verdict_reads_every_preset(summarize, tmp_path):
    """A value outside the default's spread on the second preset only is not "within the seed spread"."""
    record = _loss_weight_record(tmp_path)
    record["summary"]["0.5"]["strong"]["ratios"]["linear_fit"][2] = [0.65, 0.6, 0.7]  # SAM, `strong` only
    assert summarize.within_default_spread(record) is False


def test_the_loss_weight_row_quotes_each_values_ratios_and_goal_count(summarize, tmp_path):
    record = _loss_weight_record(tmp_path, spreads={"0.5": (0.9, 0.86, 0.95)})
    record["summary"]["2"]["strong"]["seeds_meeting_goal"] = 3
    (tmp_path / "evi_weight.json").write_text(json.dumps(record))
    figure, row, details = summarize.loss_weight_row(tmp_path, "evi_weight")
    assert figure.startswith("Loss weight `evi_weight` 0.5 / 1 (default) / 2 on the demo")
    assert figure.endswith("mean of 3 seeds")
    assert row == ("`mild` 0.90 / 0.90 / 0.90, 0.80 / 0.80 / 0.80, 0.80 / 0.80 / 0.80 (1, 1, 1 of 3 seeds meeting the "
                   "goal); `strong` 0.90 / 0.90 / 0.90, 0.80 / 0.80 / 0.80, 0.80 / 0.80 / 0.80 (1, 1, 3 of 3 seeds "
                   "meeting the goal): not every value within the seed spread of the default's")
    assert details == "`bench/results/evi_weight.md`"


# ----------------------------------------------------------------------------------- the quality rows
GOOD, POOR = (0.5, 0.5, 0.5), (0.95, 0.5, 0.5)  # refined scores meeting the goal (colour fit 1.0) / missing it on NDVI


def _study(summarize, seeds=(0, 1, 2), **runs):
    """A quality study of `runs` (key 'mild/after' written mild__after) each the refined scores of one run per seed."""
    return summarize.QualityStudy(
        runs={key.replace("__", "/"): [_run(refined) for refined in scores] for key, scores in runs.items()},
        mixture_on_mild=[], seeds=list(seeds))


def test_the_seeds_of_a_study_are_a_range_only_where_consecutive(summarize):
    assert summarize.seed_range([0, 1, 2]) == "0-2"
    assert summarize.seed_range([0, 2, 5]) == "0, 2, 5"


def test_a_quality_record_with_seeds_that_are_no_integers_exits_2(summarize, tmp_path):
    """The demo row prints the seeds ('0-2'): seeds of 1.5 would end in a TypeError of `range`, not a message."""
    runs = [_run(GOOD)] * 3
    record = {"seeds": [0, 1.5, 2], "runs": {"proxy/before": runs, "proxy/after": runs}}
    (tmp_path / "quality_proxy.json").write_text(json.dumps(record))
    with pytest.raises(summarize.ResultsError, match="quality_proxy.json: no list of integer 'seeds'"):
        summarize.quality_proxy(tmp_path)
    record["seeds"] = [0, 1, 2]
    (tmp_path / "quality_proxy.json").write_text(json.dumps(record))
    assert summarize.quality_proxy(tmp_path).seeds == [0, 1, 2]


def test_ratios_to_opt_v1_are_the_mean_over_seeds_of_each_seeds_ratio(summarize):
    """As the ratios to the colour fit: the mean of per-seed ratios, not the ratio of the means."""
    runs = [_run((0.2, 0.2, 0.2), opt_v1=(1.0, 1.0, 1.0)), _run((0.4, 0.4, 0.4), opt_v1=(0.5, 0.5, 0.5))]
    assert summarize.ratios_to_opt_v1(runs) == pytest.approx([0.5] * 3)  # not 0.6 / 1.5 = 0.4


def test_a_rate_has_one_decimal_from_10_up(summarize):
    assert (summarize.rate(10.0), summarize.rate(9.994), summarize.rate(123.45)) == ("10.0", "9.99", "123.5")


@pytest.mark.parametrize(("mixture", "verdict"), [
    ((1.0, 1.1, 1.2), "not worse beyond the seed spread"),  # worse on the mean, within the `mild` spread (0.9-1.15)
    ((1.16, 1.2, 1.3), "much worse, beyond the seed spread"),
])
def test_the_mixture_is_worse_beyond_the_spread_only_when_its_best_seed_is_worse_than_milds_worst(summarize, mixture,
                                                                                                    verdict):
    mild = [_run((0.5, evi, evi)) for evi in (0.9, 1.0, 1.15)]
    mixed = [_run((0.5, evi, evi)) for evi in mixture]
    assert summarize._mixture_against_mild(mixed, mild).endswith(f": {verdict}")


def test_the_goal_count_of_each_draw_is_out_of_the_seeds_and_the_fallbacks_only_where_every_draw_has_them(summarize):
    """Two draws of `mild` (dataset seeds 0 and 1) of three seeds each: counts 'of 3 seeds', not 'of 2' draws; the
    fallback counts only where both draws trained it."""
    study = _study(summarize, mild__after=[GOOD, GOOD, POOR], **{"mild-seed1__after": [GOOD, POOR, POOR]},
                   mild__fallback=[GOOD] * 3)
    text = summarize._degradation_draws(study)
    assert text.startswith("; on other draws of the degradations' errors (`--dataset_seed`): `mild` with dataset "
                           "seeds 0, 1: 2, 1 of 3 seeds meeting the goal, refined / `opt_v1` ")
    assert "--out_of_range_fallback" not in text
    study.runs["mild-seed1/fallback"] = [_run(POOR)] * 3
    assert " of 3 seeds meeting the goal (trained with `--out_of_range_fallback true`: 3, 0), " in \
        summarize._degradation_draws(study)
    del study.runs["mild-seed1/after"]
    assert summarize._degradation_draws(study) == ""


def test_refined_psnr_is_quoted_only_where_every_value_recorded_it(summarize, tmp_path):
    """A record mixing runs before and after PSNR was recorded quotes none (not a KeyError)."""
    record = _loss_weight_record(tmp_path)
    for value, psnr in (("0.5", 20.0), ("1", 21.0)):
        for preset in record["presets"]:
            record["summary"][value][preset]["refined_psnr"] = {"psnr": [psnr, 19.0, 22.0], "psnr_in_range": [25.0]}
    assert summarize.refined_psnr_part(record) == ""
    for preset in record["presets"]:
        record["summary"]["2"][preset]["refined_psnr"] = {"psnr": [22.004], "psnr_in_range": [26.0]}
    assert summarize.refined_psnr_part(record) == ("; refined PSNR (dB), mean of seeds: `mild` 20.00 / 21.00 / 22.00 "
                                                   "(in range 25.00 / 25.00 / 26.00), `strong` 20.00 / 21.00 / 22.00 "
                                                   "(in range 25.00 / 25.00 / 26.00)")


def test_a_rotation_goal_that_is_no_boolean_exits_2(summarize, tmp_path):
    """The row counts the seeds meeting the goal: a goal recorded as "no" would end in a TypeError of sum()."""
    seed = {"goal": True, "n_tiles": 54, "scores": {role: _metrics(0.5, 0.5, 0.5) for role in summarize.ROTATION_ROLES}}
    record = {"summary": {"mild": {"seeds": [seed, dict(seed, goal=False)]}}}
    (tmp_path / "rotation.json").write_text(json.dumps(record))
    assert summarize.rotation_row(tmp_path)[1] == "`mild` / colour fit 1.00 / 1.00 / 1.00, goal met by 1 of 2"
    record["summary"]["mild"]["seeds"][1]["goal"] = "no"
    (tmp_path / "rotation.json").write_text(json.dumps(record))
    with pytest.raises(summarize.ResultsError, match="rotation.json: summary of 'mild' lacks each seed's 'goal'"):
        summarize.rotation(tmp_path)


# ----------------------------------------------------------------------------------- BENCHMARKS.md
def test_markers_in_the_wrong_order_exit_2_rather_than_doubling_the_file(summarize, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    document = f"intro\n{summarize.END_MARKER}\nmiddle\n{summarize.BEGIN_MARKER}\nend\n"
    with pytest.raises(summarize.ResultsError, match="BENCHMARKS.md: no '<!-- generated"):
        summarize.with_table(document, "| a |", path)
    assert summarize.with_table(f"intro\n{summarize.BEGIN_MARKER}\nold\n{summarize.END_MARKER}\nend\n", "| a |",
                                path) == f"intro\n{summarize.BEGIN_MARKER}\n\n| a |\n\n{summarize.END_MARKER}\nend\n"


def test_benchmarks_md_is_replaced_in_one_rename(summarize, tmp_path, monkeypatch):
    """The new text goes to a temporary file renamed over BENCHMARKS.md: a write that fails before the rename leaves
    the old file whole (an `open('w')` truncates it first) and no temporary beside it."""
    import os

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("old\n")

    def failed_rename(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failed_rename)
    with pytest.raises(OSError, match="disk full"):
        summarize.write_atomically(path, "new\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]
    monkeypatch.undo()
    summarize.write_atomically(path, "new\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]


# ----------------------------------------------------------------------------------- bench/_common.py
def test_the_goal_is_met_at_exactly_the_margin_and_only_on_every_metric(repo_root):
    sys.path.insert(0, str(repo_root))
    from bench._common import meets_goal

    colour_fit = _metrics(1.0, 2.0, 0.5)
    assert meets_goal(_metrics(0.9, 1.8, 0.45), colour_fit)  # "at least 10 % better": 0.9 of the colour fit meets it
    assert not meets_goal(_metrics(0.9, 1.8, 0.4501), colour_fit)
    assert not meets_goal(_metrics(0.1, 0.1, 0.46), colour_fit)


def test_a_study_header_gives_the_load_at_the_start_then_at_the_end(repo_root, monkeypatch):
    import os

    sys.path.insert(0, str(repo_root))
    from bench._common import load_span

    monkeypatch.setattr(os, "getloadavg", lambda: (1.34, 0.5, 0.26))
    assert load_span("0.7 1.0 1.2") == "0.7 1.0 1.2 at the start, 1.3 0.5 0.3 at the end"
