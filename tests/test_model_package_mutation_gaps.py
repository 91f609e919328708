"""Tests closing the gaps a mutation audit of modeling_stage2 (adapters, hub, configuration, _files) found: each
fails under a plausible bug that the rest of the suite let pass."""
from __future__ import annotations

import pytest

from _refiner_helpers import tiny_refiner_config


# ------------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("name", ["num_months", "head_width", "lora_r", "num_convnext_blocks"])
def test_a_bool_is_not_taken_for_a_count(name):
    """True is an int to Python (== 1): a count given as a flag is refused, not read as 1."""
    with pytest.raises(ValueError, match=rf"^{name} must be a positive integer, got True\.$"):
        tiny_refiner_config(**{name: True})


def test_feature_layers_may_count_every_block_from_the_end():
    """-depth is the first block, as in Python indexing: [-2, -1] of the 2-block backbone is blocks 0 and 1."""
    assert tiny_refiner_config(feature_layers=[-2, -1]).feature_layers == [0, 1]
    with pytest.raises(ValueError, match="block -3 does not exist in a backbone of depth 2"):
        tiny_refiner_config(feature_layers=[-3])


@pytest.mark.parametrize(("head_width", "expected"), [(64, [64, 32, 16, 16]), (16, [16, 16, 16, 16]), (8, [8] * 4)])
def test_head_stages_halve_down_to_16_channels_never_below(head_width, expected):
    """The documented rule: each stage halves the first one's width, never below 16 (nor above the first's)."""
    assert tiny_refiner_config(head_width=head_width, num_convnext_blocks=4).head_widths == expected


def test_lora_may_go_on_every_block_counted_from_the_end():
    """unfreeze_last_n_blocks equal to the depth is every block (as None is); one more is refused."""
    assert tiny_refiner_config(unfreeze_last_n_blocks=2).lora_blocks == [0, 1]
    with pytest.raises(ValueError, match="unfreeze_last_n_blocks=3 exceeds the backbone depth 2"):
        tiny_refiner_config(unfreeze_last_n_blocks=3)


def test_a_band_listed_twice_in_another_case_is_refused_as_a_repeat():
    """Band names are case-insensitive (`canonical_band_name`): "b02" after "B02" is the same band twice."""
    with pytest.raises(ValueError, match=r"^bands lists a band more than once: \['B02', 'b02', 'B04', 'B08'\]\.$"):
        tiny_refiner_config(bands=["B02", "b02", "B04", "B08"], backbone_config="prithvi_eo_v2_tiny")


def test_the_refiners_dtype_reaches_its_backbone_unless_the_backbone_names_its_own():
    import torch

    from _refiner_helpers import tiny_backbone_config

    assert tiny_refiner_config(dtype=torch.bfloat16).backbone_config.dtype == torch.bfloat16
    own = tiny_refiner_config(backbone_config=tiny_backbone_config(dtype="float32"), dtype="float16")
    assert (own.dtype, own.backbone_config.dtype) == (torch.float16, torch.float32)


# -------------------------------------------------------------------------------------------------------- _files


def _gone_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()  # a process id that no process has now
    return process.pid


def test_a_staged_save_removes_the_staging_folders_of_killed_saves_only(tmp_path):
    """A save killed by SIGKILL leaves its hidden staging folder (a whole model) beside the output; the next save
    of that output removes it, and keeps a live process's (a save in progress, this process's own too) and other
    outputs'."""
    import os

    from modeling_stage2._files import staged_folder

    left = tmp_path / f".best.tmp-{_gone_pid()}-0123abcd"
    kept = [tmp_path / f".best.tmp-{os.getppid()}-0123abcd", tmp_path / f".other.tmp-{_gone_pid()}-0123abcd",
            tmp_path / f".best.tmp-{os.getpid()}-89abcdef"]  # this process's own: a save in another thread
    for folder in (left, *kept):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a model")
    with staged_folder(tmp_path / "best") as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best", *(p.name for p in kept)])
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["config.json"]


def test_the_nested_staging_folder_of_a_killed_model_save_is_removed_too(tmp_path):
    """`best/` is staged, and the model saved into that staging folder is staged beside it again: killed then (an
    out-of-memory kill), `..best.tmp-PID-X.tmp-PID-Y`, a whole model, was left for good, since the next save looked
    for `.best.tmp-*` only. A live process's and another output's (`.mybest`, `..other`) stay."""
    import os

    from modeling_stage2._files import staged_folder

    gone = _gone_pid()
    left = [tmp_path / f"..best.tmp-{gone}-0123abcd.tmp-{gone}-4567cdef", tmp_path / f".best.tmp-{gone}-0123abcd"]
    kept = [tmp_path / f"..best.tmp-{os.getppid()}-0123abcd.tmp-{os.getppid()}-4567cdef",
            tmp_path / f".mybest.tmp-{gone}-0123abcd", tmp_path / f"..other.tmp-{gone}-0123abcd.tmp-{gone}-0"]
    for folder in (*left, *kept):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"a whole model")
    with staged_folder(tmp_path / "best") as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best", *(p.name for p in kept)])


