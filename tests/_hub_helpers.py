"""pytest fixtures for tests that talk to a Hugging Face Hub: a loopback one (tests/hub_server.py).

Use in a test module:

    from _hub_helpers import hub_server  # noqa: F401  (the fixture; pytest puts tests/ on sys.path)

    def test_push_and_pull(hub_server, tmp_path):
        from huggingface_hub import HfApi, hf_hub_download
        HfApi().create_repo("loopback-user/demo")            # endpoint and token already set
        ...
        hf_hub_download("loopback-user/demo", "config.json")  # cached under this test's HF_HOME

`hub_server` yields a started `LoopbackHub` (attributes `url`, `token`, `user`, `requests`,
`count(method, path_contains)`, `unknown_routes`) and, for the test's duration, points every
client at it: `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_DISABLE_XET=1`, an empty `HF_HOME` (hub cache,
`modules` for trust_remote_code, `datasets` cache) under the test's tmp_path, in the environment
(so subprocesses inherit them) and patched into the modules that read them at import
(`huggingface_hub.constants`, the global `HfApi`, `transformers`, `datasets`). Nothing leaves
127.0.0.1. Repos go under `hub_server.user` (`loopback-user`): `f"{hub_server.user}/name"`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hub_server import DEFAULT_TOKEN, DEFAULT_USER, LoopbackHub

__all__ = ["hub_server", "configure_hub_client", "publish_tiny_prithvi", "LoopbackHub", "DEFAULT_TOKEN",
           "DEFAULT_USER"]


WITHOUT_PROJECT_PACKAGES = """
import sys
OURS = ("modeling_stage2", "training", "data_builders", "model_cards")

class BlockProjectPackages:  # the editable install would otherwise find the package
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OURS:
            raise ModuleNotFoundError(f"{name} is blocked in this test")

sys.meta_path.insert(0, BlockProjectPackages())
sys.path = [p for p in sys.path if p not in ("", sys.argv[-1])]  # the checkout: the script's last argument
"""
"""The start of a script run as a Hub user without the package (`python -c SCRIPT ... REPO_ROOT`): importing any of
the project's packages fails."""


def configure_hub_client(monkeypatch: pytest.MonkeyPatch, endpoint: str, token: str, hf_home: Path) -> dict:
    """Point huggingface_hub / transformers / datasets at `endpoint` with `token` and a private HF_HOME.

    Returns the environment variables it set (handy for a subprocess: `env={**os.environ}` already
    carries them, since they are set with `monkeypatch.setenv`).
    """
    hf_home = Path(hf_home)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": token,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_MODULES_CACHE": str(hf_home / "modules"),
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_CO_STAGING", raising=False)

    # Modules imported before this point read the old values at import time: patch them.
    from huggingface_hub import constants, hf_api

    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
        "HUGGINGFACE_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
        "HF_XET_CACHE": env["HF_XET_CACHE"],
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    cache_manager = sys.modules.get("huggingface_hub.utils._cache_manager")
    if cache_manager is not None:
        monkeypatch.setattr(cache_manager, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    _clear_hf_file_system_cache()

    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):  # its shared HfApi (`push_to_hub`) keeps
        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # the endpoint it was made with: an earlier server's
    for module_name in ("transformers.utils.hub", "transformers.dynamic_module_utils", "transformers.utils"):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "HF_MODULES_CACHE"):
            monkeypatch.setattr(module, "HF_MODULES_CACHE", env["HF_MODULES_CACHE"])
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        for name, value in {
            "HF_ENDPOINT": endpoint,
            "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_CACHE_HOME": str(hf_home),
            "HF_DATASETS_CACHE": Path(env["HF_DATASETS_CACHE"]),
            "HF_MODULES_CACHE": Path(env["HF_MODULES_CACHE"]),
            "DOWNLOADED_DATASETS_PATH": Path(env["HF_DATASETS_CACHE"]) / "downloads",
            "EXTRACTED_DATASETS_PATH": Path(env["HF_DATASETS_CACHE"]) / "downloads" / "extracted",
            "HF_HUB_OFFLINE": False,
            "HF_UPDATE_DOWNLOAD_COUNTS": False,
            "USE_PARQUET_EXPORT": False,  # the parquet export lives on another server (datasets-server)
        }.items():
            if hasattr(datasets_config, name):
                monkeypatch.setattr(datasets_config, name, value)
    return env


def _clear_hf_file_system_cache() -> None:
    """fsspec caches `HfFileSystem` instances (with their endpoint and listings) per process."""
    module = sys.modules.get("huggingface_hub.hf_file_system")
    if module is not None:
        module.HfFileSystem.clear_instance_cache()


@pytest.fixture
def hub_server(tmp_path_factory, monkeypatch):
    """A started loopback Hub with every Hugging Face client pointed at it (see module docstring)."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    with LoopbackHub(token=DEFAULT_TOKEN, user=DEFAULT_USER) as hub:
        configure_hub_client(monkeypatch, hub.url, hub.token, hf_home)
        yield hub
    _clear_hf_file_system_cache()


def publish_tiny_prithvi(repo_id: str, folder: Path, seed: int) -> str:
    """Commit an official-layout `Prithvi_EO_V2_tiny.pt` (random weights drawn from `seed`, written in `folder`) to
    `repo_id` on the loopback Hub, creating the repo if needed; returns the new commit."""
    from huggingface_hub import HfApi

    from _prithvi_helpers import write_official_checkpoint
    from modeling_stage2 import PrithviConfig

    checkpoint = Path(folder) / "Prithvi_EO_V2_tiny.pt"
    write_official_checkpoint(checkpoint, PrithviConfig.from_preset("prithvi_eo_v2_tiny"), seed=seed)
    HfApi().create_repo(repo_id, exist_ok=True)
    HfApi().upload_file(path_or_fileobj=str(checkpoint), path_in_repo=checkpoint.name, repo_id=repo_id)
    return HfApi().model_info(repo_id).sha
