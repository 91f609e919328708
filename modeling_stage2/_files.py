"""Writing files and replacing folders so that a failed, interrupted or killed save never leaves a half-written one,
nor loses the old one: the one implementation of the project's atomic writes.

A file is written under a temporary name beside it and renamed over it when complete (`atomic_file`, `write_text`,
`write_json`).

A folder is replaced in two renames: the old one is set aside beside it as `.NAME.previous-PID-RANDOM`, the new one is
moved in, then the old one is deleted. A process killed between the two renames leaves no `NAME` and the old content
set aside; the next replacement of `NAME` (or a call of `restore_set_aside`) moves it back before anything else, and
deletes a set-aside folder only once `NAME` exists again (the kill came after the second rename).

What a rename moves in is flushed to the disk first, and the folder holding it after (`fsync`): a machine that loses
power after a save keeps the old content or the new one, never a new name over data that was still in memory (except
writers of one file per tile, which pass `atomic_file(durable=False)`).
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

SET_ASIDE_MARKER = ".previous-"
STAGING_MARKER = ".tmp-"
PARTIAL_MARKER = ".partial-"  # a file being written (`partial_path`)


def is_hidden(name: str | os.PathLike) -> bool:
    """Whether a file or folder named `name` (a name, or a path: its last part) is hidden, a name starting with '.':
    never read as an input (tile, sidecar, folder of tiles). The files this project writes are hidden until complete
    (`partial_path`: an interrupted write's partial file may be cut short, or whole under another name), macOS writes
    `._NAME` AppleDouble files beside the real ones, and Jupyter's `.ipynb_checkpoints/` holds copies of the tiles.
    The one rule of the tile discovery, the dataset cache key and stage2-refine's search of a folder of tiles."""
    return os.path.basename(os.fspath(name)).startswith(".")


# What an OSError says of the machine rather than of the input: a full disk or quota, a file past the file system's
# or the process's size limit, an I/O error, no memory. A command exits 1 on them (a failure that is not the input's),
# 2 on the others it names (a missing or unreadable file).
SYSTEM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.ENOMEM})


def is_system_failure(error: BaseException) -> bool:
    """Whether `error` is a failure of the machine, not of the input: an OSError of `SYSTEM_ERRNOS`, or a worker
    process that died (`ChildProcessError`, killed by the OOM killer). Every command exits 1 for these, 2 for the
    rest (no permission, a read-only or missing folder: what the user can mend)."""
    return isinstance(error, ChildProcessError) or (isinstance(error, OSError) and error.errno in SYSTEM_ERRNOS)


