"""The quality study's demo runs trained again on this machine: does a verdict depend on the machine it was reached on?

    .venv/bin/python bench/study_machines.py [--presets mild strong proxy] [--seeds 0 1 2] [--jobs 2]
                                             [--output bench/results/machines.md] [-- DEMO FLAGS]

`bench/study_quality.py` records each run of the demo's `after` model once, on the machine the study ran on. The demo
is deterministic on one machine (same seed, same numbers; on two threads instead of one they move in the last digits),
but machines differ in their CPUs and in the kernels torch and its libraries pick for them, and a refiner trained
against a discriminator, whose best step is chosen by the validation loss, can amplify such float differences. This
study trains the same runs again here (`bench.study_quality.train`: `python -m training.demo`, one thread each),
scores their test tiles as `bench/study_rotation.py` scores rotation 0 (the sample as shipped), and puts each run
beside its record (`bench/results/quality.json`, `quality_proxy.json` for `proxy`): the scores, refined / each
baseline and whether the run meets its preset's goal (`bench.study_rotation.meets_preset_goal`). Writes the tables to
`--output` and every number (each tile's statistics included) to the same name with `.json`. Flags after `--` go to
the demo (for a quick run of the script itself; a record is only comparable without them).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._after_runs import machine, parse_arguments, script_line, train_after_runs  # noqa: E402
from bench._common import SPECTRAL, load_average, load_span, record_study  # noqa: E402
from bench.study_quality import PROXY_PRESETS  # noqa: E402
from bench.study_rotation import (  # noqa: E402
    BASELINES, ROLES, held_out_tile_statistics, meets_preset_goal, ratios, scores,
)

RESULTS = REPO / "bench" / "results"
DIGITS = 4  # of the scores in the tables


def recorded_runs(preset: str, results: Path = RESULTS) -> list[dict]:
    """The quality study's recorded `after` runs of `preset`, one per seed: their test-split scores (role -> metric ->
    value) of the refined output and both baselines."""
    name = "quality_proxy.json" if preset in PROXY_PRESETS else "quality.json"
    runs = json.loads((results / name).read_text())["runs"][f"{preset}/after"]
    return [{role: {metric: run["test"][role][metric] for metric in SPECTRAL} for role in ROLES} for run in runs]


def compare(preset: str, here: dict, recorded: dict) -> dict:
    """One run trained here beside its record: both runs' scores, refined / each baseline, the goal met or not, and the
    largest relative difference of any refined score."""
    return {
        "here": here, "recorded": recorded,
        "ratios": {side: {baseline: ratios(scored, baseline) for baseline in BASELINES}
                   for side, scored in (("here", here), ("recorded", recorded))},
        "goal": {side: meets_preset_goal(preset, scored) for side, scored in (("here", here), ("recorded", recorded))},
        "largest_change": max(abs(here["refined"][m] / recorded["refined"][m] - 1) for m in SPECTRAL),
    }


def summarise(record: dict) -> dict:
    """preset -> {"seeds_meeting_goal": {"here", "recorded"}, "changed_seeds": seeds whose verdict differs}."""
    summary = {}
    for preset, runs in record["presets"].items():
        summary[preset] = {
            "seeds_meeting_goal": {side: sum(run["goal"][side] for run in runs) for side in ("here", "recorded")},
            "changed_seeds": [seed for seed, run in zip(record["seeds"], runs)
                              if run["goal"]["here"] != run["goal"]["recorded"]],
        }
    return summary


def render(record: dict, seconds: float, load: str) -> str:
    lines = [
        "# The quality study's runs trained again on another machine",
        "",
        script_line("study_machines.py", record, seconds, load),
        "",
        "Each run beside its record in `bench/results/quality.json` (`quality_proxy.json` for `proxy`), test split. "
        "Refined / colour fit and refined / `opt_v1`: NDVI RMSE / EVI RMSE / SAM. Goal: the preset's "
        "(`bench/study_rotation.py`). Largest change: of any refined score, relative to the record.",
        "",
        "| preset | seed | refined EVI RMSE here / recorded | / colour fit here | recorded | / `opt_v1` here | "
        "recorded | goal met here / recorded | largest change |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def slashed(values) -> str:
        return " / ".join(f"{value:.2f}" for value in values)

    for preset, runs in record["presets"].items():
        for seed, run in zip(record["seeds"], runs):
            evi = [run[side]["refined"]["evi_rmse"] for side in ("here", "recorded")]
            cells = [slashed(run["ratios"][side][baseline]) for baseline in BASELINES for side in ("here", "recorded")]
            goals = " / ".join("yes" if run["goal"][side] else "no" for side in ("here", "recorded"))
            lines.append(f"| `{preset}` | {seed} | {evi[0]:.{DIGITS}f} / {evi[1]:.{DIGITS}f} | " + " | ".join(cells)
                         + f" | {goals} | {100 * run['largest_change']:.2f} % |")
    lines += ["", "| preset | seeds meeting the goal here | recorded | seeds whose verdict changed |",
              "| --- | --- | --- | --- |"]
    for preset, summary in record["summary"].items():
        met = summary["seeds_meeting_goal"]
        changed = ", ".join(map(str, summary["changed_seeds"])) or "none"
        lines.append(f"| `{preset}` | {met['here']} of {len(record['seeds'])} | {met['recorded']} of "
                     f"{len(record['seeds'])} | {changed} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser, args, demo_flags = parse_arguments(__doc__.split("\n\n")[0], list(sys.argv[1:] if argv is None else argv),
                                               RESULTS / "machines.md")
    recorded = {preset: recorded_runs(preset) for preset in args.presets}
    missing = sorted({seed for seed in args.seeds for runs in recorded.values() if not 0 <= seed < len(runs)})
    if missing:
        parser.error(f"--seeds {' '.join(map(str, missing))}: the quality study recorded seeds 0-"
                     f"{min(map(len, recorded.values())) - 1} only")

    load_start, start = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stage2-machines-") as tmp:
        folders, trained = train_after_runs(args, demo_flags, Path(tmp))
        record: dict = {"seeds": args.seeds, "machine": machine(), "demo_flags": demo_flags,
                        "presets": {preset: [] for preset in args.presets}}
        for (preset, seed), model_dir in trained.items():
            statistics = held_out_tile_statistics(model_dir, folders[preset])
            run = compare(preset, scores(statistics), recorded[preset][seed])
            record["presets"][preset].append({**run, "tile_statistics": statistics})
            print(f"{preset} seed {seed} done", flush=True)
    record["summary"] = summarise(record)
    record_study(args.output, render(record, time.perf_counter() - start, load_span(load_start)), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
