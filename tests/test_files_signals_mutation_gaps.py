"""Mutation-audit gaps of the atomic writes (`modeling_stage2._files`), the signal handling
(`modeling_stage2._signals`) and the console scripts' warnings (`modeling_stage2.vocabulary`): each test fails
under a plausible bug that the other tests let through. All in-process."""
from __future__ import annotations

import errno
import os
import signal
import stat
import threading
import time
import warnings

import pytest

from modeling_stage2 import _files, _signals
from modeling_stage2._files import SET_ASIDE_MARKER, atomic_file, staged_folder, write_text


def _gone_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()  # a process id that no process has now
    return process.pid


# ------------------------------------------------------------------------------------------------------ _files
def test_a_failed_final_rename_keeps_the_old_file(tmp_path, monkeypatch):
    """The old file is replaced by the rename itself, never removed before it: a rename that fails (a full disk's
    journal, a signal's SystemExit before it) leaves the old content, and no partial file."""
    target = tmp_path / "metrics.json"
    write_text(target, "old")

    def failing_replace(source, destination):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_signal_inside_an_atomic_write_removes_the_partial_file_and_the_folders_it_made(tmp_path):
    """A signal's `SystemExit` is no `Exception`: a cleanup by `except Exception` left the partial file and the new
    folders above it."""
    old = tmp_path / "old.json"
    write_text(old, "old")
    for target in (old, tmp_path / "new" / "deeper" / "out.json"):
        with pytest.raises(SystemExit):
            with atomic_file(target) as partial:
                partial.write_text("half")
                raise SystemExit(128 + signal.SIGTERM)
    assert [p.name for p in tmp_path.iterdir()] == ["old.json"] and old.read_text() == "old"


def test_a_process_of_another_user_counts_as_alive_and_its_set_aside_folder_is_kept(tmp_path, monkeypatch):
    """`os.kill(pid, 0)` says EPERM for a live process of another user: taking it for gone would move back or delete
    the folder a save in progress had set aside."""
    pid = _gone_pid()

    def kill(target, signum):
        assert signum == 0
        raise PermissionError(errno.EPERM, "Operation not permitted")

    busy = tmp_path / f".best{SET_ASIDE_MARKER}{pid}-0123abcd"
    busy.mkdir()
    assert _files.process_alive(pid) is False  # gone for real
    monkeypatch.setattr(os, "kill", kill)
    assert _files.process_alive(pid) is True
    assert _files.restore_set_aside(tmp_path / "best") is None
    assert busy.is_dir() and not (tmp_path / "best").exists()


def test_a_link_saved_in_a_staged_folder_keeps_the_modes_of_what_it_names(tmp_path):
    """The umask's modes are given to the saved files themselves: chmod through a link (a Hub cache's blob, a file
    elsewhere) changed the modes of a file outside the folder."""
    outside = tmp_path / "private.bin"
    outside.write_bytes(b"secret")
    os.chmod(outside, 0o600)
    before = os.umask(0o022)
    try:
        with staged_folder(tmp_path / "best") as staging:
            (staging / "weights").symlink_to(outside)
    finally:
        os.umask(before)
    assert (tmp_path / "best" / "weights").is_symlink()
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600


# ----------------------------------------------------------------------------------------------------- _signals
def _signalled_main(signum: int):
    @_signals.exit_on_termination
    def main():
        os.kill(os.getpid(), signum)
        for _ in range(50):  # the handler runs in the main thread between bytecodes
            time.sleep(0.01)
        return 0
    return main


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_each_signal_exits_with_its_own_status_and_the_others_stay_ignored(default_dispositions, signum):
    """128 + N of the signal that came (129 for SIGHUP, 143 for SIGTERM), as a shell reports a process it killed;
    after it every handled signal is ignored by a Python handler (not SIG_IGN, not restored to the default)."""
    with pytest.raises(SystemExit) as stopped:
        _signalled_main(signum)()
    assert stopped.value.code == 128 + signum
    for other in (*_signals.TERMINATING_SIGNALS, signal.SIGINT):
        assert signal.getsignal(other) is _signals._do_nothing, other


def test_ctrl_c_returns_130_with_one_line(default_dispositions, capsys):
    assert _signalled_main(signal.SIGINT)() == 130
    assert capsys.readouterr() == ("", "interrupted\n")


def test_a_callers_own_sigint_handler_stays_in_place(default_dispositions):
    def own(signum, frame):
        pass

    signal.signal(signal.SIGINT, own)
    seen = []
    _signals.exit_on_termination(lambda: seen.append(signal.getsignal(signal.SIGINT)) or 5)()
    assert seen == [own] and signal.getsignal(signal.SIGINT) is own


def test_a_decorated_main_runs_in_another_thread_without_touching_the_handlers():
    """Handlers can be set in the main thread only (`signal.signal` raises ValueError elsewhere)."""
    result = []
    worker = threading.Thread(target=lambda: result.append(_signals.exit_on_termination(lambda value: value * 2)(21)))
    worker.start()
    worker.join(timeout=5)
    assert result == [42]


# --------------------------------------------------------------------------------------------------- vocabulary
def test_one_line_warnings_formats_inside_only():
    from modeling_stage2.vocabulary import one_line_warnings, warn_deprecated

    original = warnings.formatwarning
    with one_line_warnings("stage2-x"):
        line = warnings.formatwarning("old is deprecated", FutureWarning, "file.py", 3)
    assert line == "stage2-x: FutureWarning: old is deprecated\n" and warnings.formatwarning is original
    with pytest.warns(FutureWarning, match=r"^where: old is deprecated and will be removed in the next release; "
                                           r"use new$"):
        warn_deprecated("old", "new", "where")
