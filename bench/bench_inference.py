"""Inference throughput on the CPU: tiles/s and scene km^2/min for the demo refiner and the real 600M one.

Random weights (the cost does not depend on the values), float32, `torch.inference_mode()`, through the public
inference API (`inference_stage2`):

- tiles/s of `refine_arrays` on 120x120 tiles held in memory (the model alone, batched), with 1 and 2 torch
  threads (on a shared machine 2 threads can be much slower than 1);
- tiles/s of `refine_tiles` on the bundled sample (NPZ reading, the model, atomic NPZ writing);
- km^2/min of `refine_scene` on a synthetic uint16 GeoTIFF (10 m pixels, 120 px windows overlapping by 32 px,
  blended), i.e. the whole stage2-refine path for scenes, with its blending buffer size.

The 600M part allocates ~2.5 GB and takes minutes: run it under the machine-wide lock.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_inference.py [--skip_600m] [--output PATH]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel
from inference_stage2 import refine_arrays, refine_scene, refine_tiles, window_starts
from _common import check_study_arguments, machine, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TILES = REPO_ROOT / "data" / "sample" / "tiles"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "inference.md"
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
PIXEL_AREA_KM2 = 100.0 / 1e6  # 10 m x 10 m
THREAD_COUNTS = (1, 2)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def synthetic_tiles(count: int, seed: int = 0) -> np.ndarray:
    """(count, 4, 120, 120) uint16 digital numbers with texture, like real tiles."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:120, 0:120].astype(np.float32)
    tiles = []
    for index in range(count):
        bands = [1000 + 700 * b + 500 * np.sin(rows / (9 + b + index % 5)) * np.cos(cols / (13 - b)) for b in range(4)]
        tiles.append(np.stack(bands) + rng.normal(0, 100, (4, 120, 120)))
    return np.clip(np.stack(tiles), 1, 10000).astype(np.uint16)


def write_scene(path: Path, size: int) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": 4, "dtype": "uint16", "nodata": 0,
        "crs": "EPSG:32633", "transform": from_origin(500000.0, 5400000.0, 10.0, 10.0), "tiled": True,
        "blockxsize": 256, "blockysize": 256,
    }
    with rasterio.open(path, "w", **profile) as dataset:
        rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
        for band in range(4):
            values = 1000 + 700 * band + 500 * np.sin(rows / (17 + band)) * np.cos(cols / (23 - band))
            dataset.write(np.clip(values + rng.normal(0, 100, values.shape), 1, 10000).astype(np.uint16), band + 1)
    return path


def demo_refiner_config() -> tuple[Stage2RefinerConfig, str]:
    """The refiner `make demo` trains: configs/demo.yaml's backbone preset and refiner overrides."""
    import yaml

    settings = yaml.safe_load(DEMO_CONFIG.read_text())
    overrides = settings.get("refiner_config_overrides") or {}
    preset = settings["backbone_preset"]
    description = ", ".join([f"backbone_config={preset!r}", *(f"{k}={v!r}" for k, v in overrides.items())])
    return Stage2RefinerConfig(backbone_config=preset, **overrides), f"`Stage2RefinerConfig({description})`"


def time_arrays(model, tiles: np.ndarray, batch_size: int, repeats: int) -> dict:
    """Wall and CPU (process, all threads) seconds of refine_arrays on all `tiles`, after a warm-up batch."""
    refine_arrays(model, tiles[:batch_size], 7, 4, batch_size=batch_size)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        refine_arrays(model, tiles, 7, 4, batch_size=batch_size)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    count = len(tiles)
    return {
        "batch": batch_size, "tiles": count, "best": count / min(wall), "median": count / statistics.median(wall),
        "cpu_per_tile": min(cpu) / count,
    }


