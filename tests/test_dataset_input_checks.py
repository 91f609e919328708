"""What `stage2-train`, `stage2-evaluate` and `stage2-inspect` tell of their data before any work: NPZ tiles without
the validation split (refused before they are converted, by the conversion's own discovery), and a saved Arrow dataset
whose `.arrow` file is missing, damaged or cut short (an interrupted copy: one line naming the file, exit 2)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
from _data_helpers import make_tile_dir, write_tile
from _training_helpers import refuse_exec, tiles_with_unreadable_validation, tiles_without_validation, write_config
from test_console_scripts import run

import data_builders
import datasets
import training.train as train_module
from data_builders.cache import ARROW_STREAM_END, DATASET_STATE, damaged_file_problem, saved_dataset_problem
from data_builders.inspect import main as inspect_main
from training.evaluate import main as evaluate_main
from training.train import UsageError, launch_main, main


@pytest.fixture(autouse=True)
def _never_exec(monkeypatch):
    refuse_exec(monkeypatch)


@pytest.fixture(name="conversions")
def _conversions(monkeypatch) -> list:
    """The NPZ conversions a run starts (each refused: the tests here are about what is found before it)."""
    calls = []

    def refuse(data_dir, *args, **kwargs):
        calls.append(data_dir)
        raise AssertionError(f"{data_dir} was converted")

    monkeypatch.setattr(data_builders, "build_dataset", refuse)
    return calls


def _no_split_line(data: Path, missing: str, splits: list[str]) -> str:
    """The trainer's own message for a dataset without the split `missing` (`_require_splits`)."""
    with pytest.raises(UsageError) as caught:
        train_module._require_splits(splits, missing, f"--data_dir {data}")
    return str(caught.value)


def _train_argv(tmp_path: Path, data: Path) -> list[str]:
    return ["--config", str(write_config(tmp_path / "x.yaml")), "--data_dir", str(data), "--output_dir",
            str(tmp_path / "out")]


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# --------------------------------------------------------------------------------- NPZ tiles without validation
def test_tiles_without_the_validation_split_are_refused_before_any_conversion(tmp_path, capsys, conversions):
    """Every tile was converted to Arrow (~7 min at BigEarthNet's scale) before the run said what the folder listing
    shows: no 'val' split."""
    tiles = tiles_without_validation(tmp_path / "tiles")
    line = _no_split_line(tiles, "val", ["train"])
    assert launch_main(_train_argv(tmp_path, tiles)) == 2  # the launcher's check
    assert _error_lines(capsys) == [f"stage2-train: error: {line}"]
    with pytest.raises(UsageError, match=f"^{re.escape(line)}$"):  # the trainer process's
        main(_train_argv(tmp_path, tiles))
    assert conversions == [] and not (tmp_path / "out").exists()


def test_the_sidecars_split_decides_as_in_the_conversion(tmp_path, conversions):
    """The split a tile's sidecar names wins over its folder (`discover_tiles`): a `val/` folder whose tiles all say
    'train' holds no validation tile, and a tile of `test/` that says 'val' is one."""
    tiles = make_tile_dir(tmp_path / "tiles", per_split=1)
    for path in (tiles / "val").glob("*.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "split": "train"}))
    training_args, data_args, _ = train_module.parse_args(_train_argv(tmp_path, tiles))
    with pytest.raises(UsageError, match=f"^{re.escape(_no_split_line(tiles, 'val', ['test', 'train']))}$"):
        train_module.check_run_inputs(training_args, data_args)
    write_tile(tiles / "test", "moved", sidecar={"split": "val"}, size=8)
    train_module.check_run_inputs(training_args, data_args)
    assert conversions == []


def test_validation_tiles_all_rejected_when_read_are_still_refused_once_converted(tmp_path):
    """The check after the conversion stays: a `val/` tile whose pixels cannot be read is found only then."""
    tiles = tiles_with_unreadable_validation(tmp_path / "tiles")
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=f"^{re.escape(_no_split_line(tiles, 'val', ['train']))}$"):
        main(_train_argv(tmp_path, tiles))
    assert not out.exists()  # the conversion made for the run is removed with it


# --------------------------------------------------------------------------------- damaged saved datasets
def _saved(path: Path, dict_: bool = True) -> Path:
    """A saved dataset of 4 rows whose Arrow files hold 2 record batches each (as a built dataset's do)."""
    datasets.disable_progress_bars()  # here, not at import: a test run before may have turned them on again
    rows = datasets.Dataset.from_dict({"tile_id": ["a", "b", "c", "d"], "month": [1, 2, 3, 4]})
    (datasets.DatasetDict({"train": rows, "val": rows}) if dict_ else rows).save_to_disk(str(path))
    for file in path.rglob("*.arrow"):  # the same rows and schema, written in batches of 2
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_stream(source).read_all()
        with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=2):
                writer.write_batch(batch)
    return path


