"""Training-time augmentation: one random flip/rotation shared by every image column."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _data_helpers import folder_digest, tile_arrays, write_tile
from torch.utils.data import DataLoader

import datasets
from data_builders import build_dataset, make_eval_transform, make_train_transform
from data_builders.augment import NUM_DIHEDRAL_OPS, apply_dihedral, dihedral
from data_builders.tiles import BAND_KEYS

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def holes_dataset(tmp_path_factory):
    """Six float tiles with an off-centre NaN hole each, so every symmetry changes the mask."""
    root = tmp_path_factory.mktemp("holes")
    for i in range(6):
        arrays = tile_arrays(seed=i)
        for key in BAND_KEYS:
            arrays[key] = arrays[key].astype(np.float32) * np.float32(1e-4)
        arrays["s2_b3"][5 + i : 20 + i, 70:75] = np.nan
        write_tile(root / "tiles" / "train", f"tile_{i}", arrays)
    build_dataset(root / "tiles", root / "ds")
    return root / "ds"


def _which_op(original: torch.Tensor, transformed: torch.Tensor) -> int:
    matches = [op for op in range(NUM_DIHEDRAL_OPS) if torch.equal(dihedral(original, op), transformed)]
    assert len(matches) == 1, matches
    return matches[0]


def test_the_eight_ops_are_the_square_symmetries():
    x = torch.arange(9).reshape(3, 3)
    images = {tuple(dihedral(x, op).flatten().tolist()) for op in range(NUM_DIHEDRAL_OPS)}
    assert len(images) == 8
    assert torch.equal(dihedral(x, 1), torch.rot90(x, 1, (0, 1)))
    assert torch.equal(dihedral(x, 4), x.flip(-1))


# Op k of a 3 x 3 image 0..8: rot90 by k % 4 (counter-clockwise, as torch.rot90 / np.rot90 turn), then a left-right
# flip when k >= 4. The recorded quality studies depend on which symmetry an op is, bit for bit.
EXPECTED_OPS = [
    [[0, 1, 2], [3, 4, 5], [6, 7, 8]], [[2, 5, 8], [1, 4, 7], [0, 3, 6]],
    [[8, 7, 6], [5, 4, 3], [2, 1, 0]], [[6, 3, 0], [7, 4, 1], [8, 5, 2]],
    [[2, 1, 0], [5, 4, 3], [8, 7, 6]], [[8, 5, 2], [7, 4, 1], [6, 3, 0]],
    [[6, 7, 8], [3, 4, 5], [0, 1, 2]], [[0, 3, 6], [1, 4, 7], [2, 5, 8]],
]


def test_each_op_is_the_same_documented_symmetry_in_the_torch_and_numpy_paths():
    x = torch.arange(9).reshape(3, 3)
    assert [dihedral(x, op).tolist() for op in range(NUM_DIHEDRAL_OPS)] == EXPECTED_OPS
    batch = x.expand(NUM_DIHEDRAL_OPS, 2, 3, 3)
    for samples in (batch, batch.numpy(), list(batch.numpy())):  # what the transform hands apply_dihedral
        out = apply_dihedral(samples, torch.arange(NUM_DIHEDRAL_OPS))
        assert [sample[1].tolist() for sample in out] == EXPECTED_OPS
    # one torch.randint(0, 8, (batch,)) per batch from torch's global RNG: the ops of seed 0, pinned
    torch.manual_seed(0)
    out = make_train_transform()({"target": x.float().expand(12, 1, 3, 3), "valid_mask": (x > 3).expand(12, 3, 3)})
    ops = [EXPECTED_OPS.index(sample[0].long().tolist()) for sample in out["target"]]
    assert ops == [4, 7, 5, 0, 3, 3, 3, 7, 1, 3, 5, 2]
    assert [mask.tolist() for mask in out["valid_mask"]] == [(dihedral(x, op) > 3).tolist() for op in ops]


def test_train_transform_moves_every_column_together(holes_dataset):
    stored = datasets.load_from_disk(str(holes_dataset))["train"]
    before = folder_digest(holes_dataset)
    plain = stored.with_format("torch")[:]
    augmented_ds = datasets.load_from_disk(str(holes_dataset))["train"]
    augmented_ds.set_transform(make_train_transform())
    torch.manual_seed(1)
    batch = augmented_ds[:]
    assert batch["target"].dtype == torch.float32 and batch["valid_mask"].dtype == torch.bool
    assert batch["month"].dtype == torch.long and batch["tile_id"] == plain["tile_id"]
    ops = []
    for i in range(len(stored)):
        op = _which_op(plain["target"][i], batch["target"][i])
        ops.append(op)
        for column in ("opt_v1", "valid_mask", "s1"):
            assert torch.equal(dihedral(plain[column][i], op), batch[column][i]), column
        assert _which_op(plain["valid_mask"][i], batch["valid_mask"][i]) == op  # the holes say the same
    assert len(set(ops)) > 1
    # the stored data never changes
    again = datasets.load_from_disk(str(holes_dataset))["train"].with_format("torch")[:]
    for column in ("target", "opt_v1", "valid_mask", "s1"):
        assert torch.equal(again[column], plain[column])
    assert folder_digest(holes_dataset) == before


def test_same_torch_seed_same_augmentation(holes_dataset):
    ds = datasets.load_from_disk(str(holes_dataset))["train"]
    ds.set_transform(make_train_transform())
    torch.manual_seed(7)
    first = ds[:]["target"]
    torch.manual_seed(7)
    second = ds[:]["target"]
    torch.manual_seed(8)
    third = ds[:]["target"]
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_single_rows_are_augmented_too(holes_dataset):
    ds = datasets.load_from_disk(str(holes_dataset))["train"]
    plain = ds.with_format("torch")[2]
    ds.set_transform(make_train_transform())
    torch.manual_seed(0)
    row = ds[2]
    assert row["target"].shape == (4, 120, 120)
    op = _which_op(plain["target"], row["target"])
    assert torch.equal(dihedral(plain["opt_v1"], op), row["opt_v1"])


def test_eval_transform_only_converts(holes_dataset):
    ds = datasets.load_from_disk(str(holes_dataset))["train"]
    plain = ds.with_format("numpy")[:]
    ds.set_transform(make_eval_transform())
    batch = ds[:]
    for column in ("target", "opt_v1", "valid_mask", "s1"):
        assert isinstance(batch[column], torch.Tensor)
        np.testing.assert_array_equal(batch[column].numpy(), plain[column])


def test_collate_path_over_numpy_format(holes_dataset):
    ds = datasets.load_from_disk(str(holes_dataset))["train"]
    plain = ds.with_format("torch")[:]
    loader = DataLoader(ds.with_format("numpy"), batch_size=3, collate_fn=make_train_transform().collate)
    torch.manual_seed(3)
    batches = list(loader)
    assert [len(b["tile_id"]) for b in batches] == [3, 3]
    target = torch.cat([b["target"] for b in batches])
    mask = torch.cat([b["valid_mask"] for b in batches])
    for i in range(6):
        op = _which_op(plain["target"][i], target[i])
        assert torch.equal(dihedral(plain["valid_mask"][i], op), mask[i])


def test_all_ops_are_drawn_and_inputs_are_not_modified():
    torch.manual_seed(0)
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(400, 1, 1, 1)
    copy = x.clone()
    out = make_train_transform()({"target": x})["target"]
    assert torch.equal(x, copy)
    seen = {_which_op(x[0], out[i]) for i in range(len(out))}
    assert seen == set(range(NUM_DIHEDRAL_OPS))


def test_rotation_needs_square_tiles():
    with pytest.raises(ValueError, match="square tiles"):
        apply_dihedral(torch.zeros(2, 4, 8, 6), torch.tensor([1, 2]))
