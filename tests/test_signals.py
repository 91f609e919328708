"""Console scripts stop on SIGTERM and SIGHUP like on Ctrl-C: cleanups run, nothing half-written is left
(`modeling_stage2._signals`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from modeling_stage2._signals import TERMINATING_SIGNALS, exit_on_termination

# A console script in miniature: an atomic write in progress when the signal comes.
SCRIPT = textwrap.dedent("""
    import sys, time
    from modeling_stage2._files import atomic_file
    from modeling_stage2._signals import exit_on_termination

    @exit_on_termination
    def main(target):
        with atomic_file(target) as partial:
            partial.write_text("half")
            print("writing", flush=True)
            for _ in range(600):  # short sleeps: see SLOW_EXIT_SCRIPT
                time.sleep(0.1)
        return 0

    sys.exit(main(sys.argv[1]))
""")


def _start(target: Path, ignore_sighup: bool = False) -> subprocess.Popen:
    def dispositions():  # in the child, before Python starts
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background job's shell (CI) ignores SIGINT, and so would Python
        if ignore_sighup:  # what nohup does
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(target)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=dispositions)
    assert process.stdout.readline() == "writing\n"  # the partial file exists now
    assert len(list(target.parent.glob(f".{target.name}.partial-*"))) == 1
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_terminating_signal_runs_the_cleanups_and_exits_128_plus_n(tmp_path, signum):
    target = tmp_path / "out.json"
    process = _start(target)
    process.send_signal(signum)
    assert process.wait(timeout=30) == 128 + signum  # what a shell reports for a process killed by the signal
    assert list(tmp_path.iterdir()) == []  # neither the partial file nor a half-written target
    stderr = process.stderr.read()
    assert stderr == ("interrupted\n" if signum == signal.SIGINT else "")  # no traceback


def test_without_the_decorator_the_partial_file_would_stay(tmp_path):
    """What the decorator is for: Python's default SIGTERM ends the process without running `finally`."""
    target = tmp_path / "out.json"
    process = subprocess.Popen([sys.executable, "-c", SCRIPT.replace("@exit_on_termination", ""), str(target)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == -signal.SIGTERM
    assert len(list(tmp_path.glob(".out.json.partial-*"))) == 1


def test_an_ignored_sighup_stays_ignored(tmp_path):
    target = tmp_path / "out.json"
    process = _start(target, ignore_sighup=True)
    process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert process.poll() is None  # still writing, as under nohup
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_the_previous_handlers_come_back_and_the_result_passes_through():
    def handler(signum, frame):
        pass

    seen = {}

    @exit_on_termination
    def main(value):
        seen.update({signum: signal.getsignal(signum) for signum in TERMINATING_SIGNALS})
        return value + 1

    previous = {signum: signal.getsignal(signum) for signum in TERMINATING_SIGNALS}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, handler)  # a caller's own handler is left in place
    try:
        assert main(1) == 2
        assert seen[signal.SIGTERM] is not signal.SIG_DFL and seen[signal.SIGHUP] is handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGHUP) is handler
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def console_script_commands() -> dict[str, str]:
    """setup.cfg's console scripts, each with the command `stage2_scripts` runs for it ("module:function")."""
    import configparser

    import stage2_scripts

    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    entry_points = dict(line.split(" = ") for line in config["options.entry_points"]["console_scripts"].split("\n")
                        if line)
    commands = {}
    for name, entry_point in entry_points.items():
        module_name, function_name = entry_point.split(":")
        assert module_name == "stage2_scripts", name  # every script is imported with Ctrl-C ending it at once
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(stage2_scripts, "run_command", lambda target, argv: commands.setdefault(name, target))
            getattr(stage2_scripts, function_name)()
    return commands