def _first_batch_end(file: Path) -> int:
    with pa.memory_map(str(file)) as source:
        next(iter(pa.ipc.open_stream(source)))
        return source.tell()


_CUTS = {  # where an interrupted copy stopped: bytes of the file kept
    "in a record batch": lambda file: file.stat().st_size // 2,
    "at a record batch's end": _first_batch_end,  # pyarrow reads it without an error: 2 of the 4 rows
    "before the end-of-stream marker": lambda file: file.stat().st_size - len(ARROW_STREAM_END),
}


def _cut(path: Path, where: str) -> Path:
    file = sorted(path.rglob("*.arrow"))[-1]  # the last split's: the others are read whole first
    file.write_bytes(file.read_bytes()[:_CUTS[where](file)])
    return file


@pytest.mark.parametrize("where", _CUTS)
def test_a_cut_arrow_file_is_named(tmp_path, where):
    path = _saved(tmp_path / "ds")
    assert saved_dataset_problem(path) is None
    file = _cut(path, where)
    problem = saved_dataset_problem(path)
    assert problem is not None and problem.startswith(f"{file}: damaged or cut short ("), problem
    assert problem.endswith("); build or copy the dataset again") and "\n" not in problem
    if where == "at a record batch's end":  # what `load_from_disk` made of it: half of the split, without a word
        assert len(datasets.load_from_disk(str(path))["val"]) == 2


def test_a_single_saved_dataset_and_a_missing_file(tmp_path):
    single = _saved(tmp_path / "single", dict_=False)
    assert damaged_file_problem(single) is None
    file = _cut(single, "in a record batch")
    assert saved_dataset_problem(single).startswith(f"{file}: damaged or cut short (")
    path = _saved(tmp_path / "ds")
    (path / "train" / "data-00000-of-00001.arrow").unlink()
    assert saved_dataset_problem(path) == (f"{path / 'train' / 'data-00000-of-00001.arrow'}: missing (listed in "
                                           f"{path / 'train' / DATASET_STATE}); build or copy the dataset again")
    assert damaged_file_problem(tmp_path / "absent") is None  # no saved dataset: the caller's own error says so


@pytest.mark.parametrize("command", ["stage2-train", "stage2-evaluate", "stage2-inspect"])
def test_the_three_commands_name_the_damaged_file_before_any_work(tmp_path, capsys, command):
    """`stage2-train` and `stage2-evaluate` died in a 22-frame traceback (OSError: Expected to be able to read ...
    bytes for message body), exit 1; `stage2-inspect` said "not a saved dataset", naming no file."""
    path = _saved(tmp_path / "ds")
    _cut(path, "in a record batch")
    output = tmp_path / ("preview.png" if command == "stage2-inspect" else "out")
    if command == "stage2-train":
        status = launch_main(["--data_dir", str(path), "--output_dir", str(output)])
    elif command == "stage2-evaluate":
        status = evaluate_main(["--model", str(tmp_path / "no-model"), "--data", str(path), "--device", "cpu",
                                "--json", str(output)])
    else:
        status = inspect_main([str(path), "--plot", str(output)])
    assert status == 2
    assert _error_lines(capsys) == [f"{command}: error: {saved_dataset_problem(path)}"]
    assert not output.exists()


def test_the_trainer_process_names_it_too(tmp_path):
    path = _saved(tmp_path / "ds")
    _cut(path, "at a record batch's end")
    with pytest.raises(UsageError, match=f"^{re.escape(saved_dataset_problem(path))}$"):
        main(_train_argv(tmp_path, path))
    assert not (tmp_path / "out").exists()


def test_inspect_exits_2_for_a_damaged_dataset_as_installed(tmp_path):
    path = _saved(tmp_path / "ds")
    _cut(path, "in a record batch")
    result = run("stage2-inspect", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"stage2-inspect: error: {saved_dataset_problem(path)}"]


@pytest.mark.parametrize("overwrite", [b"\x41" * 16, b"\x00" * 16])
def test_bytes_overwritten_where_a_message_begins_are_named_though_the_file_ends_whole(overwrite, tmp_path):
    """Not cut (the end-of-stream marker is there): garbage where the second record batch's header begins fails to
    read; zeros there read as the stream's end, and `load_from_disk` loaded 2 of the 4 rows without a word."""
    path = _saved(tmp_path / "ds")
    file = sorted(path.rglob("*.arrow"))[-1]
    at = _first_batch_end(file)
    data = bytearray(file.read_bytes())
    data[at:at + 16] = overwrite
    file.write_bytes(bytes(data))
    problem = saved_dataset_problem(path)
    assert problem is not None and problem.startswith(f"{file}: damaged or cut short ("), problem


