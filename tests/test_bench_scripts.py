"""The benchmark and study scripts: what their records say was run and measured is what was."""
from __future__ import annotations

import json
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Tiles(torch.utils.data.Dataset):
    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return {"target": torch.zeros(1)}


def _slow_worker_start(_):
    time.sleep(1.0)


def test_the_read_rate_leaves_out_the_worker_start_up_of_every_epoch(bench):
    """64 tiles are 2 batches of 32: 96 tiles need a second epoch, whose workers start again (no
    `persistent_workers`). Timed, a 1 s start-up made the rate ~90 tiles/s; the recorded 2-worker rates read 2,000
    tiles of a 1,600-tile training split, so they paid one such start-up."""
    throughput = bench("bench_data_throughput")
    rate = throughput.time_read(_Tiles(64), {"num_workers": 1, "worker_init_fn": _slow_worker_start}, 96)
    assert rate > 500


class _WorkStarted(Exception):
    pass


def _start_work(*args, **kwargs):
    raise _WorkStarted


@pytest.mark.parametrize("flags, message", [
    (["--num_tiles", "70"], "--num_tiles 70 gives 56 training tiles; the reads need 64"),
    (["--slow_read_tiles", "0"], "--slow_read_tiles must be >= 1, got 0"),
])
def test_a_read_that_cannot_be_timed_is_refused_before_any_work(bench, monkeypatch, tmp_path, capsys, flags, message):
    """70 tiles give 56 training tiles, one batch of 32 an epoch: every batch was an epoch's first, so the read loop
    never ended (after the builds); a read of no tile has no rate."""
    throughput = bench("bench_data_throughput")
    for name in ("tune_allocator", "make_tiles"):
        monkeypatch.setattr(throughput, name, _start_work)
    monkeypatch.setattr(sys, "argv", ["bench_data_throughput.py", *flags, "--output", str(tmp_path / "bench.md")])
    with pytest.raises(SystemExit) as exited:
        throughput.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().endswith(message)
    assert [throughput.split_of(index) for index in range(10)].count("train") == 8


def test_the_export_record_names_the_threads_tiles_and_repeats_it_ran_with(bench, tmp_path):
    """export.md said `bench/bench_export.py --sizes tiny,600m` beside '2 thread(s)': that command runs 1 thread."""
    export = bench("bench_export")
    result = {"size": "tiny", "description": "demo", "parameters": 1, "export_seconds": 1.0, "export_bytes": 2**20,
              "export_difference": 1e-7, "peak_rss_gib": 1.0,
              "rows": [{"runtime": "eager fp32 (PeftModel, torch)", "batch": 1, "tiles_per_s": 10.0}]}
    export.write_report([result], tmp_path / "export.md", threads=2, tiles=16, repeats=3)
    text = (tmp_path / "export.md").read_text()
    assert "`bench/bench_export.py --sizes tiny --threads 2 --tiles 16 --repeats 3` on " in text
    assert ", 2 thread(s), 16 random 120x120 tiles per pass, best of 3 passes" in text


def test_the_export_benchmark_runs_the_smaller_size_first(bench, tmp_path, monkeypatch):
    """The peak RSS recorded for a size is the process's peak so far: `--sizes 600m,tiny` gave tiny the 600M's."""
    export = bench("bench_export")
    ran = []
    monkeypatch.setattr(export, "bench_size", lambda size, *args, **kwargs: ran.append(size) or {"size": size})
    monkeypatch.setattr(export, "write_report", lambda *args, **kwargs: None)
    assert export.main(["--sizes", "600m,tiny,tiny", "--output", str(tmp_path / "export.md")]) == 0
    assert ran == ["tiny", "600m"]


