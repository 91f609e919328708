"""Scene windowing and blending: window starts, seamless blend weights, the strip accumulator."""
from __future__ import annotations

import numpy as np


def window_starts(size: int, window: int, overlap: int) -> list[int]:
    """Start offsets of windows of `window` px covering `size` px with at least `overlap` px overlap.

    The stride is `window - overlap`; the last window is shifted inside the scene (so it may overlap its
    neighbour by more). A scene no larger than one window gets a single window at 0 (padded later).
    """
    if size <= window:
        return [0]
    starts = list(range(0, size - window, window - overlap))
    starts.append(size - window)
    return starts


def blend_ramp(length: int, ramp: int) -> np.ndarray:
    """1-D weights: a raised-cosine rise over `ramp` px at both ends, 1 in between, > 0 everywhere.

    Weights are normalised by their sum per pixel, so a pixel seen by one window gets exactly that
    window's value and pixels in overlaps fade smoothly from one window to the next (no seams).
    """
    weights = np.ones(length, dtype=np.float64)
    ramp = min(ramp, length // 2)
    if ramp > 0:
        rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        weights[:ramp] = rise
        weights[length - ramp :] = rise[::-1]
    return weights.astype(np.float32)


def blend_weights(height: int, width: int, overlap: int) -> np.ndarray:
    """2-D separable blending weights (height, width) for one window."""
    return np.outer(blend_ramp(height, overlap), blend_ramp(width, overlap))


class StripAccumulator:
    """Weighted sums and weights for the rows that the current strip of windows can still touch.

    It holds `(bands, rows, width)` sums and `(rows, width)` weights, `rows` = the window height, whatever
    the scene's height: rows are handed out (normalised) as soon as no later window can touch them.
    """

    def __init__(self, bands: int, rows: int, width: int):
        self.top = 0
        self.sums = np.zeros((bands, rows, width), dtype=np.float32)
        self.weights = np.zeros((rows, width), dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes + self.weights.nbytes

    def add(self, row: int, col: int, values: np.ndarray, weights: np.ndarray) -> None:
        top = row - self.top
        height, width = weights.shape
        if top < 0 or top + height > self.weights.shape[0]:
            raise RuntimeError(f"window at row {row} is outside the accumulator's rows {self.top}..")
        self.sums[:, top : top + height, col : col + width] += values * weights
        self.weights[top : top + height, col : col + width] += weights

    def pop(self, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Blended values (bands, stop - top, width) and their weights for rows [top, stop); keeps the rest."""
        count = stop - self.top
        weights = self.weights[:count].copy()
        # Pixels no window touched (weight 0) come out 0; a scene corner of a large window weighs about 1e-13 (the
        # ramp's first value squared), which a larger floor would scale down.
        blended = self.sums[:, :count] / np.maximum(weights, np.finfo(np.float32).tiny)
        keep = self.weights.shape[0] - count
        self.sums[:, :keep] = self.sums[:, count:].copy()
        self.weights[:keep] = self.weights[count:].copy()
        self.sums[:, keep:] = 0
        self.weights[keep:] = 0
        self.top = stop
        return blended, weights