def test_every_console_script_but_stage2_train_is_decorated():
    """`stage2-train` supervises a process tree and handles its signals itself (`training.train`)."""
    commands = console_script_commands()
    assert len(commands) == 9
    wrapper_code = exit_on_termination(lambda: 0).__code__  # every function the decorator returns runs this code
    for name, target in commands.items():
        module_name, function_name = target.split(":")
        function = getattr(__import__(module_name, fromlist=[function_name]), function_name)
        assert (function.__code__ is wrapper_code) == (name != "stage2-train"), name


# A command whose import takes a while, as torch's and transformers' do: ready once the import has begun.
SLOW_COMMAND = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path

    DURING_IMPORT = signal.getsignal(signal.SIGINT)
    Path(sys.argv[1]).write_text("importing")
    time.sleep(float(sys.argv[2]))

    def main(argv):
        print(DURING_IMPORT, signal.getsignal(signal.SIGINT), flush=True)
        return 3
""")


def _run_slow_command(tmp_path: Path, import_seconds: float, ignore_sigint: bool = False) -> subprocess.Popen:
    (tmp_path / "slow_command.py").write_text(SLOW_COMMAND)
    repository = Path(__file__).resolve().parents[1]
    code = "import sys, stage2_scripts; sys.exit(stage2_scripts.run_command('slow_command:main'))"
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(ready), str(import_seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repository)])},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), process.communicate()
    return process


def test_ctrl_c_while_a_command_is_imported_ends_it_at_once_without_a_traceback(tmp_path):
    """Nothing has started yet: the process ends as a shell expects (128 + 2), with no KeyboardInterrupt traceback
    from inside a library's import."""
    process = _run_slow_command(tmp_path, import_seconds=60)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGINT and (stdout, stderr) == ("", "")


def test_the_command_runs_with_pythons_ctrl_c_handler_and_an_ignored_sigint_stays_ignored(tmp_path):
    process = _run_slow_command(tmp_path, import_seconds=0)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 3, stderr  # the command's own status
    assert stdout == f"{signal.SIG_DFL} {signal.default_int_handler}\n"  # exit_on_termination takes over

    process = _run_slow_command(tmp_path, import_seconds=1, ignore_sigint=True)  # a shell's background job
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 3 and stdout == f"{signal.SIG_IGN} {signal.SIG_IGN}\n", stderr


@pytest.mark.parametrize("disposition, status", [(signal.SIG_DFL, -signal.SIGINT), (signal.SIG_IGN, 0)])
def test_ctrl_c_after_the_command_returned_ends_the_exit_at_once_without_a_traceback(tmp_path, disposition, status):
    """Once `main` has returned, only the interpreter's exit is left (exit handlers, thread joins): a Ctrl-C there
    printed a KeyboardInterrupt traceback ("Exception ignored in atexit callback"); it ends the process at once. A
    command started with SIGINT ignored (a shell's background job, `nohup`) keeps ignoring it there."""
    (tmp_path / "exiting_command.py").write_text(textwrap.dedent("""
        import atexit, sys, time
        from pathlib import Path

        def slow_exit():
            Path(sys.argv[1]).write_text("exiting")
            time.sleep(float(sys.argv[2]))

        def main(argv):
            atexit.register(slow_exit)
            return 0
    """))
    repository, ready = Path(__file__).resolve().parents[1], tmp_path / "ready"
    code = "import sys, stage2_scripts; sys.exit(stage2_scripts.run_command('exiting_command:main'))"
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(ready), "60" if status else "1"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path),
                                                                                              str(repository)])},
        preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    deadline = time.monotonic() + 60
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), process.communicate()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == status and (stdout, stderr) == ("", "")


