"""Mutation-audit gaps of how a training run starts, stops and reports (`training.train` from `_undone_on_failure`
on: the trainer process's `cli`, the launcher-death watch, the `stage2-train` supervisor and its process group) and
of the demo's verdict (`training.demo`): each test fails under a plausible bug that the other tests let through.
In-process, with small `python -c` children where a real process is needed; each runs in a few seconds."""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from _data_helpers import make_tile_dir
from _training_helpers import refuse_exec, write_config

import training.demo as demo
import training.train as train_module
from training.train import (EXIT_INTERRUPTED, INTERRUPT_FILE_ENV, LAUNCHER_PID_ENV, STATUS_FILE_ENV, InterruptCallback,
                            TrainingInterrupted, UsageError)

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process tree from /proc")
needs_prctl = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")


@pytest.fixture(autouse=True)
def _never_exec(monkeypatch):
    refuse_exec(monkeypatch)


def _gone_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()  # a process id that no process has now
    return process.pid


def _python(script: str, **kwargs) -> subprocess.Popen:
    """A small Python child that prints `ready` once it is set up (read it with `_ready`)."""
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, **kwargs)


def _ready(process: subprocess.Popen) -> None:
    assert process.stdout.readline().strip() == "ready"


def _state(pid: int) -> str | None:
    fields = train_module._proc_stat(pid)
    return fields[0] if fields else None


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout  # bounds a failure only
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------- the output folder
def test_an_interrupt_before_training_removes_what_the_run_added_and_a_non_main_process_removes_nothing(tmp_path):
    """Ctrl-C and SIGTERM's `SystemExit` are no `Exception`: a cleanup by `except Exception` left the half-converted
    dataset and config.yaml of an interrupted start. The other processes of a distributed run (`enabled=False`)
    must not remove what the main process is writing."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for stop in (KeyboardInterrupt(), SystemExit(143)):
        with pytest.raises(type(stop)):
            with train_module._undone_on_failure(out, out / "_dataset"):
                (out / "_dataset").mkdir()
                (out / "config.yaml").write_text("lr: 1\n")
                raise stop
        assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
    with pytest.raises(KeyboardInterrupt):
        with train_module._undone_on_failure(tmp_path / "new", tmp_path / "new" / "_dataset"):
            (tmp_path / "new" / "_dataset").mkdir(parents=True)
            raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()
    with pytest.raises(UsageError):
        with train_module._undone_on_failure(out, out / "_dataset", enabled=False):
            (out / "config.yaml").write_text("lr: 1\n")
            raise UsageError("the main process stopped before training (it reports why)")
    assert sorted(path.name for path in out.iterdir()) == ["config.yaml", "notes.txt"]


# ------------------------------------------------------------------------------------------- finish_run
class _FinishedTrainer:
    """What `finish_run` uses of a `Stage2Trainer`, recording the calls."""

    def __init__(self, tmp_path: Path, should_save: bool, best_metric: float, push_to_hub: bool = False):
        self.calls = []
        self.args = SimpleNamespace(metric_for_best_model="loss", greater_is_better=False, eval_strategy="epoch",
                                    should_save=should_save, push_to_hub=push_to_hub)
        self.state = SimpleNamespace(best_metric=best_metric)
        self.best_model_dir = tmp_path / "best"
        self.best_model_dir.mkdir(parents=True)
        (self.best_model_dir / "metrics.json").write_text(json.dumps({"split": "val"}))
        self.accelerator = SimpleNamespace(wait_for_everyone=lambda: self.calls.append("wait"))

    def save_best_model(self):
        self.calls.append("save best")

    def load_best_model(self):
        self.calls.append("load best")

    def write_card(self, folder):
        self.calls.append(f"card {folder.name}")

    def push_to_hub(self, commit_message):
        self.calls.append(f"push: {commit_message}")


def test_finish_run_writes_best_from_the_main_process_only_and_after_every_process_is_there(tmp_path, monkeypatch,
                                                                                           capsys):
    """Every process of a distributed run wrote best/ and its card at once (a torn card), or one loaded best/ before
    the main process had finished writing it; the line naming the best model lost its metric's value."""
    import training.metrics

    monkeypatch.setattr(training.metrics, "format_metrics_table", lambda metrics: f"TABLE {metrics['split']}")
    main = _FinishedTrainer(tmp_path / "main", should_save=True, best_metric=0.25, push_to_hub=True)
    train_module.finish_run(main)
    assert main.calls == ["wait", "load best", "card best", "push: End of training: best model"]
    assert capsys.readouterr().out.splitlines() == [f"Best model: {main.best_model_dir} (loss = 0.25)", "TABLE val"]
    other = _FinishedTrainer(tmp_path / "other", should_save=False, best_metric=float("inf"))
    train_module.finish_run(other)  # every validation gave NaN: the main process saves the final model as best/
    assert other.calls == ["wait", "load best"] and capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------- the interrupt
