"""One neutral fill of invalid (nodata) pixels everywhere (`data_builders.tiles.fill_invalid_pixels`): before the
synthetic degradation's blur, for the model in training (`TileDataset`), in evaluation (`evaluate_model`) and in
inference. The degradation blurred a target whose invalid pixels were 0, darkening its neighbours (a NaN row of B08
made the next rows' opt_v1 0.78x of what they are without it), and the model met zeros there in training but band
means at inference."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_builders import make_eval_transform
from data_builders.degrade import DEGRADATION_VERSION, DegradationRedraw, synthesize_opt_v1
from data_builders.tiles import fill_invalid_pixels, read_tile

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "tiles"
HOLE_ROW = 60


def _textured_target(seed: int = 0) -> np.ndarray:
    """(4, 120, 120) reflectance: a level per band with 5 % pixel texture, so that a row's mean is the tile's band
    mean within ~0.5 % (0.05 / sqrt(120))."""
    rng = np.random.default_rng(seed)
    level = np.array([0.05, 0.08, 0.06, 0.3], np.float32)[:, None, None]
    return (level * (1 + 0.05 * rng.standard_normal((4, 120, 120)))).astype(np.float32)


def _with_hole_row(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The target as a built tile holds it with row `HOLE_ROW` invalid (0 there), and its valid mask."""
    mask = np.ones(target.shape[1:], bool)
    mask[HOLE_ROW] = False
    holed = target.copy()
    holed[:, ~mask] = 0.0
    return holed, mask


