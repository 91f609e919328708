"""Training-step throughput and memory of the real 600M refiner on this CPU: 8-bit + LoRA vs full precision.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_training.py [--steps 4] [--quantizations 8bit none]

Each configuration runs in its own process (so peak memory is its own): the design's model (Prithvi-EO-2.0-600M
backbone, random weights, LoRA r 8 on qkv/proj/fc1/fc2, metadata embedding, fusion and ConvNeXt head trained, the
64-channel PatchGAN) trained by `Stage2Trainer` exactly as `stage2-train` does (batch 1, no accumulation, fp32 on
the CPU, discriminator step every step) on 120x120 tiles. One warm-up step, then `--steps` timed steps.

Also measured: the machine's fp32 matmul rate (2048x2048 GEMMs on all threads) and the FLOPs of one training
step (torch's FlopCounterMode on the full-precision model: the 8-bit model does the same multiply-adds in int8),
giving the achieved fraction of the matmul rate. Writes bench/results/training.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import check_study_arguments, load_average, machine, write_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "training.md"


# ------------------------------------------------------------------------------------------- measurements
def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GEMM rate in GFLOP/s over `repeats` runs."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples the process RSS every 5 ms while active."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def tiles_dataset(count: int):
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    target = rng.uniform(0.01, 0.5, (count, 4, 120, 120)).astype(np.float32)
    return datasets.Dataset.from_dict({
        "target": target, "opt_v1": (target * 1.05 + 0.005).astype(np.float32),
        "month": rng.integers(1, 13, count), "biome": rng.integers(0, 17, count),
        "valid_mask": np.ones((count, 120, 120), bool),
    })


def step_flops(model, loss_fn, discriminator) -> int:
    """FLOPs of one training step (generator forward/backward + discriminator forward/backward) on one tile."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    opt_v1 = torch.rand(1, 4, 120, 120) * 0.3
    target = opt_v1 * 1.05
    month, biome = torch.tensor([6]), torch.tensor([4])
    with FlopCounterMode(display=False) as counter:
        refined = model(opt_v1=opt_v1, month=month, biome=biome).refined
        loss, _ = loss_fn(refined, target, opt_v1, fake_scores=discriminator(refined))
        loss.backward()
        (discriminator(target).square().mean() + discriminator(refined.detach()).square().mean()).backward()
    model.zero_grad(set_to_none=True)
    discriminator.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def worker(quantization: str, steps: int, with_flops: bool) -> dict:
    import torch
    from transformers import TrainerCallback, set_seed

    from modeling_stage2 import Stage2RefinerConfig, build_trainable_model
    from modeling_stage2.adapters import trainable_parameter_summary
    from training.args import Stage2TrainingArguments
    from training.data import TileDataset
    from training.trainer import Stage2Trainer
    from data_builders import make_train_transform

    set_seed(0)
    rss_start = rss_bytes()
    build_start = time.perf_counter()
    model = build_trainable_model(Stage2RefinerConfig(backbone_config="prithvi_eo_v2_600m"),
                                  quantization=quantization, print_summary=False)
    build_seconds = time.perf_counter() - build_start
    summary = trainable_parameter_summary(model)
    rss_model = rss_bytes()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self._wall, self._cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.wall.append(time.perf_counter() - self._wall)
            self.cpu.append(time.process_time() - self._cpu)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = Stage2TrainingArguments(
            output_dir=out, max_steps=steps + 1, per_device_train_batch_size=1, gradient_accumulation_steps=1,
            eval_every_epochs=None, save_every_epochs=None, eval_strategy="no", save_strategy="no",
            report_to="none", disable_tqdm=True, logging_steps=1000, quantization=quantization, seed=0,
            use_cpu=True,  # the CPU step this script measures, on a machine with a GPU too
        )
        trainer = Stage2Trainer(model=model, args=args, callbacks=[timer],
                                train_dataset=TileDataset(tiles_dataset(steps + 1), make_train_transform()))
        with PeakRss() as peak:
            trainer.train()
    timed_wall, timed_cpu = timer.wall[1:], timer.cpu[1:]
    result = {
        "quantization": quantization,
        "parameters": summary["total"],
        "trainable": summary["trainable"],
        "build_seconds": build_seconds,
        "warmup_seconds": timer.wall[0],
        "step_seconds": timed_wall,
        "step_cpu_seconds": timed_cpu,
        "samples_per_second": len(timed_wall) / sum(timed_wall),
        "best_samples_per_second": 1 / min(timed_wall),
        "rss_start_gib": rss_start / 2**30,
        "rss_model_gib": rss_model / 2**30,
        "peak_rss_training_gib": peak.peak / 2**30,
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "threads": torch.get_num_threads(),
    }
    if with_flops:
        result["step_flops"] = step_flops(trainer.model, trainer.loss_fn, trainer.discriminator)
    return result


