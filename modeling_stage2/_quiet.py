"""Third-party log messages that users can do nothing about, dropped where they are logged (standard library only).

`drop_known_messages()` is installed before anything imports the library that logs them: by `modeling_stage2`'s
`__init__` and by `training`'s (whose modules import transformers, and with it bitsandbytes, before this package).
Some are dropped every time (`_KNOWN`), others are said once in a process and dropped after (`_ONCE`).
`no_loading_progress_bars()` turns off, for a `with` block, the bars transformers and huggingface_hub draw while a
model is downloaded, loaded or saved (a command's `--no_progress`).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

BNB_KERNELS_HINT = "Failed to load CPU gemm_4bit_forward from kernels-community"
"""bitsandbytes logs it at import on CPUs with AVX512-BF16: a faster NF4 kernel it would fetch from the Hub through the
optional `kernels` package. It came first on stderr, before every command's one-line error."""

BNB_INT8_CAST = "MatMul8bitLt: inputs will be cast from"
"""bitsandbytes logs it on every call of an 8-bit linear layer whose input is not float16 (a float32 refiner loaded in
8 bit): once per quantized layer and batch, thousands of lines for a scene. Said once; the rest are dropped."""

_KNOWN = {"bitsandbytes.backends.cpu.ops": (BNB_KERNELS_HINT,)}
_ONCE = {"bitsandbytes.autograd._functions": (BNB_INT8_CAST,)}
_said: set[tuple[str, str]] = set()  # the (logger, message) of `_ONCE` already let through in this process


def _is_unknown(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    if message.startswith(_KNOWN.get(record.name, ())):
        return False
    once = next((start for start in _ONCE.get(record.name, ()) if message.startswith(start)), None)
    if once is None:
        return True
    if (record.name, once) in _said:
        return False
    _said.add((record.name, once))
    return True


def drop_known_messages() -> None:
    """Filter the known messages (and only those) out of their loggers; calling it again adds nothing."""
    for name in {**_KNOWN, **_ONCE}:
        logger = logging.getLogger(name)
        if _is_unknown not in logger.filters:
            logger.addFilter(_is_unknown)


@contextlib.contextmanager
def no_loading_progress_bars() -> Iterator[None]:
    """No progress bar of transformers (`Loading weights`, `Writing model shards`) or huggingface_hub (`Fetching N
    files`, downloads) inside the block; each library's setting is as it was after it. An `HF_HUB_DISABLE_PROGRESS_BARS`
    environment variable keeps priority over both, silently (huggingface_hub warns where it overrides a call)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_was_on = not are_progress_bars_disabled()
    transformers_was_on = transformers_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers_logging.disable_progress_bar()  # huggingface_hub's too
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if transformers_was_on:
                transformers_logging.enable_progress_bar()  # huggingface_hub's too
            if hub_was_on and not transformers_was_on:
                enable_progress_bars()
            elif transformers_was_on and not hub_was_on:
                disable_progress_bars()
