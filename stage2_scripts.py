"""The console scripts' entry points (`setup.cfg`): each imports its command's module, then runs its `main`.

Importing a command takes seconds (torch, transformers), and Python's Ctrl-C handler would turn a Ctrl-C in that time
into a KeyboardInterrupt in the middle of some library's import: a traceback of 20-30 lines. Nothing has started
then, so there is nothing to clean up: while the command is imported, SIGINT has its default action, as SIGTERM and
SIGHUP do, and the process ends at once with the shell's 128 + N and no output. From `main` on, the command's own
handling applies (`modeling_stage2._signals`, `training.train`); once `main` has returned, SIGINT's default action
again (the interpreter's exit is all that is left). This module imports only the standard library.
"""
from __future__ import annotations

import importlib
import signal
from contextlib import contextmanager
from typing import Iterator, Sequence


@contextmanager
def _ctrl_c_ends_at_once() -> Iterator[None]:
    """SIGINT's default action inside, Python's handler again after. A SIGINT that the caller ignores (`nohup`, a
    shell's background job) or handles its own way stays as it is."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_command(target: str, argv: Sequence[str] | None = None) -> int:
    """Import `target` ("package.module:function") with Ctrl-C ending the process at once, then call it with `argv`
    (None: the command line). Once it has returned, Ctrl-C ends the process at once again: only the interpreter's
    exit is left, where Python's handler would print a KeyboardInterrupt traceback."""
    module_name, function_name = target.split(":")
    with _ctrl_c_ends_at_once():
        module = importlib.import_module(module_name)
    status = getattr(module, function_name)(argv)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # one ignored or the command's own stays
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return status


# One function per console script of setup.cfg (stage2-NAME = stage2_scripts:NAME, with - as _).
def convert_prithvi(argv: Sequence[str] | None = None) -> int:
    return run_command("modeling_stage2.convert_prithvi:main", argv)


def ingest_bigearthnet(argv: Sequence[str] | None = None) -> int:
    return run_command("data_builders.bigearthnet:main", argv)


def build_dataset(argv: Sequence[str] | None = None) -> int:
    return run_command("data_builders.build:main", argv)


def inspect(argv: Sequence[str] | None = None) -> int:
    return run_command("data_builders.inspect:main", argv)


def train(argv: Sequence[str] | None = None) -> int:
    return run_command("training.train:launch_main", argv)


def evaluate(argv: Sequence[str] | None = None) -> int:
    return run_command("training.evaluate:main", argv)


def push(argv: Sequence[str] | None = None) -> int:
    return run_command("model_cards.push:main", argv)


def refine(argv: Sequence[str] | None = None) -> int:
    return run_command("inference_stage2.cli:main", argv)


def export(argv: Sequence[str] | None = None) -> int:
    return run_command("modeling_stage2.export:main", argv)
