"""Gaps a second mutation audit of model_cards/push.py (stage2-push) and training/evaluate.py (stage2-evaluate)
found: each test fails under a plausible bug that the other tests let pass."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _hub_helpers import hub_server  # noqa: F401  (fixture)
from test_model_cards import _loadable, _model_folder, _pushable, loadable_adapter  # noqa: F401  (fixture)


# ----------------------------------------------------------------------------- stage2-push: what is uploaded
def test_the_preview_images_are_uploaded_with_the_model(tmp_path):
    """The card shows `preview.png`: a push without it leaves the card's image broken."""
    from model_cards.push import files_to_upload

    folder = _pushable(tmp_path / "model")
    for name in ("preview.png", "grid.jpg", "tile.jpeg"):
        (folder / name).write_bytes(b"\x89PNG")
    assert sorted(files_to_upload(folder)) == ["adapter_config.json", "adapter_model.safetensors", "config.json",
                                               "grid.jpg", "metrics.json", "preview.png", "tile.jpeg"]


def test_checkpoint_folders_and_logs_inside_a_pushed_folder_stay_home(tmp_path):
    """A run's root pushed as the model (no best/): its checkpoints hold whole adapters, and its logs JSON files; none
    of them is the model, at any depth (a subfolder goes only when it is a stage2-export folder)."""
    from model_cards.push import files_to_upload

    run = _pushable(tmp_path / "run")
    for nested in ("checkpoint-4", "runs/Jan01", "logs", "extra/checkpoint-2", "extra/logs"):
        (run / nested).mkdir(parents=True)
        (run / nested / "adapter_model.safetensors").write_bytes(b"old")
        (run / nested / "config.json").write_text("{}")
    (run / "extra" / "notes.json").write_text("{}")
    assert sorted(files_to_upload(run)) == ["adapter_config.json", "adapter_model.safetensors", "config.json",
                                            "metrics.json"]


def test_a_checkpoints_rng_states_stay_home(tmp_path):
    """The Trainer saves `rng_state.pth` (a pickle, left out as such) and, per process, `rng_state_N.pth`; a JSON
    written beside them by another tool must not go either."""
    from model_cards.push import files_to_upload

    folder = _pushable(tmp_path / "checkpoint-4")
    for name in ("rng_state.json", "rng_state_1.json", "scheduler.json", "optimizer.safetensors"):
        (folder / name).write_text("{}")
    assert sorted(files_to_upload(folder)) == ["adapter_config.json", "adapter_model.safetensors", "config.json",
                                               "metrics.json"]


def test_the_commit_message_is_the_one_asked_for_or_names_the_layout_and_folder(hub_server, tmp_path,
                                                                                 loadable_adapter):
    from huggingface_hub import HfApi

    from model_cards.push import main, push_trained_model

    folder = _loadable(loadable_adapter, tmp_path / "best")
    repo = f"{hub_server.user}/messages"
    push_trained_model(folder, repo)
    (folder / "step.json").write_text('{"step": 2}')  # an unchanged folder makes no commit
    push_trained_model(folder, repo, commit_message="Refiner of run 7")
    (folder / "step.json").write_text('{"step": 3}')
    assert main([str(folder), repo, "--commit_message", "From the command line"]) == 0
    titles = [commit.title for commit in HfApi().list_repo_commits(repo)]
    assert titles[:3] == ["From the command line", "Refiner of run 7", "Upload Stage 2 refiner (adapter) from best"]


def _full_model(folder: Path, **save) -> Path:
    """A tiny full (merged) refiner saved with `save_pretrained(**save)`, with metrics: a folder the loaders take."""
    from _refiner_helpers import tiny_refiner_config
    from test_model_cards import METRICS

    from modeling_stage2 import Stage2RefinerModel

    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(folder, **save)
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    return folder


def test_a_push_to_a_branch_replaces_that_branchs_files_not_mains(hub_server, tmp_path, loadable_adapter):
    """A full model on branch `full` (main holds nothing of it), then an adapter on the same branch: the branch's
    `model.safetensors` goes in the adapter's commit, as on main."""
    from huggingface_hub import HfApi

    from model_cards.push import push_trained_model

    repo = f"{hub_server.user}/branch-replaced"
    push_trained_model(_full_model(tmp_path / "merged"), repo, revision="full")
    api = HfApi()
    assert "model.safetensors" in api.list_repo_files(repo, revision="full")
    assert "model.safetensors" not in api.list_repo_files(repo)
    push_trained_model(_loadable(loadable_adapter, tmp_path / "adapter"), repo, revision="full")
    branch = set(api.list_repo_files(repo, revision="full"))
    assert "adapter_model.safetensors" in branch and "model.safetensors" not in branch


