"""Console scripts stop on SIGTERM and SIGHUP as they do on Ctrl-C: cleanly.

Python's default for SIGTERM and SIGHUP ends the process at once, so no `finally` runs and an atomic write in
progress (`_files.atomic_file`, a scene's partial GeoTIFF) leaves its temporary file behind. Within
`exit_on_termination` the signal raises `SystemExit(128 + N)` in the main thread instead: every cleanup runs, the
exit status is the shell's for a process killed by signal N, and no `except Exception` can swallow it. Ctrl-C
(KeyboardInterrupt) ends the same way, with status 130 and one line instead of a traceback. Once one of these
signals has come, the others are ignored until the decorated function is left: a second one (`kill` twice, a
supervisor repeating SIGTERM, Ctrl-C pressed again) would cut short the cleanups the first one started (SIGKILL
still stops a cleanup that hangs).
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
    """Stopping now: the signals the wrapper handles are ignored while the cleanups run."""
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)


def exit_on_termination(main: _Main) -> _Main:
    """Decorate a console script's `main`: SIGTERM and SIGHUP raise `SystemExit(128 + N)` while it runs (in the main
    thread only: signal handlers cannot be set elsewhere); the previous handlers are restored afterwards. A signal
    that was ignored (`nohup` ignores SIGHUP) or handled by the caller stays as it was. Ctrl-C returns 130. After the
    first of these signals the others are ignored until `main` is left, so that its cleanups run to the end."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return main(*args, **kwargs)
        handled = [signum for signum in TERMINATING_SIGNALS if signal.getsignal(signum) is signal.SIG_DFL]
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # a caller's own handler stays in place
            handled.append(signal.SIGINT)

        def stop(signum: int, frame) -> None:
            _ignore(handled)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

        previous = {signum: signal.signal(signum, stop) for signum in handled}
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:  # Ctrl-C: the cleanups have run; a traceback would only hide that
            print("interrupted", file=sys.stderr)
            return 128 + signal.SIGINT
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    return wrapper  # type: ignore[return-value]
