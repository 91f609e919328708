"""A `.pt2` graph is read only when nothing in it unpickles: `torch.export.load` would run `torch.load(...,
weights_only=False)` on pickled weights, legacy files and sample inputs that the safe load refuses."""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from _refiner_helpers import tiny_refiner_config
from modeling_stage2.onnx_runtime import ExportedRefiner
from modeling_stage2.pt2_archive import check_pt2_archive


class _Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.register_buffer("offset", torch.ones(2))

    def forward(self, x):
        return self.linear(x) + self.offset


class _WritesAFile:
    """Unpickling it creates `marker`: what a crafted file could do with anything else."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def graph(tmp_path) -> Path:
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(_Affine(), (torch.randn(1, 3),)), str(path))
    return path


def _rewrite(path: Path, change) -> Path:
    """A copy of the archive at `path` with `change(name, data)` -> (name, data) or None (dropped) per entry; `change`
    may also return a list of extra entries under the key None."""
    out = path.with_name("crafted.pt2")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            changed = change(name, source.read(name))
            for entry in changed if isinstance(changed, list) else [changed]:
                if entry is not None:
                    target.writestr(*entry)
    return out


def _entry(path: Path, suffix: str) -> str:
    with zipfile.ZipFile(path) as archive:
        return next(name for name in archive.namelist() if name.endswith(suffix))


def test_an_archive_torch_export_writes_for_a_plain_model_is_accepted(graph):
    check_pt2_archive(graph)


def test_sample_inputs_that_would_unpickle_code_are_refused_before_torch_reads_them(graph, tmp_path):
    marker = tmp_path / "ran"
    sample = _entry(graph, "data/sample_inputs/model.pt")
    crafted = _rewrite(graph, lambda name, data: (name, pickle.dumps(_WritesAFile(marker)) if name == sample else data))
    with pytest.raises(ValueError, match=rf"crafted.pt2: entry '{sample}' holds sample inputs that do not load with "
                                         r"weights_only=True \(UnpicklingError\); refusing to load it"):
        ExportedRefiner(crafted, config=tiny_refiner_config())
    assert not marker.exists()
    with pytest.raises(Exception):  # what torch itself does with the file: the unsafe fallback runs the code
        torch.export.load(str(crafted))
    assert marker.exists()


def test_pickled_and_legacy_weights_and_objects_are_refused(graph):
    config_name = _entry(graph, "data/weights/model_weights_config.json")
    root = config_name.split("data/")[0]

    def weight_entry(**fields):
        def change(name, data):
            if name != config_name:
                return name, data
            config = json.loads(data)
            next(iter(config["config"].values())).update(fields)
            return name, json.dumps(config)
        return change

    for use_pickle in (True, 1, None):  # only a literal false is safe: torch pickles on any truthy value
        with pytest.raises(ValueError, match=rf"entry '{config_name}' stores 'linear.weight' pickled"):
            check_pt2_archive(_rewrite(graph, weight_entry(use_pickle=use_pickle)))
    with pytest.raises(ValueError, match=r"stores 'linear.weight' as an object to unpickle \('model.pt'\)"):
        check_pt2_archive(_rewrite(graph, weight_entry(use_pickle=False, path_name="model.pt")))
    legacy = _rewrite(graph, lambda name, data: [(name, data)] + ([(f"{root}data/weights/model.pt", b"x")]
                                                                  if name == config_name else []))
    with pytest.raises(ValueError, match=r"model.pt' is neither raw tensor data nor a JSON config"):
        check_pt2_archive(legacy)
    custom = _rewrite(graph, lambda name, data: [(name, data)] + ([(f"{root}data/constants/custom_obj_0", b"x")]
                                                                  if name == config_name else []))
    with pytest.raises(ValueError, match=r"custom_obj_0' is neither raw tensor data"):
        check_pt2_archive(custom)


def test_the_old_layout_and_other_files_are_refused(graph, tmp_path):
    old = tmp_path / "old.pt2"
    with zipfile.ZipFile(old, "w") as archive:  # torch 2.7's layout, read through torch.load(weights_only=False)
        archive.writestr("version", "8.0")
        archive.writestr("serialized_state_dict.pt", b"x")
    with pytest.raises(ValueError, match=r"old.pt2: not a torch.export archive of the current layout"):
        check_pt2_archive(old)
    stray = _rewrite(graph, lambda name, data: [(name, data)] + ([("serialized_state_dict.pt", b"x")]
                                                                 if name.endswith("archive_format") else []))
    with pytest.raises(ValueError, match=r"entry 'serialized_state_dict.pt' lies outside the archive's folder"):
        check_pt2_archive(stray)
    (tmp_path / "text.pt2").write_text("not a zip")
    with pytest.raises(ValueError, match=r"text.pt2: not a torch.export archive \(File is not a zip file\)"):
        check_pt2_archive(tmp_path / "text.pt2")


def test_a_model_named_like_a_tensor_file_cannot_bring_legacy_weights(graph, tmp_path):
    """A file named `weight_<anything>` passed as raw tensor data; with the model renamed `weight_9`, torch reads
    `data/weights/weight_9.pt` as that model's legacy weights, through `torch.load(weights_only=False)`."""
    marker = tmp_path / "ran"
    config_name = _entry(graph, "data/weights/model_weights_config.json")
    legacy = config_name.replace("model_weights_config.json", "weight_9.pt")

    def rename(name, data):
        if name == config_name:
            return legacy, pickle.dumps(_WritesAFile(marker))
        return name.replace("/model.json", "/weight_9.json").replace("/model.pt", "/weight_9.pt").replace(
            "/model_constants_config.json", "/weight_9_constants_config.json"), data

    crafted = _rewrite(graph, rename)
    with pytest.raises(ValueError, match=rf"entry '{legacy}' is neither raw tensor data nor a JSON config"):
        ExportedRefiner(crafted, config=tiny_refiner_config())
    assert not marker.exists()
    with pytest.raises(Exception):  # what torch itself does with the file: the legacy weights are unpickled
        torch.export.load(str(crafted))
    assert marker.exists()
