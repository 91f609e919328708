"""Writing model folders so that a failed or interrupted save never leaves a half-written one."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged_folder(output_dir: Path) -> Iterator[Path]:
    """Yield a new folder beside `output_dir` to write into; when the block succeeds, it replaces `output_dir`.

    The old `output_dir` is set aside before the new one is moved in and deleted only then; if the block raises,
    the staging folder is removed and `output_dir` is left as it was.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield staging
        if output_dir.exists():
            retired = staging.with_name(staging.name + "-old")
            output_dir.rename(retired)
            staging.rename(output_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
