"""Gaps the demo's and the metrics' tests left: `python -m training.demo` exiting 1 with its one-line verdict when a
metric is NaN, run as the command runs (its `__main__`, the termination handler around `main`), and the metrics'
zeroing of invalid pixels (`training.metrics.tile_statistics`) scored on a tile whose numbers are known."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import training.demo as demo
from training.metrics import GAIN_METRICS, PSNR_DATA_RANGE, SSIM_DATA_RANGE, SSIM_K1, per_tile_metrics

# Runs `python -m training.demo` (its `__main__` block) with the training and the scoring replaced by their
# results (argv[1]: split -> role -> metric -> value), so that no model is trained: the verdict alone is under test.
FAKE_DEMO = """
import json, runpy, sys
from types import SimpleNamespace
import data_builders.build, datasets, model_cards.cards, modeling_stage2, training.evaluate, training.metrics
import training.train as train
results = json.loads(sys.argv[1])
train.run_training = lambda *args: SimpleNamespace(state=SimpleNamespace(global_step=7))
train.ensure_arrow_dataset = lambda data_args, output_dir: output_dir / "_dataset"
modeling_stage2.load_trained_model = lambda path: "model"
datasets.load_from_disk = lambda path: {"train": "train", "val": "val", "test": "test"}
data_builders.build.recorded_opt_v1 = lambda dataset_dict: None
training.evaluate.fit_color_baseline = lambda dataset_dict: "fit"
training.evaluate.load_split = lambda path, split, dataset_dict: split
training.evaluate.evaluate_model = lambda model, dataset, **kwargs: results[dataset]
training.metrics.format_metrics_table = lambda metrics: "TABLE"
model_cards.cards.write_model_card = lambda folder: None
sys.argv = ["training.demo", *sys.argv[2:]]
runpy.run_module("training.demo", run_name="__main__", alter_sys=True)
"""


def _split(refined: tuple) -> dict:
    return {"refined": dict(zip(GAIN_METRICS, refined)), "opt_v1": dict.fromkeys(GAIN_METRICS, 0.1),
            "linear_fit": dict.fromkeys(GAIN_METRICS, 0.05), "n_tiles": 2}


def test_the_demo_command_exits_1_in_one_line_when_a_metric_is_nan(repo_root, tmp_path):
    """A model that diverged gives NaN; NaN < baseline is False, so the verdict must name that metric against both
    baselines and the command exit 1, as `make demo` runs it (not only `main()` called in-process)."""
    results = {"val": _split((0.01, 0.01, 0.01)), "test": _split((0.01, math.nan, 0.01))}
    out = tmp_path / "demo"
    (out / "best").mkdir(parents=True)
    (out / "best" / "metrics.json").write_text(json.dumps({"global_step": 7}))  # what the training left there
    done = subprocess.run([sys.executable, "-c", FAKE_DEMO, json.dumps(results), "--output_dir", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    missed = demo.not_beaten(demo.gains(results["test"]))
    assert missed == ["evi_rmse vs opt_v1", "evi_rmse vs the colour fit"]
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr  # 1 from the verdict, not from a crash
    verdict = [line for line in done.stderr.splitlines() if "does not beat" in line]
    assert verdict == [f"The refined output does not beat {', '.join(missed)} (test split); docs/quality.md says what "
                       "limits it on this sample."]
    assert "evi_rmse 0.1000 -> nan (not lower; colour fit 0.0500, not lower)" in done.stdout
    recorded = json.loads((out / "best" / "metrics.json").read_text())  # the held-out record keeps the NaN
    assert math.isnan(recorded["refined"]["evi_rmse"]) and recorded["global_step"] == 7


# A tile of one spectrum: target (B02, B03, B04, B08) = (0.1, 0.1, 0.1, 0.3) everywhere; the scored output has red
# raised by RED_SHIFT on the valid pixels and garbage (NaN, inf, huge) on the invalid ones, in all three images.
SIZE, RED_SHIFT = 14, 0.02
TARGET = (0.1, 0.1, 0.1, 0.3)


def _tile(spectrum, garbage, invalid):
    image = torch.tensor(spectrum, dtype=torch.float32)[None, :, None, None].repeat(1, 1, SIZE, SIZE)
    image[0, :, invalid[0], invalid[1]] = garbage
    return image


@pytest.mark.parametrize("garbage", [math.nan, math.inf, 1e30])
def test_invalid_pixels_reach_no_metric_on_a_tile_of_known_scores(garbage):
    """Every metric of the masked tile is its valid pixels' alone, to known values: the invalid pixels are zeroed
    (or left out) whatever they hold, and the valid ones are not. A zeroing with the mask the wrong way round scored
    the tile as perfect; one that let the invalid pixels through gave NaN or inf."""
    invalid = (slice(0, 2), slice(0, 3))  # a 2 x 3 corner, beside valid pixels and the SSIM windows
    mask = torch.ones(1, SIZE, SIZE, dtype=torch.bool)
    mask[0, invalid[0], invalid[1]] = False
    red = (TARGET[0], TARGET[1], TARGET[2] + RED_SHIFT, TARGET[3])
    output, target, opt_v1 = _tile(red, garbage, invalid), _tile(TARGET, garbage, invalid), _tile(TARGET, garbage,
                                                                                                   invalid)
    got = {name: value.item() for name, value in per_tile_metrics(output, target, opt_v1, mask).items()}

    def ndvi(b):
        return (b[3] - b[2]) / (b[3] + b[2])

    def evi(b):
        return 2.5 * (b[3] - b[2]) / (b[3] + 6 * b[2] - 7.5 * b[0] + 1)

    def angle(a, b):
        return math.acos(sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)))

    def ssim(x, y):  # of two constant bands: no variance, so only the luminance term (the SSIM windows clear
        # of the corner start at rows 2 and 3 of the 14)
        c1 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2
        return (2 * x * y + c1) / (x * x + y * y + c1)

    mse = RED_SHIFT ** 2 / 4
    expected = {"ndvi_rmse": ndvi(TARGET) - ndvi(red), "evi_rmse": evi(TARGET) - evi(red), "sam": angle(red, TARGET),
                "identity_l1": RED_SHIFT / 4, "edge_l1": 0.0, "psnr": 10 * math.log10(PSNR_DATA_RANGE ** 2 / mse),
                "ssim": sum(ssim(x, y) for x, y in zip(red, TARGET)) / 4}
    assert expected["ndvi_rmse"] == pytest.approx(0.0714286, abs=1e-6)  # 0.5 against 0.18 / 0.42
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