def test_the_interrupt_handler_stops_after_a_step_once_and_at_once_otherwise(monkeypatch, capfd):
    """The first Ctrl-C during training asks for a checkpoint and a stop (said once, by the main process); before
    training, after it (best/ being written, the Hub push) and the second time, it interrupts at once."""
    monkeypatch.delenv("RANK", raising=False)
    callback = InterruptCallback()
    with pytest.raises(KeyboardInterrupt):
        callback.handle(signal.SIGINT, None)
    assert not callback.requested
    args, state = SimpleNamespace(), SimpleNamespace(global_step=3)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    callback.on_train_begin(args, state, control)
    assert callback.on_step_end(args, state, control) is control and not control.should_training_stop
    callback.handle(signal.SIGINT, None)
    assert "interrupt: stopping after the current optimizer step, with a checkpoint" in capfd.readouterr().err
    callback.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop and callback.stopped_at == 3
    with pytest.raises(KeyboardInterrupt):
        callback.handle(signal.SIGINT, None)
    after = InterruptCallback()
    after.on_train_begin(args, state, control)
    after.on_train_end(args, state, control)
    with pytest.raises(KeyboardInterrupt):
        after.handle(signal.SIGINT, None)
    monkeypatch.setenv("RANK", "1")
    other = InterruptCallback()
    other.on_train_begin(args, state, control)
    other.handle(signal.SIGINT, None)
    assert other.requested and capfd.readouterr().err == ""  # the main process says it, once for the run


def test_any_process_in_a_process_group_reports_the_flag_it_was_given(tmp_path):
    """`value.item() >= 0` stopped every distributed run after its first step, as if interrupted."""
    import torch
    import torch.distributed as dist

    args = SimpleNamespace(device=torch.device("cpu"))
    assert train_module._any_process(True, args) is True and train_module._any_process(False, args) is False
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert train_module._any_process(False, args) is False and train_module._any_process(True, args) is True
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- the trainer process
def test_main_passes_the_callbacks_on_and_logs_at_info_on_the_main_process(tmp_path, monkeypatch):
    """The `InterruptCallback` dropped on the way (Ctrl-C then stopped at once, without a checkpoint), or the main
    process logging only warnings."""
    ran, levels = [], []
    monkeypatch.setattr(train_module, "run_training", lambda *args, callbacks=None: ran.append(callbacks) or "trainer")
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: levels.append(kwargs["level"]))
    tiles = make_tile_dir(tmp_path / "tiles", per_split=1)
    argv = ["--config", str(write_config(tmp_path / "tiny.yaml")), "--data_dir", str(tiles), "--output_dir",
            str(tmp_path / "out")]
    callbacks = [InterruptCallback()]
    assert train_module.main(argv, callbacks=callbacks) == "trainer"
    assert ran == [callbacks] and levels == [logging.INFO]
    with pytest.raises(UsageError, match="--resume"):
        train_module.main([*argv, "--resume", str(tmp_path / "no-checkpoint")])
    assert len(ran) == 1


