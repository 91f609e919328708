"""Folder replacement (`modeling_stage2._files`): a process killed between the two renames never loses the old
content, and the next save of the folder puts it back; `best/` of a training run goes through the same code."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from modeling_stage2 import _files
from modeling_stage2._files import SET_ASIDE_MARKER, restore_set_aside, staged_folder

# Replaces `sys.argv[2]` with a staged folder holding weights="new", and dies (os._exit, as SIGKILL would: no
# handler, no finally) when the new folder is about to be moved in, i.e. after the old one was set aside.
KILLED_BETWEEN_RENAMES = textwrap.dedent(
    """
    import importlib.util, os, sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("files_under_test", sys.argv[1])
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    target = Path(sys.argv[2])
    real_replace, real_rename = os.replace, os.rename

    def die_moving_in(source, destination):
        if Path(destination) == target and ".tmp-" in str(source):
            os._exit(9)

    os.replace = lambda source, destination: die_moving_in(source, destination) or real_replace(source, destination)
    os.rename = lambda source, destination: die_moving_in(source, destination) or real_rename(source, destination)
    with files.staged_folder(target) as staging:
        (staging / "weights").write_text("new")
    """
)


def _set_asides(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}{SET_ASIDE_MARKER}*"))


def kill_between_renames(target: Path) -> None:
    """Leave `target` as a save killed between its two renames leaves it."""
    script = target.parent / "killed_save.py"
    script.write_text(KILLED_BETWEEN_RENAMES)
    result = subprocess.run([sys.executable, str(script), _files.__file__, str(target)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 9, result.stderr
    assert not target.exists()


@pytest.fixture()
def killed_save(tmp_path):
    target = tmp_path / "best"
    target.mkdir()
    (target / "weights").write_text("old")
    kill_between_renames(target)
    return target


def test_a_kill_between_the_renames_keeps_the_old_content(killed_save):
    (set_aside,) = _set_asides(killed_save)  # not deleted, not left in a folder that anything removes
    assert (set_aside / "weights").read_text() == "old"


def test_the_next_save_restores_the_old_content_even_if_it_fails(killed_save, caplog):
    with pytest.raises(RuntimeError, match="interrupted"):
        with staged_folder(killed_save) as staging:
            assert (killed_save / "weights").read_text() == "old"  # back before the new content is written
            (staging / "weights").write_text("half")
            raise RuntimeError("interrupted")
    assert (killed_save / "weights").read_text() == "old" and not _set_asides(killed_save)
    assert f"{killed_save} was missing" in caplog.text and SET_ASIDE_MARKER in caplog.text


def test_the_next_save_replaces_it_and_leaves_nothing_behind(killed_save):
    with staged_folder(killed_save) as staging:
        (staging / "weights").write_text("newer")
    assert (killed_save / "weights").read_text() == "newer"
    assert sorted(p.name for p in killed_save.parent.iterdir()) == ["best", "killed_save.py"]


def test_a_failed_second_rename_puts_the_old_content_back(tmp_path, monkeypatch):
    target = tmp_path / "best"
    target.mkdir()
    (target / "weights").write_text("old")
    real_replace, real_rename = os.replace, os.rename

    def fail_moving_in(source, destination):
        if Path(destination) == target and ".tmp-" in str(source):
            raise OSError("disk full")

    monkeypatch.setattr(os, "replace", lambda s, d: fail_moving_in(s, d) or real_replace(s, d))
    monkeypatch.setattr(os, "rename", lambda s, d: fail_moving_in(s, d) or real_rename(s, d))
    with pytest.raises(OSError, match="disk full"):
        with staged_folder(target) as staging:
            (staging / "weights").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and (target / "weights").read_text() == "old"


def test_a_signal_while_the_old_content_is_deleted_does_not_leave_half_of_it(tmp_path, monkeypatch):
    """The new folder is in place when the old one is deleted: a SIGTERM then (SystemExit from `exit_on_termination`,
    which ignores any further signal) still ends with the old copy gone, not a half-deleted hidden folder."""
    target = tmp_path / "dataset"
    target.mkdir()
    for i in range(5):
        (target / f"part-{i}").write_text("old")
    real_rmtree, calls = _files.shutil.rmtree, []

    def interrupted_rmtree(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:  # one file deleted, then the signal
            next(Path(path).iterdir()).unlink()
            raise SystemExit(143)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(_files.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(SystemExit):
        with staged_folder(target) as staging:
            (staging / "part-0").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"] and len(calls) == 2
    assert [p.name for p in target.iterdir()] == ["part-0"] and (target / "part-0").read_text() == "new"


def test_a_link_to_a_folder_keeps_linking_to_the_new_content(tmp_path):
    """The folder a link names is replaced, beside itself: replacing the link made it a folder and left the linked
    folder (on another disk, say) with the old content, which other links and readers still saw."""
    (tmp_path / "disk" / "best").mkdir(parents=True)
    (tmp_path / "disk" / "best" / "weights").write_text("old")
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "best"
    link.symlink_to(tmp_path / "disk" / "best", target_is_directory=True)
    with staged_folder(link) as staging:
        (staging / "weights").write_text("new")
    assert link.is_symlink() and (tmp_path / "disk" / "best" / "weights").read_text() == "new"
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["best"]
    assert sorted(path.name for path in (tmp_path / "disk").iterdir()) == ["best"]  # nothing set aside is left


def test_a_set_aside_folder_is_left_alone_while_its_process_runs(tmp_path):
    target = tmp_path / "best"
    busy = tmp_path / f".best{SET_ASIDE_MARKER}{os.getppid()}-0123abcd"  # a live process other than this one
    busy.mkdir()
    assert restore_set_aside(target) is None
    assert busy.is_dir() and not target.exists()


def test_leftover_of_a_kill_after_the_second_rename_is_removed(tmp_path):
    target = tmp_path / "best"
    target.mkdir()
    (target / "weights").write_text("new")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".best{SET_ASIDE_MARKER}{int(dead.stdout)}-0123abcd"
    stale.mkdir()
    (stale / "weights").write_text("old")
    assert restore_set_aside(target) is None
    assert not stale.exists() and (target / "weights").read_text() == "new"


def test_a_name_with_glob_characters_finds_only_what_its_own_saves_left(tmp_path):
    """The name was used as a glob pattern: replacing `ds[1]` took the content of `ds1` that a killed save had set
    aside for `ds[1]`'s old one (and deleted it once `ds[1]` was in place), and never found its own."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    others = tmp_path / f".ds1{SET_ASIDE_MARKER}{int(dead.stdout)}-0123abcd"  # `ds1`'s only copy, after a kill
    others.mkdir()
    (others / "weights").write_text("ds1")
    own = tmp_path / f".ds[1]{SET_ASIDE_MARKER}{int(dead.stdout)}-4567cdef"
    own.mkdir()
    (own / "weights").write_text("old ds[1]")
    target = tmp_path / "ds[1]"
    assert restore_set_aside(target) == own
    assert (target / "weights").read_text() == "old ds[1]" and (others / "weights").read_text() == "ds1"
    with staged_folder(target) as staging:
        (staging / "weights").write_text("new ds[1]")
    assert (target / "weights").read_text() == "new ds[1]" and (others / "weights").read_text() == "ds1"


