"""Hugging Face Hub names and downloads: the one rule for "is this a repo id" and the one way models are fetched.

    download_model_folder("me/stage2-refiner", revision="v1.0")   # a local snapshot of what a model needs

A model folder is downloaded with `snapshot_download` restricted to the repo's top-level files matching
`MODEL_FILE_PATTERNS` (configs, safetensors weights, the card, the preview, the modeling code of `trust_remote_code`
repos, exported graphs), so a repo that also holds checkpoints, datasets or pickles costs no more than the model, and
a pickle is never fetched. Subfolders are not the model's (`SUBFOLDER_FILES`): the `stage2-export` folder that
`stage2-push` sends along (`onnx/`, gigabytes for the 600M refiner) is downloaded on its own, when asked for
(`snapshot_download(repo_id, allow_patterns=["onnx/*"])`, docs/sharing.md).

A download that fails is the user's (`hub_failure_is_users`: no such repo, revision or file, or a private or gated
repo without access; a command exits 2) or the system's (no connection, a timeout, the Hub failing, outgoing traffic
off with nothing cached; exit 1, `HubUnavailableError`). `hub_download_errors()` are the types a download raises.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""OWNER/NAME as the Hub spells it (the name part may hold dots and dashes, never a second slash)."""

MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.md", "*.png", "*.py", "*.onnx", "*.onnx.data", "*.pt2")
"""What a Stage 2 model repo needs: configs and records (json), weights (safetensors), the card (md), the preview,
modeling code (`--include_code`), exported graphs (`stage2-export`). Never `*.bin` / `*.pt` pickles. Matched in the
repo's top level only (`SUBFOLDER_FILES`)."""

SUBFOLDER_FILES = "*/*"
"""The files in a repo's subfolders (a `snapshot_download` pattern: `*` matches `/` too), which a model's download
leaves out: what a Stage 2 model needs is in the repo's top level, and a subfolder holds something else (a
`stage2-export` folder such as `onnx/`, its graph as large as the weights)."""


DOWNLOAD_FAILED = "downloading it from the Hub failed"
"""What a command's one line says of a failed download, before the Hub's reason (`hub_failure_line`)."""


def download_failure(name: str | os.PathLike) -> str:
    """How a command's line begins when downloading the model `name` (a repo id) failed, before the Hub's reason:
    saying first that no local folder has the name, since `OWNER/NAME` is a relative path too and a mistyped local
    path (`run1/bestx` for `run1/best`) is taken for a repo id, and where `OWNER` is a local folder, what it holds
    (`not a local folder (run1/ holds best, logs)`); a local folder's failure is its base's download."""
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # `~nosuchuser/x`: no such home folder, so no local folder either
        path = Path(name)
    if path.is_dir():
        return "downloading its base from the Hub failed"
    return f"not a local folder{_local_folder_holds(path.parent)}, and {DOWNLOAD_FAILED}"


def _local_folder_holds(folder: Path, shown: int = 5) -> str:
    """` (FOLDER/ holds A, B ...)`: the folders in `folder` (not hidden), where it is a local folder beside the one
    asked for; "" otherwise."""
    if folder in (Path(""), Path(".")) or not folder.is_dir():
        return ""
    try:
        names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    except OSError:
        return ""
    held = ", ".join(names[:shown]) + (" ..." if len(names) > shown else "") if names else "no folder"
    return f" ({os.path.join(folder, '')} holds {held})"  # `runs/`, and `/` for the root, not `//`


def hub_snapshot_paths_named(message: str, repo_id: str, revision: str | None = None,
                             cache_dir: str | os.PathLike | None = None) -> str:
    """`message` with each path into a Hub cache snapshot (`CACHE/models--OWNER--NAME/snapshots/COMMIT[/FILE]`, a path
    the user never typed) written as the model was named: `OWNER/NAME[/FILE]`, and `REPO_ID@REVISION[/FILE]` for the
    repo `repo_id` when a `revision` was asked. For an error about a downloaded model's content (truncated weights,
    another model's config) raised with its snapshot's path; other repos' snapshots (an adapter's base) are named by
    their repo id. `cache_dir` is the cache the download used (default the Hub cache, `HF_HUB_CACHE`)."""
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = constants.HF_HUB_CACHE
    folders = re.escape(os.path.join(str(cache_dir), "models--"))
    snapshot = re.compile(folders + r"([^/\\\s]+?)--([^/\\\s]+)[/\\]snapshots[/\\][0-9a-f]+")

    def named(match: re.Match) -> str:
        name = f"{match[1]}/{match[2]}"  # the Hub allows no "--" in a repo id: the folder's name reads one way
        return f"{name}@{revision}" if revision is not None and name == repo_id else name

    return snapshot.sub(named, message)