# ------------------------------------------------------------------------------------------- report
def render(results: list[dict], rate_gflops: float, load_start: str, load_end: str, steps: int) -> str:
    import torch

    flops = next((r["step_flops"] for r in results if "step_flops" in r), None)
    measured = machine(float(load_start.split()[0]), gpu=True)  # judged from the 1-minute load at the start
    design = "the design's GPU figures (~50 samples/s and 8-10 GB of VRAM on an RTX 3060)"
    if measured.gpu is None:
        gpu = f"**No GPU was lent to this task**: {design} could not be measured here."
    else:
        gpu = (f"A CUDA device was present (**{measured.gpu}**) but not used: this benchmark measures the CPU, and "
               f"{design} are not measured by it.")
    state = f"{' ' if measured.shared else ', '}{measured.state}"  # '2-core CPU machine shared with', as recorded
    count = results[0]["threads"]
    threads = {1: "one thread", 2: "both threads"}.get(count, f"all {count} threads")
    lines = [
        "# Training step on the CPU: Prithvi-EO-2.0-600M refiner, 8-bit + LoRA vs full precision",
        "",
        f"Measured by `bench/bench_training.py --steps {steps}` on {measured.cpu}, {results[0]['threads']} threads "
        f"({measured.cores}-core CPU machine{state}: load average {load_start} at the start, {load_end} at the end), "
        f"torch {torch.__version__}, fp32 compute, random weights. {gpu}",
        "",
        "The step is `Stage2Trainer`'s, as `stage2-train` runs it: batch 1, 120x120 tile (padded to 126, 9x9 patches), "
        "generator forward + Stage2Loss (spectral, identity/edge, reconstruction, LSGAN) + backward, the 64-channel "
        "3-layer PatchGAN trained on the detached output, AdamW on LoRA (r 8, qkv/proj/fc1/fc2) + metadata "
        "embedding + fusion + head, gradient clipping. One warm-up step, then the timed steps.",
        "",
        "| backbone | parameters | trainable | samples/s (mean) | samples/s (best step) | CPU s per step | "
        "peak RSS while training (GiB) | RSS after building (GiB) | build (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        label = {"8bit": "8-bit (LLM.int8) + LoRA", "4bit": "NF4 + LoRA", "none": "fp32 + LoRA"}[r["quantization"]]
        cpu = sum(r["step_cpu_seconds"]) / len(r["step_cpu_seconds"])
        lines.append(
            f"| {label} | {r['parameters']:,} | {r['trainable']:,} | {r['samples_per_second']:.3f} | "
            f"{r['best_samples_per_second']:.3f} | {cpu:.1f} | {r['peak_rss_training_gib']:.2f} | "
            f"{r['rss_model_gib']:.2f} | {r['build_seconds']:.0f} |"
        )
    lines += ["", f"Machine fp32 matmul rate (2048x2048 GEMM, {results[0]['threads']} threads, best of 10): "
              f"**{rate_gflops:.1f} GFLOP/s**.", ""]
    if flops is not None:
        lines.append("FLOPs of one training step on one tile (FlopCounterMode, fp32 model): "
                     f"**{flops / 1e9:.1f} GFLOP** "
                     "(generator forward and backward through the frozen backbone, discriminator forward x3 and "
                     "backward x2).")
        lines.append("")
        lines.append("| backbone | achieved GFLOP/s (mean step) | fraction of the measured matmul rate |")
        lines.append("| --- | ---: | ---: |")
        for r in results:
            achieved = flops * r["samples_per_second"] / 1e9
            lines.append(f"| {r['quantization']} | {achieved:.1f} | {100 * achieved / rate_gflops:.0f}% |")
    lines += ["", "Per-step wall seconds (timed steps):", ""]
    for r in results:
        lines.append(f"- {r['quantization']}: " + ", ".join(f"{s:.2f}" for s in r["step_seconds"])
                     + f" (warm-up {r['warmup_seconds']:.1f} s)")
    by_name = {r["quantization"]: r for r in results}
    lines += ["", "Notes:", ""]
    if "8bit" in by_name and "none" in by_name:
        q, f = by_name["8bit"], by_name["none"]
        lines.append(
            f"- 8-bit buys memory, not speed: the resident model is {q['rss_model_gib']:.2f} GiB against "
            f"{f['rss_model_gib']:.2f} GiB in fp32, but the step is "
            f"{f['samples_per_second'] / q['samples_per_second']:.1f}x "
            "slower (bitsandbytes' int8 matmul on the CPU quantizes the activations and dequantizes around each "
            "product; on GPUs LLM.int8 is also slower than fp16, bitsandbytes#490/#347). During the step the 8-bit "
            f"process grows by {q['peak_rss_training_gib'] - q['rss_model_gib']:.2f} GiB (fp32: "
            f"{f['peak_rss_training_gib'] - f['rss_model_gib']:.2f} GiB): transient buffers of the int8 forward and "
            "backward, activations, gradients and the AdamW states of the trainable parameters and the "
            "discriminator.")
    lines += [
        "- RSS includes the Python/torch runtime (~0.5 GiB).",
        f"- Wall-clock rates{' on this shared machine' if measured.shared else ''} vary between runs; `CPU s per step` "
        f"({threads}) varies less, and on an idle machine the wall-clock rate is at best threads / (CPU s per step).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quantizations", nargs="+", default=["8bit", "none"], choices=["8bit", "4bit", "none"])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, None)  # --steps 0 would fail only after the models are built
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.steps, args.flops)), flush=True)
        return
    load_start = load_average()
    import torch

    rate = matmul_rate()
    results = []
    for quantization in args.quantizations:
        command = [sys.executable, __file__, "--worker", quantization, "--steps", str(args.steps)]
        if quantization == "none":
            command.append("--flops")
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"worker {quantization} failed:\n{done.stderr[-4000:]}")
        line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
        if line is None:  # not a StopIteration's traceback
            raise SystemExit(f"worker {quantization} printed no result:\n{done.stderr[-4000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(f"{quantization}: {results[-1]['samples_per_second']:.3f} samples/s, "
              f"peak RSS {results[-1]['peak_rss_training_gib']:.2f} GiB", flush=True)
    report = render(results, rate, load_start, load_average(), args.steps)
    write_results(RESULTS, report)
    print(report)
    del torch


if __name__ == "__main__":
    main()