def time_backbone(model, repeats: int) -> float:
    """Best seconds of the backbone alone on one tile padded to a multiple of the patch (what the refiner feeds
    it): the model's fixed cost, to compare with the whole refinement and with bench/results/prithvi_forward.md."""
    patch = model.config.backbone_config.patch_size[-1]
    size = -(-120 // patch) * patch
    pixels = torch.rand(1, len(model.config.bands), size, size)
    seconds = []
    with torch.inference_mode():
        model.backbone(pixels, output_hidden_states=True)
        for _ in range(repeats):
            start = time.perf_counter()
            model.backbone(pixels, output_hidden_states=True)
            seconds.append(time.perf_counter() - start)
    return min(seconds)


def bench_model(name: str, model, *, tiles: int, batch_sizes: list[int], repeats: int, scene_size: int, workdir: Path,
                sample_tiles: bool) -> dict:
    """Tiles/s at each thread count and batch size; then, at the faster thread count, the backbone alone, the
    bundled sample end to end, and a scene."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = synthetic_tiles(tiles)
    result = {"name": name, "parameters": sum(p.numel() for p in model.parameters()), "arrays": [], "tiles": None}
    for threads in THREAD_COUNTS:
        torch.set_num_threads(threads)
        for batch_size in batch_sizes:
            row = {"threads": threads, **time_arrays(model, data, batch_size, repeats)}
            result["arrays"].append(row)
            print(f"{name}: {threads} thread(s), batch {batch_size}: {row['best']:.2f} tiles/s", flush=True)
    best = max(result["arrays"], key=lambda row: row["best"])
    result["best"] = best
    torch.set_num_threads(best["threads"])
    result["backbone"] = time_backbone(model, repeats)
    print(f"{name}: backbone alone: {result['backbone']:.3f} s per tile", flush=True)
    if sample_tiles and SAMPLE_TILES.is_dir():
        output = workdir / "tiles"
        summary = refine_tiles(model, SAMPLE_TILES, output, batch_size=best["batch"], progress=False)
        result["tiles"] = (len(summary.written), summary.seconds)
        shutil.rmtree(output)
        print(f"{name}: refine_tiles on the bundled sample: {len(summary.written) / summary.seconds:.2f} tiles/s")
    scene = write_scene(workdir / f"scene-{scene_size}.tif", scene_size)
    start_cpu = time.process_time()
    result["scene"] = refine_scene(model, scene, workdir / "refined.tif", 7, 4, batch_size=best["batch"],
                                   progress=False)
    result["scene_cpu"] = time.process_time() - start_cpu
    print(f"{name}: scene {scene_size} px: {km2_per_min(result['scene']):.2f} km^2/min", flush=True)
    return result


def km2_per_min(scene) -> float:
    return scene.area_km2 / (scene.seconds / 60)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip_600m", action="store_true", help="only the demo model (no lock needed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, args.output, record=False)
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    load_start = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as folder:
        config, description = demo_refiner_config()
        MODEL_DESCRIPTIONS["demo"] = f"{description} (configs/demo.yaml, the `make demo` model)"
        demo = Stage2RefinerModel(config).eval()
        results.append(bench_model("demo", demo, tiles=32, batch_sizes=[1, 8], repeats=args.repeats,
                                   scene_size=1100, workdir=Path(folder) / "demo", sample_tiles=True))
        del demo
        if not args.skip_600m:
            large = Stage2RefinerModel(Stage2RefinerConfig()).eval()
            results.append(bench_model("600M", large, tiles=4, batch_sizes=[1, 4], repeats=max(1, args.repeats - 1),
                                       scene_size=440, workdir=Path(folder) / "600M", sample_tiles=False))
    write_report(args.output, results, default_threads, load_start, os.getloadavg()[0], args.repeats)


MODEL_DESCRIPTIONS = {"600M": "`Stage2RefinerConfig()` (the real `prithvi_eo_v2_600m` backbone, default head)"}


def write_report(path: Path, results: list[dict], default_threads: int, load_start: float, load_end: float,
                 repeats: int) -> None:
    measured = machine(load_start)
    if measured.shared:
        contention = (f"Other jobs share the {measured.cores} cores, so wall-clock rates vary between runs (by 3x or "
                      "more), and two threads can be slower than one: each of torch's parallel regions waits for a "
                      "thread that another job has descheduled.")
    else:
        contention = f"No other job loaded the {measured.cores} cores at the start."
    lines = [
        "# Inference throughput on the CPU",
        "",
        f"Measured by `bench/bench_inference.py` on {measured.cpu} ({measured.cores}-core CPU machine, torch's "
        f"default {default_threads} threads, {measured.state}: load average {load_start:.1f} at the start, "
        f"{load_end:.1f} at the end), torch {torch.__version__}, float32, random weights, "
        "`torch.inference_mode()`.",
        "",
        "Models: " + "; ".join(f"{r['name']} = {MODEL_DESCRIPTIONS[r['name']]}, {r['parameters']:,} parameters"
                               for r in results) + ".",
        "",
        f"The model alone: `refine_arrays` on 120x120 uint16 tiles in memory, best and median of {repeats} runs "
        "(fewer for 600M) after a warm-up batch, with 1 and 2 torch threads. `CPU s per tile` is process time (all "
        f"threads). {contention}",
        "",
        "| model | threads | batch | tiles | best tiles/s | median tiles/s | CPU s per tile |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        for row in result["arrays"]:
            lines.append(f"| {result['name']} | {row['threads']} | {row['batch']} | {row['tiles']} | "
                         f"{row['best']:.2f} | {row['median']:.2f} | {row['cpu_per_tile']:.3f} |")
    lines += [
        "",
        "End to end, at each model's faster thread count and batch size above: `refine_tiles` on the bundled sample "
        "(read NPZ, refine, write NPZ atomically) and `refine_scene` on a synthetic uint16 GeoTIFF (EPSG:32633, 10 m "
        "pixels, nodata 0): 120 px windows overlapping by 32 px, cosine blending, one strip of windows in memory, "
        "tiled deflate GeoTIFF out.",
        "",
        "| model | threads | batch | input | size | windows | seconds | CPU seconds | rate | km^2/min | "
        "blending buffer |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for result in results:
        best = result["best"]
        if result["tiles"]:
            count, seconds = result["tiles"]
            lines.append(f"| {result['name']} | {best['threads']} | {best['batch']} | bundled sample (NPZ) | "
                         f"{count} tiles | - | {seconds:.1f} | - | {count / seconds:.2f} tiles/s | - | - |")
        scene = result["scene"]
        lines.append(
            f"| {result['name']} | {best['threads']} | {best['batch']} | scene (GeoTIFF) | {scene.width} x "
            f"{scene.height} px, {scene.area_km2:.1f} km^2 | {scene.windows} | {scene.seconds:.1f} | "
            f"{result['scene_cpu']:.1f} | {scene.windows / scene.seconds:.2f} windows/s | {km2_per_min(scene):.2f} | "
            f"{scene.accumulator_shape} sums + weights, {scene.accumulator_bytes / 2**20:.2f} MiB |"
        )
    lines += ["", "Notes:", ""]
    for result in results:
        threads = result["best"]["threads"]
        single = next(row for row in result["arrays"] if row["threads"] == threads and row["batch"] == 1)
        whole = 1 / single["best"]
        lines.append(
            f"- {result['name']}: the backbone alone takes {result['backbone']:.3f} s per tile and the whole refiner "
            f"{whole:.3f} s (batch 1, {threads} thread(s)): the backbone is about "
            f"{min(100.0, 100 * result['backbone'] / whole):.0f}% of the cost, the ConvNeXt head at full resolution "
            "(and the fusion) the rest."
        )
    per_side = len(window_starts(10980, 120, 32))
    for result in results:
        scene = result["scene"]
        hours = per_side**2 * scene.seconds / scene.windows / 3600
        lines.append(
            f"- {result['name']}: a scene costs its window count ((size - 32) / 88 per side: {scene.windows} windows "
            f"for {scene.width} x {scene.height} px, about 1.86 tiles' work per 120 x 120 px of area) plus reading, "
            f"blending and writing. A Sentinel-2 granule (10980 x 10980 px, {10980**2 * PIXEL_AREA_KM2:,.0f} km^2) "
            f"is {per_side**2:,} windows: about {hours:.1f} h at this rate, with a "
            f"{5 * 120 * 10980 * 4 / 2**20:.0f} MiB blending buffer."
        )
    lines += [f"- Peak RSS of the benchmark process: {peak_rss_gib():.2f} GiB.", ""]
    write_results(path, "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
