"""Deployment export: tiles/s of the eager refiner (fp32 and 8-bit) and of its ONNX export on ONNX Runtime, plus
the export's time and file size.

For each model size, a trained folder is made the way training writes one (`build_trainable_model`, LoRA r 8 on every
block, random weights: the cost does not depend on the values; `save_trained_model`), then:

- eager fp32: `load_trained_model(folder)` (a PeftModel, adapters not merged, as `stage2-refine` runs it);
- eager 8-bit: `load_trained_model(folder, quantization="8bit")` (bitsandbytes LLM.int8 backbone linears);
- ONNX Runtime: `export_refiner(folder, ...)` (adapters merged, fp32) run by `ExportedRefiner` (CPU provider);

each timed on 120x120 tiles at batch 1 and 8 (tiles/s, best of `--repeats` after a warm-up), with one thread by
default (this machine is shared; pass --threads). The export itself is timed and its files measured.

    .venv/bin/python bench/bench_export.py --sizes tiny            # seconds
    flock /tmp/heavy.lock .venv/bin/python bench/bench_export.py   # + the 600M refiner: ~10 GB RAM, many minutes

Results go to bench/results/export.md (`--output`).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from _common import Machine, check_study_arguments, load_average, machine, write_results
from bench_inference import demo_refiner_config, synthetic_tiles
from modeling_stage2 import Stage2RefinerConfig
from modeling_stage2.adapters import build_trainable_model, load_trained_model, save_trained_model
from modeling_stage2.export import export_refiner
from modeling_stage2.onnx_runtime import ExportedRefiner

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "export.md"
SIZES = ("tiny", "600m")
BATCH_SIZES = (1, 8)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def model_config(size: str) -> tuple[Stage2RefinerConfig, str]:
    if size == "tiny":
        config, description = demo_refiner_config()
        return config, f"demo refiner ({description})"
    return Stage2RefinerConfig(), "600M refiner (`Stage2RefinerConfig()`: prithvi_eo_v2_600m backbone, default head)"


@torch.no_grad()
def wake_up(model, seed: int = 0) -> None:
    """Small random values for the zero-initialised weights (LoRA B, the head's output conv, the spectral
    correction's tile MLP), so the trained model is not the identity and the ONNX-vs-eager difference means
    something."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name or "output_projection.weight" in name or "tile_correction" in name:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def tiles_per_second(model, tiles: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Best tiles/s over `repeats` passes over `tiles` in batches, after one warm-up batch."""
    month = torch.full((batch_size,), 7)
    biome = torch.full((batch_size,), 4)
    with torch.inference_mode():
        model(opt_v1=tiles[:batch_size], month=month, biome=biome)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for first in range(0, len(tiles), batch_size):
                batch = tiles[first : first + batch_size]
                model(opt_v1=batch, month=month[: len(batch)], biome=biome[: len(batch)])
            best = min(best, time.perf_counter() - start)
    return len(tiles) / best


def bench_size(size: str, workdir: Path, *, tiles: int, repeats: int, threads: int) -> dict:
    config, description = model_config(size)
    torch.manual_seed(0)
    trainable = build_trainable_model(config, quantization="none", print_summary=False)
    wake_up(trainable)
    parameters = sum(p.numel() for p in trainable.parameters())
    folder = save_trained_model(trainable, workdir / f"{size}_trained")
    del trainable
    gc.collect()
    data = torch.from_numpy(synthetic_tiles(tiles).astype(np.float32) * 1e-4)
    result = {"size": size, "description": description, "parameters": parameters, "rows": []}

    def measure(name: str, model) -> None:
        for batch_size in BATCH_SIZES:
            rate = tiles_per_second(model, data, batch_size, repeats)
            result["rows"].append({"runtime": name, "batch": batch_size, "tiles_per_s": rate})
            print(f"{size}: {name}, batch {batch_size}: {rate:.2f} tiles/s", flush=True)

    measure("eager fp32 (PeftModel, torch)", load_trained_model(folder))
    gc.collect()
    try:
        measure("eager 8-bit (bitsandbytes)", load_trained_model(folder, quantization="8bit"))
    except Exception as error:  # bitsandbytes without a usable backend here
        print(f"{size}: eager 8-bit skipped ({type(error).__name__}: {error})", flush=True)
        measured = {row["batch"] for row in result["rows"] if row["runtime"] == "eager 8-bit (bitsandbytes)"}
        result["rows"].extend({"runtime": "eager 8-bit (bitsandbytes)", "batch": b, "tiles_per_s": None}
                              for b in BATCH_SIZES if b not in measured)  # a dash where it was not measured
    gc.collect()
    start = time.perf_counter()
    export = export_refiner(folder, workdir / f"{size}_onnx", format="onnx")
    result["export_seconds"] = time.perf_counter() - start
    result["export_bytes"] = export.size_bytes
    result["export_difference"] = export.max_abs_difference
    print(f"{size}: ONNX export {result['export_seconds']:.1f} s, {export.size_bytes / 2**20:.1f} MiB, "
          f"max |onnx - eager| {export.max_abs_difference:.2e}", flush=True)
    measure("ONNX Runtime (CPU provider)", ExportedRefiner(export.output_dir, num_threads=threads))
    result["peak_rss_gib"] = peak_rss_gib()
    return result


def write_report(results: list[dict], path: Path, *, threads: int, tiles: int, repeats: int,
                 measured: Machine | None = None) -> None:
    """`measured`: the machine as `main` found it before the work (by default, as it is now)."""
    import onnxruntime

    measured = measured or machine()
    state = (f"a shared {measured.cores}-core machine" if measured.shared else
             f"an otherwise idle {measured.cores}-core machine: load average {measured.load:.1f} at the start")

    lines = [
        "# Export: eager vs ONNX Runtime throughput, export time and size",
        "",
        f"`bench/bench_export.py --sizes {','.join(r['size'] for r in results)} --threads {threads} --tiles {tiles} "
        f"--repeats {repeats}` on {datetime.date.today()}: "
        f"{measured.cpu}, load average {load_average()} ({state}), torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, {threads} thread(s), {tiles} random 120x120 tiles per pass, "
        f"best of {repeats} passes after a warm-up batch (600M: one pass). Random weights (the zero-initialised ones "
        "woken up), LoRA r 8 on every block; the export is checked against the eager fp32 model on 2 random batches.",
        "",
        "| model | runtime | batch | tiles/s |",
        "| --- | --- | ---: | ---: |",
    ]
    for result in results:
        for row in result["rows"]:
            rate = "-" if row["tiles_per_s"] is None else f"{row['tiles_per_s']:.2f}"
            lines.append(f"| {result['size']} | {row['runtime']} | {row['batch']} | {rate} |")
    lines += ["", "| model | parameters | ONNX export time | ONNX files | max abs(ONNX - eager) | peak RSS |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        lines.append(
            f"| {result['size']} | {result['parameters']:,} | {result['export_seconds']:.1f} s | "
            f"{result['export_bytes'] / 2**20:.1f} MiB | {result['export_difference']:.1e} | "
            f"{result['peak_rss_gib']:.2f} GiB |"
        )
    lines += [""] + [f"- {r['size']}: {r['description']}" for r in results]
    if "600m" not in [r["size"] for r in results]:
        lines.append("- The 600M figures are still to be taken (`flock /tmp/heavy.lock .venv/bin/python "
                     "bench/bench_export.py`): they need ~10 GB of RAM and many minutes of a free CPU.")
    write_results(path, "\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {SIZES}")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default 1)")
    parser.add_argument("--tiles", type=int, default=16, help="tiles per timed pass (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes, best kept (default 3)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, args.output, record=False)
    sizes = [size.strip().lower() for size in args.sizes.split(",") if size.strip()]
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; choose from {SIZES}")
    # smallest first, each once: the peak RSS recorded after a size is the process's so far, which is that size's own
    # only when no larger size ran before it
    sizes = [size for size in SIZES if size in sizes]
    measured = machine()  # before the work: the load average then is other jobs'
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*inputs will be cast from torch.float32 to float16.*")
    results = []
    with tempfile.TemporaryDirectory(prefix="stage2-bench-export-") as workdir:
        for size in sizes:
            repeats = args.repeats if size == "tiny" else 1
            results.append(bench_size(size, Path(workdir), tiles=args.tiles, repeats=repeats, threads=args.threads))
            gc.collect()
    write_report(results, args.output, threads=args.threads, tiles=args.tiles, repeats=args.repeats,
                 measured=measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