def test_a_push_replaces_an_earlier_sharded_model(hub_server, tmp_path, loadable_adapter):
    """A full model saved in shards (`model-0000N-of-0000M.safetensors` + the index), then an adapter: the shards
    go too, or `from_pretrained` would still find the old model beside the adapter."""
    from huggingface_hub import HfApi

    from model_cards.push import push_trained_model

    repo = f"{hub_server.user}/sharded"
    full = _full_model(tmp_path / "merged", max_shard_size="100KB")
    shards = sorted(set(json.loads((full / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1 and not (full / "model.safetensors").exists()
    push_trained_model(full, repo)
    assert set(shards) <= set(HfApi().list_repo_files(repo))
    push_trained_model(_loadable(loadable_adapter, tmp_path / "adapter"), repo)
    files = set(HfApi().list_repo_files(repo))
    assert not files & {*shards, "model.safetensors.index.json"} and "adapter_model.safetensors" in files


# ----------------------------------------------------------------------------- stage2-push: refusals and statuses
def test_an_adapter_on_hub_backbone_weights_given_as_an_hf_url_is_pushed(tmp_path, loadable_adapter):
    """`hf://OWNER/REPO/FILE.pt` is a Hub checkpoint (`backbone_weights_location` calls it a "checkpoint"): anyone who
    pulls the adapter can fetch it, so it is not refused as a path on this machine."""
    from model_cards.cards import CardError
    from model_cards.push import model_repo_contents

    folder = _loadable(loadable_adapter, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "stage2_base.json").write_text(json.dumps({"kind": "backbone_weights"}))
    (folder / "config.json").write_text(json.dumps({**config, "backbone_weights": "hf://me/prithvi/Prithvi_EO_V2.pt"}))
    assert "adapter_model.safetensors" in model_repo_contents(folder, "me/x")
    local = tmp_path / "prithvi.pt"
    local.write_bytes(b"checkpoint")
    (folder / "config.json").write_text(json.dumps({**config, "backbone_weights": str(local)}))
    with pytest.raises(CardError, match=f"backbone_weights {local} is a path on this machine"):
        model_repo_contents(folder, "me/x")


def test_a_system_failure_during_the_push_is_exit_status_1(tmp_path, monkeypatch, capsys, loadable_adapter):
    """An OSError mid-push (a file unreadable, a full disk) is not the user's input: 1, one line; the folder's own
    problems are 2."""
    import model_cards.push as push

    def failing_push(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "model" / "adapter_model.safetensors"))

    monkeypatch.setattr(push, "push_trained_model", failing_push)
    folder = _loadable(loadable_adapter, tmp_path / "model")
    assert push.main([str(folder), "me/x", "--token", "hf_x", "--endpoint", "http://127.0.0.1:9"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"stage2-push: error: [Errno 13] Permission denied: '{folder / 'adapter_model.safetensors'}'"]


def test_an_include_code_push_has_a_card_that_says_how_to_load_it_without_the_package(tmp_path):
    from model_cards.push import model_repo_contents
    from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel

    folder = tmp_path / "merged"
    Stage2RefinerModel(Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", head_width=8,
                                           num_convnext_blocks=1)).save_pretrained(folder)
    with_code = model_repo_contents(folder, "me/full", include_code=True)["README.md"].decode()
    without = model_repo_contents(folder, "me/full")["README.md"].decode()
    assert "trust_remote_code=True" in with_code and "also in this repo for `trust_remote_code`" in with_code
    assert "trust_remote_code" not in without


def test_an_auto_map_naming_another_repos_code_is_kept_without_include_code(tmp_path):
    """`OTHER/REPO--module.Class` is code in another repo, which the push neither uploads nor deletes: only the
    entries naming the package's own modules go."""
    from model_cards.push import config_without_package_code

    config = {"model_type": "stage2_refiner", "auto_map": {
        "AutoConfig": "me/code--configuration_stage2.Stage2RefinerConfig",
        "AutoModel": "modeling_stage2.Stage2RefinerModel"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert json.loads(config_without_package_code(tmp_path / "config.json")) == {
        "model_type": "stage2_refiner", "auto_map": {"AutoConfig": "me/code--configuration_stage2.Stage2RefinerConfig"}}


def test_the_datasets_endpoint_is_put_back_after_a_dataset_push():
    """`datasets.config` is global: a push to a local Hub must not point every later `load_dataset` at it, even when
    the push fails."""
    from datasets import config

    from model_cards.push import _datasets_endpoint

    before = config.HF_ENDPOINT, config.HUB_DATASETS_URL
    with pytest.raises(RuntimeError), _datasets_endpoint("http://127.0.0.1:9/"):
        assert config.HF_ENDPOINT == "http://127.0.0.1:9"
        assert config.HUB_DATASETS_URL == "http://127.0.0.1:9/datasets/{repo_id}/resolve/{revision}/{path}"
        raise RuntimeError("the push failed")
    assert (config.HF_ENDPOINT, config.HUB_DATASETS_URL) == before


# ----------------------------------------------------------------------------- stage2-evaluate
@pytest.fixture(scope="module")
def arrow_data(tmp_path_factory) -> Path:
    """A saved DatasetDict: 4 train tiles whose opt_v1 is 1.2x brighter than those of val (3) and test (2), so that a
    colour fit of the train split differs from one of the evaluated split."""
    import datasets

    from _training_helpers import tile_rows

    train = tile_rows(4, seed=0).with_format("numpy")[:]
    train["opt_v1"] = train["opt_v1"] * 1.2
    folder = tmp_path_factory.mktemp("arrow") / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(train), "val": tile_rows(3, seed=1),
                          "test": tile_rows(2, seed=2)}).save_to_disk(str(folder))
    return folder


@pytest.fixture
def fake_model(monkeypatch) -> list[dict]:
    """`load_trained_model` gives a `ScaledRefiner(0.9)`; returns the keyword arguments it was called with."""
    import modeling_stage2
    from _refiner_helpers import ScaledRefiner

    calls = []

    def load_trained_model(path, **kwargs):
        calls.append(kwargs)
        return ScaledRefiner(0.9)

    monkeypatch.setattr(modeling_stage2, "load_trained_model", load_trained_model)
    return calls


def _evaluate(data: Path, out: Path, *flags: str) -> dict:
    from training.evaluate import main

    assert main(["--model", "me/refiner", "--data", str(data), "--device", "cpu", "--bootstrap", "0",
                 "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def _expected(data: Path, split: str, rows: slice = slice(None), fit=None) -> dict:
    """`evaluate_pair` of 0.9 * opt_v1 (or of `fit` applied to opt_v1) on those rows of the saved split."""
    from datasets import load_from_disk

    from training.metrics import evaluate_pair

    batch = load_from_disk(str(data))[split].with_format("torch")[rows]
    output = batch["opt_v1"] * 0.9 if fit is None else fit.apply(batch["opt_v1"])
    return evaluate_pair(output, batch["target"], batch["opt_v1"], batch["valid_mask"])["refined"]


def test_evaluate_scores_the_split_asked_for_with_the_colour_fit_of_the_train_split(arrow_data, fake_model, tmp_path):
    from datasets import load_from_disk

    from training.linear_fit import LinearColorFit

    written = _evaluate(arrow_data, tmp_path / "r.json", "--split", "test")
    assert (written["split"], written["n_tiles"]) == ("test", 2)
    assert written["linear_fit_fitted_on"] == {"split": "train", "tiles": 4}
    fit = LinearColorFit.from_dataset(load_from_disk(str(arrow_data))["train"])
    refined, fitted = _expected(arrow_data, "test"), _expected(arrow_data, "test", fit=fit)
    for name in ("ndvi_rmse", "sam", "psnr"):
        assert written["refined"][name] == pytest.approx(refined[name], rel=1e-5), name
        assert written["linear_fit"][name] == pytest.approx(fitted[name], rel=1e-5), name
    # sanity of the setup: a fit of the scored split itself gives other numbers
    own = _expected(arrow_data, "test", fit=LinearColorFit.from_dataset(load_from_disk(str(arrow_data))["test"]))
    assert own["ndvi_rmse"] != pytest.approx(fitted["ndvi_rmse"], rel=1e-3)


def test_evaluate_scores_the_first_max_samples_tiles(arrow_data, fake_model, tmp_path):
    written = _evaluate(arrow_data, tmp_path / "r.json", "--split", "val", "--max_samples", "2", "--no-baselines")
    expected = _expected(arrow_data, "val", slice(0, 2))
    assert written["n_tiles"] == 2 and "linear_fit" not in written
    for name in ("ndvi_rmse", "sam", "identity_l1"):
        assert written["refined"][name] == pytest.approx(expected[name], rel=1e-5), name
    assert _expected(arrow_data, "val", slice(1, 3))["ndvi_rmse"] != pytest.approx(expected["ndvi_rmse"], rel=1e-3)


def test_the_colour_fit_is_on_by_default_when_the_data_have_a_train_split(arrow_data, fake_model, tmp_path):
    assert "linear_fit" in _evaluate(arrow_data, tmp_path / "r.json")


def test_baselines_asked_for_without_a_train_split_are_refused_before_the_model_loads(tmp_path, fake_model, capsys):
    import datasets

    from _training_helpers import tile_rows
    from training.evaluate import main

    datasets.DatasetDict({"val": tile_rows(2, seed=0)}).save_to_disk(str(tmp_path / "data"))
    assert main(["--model", "me/refiner", "--data", str(tmp_path / "data"), "--device", "cpu", "--baselines"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stage2-evaluate: error: --baselines: {tmp_path / 'data'} has no 'train' split to fit the colour baseline on.")
    assert fake_model == []
    assert "linear_fit" not in _evaluate(tmp_path / "data", tmp_path / "r.json")  # not asked for: left out


@pytest.mark.parametrize("quantization, device", [("none", "cpu"), ("8bit", None)])
def test_the_model_is_loaded_at_the_revision_and_a_quantized_one_where_bitsandbytes_puts_it(
        arrow_data, fake_model, tmp_path, quantization, device):
    """A quantized backbone is placed by bitsandbytes at load time: the loader gets no device for it (moving it after
    the load is what transformers refuses)."""
    _evaluate(arrow_data, tmp_path / "r.json", "--quantization", quantization, "--revision", "v2")
    assert fake_model == [{"quantization": quantization, "device": device, "revision": "v2"}]


def test_the_bootstrap_of_the_colour_fit_is_refined_over_the_colour_fit(tmp_path):
    import datasets

    from _refiner_helpers import ScaledRefiner
    from _training_helpers import tile_rows
    from training.evaluate import evaluate_model, fit_color_baseline

    fit = fit_color_baseline(datasets.DatasetDict({"train": tile_rows(4, seed=0)}))
    results = evaluate_model(ScaledRefiner(0.9), tile_rows(3, seed=1).with_format("numpy"), batch_size=2,
                             progress=False, color_fit=fit, bootstrap_resamples=50, data={"input_mode": "identity"})
    assert results["data"] == {"input_mode": "identity"}
    for role in ("opt_v1", "linear_fit"):
        for name in ("ndvi_rmse", "evi_rmse", "sam"):
            cell = results["bootstrap"][role][name]
            assert cell["ratio"] == pytest.approx(results["refined"][name] / results[role][name], rel=1e-6), role
    assert results["bootstrap"]["linear_fit"]["sam"]["ratio"] != pytest.approx(
        results["bootstrap"]["opt_v1"]["sam"]["ratio"], rel=1e-3)


def test_npz_tiles_are_evaluated_with_the_degradation_and_seed_asked_for(tmp_path, fake_model, monkeypatch):
    import tempfile

    from _data_helpers import make_tile_dir

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    tiles = make_tile_dir(tmp_path / "tiles", per_split=1, s1=False)
    written = _evaluate(tiles, tmp_path / "r.json", "--split", "test", "--degradation", "strong",
                        "--dataset_seed", "3")
    assert written["data"] == {"input_mode": "synthetic", "degradation": "strong", "dataset_seed": 3}
    assert not list((tmp_path / "tmp").iterdir())  # the temporary conversion is removed


def test_a_batch_size_below_1_is_refused_before_any_work(tmp_path, capsys):
    from training.evaluate import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tmp_path / "model"), "--data", str(tmp_path), "--batch_size", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stage2-evaluate: error: --batch_size must be >= 1"
