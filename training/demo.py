"""The demo (`make demo`): train the tiny refiner on the bundled real sample on the CPU and show what it gains.

    python -m training.demo --output_dir runs/demo [--epochs N] [any stage2-train flag]

1. converts the bundled BigEarthNet sample (`data/sample/tiles`, real Sentinel-2 targets, synthetic `opt_v1`)
   to Arrow (cached in `OUTPUT_DIR/_dataset`);
2. trains `configs/demo.yaml` (tiny Prithvi backbone, LoRA, ConvNeXt head, PatchGAN) on the CPU;
3. evaluates the best model on the validation split (which picked the best step) and on the test split (held
   out from both training and model selection), prints the metrics of `opt_v1`, of the least-squares colour fit
   fitted on the training tiles (`training.linear_fit`) and of the refined output side by side, then refined / each
   baseline on the held-out tiles with a paired tile-bootstrap interval (`training.bootstrap`), and writes
   `OUTPUT_DIR/demo_results.json`;
4. leaves the model in `OUTPUT_DIR/best` (with `preview.png`, and its `metrics.json` and model card `README.md`
   holding the test split's results, the ones `stage2-push` publishes).

Exits with status 1 if the refined output does not beat both baselines, `opt_v1` and the colour fit, on NDVI RMSE,
EVI RMSE and SAM on the held-out test tiles (the validation tiles when there is no test split).

The bundled validation split is 14 water tiles out of 18: a fifth of its pixels are open water a few digital
numbers bright, where NDVI is quantisation noise (they hold ~87 % of opt_v1's squared NDVI error), so its NDVI and
EVI leave little to gain; the test split is closer to the training tiles.
"""
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AUTO")  # reproducible MKL results run to run (see training/train.py)

from modeling_stage2._signals import exit_on_termination  # noqa: E402 (after MKL_CBWR, which torch reads once)

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout; site-packages when the package is installed


def _existing(path: str, what: str) -> Path:
    from training.train import MissingInputError

    if not (REPO_ROOT / "setup.cfg").is_file():  # installed (pip install ., a wheel): no sample or configs/ beside it
        if Path(path).exists():
            return Path(path)
        raise MissingInputError(f"{what} {path} not found in {Path.cwd()}; the bundled sample (data/sample/tiles) and "
                                "configs/demo.yaml are in the source repository, not in the installed package: run "
                                "from a checkout or give --data_dir and --config.")
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.exists():
            return candidate
    places = " and ".join(str(place) for place in dict.fromkeys((Path.cwd(), REPO_ROOT)))  # once where they are one
    raise MissingInputError(f"{what} {path} not found (looked in {places}).")


BASELINES = ("opt_v1", "linear_fit")
BASELINE_LABELS = {"opt_v1": "opt_v1", "linear_fit": "the colour fit"}


def _reduction(baseline: float, refined: float) -> float:
    return (baseline - refined) / baseline if baseline else 0.0


def gains(results: dict) -> dict[str, dict[str, float]]:
    """Per metric: each baseline present (opt_v1, linear_fit), refined, and the relative reduction of the refined
    value against each (`reduction` vs opt_v1, `reduction_vs_linear_fit`; positive = better)."""
    from training.metrics import GAIN_METRICS

    table = {}
    for name in GAIN_METRICS:
        refined = results["refined"][name]
        row = {"refined": refined}
        for baseline in BASELINES:
            if baseline in results:
                row[baseline] = results[baseline][name]
                key = "reduction" if baseline == "opt_v1" else f"reduction_vs_{baseline}"
                row[key] = _reduction(results[baseline][name], refined)
        table[name] = row
    return table


def _percent_lower(reduction: float) -> str:
    return f"{100 * reduction:.1f}% lower" if reduction > 0 else "not lower"


def describe_gains(table: dict) -> str:
    parts = []
    for name, row in table.items():
        text = f"{name} {row['opt_v1']:.4f} -> {row['refined']:.4f} ({_percent_lower(row['reduction'])}"
        if "linear_fit" in row:
            text += f"; colour fit {row['linear_fit']:.4f}, {_percent_lower(row['reduction_vs_linear_fit'])}"
        parts.append(text + ")")
    return ", ".join(parts)


def not_beaten(table: dict) -> list[str]:
    """`metric vs baseline` for every baseline the refined output does not beat (a lower value beats; a NaN, of a
    model that diverged, beats none)."""
    return [f"{name} vs {BASELINE_LABELS[baseline]}" for name, row in table.items() for baseline in BASELINES
            if baseline in row and not row["refined"] < row[baseline]]


