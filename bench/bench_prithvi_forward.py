"""Forward time and peak memory of the real-sized Prithvi-EO-2.0-600M encoder on one 4-band 120x120 tile (CPU).

Random weights (the official ones cannot be downloaded here; the cost does not depend on the values). The
encoder is built once, in float32, with the tile's four bands (B02 B03 B04 B08), and run under
`torch.inference_mode()`. Two inputs: the tile padded to 126x126 (9x9 patches of 14 px: what the refiner
feeds, no pixel lost) and the raw 120x120 tile (cropped by the patch embedding to 8x8 patches, as the official
code does).

    flock /tmp/heavy.lock .venv/bin/python bench/bench_prithvi_forward.py [--repeats 9] [--output PATH]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from modeling_stage2 import PrithviConfig, PrithviEncoder
from _common import check_study_arguments, machine, write_results

BANDS = ("B02", "B03", "B04", "B08")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "prithvi_forward.md"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def time_forward(model: PrithviEncoder, pixel_values: torch.Tensor, repeats: int) -> tuple[list[float], tuple]:
    with torch.inference_mode():
        output = model(pixel_values)  # warm-up (allocator, kernels)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            output = model(pixel_values)
            seconds.append(time.perf_counter() - start)
    return seconds, tuple(output.last_hidden_state.shape)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, args.output, record=False)

    torch.manual_seed(0)
    measured = machine()  # before the work: the load average then is other jobs'
    rss_start = peak_rss_gib()
    start = time.perf_counter()
    config = PrithviConfig.from_preset("prithvi_eo_v2_600m", bands=BANDS)
    model = PrithviEncoder(config).eval()
    build_seconds = time.perf_counter() - start
    rss_built = peak_rss_gib()
    n_parameters = sum(parameter.numel() for parameter in model.parameters())

    tile = torch.rand(1, len(BANDS), 120, 120)
    padded = torch.nn.functional.pad(tile, (0, 6, 0, 6), mode="reflect")
    rows = []
    inputs = (("120 px padded to 126 (9x9 patches)", padded), ("120 px, official crop (8x8 patches)", tile))
    for label, pixel_values in inputs:
        seconds, shape = time_forward(model, pixel_values, args.repeats)
        rows.append((label, statistics.median(seconds), min(seconds), max(seconds), shape))
    rss_peak = peak_rss_gib()
    load_end = os.getloadavg()[0]
    if measured.shared:
        contention = f"are {measured.state} (load average {load_end:.1f} at the end)"
    else:
        contention = f"were {measured.state} (load average {measured.load:.1f} at the start, {load_end:.1f} at the end)"

    lines = [
        "# Prithvi-EO-2.0-600M encoder forward on the CPU",
        "",
        f"Measured by `bench/bench_prithvi_forward.py` on {measured.cpu}, {torch.get_num_threads()} threads "
        f"({measured.cores}-core CPU machine), torch {torch.__version__}, float32, batch 1, random weights, "
        f"`torch.inference_mode()`. {args.repeats} timed runs after one warm-up. The machine's {measured.cores} cores "
        f"{contention}: the minimum is the uncontended figure.",
        "",
        f"Encoder: preset `prithvi_eo_v2_600m`, bands {' '.join(BANDS)}, {n_parameters:,} parameters "
        f"({n_parameters * 4 / 2**30:.2f} GiB in float32), all {config.depth} hidden states returned.",
        "",
        "| input | median forward (s) | min (s) | max (s) | output tokens |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, median, low, high, shape in rows:
        lines.append(f"| {label} | {median:.3f} | {low:.3f} | {high:.3f} | {shape[1]} x {shape[2]} |")
    lines += [
        "",
        "| memory (peak RSS of the process) | GiB |",
        "| --- | --- |",
        f"| before building | {rss_start:.2f} |",
        f"| after building the encoder ({build_seconds:.1f} s, random init) | {rss_built:.2f} |",
        f"| peak including the forwards | {rss_peak:.2f} |",
        "",
    ]
    write_results(args.output, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
