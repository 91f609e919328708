"""Evaluate a trained refiner on a dataset split: metrics of the refined output and of `opt_v1` side by side.

    stage2-evaluate --model runs/demo/best --data data/sample/tiles [--split val] [--stage1_dir S] [--json FILE]
                    [--bootstrap N]

`--model` is a folder written by training (`best/`, a checkpoint, `save_trained_model`) or a full refiner folder
(`save_pretrained` / `export_merged_model`), or a Hub repo id. `--data` is NPZ tiles (converted to Arrow in a
temporary folder, or in `--cache_dir`) or a saved Arrow `DatasetDict`. Prints a table; `--json FILE` writes
`{"refined": {...}, "opt_v1": {...}, "linear_fit": {...}, "n_tiles": N, "split": S, "data": {...},
"quantization": Q}` with `ndvi_rmse`, `evi_rmse`, `sam`, `identity_l1`, `edge_l1`, `psnr`, `ssim` in each metric
object. `"data"` says what the evaluated data's `opt_v1` is, from its build record (`input_mode`, and for a synthetic
one `degradation` and `dataset_seed`), so that a model card names the data its metrics were computed on;
`"quantization"` is `--quantization` ("8bit", "4bit", or "none": full precision), the precision of the backbone the
metrics were measured with, which the card states beside that data.

Two baselines: `opt_v1` itself, always, and (`--baselines`, on by default when the data has a `train` split) the
least-squares colour fit (4x4 + bias, `training.linear_fit`) fitted on the `train` split's valid pixels and
applied to the evaluated split (`"linear_fit"`, with `"linear_fit_fitted_on"` naming the split and tile count).

How much the verdict against them hangs on which tiles were evaluated: refined / each baseline on NDVI RMSE, EVI RMSE
and SAM, with the 90 % interval of a paired tile bootstrap (`--bootstrap N` resamples, default 1000, seed 0; 0 turns
it off; `training.bootstrap`), printed under the table and written as `"bootstrap"` (from 2 tiles up).

Exit status: 0 on success, 2 for a usage or input error (one line on stderr), 1 when the disk is full, or when the
Hub could not be reached (or failed) and the model is not cached, or for a partial evaluation: NPZ tiles of the
evaluated split rejected by the conversion (named on stderr; the metrics of the others and `--json` are written, its
`"rejected"` the count).
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

from data_builders.degrade import DEGRADATION_CHOICES
from data_builders.tiles import TRAIN_SPLIT
from modeling_stage2._files import is_system_failure, output_path_problem, remove_tree
from modeling_stage2._signals import exit_on_termination
from modeling_stage2.hub import (
    download_failure, hub_download_errors, hub_failure_is_users, hub_failure_line, hub_snapshot_paths_named,
    is_hub_repo_id, local_revision_problem,
)
from modeling_stage2.vocabulary import INPUT_MODES, QUANTIZATIONS, OneLineArgumentParser
from training.bootstrap import DEFAULT_RESAMPLES


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="stage2-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained model folder (best/, checkpoint) or Hub repo id")
    parser.add_argument("--revision", default=None,
                        help="with a Hub repo id: the branch, tag or commit to download (default: main)")
    parser.add_argument("--data", required=True, help="NPZ tiles folder or saved Arrow DatasetDict")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument("--stage1_dir", default=None, help="Stage 1 outputs (<tile>.npz with opt_v1) for NPZ tiles")
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")
    parser.add_argument("--batch_size", type=int, default=4, help="tiles per forward pass (default: 4)")
    parser.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                        help="how to load the backbone of an adapter's frozen base or of a full model (default: none)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N tiles")
    parser.add_argument("--input_mode", default=None, choices=INPUT_MODES,
                        help="how opt_v1 is made for NPZ tiles (default: synthetic, or stage1 with --stage1_dir)")
    # None when not given: an Arrow --data ignores them, which is said only when they were asked for
    parser.add_argument("--dataset_seed", type=int, default=None,
                        help="seed of the synthetic opt_v1 degradation for NPZ tiles (default: 0)")
    parser.add_argument("--degradation", default=None, choices=DEGRADATION_CHOICES,
                        help="preset of the synthetic opt_v1 degradation for NPZ tiles (default: mild)")
    parser.add_argument("--cache_dir", default=None, help="keep the converted NPZ dataset here (default: temporary)")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                        help="also report the least-squares colour fit of the train split (default: on when the "
                             "data has a train split; --no-baselines turns it off)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                        help="resamples of the paired tile bootstrap of refined / baseline (default: "
                             f"{DEFAULT_RESAMPLES}; 0 turns it off)")
    return parser


FIT_SPLIT = TRAIN_SPLIT


def no_fit_split_problem(data) -> str:
    """Why `--baselines` cannot be met: `data` has no `FIT_SPLIT` to fit the colour baseline on."""
    return f"--baselines: {data} has no {FIT_SPLIT!r} split to fit the colour baseline on."


def load_dataset_dict(data: str, stage1_dir=None, input_mode=None, seed=0, cache_dir=None, degradation="mild",
                      before_conversion=None, rejected: list | None = None):
    """The `DatasetDict` of `data`: a saved Arrow dataset, or NPZ tiles converted (in `cache_dir` or a temporary
    folder; `before_conversion()` is called first, once the tiles are found). `rejected`: a list, extended with the
    records of the NPZ tiles the conversion left out (`report_rejected_tiles`)."""
    from datasets import load_from_disk

    from data_builders.cache import dataset_cache_key, is_arrow_dataset, saved_dataset_problem

    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder.")
    if is_arrow_dataset(path):
        from data_builders.build import saved_opt_v1_problem

        problem = saved_dataset_problem(path) or saved_opt_v1_problem(path, stage1_dir, input_mode, flag="--data")
        if problem is not None:
            raise ValueError(problem)
        dataset_dict = load_from_disk(str(path))
    else:
        from data_builders import build_dataset

        root = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="stage2-evaluate-"))
        target = root / dataset_cache_key(path, stage1_dir, input_mode, seed, degradation=degradation, flag="--data")
        if not is_arrow_dataset(target):
            if before_conversion is not None:
                before_conversion()
            build_dataset(path, target, stage1_dir=stage1_dir, input_mode=input_mode, seed=seed,
                          degradation=degradation)
        records = report_rejected_tiles(target)
        if rejected is not None:
            rejected.extend(records)
        dataset_dict = load_from_disk(str(target))
    return dataset_dict


def report_rejected_tiles(dataset_dir: Path) -> list[dict]:
    """Print (stderr) every NPZ tile the conversion left out, with its reason: the evaluation does not cover them.
    Returns the records of `rejected.jsonl`."""
    from data_builders.build import read_rejected
    from data_builders.tiles import TileError

    records = read_rejected(dataset_dir)
    for record in records:
        reason = TileError(record["file"], record.get("key"), record["problem"])  # the builder's own wording
        print(f"stage2-evaluate: rejected {reason} (not evaluated)", file=sys.stderr)
    return records


def load_split(data: str, split: str, stage1_dir=None, input_mode=None, seed=0, cache_dir=None,
               max_samples=None, dataset_dict=None):
    """A dataset split in numpy format with the columns a batch needs (read zero-copy from Arrow; `evaluate_model`
    collates them into tensors, as training does), from Arrow or NPZ tiles (or `dataset_dict`, already loaded from
    `data`)."""
    from training.data import BATCH_COLUMNS

    if dataset_dict is None:
        dataset_dict = load_dataset_dict(data, stage1_dir, input_mode, seed, cache_dir)
    if split not in dataset_dict:
        raise ValueError(f"{data}: no {split!r} split (it has {sorted(dataset_dict)}).")
    dataset = dataset_dict[split]
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{data}: split {split!r} is empty.")
    return dataset.with_format("numpy", columns=[name for name in BATCH_COLUMNS if name in dataset.column_names])


def fit_color_baseline(dataset_dict, split: str = FIT_SPLIT):
    """The least-squares colour fit of `dataset_dict[split]` (a `training.linear_fit.ColorFitResult`), or None when
    there is no such split."""
    from training.linear_fit import LinearColorFit

    if split not in dataset_dict or len(dataset_dict[split]) == 0:
        return None
    return LinearColorFit.from_dataset(dataset_dict[split])


@torch.no_grad()
def evaluate_model(model, dataset, batch_size: int = 4, device=None, progress: bool = True, color_fit=None,
                   color_fit_split: str = FIT_SPLIT, split: str | None = None, bootstrap_resamples: int = 0,
                   data: dict | None = None) -> dict:
    """`{"refined": {...}, "opt_v1": {...}, "n_tiles": N}` of `model` on `dataset` (rows of numpy arrays or tensors,
    e.g. `load_split`'s; collated with the evaluation transform), plus
    `"linear_fit": {...}` and `"linear_fit_fitted_on"` when `color_fit` (a `ColorFitResult`) is given,
    `"split"` (the name of the split `dataset` is, recorded for model cards) and `"data"` (what its `opt_v1` is,
    `data_builders.build.recorded_opt_v1`, for model cards too) when given, and `"bootstrap"` (refined /
    each baseline with a paired tile-bootstrap interval, `training.bootstrap.bootstrap_ratios`, seed 0) when
    `bootstrap_resamples` > 0 and there are at least 2 tiles.

    The model is given `opt_v1` with the invalid pixels of a tile (where `valid_mask` is False) filled as in training
    and inference (`training.data.model_input_opt_v1`); the metrics score the stored `opt_v1`, those pixels masked."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from data_builders import make_eval_transform

    from training.bootstrap import bootstrap_ratios
    from training.data import model_input_opt_v1
    from training.metrics import MetricAccumulator

    if bootstrap_resamples < 0:
        raise ValueError(f"bootstrap_resamples must be >= 0 (0: no bootstrap), got {bootstrap_resamples}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    keep_tiles = bootstrap_resamples > 0
    accumulator = MetricAccumulator(keep_tiles=keep_tiles)
    fit_accumulator = MetricAccumulator(keep_tiles=keep_tiles) if color_fit is not None else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=make_eval_transform().collate)
    for batch in tqdm(loader, desc="Evaluating", unit="batch", disable=not progress):
        # the model gets invalid pixels filled as in training and inference; the metrics score the stored opt_v1
        model_input = model_input_opt_v1(batch["opt_v1"], batch.get("valid_mask")).to(device)
        refined = model(opt_v1=model_input, month=batch["month"].to(device), biome=batch["biome"].to(device)).refined
        target, opt_v1 = batch["target"].float(), batch["opt_v1"].float()
        accumulator.update(refined.float().cpu(), target, opt_v1, batch.get("valid_mask"))
        if fit_accumulator is not None:
            fit_accumulator.update(color_fit.apply(opt_v1), target, opt_v1, batch.get("valid_mask"))
    results = accumulator.compute()
    if fit_accumulator is not None:
        results["linear_fit"] = fit_accumulator.compute()["refined"]
        results["linear_fit_fitted_on"] = {"split": color_fit_split, "tiles": color_fit.tiles}
    if split is not None:
        results["split"] = split
    if data is not None:
        results["data"] = dict(data)
    if keep_tiles:
        baselines = {"opt_v1": accumulator.tile_statistics_of("opt_v1")}
        if fit_accumulator is not None:  # the colour fit's output is the "refined" role of its own accumulator
            baselines["linear_fit"] = fit_accumulator.tile_statistics_of("refined")
        bootstrap = bootstrap_ratios(accumulator.tile_statistics_of("refined"), baselines, bootstrap_resamples)
        if bootstrap is not None:
            results["bootstrap"] = bootstrap
    return results


def run(args) -> dict:
    """Evaluate as the parsed command line says; returns the results (what `--json` writes). NPZ tiles are
    converted in `--cache_dir`, or in a temporary folder removed at the end."""
    if args.cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix="stage2-evaluate-")
        try:
            return _run(args, cache_dir)
        finally:  # not TemporaryDirectory: a signal while it deletes the converted tiles left most of them
            remove_tree(cache_dir)
    return _run(args, args.cache_dir)