def test_the_quality_studys_script_line_gives_the_flags_it_ran_with(bench, repo_root, tmp_path):
    """quality.md said `bench/study_quality.py --seeds 0 1 2`; 9 demo trainings: that command trains 45. The 9 were
    `redraw` on `mild`, `strong` and the mixture, the rest reused."""
    study = bench("bench.study_quality")
    record = json.loads((repo_root / "bench" / "results" / "quality.json").read_text())
    args = study.parse_args(["--presets", "mild", "strong", "--variants", "redraw", "--mixture_variants", "redraw",
                             "--reuse", str(repo_root / "bench" / "results" / "quality.json"),
                             "--output", str(tmp_path / "quality.md")])
    flags = study.command_line(args)
    assert flags == (f"--presets mild strong --seeds 0 1 2 --variants redraw --mixture_variants redraw --reuse "
                     f"{repo_root / 'bench' / 'results' / 'quality.json'}")
    runs = {(preset, "redraw"): record["runs"][f"{preset}/redraw"] for preset in ("mild", "strong")}
    text = study.render(runs, {"redraw": record["mixture_on_mild"]["redraw"]}, args.seeds, 60.0, "0.0",
                        arguments=flags)
    assert text.splitlines()[2].startswith(f"Script: `bench/study_quality.py {flags}`; "
                                           f"{len(study.planned_jobs(args))} demo trainings")
    no_mixture = study.parse_args(["--presets", "proxy", "--no-mixture", "--mixture_bounds", "--output",
                                   str(tmp_path / "quality.md")])
    assert study.command_line(no_mixture) == ("--presets proxy --seeds 0 1 2 --variants "
                                              f"{' '.join(study.VARIANT_FLAGS)} --no-mixture --mixture_bounds")


def test_the_script_line_of_the_after_runs_studies_gives_the_demo_flags(bench):
    after_runs = bench("bench._after_runs")
    record = {"presets": ["mild"], "seeds": [0, 1], "machine": {"cpu": "c", "torch": "t", "cpu_capability": "k"},
              "demo_flags": ["--max_steps", "10"]}
    line = after_runs.script_line("study_machines.py", record, 60.0, "0.0")
    assert line.startswith("Script: `bench/study_machines.py --presets mild --seeds 0 1 -- --max_steps 10`; 2 demo")
    record["demo_flags"] = []
    assert after_runs.script_line("study_machines.py", record, 60.0, "0.0").startswith(
        "Script: `bench/study_machines.py --presets mild --seeds 0 1`; 2 demo")


class _Peft(torch.nn.Module):
    """A PeftModel's `get_base_model()` with one backbone block of the refiner's linears (biased, as Prithvi's)."""

    def __init__(self):
        super().__init__()
        block = torch.nn.Module()
        block.attn = torch.nn.Module()
        block.attn.qkv, block.attn.proj = torch.nn.Linear(4, 12), torch.nn.Linear(4, 4)
        block.mlp = torch.nn.Module()
        block.mlp.fc1, block.mlp.fc2 = torch.nn.Linear(4, 16), torch.nn.Linear(16, 4)
        self.backbone = torch.nn.Module()
        self.backbone.blocks = torch.nn.ModuleList([block])

    def get_base_model(self):
        return self


def test_the_8bit_floor_counts_the_block_linears_weights_not_their_biases(bench, tmp_path):
    """LLM.int8 quantizes the weights; the biases stay fp32. The record counted 629,514,240 'block-linear weights'
    (0.630 GB at a byte each): 629,145,600 weights + 368,640 biases (32 blocks x 11,520)."""
    memory_bench = bench("bench_refiner_memory")
    summarize = bench("bench.summarize")
    measured = memory_bench.base_model_bytes(_Peft())
    assert measured["block_linear_weights"] == 4 * 12 + 4 * 4 + 4 * 16 + 16 * 4  # 192; with the biases 228
    assert measured["parts"]["backbone block linears"] == 4 * 228
    summary = {"trainable": 1, "lora": 1, "metadata_embedding": 0, "fusion": 0, "head": 0}
    memory = {mode: {"memory": measured, "summary": summary, "backbone_parameters": 228, "build_seconds": 1.0,
                     "rss_after_build_gb": 1.0, "peak_rss_gb": 1.0} for mode in memory_bench.MODES}
    timing = {"times": {mode: {"forward": [1.0], "step": [2.0]} for mode in memory_bench.MODES}, "threads": 1,
              "torch": "t"}
    (tmp_path / "refiner_memory.md").write_text(memory_bench.report(memory, timing, 1, (0.0, 0.0)))
    assert summarize.refiner_memory(tmp_path).block_weights == 192