def _band_means(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.array([band[mask].astype(np.float64).mean() for band in image])


def _row_mean_ratios(degrade, target: np.ndarray) -> np.ndarray:
    """(rows, bands): mean of each row beside the hole (1 and 2 rows away) in the holed tile's opt_v1 over the same
    in the opt_v1 of the whole tile."""
    holed, mask = _with_hole_row(target)
    with_hole, whole = degrade(holed, mask), degrade(target, None)
    assert (with_hole[:, HOLE_ROW] == 0).all()  # invalid pixels of the output are still 0
    rows = [HOLE_ROW - 2, HOLE_ROW - 1, HOLE_ROW + 1, HOLE_ROW + 2]
    return np.stack([with_hole[:, r].mean(axis=1) / whole[:, r].mean(axis=1) for r in rows])


# ------------------------------------------------------------------------------------------- one definition
def test_the_fill_has_one_definition_which_inference_imports():
    from inference_stage2 import predict, scenes, values

    assert values.fill_invalid_pixels is fill_invalid_pixels  # still importable where it was
    assert predict.fill_invalid_pixels is fill_invalid_pixels and scenes.fill_invalid_pixels is fill_invalid_pixels


# ------------------------------------------------------------------------------------------- the degradation
@pytest.mark.parametrize("preset", ["mild", "strong"])
def test_an_invalid_row_does_not_darken_its_neighbours_in_the_synthetic_opt_v1(preset):
    """Without the fill, rows 1 and 2 away from the hole came out 0.77-0.90x (mild) of their level. With it they get
    the band mean blurred in instead of the row's own values: the same within the texture's ~0.5 % on a row mean,
    times the blur's weight (< 0.5), plus the noise's scale following that (3-5 % of it): 1 % is ample."""
    ratios = _row_mean_ratios(lambda image, mask: synthesize_opt_v1(image, "holes", 0, preset, mask),
                              _textured_target())
    np.testing.assert_allclose(ratios, 1.0, rtol=0, atol=0.01)


def test_the_synthetic_opt_v1_of_a_tile_with_holes_is_that_of_the_tile_filled_with_band_means():
    """Exactly: the degradation of a tile with invalid pixels is the degradation of the tile whose invalid pixels
    hold the band means of its valid ones (then 0 there), bit for bit, in every preset."""
    holed, mask = _with_hole_row(_textured_target(1))
    mask[10:30, 80:100] = False
    holed[:, ~mask] = 0.0
    filled = holed.copy()
    for band, mean in zip(filled, [band[mask].mean() for band in holed]):
        band[~mask] = mean
    for preset in ("mild", "strong", "mixture"):
        expected = synthesize_opt_v1(filled, "holes", 3, preset)
        expected[:, ~mask] = 0.0
        assert synthesize_opt_v1(holed, "holes", 3, preset, mask).tobytes() == expected.tobytes(), preset


def test_a_redrawn_opt_v1_gets_the_fill_too():
    """`--redraw_degradation` draws through `synthesize_opt_v1`: its later draws do not leak either."""
    redraw = DegradationRedraw.from_record({"mode": "synthetic", "preset": "mild", "seed": 0, "degradation": {},
                                            "degradation_version": DEGRADATION_VERSION})
    for draw in (0, 1, 2):
        ratios = _row_mean_ratios(lambda image, mask: redraw(image, "holes", mask, draw), _textured_target())
        np.testing.assert_allclose(ratios, 1.0, rtol=0, atol=0.01)


@pytest.mark.parametrize("preset", ["mild", "strong", "mixture"])
def test_a_tile_without_invalid_pixels_is_degraded_bit_for_bit_as_before(preset):
    """Every recorded figure was made on tiles without an invalid pixel (the bundled sample has none): an all-True
    mask gives what no mask gives (the path before the fill existed; `tests/test_data_degrade.py` pins that one to
    an independent reference implementation and to the numbers of the recorded studies)."""
    for path in sorted(SAMPLE.glob("*/*.npz"))[::20]:
        tile = read_tile(path)
        assert tile.valid_mask.all()
        with_mask = synthesize_opt_v1(tile.target, tile.tile_id, 0, preset, tile.valid_mask)
        assert with_mask.tobytes() == synthesize_opt_v1(tile.target, tile.tile_id, 0, preset).tobytes(), path.name


# ------------------------------------------------------------------------------------------- training rows
def _rows(valid: bool):
    """Two rows of a split: the second with an invalid block (target and opt_v1 0 there) unless `valid`."""
    import datasets

    rng = np.random.default_rng(2)
    target = rng.uniform(0.02, 0.4, (2, 4, 16, 16)).astype(np.float32)
    opt_v1 = (target * 1.05 + rng.normal(0, 0.01, target.shape)).astype(np.float32)
    mask = np.ones((2, 16, 16), bool)
    if not valid:
        mask[1, 4:9, 6:12] = False
        target[1][:, ~mask[1]] = 0.0
        opt_v1[1][:, ~mask[1]] = 0.0
    return datasets.Dataset.from_dict({"target": target, "opt_v1": opt_v1, "month": [1, 2], "biome": [0, 3],
                                       "valid_mask": mask}), opt_v1, mask


def _check_filled(given: np.ndarray, stored: np.ndarray, mask: np.ndarray) -> None:
    """`given` is `stored` on valid pixels, bit for bit, and each band's mean of its valid pixels elsewhere."""
    np.testing.assert_array_equal(given[:, mask], stored[:, mask])
    means = _band_means(stored, mask)
    np.testing.assert_allclose(given[:, ~mask], np.broadcast_to(means[:, None], given[:, ~mask].shape),
                               rtol=1e-6, atol=0)
    assert (means > 0.05).all()  # the block is far from the stored 0


def test_a_training_row_gives_the_model_band_means_at_its_invalid_pixels():
    from training.data import TileDataset

    split, opt_v1, mask = _rows(valid=False)
    rows = TileDataset(split, make_eval_transform()).__getitems__([0, 1])
    assert rows[0]["opt_v1"].numpy().tobytes() == opt_v1[0].tobytes()  # the all-valid row is left alone
    _check_filled(rows[1]["opt_v1"].numpy(), opt_v1[1], mask[1])
    assert torch.equal(rows[1]["valid_mask"], torch.from_numpy(mask[1]))
    assert (rows[1]["target"].numpy()[:, ~mask[1]] == 0).all()  # the target is not filled: the losses mask it


def test_a_redrawn_training_row_is_filled_after_the_redraw():
    from training.data import TileDataset

    split, opt_v1, mask = _rows(valid=False)
    split = split.add_column("tile_id", ["a", "b"])

    def redraw(target, tile_id, valid_mask, draw):  # a stand-in degradation: 0 at invalid pixels, as the real one
        return np.where(valid_mask, target * (1 + draw), np.float32(0)).astype(np.float32)

    dataset = TileDataset(split, make_eval_transform(), redraw=redraw)
    dataset.set_epoch(2)
    row = dataset.__getitems__([1])[0]
    target = np.asarray(split["target"][1], np.float32)
    _check_filled(row["opt_v1"].numpy(), redraw(target, "b", mask[1], 2), mask[1])


def test_training_rows_without_invalid_pixels_are_bit_for_bit_the_stored_ones():
    from training.data import TileDataset

    split, opt_v1, _ = _rows(valid=True)
    rows = TileDataset(split, make_eval_transform()).__getitems__([0, 1])
    for row, stored in zip(rows, opt_v1):
        assert row["opt_v1"].numpy().tobytes() == stored.tobytes()
    bare = split.remove_columns("valid_mask")  # no mask: nothing to fill
    for row, stored in zip(TileDataset(bare, make_eval_transform()).__getitems__([0, 1]), opt_v1):
        assert row["opt_v1"].numpy().tobytes() == stored.tobytes()


# ------------------------------------------------------------------------------------------- evaluate_model
class _RecordingRefiner(torch.nn.Module):
    """`refined = 0.9 * opt_v1`, keeping every input it was given."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(0.9))
        self.inputs = []

    def forward(self, opt_v1, month, biome):
        self.inputs.append(opt_v1.detach().clone())
        return SimpleNamespace(refined=opt_v1 * self.gain)


@pytest.mark.parametrize("valid", [False, True], ids=["invalid-block", "all-valid"])
def test_evaluate_model_fills_the_model_input_only_and_scores_as_before(valid):
    from training.evaluate import evaluate_model
    from training.metrics import evaluate_pair

    split, opt_v1, mask = _rows(valid)
    model = _RecordingRefiner()
    results = evaluate_model(model, split.with_format("numpy"), batch_size=2, progress=False)
    given = torch.cat(model.inputs).numpy()
    assert given[0].tobytes() == opt_v1[0].tobytes()
    if valid:
        assert given.tobytes() == opt_v1.tobytes()
    else:
        _check_filled(given[1], opt_v1[1], mask[1])
    # the metrics mask invalid pixels: those of the stored opt_v1 and of its 0.9 gain, as before the fill
    target = np.asarray(split["target"], np.float32)
    expected = evaluate_pair(torch.from_numpy(0.9 * opt_v1), torch.from_numpy(target), torch.from_numpy(opt_v1),
                             torch.from_numpy(mask))
    for role in ("refined", "opt_v1"):
        for name, value in expected[role].items():
            assert results[role][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (role, name)


# ------------------------------------------------------------------------------------------- one rule
def test_inference_gives_the_model_what_training_gives_it():
    """The same image with NaN at a tile's invalid pixels (`refine_arrays`) and stored as a row (0 there, with its
    valid mask): the model is given the same values, bit for bit."""
    from inference_stage2 import refine_arrays
    from training.data import TileDataset

    split, opt_v1, mask = _rows(valid=False)
    model = _RecordingRefiner()
    with_nan = opt_v1[1].copy()
    with_nan[:, ~mask[1]] = np.nan
    refined = refine_arrays(model, with_nan, 2, 3)
    assert np.isnan(refined[:, ~mask[1]]).all()  # still nodata in the output
    row = TileDataset(split, make_eval_transform()).__getitems__([1])[0]
    assert model.inputs[0][0].numpy().tobytes() == row["opt_v1"].numpy().tobytes()