# ----------------------------------------------------------------------------------------------- best/ of a run
def _fake_trainer(output_dir: Path):
    """What `Stage2Trainer.save_best_model` uses of the trainer, without training anything."""
    return SimpleNamespace(best_model_dir=output_dir / "best", model="model",
                           accelerator=SimpleNamespace(unwrap_model=lambda model: model), last_eval_results=None,
                           eval_preview=None, training_config_record=lambda: {"global_step": 7},
                           write_card=lambda folder: (Path(folder) / "README.md").write_text("card"),
                           args=SimpleNamespace(metric_for_best_model="eval_loss", output_dir=str(output_dir)),
                           state=SimpleNamespace(best_metric=0.5, global_step=7))


def _write_weights(text: str):
    def save_trained_model(model, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_text(text)
        return Path(folder)
    return save_trained_model


def test_best_model_save_restores_a_best_folder_left_by_a_kill(tmp_path, monkeypatch):
    from modeling_stage2 import adapters
    from training.trainer import Stage2Trainer

    trainer = _fake_trainer(tmp_path)
    best = trainer.best_model_dir
    monkeypatch.setattr(adapters, "save_trained_model", _write_weights("old"))
    Stage2Trainer.save_best_model(trainer)
    kill_between_renames(best)

    def failing(model, folder):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(adapters, "save_trained_model", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        Stage2Trainer.save_best_model(trainer)
    assert (best / "adapter_model.safetensors").read_text() == "old"  # restored by the failed save
    monkeypatch.setattr(adapters, "save_trained_model", _write_weights("new"))
    assert Stage2Trainer.save_best_model(trainer) == best
    assert (best / "adapter_model.safetensors").read_text() == "new"
    assert (best / "training_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "killed_save.py"]


def test_best_model_save_keeps_the_old_best_when_the_second_rename_fails(tmp_path, monkeypatch):
    from modeling_stage2 import adapters
    from training.trainer import Stage2Trainer

    trainer = _fake_trainer(tmp_path)
    best = trainer.best_model_dir
    monkeypatch.setattr(adapters, "save_trained_model", _write_weights("old"))
    Stage2Trainer.save_best_model(trainer)
    monkeypatch.setattr(adapters, "save_trained_model", _write_weights("new"))
    real_replace, real_rename = os.replace, Path.rename

    def fail_into_best(source, destination):
        if Path(destination) == best and ".tmp-" in str(source):
            raise OSError("disk full")

    monkeypatch.setattr(os, "replace", lambda s, d: fail_into_best(s, d) or real_replace(s, d))
    monkeypatch.setattr(Path, "rename", lambda s, d: fail_into_best(s, d) or real_rename(s, d))
    with pytest.raises(OSError, match="disk full"):
        Stage2Trainer.save_best_model(trainer)
    assert (best / "adapter_model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def _staged_modes(root: Path) -> dict:
    """Save a folder with `staged_folder` as a writer that makes tempfile-private files and folders would; the modes
    it ends with."""
    import stat
    import tempfile

    from modeling_stage2._files import staged_folder

    with staged_folder(root / "best") as staging:
        fd, private = tempfile.mkstemp(dir=staging)  # 0600, as safetensors' writers leave theirs
        os.close(fd)
        os.rename(private, staging / "weights")
        (staging / "sub").mkdir(mode=0o700)
        (staging / "sub" / "config.json").write_text("{}")
    best = root / "best"
    return {path.relative_to(root).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in [best, *best.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])  # at least two differ from the umask at import
def test_a_staged_folder_gets_the_modes_of_the_umask(tmp_path, umask):
    """tempfile makes 0700 folders (and some writers 0600 files): a saved model would be unreadable by a serving
    account that the umask lets read it. The umask is the one in force when the folder is saved, also when it was
    set after the package was imported."""
    before = os.umask(umask)
    try:
        modes = _staged_modes(tmp_path)
        assert os.umask(umask) == umask  # reading it did not change it
    finally:
        os.umask(before)
    folder, file = 0o777 & ~umask, 0o666 & ~umask
    assert modes == {"best": folder, "best/sub": folder, "best/weights": file, "best/sub/config.json": file}


def test_without_proc_the_umask_read_at_import_is_used(tmp_path, monkeypatch):
    """Where /proc cannot be read, the umask is the one read (by setting it and putting it back) at import."""
    from modeling_stage2 import _files

    real_read_text = Path.read_text

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    monkeypatch.setattr(_files, "_UMASK_AT_IMPORT", 0o077)
    assert _staged_modes(tmp_path) == {"best": 0o700, "best/sub": 0o700, "best/weights": 0o600,
                                       "best/sub/config.json": 0o600}


def test_atomic_file_replaces_only_when_the_write_completes(tmp_path):
    from modeling_stage2._files import atomic_file, write_json, write_text

    target = tmp_path / "deep" / "results.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with atomic_file(target) as partial:
            partial.write_text('{"a": 2, "half')  # a write cut short
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}  # the old content, never the half-written one
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]  # no partial file left
    write_text(target, "line\r\n")
    assert target.read_bytes() == b"line\r\n"  # written as given


@pytest.mark.parametrize("writer", ["staged_folder", "atomic_file"])
def test_a_failed_write_removes_the_folders_it_made_above_the_output(tmp_path, writer):
    """A write into new/deeper/out that failed left new/deeper/ behind, empty. A folder that existed stays, and one
    another writer filled meanwhile too."""
    write = getattr(_files, writer)
    with pytest.raises(RuntimeError, match="failed"):
        with write(tmp_path / "new" / "deeper" / "out"):
            raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs").mkdir()
    with pytest.raises(RuntimeError, match="failed"):
        with write(tmp_path / "runs" / "a" / "b" / "out"):
            (tmp_path / "runs" / "a" / "other").mkdir()  # filled by someone else while the write ran
            raise RuntimeError("failed")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["runs", "runs/a", "runs/a/other"]
    with write(tmp_path / "new" / "deeper" / "out") as partial:  # a write that succeeds keeps them
        if writer == "atomic_file":
            partial.write_text("done")
    assert (tmp_path / "new" / "deeper" / "out").exists()


# ------------------------------------------------------------------------------------------ on the disk (fsync)
@pytest.fixture()
def disk_events(monkeypatch, tmp_path):
    """What reaches the disk, in order: ("fsync", path) for each flush (the path its descriptor names) and
    ("replace", source, destination) for each rename."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name what a descriptor flushes")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{descriptor}"))))
        real_fsync(descriptor)

    def replace(source, destination):
        real_replace(source, destination)
        events.append(("replace", Path(source), Path(destination)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _flushed(events) -> list[Path]:
    return [event[1] for event in events if event[0] == "fsync"]


def test_a_file_is_on_the_disk_before_its_name_and_its_folder_after(tmp_path, disk_events):
    """After a power loss, a file written atomically is the old one or the whole new one: its data is flushed before
    the rename names it, and the folder's entry after."""
    target = tmp_path.resolve() / "record.json"
    _files.write_json(target, {"a": 1})
    (rename,) = [event for event in disk_events if event[0] == "replace"]
    partial = rename[1]
    assert rename[2] == target and partial.parent == target.parent and partial != target
    assert disk_events == [("fsync", partial), rename, ("fsync", target.parent)]


def test_a_staged_folder_is_on_the_disk_before_it_replaces_the_old_one(tmp_path, disk_events):
    target = tmp_path.resolve() / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with staged_folder(target) as staging:
        (staging / "weights").write_text("new")
        (staging / "sub").mkdir()
        (staging / "sub" / "config.json").write_text("{}")
    renames = [event for event in disk_events if event[0] == "replace"]
    (moved_in,) = [event for event in renames if event[2] == target]
    staging = moved_in[1]
    before_any_rename = disk_events[: disk_events.index(renames[0])]  # the old one is set aside first
    assert sorted(_flushed(before_any_rename)) == sorted(
        [staging / "weights", staging / "sub" / "config.json", staging / "sub", staging])
    assert target.parent in _flushed(disk_events[disk_events.index(moved_in) + 1:])
    assert (target / "weights").read_text() == "new"


def _failing_fsync(code: int):
    def fsync(descriptor):
        raise OSError(code, os.strerror(code))
    return fsync


def test_a_flush_that_fails_keeps_the_old_file_and_folder_and_leaves_no_partial(tmp_path, monkeypatch):
    """A disk that cannot take the data (EIO) fails the save; what was there before stays, whole."""
    record, folder = tmp_path / "record.json", tmp_path / "model"
    record.write_text("old")
    folder.mkdir()
    (folder / "weights").write_text("old")
    monkeypatch.setattr(os, "fsync", _failing_fsync(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        _files.write_text(record, "new")
    with pytest.raises(OSError, match="Input/output error"):
        with staged_folder(folder) as staging:
            (staging / "weights").write_text("new")
    assert record.read_text() == "old" and (folder / "weights").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "record.json"]


def test_a_file_system_that_cannot_flush_still_saves(tmp_path, monkeypatch):
    """Some file systems answer EINVAL to fsync (nothing they can flush): the save goes on."""
    monkeypatch.setattr(os, "fsync", _failing_fsync(errno.EINVAL))
    _files.write_text(tmp_path / "record.json", "new")
    with staged_folder(tmp_path / "model") as staging:
        (staging / "weights").write_text("new")
    assert (tmp_path / "record.json").read_text() == "new" and (tmp_path / "model" / "weights").read_text() == "new"


def test_a_checkpoints_files_are_on_the_disk_before_its_completion_marker(tmp_path, monkeypatch, disk_events):
    """The marker vouches for the checkpoint (and lets older ones be deleted): after a power loss it must not name
    files whose data never reached the disk."""
    from transformers import Trainer

    from training.trainer import CHECKPOINT_COMPLETE_NAME, Stage2Trainer

    run_dir = tmp_path.resolve()
    folder = run_dir / "checkpoint-3"

    def write_checkpoint(self, model, trial):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(Trainer, "_save_checkpoint", write_checkpoint)
    trainer = Stage2Trainer.__new__(Stage2Trainer)
    trainer.args = SimpleNamespace(should_save=True, save_total_limit=None)
    trainer.state = SimpleNamespace(global_step=3, best_model_checkpoint=None)
    trainer.accelerator = SimpleNamespace(wait_for_everyone=lambda: None)
    trainer._get_output_dir = lambda trial: str(run_dir)
    trainer._kept_checkpoints = set()
    trainer._save_checkpoint(model=None, trial=None)
    (marker_in,) = [event for event in disk_events if event[0] == "replace"]
    assert marker_in[2] == folder / CHECKPOINT_COMPLETE_NAME
    flushed_before = _flushed(disk_events[: disk_events.index(marker_in)])
    assert folder / "adapter_model.safetensors" in flushed_before and folder in flushed_before


def test_writers_of_one_file_per_tile_do_not_flush_each(tmp_path, disk_events):
    """Refined tiles and exported BigEarthNet patches are written atomically but not flushed one by one (a flush
    costs more than refining a tiny model's tile; a rerun writes them again)."""
    import numpy as np

    from data_builders.bigearthnet import _write_atomic
    from inference_stage2.tiles import save_npz_atomic

    folder = tmp_path.resolve()
    save_npz_atomic(folder / "tile.npz", {"refined": np.zeros((4, 2, 2), np.float32)})
    _write_atomic(folder / "tile.json", lambda handle: handle.write(b"{}"))
    assert _flushed(disk_events) == []
    assert [event[2] for event in disk_events] == [folder / "tile.npz", folder / "tile.json"]
    assert np.load(folder / "tile.npz")["refined"].shape == (4, 2, 2) and (folder / "tile.json").read_bytes() == b"{}"


def test_a_refined_scene_and_its_weight_map_are_on_the_disk_before_their_names(tmp_path, disk_events):
    """A scene is one large output that took minutes: both files are flushed before either is renamed into place,
    and each folder after."""
    pytest.importorskip("rasterio")
    from test_inference import smooth_scene, write_geotiff
    from test_inference_mutation_gaps import _QuarterWeightRefiner

    from inference_stage2 import refine_scene

    folder = tmp_path.resolve()
    scene = write_geotiff(folder / "scene.tif", smooth_scene(40, 50, seed=3), nodata=0)
    output, weight = folder / "out.tif", folder / "maps" / "weight.tif"
    disk_events.clear()
    refine_scene(_QuarterWeightRefiner(), scene, output, 7, 4, progress=False, out_of_range_output=weight)
    renames = [event for event in disk_events if event[0] == "replace"]
    assert [event[2] for event in renames] == [weight, output]
    before = _flushed(disk_events[: disk_events.index(renames[0])])
    assert renames[0][1] in before and renames[1][1] in before
    assert {output.parent, weight.parent} <= set(_flushed(disk_events[disk_events.index(renames[1]) + 1:]))
