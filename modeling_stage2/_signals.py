"""Console scripts stop on SIGTERM and SIGHUP as they do on Ctrl-C: cleanly.

Python's default for SIGTERM and SIGHUP ends the process at once, so no `finally` runs and an atomic write in
progress (`_files.atomic_file`, a scene's partial GeoTIFF) leaves its temporary file behind. Within
`exit_on_termination` the signal raises `SystemExit(128 + N)` in the main thread instead: every cleanup runs, the
exit status is the shell's for a process killed by signal N, and no `except Exception` can swallow it. Ctrl-C
(KeyboardInterrupt) ends the same way, with status 130 and one line instead of a traceback. Once one of these
signals has come, the others are ignored, and stay ignored once the decorated function is left: a second one (`kill`
twice, a supervisor repeating SIGTERM, Ctrl-C pressed again) would cut short the cleanups the first one started, and
the process's way out is one of them (joining the threads still running, the `atexit` handlers: a multiprocessing
pool's workers, temporary folders). SIGKILL still stops a cleanup that hangs. A signal whose exception Python drops
(it came while a finaliser, `__del__`, ran) does not stop the run: the signals are handled again, and the next one
stops it (one line says so).
(`stage2-train` supervises a process tree and has its own handling, `training.train`.)
"""
from __future__ import annotations

import functools
import signal
import sys
import threading
from typing import Callable, TypeVar

TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

_Main = TypeVar("_Main", bound=Callable[..., int])


def _ignore(signums) -> None:
    """Stopping now: the signals the wrapper handles are ignored while the cleanups run. By a Python handler that does
    nothing, not SIG_IGN: a signal already pending (a supervisor's SIGHUP and a launcher's SIGTERM arrive together)
    would find SIG_IGN and Python would print "Signal N ignored due to race condition" with a traceback. At its very
    end the interpreter puts Python handlers back to the default."""
    for signum in signums:
        signal.signal(signum, _do_nothing)


def _do_nothing(signum: int, frame) -> None:
    pass


def exit_on_termination(main: _Main) -> _Main:
    """Decorate a console script's `main`: SIGTERM and SIGHUP raise `SystemExit(128 + N)` while it runs (in the main
    thread only: signal handlers cannot be set elsewhere); the previous handlers are restored when it ends. A signal
    that was ignored (`nohup` ignores SIGHUP) or handled by the caller stays as it was. Ctrl-C returns 130. After the
    first of these signals the others are ignored, then and after `main` is left (the process is on its way out),
    so that its cleanups and the interpreter's exit run to the end."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return main(*args, **kwargs)
        handled = [signum for signum in TERMINATING_SIGNALS if signal.getsignal(signum) is signal.SIG_DFL]
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # a caller's own handler stays in place
            handled.append(signal.SIGINT)

        stopped = []

        def stop(signum: int, frame) -> None:
            _ignore(handled)
            stopped.append(signum)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

        def dropped(unraisable) -> None:
            """Python's report of an exception it drops: raised in a finaliser (`__del__`, a weakref callback, the
            garbage collector), `stop`'s exception does not stop the run. The signals are then handled again, so the
            next one stops it (ignored, no signal could)."""
            code = 128 + stopped[-1] if stopped else None
            exception = unraisable.exc_value
            if code and (isinstance(exception, SystemExit) and exception.code == code
                         or isinstance(exception, KeyboardInterrupt) and stopped[-1] == signal.SIGINT):
                stopped.clear()
                for signum in handled:
                    signal.signal(signum, stop)
                print(f"{signal.Signals(code - 128).name} came while a finaliser ran, where Python drops its "
                      "exception: the run goes on; send it again to stop it", file=sys.stderr)
            else:
                unraisable_hook(unraisable)

        unraisable_hook, sys.unraisablehook = sys.unraisablehook, dropped
        previous = {signum: signal.signal(signum, stop) for signum in handled}
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:  # Ctrl-C: the cleanups have run; a traceback would only hide that
            print("interrupted", file=sys.stderr)
            return 128 + signal.SIGINT
        finally:
            if sys.unraisablehook is dropped:
                sys.unraisablehook = unraisable_hook
            if not stopped:  # after a signal they stay ignored: what follows is the exit, a cleanup too
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    return wrapper  # type: ignore[return-value]
