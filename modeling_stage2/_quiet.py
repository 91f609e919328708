"""Third-party log messages that users can do nothing about, dropped where they are logged (standard library only).

`drop_known_messages()` is installed before anything imports the library that logs them: by `modeling_stage2`'s
`__init__` and by `training`'s (whose modules import transformers, and with it bitsandbytes, before this package).
"""
from __future__ import annotations

import logging

BNB_KERNELS_HINT = "Failed to load CPU gemm_4bit_forward from kernels-community"
"""bitsandbytes logs it at import on CPUs with AVX512-BF16: a faster NF4 kernel it would fetch from the Hub through the
optional `kernels` package. It came first on stderr, before every command's one-line error."""

_KNOWN = {"bitsandbytes.backends.cpu.ops": (BNB_KERNELS_HINT,)}


def _is_unknown(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_KNOWN.get(record.name, ()))


def drop_known_messages() -> None:
    """Filter the known messages (and only those) out of their loggers; calling it again adds nothing."""
    for name in _KNOWN:
        logger = logging.getLogger(name)
        if _is_unknown not in logger.filters:
            logger.addFilter(_is_unknown)