@pytest.fixture
def trainer_env(monkeypatch, tmp_path) -> Path:
    """The trainer process's environment as `stage2-train` sets it, without the launcher watch; its status file."""
    status = tmp_path / "status"
    status.write_text("")
    for name in (LAUNCHER_PID_ENV, INTERRUPT_FILE_ENV, "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(STATUS_FILE_ENV, str(status))
    return status


@pytest.mark.parametrize("stop, code, line", [
    (None, 0, None),
    (TrainingInterrupted("interrupted: training stopped after optimizer step 3 with a checkpoint"), 130,
     "stage2-train: interrupted: training stopped after optimizer step 3 with a checkpoint"),
    (KeyboardInterrupt(), 130, "stage2-train: interrupted."),
])
def test_the_trainer_process_watches_its_launcher_handles_ctrl_c_and_records_a_failure_only(
        stop, code, line, trainer_env, monkeypatch, capsys):
    """A trainer that recorded 0 made `stage2-train` exit 0 where another process of the run had failed (accelerate's
    1); the trainer's SIGINT handler stayed after `cli` returned; the launcher watch was never started."""
    watched, handlers = [], []
    monkeypatch.setattr(train_module, "_stop_with_launcher", lambda: watched.append(True))

    def fake_main(argv, callbacks=None):
        handlers.append(signal.getsignal(signal.SIGINT))
        assert handlers[0].__self__ is callbacks[0]  # the InterruptCallback of the run handles Ctrl-C
        if stop is not None:
            raise stop

    monkeypatch.setattr(train_module, "main", fake_main)
    before = signal.getsignal(signal.SIGINT)
    assert train_module.cli([]) == code
    assert signal.getsignal(signal.SIGINT) is before and watched == [True] and len(handlers) == 1
    assert trainer_env.read_text() == ("" if code == 0 else str(code))
    lines = capsys.readouterr().err.splitlines()
    assert lines == ([] if line is None else [line])


def test_only_the_main_process_says_why_the_run_stopped(trainer_env, monkeypatch, capsys):
    """Every process of a distributed run printed its line: the others' "the main process stopped before training"
    stood beside (or, interleaved, before) the main process's reason."""
    def stopped(argv, callbacks=None):
        raise UsageError("the main process stopped before training (it reports why)")

    monkeypatch.setattr(train_module, "_stop_with_launcher", lambda: None)
    monkeypatch.setattr(train_module, "main", stopped)
    monkeypatch.setenv("RANK", "1")
    assert train_module.cli([]) == 2 and capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------- the launcher watch
@needs_proc
def test_process_stat_fields_of_a_process_named_with_a_parenthesis():
    """The command name in `/proc/PID/stat` is in parentheses and may hold one: split at the first `)`, the fields
    (state, parent) were shifted, and a trainer under a renamed launcher misread its ancestry."""
    child = _python("import ctypes, time; ctypes.CDLL(None).prctl(15, b'x) (y', 0, 0, 0); print('ready', flush=True);"
                    " time.sleep(30)")
    try:
        _ready(child)
        fields = train_module._proc_stat(child.pid)
        assert fields[0] in "RSD" and int(fields[1]) == os.getpid()
        assert train_module._parent_of(child.pid) == os.getpid()
    finally:
        child.kill()
        child.wait()


@needs_prctl
def test_the_parent_death_signal_is_the_one_asked_for():
    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.c_int()
    try:
        train_module._set_parent_death_signal(signal.SIGUSR1)
        assert libc.prctl(2, ctypes.byref(value), 0, 0, 0) == 0  # PR_GET_PDEATHSIG
        assert value.value == signal.SIGUSR1
    finally:
        libc.prctl(1, 0, 0, 0, 0)


class _Exited(BaseException):
    pass


@pytest.fixture
def launcher_watch(monkeypatch):
    """`_stop_with_launcher` with what it does to this process recorded instead of done: returns the record."""
    calls = []
    real_kill = os.kill

    def kill(pid, signum):
        calls.append(("kill", pid, signum)) if pid == os.getpid() else real_kill(pid, signum)

    def exit_(code):
        calls.append(("exit", code))
        raise _Exited

    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(os, "killpg", lambda group, signum: calls.append(("killpg", group, signum)))
    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.setattr(time, "sleep", lambda seconds: calls.append(("sleep", seconds)))
    monkeypatch.setattr(train_module, "_set_parent_death_signal", lambda signum: calls.append(("pdeath", signum)))
    return calls


@needs_proc
@pytest.mark.parametrize("own_session", [True, False])
def test_a_trainer_whose_launcher_is_gone_stops_its_group_and_waits_for_the_cleanups(own_session, launcher_watch,
                                                                                   monkeypatch, capsys):
    """Where the launcher is no ancestor (gone, or its PID taken by another process) the trainer stops: SIGTERM to the
    run's process group (the other processes of the run, accelerate) where stage2-train made one, else to itself
    only (never to the caller's group), then 5 s for the cleanups the signal runs, then 143."""
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=own_session)
    try:
        monkeypatch.setenv(LAUNCHER_PID_ENV, str(launcher.pid))
        with pytest.raises(_Exited):
            train_module._stop_with_launcher()
    finally:
        launcher.kill()
        launcher.wait()
    stop = ("killpg", os.getpgrp(), signal.SIGTERM) if own_session else ("kill", os.getpid(), signal.SIGTERM)
    assert launcher_watch == [("pdeath", signal.SIGTERM), stop, ("sleep", 5), ("exit", 128 + signal.SIGTERM)]
    assert capsys.readouterr().err == f"stage2-train: the launcher (PID {launcher.pid}) is gone: stopping.\n"