# A stop whose cleanup takes a while (a pool to stop, a scratch folder of many files to delete): a second signal
# while it runs must not cut it short (`kill` twice, a supervisor's repeated SIGTERM, Ctrl-C pressed again).
SLOW_CLEANUP_SCRIPT = textwrap.dedent("""
    import shutil, sys, tempfile, time
    from pathlib import Path
    from modeling_stage2._signals import exit_on_termination

    @exit_on_termination
    def main(folder):
        scratch = Path(tempfile.mkdtemp(prefix=".out.tmp-", dir=folder))
        for i in range(10):
            (scratch / str(i)).write_text("half")
        try:
            print("working", flush=True)
            for _ in range(600):  # short sleeps: see SLOW_EXIT_SCRIPT
                time.sleep(0.1)
        finally:
            print("cleaning", flush=True)
            for path in sorted(scratch.iterdir()):
                path.unlink()
                time.sleep(0.1)
            scratch.rmdir()
        return 0

    sys.exit(main(sys.argv[1]))
""")


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGHUP, signal.SIGTERM),
                                           (signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)])
def test_a_second_signal_does_not_cut_the_cleanups_short(tmp_path, first, second):
    _signalled_twice(first, second, SLOW_CLEANUP_SCRIPT, str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the scratch folder is gone, every file of it


def _signalled_twice(first: int, second: int, script: str, *args: str) -> subprocess.Popen:
    """`script` (it prints "working", then "cleaning" once stopped) sent `first` while it works and `second` while it
    cleans up: it ends as the first signal says, "interrupted" on stderr for Ctrl-C and nothing else."""
    process = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout.readline() == "working\n"
    process.send_signal(first)
    assert process.stdout.readline() == "cleaning\n"
    process.send_signal(second)
    assert process.wait(timeout=30) == 128 + first
    assert process.stderr.read() == ("interrupted\n" if first == signal.SIGINT else "")
    return process


# After the first signal the process is on its way out, and the way out is a cleanup too: joining the threads still
# running (an upload worker) and the atexit handlers. A second signal then must not cut it short either.
SLOW_EXIT_SCRIPT = textwrap.dedent("""
    import atexit, sys, time
    from modeling_stage2._signals import exit_on_termination

    @atexit.register
    def cleanup():
        print("cleaning", flush=True)
        time.sleep(1)
        print("cleaned", flush=True)

    @exit_on_termination
    def main():
        print("working", flush=True)
        for _ in range(600):  # short sleeps: the signal may reach torch's own thread, and Python runs its handler
            time.sleep(0.1)   # only when the main thread wakes (one 60 s sleep hung 4 runs in 12 on a loaded machine)
        return 0

    sys.exit(main())
""")


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT),
                                           (signal.SIGINT, signal.SIGINT), (signal.SIGHUP, signal.SIGTERM)])
def test_a_second_signal_does_not_cut_the_exit_short(first, second):
    assert _signalled_twice(first, second, SLOW_EXIT_SCRIPT).stdout.read() == "cleaned\n"


def _replace_then_signal(monkeypatch, nth: int, signum: int = signal.SIGTERM):
    """`os.replace` whose `nth` call does the rename and then raises what the signal handler raises: a signal that
    came during the rename (its handler runs once the call returns)."""
    real_replace, calls = os.replace, []

    def replace(source, destination):
        real_replace(source, destination)
        calls.append((source, destination))
        if len(calls) == nth:
            raise SystemExit(128 + signum)

    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize("nth", [1, 2])
