"""The Arrow conversion of a folder of NPZ tiles, cached under a key of what it was built from: the tiles' (and
Stage 1 files') names, sizes and modification times and the build options. Shared by `stage2-train` and
`stage2-evaluate`, which convert NPZ tiles on first use."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ._leaves import model_leaf
from .discovery import split_folder_problem

_files = model_leaf("_files")  # `is_hidden`, the one rule of which names are never read

ARROW_MARKER = "dataset_dict.json"
"""The file `DatasetDict.save_to_disk` writes at the top of a saved dataset
(`datasets.config.DATASETDICT_JSON_FILENAME`, restated so that reading a path does not import datasets, ~1 s; a test
holds the two equal)."""
_CACHE_FORMAT_VERSION = 1


def is_arrow_dataset(path: str | os.PathLike) -> bool:
    return (Path(path) / ARROW_MARKER).is_file()


DATASET_STATE = "state.json"
"""The file `Dataset.save_to_disk` writes in each split's folder; its `_data_files` lists the split's Arrow files
(`datasets.config.DATASET_STATE_JSON_FILENAME`, restated as `ARROW_MARKER` is)."""


DATASET_INFO = "dataset_info.json"
"""The file `Dataset.save_to_disk` writes beside `DATASET_STATE`: the split's features
(`datasets.config.DATASET_INFO_FILENAME`, restated as `ARROW_MARKER` is)."""


def _json_object_problem(file: Path) -> str | None:
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{file}: missing"
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"{file}: not readable JSON ({error})"
    return None if isinstance(record, dict) else f"{file}: not a JSON object"


def record_problem(path: str | os.PathLike) -> str | None:
    """Why the saved dataset at `path` cannot be loaded because a record `datasets.load_from_disk` reads (the top
    `dataset_dict.json`, each split's `state.json` and `dataset_info.json`) is missing or no JSON object (an
    interrupted copy, an edit gone wrong), which it fails on with a traceback: one line naming the first such file;
    None where every record reads, or where `path` is no saved dataset (the caller's own error says so)."""
    path = Path(path)
    if is_arrow_dataset(path):
        problem = _json_object_problem(path / ARROW_MARKER)
        splits = None if problem else json.loads((path / ARROW_MARKER).read_text(encoding="utf-8")).get("splits")
        if not problem and not (isinstance(splits, list) and all(isinstance(split, str) for split in splits)):
            problem = f"{path / ARROW_MARKER}: 'splits' is not a list of split names"
        folders = [] if problem else [path / split for split in splits]
    elif (path / DATASET_STATE).is_file() or (path / DATASET_INFO).is_file():
        problem, folders = None, [path]
    else:
        return None
    for folder in folders:
        problem = problem or _json_object_problem(folder / DATASET_STATE) or _json_object_problem(folder / DATASET_INFO)
    return problem and f"{problem}; build or copy the dataset again"


def empty_split_problem(path: str | os.PathLike) -> str | None:
    """Why the saved dataset at `path` cannot be loaded because a split of it holds no row (saved without an Arrow
    file, which `datasets.load_from_disk` fails on with an IndexError): one line naming the first such split; None
    where every split has a data file, or where `path` is no saved dataset (the caller's own error says so)."""
    path = Path(path)
    try:
        splits = json.loads((path / ARROW_MARKER).read_text())["splits"] if is_arrow_dataset(path) else [None]
        for split in splits:
            state = json.loads((path / split / DATASET_STATE if split else path / DATASET_STATE).read_text())
            if state.get("_data_files") == []:
                fix = "; save the DatasetDict again without it" if split else ""
                return (f"{path}: {f'split {split!r}' if split else 'the saved dataset'} is empty (no row, no data "
                        f"file), which datasets cannot load{fix}")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # unreadable records: not this problem
        return None
    return None


ARROW_STREAM_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"
"""The end-of-stream marker that closes every Arrow IPC stream pyarrow writes (a saved dataset's `.arrow` files are
streams): a file cut short at a record batch's boundary reads without an error, with fewer rows, but lacks it."""


def damaged_file_problem(path: str | os.PathLike) -> str | None:
    """Why the saved dataset at `path` cannot be read whole: an Arrow file a split lists (its `state.json`) is missing,
    or damaged or cut short (an interrupted copy), which `datasets.load_from_disk` fails on deep inside pyarrow, or
    loads with rows missing. One line naming the first such file; None where every file is whole, or where `path` is
    no saved dataset (the caller's own error says so). Reads no row: the stream's messages over a memory map (their
    headers; the bodies are not touched), which must end where the file does, and its last 8 bytes, the end-of-stream
    marker."""
    import pyarrow as pa

    path = Path(path)
    try:
        splits = json.loads((path / ARROW_MARKER).read_text())["splits"] if is_arrow_dataset(path) else [None]
        folders = [path / split if split else path for split in splits]
        files = [(folder, folder / entry["filename"]) for folder in folders
                 for entry in json.loads((folder / DATASET_STATE).read_text()).get("_data_files") or []]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # unreadable records: not this problem
        return None
    for folder, file in files:
        if not file.is_file():
            return f"{file}: missing (listed in {folder / DATASET_STATE}); build or copy the dataset again"
        try:
            with pa.memory_map(str(file)) as source:
                for _ in pa.ipc.open_stream(source):  # zero-copy: each record batch's header only
                    pass
                if source.tell() != source.size():  # zeros where a message should begin read as the stream's end
                    raise ValueError(f"the stream ends at byte {source.tell()} of {source.size()}")
            with open(file, "rb") as stream:
                stream.seek(max(file.stat().st_size - len(ARROW_STREAM_END), 0))
                if stream.read() != ARROW_STREAM_END:
                    raise ValueError("no end-of-stream marker")
        except (OSError, ValueError, pa.ArrowException) as error:
            return f"{file}: damaged or cut short ({error}); build or copy the dataset again"
    return None


def saved_dataset_problem(path: str | os.PathLike) -> str | None:
    """Why the saved dataset at `path` cannot be loaded (`record_problem`, `empty_split_problem`,
    `damaged_file_problem`): one line; None where it can, or where `path` is no saved dataset. What `stage2-train`,
    `stage2-evaluate` and `stage2-inspect` check before they load one."""
    return record_problem(path) or empty_split_problem(path) or damaged_file_problem(path)


def _files_read(folder: Path, tiles: bool) -> list[Path]:
    """The files a build reads in `folder`: the tiles and sidecars of its split folders (`tiles`, the discovery's
    rule: symlinked ones too), or its Stage 1 files. Nothing else under it counts: a run or its cache kept inside the
    data folder would change the key at every conversion. Hidden files are never read (`_files.is_hidden`). An NPZ
    in a folder nested in a split folder, or directly in the data folder, is not read but rejected by name:
    `_files_rejected_unread`."""
    from .discovery import _split_folders

    try:
        folders = [path for _, path in _split_folders(folder)] if tiles else [folder] if folder.is_dir() else []
    except FileNotFoundError:  # no split folder: no tiles
        folders = []
    return sorted(path for each in folders for path in each.iterdir()
                  if path.suffix in (".npz", ".json") and not _files.is_hidden(path))


def _files_rejected_unread(folder: Path) -> list[Path]:
    """The NPZ files of the data folder `folder` that a build rejects by name without reading them (in a folder
    nested in a split folder, or directly in `folder`): they add no row, but the conversion's `rejected.jsonl` lists
    them, so adding or removing one makes a new key (the cached list would go stale)."""
    from .discovery import _nested_tiles, _root_tiles, _split_folders

    try:
        folders = [path for _, path in _split_folders(folder)]
    except FileNotFoundError:  # no split folder: no tiles
        return []
    searched = {each.resolve() for each in folders}
    return sorted([path for each in folders for path in _nested_tiles(each, searched)] + _root_tiles(folder, None))


def _fingerprint(folder: Path, paths: list[Path], digest) -> int:
    """The names, sizes and modification times of `paths` (relative to `folder`) into `digest`; the NPZ count."""
    count = 0
    for path in paths:
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count += path.suffix == ".npz"
    return count


def _tree_fingerprint(folder: Path, digest, tiles: bool = True) -> int:
    """The fingerprint of what a build reads in `folder` (`_files_read`) and, for tiles, of what it rejects unread;
    the count of NPZ files it reads."""
    count = _fingerprint(folder, _files_read(folder, tiles), digest)
    rejected = _files_rejected_unread(folder) if tiles else []
    if rejected:  # none: the key folders without them always had
        digest.update(b"rejected unread\n")
        _fingerprint(folder, rejected, digest)
    return count


def dataset_cache_key(data_dir: str | os.PathLike, stage1_dir=None, input_mode: str | None = None,
                      seed: int = 0, degradation: str = "mild", *, flag: str = "--data_dir") -> str:
    """Key of a converted dataset: the tiles' (and Stage 1 files') names, sizes and modification times, and the
    build options (with the degradation preset, `DEGRADATION_CHOICES`, and `DEGRADATION_VERSION`). Any change to the
    tiles makes a new key (and a new conversion). `"mild"` keeps the key it had before presets existed (its opt_v1 is
    unchanged), and version 1 the key it had before the version counted. A folder without tiles is a
    FileNotFoundError naming the command's `flag` (and, for a split folder, the folder to give instead)."""
    from . import degrade

    if degradation not in degrade.DEGRADATION_CHOICES:
        raise ValueError(f"degradation must be one of {degrade.DEGRADATION_CHOICES}, got {degradation!r}.")
    digest = hashlib.sha256(f"v{_CACHE_FORMAT_VERSION}\0{input_mode}\0{seed}\n".encode())
    if degradation != "mild":
        digest.update(f"degradation\0{degradation}\n".encode())
    if degrade.DEGRADATION_VERSION != 1:  # another synthetic opt_v1 (version 1 keeps the keys made before it counted)
        digest.update(f"degradation_version\0{degrade.DEGRADATION_VERSION}\n".encode())
    if _tree_fingerprint(Path(data_dir), digest) == 0:
        raise FileNotFoundError(split_folder_problem(data_dir, flag) or (
            f"{flag} {data_dir}: no NPZ tiles ({{train,val,test}}/*.npz) and no saved Arrow dataset "
            f"({ARROW_MARKER}) there."))
    if stage1_dir is not None:
        digest.update(b"stage1\n")
        _tree_fingerprint(Path(stage1_dir), digest, tiles=False)
    return digest.hexdigest()[:16]
