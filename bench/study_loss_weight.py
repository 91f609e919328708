"""Which value of one loss weight gives the best refined output on the bundled sample?

    .venv/bin/python bench/study_loss_weight.py [--parameter reconstruction_weight] [--values 0 0.5 1 2 5]
                                                [--seeds 0 1 2] [--output bench/results/reconstruction_weight.md]

Runs the demo (`python -m training.demo`: `configs/demo.yaml`, the tiny backbone on the CPU, best step picked on
the validation split) once per value and seed, each in its own process with `--<parameter> VALUE --seed SEED`,
and tabulates NDVI RMSE, EVI RMSE, SAM and PSNR of the refined output on the held-out test split and on the
validation split, next to `opt_v1`. The value with the lowest mean (over seeds) of the test split's three
spectral metrics, each relative to `opt_v1`, is reported as the best; the rest of the table says how much that
choice matters against the seed-to-seed spread. About a minute per run on 2 idle cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import SPECTRAL, mean_range_cell  # noqa: E402

COLUMNS = SPECTRAL + ("psnr",)


def run_demo(parameter: str, value: str, seed: int, workdir: Path) -> dict:
    output = workdir / f"{parameter}={value}-seed{seed}"
    command = [sys.executable, "-m", "training.demo", "--output_dir", str(output), f"--{parameter}", value,
               "--seed", str(seed), "--disable_tqdm", "true", "--report_to", "none"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    results_file = output / "demo_results.json"
    if not results_file.is_file():  # exit status 1 only means "did not beat opt_v1": the results are still there
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(results_file.read_text())


def relative_spectral_score(split_results: dict) -> float:
    """Mean over NDVI RMSE, EVI RMSE and SAM of refined / opt_v1 (1 = no gain, lower is better)."""
    return statistics.fmean(split_results["refined"][m] / split_results["opt_v1"][m] for m in SPECTRAL)


def render(parameter: str, runs: dict[str, list[dict]], seeds: list[int], seconds: float, load: str) -> str:
    first = next(iter(runs.values()))[0]
    scores = {value: statistics.fmean(relative_spectral_score(r["test"]) for r in results)
              for value, results in runs.items()}
    best = min(scores, key=scores.get)
    lines = [
        f"# Loss-weight study: `{parameter}`",
        "",
        f"Script: `bench/study_loss_weight.py --parameter {parameter} --values {' '.join(runs)} "
        f"--seeds {' '.join(map(str, seeds))}`; {len(runs) * len(seeds)} demo runs (`configs/demo.yaml`, tiny "
        f"backbone, CPU, best step by validation loss) in {seconds / 60:.0f} min; load average {load}.",
        "",
        "Cells: mean over seeds (min-max). `score`: mean of refined / opt_v1 over NDVI RMSE, EVI RMSE and SAM on the "
        "test split (lower is better, 1 = no gain).",
        "",
    ]
    for split, role in (("test", "held out from training and model selection"),
                        ("val", "held out from training, picks the best step")):
        lines += [f"## {split} split ({role})", "",
                  "opt_v1: " + ", ".join(f"{m} {first[split]['opt_v1'][m]:.4f}" for m in COLUMNS), "",
                  f"| {parameter} | " + " | ".join(COLUMNS) + (" | score" if split == "test" else "") + " |",
                  "| ---: | " + " | ".join("---:" for _ in COLUMNS) + (" | ---:" if split == "test" else "") + " |"]
        for value, results in runs.items():
            cells = [mean_range_cell([r[split]["refined"][m] for r in results], 2 if m == "psnr" else 4) for m in COLUMNS]
            if split == "test":
                cells.append(mean_range_cell([relative_spectral_score(r["test"]) for r in results], 3))
            lines.append(f"| {value} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Best by the test score: `{parameter} = {best}` (score {scores[best]:.3f}).", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parameter", default="reconstruction_weight", help="a stage2-train flag (without --)")
    parser.add_argument("--values", nargs="+", default=["0", "0.5", "1", "2", "5"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default=None, help="markdown file (default: bench/results/<parameter>.md)")
    args = parser.parse_args(argv)
    output = Path(args.output) if args.output else REPO / "bench" / "results" / f"{args.parameter}.md"

    load_start = " ".join(f"{v:.1f}" for v in os.getloadavg())
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="stage2-study-") as workdir:
        for value in args.values:
            for seed in args.seeds:
                result = run_demo(args.parameter, value, seed, Path(workdir))
                runs.setdefault(value, []).append(result)
                print(f"{args.parameter}={value} seed {seed}: test score "
                      f"{relative_spectral_score(result['test']):.3f}", flush=True)
    load = f"{load_start} at the start, " + " ".join(f"{v:.1f}" for v in os.getloadavg()) + " at the end"
    text = render(args.parameter, runs, args.seeds, time.perf_counter() - start, load)
    output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
