"""Hostile NPZ files: members that inflate far beyond what their `.npy` header declares.

Every reader of NPZ tiles (the builder's `read_tile` / `read_stage1`, `stage2-refine`) must refuse
them by file and key after decompressing no more than the header allows, so peak memory stays
small whatever the zip holds (issue 11, item 11).
"""
from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_helpers import tile_arrays

from data_builders.tiles import TileError, read_stage1, read_tile

BOMB_ZEROS = 300 * 2**20  # deflates to ~1.4 MB at level 1: a second to write, 300 MB to inflate
PEAK_LIMIT = 50 * 2**20


def npy_bytes(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    """`array` as a `.npy` file of format `version` (numpy's choice when None)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    return buffer.getvalue()


def write_npz(path: Path, members: dict[str, bytes], bomb: str | None = None, zeros: int = BOMB_ZEROS,
              compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip of `members` (name -> bytes); member `bomb` is followed by `zeros` zero bytes."""
    with zipfile.ZipFile(path, "w", compression, compresslevel=1) as archive:
        for name, data in members.items():
            with archive.open(name, "w") as member:
                member.write(data)
                if name == bomb:
                    chunk = bytes(2**20)
                    for _ in range(zeros // len(chunk)):
                        member.write(chunk)
    return path


def tile_members() -> dict[str, bytes]:
    """The `.npy` members of a valid tile whose `s2_b2` is all zeros (so a bomb's zeros look like band data)."""
    arrays = tile_arrays(s1=False) | {"s2_b2": np.zeros((120, 120), np.uint16)}
    return {f"{key}.npy": npy_bytes(np.asarray(value)) for key, value in arrays.items()}


def set_directory_size(path: Path, name: str, size: int) -> None:
    """Overwrite the uncompressed size the central directory records for member `name`."""
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")  # end of central directory record (the zip has no comment)
    count, position = struct.unpack_from("<H", data, end + 10)[0], struct.unpack_from("<I", data, end + 16)[0]
    for _ in range(count):
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, position + 28)
        if data[position + 46 : position + 46 + name_length] == name.encode():
            struct.pack_into("<I", data, position + 24, size)
            path.write_bytes(bytes(data))
            return
        position += 46 + name_length + extra_length + comment_length
    raise AssertionError(f"{name} not in the central directory of {path}")


def rejection_and_peak(read) -> tuple[TileError, int]:
    """The TileError `read()` raises and the peak of traced allocations while it ran: tracemalloc
    sees bytes objects and numpy arrays, where an inflated member would land."""
    tracemalloc.start()
    try:
        with pytest.raises(TileError) as caught:
            read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return caught.value, peak


BOMBS = {
    # a band of the plain layout followed by 300 MB of zeros (the fast reader's case)
    "trailing zeros after a band": (tile_members, "s2_b2.npy", "s2_b2", "trailing data"),
    # layouts np.load reads: a Fortran-ordered array, and a member that is not a .npy at all
    "trailing zeros after a Fortran array": (
        lambda: tile_members() | {"extra.npy": npy_bytes(np.asfortranarray(np.zeros((3, 4))))},
        "extra.npy", "extra", "trailing data"),
    "a raw member": (lambda: tile_members() | {"notes.txt": b"hello"}, "notes.txt", "notes.txt", "limit"),
}


@pytest.mark.parametrize("case", list(BOMBS))
def test_npz_bomb_is_rejected_by_the_builder_without_inflating(tmp_path, case):
    members, bomb, key, problem = BOMBS[case]
    path = write_npz(tmp_path / "bomb.npz", members(), bomb=bomb)
    assert path.stat().st_size < 2 * 2**20
    error, peak = rejection_and_peak(lambda: read_tile(path))
    assert error.path == str(path) and error.key == key and problem in error.problem
    assert str(path) in str(error) and "\n" not in str(error)
    assert peak < PEAK_LIMIT, f"peak allocation {peak / 2**20:.0f} MiB"


def test_npz_bomb_in_a_stage1_file_is_rejected(tmp_path):
    opt_v1 = np.zeros((4, 120, 120), np.float32)
    path = write_npz(tmp_path / "stage1.npz", {"opt_v1.npy": npy_bytes(opt_v1)}, bomb="opt_v1.npy")
    error, peak = rejection_and_peak(lambda: read_stage1(path))
    assert error.key == "opt_v1" and "trailing data" in error.problem and str(path) in str(error)
    assert peak < PEAK_LIMIT, f"peak allocation {peak / 2**20:.0f} MiB"


def test_header_declaring_more_than_the_limit_is_refused_before_reading(tmp_path):
    from data_builders.tiles import NPZ_MAX_BYTES

    # an honest member: header and directory agree on a 4096 x 4096 float64 array (128 MiB)
    huge = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1)))
    huge["shape"] = (4096, 4096)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, huge)
    assert 4096 * 4096 * 8 > NPZ_MAX_BYTES
    members = tile_members() | {"extra.npy": header.getvalue()}
    path = write_npz(tmp_path / "huge.npz", members, bomb="extra.npy", zeros=4096 * 4096 * 8)
    error, peak = rejection_and_peak(lambda: read_tile(path))
    assert error.key == "extra" and "(4096, 4096) float64" in error.problem and "limit" in error.problem
    assert peak < PEAK_LIMIT, f"peak allocation {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_members_compressed_otherwise_than_np_savez_are_refused_unopened(tmp_path, compression):
    # zipfile inflates a bzip2/LZMA chunk whole: reading 8 header bytes would inflate all 64 MiB
    path = write_npz(tmp_path / "other.npz", tile_members(), bomb="s2_b2.npy", zeros=64 * 2**20,
                     compression=compression)
    error, peak = rejection_and_peak(lambda: read_tile(path))
    assert error.key == "s2_b2"  # the first member: refused before anything is inflated
    assert f"compressed with zip method {compression}" in error.problem and str(path) in str(error)
    assert peak < PEAK_LIMIT, f"peak allocation {peak / 2**20:.0f} MiB"


