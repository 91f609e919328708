"""Three exit paths of the console scripts, tested in process by their own files, run here as installed (a
subprocess each, `test_console_scripts.run`): `stage2-evaluate` exits 1 for tiles of the evaluated split rejected by
the conversion (a partial evaluation, its JSON written), `stage2-push` exits 2 for a folder the loaders refuse before
the Hub hears of it, and `stage2-export` exits 1 for a Hub model with the Hub out of reach."""
from __future__ import annotations

import json
import shutil

import _hub_helpers
import test_hub
import test_push_refuses_broken_folders as push_tests
import test_user_path_training as evaluate_tests
from test_console_scripts import run

from modeling_stage2.hub import download_failure

# the fixtures: a loopback Hub, a Hub out of reach, NPZ tiles with corrupt ones in val/ and test/, a tiny full refiner
hub_server, dead_hub = _hub_helpers.hub_server, test_hub.dead_hub
tiles, full_model = evaluate_tests.tiles, evaluate_tests.full_model


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_evaluate_exits_1_for_rejected_tiles_of_the_split_and_writes_its_json(tiles, full_model, tmp_path):
    report = tmp_path / "r.json"
    result = run("stage2-evaluate", "--model", str(full_model), "--data", str(tiles), "--split", "val",
                 "--bootstrap", "0", "--no-baselines", "--device", "cpu", "--json", str(report))
    assert result.returncode == 1, result.stderr[-3000:]
    rejected = evaluate_tests.BROKEN_TILES["val"]  # 2; the test split's one is not counted
    named = [tiles / split / name for split, names in evaluate_tests.BROKEN_TILES.items() for name in names]
    results = json.loads(report.read_text())
    assert results["rejected"] == len(rejected) and results["n_tiles"] == 1 and results["refined"]["ndvi_rmse"] >= 0
    said = [line for line in _lines(result.stderr) if line.startswith("stage2-evaluate: ")]
    assert "Traceback" not in result.stderr and len(said) == len(named) + 1, said
    for path in named:  # every split's rejected tile is named; the count is the evaluated split's
        assert sum(line.startswith(f"stage2-evaluate: rejected {path}: ") for line in said[:-1]) == 1, (path, said)
    assert said[-1] == (f"stage2-evaluate: {len(rejected)} tile(s) of split 'val' rejected (above), not evaluated: "
                        "the metrics are those of the 1 evaluated; exit status 1")
    assert f"Wrote {report}" in result.stdout


def test_push_exits_2_for_a_folder_the_loaders_refuse_and_the_hub_hears_nothing(hub_server, full_model, tmp_path):
    source, breakage, file, *problem = push_tests.BROKEN["truncated full weights"]
    assert source == "full"  # the layout of `full_model`
    folder = shutil.copytree(full_model, tmp_path / "model")
    breakage(folder)
    result = run("stage2-push", str(folder), "broken", env={"HF_HUB_OFFLINE": "0"})  # HF_ENDPOINT: the loopback Hub
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = _lines(result.stderr)
    assert line.startswith(f"stage2-push: error: {folder / file}") and all(part in line for part in problem), line
    assert list(hub_server.requests) == [] and hub_server.repos == {}


def test_export_exits_1_for_a_hub_model_with_the_hub_out_of_reach(dead_hub, tmp_path):
    repo_id, out = "someone/demo", tmp_path / "exported"
    result = run("stage2-export", repo_id, str(out), env={"HF_HUB_OFFLINE": "0"})  # HF_ENDPOINT: a closed port
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = _lines(result.stderr)
    assert line.startswith(f"stage2-export: error: MODEL {repo_id}: {download_failure(repo_id)} ("), line
    assert "ConnectError" in line and not out.exists()
