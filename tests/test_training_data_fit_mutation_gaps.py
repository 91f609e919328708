"""Tests closing gaps a mutation audit of training/data.py (the rows' seeded augmentation and redraws),
training/warm_start.py, training/bootstrap.py, training/linear_fit.py (counts, settings of the spectral fit) and
modeling_stage2/pt2_archive.py found: behaviour each mutation changed while every other test still passed. Each
names, in its docstring or name, the behaviour it pins. Tiny tables, a few Adam steps at most."""
from __future__ import annotations

import json
import zipfile

import datasets
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table(count: int = 4, size: int = 4, seed: int = 0, valid=None, **columns) -> datasets.Dataset:
    """`count` random tiles: opt_v1 a 1.5 gain of the target plus 0.02 and noise, every pixel valid by default."""
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.02, 0.4, (count, 4, size, size)).astype(np.float32)
    opt_v1 = (1.5 * target + 0.02 + rng.normal(0, 0.01, target.shape)).astype(np.float32)
    valid = np.ones((count, size, size), bool) if valid is None else valid
    table = {"target": target, "opt_v1": opt_v1, "month": [1] * count, "biome": [0] * count, "valid_mask": valid}
    table.update(columns)
    return datasets.Dataset.from_dict(table)


# ----------------------------------------------------------------------------------- training/data.py
def test_redrawn_opt_v1_asks_each_tile_for_its_draw_with_its_own_id_and_mask():
    """Row i of the stack is the draw `draw` of tile i, asked with tile i's valid_mask (None for every tile when
    there is no mask): rows are not shifted, tiles not swapped, the draw number not moved."""
    from training.data import redrawn_opt_v1

    targets = np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones((3, 4, 2, 2), np.float32)
    masks = np.ones((3, 2, 2), bool)
    masks[1, 0] = False
    asked = []

    def redraw(target, tile_id, mask, draw):
        asked.append((tile_id, None if mask is None else mask.copy(), draw))
        return target + 10 * draw + 100 * int(tile_id[1:])

    drawn = redrawn_opt_v1(redraw, targets, ["t0", "t1", "t2"], masks, draw=4)
    assert drawn.shape == (3, 4, 2, 2)
    np.testing.assert_array_equal(drawn[:, 0, 0, 0], [40, 141, 242])
    assert [(tile_id, draw) for tile_id, _, draw in asked] == [("t0", 4), ("t1", 4), ("t2", 4)]
    for (_, mask, _), expected in zip(asked, masks):
        np.testing.assert_array_equal(mask, expected)
    asked.clear()
    redrawn_opt_v1(redraw, targets, ["t0", "t1", "t2"], None, draw=1)
    assert [mask for _, mask, _ in asked] == [None, None, None]


def test_epoch_0_reads_the_datasets_own_opt_v1_without_drawing():
    """Only epochs 1, 2, ... ask the degradation for a draw: epoch 0 reads the stored opt_v1 (the dataset's own draw)
    and spends no time redrawing it."""
    from data_builders import make_eval_transform

    from training.data import TileDataset

    table = _table(2, tile_id=["a", "b"])
    asked = []

    def redraw(target, tile_id, mask, draw):
        asked.append((tile_id, draw))
        return np.zeros_like(target)

    dataset = TileDataset(table, make_eval_transform(), redraw=redraw)
    rows = dataset.__getitems__([0, 1])
    assert asked == []
    stored = table.with_format("numpy")["opt_v1"]
    assert all(np.array_equal(row["opt_v1"].numpy(), stored[index]) for index, row in enumerate(rows))
    dataset.set_epoch(2)
    assert float(dataset[1]["opt_v1"].abs().max()) == 0.0 and asked == [("b", 2)]


def test_redrawing_needs_the_target_and_opt_v1_columns_too():
    """A split without `opt_v1` (or `target`) is refused when the dataset is built, not read with a draw missing."""
    from data_builders import make_eval_transform

    from training.data import TileDataset

    table = _table(2, tile_id=["a", "b"])
    for column in ("opt_v1", "target"):
        with pytest.raises(ValueError, match=rf"redrawing opt_v1 needs the columns \['{column}'\]"):
            TileDataset(table.remove_columns(column), make_eval_transform(), redraw=lambda *args: args[0])


# ----------------------------------------------------------------------------------- training/bootstrap.py
def test_a_confidence_of_zero_is_refused():
    """A 0 % interval (low == high, a single quantile) is no interval: confidence must lie strictly in (0, 1)."""
    from test_bootstrap import statistics

    from training.bootstrap import bootstrap_ratios

    stats = statistics([0.1, 0.2], [0.1, 0.2], [0.1, 0.2])
    for confidence in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=rf"confidence must be between 0 and 1, got {confidence}"):
            bootstrap_ratios(stats, {"opt_v1": stats}, resamples=10, confidence=confidence)


