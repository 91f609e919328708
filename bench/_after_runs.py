"""What the studies that train the quality study's `after` runs again share: their arguments and the trainings."""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench._common import check_study_arguments, cpu_name
from bench.study_quality import build_datasets, train
from bench.study_rotation import PRESETS


def parse_arguments(description: str, argv: list[str], default_output: Path | None, add_arguments=None):
    """(parser, arguments, demo flags): `--presets`, `--seeds`, `--jobs` and `--output`, checked, and those
    `add_arguments(parser)` adds; the flags after `--` are for the demo."""
    demo_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output", default=default_output and str(default_output))
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, args.output)
    return parser, args, demo_flags


def train_after_runs(args, demo_flags: list[str], workdir: Path):
    """(each preset's dataset folder, {(preset, seed): trained model folder}): the demo's `after` model trained on
    every preset and seed of `args`, `args.jobs` at a time, each on one thread."""
    folders, trained = train_settings(args, {"": demo_flags}, workdir)
    return folders, {(preset, seed): folder for (_, preset, seed), folder in trained.items()}


def train_settings(args, settings: dict[str, list[str]], workdir: Path):
    """(each preset's dataset folder, {(setting, preset, seed): trained model folder}): the demo's `after` model
    trained with each setting's demo flags (`settings`: name -> flags) on every preset and seed of `args`, `args.jobs`
    at a time, each on one thread."""
    jobs = [(setting, preset, seed) for setting in settings for preset in args.presets for seed in args.seeds]
    folders = build_datasets(args.presets, workdir)

    def run(job):
        setting, preset, seed = job
        return train(preset, seed, "after", workdir, extra_flags=settings[setting], tag=setting and f"-{setting}")

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        trained = list(pool.map(run, jobs))
    return folders, dict(zip(jobs, trained))


def machine() -> dict:
    """What decides the kernels torch runs here: the CPU, the instruction set torch chose for it, torch's version."""
    import torch

    return {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def script_line(script: str, record: dict, seconds: float, load: str, arguments: str = "", settings: int = 1) -> str:
    """The tables' first line: how `bench/<script>` was run (`arguments` before the record's presets and seeds, its
    `demo_flags` after `--`), how long its trainings (`settings` for each preset and seed) took, on which machine (the
    record's `machine()`), and how busy it was."""
    facts = record["machine"]
    where = f"{facts['cpu']} (torch {facts['torch']}, CPU kernels {facts['cpu_capability']})"
    trainings = settings * len(record["presets"]) * len(record["seeds"])
    demo_flags = f" -- {' '.join(record['demo_flags'])}" if record.get("demo_flags") else ""
    return (f"Script: `bench/{script} {arguments}--presets {' '.join(record['presets'])} --seeds "
            f"{' '.join(map(str, record['seeds']))}{demo_flags}`; {trainings} demo trainings "
            f"(`configs/demo.yaml`, the `after` model of `bench/study_quality.py`, one thread each) in "
            f"{seconds / 60:.0f} min on {where}; load average {load}.")
