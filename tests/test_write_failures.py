"""Writes that fail for the machine's reasons (a full disk, a file size limit) in `stage2-refine`. GDAL flushes a
scene's blocks as the file closes and reports a block it cannot write only to its error handler: the scene closed as
if complete, cut short, replaced the earlier output and the command exited 0. A tile's write raised, and the command
printed three chained tracebacks. Both are now one line, exit 1, with the earlier output kept. The write failure is
real: the command runs under a file size limit (`RLIMIT_FSIZE`, with SIGXFSZ ignored, so a write past it fails with
EFBIG as a full disk fails with ENOSPC)."""
from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from _data_helpers import make_tile_dir  # noqa: E402
from _refiner_helpers import tiny_refiner_config  # noqa: E402
from inference_stage2.raster import check_written_whole  # noqa: E402
from test_inference import smooth_scene, write_geotiff  # noqa: E402

LIMIT_BYTES = 64 * 1024
"""Past the model's config, below a refined 120 x 120 tile (~460 KB) and the 300 x 300 scene (~1 MB compressed)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    from modeling_stage2 import Stage2RefinerModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("write_failures") / "model"
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(folder)
    return folder


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))


def _refine_under_the_limit(*args: str) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).parent / "stage2-refine"
    if not executable.exists():
        pytest.skip(f"stage2-refine is not installed beside {sys.executable}")
    return subprocess.run([str(executable), "--no_progress", "--num_threads", "1", *args], capture_output=True,
                          text=True, timeout=300, preexec_fn=_limit_file_size,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("side, cache_mb, said", [
    (300, None, "the GeoTIFF could not be written whole (reading it back: "),  # its blocks written as it closes
    (600, "1", "the GeoTIFF could not be written ("),  # past GDAL's block cache: written while it is refined
])
def test_a_scene_that_cannot_be_written_keeps_the_earlier_output_and_exits_1(side, cache_mb, said, model_dir, tmp_path,
                                                                              monkeypatch):
    """A scene within GDAL's block cache (5 % of the memory) is written as the file closes, where a failed block was
    only in GDAL's messages: it replaced the earlier output, cut short, exit 0. A larger one (1 MB of cache here) has
    blocks written while it is refined: the write itself fails (rasterio's `RasterioIOError`, no errno), which said
    `--output X: Write failed` with exit 2, a user error. Both are the machine's failure: exit 1, nothing replaced."""
    if cache_mb is not None:
        monkeypatch.setenv("GDAL_CACHEMAX", cache_mb)
    scene = write_geotiff(tmp_path / "scene.tif", smooth_scene(side, side), nodata=0)
    (tmp_path / "out").mkdir()
    earlier = write_geotiff(tmp_path / "out" / "refined.tif", smooth_scene(20, 20, seed=1), nodata=0)
    before = earlier.read_bytes()
    result = _refine_under_the_limit("--model", str(model_dir), "--input", str(scene), "--month", "7", "--biome", "4",
                                     "--output", str(earlier))
    assert result.returncode == 1, result.stderr[-2000:]
    *gdal, line = result.stderr.strip().splitlines()  # libtiff prints its own reason first ("File too large.")
    assert all(printed.startswith("_tiff") for printed in gdal) and "Traceback" not in result.stderr
    assert line.startswith(f"stage2-refine: error: [Errno {errno.EIO}] {said}")
    assert line.endswith(f"is the disk full? Nothing was replaced: '{earlier}'") and "wrote" not in result.stdout
    assert earlier.read_bytes() == before and sorted(os.listdir(earlier.parent)) == ["refined.tif"]


def test_tiles_that_cannot_be_written_are_one_line_and_exit_1(model_dir, tmp_path):
    tiles = make_tile_dir(tmp_path / "tiles", per_split=1)
    result = _refine_under_the_limit("--model", str(model_dir), "--input", str(tiles), "--output_dir",
                                     str(tmp_path / "refined"))
    assert result.returncode == 1, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line == f"stage2-refine: error: --output_dir {tmp_path / 'refined'}: [Errno {errno.EFBIG}] " \
                   f"{os.strerror(errno.EFBIG)}"
    assert not [path for path in (tmp_path / "refined").rglob("*") if path.is_file()]  # no partial tile left


def test_a_geotiff_cut_short_is_named_by_the_name_it_was_to_take(tmp_path):
    whole = write_geotiff(tmp_path / ".partial.tif", np.stack([smooth_scene(300, 300)[0]] * 4), nodata=0)
    check_written_whole(whole, tmp_path / "refined.tif")  # whole: nothing to say
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(OSError) as raised:
        check_written_whole(whole, tmp_path / "refined.tif")
    assert raised.value.errno == errno.EIO and raised.value.filename == str(tmp_path / "refined.tif")
    assert raised.value.strerror.startswith("the GeoTIFF could not be written whole (reading it back: ")