def test_statistics_that_lack_a_column_name_the_role_and_the_column():
    from test_bootstrap import statistics

    from training.bootstrap import bootstrap_ratios

    stats = statistics([0.1, 0.2], [0.1, 0.2], [0.1, 0.2])
    partial = {name: value for name, value in stats.items() if name != "sam_sum"}
    with pytest.raises(KeyError, match=r"linear_fit statistics lack \['sam_sum'\]"):
        bootstrap_ratios(stats, {"opt_v1": stats, "linear_fit": partial}, resamples=10)
    with pytest.raises(KeyError, match=r"refined statistics lack \['sam_sum'\]"):
        bootstrap_ratios(partial, {"opt_v1": stats}, resamples=10)


# ----------------------------------------------------------------------------------- training/linear_fit.py
def test_the_fits_record_gives_its_numbers_pixels_and_tiles():
    """`to_dict` (JSON): the matrix, the bias, the valid pixels and the tiles fitted on, each under its own name."""
    from training.linear_fit import LinearColorFit

    valid = np.ones((3, 4, 4), bool)
    valid[1, :3] = False
    result = LinearColorFit.from_dataset(_table(3, valid=valid))
    record = json.loads(json.dumps(result.to_dict()))
    assert record == {"matrix": result.matrix.tolist(), "bias": result.bias.tolist(), "pixels": 36, "tiles": 3}


def test_the_fit_refuses_a_split_without_its_columns_and_tiles_of_two_shapes():
    from training.linear_fit import LinearColorFit

    for column in ("opt_v1", "target"):
        with pytest.raises(ValueError, match=rf"The dataset lacks the columns \['{column}'\] needed for a colour fit"):
            LinearColorFit.from_dataset(_table(2).remove_columns(column))
    with pytest.raises(ValueError, match=r"got \(1, 4, 4, 4\) and \(1, 4, 4, 5\)"):
        LinearColorFit().update(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 5))


def _spectral_fit(table, **kwargs):
    from training.linear_fit import fit_spectral_correction

    return fit_spectral_correction(table, **{"steps": 3, "batch_tiles": 2, "learning_rate": 1e-2, **kwargs})


def test_the_spectral_fits_default_seed_is_0():
    """The studies that fit without a seed (bench/study_quality.py) record the fit of seed 0."""
    table = _table(8)
    assert torch.equal(_spectral_fit(table).matrix, _spectral_fit(table, seed=0).matrix)
    assert not torch.equal(_spectral_fit(table).matrix, _spectral_fit(table, seed=1).matrix)


def test_the_spectral_fit_starts_at_least_squares_and_steps_at_its_learning_rate():
    """A rate of 0 leaves the least-squares fit (float32 rounded); Adam's steps move each number by about the rate
    each: at 1e-2 the 3 steps move the largest by more than 5e-3 and by at most 3e-2."""
    from training.linear_fit import LinearColorFit

    table = _table(8)
    start = LinearColorFit.from_dataset(table)
    still = _spectral_fit(table, learning_rate=0.0)
    assert torch.equal(still.matrix, start.matrix.float().double())
    assert torch.equal(still.bias, start.bias.float().double())
    moved = _spectral_fit(table, learning_rate=1e-2)
    step = float(torch.cat([(moved.matrix - start.matrix).flatten(), moved.bias - start.bias]).abs().max())
    assert 5e-3 < step <= 3e-2 + 1e-6


def test_the_spectral_fit_runs_on_one_thread():
    """Every step runs on one CPU thread (the same bits in every process and on every machine)."""
    threads = []

    def loss(output, target, valid):
        threads.append(torch.get_num_threads())
        return ((output - target) ** 2).mean(),

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _spectral_fit(_table(4), loss=loss)
    finally:
        torch.set_num_threads(previous)
    assert threads == [1, 1, 1]


def test_the_spectral_fit_clamps_the_corrected_image_at_zero_when_nonnegative():
    """Dark tiles: the least-squares fit gives some pixels below 0, which the loss sees only without `nonnegative`."""
    rng = np.random.default_rng(0)
    target = rng.uniform(0.0, 0.03, (4, 4, 8, 8)).astype(np.float32)
    opt_v1 = (1.5 * target + rng.normal(0, 0.01, target.shape)).astype(np.float32)
    table = _table(4, size=8, target=target, opt_v1=opt_v1)
    lowest = []

    def loss(output, target, valid):
        lowest.append(float(output.detach().min()))
        return ((output - target) ** 2).mean(),

    _spectral_fit(table, loss=loss, nonnegative=False)
    assert min(lowest) < -1e-3
    lowest.clear()
    _spectral_fit(table, loss=loss, nonnegative=True)
    assert len(lowest) == 3 and min(lowest) >= 0.0


