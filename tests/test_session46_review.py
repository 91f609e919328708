"""Review of the changes e60af1a..4ded52b (session 46): what their own tests left open. A `datasets.Dataset` split
given to `Stage2Trainer` is read with the transforms `stage2-train` gives it (the training split augmented with the
run's seed, the evaluation sets, a dict of them too, not); a plain `BitsAndBytesConfig` quantizes the linears of every
backbone block, the tenth and later too; `--max_patches` stopping before a patch of an unknown split is no crash; a
folder named like a set-aside checkpoint but of none is left alone (an ignored SIGINT once `main` has returned:
`test_signals.py`)."""
from __future__ import annotations

import pytest
import torch
from _refiner_helpers import tiny_backbone_config, tiny_refiner_config
from _training_helpers import tile_rows, write_config
from test_ingest_left_items import _ingest, _split_patches
from test_quantized_lora import quantized_names
from test_trainer_checkpoints_mutation_gaps import _checkpoint

from data_builders.bigearthnet import ingest_bigearthnet
from training.trainer import REPLACED_CHECKPOINT_NAME, restore_replaced_checkpoints


# ----------------------------------------------------------------------------------- Stage2Trainer and datasets splits
def _with_ids(rows, prefix):
    """The string column of a built dataset, which the default collator cannot batch."""
    return rows.add_column("tile_id", [f"{prefix}_{i}" for i in range(len(rows))])


def _items(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def _same_items(dataset, expected) -> bool:
    return len(dataset) == len(expected) and all(
        item.keys() == other.keys() and all(torch.equal(item[k], other[k]) for k in item)
        for item, other in zip(_items(dataset), _items(expected)))


def test_datasets_splits_given_to_the_trainer_get_the_transforms_stage2_train_gives_them(tmp_path):
    """The training split: `make_train_transform()` with the run's seed (`args.seed`, not 0); each evaluation set,
    also of a dict of them (`eval_dataset={"val": ..., "test": ...}`): `make_eval_transform()`, never augmented."""
    from data_builders import make_eval_transform, make_train_transform
    from training.data import TileDataset
    from training.train import build_model, parse_args
    from training.trainer import Stage2Trainer

    config = write_config(tmp_path / "c.yaml", spectral_correction_init="identity", seed=7)
    args = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])[0]
    assert args.seed == 7
    train = _with_ids(tile_rows(4, 0), "train")
    evaluation = {"val": _with_ids(tile_rows(3, 1), "val"), "test": _with_ids(tile_rows(2, 2), "test")}
    trainer = Stage2Trainer(model=build_model(args, print_summary=False), args=args, train_dataset=train,
                            eval_dataset=evaluation)

    expected = TileDataset(train, make_train_transform(), seed=args.seed)
    assert _same_items(trainer.train_dataset, expected)
    # the checks can fail: another seed, or no augmentation, reads other items
    assert not _same_items(TileDataset(train, make_train_transform(), seed=0), expected)
    assert not _same_items(TileDataset(train, make_eval_transform()), expected)

    assert sorted(trainer.eval_dataset) == ["test", "val"]
    for name, split in evaluation.items():
        assert _same_items(trainer.eval_dataset[name], TileDataset(split, make_eval_transform())), name
    assert not _same_items(TileDataset(evaluation["val"], make_train_transform()),
                           TileDataset(evaluation["val"], make_eval_transform()))


# ----------------------------------------------------------------------------------- a plain BitsAndBytesConfig
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")
def test_a_plain_bits_and_bytes_config_quantizes_every_block_of_a_deep_backbone(tmp_path):
    """`FULL_PRECISION_MODULES` leaves out the linears of block 10 and later as much as those of blocks 0-9 (the
    600M backbone has 32 blocks; the tiny test configs 2): the same modules as `quantization_config_for`."""
    from transformers import BitsAndBytesConfig

    from modeling_stage2 import Stage2RefinerModel
    from modeling_stage2.adapters import quantization_config_for

    config = tiny_refiner_config(backbone_config=tiny_backbone_config(depth=11))
    torch.manual_seed(0)
    Stage2RefinerModel(config).save_pretrained(tmp_path / "base")
    expected = quantized_names(Stage2RefinerModel.from_pretrained(
        tmp_path / "base", quantization_config=quantization_config_for("8bit", config)))
    assert [name for name in expected if name.startswith("backbone.blocks.10.")]  # a two-digit block among them
    plain = Stage2RefinerModel.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(
        load_in_8bit=True))
    assert quantized_names(plain) == expected


# ----------------------------------------------------------------------------------- --max_patches
def test_max_patches_stopping_before_a_patch_of_an_unknown_split_warns_of_the_known_ones_only(tmp_path, capsys):
    """A patch of a split the ingest does not know (skipped with its reason when it is reached) among those
    `--max_patches` leaves out is no split left out, and no KeyError."""
    lmdb_dir, metadata = _split_patches(tmp_path, ["test", "holdout", "validation"])
    assert _ingest(lmdb_dir, metadata, tmp_path / "tiles", "--max_patches", 1) == 0
    assert "'val' tile" in capsys.readouterr().err
    summary = ingest_bigearthnet(lmdb_dir, metadata, tmp_path / "again", max_patches=1)
    assert summary["written"] == {"test": 1} and summary["splits_left_out"] == ["val"]


# ----------------------------------------------------------------------------------- set-aside checkpoints
def test_a_folder_named_like_a_set_aside_checkpoint_but_of_no_checkpoint_is_left_alone(tmp_path):
    """Only `_checkpoint-N.replaced` is a checkpoint set aside: another `_NAME.replaced` in the run folder (no marker
    in it) was deleted as a set-aside checkpoint whose deletion was cut short."""
    run = tmp_path / "run"
    checkpoint = _checkpoint(run, 1)
    own = run / REPLACED_CHECKPOINT_NAME.format("notes")
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    assert restore_replaced_checkpoints(run) == [] and restore_replaced_checkpoints(tmp_path / "no run yet") == []
    assert (own / "notes.txt").read_text() == "mine" and sorted(run.iterdir()) == sorted([own, checkpoint])