@needs_proc
def test_a_launcher_gone_before_the_watch_starts_stops_the_group_and_a_bad_pid_is_ignored(launcher_watch,
                                                                                        monkeypatch):
    monkeypatch.setenv(LAUNCHER_PID_ENV, str(_gone_pid()))
    with pytest.raises(_Exited):
        train_module._stop_with_launcher()
    assert launcher_watch[1] == ("killpg", os.getpgrp(), signal.SIGTERM)
    launcher_watch.clear()
    for value in ("", "12x", "-5"):
        monkeypatch.setenv(LAUNCHER_PID_ENV, value)
        train_module._stop_with_launcher()  # not a stage2-train run: no watch
    assert launcher_watch == []


# ------------------------------------------------------------------------------------------- the process group
@needs_proc
def test_a_group_whose_last_process_exited_is_not_running_though_not_reaped():
    """Exited processes waiting to be reaped counted as running: the supervisor waited the whole grace period and
    more where the container's PID 1 reaps nothing."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert train_module._group_running(child.pid)
        child.kill()
        _wait_until(lambda: _state(child.pid) == "Z")
        assert not train_module._group_running(child.pid)
    finally:
        child.kill()
        child.wait()


_CLEANS_UP_ON_SIGTERM = """
import signal, sys, time
def stop(signum, frame):
    time.sleep(0.3)  # the cleanups
    open(sys.argv[1], "w").write("cleaned")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(30)
"""


@needs_proc
def test_stopping_the_group_leaves_time_for_cleanups_then_kills_what_ignores_sigterm(tmp_path):
    marker = tmp_path / "cleaned"
    child = subprocess.Popen([sys.executable, "-c", _CLEANS_UP_ON_SIGTERM, str(marker)], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        _ready(child)
        train_module._stop_group(child.pid, grace=10)
        assert child.wait(timeout=5) == 143 and marker.read_text() == "cleaned"
    finally:
        child.kill()
        child.wait()
    stubborn = _python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True);"
                       " time.sleep(30)", start_new_session=True)
    try:
        _ready(stubborn)
        train_module._stop_group(stubborn.pid, grace=0.3)
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait()


# A stand-in for `accelerate launch`: says how SIGINT came, notes the signals it gets, and on SIGTERM starts a
# process of its group that outlives it.
_ACCELERATE = """
import signal, subprocess, sys, time
log = sys.argv[1]
def note(text):
    with open(log, "a") as file:
        file.write(text + "\\n")
note("SIGINT ignored" if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else "SIGINT not ignored")
stop = []
def on_term(signum, frame):
    note("TERM " + str(subprocess.Popen(["sleep", "30"]).pid))
    stop.append(signum)
signal.signal(signal.SIGINT, lambda signum, frame: note("INT"))
signal.signal(signal.SIGTERM, on_term)
note("ready")
deadline = time.monotonic() + 20  # bounds a failure only
while not stop and time.monotonic() < deadline:
    time.sleep(0.01)