def test_a_signal_during_a_folder_swap_keeps_one_complete_folder_and_nothing_beside_it(tmp_path, monkeypatch, nth):
    """The two renames of `replace_folder`: a signal during the first (the old folder set aside) must put it back,
    one during the second (the new one moved in) must keep the new one; nothing staged or set aside stays."""
    from modeling_stage2._files import staged_folder

    output = tmp_path / "out"
    output.mkdir()
    (output / "model.safetensors").write_text("old")
    calls = _replace_then_signal(monkeypatch, nth)
    with pytest.raises(SystemExit) as stopped:
        with staged_folder(output) as staging:
            (staging / "model.safetensors").write_text("new")
    assert stopped.value.code == 128 + signal.SIGTERM and len(calls) >= nth  # a restore is one more rename
    assert (output / "model.safetensors").read_text() == ("old" if nth == 1 else "new")
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_a_signal_as_the_staging_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    import tempfile

    from modeling_stage2._files import staged_folder

    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):  # the folder is made, then the handler raises
        real_mkdtemp(*args, **kwargs)
        raise SystemExit(128 + signal.SIGTERM)

    def mkdir(*args, **kwargs):
        os_mkdir(*args, **kwargs)
        raise SystemExit(128 + signal.SIGTERM)

    os_mkdir = os.mkdir
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(SystemExit):
        with staged_folder(tmp_path / "out"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_two_signals_at_once_stop_quietly(tmp_path):
    """A supervisor's SIGHUP and torch elastic's SIGTERM reach the trainer together: both are pending when the first
    handler runs. Setting the other to SIG_IGN then made Python report "OSError: Signal 15 ignored due to race
    condition" with a traceback on stderr."""
    process = subprocess.Popen([sys.executable, "-c", SLOW_EXIT_SCRIPT], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "working\n"
    process.send_signal(signal.SIGHUP)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGHUP
    assert process.stderr.read() == ""


# `make demo` in miniature: the training (replaced by an atomic write of best/) is stopped while it writes.
DEMO_SCRIPT = textwrap.dedent("""
    import sys, time
    import training.train
    from modeling_stage2._files import atomic_file

    def training_that_writes(training_args, data_args, settings):
        with atomic_file(f"{training_args.output_dir}/best/model.safetensors") as partial:
            partial.write_text("half")
            print("writing", flush=True)
            for _ in range(600):
                time.sleep(0.1)
        raise AssertionError("not stopped")

    training.train.run_training = training_that_writes
    from training.demo import main
    sys.exit(main(["--output_dir", sys.argv[1], "--data_dir", sys.argv[2], "--config", sys.argv[3]]))
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_the_demo_stops_on_a_signal_with_its_cleanups_run(tmp_path, signum):
    """`python -m training.demo` (`make demo`) trains in its own process and had no handler: SIGTERM or SIGHUP killed
    it before the training's cleanups ran (a partial file left in OUTPUT_DIR/best) and Ctrl-C printed a traceback."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "demo"
    process = subprocess.Popen([sys.executable, "-c", DEMO_SCRIPT, str(out), str(repo / "data" / "sample" / "tiles"),
                                str(repo / "configs" / "demo.yaml")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout.readline().startswith("== Training ") and process.stdout.readline() == "writing\n"
    assert len(list((out / "best").glob(".model.safetensors.partial-*"))) == 1
    process.send_signal(signum)
    assert process.wait(timeout=30) == 128 + signum
    assert not out.exists()  # the partial file and the folders made for it
    assert "Traceback" not in process.stderr.read()


class _SignalsItselfWhenCollected:
    """A finaliser that is running when the signal is handled: Python drops the exception raised in it."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # Python code after the signal: its handler runs here, inside the finaliser
            pass


def test_a_signal_dropped_in_a_finaliser_leaves_the_next_one_able_to_stop(default_dispositions, capsys):
    """The first signal's SystemExit, raised in a `__del__`, was dropped ("Exception ignored in ...") and every later
    SIGTERM, SIGHUP and Ctrl-C found the handlers ignoring them: the run went on to the end and exited 0."""
    reached = []

    @exit_on_termination
    def main():
        _SignalsItselfWhenCollected()  # collected at once: its finaliser runs here
        reached.append("after the dropped signal")
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):
            pass
        reached.append("after the second signal")
        return 0

    hook = sys.unraisablehook  # pytest's own
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert reached == ["after the dropped signal"]
    assert capsys.readouterr().err.splitlines() == ["SIGTERM came while a finaliser ran, where Python drops its "
                                                    "exception: the run goes on; send it again to stop it"]
    assert sys.unraisablehook is hook  # put back