def test_write_json_ends_with_a_newline_and_keeps_key_order_unless_asked(tmp_path):
    from modeling_stage2._files import write_json

    assert write_json(tmp_path / "a.json", {"b": 1, "a": [2]}).read_text() == '{\n  "b": 1,\n  "a": [\n    2\n  ]\n}\n'
    assert write_json(tmp_path / "s.json", {"b": 1, "a": 2}, sort_keys=True, indent=None).read_text() == \
        '{"a": 2, "b": 1}\n'


def test_an_output_under_a_folder_nothing_can_be_written_in_is_named_with_the_reason(tmp_path, monkeypatch):
    """Found by trying to create a file in the nearest existing folder (root passes any permission check, so the
    refusal of a read-only file system is simulated here)."""
    import errno
    import tempfile

    from modeling_stage2 import _files

    tried = []

    def read_only(*args, dir=None, **kwargs):
        tried.append(dir)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert _files.output_path_problem(tmp_path / "new" / "out.json") == \
        f"nothing can be written in {tmp_path} (Read-only file system)"
    assert _files.output_path_problem(tmp_path, folder=True) == \
        f"nothing can be written in {tmp_path} (Read-only file system)"
    assert tried == [tmp_path, tmp_path]


# ----------------------------------------------------------------------------------------------------------- hub


@pytest.mark.parametrize(("text", "expected"), [
    ("me/stage2-refiner", True), ("ibm-nasa-geospatial/Prithvi-EO-2.0-600M", True), ("a/b/c", False),
    ("./x/y", False), ("/abs/y", False), ("./model", False), ("../model", False), ("me/", False), ("model", False),
])
def test_a_hub_repo_id_is_owner_slash_name_and_never_a_relative_path(text, expected):
    """`./model` and `../model` are local folders: taken for a repo id, a missing one was looked up on the Hub."""
    from modeling_stage2.hub import is_hub_repo_id

    assert is_hub_repo_id(text) is expected


def test_a_model_download_fetches_code_configs_weights_and_graphs_never_pickles():
    """The filter `download_model_folder` gives `snapshot_download` (MODEL_FILE_PATTERNS, SUBFOLDER_FILES left out):
    remote code (`--include_code`) and exported graphs at the top level (.pt2, ONNX with its external data) come
    along; no pickle, no dataset, no checkpoint, and no subfolder (an export `stage2-push` sent along)."""
    from huggingface_hub.utils import filter_repo_objects

    from modeling_stage2.hub import MODEL_FILE_PATTERNS, SUBFOLDER_FILES

    wanted = ["config.json", "adapter_model.safetensors", "README.md", "preview.png", "modeling_stage2.py",
              "model.pt2", "model.onnx", "model.onnx.data"]
    unwanted = ["pytorch_model.bin", "checkpoint-10/optimizer.pt", "data/train.arrow", "training_log.jsonl",
                "onnx/model.onnx", "onnx/config.json", "export/model.pt2"]
    kept = list(filter_repo_objects(wanted + unwanted, allow_patterns=list(MODEL_FILE_PATTERNS),
                                    ignore_patterns=[SUBFOLDER_FILES]))
    assert kept == wanted


def test_a_revision_of_a_local_path_given_with_a_tilde_is_refused(tmp_path, monkeypatch):
    from modeling_stage2.hub import local_revision_problem

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    assert local_revision_problem("~/model", "v1") == "~/model is a local path, read as it is; a revision applies to " \
                                                      "a Hub repo id: leave it out"
    assert local_revision_problem("~/model", None) is None and local_revision_problem("me/model", "v1") is None


def _http_error(status: int):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request("GET", "http://127.0.0.1:9/api/models/me/model")
    return HfHubHTTPError(f"{status} error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(("status", "users"), [(401, True), (403, True), (404, True), (429, False), (500, False)])
def test_an_unauthorised_download_is_the_users_a_failing_hub_is_not(status, users):
    """401 (no or a bad token) is the user's to mend (exit 2), as 403 and 404; a rate limit or a Hub error is not."""
    from modeling_stage2.hub import hub_failure_is_users

    assert hub_failure_is_users(_http_error(status)) is users


def test_a_failed_downloads_line_names_its_cause_once():
    from modeling_stage2.hub import hub_failure_line

    error = OSError("could not fetch\n  me/model")
    error.__cause__ = ConnectionError("connection\nrefused")
    assert hub_failure_line(error) == "OSError: could not fetch me/model (ConnectionError: connection refused)"
    named = OSError("ConnectionError: refused")
    named.__cause__ = ConnectionError("refused")
    assert hub_failure_line(named) == "OSError: ConnectionError: refused"


# ------------------------------------------------------------------------------------------------------ adapters


def test_an_adapter_is_never_written_over_a_folder_holding_its_base(tmp_path):
    """Replacing a folder that holds the base refiner (an earlier save with the base inside it) would delete the
    base the adapter needs: refused as writing over the base itself is."""
    from modeling_stage2 import Stage2RefinerModel
    from modeling_stage2.adapters import build_trainable_model, save_trained_model

    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "run" / "base")
    (tmp_path / "run" / "config.json").write_text("{}")  # an earlier save there: not a foreign folder
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    model = build_trainable_model(model_name_or_path=tmp_path / "run" / "base", quantization="none",
                                  print_summary=False)
    with pytest.raises(FileExistsError, match=r"^save_trained_model: .*/run holds the base refiner this adapter was "
                                              r"built on, which the adapter needs to load; choose another folder\.$"):
        save_trained_model(model, tmp_path / "run")
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before