"""


@needs_proc
def test_the_supervisor_forwards_ctrl_c_then_a_second_as_sigterm_and_empties_the_group(tmp_path):
    """accelerate must ignore SIGINT (the trainer alone decides how to stop); the first Ctrl-C is forwarded as is,
    after marking the interrupt file, the second as SIGTERM (stop at once); what is left in the group is stopped and
    this process's handlers come back."""
    log, interrupted = tmp_path / "log", tmp_path / "interrupted"
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {signum: signal.getsignal(signum) for signum in signums}
    if before[signal.SIGINT] is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored in this test process")

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.is_file() else []

    def press_ctrl_c():  # only while the supervisor forwards it: never this test process's own Ctrl-C
        if signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]:
            os.kill(os.getpid(), signal.SIGINT)

    def press_ctrl_c_twice():
        _wait_until(lambda: "ready" in lines())
        press_ctrl_c()
        _wait_until(lambda: "INT" in lines())
        press_ctrl_c()

    presser = threading.Thread(target=press_ctrl_c_twice, daemon=True)
    presser.start()
    code, received = train_module.run_accelerate([sys.executable, "-c", _ACCELERATE, str(log)],
                                                 {**os.environ, INTERRUPT_FILE_ENV: str(interrupted)})
    presser.join(timeout=10)
    assert (code, received) == (0, [signal.SIGINT, signal.SIGINT])
    assert lines()[:3] == ["SIGINT ignored", "ready", "INT"] and lines()[3].startswith("TERM ")
    left = int(lines()[3].split()[1])
    try:
        _wait_until(lambda: _state(left) in (None, "Z"), timeout=5)
    finally:
        if _state(left) not in (None, "Z"):
            os.kill(left, signal.SIGKILL)
    assert interrupted.is_file()
    assert {signum: signal.getsignal(signum) for signum in signums} == before


def test_a_hangup_the_supervisor_was_started_ignoring_stays_ignored(tmp_path):
    """Under `nohup stage2-train` a hangup was still caught and forwarded: a run that went on to the end exited 129,
    "stopped by SIGHUP"."""
    ready, done = tmp_path / "ready", tmp_path / "done"
    script = ("import os, sys, time\nopen(sys.argv[1], 'w').close()\ndeadline = time.monotonic() + 20\n"
              "while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:\n    time.sleep(0.01)")
    term = signal.getsignal(signal.SIGTERM)
    ended = threading.Event()

    def hang_up_then_finish():
        _wait_until(lambda: ready.is_file() and signal.getsignal(signal.SIGTERM) is not term)
        if not ended.is_set():  # never once SIGHUP is this process's own again
            os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.2)
        done.touch()

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        hanger = threading.Thread(target=hang_up_then_finish, daemon=True)
        hanger.start()
        code, received = train_module.run_accelerate([sys.executable, "-c", script, str(ready), str(done)],
                                                     dict(os.environ))
        hanger.join(timeout=10)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        ended.set()
        signal.signal(signal.SIGHUP, previous)
    assert (code, received) == (0, [])


def test_the_exit_status_names_the_first_stopping_signal_and_a_finished_run_stays_0(tmp_path, capsys):
    from training.train import _exit_status

    nothing = tmp_path / "absent"
    assert _exit_status(-signal.SIGTERM, [signal.SIGHUP, signal.SIGTERM], nothing) == 128 + signal.SIGHUP
    assert capsys.readouterr().err == "stage2-train: stopped by SIGHUP.\n"
    assert _exit_status(0, [signal.SIGINT], nothing) == 0  # Ctrl-C as the run ended: it had finished
    assert _exit_status(1, [signal.SIGINT], nothing) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == ""  # one Ctrl-C is no "interrupted again"


# ------------------------------------------------------------------------------------------- stage2-train
@pytest.fixture
def no_launcher(monkeypatch):
    for name in ("ACCELERATE_LAUNCHED", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)


