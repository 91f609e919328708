"""The loopback Hub (tests/hub_server.py) with the real huggingface_hub client, and the Stage 2 refiner's
push/pull round trips through it: adapters, merged models, trust_remote_code, the Prithvi base weights and
the Arrow dataset."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from _hub_helpers import DEFAULT_USER, WITHOUT_PROJECT_PACKAGES, hub_server  # noqa: F401  (fixture)

REPO = f"{DEFAULT_USER}/demo"


def _write(folder: Path, files: dict[str, bytes | str]) -> Path:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


def _raw(hub, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """A request without huggingface_hub: (status, headers, body)."""
    request = urllib.request.Request(hub.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


# ------------------------------------------------------------------------------------------ the server


def test_create_repo_answers_409_with_url_when_it_exists(hub_server):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    url = api.create_repo("demo")  # no namespace: the token's user
    assert url.repo_id == REPO and url == f"{hub_server.url}/{REPO}"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert err.value.response.json()["url"] == f"{hub_server.url}/{REPO}"
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert api.create_repo(REPO, repo_type="dataset").repo_id == REPO  # another namespace of repos
    assert sorted(hub_server.repos) == [("dataset", REPO), ("model", REPO)]
    assert hub_server.unknown_routes == []


def test_upload_folder_regular_and_lfs_files_download_identically(hub_server, tmp_path):
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

    binary = np.random.default_rng(0).bytes(3000)
    folder = _write(tmp_path / "up", {"config.json": '{"a": 1}', "weights.safetensors": binary,
                                      "sub/notes.txt": "hello\n"})
    api = HfApi()
    api.create_repo(REPO)
    commit = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="add files")
    assert commit.oid == api.model_info(REPO).sha and commit.commit_url.endswith(f"/{REPO}/commit/{commit.oid}")

    assert api.list_repo_files(REPO) == [".gitattributes", "config.json", "sub/notes.txt", "weights.safetensors"]
    siblings = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    assert siblings["weights.safetensors"].lfs.sha256 == hashlib.sha256(binary).hexdigest()
    assert siblings["weights.safetensors"].size == 3000 and siblings["config.json"].lfs is None
    assert hub_server.count("PUT", "/__lfs/upload/") == 1  # only the binary file went through LFS

    for name in ("config.json", "weights.safetensors", "sub/notes.txt"):
        assert Path(hf_hub_download(REPO, name)).read_bytes() == (folder / name).read_bytes()
    lfs_meta = get_hf_file_metadata(hf_hub_url(REPO, "weights.safetensors"))
    assert (lfs_meta.etag, lfs_meta.size, lfs_meta.commit_hash) == (hashlib.sha256(binary).hexdigest(), 3000,
                                                                    commit.oid)
    regular = b'{"a": 1}'
    git_oid = hashlib.sha1(b"blob %d\0" % len(regular) + regular).hexdigest()
    assert get_hf_file_metadata(hf_hub_url(REPO, "config.json")).etag == git_oid
    assert hub_server.unknown_routes == []


def test_revisions_by_commit_sha_and_main_snapshot_download(hub_server, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    api = HfApi()
    api.create_repo(REPO)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="model.txt", repo_id=REPO, commit_message="v1")
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="model.txt", repo_id=REPO, commit_message="v2")
    api.upload_file(path_or_fileobj=b"x", path_in_repo="extra/more.txt", repo_id=REPO, commit_message="more")

    assert Path(hf_hub_download(REPO, "model.txt", revision=first.oid)).read_bytes() == b"v1"
    assert Path(hf_hub_download(REPO, "model.txt")).read_bytes() == b"v2"
    old = Path(snapshot_download(REPO, revision=second.oid))
    new = Path(snapshot_download(REPO))
    assert old.name == second.oid and sorted(p.name for p in old.iterdir()) == [".gitattributes", "model.txt"]
    assert (new / "extra" / "more.txt").read_bytes() == b"x" and (new / "model.txt").read_bytes() == b"v2"
    titles = [c.title for c in api.list_repo_commits(REPO)]
    assert titles == ["more", "v2", "v1", "initial commit"]
    assert api.list_repo_refs(REPO).branches[0].target_commit == api.model_info(REPO).sha
    assert api.model_info(REPO, revision=first.oid).sha == first.oid
    assert hub_server.unknown_routes == []


def test_missing_repo_revision_and_file_give_the_hub_errors(hub_server):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{DEFAULT_USER}/nothing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{DEFAULT_USER}/nothing", "config.json")
    api.create_repo(REPO)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="v9")
    status, headers, _ = _raw(hub_server, "HEAD", f"/{REPO}/resolve/main/config.json")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert headers["X-Repo-Commit"] == api.model_info(REPO).sha
    status, headers, _ = _raw(hub_server, "HEAD", f"/{DEFAULT_USER}/nothing/resolve/main/config.json")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")


def test_writes_need_the_token_and_private_repos_are_hidden(hub_server):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").create_repo(REPO)
    assert err.value.response.status_code == 401
    HfApi().create_repo(REPO, private=True)
    HfApi().upload_file(path_or_fileobj=b"secret", path_in_repo="a.txt", repo_id=REPO)
    assert HfApi().model_info(REPO).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info(REPO)
    status, _, _ = _raw(hub_server, "GET", f"/{REPO}/resolve/main/a.txt")
    assert status == 404


def test_dataset_repos_are_separate_from_model_repos(hub_server):
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    api.create_repo(REPO, repo_type="dataset")
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data/train.csv", repo_id=REPO, repo_type="dataset")
    assert api.dataset_info(REPO).siblings[-1].rfilename == "data/train.csv"
    assert Path(hf_hub_download(REPO, "data/train.csv", repo_type="dataset")).read_bytes() == b"a,b\n1,2\n"
    assert [f.path for f in api.list_repo_tree(REPO, repo_type="dataset", path_in_repo="data")] == ["data/train.csv"]
    assert not api.repo_exists(REPO)  # the model repo of that name was never created
    assert hub_server.count("GET", f"/datasets/{REPO}/resolve/") == 1


def test_unchanged_upload_is_skipped_and_deletes_and_stale_parents_work(hub_server, tmp_path):
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = _write(tmp_path / "up", {"a.txt": "a", "w.safetensors": b"\0" * 100})
    api = HfApi()
    api.create_repo(REPO)
    first = api.upload_folder(folder_path=folder, repo_id=REPO)
    assert api.upload_folder(folder_path=folder, repo_id=REPO).oid == first.oid  # nothing changed: no commit
    api.delete_file("a.txt", REPO)
    assert api.list_repo_files(REPO) == [".gitattributes", "w.safetensors"]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(REPO, [CommitOperationAdd("b.txt", b"b")], commit_message="late", parent_commit=first.oid)
    assert err.value.response.status_code == 412


def test_lfs_blobs_must_match_their_oid_and_be_uploaded_before_the_commit(hub_server):
    from huggingface_hub import HfApi

    HfApi().create_repo(REPO)
    auth = {"Authorization": f"Bearer {hub_server.token}", "Content-Type": "application/json"}
    data = b"payload" * 10
    oid = hashlib.sha256(data).hexdigest()
    body = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}).encode()
    status, _, answer = _raw(hub_server, "POST", f"/{REPO}.git/info/lfs/objects/batch", auth, body)
    href = json.loads(answer)["objects"][0]["actions"]["upload"]["href"]
    status, _, answer = _raw(hub_server, "PUT", href[len(hub_server.url):], {}, b"tampered" * 10)
    assert status == 400 and b"does not match" in answer
    commit = (json.dumps({"key": "header", "value": {"summary": "x"}}) + "\n" + json.dumps(
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(data)}})).encode()
    status, _, answer = _raw(hub_server, "POST", f"/api/models/{REPO}/commit/main", auth, commit)
    assert status == 422 and b"never uploaded" in answer
    assert _raw(hub_server, "PUT", href[len(hub_server.url):], {}, data)[0] == 200
    assert _raw(hub_server, "POST", f"/api/models/{REPO}/commit/main", auth, commit)[0] == 200
    assert hub_server.file_bytes(REPO, "w.bin") == data


def test_byte_ranges_tree_pages_and_the_storage_bound(hub_server, tmp_path):
    from huggingface_hub import HfApi, HfFileSystem
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    api.create_repo(REPO)
    api.upload_folder(folder_path=_write(tmp_path / "up", {f"f{i}.txt": f"file {i}" for i in range(5)}), repo_id=REPO)
    status, headers, body = _raw(hub_server, "GET", f"/{REPO}/resolve/main/f3.txt", {"Range": "bytes=2-4"})
    assert (status, body, headers["Content-Range"]) == (206, b"le ", "bytes 2-4/6")
    with HfFileSystem().open(f"{REPO}/f4.txt", "rb") as handle:
        handle.seek(5)
        assert handle.read() == b"4"

    hub_server.tree_page_size = 2
    assert len(list(api.list_repo_tree(REPO, recursive=True))) == 6  # 3 pages of 2
    assert hub_server.count("GET", f"/api/models/{REPO}/tree/") >= 3

    hub_server.max_storage_bytes = hub_server.stored_bytes + 10
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x" * 100, path_in_repo="big.txt", repo_id=REPO)
    assert err.value.response.status_code == 507
    assert "big.txt" not in api.list_repo_files(REPO)
    assert hub_server.unknown_routes == []


def test_gitignored_files_are_left_out(hub_server, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(REPO)
    folder = _write(tmp_path / "up", {".gitignore": "*.log\ncache/\n", "keep.txt": "k", "run.log": "l",
                                      "cache/x.bin": b"\0\1"})
    api.upload_folder(folder_path=folder, repo_id=REPO)
    assert api.list_repo_files(REPO) == [".gitattributes", ".gitignore", "keep.txt"]


# ------------------------------------------------------------------------------------------ the refiner


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained adapter folder, its merged export and reference outputs (built once per module)."""
    adapters = pytest.importorskip("modeling_stage2.adapters")
    from modeling_stage2 import Stage2RefinerConfig

    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("trained")
    config = Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", head_width=32, num_convnext_blocks=2)
    model = adapters.build_trainable_model(config, quantization="none", print_summary=False)
    with torch.no_grad():  # "training": move LoRA (zero-initialised) and the trained modules off their init
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    adapter_dir = adapters.save_trained_model(model, root / "best")
    metrics = {"refined": {"ndvi_rmse": 0.041, "evi_rmse": 0.058, "sam": 0.07, "identity_l1": 0.03,
                           "edge_l1": 0.019, "psnr": 27.5, "ssim": 0.8},
               "opt_v1": {"ndvi_rmse": 0.09, "evi_rmse": 0.11, "sam": 0.15, "identity_l1": 0.0,
                          "edge_l1": 0.04, "psnr": 21.0, "ssim": 0.6}, "n_tiles": 12}
    (adapter_dir / "metrics.json").write_text(json.dumps(metrics))
    (adapter_dir / "optimizer.pt").write_bytes(b"not for the Hub")
    inputs = {"opt_v1": torch.rand(2, 4, 120, 120), "month": torch.tensor([3, 7]), "biome": torch.tensor([1, -1])}
    model.eval()
    with torch.no_grad():
        adapter_out = model(**inputs).refined
    merged = adapters.export_merged_model(adapters.load_trained_model(adapter_dir), root / "merged")
    with torch.no_grad():
        merged_out = merged(**inputs).refined
    return {"adapter_dir": adapter_dir, "merged_dir": root / "merged", "inputs": inputs, "metrics": metrics,
            "adapter_out": adapter_out, "merged_out": merged_out}