def test_directory_understating_a_member_is_read_no_further_than_its_header(tmp_path):
    # the directory claims the size the header implies; the stream holds 300 MB more
    members = tile_members()
    path = write_npz(tmp_path / "liar.npz", members, bomb="s2_b2.npy")
    set_directory_size(path, "s2_b2.npy", len(members["s2_b2.npy"]))
    error, peak = rejection_and_peak(lambda: read_tile(path))
    assert error.key == "s2_b2" and "corrupt or truncated" in error.problem  # the CRC covers all 300 MB
    assert peak < PEAK_LIMIT, f"peak allocation {peak / 2**20:.0f} MiB"


def test_valid_tile_with_unusual_layouts_still_reads(tmp_path):
    from data_builders.tiles import load_npz

    # members the fast reader leaves to np.load, within their bounds: same result as np.load
    members = tile_members() | {"extra.npy": npy_bytes(np.asfortranarray(np.arange(12.0).reshape(3, 4))),
                                "notes.txt": b"hello"}
    path = write_npz(tmp_path / "fine.npz", members)
    tile = read_tile(path)
    assert tile.target.shape == (4, 120, 120) and (tile.target[0] == 0).all()
    loaded, expected = load_npz(path), np.load(path, allow_pickle=False)
    assert sorted(loaded) == sorted(expected.files) and loaded["notes.txt"] == expected["notes.txt"] == b"hello"
    np.testing.assert_array_equal(loaded["extra"], expected["extra"])


class _Gain(torch.nn.Module):
    def forward(self, opt_v1, month, biome):
        return opt_v1 * 2


def test_npz_bomb_is_rejected_by_stage2_refine_without_inflating(tmp_path):
    from inference_stage2 import InferenceInputError, refine_tiles

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    write_npz(tiles / "good.npz", tile_members())
    bomb = write_npz(tiles / "bomb.npz", tile_members(), bomb="s2_b2.npy")
    tracemalloc.start()
    try:
        summary = refine_tiles(_Gain(), tiles, tmp_path / "out", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.written == ["good.npz"]
    [(rejected, reason)] = summary.rejected
    assert rejected == str(bomb) and str(bomb) in reason and "'s2_b2'" in reason and "trailing data" in reason
    assert peak < PEAK_LIMIT, f"peak allocation {peak / 2**20:.0f} MiB"
    with pytest.raises(InferenceInputError, match="bomb.npz.*trailing data"):
        refine_tiles(_Gain(), tiles, tmp_path / "strict", strict=True, progress=False)