def test_stage2_train_under_accelerate_trains_in_its_own_process_and_says_a_ctrl_c(no_launcher, monkeypatch, capsys):
    """`accelerate launch stage2-train` sets LOCAL_RANK (not our own ACCELERATE_LAUNCHED): it launched again; a Ctrl-C
    during the checks was a failure (1), not an interrupt."""
    monkeypatch.setattr(train_module, "cli", lambda argv: 7)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train_module.launch_main(["--epochs", "1"]) == 7
    monkeypatch.delenv("LOCAL_RANK")

    def pressed(launcher):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "parse_accelerate_options", pressed)
    assert train_module.launch_main(["--epochs", "1"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "stage2-train: interrupted.\n"


def test_the_launch_passes_the_accelerate_options_and_the_training_flags_apart(monkeypatch):
    execs = []
    monkeypatch.setattr(train_module.os, "execv", lambda path, args: execs.append((path, args)))
    options, training = ["--num_processes", "1", "--quiet"], ["--config", "c.yaml", "--epochs", "1"]
    train_module.launch(options, training)
    [(path, args)] = execs
    assert path == sys.executable and args[:2] == [sys.executable, "-c"] and "supervise" in args[2]
    assert train_module.split_launcher_arguments(args[3:]) == (options, training)


def test_the_supervisor_tells_the_trainer_where_to_record_and_removes_both_files(tmp_path, monkeypatch):
    """The trainer watched the supervisor's parent (a shell that outlives it), or the status and interrupt files
    were left in the temporary folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    options, training = ["--quiet"], ["--epochs", "1"]
    seen = {}

    def run(command, env):
        seen.update(command=command, env=env)
        Path(env[STATUS_FILE_ENV]).write_text("130")  # the trainer's record after its checkpoint
        Path(env[INTERRUPT_FILE_ENV]).touch()  # the supervisor's, at the Ctrl-C
        return 1, [signal.SIGINT]

    monkeypatch.setattr(train_module, "run_accelerate", run)
    assert train_module.supervise([*options, "--", *training]) == EXIT_INTERRUPTED
    env = seen["env"]
    assert seen["command"] == train_module.accelerate_command(options, training)
    assert env[LAUNCHER_PID_ENV] == str(os.getpid()) and env["ACCELERATE_LAUNCHED"] == "1"
    assert env[INTERRUPT_FILE_ENV] == env[STATUS_FILE_ENV] + ".interrupted"
    assert Path(env[STATUS_FILE_ENV]).parent == tmp_path and list(tmp_path.iterdir()) == []


def test_accelerate_counts_the_gpus_of_multi_gpu_and_a_stray_argument_is_refused(tmp_path, monkeypatch):
    """`stage2-train --multi_gpu -- ...` ran one process (the default `--num_processes 1` added); a training flag
    without its `--` before the separator was taken for the script; accelerate's own error lost its hint."""
    from accelerate.commands import config as accelerate_config

    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "no_accelerate_config.yaml"))
    assert train_module.accelerate_arguments(["--multi_gpu"]) == [
        "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--quiet"]
    with pytest.raises(UsageError, match=r"unexpected argument 'data/tiles' before `--` \(only `accelerate launch`"):
        train_module.accelerate_arguments(["data/tiles"])
    with pytest.raises(UsageError, match=r"--num_procs.*\(training flags go after `--`\)$"):
        train_module.accelerate_arguments(["--num_procs", "2"])


def test_the_launchers_check_logs_and_warns_nothing(monkeypatch, caplog):
    """The trainer logs its own warnings: the launcher's check printed each a second time."""
    def parse_args(argv, without_devices=False):
        logging.getLogger("training.train").warning("a warning the trainer gives")
        warnings.warn("a warning the trainer gives", UserWarning)
        return None, None, {"output_dir": None}

    monkeypatch.setattr(train_module, "parse_args", parse_args)
    before = logging.root.manager.disable
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with pytest.raises(UsageError, match="--output_dir is required"):
            train_module.check_before_launch([])
    assert caplog.records == [] and caught == [] and logging.root.manager.disable == before


# ------------------------------------------------------------------------------------------- the demo
METRICS = ("ndvi_rmse", "evi_rmse", "sam")


def _split(refined, opt_v1=(0.1, 0.1, 0.1), linear_fit=(0.05, 0.05, 0.05)) -> dict:
    return {"refined": dict(zip(METRICS, refined)), "opt_v1": dict(zip(METRICS, opt_v1)),
            "linear_fit": dict(zip(METRICS, linear_fit)), "n_tiles": 2}