def test_the_spectral_fits_steps_leave_out_invalid_pixels_and_count_the_valid_ones():
    """Garbage under invalid pixels moves neither the least-squares start nor the Adam steps (the loss is given each
    step's valid_mask); the result counts the split's tiles and valid pixels."""
    valid = np.ones((6, 4, 4), bool)
    valid[:, :, :2] = False
    clean = _table(6, valid=valid)
    garbage = np.array(clean["opt_v1"], np.float32)
    garbage[:, :, :, :2] = 5.0
    first, second = _spectral_fit(clean), _spectral_fit(_table(6, valid=valid, opt_v1=garbage))
    torch.testing.assert_close(first.matrix, second.matrix, rtol=0, atol=1e-6)
    torch.testing.assert_close(first.bias, second.bias, rtol=0, atol=1e-6)
    assert (second.pixels, second.tiles) == (48, 6)


def test_the_spectral_fit_redraws_each_tile_with_its_own_mask():
    """With `redraw`, each step's draw of a tile is asked with that tile's valid_mask, as training's rows are."""
    valid = np.ones((4, 4, 4), bool)
    valid[2, 0] = False
    table = _table(4, valid=valid, tile_id=["t0", "t1", "t2", "t3"])
    asked = []

    def redraw(target, tile_id, mask, draw):
        asked.append((int(tile_id[1:]), mask))
        return (1.5 * target + 0.02).astype(np.float32)

    _spectral_fit(table, redraw=redraw)
    assert len(asked) == 6  # 3 steps of 2 tiles
    for index, mask in asked:
        np.testing.assert_array_equal(mask, valid[index])


# ----------------------------------------------------------------------------------- training/warm_start.py
def _model(**overrides):
    from _refiner_helpers import tiny_refiner_config

    from modeling_stage2 import Stage2RefinerModel

    torch.manual_seed(0)
    return Stage2RefinerModel(tiny_refiner_config(**overrides))


def _args(tmp_path, **overrides):
    from training.args import Stage2TrainingArguments

    return Stage2TrainingArguments(output_dir=str(tmp_path), quantization="none", report_to="none", **overrides)


def test_the_range_of_the_training_spectra_is_fitted_at_the_runs_quantile(tmp_path):
    from training.spectral_range import fit_spectral_range_of_dataset, spectral_ranges
    from training.warm_start import start_spectral_range

    model, table = _model(out_of_range_fallback=True), _table(3)
    started = start_spectral_range(model, table, _args(tmp_path, out_of_range_quantile=0.9), resuming=False)
    assert started == "90th percentile of 3 training tiles"
    module, = spectral_ranges(model)
    expected = fit_spectral_range_of_dataset(table, module.log_offset, quantile=0.9)
    assert float(module.threshold) == pytest.approx(expected.threshold, rel=1e-6)
    assert expected.threshold < fit_spectral_range_of_dataset(table, module.log_offset, quantile=0.99).threshold


def test_a_resumed_start_fits_nothing_and_reads_no_split(tmp_path):
    """Resuming, the checkpoint holds the correction and the range: neither is fitted again (over what training
    reached), and the training split is not read, so any dataset will do."""
    from training.linear_fit import spectral_corrections
    from training.spectral_range import spectral_ranges
    from training.warm_start import start_fitted_modules

    model = _model(spectral_correction="shared", out_of_range_fallback=True)
    args = _args(tmp_path, spectral_correction_init="linear_fit")
    assert start_fitted_modules(model, _table(3), args, resuming=True) == {
        "spectral_correction_init": None, "out_of_range_fallback": None}
    assert not spectral_ranges(model)[0].is_fitted
    assert torch.equal(spectral_corrections(model)[0].matrix.detach(), torch.eye(4))
    subset = torch.utils.data.Subset(_table(3).with_format("torch"), [0, 1])
    assert start_fitted_modules(model, subset, args, resuming=True) == {
        "spectral_correction_init": None, "out_of_range_fallback": None}


def test_a_range_alone_needs_the_training_split(tmp_path):
    """A refiner with `out_of_range_fallback` and its correction at the identity (or none) still fits the range on
    the split: a dataset without columns is refused with the way out, before any row is read."""
    from training.warm_start import needs_training_split, start_fitted_modules

    args = _args(tmp_path, spectral_correction_init="identity")
    for model in (_model(out_of_range_fallback=True), _model(spectral_correction="shared", out_of_range_fallback=True)):
        assert needs_training_split(model, args)
        subset = torch.utils.data.Subset(_table(3).with_format("torch"), [0, 1])
        with pytest.raises(ValueError, match=r"out_of_range_fallback\), which needs the split's columns; got a Subset"):
            start_fitted_modules(model, subset, args, resuming=False)


