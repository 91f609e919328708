"""Console scripts stop on SIGTERM and SIGHUP as they do on Ctrl-C: cleanly.

Python's default for SIGTERM and SIGHUP ends the process at once, so no `finally` runs and an atomic write in
progress (`_files.atomic_file`, a scene's partial GeoTIFF) leaves its temporary file behind. Within
`exit_on_termination` the signal raises `SystemExit(128 + N)` in the main thread instead: every cleanup runs, the
exit status is the shell's for a process killed by signal N, and no `except Exception` can swallow it. Ctrl-C
(KeyboardInterrupt) ends the same way, with status 130 and one line instead of a traceback.
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


def _raise_exit(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def exit_on_termination(main: _Main) -> _Main:
    """Decorate a console script's `main`: SIGTERM and SIGHUP raise `SystemExit(128 + N)` while it runs (in the main
    thread only: signal handlers cannot be set elsewhere); the previous handlers are restored afterwards. A signal
    that was ignored (`nohup` ignores SIGHUP) or handled by the caller stays as it was. Ctrl-C returns 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return main(*args, **kwargs)
        previous = {signum: signal.signal(signum, _raise_exit) for signum in TERMINATING_SIGNALS
                    if signal.getsignal(signum) is signal.SIG_DFL}
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:  # Ctrl-C: the cleanups have run; a traceback would only hide that
            print("interrupted", file=sys.stderr)
            return 128 + signal.SIGINT
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    return wrapper  # type: ignore[return-value]