def is_hub_repo_id(text: str) -> bool:
    """True for `OWNER/NAME` (not for paths such as `./x/y`, `/abs/y` or `a/b/c`)."""
    return HUB_REPO_ID.fullmatch(str(text)) is not None


def local_revision_problem(model: str | Path, revision: str | None) -> str | None:
    """Why `revision` cannot apply to `model`: a local path (read as it is, so the revision would be silently
    ignored); None when it can, or none is asked."""
    if revision is not None and Path(str(model)).expanduser().exists():
        return f"{model} is a local path, read as it is; a revision applies to a Hub repo id: leave it out"
    return None


class HubUnavailableError(OSError):
    """A Hub download failed for a reason that is not the user's (`hub_failure_is_users` is False for its cause): the
    Hub could not be reached, timed out or failed, or outgoing traffic is off, and nothing usable is cached. A command
    exits 1 on it (2 is for a name that does not exist or cannot be read with this token)."""


_USERS_STATUS_CODES = (401, 403, 404)  # unauthorised, forbidden (private or gated), not found


def hub_download_errors() -> tuple[type[BaseException], ...]:
    """The types a Hub download raises for a failed download: the Hub's HTTP errors and those of no answer at all
    (`huggingface_hub.errors.HTTPError`: connection, timeout, proxy), an entry missing on the Hub or, with the Hub out
    of reach, from the cache (`EntryNotFoundError`), and `OfflineModeIsEnabled`. A function, so that an `except`
    clause naming it imports `huggingface_hub` only when something was raised."""
    from huggingface_hub.errors import EntryNotFoundError, HTTPError, OfflineModeIsEnabled

    return HTTPError, EntryNotFoundError, OfflineModeIsEnabled


def hub_failure_is_users(error: BaseException) -> bool:
    """Whether a failed Hub download is the user's: a repo, revision or file that does not exist, or a private or
    gated repo this token cannot read (HTTP 401, 403, 404). False for everything else, the system's: no connection, a
    timeout, the Hub failing (5xx), `OfflineModeIsEnabled`, and a `LocalEntryNotFoundError` (nothing in the cache)
    unless the Hub's own refusal is its cause (`snapshot_download` wraps some 403s so)."""
    from huggingface_hub.errors import (
        DisabledRepoError, EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
        RepositoryNotFoundError, RevisionNotFoundError,
    )

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, LocalEntryNotFoundError):  # not in the cache: why the Hub was not asked is its cause
            error = error.__cause__
        elif isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, DisabledRepoError,
                                HFValidationError)):  # RepositoryNotFoundError includes GatedRepoError
            return True
        elif isinstance(error, HfHubHTTPError):
            response = getattr(error, "response", None)
            return getattr(response, "status_code", None) in _USERS_STATUS_CODES
        else:
            return False
    return False


def hub_failure_line(error: BaseException) -> str:
    """A failed download's error on one line, `Type: message` (the Hub's errors spread their reason over lines), with
    its cause when the message does not name it (`hf_hub_download` leaves the connection error out)."""
    line = f"{type(error).__name__}: {' '.join(str(error).split())}"
    cause = error.__cause__
    if cause is not None and type(cause).__name__ not in line:
        line += f" ({type(cause).__name__}: {' '.join(str(cause).split())})"
    return line


def download_model_folder(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
                          allow_patterns=MODEL_FILE_PATTERNS, ignore_patterns=(SUBFOLDER_FILES,)) -> Path:
    """A local snapshot (the Hub cache) of the model repo `repo_id` at `revision` (branch, tag or commit; default
    the main branch), holding only the files matching `allow_patterns` and none matching `ignore_patterns` (by
    default the repo's top-level files: no subfolder, such as an export's `onnx/`). Raises `ValueError` for a name
    that is not a repo id; the Hub's own errors (offline, missing repo, auth) pass through."""
    if not is_hub_repo_id(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id OWNER/NAME.")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                                  allow_patterns=list(allow_patterns), ignore_patterns=list(ignore_patterns)))


__all__ = ["DOWNLOAD_FAILED", "HUB_REPO_ID", "MODEL_FILE_PATTERNS", "SUBFOLDER_FILES", "HubUnavailableError",
           "download_failure", "download_model_folder", "hub_download_errors", "hub_failure_is_users",
           "hub_failure_line", "hub_snapshot_paths_named", "is_hub_repo_id", "local_revision_problem"]
