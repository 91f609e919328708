"""Loading a refiner for inference: local folders, Hub repo ids (at a revision) and `stage2-export` outputs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from modeling_stage2.hub import (
    HubUnavailableError, download_failure, download_model_folder, hub_download_errors, hub_failure_is_users,
    hub_failure_line, hub_snapshot_paths_named, is_hub_repo_id, local_revision_problem,
)
from modeling_stage2.vocabulary import QUANTIZATIONS

from .values import InferenceInputError


_MODEL_FILES = ("config.json", "adapter_config.json")


def load_model(
    model_name_or_path: str | os.PathLike,
    *,
    quantization: str = "none",
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> Any:
    """A trained refiner in eval mode from a local folder or a Hub repo id (at `revision`: a branch, tag or commit),
    or an exported one.

    The folder is either a full model (`save_pretrained`: config.json + model.safetensors) or a trained
    adapter folder written by `save_trained_model` (adapter_config.json + adapter weights); both go
    through `modeling_stage2.adapters.load_trained_model`. A name that is not a local path and looks
    like `owner/name` is downloaded from the Hub first (cached). A folder written by `stage2-export` (or its
    `model.onnx` / `model.pt2`) gives a `modeling_stage2.onnx_runtime.ExportedRefiner` with the same call contract,
    running on ONNX Runtime (or torch for `.pt2`).

    Raises `InferenceInputError` for a model that cannot be used (no such folder or Hub repo, a damaged folder) or a
    `quantization` that is not one of `QUANTIZATIONS` (before anything is read or downloaded), and
    `modeling_stage2.hub.HubUnavailableError` when a Hub download failed for a reason that is not the name's (the
    Hub out of reach, nothing cached).
    """
    if quantization not in QUANTIZATIONS:  # said before a Hub repo is downloaded, and not blamed on the model
        raise InferenceInputError(f"quantization={quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    name = str(model_name_or_path)
    path = Path(name).expanduser()
    problem = local_revision_problem(name, revision)
    if problem is not None:  # it would be ignored
        raise InferenceInputError(f"revision={revision!r}: {problem}")
    from modeling_stage2.onnx_runtime import is_exported_model

    if is_exported_model(path):  # a stage2-export folder or a .onnx / .pt2 file: same call contract
        return _load_exported(path, quantization, device)
    if path.exists():
        folder = path
    elif is_hub_repo_id(name):
        folder = _download_model(name, revision)
    else:
        raise InferenceInputError(
            f"model {name}: no such folder; pass a folder written by save_pretrained/save_trained_model "
            "or a Hub repo id (owner/name)"
        )

    def named(message: str) -> str:  # a Hub model (or base) by its repo id and its files, not the Hub cache's path
        return hub_snapshot_paths_named(message, name, revision)

    if not folder.is_dir():
        raise InferenceInputError(
            f"model {folder}: is a file; pass the folder that holds config.json (a full model) or "
            "adapter_config.json (a trained adapter)"
        )
    if not any((folder / file).is_file() for file in _MODEL_FILES):
        raise InferenceInputError(named(
            f"model {folder}: has neither config.json (a full model) nor adapter_config.json (a trained "
            "adapter); is it the right folder (e.g. the run's best/)?"
        ))
    from modeling_stage2.adapters import load_trained_model

    try:
        model = load_trained_model(str(folder), quantization=quantization, device=device)
    except hub_download_errors() as error:  # an adapter's base on the Hub (a refiner or the backbone's checkpoint)
        raise _download_failure(named(f"model {folder}: {download_failure(folder)}"), error) from error
    except (OSError, ValueError) as error:  # missing or corrupt weight files, a foreign config
        raise InferenceInputError(named(f"model {folder}: could not be loaded ({type(error).__name__}: {error})")) \
            from error
    return model.eval()


def _load_exported(path: Path, quantization: str, device: str | torch.device | None) -> Any:
    """An `ExportedRefiner` (ONNX Runtime or torch.export) for a `stage2-export` folder or graph file."""
    from modeling_stage2.onnx_runtime import load_exported

    if quantization != "none":
        raise InferenceInputError(
            f"model {path}: an exported model has its weights fixed at export; drop --quantization {quantization}"
        )
    try:
        return load_exported(path, device=device)
    except Exception as error:  # missing files, no onnxruntime, ONNX Runtime's own errors on a corrupt graph
        raise InferenceInputError(f"model {path}: could not be loaded ({type(error).__name__}: {error})") from error


def _download_model(repo_id: str, revision: str | None = None) -> Path:
    """The repo's snapshot; `InferenceInputError` when the name is the problem (no such repo or revision, no access),
    `HubUnavailableError` when the Hub or the system is (no connection, a timeout, the Hub failing, a full disk)."""
    try:
        return download_model_folder(repo_id, revision=revision)
    except Exception as error:
        raise _download_failure(f"model {repo_id}: {download_failure(repo_id)}", error) from error


def _download_failure(what: str, error: Exception) -> Exception:
    """`what` and the Hub's `error` on one line: an `InferenceInputError` when the name is the problem,
    a `HubUnavailableError` when the Hub or the system is."""
    message = f"{what} ({hub_failure_line(error)})"
    return InferenceInputError(message) if hub_failure_is_users(error) else HubUnavailableError(message)