# --------------------------------------------------------------------------------- unreadable records
_RECORD_FAULTS = {  # (file, what is written there or None to remove it, the problem named)
    "dataset_info no JSON": ("val/dataset_info.json", "{not json", "not readable JSON (Expecting property name"),
    "state a list": ("train/state.json", "[]", "not a JSON object"),
    "dataset_info missing": ("val/dataset_info.json", None, "missing"),
    "splits not a list": ("dataset_dict.json", '{"splits": "train"}', "'splits' is not a list of split names"),
    "splits absent": ("dataset_dict.json", "{}", "'splits' is not a list of split names"),
    "dataset_dict no JSON": ("dataset_dict.json", "", "not readable JSON (Expecting value"),
}


@pytest.mark.parametrize("fault", _RECORD_FAULTS)
def test_a_record_load_from_disk_cannot_read_is_named(tmp_path, fault):
    """`load_from_disk` failed on each with a traceback (JSONDecodeError, TypeError, FileNotFoundError naming a split
    folder made of the string's letters): the record is named in one line."""
    relative, text, named = _RECORD_FAULTS[fault]
    path = _saved(tmp_path / "ds")
    record = path / relative
    record.unlink() if text is None else record.write_text(text)
    with pytest.raises(Exception):
        datasets.load_from_disk(str(path))
    problem = saved_dataset_problem(path)
    assert problem.startswith(f"{record}: {named}") and problem.endswith("; build or copy the dataset again")
    assert "\n" not in problem


def test_a_single_saved_dataset_record_is_checked_too(tmp_path):
    single = _saved(tmp_path / "single", dict_=False)
    assert saved_dataset_problem(single) is None
    (single / "dataset_info.json").write_text("null")
    expected = f"{single / 'dataset_info.json'}: not a JSON object; build or copy the dataset again"
    assert saved_dataset_problem(single) == expected
    assert saved_dataset_problem(tmp_path / "absent") is None and saved_dataset_problem(tmp_path) is None


def test_the_dataset_info_name_is_datasets_own():
    from data_builders.cache import DATASET_INFO

    assert DATASET_INFO == datasets.config.DATASET_INFO_FILENAME


def test_a_damaged_dataset_is_neither_pushed_nor_carded(tmp_path):
    """`push_dataset` and `build_dataset_card` loaded it with `load_from_disk`: a file cut at a record batch's end
    was pushed with rows missing, without a word. Refused before any request (the endpoint is closed)."""
    from model_cards.cards import CardError, build_dataset_card
    from model_cards.push import push_dataset

    path = _saved(tmp_path / "ds")
    _cut(path, "at a record batch's end")
    expected = f"^{re.escape(saved_dataset_problem(path))}$"
    with pytest.raises(CardError, match=expected):
        push_dataset(path, "tiles", endpoint="http://127.0.0.1:9")
    with pytest.raises(CardError, match=expected):
        build_dataset_card(path)


def test_push_exits_2_for_a_damaged_dataset_before_pushing_the_model(tmp_path):
    from _refiner_helpers import tiny_refiner_config

    from modeling_stage2 import Stage2RefinerModel

    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "model")
    path = _saved(tmp_path / "ds")
    (path / "val" / "state.json").write_text("[")
    result = run("stage2-push", str(tmp_path / "model"), "me/model", "--dataset", str(path), "--endpoint",
                 "http://127.0.0.1:9")  # closed: a push attempted first would fail on the connection (exit 1)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"stage2-push: error: {saved_dataset_problem(path)}"]


@pytest.mark.parametrize("case", ["two spellings", "tiles without val", "damaged dataset"])
def test_stage2_train_refusals_as_installed(tmp_path, case):
    """The refusals that `launch_main` makes before any work, through the installed `stage2-train`: exit 2, one line,
    no output folder (their messages are tested in process above and in test_training_cli)."""
    config = write_config(tmp_path / "x.yaml")
    flags = []
    if case == "two spellings":
        data, flags = _saved(tmp_path / "ds"), ["--epochs", "2", "--num_train_epochs", "3"]
        expected = "--epochs and --num_train_epochs both set num_train_epochs; keep one."
    elif case == "tiles without val":
        data = tiles_without_validation(tmp_path / "tiles")
        expected = _no_split_line(data, "val", ["train"])
    else:
        data = _saved(tmp_path / "ds")
        _cut(data, "at a record batch's end")
        expected = saved_dataset_problem(data)
    result = run("stage2-train", "--config", str(config), "--data_dir", str(data), "--output_dir",
                 str(tmp_path / "out"), *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"stage2-train: error: {expected}"]
    assert not (tmp_path / "out").exists()