def test_pushed_adapter_loads_back_with_identical_outputs(hub_server, trained):
    from huggingface_hub import HfApi, ModelCard

    from model_cards.push import push_trained_model
    from modeling_stage2 import load_trained_model

    url = push_trained_model(trained["adapter_dir"], "tiny-refiner")
    repo = f"{DEFAULT_USER}/tiny-refiner"
    assert url.startswith(f"{hub_server.url}/{repo}/commit/")
    files = HfApi().list_repo_files(repo)
    assert {"adapter_model.safetensors", "adapter_config.json", "config.json", "stage2_base.json",
            "metrics.json", "README.md"} <= set(files)
    assert not any(f.endswith((".py", ".pt")) for f in files)  # no code unless asked, never pickles

    card = ModelCard.load(repo)  # peft's placeholder README was replaced by the generated card
    assert "[More Information Needed]" not in card.text and card.data.library_name == "peft"
    assert "not quantized during training" in card.text  # from stage2_base.json
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        k: trained["metrics"]["refined"][k] for k in ("ndvi_rmse", "evi_rmse", "sam", "identity_l1", "edge_l1")}

    model = load_trained_model(repo)
    with torch.no_grad():
        assert torch.equal(model(**trained["inputs"]).refined, trained["adapter_out"])
    assert hub_server.unknown_routes == []