def test_the_spectral_fit_reads_the_training_datasets_redraw(tmp_path, monkeypatch):
    """`start_fitted_modules` passes a TileDataset's `redraw` (`--redraw_degradation`) on to the spectral fit."""
    import training.warm_start as warm_start
    from data_builders import make_eval_transform
    from training.data import TileDataset
    from training.linear_fit import LinearColorFit

    seen = {}

    def fake_fit(split, loss, **kwargs):
        seen.update(kwargs, split=split)
        return LinearColorFit.from_dataset(split)

    monkeypatch.setattr(warm_start, "fit_spectral_correction", fake_fit)
    redraw = lambda target, tile_id, mask, draw: target  # noqa: E731
    rows = TileDataset(_table(2, tile_id=["a", "b"]), make_eval_transform(), redraw=redraw)
    started = warm_start.start_fitted_modules(_model(spectral_correction="shared"), rows, _args(tmp_path),
                                              resuming=False)
    assert started["spectral_correction_init"] == "spectral_fit of 2 training tiles"
    assert seen["redraw"] is redraw and seen["split"] is rows.dataset


# ----------------------------------------------------------------------------------- modeling_stage2/pt2_archive.py
class _WithConstants(torch.nn.Module):
    """A graph with lifted tensor constants (`data/constants/tensor_N`) beside its weights."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.register_buffer("offset", torch.ones(2), persistent=False)

    def forward(self, x):
        return self.linear(x) + self.offset + torch.tensor([1.0, 2.0])


@pytest.fixture
def graph(tmp_path):
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(_WithConstants(), (torch.randn(1, 3),)), str(path))
    return path


def test_a_graph_with_tensor_constants_is_accepted(graph):
    from modeling_stage2.pt2_archive import check_pt2_archive

    with zipfile.ZipFile(graph) as archive:
        assert any(name.endswith("data/constants/tensor_0") for name in archive.namelist())
    check_pt2_archive(graph)


def test_empty_sample_inputs_are_accepted(graph):
    """torch writes no bytes for the sample inputs of a program exported without them: nothing to unpickle."""
    from test_pt2_archive import _rewrite

    from modeling_stage2.pt2_archive import check_pt2_archive

    check_pt2_archive(_rewrite(graph, lambda name, data: (name, b"" if "data/sample_inputs/" in name else data)))


def test_an_archive_format_other_than_pt2_is_refused(graph):
    from test_pt2_archive import _rewrite

    from modeling_stage2.pt2_archive import check_pt2_archive

    crafted = _rewrite(graph, lambda name, data: (name, b"pt3" if name.endswith("/archive_format") else data))
    with pytest.raises(ValueError, match=r"crafted.pt2: not a torch.export archive of the current layout"):
        check_pt2_archive(crafted)


@pytest.mark.parametrize("config, problem", [
    ("[]", "is not a JSON payload config"),
    ('{"config": ["weight_0"]}', "is not a JSON payload config"),
    ("{", "is not a JSON payload config"),
    ('{"config": {"linear.weight": {"use_pickle": false, "path_name": "weight_0.pt"}}}',
     r"stores 'linear.weight' as an object to unpickle \('weight_0.pt'\)"),
    ('{"config": {"linear.weight": {"use_pickle": false, "path_name": "weight_"}}}',
     r"stores 'linear.weight' as an object to unpickle \('weight_'\)"),
])
def test_a_payload_config_that_is_not_a_plain_tensor_list_is_refused(graph, config, problem):
    from test_pt2_archive import _rewrite

    from modeling_stage2.pt2_archive import check_pt2_archive

    crafted = _rewrite(graph, lambda name, data: (name, config if name.endswith("_weights_config.json") else data))
    with pytest.raises(ValueError, match=rf"_weights_config.json' {problem}; refusing to load it"):
        check_pt2_archive(crafted)


def test_a_stray_entry_is_refused_wherever_it_lies_in_the_zip(graph):
    """Every entry is checked, the first one too, and a tensor file name needs its number."""
    from test_pt2_archive import _rewrite

    from modeling_stage2.pt2_archive import check_pt2_archive

    with zipfile.ZipFile(graph) as archive:
        first, root = archive.namelist()[0], archive.namelist()[0].split("/")[0]
    stray = f"{root}/data/weights/weight_"
    crafted = _rewrite(graph, lambda name, data: [(stray, b"x"), (name, data)] if name == first else (name, data))
    with zipfile.ZipFile(crafted) as archive:
        assert archive.namelist()[0] == stray
    with pytest.raises(ValueError, match=rf"entry '{stray}' is neither raw tensor data nor a JSON config"):
        check_pt2_archive(crafted)


def test_a_missing_file_is_a_one_line_error_naming_it(tmp_path):
    from modeling_stage2.pt2_archive import check_pt2_archive

    with pytest.raises(ValueError, match=r"absent.pt2: not a torch.export archive \(\[Errno 2\]"):
        check_pt2_archive(tmp_path / "absent.pt2")
