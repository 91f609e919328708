"""Hugging Face Hub names and downloads: the one rule for "is this a repo id" and the one way models are fetched.

    download_model_folder("me/stage2-refiner", revision="v1.0")   # a local snapshot of what a model needs

A model folder is downloaded with `snapshot_download` restricted to `MODEL_FILE_PATTERNS` (configs, safetensors
weights, the card, the preview, the modeling code of `trust_remote_code` repos, exported graphs), so a repo that
also holds checkpoints, datasets or pickles costs no more than the model, and a pickle is never fetched.
"""
from __future__ import annotations

import re
from pathlib import Path

HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""OWNER/NAME as the Hub spells it (the name part may hold dots and dashes, never a second slash)."""

MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.md", "*.png", "*.py", "*.onnx", "*.onnx.data", "*.pt2")
"""What a Stage 2 model repo needs: configs and records (json), weights (safetensors), the card (md), the preview,
modeling code (`--include_code`), exported graphs (`stage2-export`). Never `*.bin` / `*.pt` pickles."""


def is_hub_repo_id(text: str) -> bool:
    """True for `OWNER/NAME` (not for paths such as `./x/y`, `/abs/y` or `a/b/c`)."""
    return HUB_REPO_ID.fullmatch(str(text)) is not None


def local_revision_problem(model: str | Path, revision: str | None) -> str | None:
    """Why `revision` cannot apply to `model`: a local path (read as it is, so the revision would be silently
    ignored); None when it can, or none is asked."""
    if revision is not None and Path(str(model)).expanduser().exists():
        return f"{model} is a local path, read as it is; a revision applies to a Hub repo id: leave it out"
    return None


def download_model_folder(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
                          allow_patterns=MODEL_FILE_PATTERNS) -> Path:
    """A local snapshot (the Hub cache) of the model repo `repo_id` at `revision` (branch, tag or commit; default
    the main branch), holding only the files matching `allow_patterns`. Raises `ValueError` for a name that is not
    a repo id; the Hub's own errors (offline, missing repo, auth) pass through."""
    if not is_hub_repo_id(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id OWNER/NAME.")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                                  allow_patterns=list(allow_patterns)))


__all__ = ["HUB_REPO_ID", "MODEL_FILE_PATTERNS", "download_model_folder", "is_hub_repo_id", "local_revision_problem"]