def test_models_load_at_a_revision_and_only_their_model_files_are_downloaded(hub_server, trained, tmp_path):
    import shutil

    from huggingface_hub import HfApi
    from safetensors.torch import load_file, save_file

    from model_cards.push import push_trained_model
    from modeling_stage2 import load_trained_model
    from inference_stage2 import load_model

    api = HfApi()
    repo = f"{DEFAULT_USER}/versions"
    push_trained_model(trained["adapter_dir"], "versions")
    api.create_tag(repo, tag="v1")
    changed = tmp_path / "changed"
    shutil.copytree(trained["adapter_dir"], changed)
    weights = load_file(changed / "adapter_model.safetensors")
    save_file({name: value * 0.5 for name, value in weights.items()}, changed / "adapter_model.safetensors")
    push_trained_model(changed, "versions")
    api.upload_file(path_or_fileobj=b"pickled", path_in_repo="extras/optimizer.bin", repo_id=repo)

    def refined(model):
        with torch.no_grad():
            return model(**trained["inputs"]).refined

    assert torch.equal(refined(load_trained_model(repo, revision="v1")), trained["adapter_out"])
    assert torch.equal(refined(load_model(repo, revision="v1")), trained["adapter_out"])
    latest = load_trained_model(repo)
    assert not torch.equal(refined(latest), trained["adapter_out"])
    downloaded = {p.relative_to(latest.stage2_folder).as_posix() for p in latest.stage2_folder.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in downloaded and "extras/optimizer.bin" not in downloaded  # never a pickle


def test_pushed_full_model_loads_with_from_pretrained_and_automodel(hub_server, trained):
    from transformers import AutoModel

    from model_cards.push import push_trained_model
    from modeling_stage2 import Stage2RefinerModel, load_trained_model

    push_trained_model(trained["merged_dir"], f"{DEFAULT_USER}/tiny-merged")
    repo = f"{DEFAULT_USER}/tiny-merged"
    with torch.no_grad():
        for model in (Stage2RefinerModel.from_pretrained(repo), AutoModel.from_pretrained(repo),
                      load_trained_model(repo)):
            assert type(model).__name__ == "Stage2RefinerModel"
            assert torch.equal(model.eval()(**trained["inputs"]).refined, trained["merged_out"])
    # merging LoRA into the weights changes the float rounding only
    torch.testing.assert_close(trained["merged_out"], trained["adapter_out"], atol=1e-5, rtol=0)


REMOTE_SCRIPT = WITHOUT_PROJECT_PACKAGES + textwrap.dedent("""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert not any(name.split(".")[0] in OURS for name in sys.modules)
    inputs = load_file(sys.argv[2])
    with torch.no_grad():
        refined = model(inputs["opt_v1"], inputs["month"], inputs["biome"]).refined
    save_file({"refined": refined.contiguous()}, sys.argv[2] + ".out")
""")


def test_trust_remote_code_loads_a_pushed_repo_without_the_package(hub_server, trained, tmp_path, repo_root):
    from huggingface_hub import HfApi
    from safetensors.torch import load_file, save_file

    from model_cards.push import push_trained_model

    repo = f"{DEFAULT_USER}/tiny-remote"
    push_trained_model(trained["merged_dir"], repo, include_code=True)
    files = set(HfApi().list_repo_files(repo))
    assert {"configuration_stage2.py", "modeling_stage2.py", "configuration_prithvi.py", "modeling_prithvi.py",
            "convert_prithvi.py"} <= files  # convert_prithvi: imported inside a function of modeling_stage2
    save_file({k: v.contiguous() for k, v in trained["inputs"].items()}, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    result = subprocess.run([sys.executable, "remote.py", repo, str(tmp_path / "inputs.safetensors"),
                             str(repo_root)], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    refined = load_file(str(tmp_path / "inputs.safetensors.out"))["refined"]
    assert torch.equal(refined, trained["merged_out"])


def test_remote_code_is_what_transformers_writes_for_each_model_type(tmp_path):
    from model_cards.cards import CardError
    from model_cards.push import remote_code
    from modeling_stage2 import PrithviConfig, PrithviEncoder, Stage2RefinerConfig, Stage2RefinerModel

    refiner = Stage2RefinerModel(Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny"))
    refiner.save_pretrained(tmp_path / "saved")  # a registered class: save_pretrained copies its code itself
    saved_code = sorted(p.name for p in (tmp_path / "saved").glob("*.py"))
    files, config = remote_code(tmp_path / "saved" / "config.json")
    assert sorted(files) == saved_code and {"modeling_stage2.py", "modeling_prithvi.py"} <= set(files)
    assert json.loads(config)["auto_map"] == {"AutoConfig": "configuration_stage2.Stage2RefinerConfig",
                                              "AutoModel": "modeling_stage2.Stage2RefinerModel"}
    for name, source in files.items():
        assert source == (tmp_path / "saved" / name).read_bytes(), name

    PrithviConfig.from_preset("prithvi_eo_v2_tiny").to_json_file(tmp_path / "prithvi.json")
    files, config = remote_code(tmp_path / "prithvi.json")
    assert {"configuration_prithvi.py", "modeling_prithvi.py"} <= set(files) and "modeling_stage2.py" not in files
    assert json.loads(config)["auto_map"] == {"AutoConfig": "configuration_prithvi.PrithviConfig",
                                              "AutoModel": "modeling_prithvi.PrithviEncoder"}
    assert getattr(PrithviEncoder, "_auto_class", None) is None  # the class's registration is left as it was

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CardError, match="model_type 'bert' has no modeling code"):
        remote_code(tmp_path / "config.json")


def test_push_refuses_a_folder_without_a_model(hub_server, tmp_path, capsys):
    from model_cards.cards import CardError
    from model_cards.push import main, push_trained_model

    folder = _write(tmp_path / "run", {"training_log.jsonl": "{}\n", "pytorch_model.bin": b"\0"})
    with pytest.raises(CardError, match="no trained model to push.*adapter_config.json.*pickled .bin"):
        push_trained_model(folder, "nothing")
    assert main([str(folder), "nothing", "--endpoint", hub_server.url]) == 2
    assert "no trained model to push" in capsys.readouterr().err
    assert hub_server.repos == {}  # refused before creating anything


def test_push_checks_the_model_folder_before_pushing_the_dataset(hub_server, tmp_path, capsys):
    from model_cards.push import main

    _tiny_dataset_dict(2, 1).save_to_disk(str(tmp_path / "arrow"))
    folder = _write(tmp_path / "run", {"training_log.jsonl": "{}\n"})
    assert main([str(folder), "both", "--dataset", str(tmp_path / "arrow"), "--endpoint", hub_server.url]) == 2
    assert "no trained model to push" in capsys.readouterr().err
    assert hub_server.repos == {}  # the dataset was not pushed either
    assert main([str(folder), "both", "--dataset", str(tmp_path / "run"), "--endpoint", hub_server.url]) == 2
    assert hub_server.repos == {}


def test_push_makes_the_card_before_pushing_the_dataset(hub_server, trained, tmp_path, capsys):
    import shutil

    from model_cards.push import main

    _tiny_dataset_dict(2, 1).save_to_disk(str(tmp_path / "arrow"))
    folder = tmp_path / "model"
    shutil.copytree(trained["adapter_dir"], folder)
    metrics = folder / "metrics.json"
    metrics.write_text(json.dumps({"refined": {"ndvi_rmse": "x"}}))
    capsys.readouterr()  # the dataset's save_to_disk progress
    assert main([str(folder), "both", "--dataset", str(tmp_path / "arrow"), "--endpoint", hub_server.url]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"stage2-push: error: {metrics}: refined.ndvi_rmse: expected a number, got 'x'"]
    assert hub_server.repos == {}  # neither the dataset nor an empty model repo


def test_checkpoint_training_state_stays_home(trained, tmp_path):
    import shutil

    from model_cards.push import files_to_upload

    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(trained["adapter_dir"], checkpoint)
    state = ["discriminator.safetensors", "discriminator_config.json", "discriminator_optimizer.safetensors",
             "discriminator_optimizer.json", "stage2_trainer_state.json", "checkpoint_complete.json",
             "trainer_state.json", "training_args.json", "scheduler.pt", "rng_state.pth"]
    for name in state:
        (checkpoint / name).write_bytes(b"{}")
    assert set(files_to_upload(checkpoint)) == set(files_to_upload(trained["adapter_dir"]))
    assert {"adapter_model.safetensors", "config.json", "metrics.json"} <= set(files_to_upload(checkpoint))


def test_push_to_a_hub_that_does_not_answer_is_one_line(trained, capsys):
    import socket

    from model_cards.push import main

    with socket.socket() as unused:  # a port nobody listens on once it is closed
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    assert main([str(trained["adapter_dir"]), "nowhere", "--endpoint", endpoint, "--token", "hf_any"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"stage2-push: error: the Hub at {endpoint} could not be reached (")


def test_push_finds_best_and_regenerates_its_card_for_the_repo(hub_server, trained, tmp_path):
    import shutil

    from huggingface_hub import HfApi, ModelCard

    from model_cards.cards import write_model_card
    from model_cards.push import main

    run = tmp_path / "run"
    shutil.copytree(trained["adapter_dir"], run / "best")
    (run / "checkpoint-10").mkdir()
    write_model_card(run / "best")  # as training does, before the repo name is known
    assert 'load_trained_model("OWNER/REPO")' in (run / "best" / "README.md").read_text()
    assert main([str(run), "tiny-cli", "--private", "--endpoint", hub_server.url]) == 0
    repo = f"{DEFAULT_USER}/tiny-cli"
    info = HfApi().model_info(repo)
    assert info.private is True and "adapter_model.safetensors" in {s.rfilename for s in info.siblings}
    card = ModelCard.load(repo)
    assert f'load_trained_model("{repo}")' in card.text and len(card.data.eval_results) == 5


def test_private_push_to_an_existing_public_repo_makes_it_private_first(hub_server, trained, tmp_path, caplog):
    import logging

    from huggingface_hub import HfApi

    from model_cards.push import push_dataset, push_trained_model

    api = HfApi()
    repo = f"{DEFAULT_USER}/was-public"
    api.create_repo(repo, private=False)
    with caplog.at_level(logging.WARNING, logger="model_cards.push"):
        push_trained_model(trained["adapter_dir"], "was-public", private=True)
    assert api.repo_info(repo).private is True
    assert f"{repo} existed and was public; made it private" in caplog.text
    push_trained_model(trained["adapter_dir"], "was-public")  # no --private: the visibility is left as it is
    assert api.repo_info(repo).private is True

    original = _tiny_dataset_dict()
    original.save_to_disk(str(tmp_path / "arrow"))
    api.create_repo(f"{DEFAULT_USER}/public-tiles", repo_type="dataset", private=False)
    push_dataset(tmp_path / "arrow", "public-tiles", private=True)
    assert api.repo_info(f"{DEFAULT_USER}/public-tiles", repo_type="dataset").private is True


def test_pushing_a_run_folder_as_a_dataset_points_at_its_arrow_cache(tmp_path):
    from model_cards.cards import CardError
    from model_cards.push import push_dataset

    run = tmp_path / "run"
    _tiny_dataset_dict().save_to_disk(str(run / "_dataset" / "abc123"))
    for wrong in (run, run / "dataset"):  # the run itself, or the path the docs once gave
        with pytest.raises(CardError, match=rf"not a dataset saved with save_to_disk .*pass {run / '_dataset' / 'abc123'}"):
            push_dataset(wrong, "tiles")


def test_a_hand_written_card_is_pushed_as_it_is(hub_server, trained, tmp_path):
    import shutil

    from model_cards.push import push_trained_model

    folder = tmp_path / "merged"
    shutil.copytree(trained["merged_dir"], folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# My refiner\n")
    push_trained_model(folder, "tiny-own-card")
    assert hub_server.file_bytes(f"{DEFAULT_USER}/tiny-own-card", "README.md") == b"---\nlicense: mit\n---\n# My refiner\n"


def test_official_checkpoint_streams_from_the_hub_once(hub_server, prithvi_fixtures_dir):
    """The shared reference checkpoint (depth 2: no preset matches it) through `hf://` and the Hub cache."""
    from huggingface_hub import HfApi

    from modeling_stage2 import load_official_encoder

    repo = f"{DEFAULT_USER}/Prithvi-EO-2.0-fixture"
    HfApi().create_repo(repo)
    HfApi().upload_file(path_or_fileobj=str(prithvi_fixtures_dir / "tiny_checkpoint.pt"),
                        path_in_repo="tiny_checkpoint.pt", repo_id=repo)
    overrides = {"preset": "prithvi_eo_v2_tiny", "depth": 2}
    from_hub = [load_official_encoder(f"hf://{repo}/tiny_checkpoint.pt", **overrides) for _ in range(2)]
    assert hub_server.count("GET", f"/{repo}/resolve/") == 1  # the second load reads the cache
    local = load_official_encoder(prithvi_fixtures_dir / "tiny_checkpoint.pt", **overrides)
    pixels = torch.randn(1, 6, 224, 224)
    with torch.no_grad():
        expected = local(pixels).last_hidden_state
        for encoder in from_hub:
            assert torch.equal(encoder(pixels).last_hidden_state, expected)


def test_refiner_backbone_weights_come_from_their_hub_repo_converted_once(hub_server, tmp_path):
    from huggingface_hub import HfApi

    from _prithvi_helpers import write_official_checkpoint
    from modeling_stage2 import (PrithviConfig, PrithviEncoder, Stage2RefinerConfig, Stage2RefinerModel,
                                 load_official_encoder, load_prithvi_from_hub)

    checkpoint = tmp_path / "Prithvi_EO_V2_tiny.pt"
    write_official_checkpoint(checkpoint, PrithviConfig.from_preset("prithvi_eo_v2_tiny"), seed=3)
    repo = f"{DEFAULT_USER}/Prithvi-EO-2.0-tiny"
    HfApi().create_repo(repo)
    HfApi().upload_file(path_or_fileobj=str(checkpoint), path_in_repo=checkpoint.name, repo_id=repo)

    folder = load_prithvi_from_hub(repo, checkpoint.name)
    converted_at = (folder / "model.safetensors").stat().st_mtime_ns
    assert load_prithvi_from_hub(repo, checkpoint.name) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == converted_at  # not converted again
    assert hub_server.count("GET", f"/{repo}/resolve/") == 1  # nor downloaded again
    pixels = torch.randn(1, 6, 224, 224)
    with torch.no_grad():
        assert torch.equal(PrithviEncoder.from_pretrained(folder).eval()(pixels).last_hidden_state,
                           load_official_encoder(checkpoint)(pixels).last_hidden_state)

    config = Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", backbone_weights=f"{repo}/{checkpoint.name}",
                                 head_width=16, num_convnext_blocks=1)
    refiner = Stage2RefinerModel(config)
    refiner.load_backbone_weights()
    four_bands = load_official_encoder(checkpoint, bands=list(config.bands)).state_dict()
    mine = refiner.backbone.state_dict()
    assert all(torch.equal(mine[key], value) for key, value in four_bands.items() if key != "pos_embed")
    assert hub_server.count("GET", f"/{repo}/resolve/") == 1  # the 4-band conversion reused the download


# ------------------------------------------------------------------------------------------ the dataset


def _tiny_dataset_dict(n_train: int = 3, n_test: int = 2):
    import datasets

    features = datasets.Features({
        "target": datasets.Array3D((4, 120, 120), "float32"), "opt_v1": datasets.Array3D((4, 120, 120), "float32"),
        "month": datasets.Value("int64"), "biome": datasets.Value("int64"), "tile_id": datasets.Value("string"),
        "valid_mask": datasets.Array2D((120, 120), "bool"),
    })
    rng = np.random.default_rng(0)

    def split(n, offset):
        return datasets.Dataset.from_dict({
            "target": rng.random((n, 4, 120, 120), dtype=np.float32),
            "opt_v1": rng.random((n, 4, 120, 120), dtype=np.float32),
            "month": list(range(1 + offset, 1 + offset + n)), "biome": [offset] * n,
            "tile_id": [f"tile_{offset + i}" for i in range(n)], "valid_mask": rng.random((n, 120, 120)) > 0.1,
        }, features=features)

    return datasets.DatasetDict({"train": split(n_train, 0), "test": split(n_test, 10)})


def test_dataset_push_and_load_dataset_round_trip(hub_server, tmp_path):
    import datasets
    from huggingface_hub import DatasetCard

    from model_cards.push import push_dataset

    original = _tiny_dataset_dict()
    original.save_to_disk(str(tmp_path / "arrow"))
    url = push_dataset(tmp_path / "arrow", "tiles")
    repo = f"{DEFAULT_USER}/tiles"
    assert url.startswith(f"{hub_server.url}/datasets/{repo}/commit/")

    card = DatasetCard.load(repo)
    assert card.data.license == "cdla-permissive-1.0" and "sentinel-2" in card.data.tags
    assert card.data.configs and card.data.dataset_info  # push_to_hub's metadata kept under the card
    assert "| train | 3 |" in card.text and "| test | 2 |" in card.text

    loaded = datasets.load_dataset(repo)
    assert sorted(loaded) == ["test", "train"] and loaded["train"].features == original["train"].features
    for split in ("train", "test"):
        for column in ("target", "opt_v1", "valid_mask"):
            assert np.array_equal(np.asarray(loaded[split][column]), np.asarray(original[split][column]))
        assert loaded[split]["tile_id"] == original[split]["tile_id"]
    assert hub_server.unknown_routes == []


def test_cli_pushes_dataset_code_and_a_card_naming_the_dataset(hub_server, trained, tmp_path, capsys):
    from huggingface_hub import HfApi, ModelCard

    from model_cards.push import main

    _tiny_dataset_dict(2, 1).save_to_disk(str(tmp_path / "arrow"))
    folder = tmp_path / "merged"
    import shutil

    shutil.copytree(trained["merged_dir"], folder)
    assert main([str(folder), "tiny-all", "--include_code", "--dataset", str(tmp_path / "arrow"),
                 "--endpoint", hub_server.url]) == 0
    out = capsys.readouterr().out
    assert "dataset pushed" in out and "model pushed" in out
    repo = f"{DEFAULT_USER}/tiny-all"
    assert HfApi().dataset_info(repo).sha and "modeling_stage2.py" in HfApi().list_repo_files(repo)
    card = ModelCard.load(repo)
    assert card.data.datasets == [repo] and card.data.library_name == "transformers"
    config = json.loads(hub_server.file_bytes(repo, "config.json"))
    assert config["auto_map"]["AutoModel"] == "modeling_stage2.Stage2RefinerModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_stage2.Stage2RefinerConfig"


def test_a_second_push_replaces_the_first_models_files(hub_server, trained, tmp_path):
    """An adapter, then a full model, to the same repo: the adapter's files go in the same commit (they would make
    `load_trained_model` serve the old adapter), and so do records the new folder does not have."""
    import shutil

    from huggingface_hub import HfApi

    from model_cards.push import push_trained_model
    from modeling_stage2 import load_trained_model

    repo = f"{DEFAULT_USER}/replaced"
    push_trained_model(trained["adapter_dir"], repo)
    api = HfApi()
    api.upload_file(path_or_fileobj=b"mine", path_in_repo="NOTES.txt", repo_id=repo)  # not ours: stays
    merged = tmp_path / "merged"
    shutil.copytree(trained["merged_dir"], merged)
    (merged / "metrics.json").unlink(missing_ok=True)
    push_trained_model(merged, repo)
    files = set(api.list_repo_files(repo))
    assert not files & {"adapter_config.json", "adapter_model.safetensors", "base_model.safetensors",
                        "stage2_base.json", "metrics.json"}
    assert {"config.json", "model.safetensors", "README.md", "NOTES.txt"} <= files
    with torch.no_grad():
        assert torch.equal(load_trained_model(repo)(**trained["inputs"]).refined, trained["merged_out"])
    assert len(api.list_repo_commits(repo)) == 4  # initial, adapter, notes, model: the deletes in the model's commit


def test_push_to_a_new_branch_creates_it_from_main(hub_server, trained):
    from huggingface_hub import HfApi

    from model_cards.push import push_trained_model

    from model_cards.push import main

    repo = f"{DEFAULT_USER}/branched"
    push_trained_model(trained["adapter_dir"], repo)
    push_trained_model(trained["merged_dir"], repo, revision="merged")
    api = HfApi()
    assert "adapter_config.json" in api.list_repo_files(repo)  # main keeps the adapter
    branch = set(api.list_repo_files(repo, revision="merged"))
    assert "model.safetensors" in branch and "adapter_config.json" not in branch
    # the command line's --revision: another branch, main untouched
    assert main([str(trained["merged_dir"]), repo, "--revision", "full"]) == 0
    assert "model.safetensors" in api.list_repo_files(repo, revision="full")
    assert "model.safetensors" not in api.list_repo_files(repo)


def test_adapters_that_cannot_be_used_elsewhere_are_refused_before_anything_is_pushed(hub_server, trained, tmp_path,
                                                                                         capsys):
    """An adapter with --include_code (trust_remote_code cannot rebuild its base), and one whose base is a folder
    or backbone file on this machine: one line, exit 2, no repo."""
    import shutil

    from huggingface_hub import HfApi

    from model_cards.push import main

    local_base = tmp_path / "local_base"
    shutil.copytree(trained["adapter_dir"], local_base)
    (local_base / "stage2_base.json").write_text(json.dumps(
        {"kind": "model", "model_name_or_path": str(tmp_path / "base"), "trained_quantization": "none"}))
    local_backbone = tmp_path / "local_backbone"
    shutil.copytree(trained["adapter_dir"], local_backbone)
    config = json.loads((local_backbone / "config.json").read_text())
    (local_backbone / "config.json").write_text(json.dumps({**config, "backbone_weights": "/data/prithvi.pt"}))
    (local_backbone / "stage2_base.json").write_text(json.dumps({"kind": "backbone_weights"}))
    hub_backbone = tmp_path / "hub_backbone"
    shutil.copytree(local_backbone, hub_backbone)
    (hub_backbone / "config.json").write_text(json.dumps({**config, "backbone_weights": "me/prithvi-tiny"}))
    cases = [
        ([str(trained["adapter_dir"]), "refused-code", "--include_code"], "--include_code needs a full model"),
        ([str(local_base), "refused-base"], f"model_name_or_path {tmp_path / 'base'} is a path on this machine"),
        ([str(local_backbone), "refused-backbone"], "backbone_weights /data/prithvi.pt is a path on this machine"),
    ]
    for argv, needle in cases:
        assert main([*argv, "--endpoint", hub_server.url]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not any(HfApi().repo_exists(f"{DEFAULT_USER}/{name}") for name in ("refused-code", "refused-base",
                                                                              "refused-backbone"))
    from model_cards.push import model_repo_contents

    assert "adapter_model.safetensors" in model_repo_contents(hub_backbone, "me/x")  # a Hub backbone is fine


def test_a_run_folder_pushes_its_best_model_and_never_its_dataset_cache(hub_server, trained, tmp_path):
    """After `--push_to_hub` training the run folder holds the final adapter too; `stage2-push RUN` pushes best/
    (the model training selected), and neither the Arrow cache nor a second copy of best/."""
    import shutil

    from huggingface_hub import HfApi

    from model_cards.push import files_to_upload, find_model_folder, main

    run = tmp_path / "run"
    shutil.copytree(trained["adapter_dir"], run / "best")
    shutil.copytree(trained["adapter_dir"], run, dirs_exist_ok=True)  # the Trainer's final save at the root
    (run / "_dataset" / "key").mkdir(parents=True)
    (run / "_dataset" / "key" / "dataset_dict.json").write_text("{}")
    assert find_model_folder(run) == (run / "best", "adapter")
    assert not any(path.startswith(("_dataset/", "best/")) for path in files_to_upload(run))
    assert main([str(run), "run-push", "--endpoint", hub_server.url]) == 0
    assert not any("/" in path for path in HfApi().list_repo_files(f"{DEFAULT_USER}/run-push"))


# ------------------------------------------------------------ failed downloads: the user's (exit 2) or not (exit 1)


@pytest.fixture
def dead_hub(tmp_path, monkeypatch) -> str:
    """Every Hub client pointed at a port where nothing listens (the Hub out of reach), an empty cache, and
    huggingface_hub's retries of a file's metadata (waits of 1 + 2 + 4 + 8 + 8 s) without their waits."""
    import socket
    import types

    from huggingface_hub.utils import _http

    from _hub_helpers import DEFAULT_TOKEN, configure_hub_client

    with socket.socket() as unused:  # a port nobody listens on once it is closed
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"
    configure_hub_client(monkeypatch, endpoint, DEFAULT_TOKEN, tmp_path / "dead_hub_home")
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    return endpoint


def _download_failure(download, *args, **kwargs) -> BaseException:
    from modeling_stage2.hub import hub_download_errors

    with pytest.raises(hub_download_errors()) as caught:
        download(*args, **kwargs)
    return caught.value


def test_a_failed_download_is_the_users_for_a_name_that_does_not_exist_or_cannot_be_read(hub_server, monkeypatch):
    import httpx2
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from modeling_stage2.hub import hub_failure_is_users, hub_failure_line

    api = HfApi()
    api.create_repo(REPO)
    api.create_repo(f"{DEFAULT_USER}/secret", private=True)
    users = {"no such repo": _download_failure(snapshot_download, f"{DEFAULT_USER}/nothing"),
             "no such revision": _download_failure(snapshot_download, REPO, revision="v9"),
             "no such file": _download_failure(hf_hub_download, REPO, "config.json"),
             "private, no token": _download_failure(snapshot_download, f"{DEFAULT_USER}/secret", token=False)}
    for what, error in users.items():
        assert hub_failure_is_users(error), (what, hub_failure_line(error))

    def broken(*args, **kwargs):
        raise RuntimeError("the Hub is down")

    monkeypatch.setattr(hub_server, "repo_info", broken)  # the loopback Hub answers 500
    failing = _download_failure(snapshot_download, REPO)
    assert isinstance(failing, LocalEntryNotFoundError) and not hub_failure_is_users(failing)

    def answer(status: int) -> HfHubHTTPError:
        request = httpx2.Request("GET", f"{hub_server.url}/api/models/{REPO}")
        return HfHubHTTPError(f"{status} error", response=httpx2.Response(status, request=request))

    for status, expected in ((403, True), (503, False)):  # what snapshot_download wraps: the Hub's answer decides
        wrapped = LocalEntryNotFoundError("not in the cache either")
        wrapped.__cause__ = answer(status)
        assert hub_failure_is_users(wrapped) is expected and hub_failure_is_users(answer(status)) is expected
    assert not hub_failure_is_users(LocalEntryNotFoundError("local_files_only, nothing cached"))
    assert len(hub_failure_line(users["no such repo"]).splitlines()) == 1


def test_a_hub_out_of_reach_or_offline_is_not_the_users(dead_hub, monkeypatch):
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    from modeling_stage2.hub import hub_failure_is_users, hub_failure_line

    for error in (_download_failure(snapshot_download, f"{DEFAULT_USER}/demo"),
                  _download_failure(hf_hub_download, f"{DEFAULT_USER}/demo", "config.json")):
        line = hub_failure_line(error)
        assert not hub_failure_is_users(error) and "ConnectError" in line and len(line.splitlines()) == 1, line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = _download_failure(snapshot_download, f"{DEFAULT_USER}/demo")
    assert not hub_failure_is_users(offline), hub_failure_line(offline)


def _one_error_line(capsys, prog: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


def test_refine_exits_2_for_a_hub_model_that_does_not_exist(hub_server, sample_tiles_dir, tmp_path, capsys):
    from inference_stage2.cli import main

    tile = next((sample_tiles_dir / "val").glob("*.npz"))
    argv = ["--model", f"{DEFAULT_USER}/nothing", "--input", str(tile), "--output_dir", str(tmp_path / "out"),
            "--no_progress"]
    assert main(argv) == 2
    line = _one_error_line(capsys, "stage2-refine")
    assert f"model {DEFAULT_USER}/nothing: not a local folder" in line and "RepositoryNotFoundError" in line
    assert not (tmp_path / "out").exists()


def test_refine_exits_1_when_the_hub_cannot_be_reached(dead_hub, sample_tiles_dir, tmp_path, capsys):
    from inference_stage2.cli import main

    tile = next((sample_tiles_dir / "val").glob("*.npz"))
    argv = ["--model", f"{DEFAULT_USER}/demo", "--input", str(tile), "--output_dir", str(tmp_path / "out"),
            "--no_progress"]
    assert main(argv) == 1
    line = _one_error_line(capsys, "stage2-refine")
    assert f"model {DEFAULT_USER}/demo: not a local folder" in line and "ConnectError" in line
    assert not (tmp_path / "out").exists()


def _evaluate_argv(model: str, dataset) -> list[str]:
    return ["--model", model, "--data", str(dataset), "--max_samples", "1", "--no-baselines", "--bootstrap", "0",
            "--device", "cpu"]


def test_evaluate_exits_2_for_a_hub_model_that_does_not_exist(hub_server, sample_dataset_dir, capsys):
    from training.evaluate import main

    assert main(_evaluate_argv(f"{DEFAULT_USER}/nothing", sample_dataset_dir)) == 2
    line = _one_error_line(capsys, "stage2-evaluate")
    assert f"--model {DEFAULT_USER}/nothing: not a local folder, and downloading it from the Hub failed " \
        "(RepositoryNotFoundError" in line


def test_evaluate_exits_1_when_the_hub_cannot_be_reached(dead_hub, sample_dataset_dir, capsys):
    from training.evaluate import main

    assert main(_evaluate_argv(f"{DEFAULT_USER}/demo", sample_dataset_dir)) == 1
    line = _one_error_line(capsys, "stage2-evaluate")
    assert f"--model {DEFAULT_USER}/demo: not a local folder, and downloading it from the Hub failed (" in line
    assert "ConnectError" in line


def test_convert_exits_2_for_a_hub_checkpoint_that_does_not_exist(hub_server, tmp_path, capsys):
    from huggingface_hub import HfApi

    from modeling_stage2.convert_prithvi import main

    HfApi().create_repo(REPO)
    for checkpoint, reason in ((f"hf://{DEFAULT_USER}/nothing/Prithvi_EO_V2_tiny.pt", "RepositoryNotFoundError"),
                               (f"hf://{REPO}/Prithvi_EO_V2_tiny.pt", "RemoteEntryNotFoundError")):
        status = main([checkpoint, str(tmp_path / "out")])
        assert status == 2
        line = _one_error_line(capsys, "stage2-convert-prithvi")
        assert f"{checkpoint}: downloading it from the Hub failed ({reason}" in line
        assert not (tmp_path / "out").exists()


def test_convert_exits_1_when_the_hub_cannot_be_reached(dead_hub, tmp_path, capsys):
    from modeling_stage2.convert_prithvi import main

    checkpoint = f"hf://{DEFAULT_USER}/Prithvi-EO-2.0-tiny/Prithvi_EO_V2_tiny.pt"
    status = main([checkpoint, str(tmp_path / "out")])
    assert status == 1
    line = _one_error_line(capsys, "stage2-convert-prithvi")
    assert f"{checkpoint}: downloading it from the Hub failed (" in line and "ConnectError" in line
    assert not (tmp_path / "out").exists()
