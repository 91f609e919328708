"""How sure is "the refined output beats a baseline" on a few tiles? A paired tile bootstrap of the ratio.

Every metric of `training.metrics` is pooled over the valid pixels of an evaluation set from per-tile sums
(`TILE_STATISTICS`). Which tiles happen to be in a small set moves those pooled values a lot: on the bundled
sample's 18 test tiles two bright tiles hold half of the spectral fit's squared EVI error (docs/quality.md).
`bootstrap_ratios` resamples the tiles with replacement, the same tiles for the refined output and for each
baseline (paired: what differs between two outputs on one tile is not resampled away), recomputes the pooled metrics
of each resample from the summed statistics, and reports the spread of refined / baseline:

    {"resamples": 1000, "confidence": 0.9, "seed": 0,
     "opt_v1":     {"evi_rmse": {"ratio": 0.75, "low": 0.64, "high": 0.87, "share_below_1": 1.0}, ...},
     "linear_fit": {...}}

`ratio` is the ratio on the set itself; `low`..`high` the central `confidence` interval of the resampled ratios;
`share_below_1` the share of resamples in which the refined output is better (lower). A metric whose ratio is not
defined on some resample (a baseline value of 0, or a non-finite value) gets None. The percentile interval of a
bootstrap over n tiles says how much the verdict hangs on the tiles drawn; it is not a promise about other data,
and with few tiles it is itself rough.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .metrics import GAIN_METRICS, TILE_STATISTICS, metrics_from_statistics

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.9
# Resampled tile indices held at once (resamples x tiles): bounds the memory of a set with very many tiles.
MAX_RESAMPLED_TILES = 1 << 24


def _resampled_metrics(statistics: Mapping[str, torch.Tensor], indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pooled metrics of each row of tile indices (R, n): (R,) tensors."""
    return metrics_from_statistics({name: statistics[name][indices].sum(dim=-1) for name in TILE_STATISTICS})


def _as_columns(statistics: Mapping, role: str) -> dict[str, torch.Tensor]:
    missing = [name for name in TILE_STATISTICS if name not in statistics]
    if missing:
        raise KeyError(f"{role} statistics lack {missing}; expected TILE_STATISTICS = {TILE_STATISTICS}.")
    return {name: torch.as_tensor(statistics[name], dtype=torch.float64).reshape(-1) for name in TILE_STATISTICS}


def bootstrap_ratios(refined: Mapping, baselines: Mapping[str, Mapping], resamples: int = DEFAULT_RESAMPLES,
                     confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> dict | None:
    """Paired tile bootstrap of refined / baseline for each `GAIN_METRICS` metric (see the module docstring).

    `refined` and each of `baselines` (role -> statistics, e.g. `{"opt_v1": ..., "linear_fit": ...}`) map every
    `TILE_STATISTICS` name to a (n,) tensor of per-tile sums, the same n tiles in the same order. Seeded: the same
    statistics give the same intervals. Returns None for fewer than 2 tiles (every resample would be the set)."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}.")
    columns = {"refined": _as_columns(refined, "refined")}
    columns.update({role: _as_columns(stats, role) for role, stats in baselines.items()})
    sizes = {role: int(stats["valid_pixels"].numel()) for role, stats in columns.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the refined output and the baselines cover different numbers of tiles: {sizes}.")
    n_tiles = sizes["refined"]
    if n_tiles < 2:
        return None

    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, MAX_RESAMPLED_TILES // n_tiles)
    ratios: dict[str, dict[str, list]] = {role: {name: [] for name in GAIN_METRICS} for role in baselines}
    for start in range(0, resamples, chunk):
        indices = torch.randint(0, n_tiles, (min(chunk, resamples - start), n_tiles), generator=generator)
        resampled = {role: _resampled_metrics(stats, indices) for role, stats in columns.items()}
        for role in baselines:
            for name in GAIN_METRICS:
                ratios[role][name].append(resampled["refined"][name] / resampled[role][name])

    whole = {role: metrics_from_statistics({name: stats[name].sum() for name in TILE_STATISTICS})
             for role, stats in columns.items()}
    result: dict = {"resamples": resamples, "confidence": confidence, "seed": seed}
    tail = (1.0 - confidence) / 2
    for role in baselines:
        result[role] = {}
        for name in GAIN_METRICS:
            values = torch.cat(ratios[role][name])
            ratio = whole["refined"][name] / whole[role][name]
            if not (bool(torch.isfinite(values).all()) and bool(torch.isfinite(ratio))):
                result[role][name] = None
                continue
            low, high = np.quantile(values.numpy(), [tail, 1.0 - tail]).tolist()  # torch.quantile stops at 2**24
            result[role][name] = {"ratio": float(ratio), "low": low, "high": high,
                                  "share_below_1": float((values < 1.0).double().mean())}
    return result


def interval_cell(cell: Mapping | None) -> str:
    """One `bootstrap_ratios` entry as a table cell: 'ratio (low-high)', or 'n/a' where the ratio is undefined."""
    return "n/a" if cell is None else f"{cell['ratio']:.2f} ({cell['low']:.2f}-{cell['high']:.2f})"


def format_bootstrap_table(bootstrap: Mapping, n_tiles: int, labels: Mapping[str, str]) -> str:
    """Markdown table of `bootstrap_ratios` output: one row per metric, one column per baseline, named by `labels`
    (role -> column header); cells 'ratio (low-high)'."""
    roles = [role for role in labels if role in bootstrap]
    lines = [
        f"Refined / baseline on these {n_tiles} tiles, with the {100 * bootstrap['confidence']:g} % interval of a "
        f"paired tile bootstrap ({bootstrap['resamples']} resamples; below 1 = the refined output is better):",
        "",
        "| metric | " + " | ".join(f"/ {labels[role]}" for role in roles) + " |",
        "| --- | " + " | ".join("---:" for _ in roles) + " |",
    ]
    for name in GAIN_METRICS:
        lines.append(f"| {name} | " + " | ".join(interval_cell(bootstrap[role][name]) for role in roles) + " |")
    return "\n".join(lines)


__all__ = ["DEFAULT_CONFIDENCE", "DEFAULT_RESAMPLES", "bootstrap_ratios", "format_bootstrap_table", "interval_cell"]
