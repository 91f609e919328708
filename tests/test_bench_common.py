"""`bench/_common.py`: the table cells, the tiles in the training range and the in-range EVI RMSE the quality studies
share, and how a study is recorded."""
from __future__ import annotations

import json
import sys

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def common(repo_root):
    sys.path.insert(0, str(repo_root))
    from bench import _common

    return _common


def test_a_cell_is_the_mean_and_range_over_seeds_or_a_dash_for_a_missing_run(common):
    assert common.mean_range_cell([0.1, 0.3, 0.2], 2) == "0.20 (0.10-0.30)"
    assert common.mean_range_cell([0.12345], 4) == "0.1235"
    assert common.mean_range_cell([0.1, None, 0.2], 2) == "-"


def test_in_range_tiles_are_those_no_brighter_than_the_brightest_training_tile(common):
    train = torch.stack([torch.full((4, 2, 2), 0.1), torch.full((4, 2, 2), 0.3)])
    test = torch.stack([torch.full((4, 2, 2), 0.2), torch.full((4, 2, 2), 0.3), torch.full((4, 2, 2), 0.31)])
    test[0, :, 0, 0] = 5.0  # an invalid pixel does not count
    valid = torch.ones(3, 2, 2, dtype=torch.bool)
    valid[0, 0, 0] = False
    in_range = common.in_range_tiles(test, valid, train, torch.ones(2, 2, 2, dtype=torch.bool))
    assert in_range.tolist() == [True, True, False]


def test_in_range_evi_rmse_is_the_metric_of_the_selected_tiles_only(common):
    from training.metrics import evaluate_pair

    torch.manual_seed(0)
    target = torch.rand(3, 4, 8, 8) * 0.3
    output = target.clone()
    output[2, 3] += 0.2  # only the last tile's NIR is wrong
    valid = torch.ones(3, 8, 8, dtype=torch.bool)
    in_range = torch.tensor([True, True, False])
    assert common.in_range_evi_rmse(output, target, target, valid, in_range) == 0.0
    everything = common.in_range_evi_rmse(output, target, target, valid, torch.ones(3, dtype=torch.bool))
    assert everything == pytest.approx(evaluate_pair(output, target, target, valid)["refined"]["evi_rmse"], rel=1e-12)
    assert everything > 0.05
    assert common.in_range_evi_rmse(output, target, target, valid, torch.zeros(3, dtype=torch.bool)) is None


def test_a_study_is_recorded_as_tables_and_json(common, tmp_path, capsys):
    common.record_study(tmp_path / "study.md", "# table\n", {"x": [1, 2]})
    assert (tmp_path / "study.md").read_text() == "# table\n"
    assert json.loads((tmp_path / "study.json").read_text()) == {"x": [1, 2]}
    assert "# table" in capsys.readouterr().out