def warn_unused_degradation_flags(args, built: dict | None) -> None:
    """Say (stderr) that `--degradation` / `--dataset_seed`, given with a saved Arrow `--data`, are not used: its
    `opt_v1` is what it was built with (`built`, its build record), and the results record that."""
    from data_builders.cache import is_arrow_dataset

    if not is_arrow_dataset(Path(args.data)):
        return
    for flag in ("degradation", "dataset_seed"):  # each the flag of stage2-build-dataset that sets it too
        asked, used = getattr(args, flag), (built or {}).get(flag)
        if asked is not None and asked != used:
            made = (f"whose opt_v1 was synthesised with {flag} {used!r} (stage2-build-dataset --{flag})"
                    if used is not None else f"holding its own opt_v1 (input_mode {built['input_mode']!r})"
                    if built else "holding its own opt_v1")
            print(f"stage2-evaluate: warning: --{flag} {asked} is not used: --data {args.data} is an Arrow dataset "
                  f"{made}; the results are recorded with the dataset's.", file=sys.stderr)


def _run(args, cache_dir) -> dict:
    from data_builders.build import recorded_opt_v1
    from data_builders.cache import is_arrow_dataset
    from modeling_stage2 import load_trained_model
    from modeling_stage2.adapters import check_device, check_model_folder

    from training.bootstrap import format_bootstrap_table
    from training.metrics import baseline_labels, format_metrics_table, not_finite_metrics

    check_device(args.device)  # a mistyped or absent device too: the model loads only after the data and the fit
    if Path(args.model).expanduser().is_dir():  # a damaged model is named before the data are converted
        check_model_folder(Path(args.model).expanduser())

    def model_exists():  # a missing one too, once the data's own problems are named
        if not Path(args.model).expanduser().is_dir() and not is_hub_repo_id(args.model):
            raise FileNotFoundError(f"--model {args.model}: no such folder (nor a Hub repo id OWNER/NAME).")

    def before_conversion():  # what can be told of NPZ tiles without reading their pixels
        model_exists()
        if args.baselines:
            from data_builders.discovery import discover_tiles

            if FIT_SPLIT not in discover_tiles(args.data, stage1_dir=args.stage1_dir)[0]:  # sidecars read, no pixel
                raise ValueError(no_fit_split_problem(args.data))

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seed = 0 if args.dataset_seed is None else args.dataset_seed
    rejected = []
    dataset_dict = load_dataset_dict(args.data, args.stage1_dir, args.input_mode, seed, cache_dir,
                                     args.degradation or "mild", before_conversion=before_conversion,
                                     rejected=rejected)
    built = recorded_opt_v1(dataset_dict)
    warn_unused_degradation_flags(args, built)
    model_exists()
    dataset = load_split(args.data, args.split, max_samples=args.max_samples, dataset_dict=dataset_dict)
    color_fit = None
    if args.baselines is not False:
        color_fit = fit_color_baseline(dataset_dict)
        if color_fit is None and args.baselines:
            raise ValueError(no_fit_split_problem(args.data))
    model = load_trained_model(args.model, quantization=args.quantization,
                               device=device if args.quantization == "none" else None, revision=args.revision)
    results = evaluate_model(model, dataset, args.batch_size, device=None if args.quantization != "none" else device,
                             color_fit=color_fit, split=args.split, bootstrap_resamples=args.bootstrap,
                             data=built)
    results["quantization"] = args.quantization  # a quantized backbone's metrics are not the full-precision model's
    if not is_arrow_dataset(Path(args.data)):  # NPZ tiles: how many of the split the conversion left out
        results["rejected"] = sum(record.get("split") == args.split for record in rejected)
    print(f"Model {args.model} on {args.data} [{args.split}]")
    print(format_metrics_table(results))
    if "bootstrap" in results:
        print()
        print(format_bootstrap_table(results["bootstrap"], results["n_tiles"], baseline_labels(results)))
    not_finite = not_finite_metrics(results)
    if not_finite:  # the model's output was NaN/Inf on valid pixels: no result to record, an error (exit 2)
        raise ValueError(f"--model {args.model}: its refined output is NaN/Inf on valid pixels of split {args.split!r} "
                         f"({', '.join(not_finite)} n/a above): its weights are not finite (a training that "
                         f"diverged?){'; --json not written' if args.json else ''}")
    if args.json:
        from modeling_stage2._files import write_json

        write_json(args.json, results)
        print(f"Wrote {args.json}")
    if results.get("rejected"):
        print(f"stage2-evaluate: {results['rejected']} tile(s) of split {args.split!r} rejected (above), not "
              f"evaluated: the metrics are those of the {results['n_tiles']} evaluated; exit status 1",
              file=sys.stderr)
    return results