def test_the_demos_gains_and_verdict():
    """Relative reductions against each baseline (of the baseline's value), a tie is not a gain, and the colour fit is
    a bar of its own."""
    table = demo.gains(_split(refined=(0.04, 0.05, 0.06), opt_v1=(0.08, 0.0, 0.1)))
    assert table["ndvi_rmse"] == {"refined": 0.04, "opt_v1": 0.08, "reduction": 0.5, "linear_fit": 0.05,
                                  "reduction_vs_linear_fit": pytest.approx(0.2)}
    assert table["evi_rmse"]["reduction"] == 0.0  # a perfect opt_v1: nothing to reduce
    assert demo.not_beaten(table) == ["evi_rmse vs opt_v1", "evi_rmse vs the colour fit", "sam vs the colour fit"]
    assert demo.describe_gains(table) == (
        "ndvi_rmse 0.0800 -> 0.0400 (50.0% lower; colour fit 0.0500, 20.0% lower), "
        "evi_rmse 0.0000 -> 0.0500 (not lower; colour fit 0.0500, not lower), "
        "sam 0.1000 -> 0.0600 (40.0% lower; colour fit 0.0500, not lower)")
    without_fit = demo.gains({key: value for key, value in _split((0.04, 0.05, 0.06)).items() if key != "linear_fit"})
    assert without_fit["sam"] == {"refined": 0.06, "opt_v1": 0.1, "reduction": pytest.approx(0.4)}
    assert demo.not_beaten(without_fit) == []


def test_a_model_that_diverged_beats_no_baseline():
    """A refined output whose metrics are NaN (a model that diverged: NaN weights give NaN everywhere) compared as not
    `>=` any baseline, so the demo passed it with status 0 below "not lower" on every metric."""
    table = demo.gains(_split(refined=(math.nan, 0.01, math.nan)))
    assert demo.not_beaten(table) == ["ndvi_rmse vs opt_v1", "ndvi_rmse vs the colour fit", "sam vs opt_v1",
                                      "sam vs the colour fit"]
    assert "ndvi_rmse 0.1000 -> nan (not lower; colour fit 0.0500, not lower)" in demo.describe_gains(table)


@pytest.mark.parametrize("val, test, code", [((0.01, 0.01, 0.01), (0.04, 0.04, 0.06), 1),
                                             ((0.2, 0.2, 0.2), (0.01, 0.01, 0.01), 0),
                                             ((0.01, 0.01, 0.01), (math.nan, math.nan, math.nan), 1)])
def test_the_demo_judges_and_records_the_held_out_test_split(val, test, code, tmp_path, monkeypatch, capsys):
    """The verdict (exit status) and best/'s record are the test split's, held out from the choice of the best step,
    whatever the validation split says; demo_results.json keeps the step."""
    import data_builders.build
    import datasets
    import modeling_stage2
    import training.evaluate
    import training.metrics

    results = {"val": _split(val), "test": _split(test)}
    recorded = []
    monkeypatch.setattr(train_module, "run_training", lambda *args: SimpleNamespace(state=SimpleNamespace(
        global_step=7)))
    monkeypatch.setattr(train_module, "ensure_arrow_dataset", lambda data_args, output_dir: tmp_path / "dataset")
    monkeypatch.setattr(modeling_stage2, "load_trained_model", lambda path: "model")
    monkeypatch.setattr(datasets, "load_from_disk", lambda path: {"train": "train", "val": "val", "test": "test"})
    monkeypatch.setattr(data_builders.build, "recorded_opt_v1", lambda dataset_dict: None)
    monkeypatch.setattr(training.evaluate, "fit_color_baseline", lambda dataset_dict: "fit")
    monkeypatch.setattr(training.evaluate, "load_split", lambda path, split, dataset_dict: split)
    monkeypatch.setattr(training.evaluate, "evaluate_model", lambda model, dataset, **kwargs: results[dataset])
    monkeypatch.setattr(training.metrics, "format_metrics_table", lambda metrics: "TABLE")
    monkeypatch.setattr(demo, "record_held_out_results", lambda best, test_results: recorded.append((best,
                                                                                                   test_results)))
    out = tmp_path / "demo"
    assert demo.main(["--output_dir", str(out)]) == code
    assert recorded == [(out / "best", results["test"])]
    written = json.loads((out / "demo_results.json").read_text())
    assert written["global_step"] == 7 and sorted(written["gains"]) == ["test", "val"]
    assert ("(test split)" in capsys.readouterr().err) == (code == 1)


def test_the_demo_checks_the_inputs_before_it_trains(tmp_path, monkeypatch, capsys):
    """A missing --resume checkpoint was found by the training itself: a UsageError traceback, status 1."""
    monkeypatch.setattr(train_module, "run_training", lambda *args: pytest.fail("trained"))
    assert demo.main(["--output_dir", str(tmp_path / "demo"), "--resume", str(tmp_path / "no-checkpoint")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("python -m training.demo: error: --resume"), lines
