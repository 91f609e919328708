"""`--redraw_degradation`: the training tiles' synthetic opt_v1 drawn anew each epoch and at each warm-start step."""
import re
import subprocess

import datasets
import numpy as np
import pytest
import torch
import yaml
from _training_helpers import stage2_train_command, train_run, write_config
from datasets import load_from_disk

from data_builders.build import read_build_info
from data_builders.degrade import (
    DEGRADATION_PRESETS,
    DEGRADATION_VERSION,
    DegradationRedraw,
    draw_seed,
    mixture_choice,
    synthesize_opt_v1,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sample_split(sample_dataset_dir):
    return load_from_disk(str(sample_dataset_dir))["train"]


@pytest.fixture(scope="module")
def redraw(sample_dataset_dir):
    return DegradationRedraw.from_record(read_build_info(load_from_disk(str(sample_dataset_dir)))["opt_v1"])


def _row(split, index: int) -> dict:
    return split.with_format("numpy")[index]


# ------------------------------------------------------------------------------------------------ draws
def test_draw_seeds_start_at_the_dataset_seed_and_never_repeat():
    assert draw_seed(0, 0) == 0 and draw_seed(7, 0) == 7
    seeds = [draw_seed(seed, draw) for seed in range(4) for draw in range(1, 101)]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & set(range(4))
    assert draw_seed(3, 5) == draw_seed(3, 5)
    with pytest.raises(ValueError, match="draw must be >= 0"):
        draw_seed(0, -1)


def test_draw_zero_is_the_dataset_and_every_later_draw_a_new_one(sample_split, redraw):
    assert (redraw.preset, redraw.seed) == ("mild", 0)
    for index in range(len(sample_split)):
        row = _row(sample_split, index)
        drawn = redraw(row["target"], row["tile_id"], row["valid_mask"], 0)
        assert drawn.dtype == np.float32 and np.array_equal(drawn, row["opt_v1"])  # bit for bit
    row = _row(sample_split, 0)
    draws = [redraw(row["target"], row["tile_id"], row["valid_mask"], draw) for draw in range(4)]
    expected = synthesize_opt_v1(row["target"], row["tile_id"], draw_seed(0, 2), DEGRADATION_PRESETS["mild"],
                                 row["valid_mask"])
    assert np.array_equal(draws[2], expected)
    assert np.array_equal(redraw(row["target"], row["tile_id"], row["valid_mask"], 2), draws[2])  # reproducible
    for a in range(4):
        for b in range(a + 1, 4):  # mild's per-tile errors are several % of the value: draws differ by ~0.005
            assert float(np.abs(draws[a] - draws[b]).mean()) > 1e-3
    assert np.all(draws[3][:, ~row["valid_mask"]] == 0)


def test_a_mixture_draws_the_preset_of_each_tile_anew(sample_split):
    redraw = DegradationRedraw("mixture", None, 0)
    row = _row(sample_split, 0)
    presets = [mixture_choice(draw_seed(0, draw), row["tile_id"]) for draw in range(16)]
    assert set(presets) == {"mild", "strong"}
    for draw in (presets.index("mild"), presets.index("strong")):
        expected = synthesize_opt_v1(row["target"], row["tile_id"], draw_seed(0, draw),
                                     DEGRADATION_PRESETS[presets[draw]], row["valid_mask"])
        assert np.array_equal(redraw(row["target"], row["tile_id"], row["valid_mask"], draw), expected)


@pytest.mark.parametrize("record, message", [
    ({"mode": "stage1", "stage1_dir": "/s1"}, "its opt_v1 is not synthetic (mode 'stage1')"),
    ({"mode": "identity"}, "its opt_v1 is not synthetic (mode 'identity')"),
    ({"mode": "synthetic", "preset": "mild", "seed": 0, "degradation": {}, "degradation_version": 0},
     f"its opt_v1 was synthesised by degradation version 0, this is version {DEGRADATION_VERSION}; rebuild the "
     "dataset"),
])
def test_only_a_synthetic_opt_v1_of_this_version_can_be_drawn_again(record, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        DegradationRedraw.from_record(record)


# ------------------------------------------------------------------------------------------------ training data
def _dihedral(image: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / 90-degree rotations of a (C, H, W) image."""
    turns = [np.rot90(image, k, axes=(1, 2)) for k in range(4)]
    return turns + [np.flip(turn, axis=2) for turn in turns]


def test_training_rows_read_the_epoch_s_draw_before_the_flips(sample_split, redraw):
    from data_builders import make_eval_transform, make_train_transform
    from training.data import TileDataset

    plain = TileDataset(sample_split, make_eval_transform(), redraw=redraw)
    row = _row(sample_split, 1)
    assert np.array_equal(plain[1]["opt_v1"].numpy(), row["opt_v1"])  # epoch 0: the dataset's own draw
    assert "tile_id" not in plain[1]
    for epoch in (1, 2):
        plain.set_epoch(epoch)
        expected = redraw(row["target"], row["tile_id"], row["valid_mask"], epoch)
        assert np.array_equal(plain[1]["opt_v1"].numpy(), expected)
        assert np.array_equal(plain[1]["target"].numpy(), row["target"])
    flipped = [TileDataset(sample_split, make_train_transform(), seed=3, redraw=redraw) for _ in range(2)]
    for dataset in flipped:
        dataset.set_epoch(5)
    first, second = flipped[0].__getitems__([0, 1, 2]), flipped[1].__getitems__([2, 0, 1])
    for got, again in zip(first, [second[1], second[2], second[0]]):  # any order, any instance: the same rows
        assert all(torch.equal(got[name], again[name]) for name in got)
    out = first[1]
    targets = _dihedral(row["target"])
    turn = next(k for k, image in enumerate(targets) if np.array_equal(image, out["target"].numpy()))
    drawn = redraw(row["target"], row["tile_id"], row["valid_mask"], 5)
    assert np.array_equal(out["opt_v1"].numpy(), _dihedral(drawn)[turn])  # flipped with its target
    assert not np.array_equal(out["opt_v1"].numpy(), _dihedral(row["opt_v1"])[turn])


def test_training_rows_are_redrawn_with_their_own_valid_mask():
    """The degradation zeroes a tile's invalid pixels: each row's draw is asked with that row's valid_mask."""
    from data_builders import make_eval_transform
    from training.data import TileDataset

    target = np.random.default_rng(0).uniform(0.02, 0.4, (2, 4, 8, 8)).astype(np.float32)
    masks = np.ones((2, 8, 8), bool)
    masks[1, :3] = False
    table = datasets.Dataset.from_dict({"target": target, "opt_v1": 2 * target, "tile_id": ["a", "b"],
                                        "valid_mask": masks})
    asked = {}

    def masked(target, tile_id, valid_mask, draw):
        asked[tile_id] = None if valid_mask is None else np.array(valid_mask)
        return np.where(valid_mask, target, 0).astype(np.float32) if valid_mask is not None else target

    dataset = TileDataset(table, make_eval_transform(), redraw=masked)
    dataset.set_epoch(1)
    rows = dataset.__getitems__([0, 1])
    assert asked["a"] is not None and asked["a"].all() and np.array_equal(asked["b"], masks[1])
    means = np.array([band[masks[1]].mean() for band in target[1]])  # the model is given band means there, not 0
    np.testing.assert_array_equal(rows[1]["opt_v1"].numpy(), np.where(masks[1], target[1], means[:, None, None]))
    np.testing.assert_array_equal(rows[0]["opt_v1"].numpy(), target[0])


def test_redrawing_needs_the_tile_ids(sample_split, redraw):
    from data_builders import make_eval_transform
    from training.data import TileDataset

    with pytest.raises(ValueError, match=r"redrawing opt_v1 needs the columns \['tile_id'\]"):
        TileDataset(sample_split.remove_columns("tile_id"), make_eval_transform(), redraw=redraw)


# ------------------------------------------------------------------------------------------------ warm start
def _doubled_tiles(count: int = 4):
    """Tiles whose stored opt_v1 is twice the target, and a redraw that draws the target itself (a perfect
    opt_v1) and records every (tile, draw) it was asked for."""
    rng = np.random.default_rng(0)
    target = rng.uniform(0.02, 0.4, (count, 4, 16, 16)).astype(np.float32)
    table = datasets.Dataset.from_dict({"target": target, "opt_v1": 2 * target, "tile_id": [f"t{i}" for i in
                                                                                           range(count)],
                                        "valid_mask": np.ones((count, 16, 16), bool)})
    calls = []

    def perfect(target, tile_id, valid_mask, draw):
        calls.append((tile_id, draw))
        return np.array(target, dtype=np.float32)

    return table, perfect, calls


def test_the_warm_start_reads_a_new_draw_at_every_step():
    from training.linear_fit import LinearColorFit, fit_spectral_correction

    table, perfect, calls = _doubled_tiles()
    steps = 300
    start = LinearColorFit.from_dataset(table)
    assert torch.allclose(start.matrix.diagonal(), torch.full((4,), 0.5, dtype=torch.float64), atol=1e-6)
    def l1(output, target, valid):  # a loss whose optimum is the exact map, unlike the scale-free indices
        return ((output - target).abs().mean(),)

    stored = fit_spectral_correction(table, loss=l1, steps=steps, batch_tiles=2, seed=0)
    redrawn = fit_spectral_correction(table, loss=l1, steps=steps, batch_tiles=2, seed=0, redraw=perfect)
    # The stored pairs are fitted exactly by the start: Adam leaves it near 0.5. Drawn as the target itself,
    # opt_v1 needs the identity: each of 300 steps of 1e-3 moves the diagonal towards 1.
    assert float((stored.matrix.diagonal() - 0.5).abs().max()) < 0.02
    assert float(redrawn.matrix.diagonal().min()) > 0.5 + 0.5 * steps * 1e-3
    assert [draw for _, draw in calls] == [draw for draw in range(1, steps + 1) for _ in range(2)]
    assert {tile for tile, _ in calls} == {f"t{i}" for i in range(4)}


def test_the_spectral_mlp_fit_continues_the_draws():
    from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel
    from training.linear_fit import fit_spectral_correction

    table, perfect, calls = _doubled_tiles()
    mlp = Stage2RefinerModel(Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", spectral_mlp_hidden_size=8,
                                                 spectral_correction="shared")).spectral_mlp
    fit_spectral_correction(table, steps=3, batch_tiles=2, mlp_batch_tiles=1, seed=0, spectral_mlp=mlp,
                            redraw=perfect)
    assert [draw for _, draw in calls] == [1, 1, 2, 2, 3, 3, 4, 5, 6]


def test_the_warm_start_needs_the_tile_ids():
    from training.linear_fit import fit_spectral_correction

    table, perfect, _ = _doubled_tiles()
    with pytest.raises(ValueError, match="needs the dataset's tile_id column"):
        fit_spectral_correction(table.remove_columns("tile_id"), steps=1, redraw=perfect)


# ------------------------------------------------------------------------------------------------ stage2-train
def test_training_redraws_the_training_split_only(tmp_path, sample_dataset_dir):
    from training.args import Stage2DataArguments
    from training.train import prepare_splits

    dataset_dict = load_from_disk(str(sample_dataset_dir))
    train, evaluation = prepare_splits(dataset_dict, Stage2DataArguments(data_dir=str(sample_dataset_dir),
                                                                         redraw_degradation=True))
    assert train.redraw == DegradationRedraw("mild", DEGRADATION_PRESETS["mild"], 0) and evaluation.redraw is None
    plain, _ = prepare_splits(dataset_dict, Stage2DataArguments(data_dir=str(sample_dataset_dir)))
    assert plain.redraw is None


def test_a_run_records_it_and_its_warm_start_uses_it(tmp_path, sample_dataset_dir):
    from training.linear_fit import spectral_corrections

    runs = {}
    for name, extra in (("plain", ()), ("redrawn", ("--redraw_degradation", "true"))):
        trainer = train_run(tmp_path, sample_dataset_dir, name, extra_argv=extra, max_steps=1, eval_on_start=False,
                            eval_every_epochs=None, save_every_epochs=None, eval_strategy="no", save_strategy="no")
        runs[name] = trainer

    assert yaml.safe_load((tmp_path / "redrawn" / "config.yaml").read_text())["redraw_degradation"] is True
    assert "redraw_degradation" not in yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())
    described = "degradation 'mild' of dataset seed 0, a draw per epoch"
    assert runs["redrawn"].training_config["redraw_degradation"] == described
    assert runs["plain"].training_config["redraw_degradation"] is None

    matrices = {name: spectral_corrections(trainer.model)[0].matrix.detach() for name, trainer in runs.items()}
    assert float((matrices["plain"] - matrices["redrawn"]).abs().max()) > 1e-3


def test_a_dataset_without_synthetic_opt_v1_is_a_one_line_error_before_any_work(tmp_path, sample_tiles_dir,
                                                                                   repo_root):
    """`stage2-train --redraw_degradation true` as the user starts it: exit 2 and one line, before any work."""
    from data_builders import build_dataset

    identity = tmp_path / "identity"
    build_dataset(sample_tiles_dir, identity, input_mode="identity", max_samples=2)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml")
    for data in (["--data_dir", str(identity)], ["--data_dir", str(sample_tiles_dir), "--input_mode", "identity"]):
        result = subprocess.run([*stage2_train_command(), "--config", str(config), *data, "--output_dir", str(out),
                                 "--redraw_degradation", "true"], cwd=repo_root, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("stage2-train: error: --data_dir "), lines
        assert "--redraw_degradation" in lines[0] and "not synthetic (mode 'identity')" in lines[0], lines
        assert not out.exists()
