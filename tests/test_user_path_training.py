"""What a first-time user meets on the way through `stage2-train` and `stage2-evaluate`: a split folder given as the
data refused in one line before anything is launched, rejected tiles said (a partial evaluation exits 1; training
warns and trains), `--baselines` without a train split refused before any tile is converted, the re-run line of a
run's config.yaml, and the trainable-parameter summary's wording of the backbone's precision."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from types import SimpleNamespace

import pytest

from _data_helpers import make_tile_dir, write_tile
from _refiner_helpers import tiny_refiner_config
from _training_helpers import refuse_exec, stage2_train_command, write_config

BROKEN_NPZ = b"PK\x03\x04 not a zip"
BROKEN_TILES = {"val": ("broken.npz", "broken_too.npz"), "test": ("broken.npz",)}


@pytest.fixture(autouse=True)
def _no_exec(monkeypatch):
    refuse_exec(monkeypatch)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """One valid tile per split, and corrupt NPZs rejected by the conversion: two in `val/`, one in `test/` (counts
    that differ, so that a count of the wrong split's tiles shows)."""
    root = make_tile_dir(tmp_path_factory.mktemp("user") / "tiles", per_split=1)
    for split, names in BROKEN_TILES.items():
        for name in names:
            (root / split / name).write_bytes(BROKEN_NPZ)
    return root


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    """A tiny full refiner folder (`save_pretrained`), which `stage2-evaluate --model` takes."""
    from modeling_stage2 import Stage2RefinerModel

    folder = tmp_path_factory.mktemp("model") / "model"
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------- a split folder as the data
def test_stage2_train_refuses_a_split_folder_in_one_line_before_launching(tiles, tmp_path, repo_root):
    """The console script given `tiles/train` (which the conversion does not read: it reads the split folders of the
    folder given) says to give the folder above, exit status 2, before accelerate starts or anything is written."""
    out, config = tmp_path / "run", write_config(tmp_path / "tiny.yaml", max_steps=4)
    result = subprocess.run([*stage2_train_command(), "--config", str(config), "--data_dir", str(tiles / "train"),
                             "--output_dir", str(out)], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"stage2-train: error: --data_dir {tiles / 'train'}: a split folder; give the folder above it ({tiles}/), "
        "which holds train/, val/ and test/"]
    assert result.stdout == "" and not out.exists()


def test_stage2_train_refuses_a_flat_folder_of_tiles_as_the_conversion_would(tiles, tmp_path):
    """NPZ tiles directly in the folder (no split folder): the conversion finds none, and the launcher's check says
    so with the conversion's own line (`dataset_cache_key`), not 20 s later from the trainer."""
    from data_builders.cache import dataset_cache_key
    from training.train import MissingInputError, check_before_launch

    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(tiles / "train" / "train_0.npz", flat)
    with pytest.raises(FileNotFoundError) as conversion:
        dataset_cache_key(flat, flag="--data_dir")
    with pytest.raises(MissingInputError) as launcher:
        check_before_launch(["--config", str(write_config(tmp_path / "tiny.yaml")), "--data_dir", str(flat),
                             "--output_dir", str(tmp_path / "run")])
    assert str(launcher.value) == str(conversion.value)
    assert not (tmp_path / "run").exists()


def test_stage2_evaluate_names_a_split_folder_as_stage2_train_does(tiles, full_model, capsys):
    from training.evaluate import main as evaluate_main

    assert evaluate_main(["--model", str(full_model), "--data", str(tiles / "val")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"stage2-evaluate: error: --data {tiles / 'val'}: a split folder; give the folder above it ({tiles}/), which "
        "holds train/, val/ and test/"]


def test_stage2_build_dataset_names_a_split_folder_as_the_other_commands_do(tiles, tmp_path, capsys):
    """The hint lives where the tiles are read (`discovery.split_folder_problem`): the build given `tiles/train` said
    "has no split folder: expected tiles/train/train ...", and wrote nothing."""
    from data_builders.build import main as build_main

    out = tmp_path / "arrow"
    assert build_main(["--data_dir", str(tiles / "train"), "--output_dir", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"stage2-build-dataset: error: --data_dir {tiles / 'train'}: a split folder; give the folder above it "
        f"({tiles}/), which holds train/, val/ and test/"]
    assert not out.exists()


@pytest.mark.parametrize("folder", ["validation", "Valid"])
def test_a_split_folder_spelled_as_the_conversion_also_reads_it_is_named_too(full_model, tmp_path, capsys, folder):
    """`validation/` and `valid/` (any case) are split folders to the conversion (`SPLIT_ALIASES`) as much as
    `val/`: given as the data, they get the same line, not "no NPZ tiles"."""
    from training.evaluate import main as evaluate_main

    data = tmp_path / "tiles"
    write_tile(data / folder, "val_0", seed=1)
    assert evaluate_main(["--model", str(full_model), "--data", str(data / folder)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"stage2-evaluate: error: --data {data / folder}: a split folder; give the folder above it ({data}/), which "
        "holds train/, val/ and test/"]


def test_the_working_folder_as_a_split_folder_is_named_too(full_model, tmp_path, capsys, monkeypatch):
    """`--data .` run inside `tiles/val/`: `Path('.').name` is empty, and the line said only "no NPZ tiles"."""
    from training.evaluate import main as evaluate_main

    write_tile(tmp_path / "tiles" / "val", "val_0", seed=1)
    monkeypatch.chdir(tmp_path / "tiles" / "val")
    assert evaluate_main(["--model", str(full_model), "--data", "."]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "stage2-evaluate: error: --data .: a split folder; give the folder above it (../), which holds train/, val/ "
        "and test/"]


# --------------------------------------------------------------------------------------------- rejected tiles
def test_stage2_evaluate_exits_1_when_tiles_of_the_evaluated_split_were_rejected(tiles, full_model, tmp_path, capsys):
    """A partial evaluation: the metrics of the tiles evaluated and --json are written, the JSON counts the rejected
    tiles of the split evaluated (val's two; the test split's one is not one of them), and the exit status is 1."""
    from training.evaluate import main as evaluate_main

    report = tmp_path / "r.json"
    assert evaluate_main(["--model", str(full_model), "--data", str(tiles), "--split", "val", "--bootstrap", "0",
                          "--device", "cpu", "--json", str(report)]) == 1
    results, rejected = json.loads(report.read_text()), len(BROKEN_TILES["val"])  # 2; the test split has 1
    assert results["n_tiles"] == 1 and results["rejected"] == rejected and results["refined"]["ndvi_rmse"] >= 0
    err = capsys.readouterr().err
    assert all(f"rejected {tiles / 'val' / name}: " in err for name in BROKEN_TILES["val"])
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stage2-evaluate: {rejected} tile(s) of split 'val' rejected (above)"), last


def test_a_tile_directly_in_the_data_folder_counts_in_the_split_its_sidecar_names(full_model, tmp_path):
    """A tile beside the split folders whose sidecar names `val` is one of val's tiles left out: evaluating `val`
    is partial (exit status 1, counted), evaluating `test` is not."""
    from training.evaluate import main as evaluate_main

    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    write_tile(data, "extra", sidecar={"split": "val"})
    argv = ["--model", str(full_model), "--data", str(data), "--bootstrap", "0", "--no-baselines", "--device", "cpu",
            "--cache_dir", str(tmp_path / "cache")]
    assert evaluate_main([*argv, "--split", "val", "--json", str(tmp_path / "v.json")]) == 1
    assert json.loads((tmp_path / "v.json").read_text())["rejected"] == 1
    assert evaluate_main([*argv, "--split", "test", "--json", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["rejected"] == 0


def test_stage2_evaluate_counts_no_rejected_tile_for_clean_tiles_and_none_for_an_arrow_dataset(full_model, tmp_path):
    """`"rejected"` is 0 for NPZ tiles the conversion took whole (exit status 0), and absent for a saved Arrow
    dataset (here that conversion, kept with --cache_dir), which no conversion of this command rejected from."""
    from data_builders.cache import is_arrow_dataset
    from training.evaluate import main as evaluate_main

    data, cache = make_tile_dir(tmp_path / "tiles", per_split=1), tmp_path / "cache"
    argv = ["--model", str(full_model), "--split", "val", "--bootstrap", "0", "--no-baselines", "--device", "cpu"]
    assert evaluate_main([*argv, "--data", str(data), "--cache_dir", str(cache),
                          "--json", str(tmp_path / "t.json")]) == 0
    [arrow] = [folder for folder in cache.iterdir() if is_arrow_dataset(folder)]
    assert evaluate_main([*argv, "--data", str(arrow), "--json", str(tmp_path / "a.json")]) == 0
    from_tiles, from_arrow = (json.loads((tmp_path / name).read_text()) for name in ("t.json", "a.json"))
    assert from_tiles["rejected"] == 0 and from_tiles["n_tiles"] == from_arrow["n_tiles"] == 1
    assert "rejected" not in from_arrow


def test_stage2_train_warns_of_the_tiles_the_conversion_rejected(tiles, tmp_path, caplog):
    """The run trains without them (exit status 0), but says how many and where their reasons are, at WARNING, when
    it converts and when it reuses the conversion."""
    from data_builders.build import REJECTED_FILE
    from training.train import ensure_arrow_dataset

    data_args = SimpleNamespace(data_dir=str(tiles), stage1_dir=None, input_mode=None, dataset_seed=0,
                                degradation="mild", dataset_cache_dir=None)
    for _ in ("converted", "reused"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="training.train"):
            converted = ensure_arrow_dataset(data_args, tmp_path / "run")
        [warning] = [record for record in caplog.records if record.levelno == logging.WARNING]
        assert warning.getMessage() == (f"--data_dir {tiles}: {sum(map(len, BROKEN_TILES.values()))} NPZ tile(s) "
                                        "rejected by the conversion, not in this run (reasons in "
                                        f"{converted / REJECTED_FILE}).")


# ------------------------------------------------------------------------------------ --baselines without train
def test_baselines_without_a_train_split_is_refused_before_any_tile_is_converted(tmp_path, capsys, monkeypatch):
    import data_builders
    from training.evaluate import main as evaluate_main, no_fit_split_problem

    def no_conversion(*args, **kwargs):
        raise AssertionError("the tiles were converted before --baselines was checked")

    monkeypatch.setattr(data_builders, "build_dataset", no_conversion)
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    shutil.rmtree(data / "train")
    argv = ["--model", "someone/model", "--data", str(data), "--split", "val", "--baselines"]
    assert evaluate_main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [f"stage2-evaluate: error: {no_fit_split_problem(data)}"]

    # The discovery's split, not the folder's: a tile whose sidecar puts it in train is a train split.
    write_tile(data / "val", "moved", sidecar={"split": "train"}, seed=5)
    with pytest.raises(AssertionError, match="converted before"):
        evaluate_main(argv)


# ---------------------------------------------------------------------------------- the run's config.yaml header
def test_the_run_config_says_to_re_run_it_with_the_console_script(tmp_path):
    """The console script (`accelerate launch training/train.py` works only in the checkout), with the processes the
    run had: a two-process run re-run as one would take other steps per epoch."""
    from training.train import PROG, write_run_config

    for world_size, launcher in ((1, ""), (2, "--multi_gpu --num_processes 2 -- ")):
        path = write_run_config(tmp_path, {"learning_rate": 1e-3},
                                SimpleNamespace(precision_note="fp32 on the CPU", world_size=world_size))
        assert path.read_text().splitlines()[1] == (
            f"# Re-run from the folder it was started in: {PROG} {launcher}--config {path}")


# ------------------------------------------------------------------------------------- several processes
def test_two_processes_on_a_machine_without_a_gpu_need_the_training_flag(tiles, tmp_path, repo_root):
    """`stage2-train --multi_gpu --num_processes 2 -- ...` on a CPU machine, without `--use_cpu true`, started two
    separate trainings writing into one folder (each record twice, world size 1) and exited 0: refused in one line
    before anything starts."""
    if __import__("torch").cuda.is_available():
        pytest.skip("a machine with a GPU runs the two processes on it")
    out, config = tmp_path / "run", write_config(tmp_path / "tiny.yaml", max_steps=2)
    result = subprocess.run([*stage2_train_command(), "--multi_gpu", "--num_processes", "2", "--", "--config",
                             str(config), "--data_dir", str(tiles), "--output_dir", str(out)],
                            cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "stage2-train: error: accelerate options: --multi_gpu --num_processes 2 on a machine without a GPU start 2 "
        "separate trainings into one output folder; add the training flag --use_cpu true (after `--`) for 2 CPU "
        "processes that train together (DDP over gloo)."]
    assert result.stdout == "" and not out.exists()


@pytest.mark.parametrize("launcher, use_cpu, cuda, refused", [
    (["--cpu", "--num_processes", "2"], True, False, "2 processes without --multi_gpu start ONE process"),
    (["--num_processes", "3"], False, True, "3 processes without --multi_gpu start ONE process"),
    (["--multi_gpu", "--num_processes", "2"], False, False, "start 2 separate trainings"),
    (["--multi_gpu", "--num_processes", "2"], True, False, None),  # DDP over gloo: the documented way
    (["--multi_gpu", "--num_processes", "2"], False, True, None),  # two GPUs
    (["--num_processes", "1"], False, False, None),
    ([], False, False, None),
])
def test_the_accelerate_options_start_the_processes_they_ask_for(launcher, use_cpu, cuda, refused, tmp_path,
                                                                  monkeypatch):
    from accelerate.commands import config as accelerate_config

    from training.train import parse_accelerate_options, process_count_problem

    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "none.yaml"))
    problem = process_count_problem(parse_accelerate_options(launcher), use_cpu=use_cpu, cuda=cuda)
    assert (problem is None) if refused is None else (refused in problem)


@pytest.mark.parametrize("kind, use_cpu, refused", [
    ("MULTI_CPU", True, "2 processes without --multi_gpu start ONE process"),
    ("MULTI_GPU", False, "start 2 separate trainings"),
    ("MULTI_GPU", True, None),
])
def test_an_accelerate_config_file_counts_as_accelerate_reads_it(kind, use_cpu, refused, tmp_path, monkeypatch):
    """README's way once was `use_cpu: true` in the accelerate config with --multi_gpu: two separate trainings."""
    from accelerate.commands import config as accelerate_config

    from training.train import parse_accelerate_options, process_count_problem

    config = tmp_path / "accelerate.yaml"
    config.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: {kind}\nnum_processes: 2\n"
                      "use_cpu: true\nnum_machines: 1\nmixed_precision: 'no'\n")
    problem = process_count_problem(parse_accelerate_options(["--config_file", str(config)]), use_cpu=use_cpu,
                                    cuda=False)
    assert (problem is None) if refused is None else (refused in problem)
    monkeypatch.setattr(accelerate_config, "default_config_file", str(config))  # the default file, read alike
    assert process_count_problem(parse_accelerate_options([]), use_cpu=use_cpu, cuda=False) == problem