def record_held_out_results(best: Path, results: dict) -> None:
    """Make the held-out (test) results the model's record: `best/metrics.json` (the validation metrics of the best
    step give way; they stay in `demo_results.json`; its step and epoch stay) and the model card made from it, the
    card `stage2-push` makes again for the repo."""
    import json

    from model_cards.cards import write_model_card
    from modeling_stage2._files import write_json
    from modeling_stage2.adapters import METRICS_FILE

    trained = json.loads((best / METRICS_FILE).read_text(encoding="utf-8"))
    # the step, and the precision of the model that measured both (the same model in memory)
    step = {key: trained[key] for key in ("global_step", "epoch", "quantization") if key in trained}
    write_json(best / METRICS_FILE, {**results, **step}, sort_keys=True)
    write_model_card(best)


def _spelling(parser, argv: list[str] | None, flag: str) -> str:
    """How `argv` spells the demo's own `flag` (`--data-dir` for `--data_dir`), passed on as typed so that
    stage2-train's messages name the flag the user typed; `flag` itself where it is abbreviated or not given."""
    spellings = parser._option_string_actions[flag].option_strings
    typed = [item.split("=", 1)[0] for item in (sys.argv[1:] if argv is None else argv)]
    return next((item for item in reversed(typed) if item in spellings), flag)


@exit_on_termination  # SIGTERM / SIGHUP run the training's cleanups, as Ctrl-C does, and exit 128 + N
def main(argv=None) -> int:
    from modeling_stage2.vocabulary import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0],
                                   epilog="Every other flag is a stage2-train flag (stage2-train --help-all), "
                                          "e.g. --epochs N, --dataset_seed N, --degradation strong.")
    # both spellings, as stage2-train's: one it did not know went on to stage2-train beside the demo's own
    parser.add_argument("--output_dir", "--output-dir", default="runs/demo")
    parser.add_argument("--data_dir", "--data-dir", default="data/sample/tiles",
                        help="NPZ tiles (default: the bundled sample)")
    parser.add_argument("--config", default="configs/demo.yaml")
    args, training_flags = parser.parse_known_args(argv)
    from training.train import UsageError, check_run_inputs, ensure_arrow_dataset, parse_args, run_training

    try:  # a mistake in the flags or inputs: one line and status 2, before any work (1 says: a baseline not beaten)
        data_flag, output_flag = (_spelling(parser, argv, name) for name in ("--data_dir", "--output_dir"))
        data_dir = _existing(args.data_dir, data_flag)
        config = _existing(args.config, "--config")
        training_args, data_args, settings = parse_args(["--config", str(config), data_flag, str(data_dir),
                                                         output_flag, str(args.output_dir), *training_flags])
        check_run_inputs(training_args, data_args)
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2

    from datasets import load_from_disk

    from data_builders.build import recorded_opt_v1
    from modeling_stage2 import load_trained_model
    from modeling_stage2._files import write_json
    from training.bootstrap import DEFAULT_RESAMPLES, format_bootstrap_table
    from training.evaluate import evaluate_model, fit_color_baseline, load_split
    from training.metrics import baseline_labels, format_metrics_table

    output_dir = Path(args.output_dir)
    print(f"== Training {config} on {data_dir} -> {output_dir}", flush=True)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    trainer = run_training(training_args, data_args, settings)
    dataset_dir = ensure_arrow_dataset(data_args, output_dir)

    model = load_trained_model(output_dir / "best")
    dataset_dict = load_from_disk(str(dataset_dir))
    color_fit = fit_color_baseline(dataset_dict)  # the second baseline, on the same training tiles
    results = {}
    for split in ("val", "test"):
        if split not in dataset_dict:
            continue
        dataset = load_split(str(dataset_dir), split, dataset_dict=dataset_dict)
        results[split] = evaluate_model(model, dataset, progress=False, color_fit=color_fit, split=split,
                                        bootstrap_resamples=DEFAULT_RESAMPLES, data=recorded_opt_v1(dataset_dict))
    results["gains"] = {split: gains(results[split]) for split in ("val", "test") if split in results}
    results["global_step"] = trainer.state.global_step
    write_json(output_dir / "demo_results.json", results)
    if "test" in results:
        record_held_out_results(output_dir / "best", results["test"])

    for split in ("val", "test"):
        if split in results:
            role = "; used to pick the best step" if split == "val" else ""
            print(f"\n== {split} split (held out from training{role})")
            print(format_metrics_table(results[split]))
    print()
    for split, label in (("val", "validation"), ("test", "held-out test")):
        if split in results["gains"]:
            print(f"Refined vs the baselines on the {label} tiles: " + describe_gains(results["gains"][split]))
    held_out = "test" if "test" in results["gains"] else "val"
    if "bootstrap" in results[held_out]:  # how much the verdict below hangs on which tiles were held out
        print()
        print(format_bootstrap_table(results[held_out]["bootstrap"], results[held_out]["n_tiles"],
                                     baseline_labels(results[held_out])))
    print(f"Model, model card and preview: {output_dir / 'best'}; results: {output_dir / 'demo_results.json'}")
    failed = not_beaten(results["gains"][held_out])
    if failed:
        print(f"The refined output does not beat {', '.join(failed)} ({held_out} split); docs/quality.md says what "
              "limits it on this sample.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
