"""Gaps found by mutating this session's changes (a review of session 48): each test fails on one mutation that the
suite let pass."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_builders.cache import saved_dataset_problem
from data_builders.tiles import fill_invalid_pixels
from training.data import model_input_opt_v1


def test_splits_that_are_not_names_are_named_not_a_type_error(tmp_path):
    """`{"splits": [1]}`: datasets fails on it (posixpath.join of an int); the record is named in one line."""
    import datasets

    path = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1, 2]})}).save_to_disk(str(path))
    (path / "dataset_dict.json").write_text(json.dumps({"splits": [1]}))
    with pytest.raises(Exception):
        datasets.load_from_disk(str(path))
    assert saved_dataset_problem(path) == (f"{path / 'dataset_dict.json'}: 'splits' is not a list of split names; "
                                           "build or copy the dataset again")


def test_an_all_valid_batch_is_given_back_itself():
    """The fill's promise: no copy (no second batch in memory) where there is nothing to fill."""
    images = np.random.default_rng(0).random((2, 4, 8, 8), dtype=np.float32)
    valid = np.ones((2, 8, 8), bool)
    assert fill_invalid_pixels(images, valid) is images
    assert model_input_opt_v1(images, valid) is images
    tensor = torch.from_numpy(images)
    assert model_input_opt_v1(tensor, torch.from_numpy(valid)) is tensor


def test_a_filled_tensor_keeps_its_dtype():
    """`model_input_opt_v1` on a bf16 batch (a model run in bf16) returns bf16, the valid pixels unchanged."""
    opt_v1 = torch.rand(2, 4, 8, 8).to(torch.bfloat16)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[1, 0] = False
    given = model_input_opt_v1(opt_v1, valid)
    assert given.dtype == torch.bfloat16
    assert torch.equal(given[0], opt_v1[0]) and torch.equal(given[1][:, valid[1]], opt_v1[1][:, valid[1]])
    expected = opt_v1[1].float()[:, valid[1]].mean(dim=1).to(torch.bfloat16)
    torch.testing.assert_close(given[1][:, 0, 0], expected, rtol=1e-2, atol=0)


def test_the_demo_names_the_spelling_typed_last(tmp_path, capsys):
    """argparse keeps the last of two spellings of one flag; the message names that one."""
    from training.demo import main as demo_main

    assert demo_main(["--data_dir", str(tmp_path / "a"), "--data-dir", str(tmp_path / "b"),
                      "--output_dir", str(tmp_path / "out")]) == 2
    line = [line for line in capsys.readouterr().err.splitlines() if line.strip()][-1]
    assert line.startswith(f"python -m training.demo: error: --data-dir {tmp_path / 'b'} not found"), line


def test_an_unknown_band_override_gets_the_unknown_band_message(tmp_path):
    """`_band_names`: an unknown name is left to `__init__`, which names it and how to fix it."""
    from modeling_stage2 import PrithviConfig

    PrithviConfig.from_preset("prithvi_eo_v2_tiny", bands=("B02", "B03", "B04", "B08")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^Unknown band name 'FOO'"):
        PrithviConfig.from_pretrained(tmp_path, bands=["FOO", "B03", "B04", "B08"])
    with pytest.raises(ValueError, match=r"^bands must be a sequence of band names, got the string 'B02'"):
        PrithviConfig.from_pretrained(tmp_path, bands="B02")  # not read as ('B', '0', '2')


def test_the_demo_main_stops_on_sigterm_with_its_cleanups():
    """`@exit_on_termination` decorates `main` (a helper put between them took it: SIGTERM killed the demo)."""
    from training import demo

    assert getattr(demo.main, "__wrapped__", None) is not None
    assert getattr(demo._spelling, "__wrapped__", None) is None