def process_alive(pid: int) -> bool:
    """True when a process `pid` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


# What fsync answers on a file system that cannot flush that kind of file: nothing to flush, not data lost.
_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})


def _fsync(path: Path, *, folder: bool = False) -> None:
    """Flush `path` to the disk. A file whose flush fails raises (its data may not be there); one that cannot be
    opened, or a folder that cannot be opened or flushed (some file systems refuse), is left as the file system
    keeps it: nothing is lost that was not already at its mercy."""
    try:
        descriptor = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if not folder and error.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(descriptor)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush `folder`'s entries (a rename just made in it) to the disk, where the file system can."""
    _fsync(Path(folder), folder=True)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush `root` to the disk: a file, or every file and folder under a folder (itself included; links are not
    followed). What a rename or a completion marker is about to vouch for."""
    root = Path(root)
    if root.is_symlink() or not root.exists():
        return
    if not root.is_dir():
        _fsync(root)
        return
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                _fsync(path)
        fsync_folder(folder)


def _set_aside_path(output_dir: Path) -> Path:
    # the owner's pid in the name: a later process can tell a swap in progress from one that was killed
    return output_dir.parent / f".{output_dir.name}{SET_ASIDE_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _owner(path: Path, marker: str) -> int | None:
    try:
        return int(path.name.rsplit(marker, 1)[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _abandoned(output_dir: Path, marker: str, folders: bool = True, nested: bool = False) -> list[Path]:
    """Folders (`folders=False`: files) `.NAME<marker>PID-...` of `output_dir` whose owner process is gone: what a
    killed save left. (This process's own are a save in progress in another thread: a failed one cleans up after
    itself.) `nested`: also `..NAME<marker>PID-....<marker>...`, what a save staged inside a staged save (a model
    saved into `best/`'s staging folder) left beside it once the outer one was gone."""
    found = []
    # the name escaped: as a pattern, `ds[1]` would match what a killed save of `ds1` left, and never its own
    pattern = f"{'.*' if nested else '.'}{glob.escape(output_dir.name)}{marker}*"
    named = re.compile(rf"\.+{re.escape(output_dir.name)}{re.escape(marker)}" if nested else "")
    for path in sorted(output_dir.parent.glob(pattern)):
        if not named.match(path.name):  # `.*best.tmp-*` also matches another output's, `.mybest.tmp-*`
            continue
        pid = _owner(path, marker)
        kind_matches = path.is_dir() if folders else path.is_file() and not path.is_symlink()
        if pid is not None and pid != os.getpid() and kind_matches and not process_alive(pid):
            found.append(path)
    return found


def restore_set_aside(output_dir: str | os.PathLike) -> Path | None:
    """Finish what a process killed while replacing `output_dir` left: the previous content it had set aside is
    moved back when `output_dir` is missing (returns where it came from), and deleted when `output_dir` exists."""
    output_dir = Path(output_dir)
    abandoned = _abandoned(output_dir, SET_ASIDE_MARKER)
    if not abandoned:
        return None
    if os.path.lexists(output_dir):
        for path in abandoned:
            logger.info("removing %s: the previous content of %s, which was replaced", path, output_dir)
            shutil.rmtree(path, ignore_errors=True)
        return None
    restored = abandoned[-1]
    os.replace(restored, output_dir)
    logger.warning("%s was missing (a replacement of it was killed half-way): restored its previous content from %s",
                   output_dir, restored.name)
    return restored


def replace_folder(new: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Move the folder `new` to `output_dir`, replacing what is there; the old content is deleted only once `new` is
    in place, and restored if moving `new` in fails."""
    new, output_dir = Path(new), Path(output_dir)
    restore_set_aside(output_dir)
    fsync_tree(new)  # on the disk before a rename names it: after a power loss, the old content or all of the new
    set_aside = _set_aside_path(output_dir) if os.path.lexists(output_dir) else None
    try:
        if set_aside is not None:
            os.replace(output_dir, set_aside)
        os.replace(new, output_dir)
        fsync_folder(output_dir.parent)
    except BaseException:
        # A signal's SystemExit comes once a rename has returned, so which renames happened is read from the disk:
        # `new` still there means it was not moved in, and the old content goes back; otherwise the swap is done.
        if set_aside is not None and os.path.lexists(set_aside):
            if os.path.lexists(new) and not os.path.lexists(output_dir):
                os.replace(set_aside, output_dir)
            elif not os.path.lexists(new):
                shutil.rmtree(set_aside, ignore_errors=True)
        raise
    if set_aside is not None:
        remove_tree(set_aside)


def remove_tree(path: str | os.PathLike) -> None:
    """`shutil.rmtree` that a signal does not leave half done: its SystemExit part-way (a dataset's files are
    gigabytes, seconds to delete) lets a second pass finish the deletion."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)


def _umask_by_setting_it() -> int:
    mask = os.umask(0o022)  # without /proc the only way to read it: set it, then put it back at once
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_by_setting_it()  # at import, in the main thread, before any worker or trainer thread


def _process_umask() -> int:
    """The umask now: read from /proc (Linux 4.7+) without changing it, so a umask set after import counts and no
    thread sees a moment where it is changed; elsewhere the one read at import."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return _UMASK_AT_IMPORT
    found = re.search(r"^Umask:\s*([0-7]+)$", status, re.MULTILINE)
    return int(found.group(1), 8) if found else _UMASK_AT_IMPORT


def _follow_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain mkdir/open would have (`tempfile` makes 0700 folders and
    0600 files, and so do some writers): a saved model readable by whoever the umask lets read it."""
    umask = _process_umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def parents_removed_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """On an exception inside the block, remove the folders above `path` that did not exist before it, innermost
    first, each only if still empty (one that another process has filled meanwhile stays)."""
    missing = []
    for folder in Path(path).parents:  # innermost first, up to the first that exists
        if folder.exists():
            break
        missing.append(folder)
    try:
        yield
    except BaseException:
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the folders above it are not either
        raise


@contextmanager
def staged_folder(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a new folder beside `output_dir` to write into; when the block succeeds, it replaces `output_dir`
    (`replace_folder`) with the modes the umask gives. If the block raises, the staging folder is removed (and the
    folders above `output_dir` it made) and `output_dir` is left as it was. A link to a folder: the folder it names
    is replaced, beside itself (replacing the link would leave that folder with the old content, and the link a
    folder where a link was)."""
    output_dir = Path(output_dir)
    if output_dir.is_symlink():
        output_dir = output_dir.resolve()
    with parents_removed_on_failure(output_dir):
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        restore_set_aside(output_dir)  # readers see the old content again while the new one is written
        for path in _abandoned(output_dir, STAGING_MARKER, nested=True):  # what killed saves wrote: never moved in
            shutil.rmtree(path, ignore_errors=True)
        # named here and made inside the `try`: a signal as it is made (its handler raises once mkdir returns) must
        # find the cleanup ready to remove it
        staging = output_dir.parent / f".{output_dir.name}{STAGING_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.mkdir(staging, 0o700)
            yield staging
            _follow_umask(staging)
            replace_folder(staging, output_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def output_path_problem(path: str | os.PathLike, *, folder: bool = False) -> str | None:
    """What stops `path` from being written as a file (or, `folder=True`, made or filled as a folder): an entry of the
    other kind already there, or a file where a parent folder must be. None when nothing does. Console scripts check
    their outputs with it before the work whose result they will hold."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        return "is a file; give a folder path" if folder else "is a folder; give a file path"
    if path.is_dir():
        return _unwritable(path)
    for parent in path.parents:  # the nearest one that exists must be a folder we may write in
        if parent.exists():
            return _unwritable(parent) if parent.is_dir() else f"{parent} is a file, so nothing can be written under it"
    return None


def _unwritable(folder: Path) -> str | None:
    """Why nothing can be created in `folder` (permissions, a read-only file system), found by trying: the rights
    alone do not say it (root, ACLs, read-only mounts)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"nothing can be written in {folder} ({error.strerror or error})"
    return None


def partial_path(target: str | os.PathLike) -> Path:
    """A temporary name beside `target` (so the final rename stays on one file system), unique to this process and
    call, hidden, keeping the suffix (writers such as `np.savez` or GDAL choose the format by it)."""
    target = Path(target)
    return target.with_name(f".{target.name}{PARTIAL_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}{target.suffix}")


def remove_abandoned_partials(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (`partial_path`) that writes of `target` killed by SIGKILL left (their process is
    gone); returns them. Large outputs call it before writing: a GeoTIFF scene's can be gigabytes."""
    abandoned = _abandoned(Path(target), PARTIAL_MARKER, folders=False)
    for path in abandoned:
        logger.info("removing %s: what a killed write of %s left", path, target)
        path.unlink(missing_ok=True)
    return abandoned


def remove_abandoned_partials_in(folder: str | os.PathLike) -> list[Path]:
    """Remove every temporary file (`partial_path`) in `folder` whose writing process is gone, whatever output it
    was for; returns them. One listing of the folder: a run writing many small files (tiles) calls it once per output
    folder before writing, where `remove_abandoned_partials` per file would list the folder at every write."""
    abandoned = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return abandoned
    for entry in entries:
        if not entry.name.startswith(".") or PARTIAL_MARKER not in entry.name:
            continue
        pid = _owner(Path(entry.path), PARTIAL_MARKER)
        if pid is None or pid == os.getpid() or not entry.is_file(follow_symlinks=False) or process_alive(pid):
            continue
        logger.info("removing %s: what a killed write left", entry.path)
        Path(entry.path).unlink(missing_ok=True)
        abandoned.append(Path(entry.path))
    return sorted(abandoned)


@contextmanager
def atomic_file(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block succeeds it replaces `path` (one rename), when it
    raises the temporary file is removed and `path` is left as it was. Creates the parent folder (removed again on
    failure, with any folder above it that it made).

    `durable` (the default) flushes the data to the disk before the rename and the folder after (~10 ms on a local
    disk). Writers of many small files that a rerun makes again (one per tile) pass False: atomic against a kill
    still, and as durable after a power loss as the file system makes a rename over a file (ext4 flushes the data
    first), without a flush per tile costing more than refining it."""
    path = Path(path)
    with parents_removed_on_failure(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(path)
        try:
            yield partial
            if durable:
                fsync_tree(partial)  # the data on the disk before the name: never a new name over unwritten data
            os.replace(partial, path)
            if durable:
                fsync_folder(path.parent)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8, newlines as given) written atomically to `path`."""
    with atomic_file(path) as partial:
        with open(partial, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, payload, *, sort_keys: bool = False, indent: int = 2) -> Path:
    """`payload` as JSON (plus a final newline) written atomically to `path`."""
    return write_text(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")