@exit_on_termination
def main(argv=None) -> int:
    """Console script `stage2-evaluate`: 0 on success, 2 for a usage or input error, 1 for a Hub out of reach (one line
    on stderr), or tiles of the evaluated split rejected by the conversion (the metrics of the others written)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0 (0 turns it off), got {args.bootstrap}")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max_samples must be >= 1 (or left out: every tile), got {args.max_samples}")
    problem = local_revision_problem(args.model, args.revision)
    if problem is not None:  # it would be ignored
        parser.error(f"--revision {args.revision}: {problem}")
    problem = output_path_problem(args.json) if args.json else None
    if problem is not None:  # found now, not after the evaluation
        parser.error(f"--json {args.json}: {problem}")
    problem = output_path_problem(args.cache_dir, folder=True) if args.cache_dir else None
    if problem is not None:  # where NPZ tiles are converted: found before the model and the data are read
        parser.error(f"--cache_dir {args.cache_dir}: {problem}")
    try:
        results = run(args)
    except hub_download_errors() as error:  # the model, or an adapter's base, from the Hub
        print(f"stage2-evaluate: error: --model {args.model}: {download_failure(args.model)} "
              f"({hub_failure_line(error)})", file=sys.stderr)
        return 2 if hub_failure_is_users(error) else 1  # no such repo or no access; else the Hub out of reach
    except (FileNotFoundError, ValueError) as error:  # a Hub model's files by its repo id, not the cache
        print(f"stage2-evaluate: error: {hub_snapshot_paths_named(str(error), args.model, args.revision)}",
              file=sys.stderr)
        return 2
    except OSError as error:
        if not is_system_failure(error):
            raise
        print(f"stage2-evaluate: error: {error}", file=sys.stderr)  # a full disk: one line, not a traceback
        return 1
    return 1 if results.get("rejected") else 0  # a partial evaluation: tiles of the split were left out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
