"""Deployment export (`stage2-export`): torch.export (.pt2) and ONNX graphs of a trained refiner with LoRA adapters
and metadata conditioning, with and without the spectral correction, against the eager model on real sample tiles;
the input checks of `ExportedRefiner`; tiles and GeoTIFF scenes refined on ONNX Runtime through `stage2-refine`.

Each trained folder is exported once per module (the ONNX export of the affine model through the command line, as
a subprocess); the graphs run on one thread.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from _refiner_helpers import tiny_refiner_config, wake_up  # noqa: E402
from data_builders.tiles import read_tile  # noqa: E402
from modeling_stage2.adapters import build_trainable_model, load_trained_model, save_trained_model  # noqa: E402
from modeling_stage2.export import EXPORT_INFO_FILE, MAX_BATCH, export_refiner, min_side  # noqa: E402
from inference_stage2 import main as refine_main  # noqa: E402
from inference_stage2 import load_model, refine_scene, refine_tiles  # noqa: E402
from inference_stage2.predict import reports_out_of_range_weight  # noqa: E402
from modeling_stage2.onnx_runtime import ExportedRefiner, is_exported_model  # noqa: E402
from training.spectral_range import fit_spectral_range, set_spectral_range  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TILES = REPO_ROOT / "data" / "sample" / "tiles"
VARIANTS = ("none", "affine")
FORMATS = ("onnx", "torch_export")
TOLERANCE = 1e-4
SIZES = ((120, 120), (155, 152))
BATCHES = (1, 3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def run_export_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modeling_stage2.export", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=_cli_env(), cwd=REPO_ROOT,
    )


# ------------------------------------------------------------------------------------------------ fixtures


@torch.no_grad()
def _wake_everything(model, seed: int) -> None:
    """`wake_up` plus the zero-initialised tile MLP of the spectral correction and output of the spectral MLP, so every
    branch changes the output."""
    wake_up(model, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    for name, parameter in model.named_parameters():
        if "tile_correction" in name or "spectral_mlp" in name and "output" in name:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def trained(workdir, sample_images) -> dict[str, Path]:
    """A trained adapter folder (LoRA r 8 on every block, metadata embedding, fusion, head trained) per variant."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folders = {}
    for index, variant in enumerate(VARIANTS):
        torch.manual_seed(index)
        model = build_trainable_model(
            # the affine variant as training builds it (output clamped at 0, a spectral MLP), and keeping opt_v1
            # outside its training spectra and at its near-black pixels
            tiny_refiner_config(spectral_correction=variant, nonnegative_output=variant == "affine",
                                spectral_mlp_hidden_size=8 if variant == "affine" else 0,
                                out_of_range_fallback=variant == "affine", near_black_fallback=variant == "affine"),
            quantization="none", print_summary=False,
        )
        _wake_everything(model, seed=index + 1)
        if variant == "affine":  # a range of the first two sample tiles: the others are partly outside it
            images = torch.from_numpy(sample_images[0][:2])
            set_spectral_range(model, fit_spectral_range(lambda: [(images, None)], 0.05, quantile=0.5))
        folders[variant] = save_trained_model(model, workdir / f"trained_{variant}")
    torch.set_num_threads(threads)
    return folders


@pytest.fixture(scope="module")
def eager(trained) -> dict[str, torch.nn.Module]:
    """The trained models as a user loads them (PeftModel, adapters not merged)."""
    return {variant: load_trained_model(folder) for variant, folder in trained.items()}


@pytest.fixture(scope="module")
def exported(trained, workdir) -> dict[tuple[str, str], Path]:
    """Export folders per (variant, format); the affine ONNX one through the command line."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folders = {}
    for variant in VARIANTS:
        for fmt in FORMATS:
            output = workdir / f"exported_{variant}_{fmt}"
            if (variant, fmt) == ("affine", "onnx"):
                result = run_export_cli(trained[variant], output, "--format", "onnx", "--opset", "18")
                assert result.returncode == 0, result.stderr[-3000:]
                assert "wrote" in result.stdout and "model.onnx" in result.stdout
            else:
                export_refiner(trained[variant], output, format=fmt, check=False)
            folders[variant, fmt] = output
    torch.set_num_threads(threads)
    return folders


@pytest.fixture(scope="module")
def sample_images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real bundled tiles: (N, 4, 120, 120) reflectance, months and biomes (one unknown each)."""
    paths = sorted(SAMPLE_TILES.rglob("*.npz"))[:4]
    tiles = [read_tile(path) for path in paths]
    images = np.stack([tile.target for tile in tiles]).astype(np.float32)
    months = np.array([tile.month for tile in tiles], dtype=np.int64)
    biomes = np.array([tile.biome for tile in tiles], dtype=np.int64)
    months[1], biomes[2] = -1, -1
    return images, months, biomes


def sample_batch(sample_images, batch: int, size: tuple[int, int]):
    """`batch` real images of `size`: 120x120 tiles, or a crop of a 2x2 mosaic of tiles for larger sizes."""
    images, months, biomes = sample_images
    height, width = size
    picked = []
    for index in range(batch):
        order = [(index + k) % len(images) for k in range(4)]
        mosaic = np.concatenate([
            np.concatenate([images[order[0]], images[order[1]]], axis=2),
            np.concatenate([images[order[2]], images[order[3]]], axis=2),
        ], axis=1)
        picked.append(mosaic[:, :height, :width])
    opt_v1 = torch.from_numpy(np.ascontiguousarray(np.stack(picked)))
    return opt_v1, torch.from_numpy(months[:batch]), torch.from_numpy(biomes[:batch])


# ------------------------------------------------------------------------------------ graphs vs eager


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_graph_equals_eager_on_sample_tiles(variant, fmt, eager, exported, sample_images):
    model = ExportedRefiner(exported[variant, fmt], num_threads=1)
    assert model.format == fmt
    assert model.config.spectral_correction == variant
    for size in SIZES:
        for batch in BATCHES:
            opt_v1, month, biome = sample_batch(sample_images, batch, size)
            with torch.no_grad():
                eager_output = eager[variant](opt_v1=opt_v1, month=month, biome=biome)
            expected = eager_output.refined
            graph_output = model(opt_v1, month, biome)
            actual = graph_output.refined
            if variant == "affine":  # opt_v1 kept where the tiles leave the training spectra, in the graph too
                weight = eager_output.out_of_range_weight
                assert 0.1 < float((weight > 0).double().mean()) < 0.95 and float(weight.max()) == 1.0
                # ... and the graph says where, as the eager model does
                assert graph_output.out_of_range_weight.shape == weight.shape
                assert float((graph_output.out_of_range_weight - weight).abs().max()) < TOLERANCE
            else:
                assert graph_output.out_of_range_weight is None
            assert actual.shape == opt_v1.shape and actual.dtype == torch.float32
            difference = float((actual - expected).abs().max())
            assert difference < TOLERANCE, (variant, fmt, size, batch, difference)
            # The trained weights matter: the output is not opt_v1 (nor the same for every variant).
            assert float((expected - opt_v1).abs().max()) > 1e-3


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_graph_keeps_opt_v1_at_near_black_pixels(fmt, eager, exported, sample_images):
    """The near-black rule is part of the graph: a stripe darkened to red + NIR 0.01 .. 0.05 (across its columns)
    keeps `opt_v1` as the eager model does, the larger of both rules' weights."""
    from modeling_stage2.modeling_stage2 import near_black_weight

    model = ExportedRefiner(exported["affine", fmt], num_threads=1)
    config = model.config
    assert config.near_black_fallback and config.out_of_range_fallback
    opt_v1, month, biome = sample_batch(sample_images, 2, (120, 120))
    red_nir = opt_v1[:, 2:3, :12] + opt_v1[:, 3:4, :12]
    wanted = torch.linspace(0.01, 0.05, 120)[None, None, None, :]
    opt_v1[:, :, :12] *= wanted / red_nir  # the same spectra, dark
    base = eager["affine"].base_model.model
    with torch.no_grad():
        eager_output = eager["affine"](opt_v1=opt_v1, month=month, biome=biome)
        out_of_range = base.spectral_range(opt_v1)
    near_black = near_black_weight(opt_v1, config.near_black_band_indices, config.near_black_threshold,
                                   config.near_black_ramp)
    assert float((near_black - out_of_range).max()) > 0.5  # pixels only the near-black rule keeps
    graph_output = model(opt_v1, month, biome)
    weight = graph_output.out_of_range_weight
    assert float((weight - torch.maximum(out_of_range, near_black)).abs().max()) < TOLERANCE
    assert float((weight - eager_output.out_of_range_weight).abs().max()) < TOLERANCE
    kept = (near_black == 1).expand_as(opt_v1)
    assert int(kept.sum()) > 1000
    assert float((graph_output.refined[kept] - opt_v1[kept]).abs().max()) < TOLERANCE
    assert float((graph_output.refined - eager_output.refined).abs().max()) < TOLERANCE


def test_the_graph_keeps_only_the_ndvi_of_opt_v1_with_near_black_keep_ndvi(workdir, sample_images):
    """`near_black_keep="ndvi"` is part of the graph too: at the kept pixels of a darkened stripe the graph's red/NIR
    split is `opt_v1`'s, its blue and green the refiner's, and everything matches the eager model."""
    torch.manual_seed(5)
    model = build_trainable_model(tiny_refiner_config(spectral_correction="shared", spectral_mlp_hidden_size=8,
                                                      near_black_fallback=True, near_black_keep="ndvi"),
                                  quantization="none", print_summary=False)
    _wake_everything(model, seed=6)
    folder = save_trained_model(model, workdir / "trained_ndvi")
    export_refiner(folder, workdir / "exported_ndvi", format="onnx", check=False)
    graph = ExportedRefiner(workdir / "exported_ndvi", num_threads=1)
    red, nir = graph.config.near_black_band_indices
    others = [band for band in range(len(graph.config.bands)) if band not in (red, nir)]
    opt_v1, month, biome = sample_batch(sample_images, 2, (120, 120))
    red_nir = opt_v1[:, red : red + 1, :12] + opt_v1[:, nir : nir + 1, :12]
    opt_v1[:, :, :12] *= torch.linspace(0.005, 0.05, 120)[None, None, None, :] / red_nir
    with torch.no_grad():
        expected = load_trained_model(folder)(opt_v1=opt_v1, month=month, biome=biome)
    actual = graph(opt_v1, month, biome)
    assert float((actual.refined - expected.refined).abs().max()) < TOLERANCE
    assert float((actual.out_of_range_weight - expected.out_of_range_weight).abs().max()) < TOLERANCE
    kept = expected.out_of_range_weight[:, 0] == 1
    assert int(kept.sum()) > 500

    def red_share(image):
        return image[:, red] / (image[:, red] + image[:, nir])

    assert float((red_share(actual.refined) - red_share(opt_v1))[kept].abs().max()) < 1e-3
    assert float((actual.refined[:, others] - opt_v1[:, others]).abs().amax(dim=1)[kept].max()) > 1e-3  # not kept


def test_the_graph_file_alone_and_numpy_inputs(exported, eager, sample_images):
    folder = exported["none", "onnx"]
    model = ExportedRefiner(folder / "model.onnx", num_threads=1)  # config.json found beside it
    opt_v1, month, biome = sample_batch(sample_images, 2, (120, 120))
    from_numpy = model(opt_v1.numpy(), month.numpy(), biome.numpy()).refined
    with torch.no_grad():
        expected = eager["none"](opt_v1=opt_v1, month=month, biome=biome).refined
    assert float((from_numpy - expected).abs().max()) < TOLERANCE
    assert model(opt_v1, month, biome, return_dict=False)[0].shape == opt_v1.shape
    # The eager model's call contract: one integer for every tile, or no metadata (unknown).
    assert torch.equal(model(opt_v1, 7, 4).refined, model(opt_v1, torch.tensor([7, 7]), torch.tensor([4, 4])).refined)
    unknown = model(opt_v1.numpy()).refined
    assert torch.equal(unknown, model(opt_v1, torch.tensor([-1, -1]), torch.tensor([-1, -1])).refined)
    assert not torch.equal(unknown, from_numpy)
    with torch.no_grad():
        assert float((unknown - eager["none"](opt_v1=opt_v1).refined).abs().max()) < TOLERANCE


def test_export_json_describes_the_contract(exported, trained):
    folder = exported["affine", "onnx"]
    files = sorted(path.name for path in folder.iterdir())
    assert files == ["README.md", "config.json", EXPORT_INFO_FILE, "model.onnx"]
    info = json.loads((folder / EXPORT_INFO_FILE).read_text())
    inputs = {entry["name"]: entry for entry in info["inputs"]}
    assert list(inputs) == ["opt_v1", "month", "biome"]
    outputs = {entry["name"]: entry for entry in info["outputs"]}
    assert list(outputs) == ["refined", "out_of_range_weight"]  # a refiner built with out_of_range_fallback
    assert outputs["out_of_range_weight"]["shape"] == ["batch", 1, "height", "width"]
    assert outputs["out_of_range_weight"]["value_range"] == [0.0, 1.0]
    assert inputs["opt_v1"]["dtype"] == "float32" and inputs["month"]["dtype"] == "int64"
    assert inputs["opt_v1"]["shape"] == ["batch", 4, "height", "width"]
    assert inputs["opt_v1"]["value_range"] == [0.0, 1.0]
    assert inputs["month"]["value_range"] == [1, 12] and inputs["month"]["unknown"] == -1
    assert inputs["biome"]["value_range"] == [0, 16] and inputs["biome"]["unknown"] == -1
    assert info["padding"]["inside_graph"] and info["padding"]["multiple_of"] == [14, 14]
    assert info["shape_limits"]["height"][0] == min_side(14) == 15
    assert info["opset"] == 18 and info["spectral_correction"] == "affine"
    assert info["source"]["adapters_merged"] is True
    assert info["max_abs_difference_vs_eager"] < TOLERANCE  # the command line checks the graph after export
    card = (folder / "README.md").read_text()
    assert "Exported Stage 2 refiner" in card
    assert "| `out_of_range_weight` | float32 | (batch, 1, height, width)" in card
    pt2 = exported["none", "torch_export"]
    pt2_info = json.loads((pt2 / EXPORT_INFO_FILE).read_text())
    assert (pt2 / "model.pt2").is_file() and pt2_info["opset"] is None
    assert [entry["name"] for entry in pt2_info["outputs"]] == ["refined"]
    assert "out_of_range_weight" not in (pt2 / "README.md").read_text()
    for fmt in FORMATS:  # what the runtime reads from the graph itself
        assert ExportedRefiner(exported["affine", fmt]).output_names == ("refined", "out_of_range_weight")
        assert ExportedRefiner(exported["none", fmt]).output_names == ("refined",)
    assert is_exported_model(folder) and is_exported_model(folder / "model.onnx")
    assert not is_exported_model(trained["none"])


def test_a_pt2_program_is_moved_to_its_device_whole(exported):
    """A `.pt2` graph names the CPU it was traced on (input checks, `to` calls); moving its weights with `.to(device)`
    left those, so it could not run on another device: `stage2-refine` picks CUDA where there is one. The meta device
    stands in for a GPU here (no GPU on the test machines): the program runs there only when moved whole."""
    model = ExportedRefiner(exported["affine", "torch_export"], device="meta")
    opt_v1 = torch.rand(2, 4, 30, 31, device="meta")
    month, biome = (torch.tensor([7, -1], device="meta") for _ in range(2))
    outputs = model._program(opt_v1, month, biome)
    shapes = [(tuple(out.shape), out.device.type) for out in outputs]
    assert shapes == [((2, 4, 30, 31), "meta"), ((2, 1, 30, 31), "meta")]


# ------------------------------------------------------------------------------------------ bad input


def _error_of(call):
    try:
        call()
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    raise AssertionError("no error raised")


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_input_gives_the_eager_error_before_running(fmt, exported, eager, monkeypatch):
    model = ExportedRefiner(exported["affine", fmt], num_threads=1)

    def must_not_run(*args):
        raise AssertionError("the graph ran on bad input")

    monkeypatch.setattr(model, "_run", must_not_run)
    good = torch.rand(2, 4, 120, 120) * 0.3
    month, biome = torch.tensor([7, 1]), torch.tensor([4, -1])
    cases = {
        "three bands": (torch.rand(2, 3, 120, 120), month, biome),
        "month 13": (good, torch.tensor([13, 1]), biome),
        "biome 17": (good, month, torch.tensor([17, 0])),
        "float month": (good, torch.tensor([7.0, 1.0]), biome),
        "one month for two tiles": (good, torch.tensor([7]), biome),
        "month 13 for every tile": (good, 13, biome),
        "a column of months": (good, month[:, None], biome),
        "NaN": (torch.where(good > 0.29, torch.nan, good), month, biome),
        "integer image": ((good * 10000).long(), month, biome),
        "no tile": (good[:0], month[:0], biome[:0]),
    }
    for name, inputs in cases.items():
        with torch.no_grad():
            expected = _error_of(lambda: eager["affine"](*inputs))
        actual = _error_of(lambda: model(*inputs))
        assert actual == expected, name
    assert "month must be in 1..12" in _error_of(lambda: model(*cases["month 13"]))[1]
    assert "opt_v1 is empty" in _error_of(lambda: model(*cases["no tile"]))[1]
    kind, message = _error_of(lambda: model(torch.rand(1, 4, 14, 120), torch.tensor([1]), torch.tensor([1])))
    assert kind is ValueError and "height 14" in message and f"{min_side(14)}.." in message
    too_many = torch.zeros(MAX_BATCH + 1, 4, min_side(14), min_side(14))  # one tile more than the graph takes
    kind, message = _error_of(lambda: model(too_many, torch.ones(MAX_BATCH + 1, dtype=torch.long), None))
    assert kind is ValueError and f"batch {MAX_BATCH + 1} is outside the exported graph's range 1..{MAX_BATCH}" in (
        message)
    assert model.max_batch == MAX_BATCH


# ------------------------------------------------------------------------------------------ command line


def test_cli_subprocess_help_and_bad_input(tmp_path):
    script = Path(sys.executable).parent / "stage2-export"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "modeling_stage2.export"]
    help_run = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, env=_cli_env())
    assert help_run.returncode == 0 and "--format" in help_run.stdout and "--opset" in help_run.stdout

    missing = tmp_path / "no_such_model"
    result = run_export_cli(missing, tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and lines[0].startswith("stage2-export: error: MODEL")
    assert not (tmp_path / "out").exists()


def test_cli_user_errors_in_process(tmp_path, trained, exported, capsys):
    """The other user errors, through `main` (no subprocess start-up each): exit 2, one line naming the flag/file."""
    from modeling_stage2.export import main as export_main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"not a model")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    truncated = tmp_path / "truncated"
    shutil.copytree(trained["none"], truncated)
    base = truncated / "base_model.safetensors"
    base.write_bytes(base.read_bytes()[: base.stat().st_size // 2])  # the header intact, the tensors cut
    cases = [
        ((trained["none"], tmp_path / "o1", "--opset", "12"), "--opset"),
        ((trained["none"], tmp_path / "o2", "--format", "torch_export", "--opset", "18"), "--opset"),
        ((trained["none"], foreign), str(foreign)),
        ((exported["none", "onnx"], tmp_path / "o3"), "already an exported model"),
        ((model_file, tmp_path / "o4"), str(model_file)),
        ((foreign, tmp_path / "o5"), "neither config.json"),
        ((broken, tmp_path / "o7"), "could not be loaded"),
        ((truncated, tmp_path / "o8"), "truncated/base_model.safetensors: not a readable safetensors file"),
    ]  # a Hub repo id: exit 2 when the Hub says it does not exist, 1 when out of reach (test_user_path_inference)
    for args, needle in cases:
        assert export_main([str(arg) for arg in args]) == 2, args
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4", "o5", "o7", "o8"))
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(trained["none"]), str(tmp_path / "o6"), "--format", "tflite"])
    assert exit_info.value.code == 2 and "--format" in capsys.readouterr().err


# --------------------------------------------------------------------------- stage2-refine on ONNX Runtime


def _write_scene(path: Path, seed: int = 0, sample_images=None) -> Path:
    """A 205x170 px uint16 scene with a nodata corner: smooth synthetic bands, or a crop of a mosaic of the real sample
    tiles (`sample_images`)."""
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    height, width = 170, 205
    if sample_images is None:
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
        bands = np.stack([1200 + 600 * b + 400 * np.sin(rows / (17 + b)) * np.cos(cols / (23 - b)) for b in range(4)])
        bands += rng.normal(0, 80, (4, height, width))
    else:
        bands = sample_batch(sample_images, 1, (height, width))[0][0].numpy() * 10000
    data = np.clip(bands, 1, 10000).astype(np.uint16)
    data[:, :30, :40] = 0  # a nodata corner
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": 4, "dtype": "uint16", "nodata": 0,
        "crs": "EPSG:32633", "transform": from_origin(500000.0, 5400000.0, 10.0, 10.0),
    }
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(data)
    return path


def test_scene_on_onnx_runtime_equals_eager(tmp_path, trained, exported, sample_images, capsys):
    rasterio = pytest.importorskip("rasterio")
    scene = _write_scene(tmp_path / "scene.tif", sample_images=sample_images)  # real tiles: partly in range
    eager_out, onnx_out = tmp_path / "eager.tif", tmp_path / "onnx.tif"
    eager_kept, onnx_kept = tmp_path / "eager_kept.tif", tmp_path / "onnx_kept.tif"
    eager_result = refine_scene(load_model(trained["affine"]), scene, eager_out, month=7, biome=4, overlap=32,
                                batch_size=4, progress=False, out_of_range_output=eager_kept)
    code = refine_main([
        "--model", str(exported["affine", "onnx"]), "--input", str(scene), "--output", str(onnx_out),
        "--month", "7", "--biome", "4", "--batch_size", "4", "--no_progress", "--num_threads", "1",
        "--out_of_range_output", str(onnx_kept),
    ])
    assert code == 0
    # The weight map of the graph is the eager model's, and so is the share printed
    assert 0.05 < eager_result.out_of_range_fraction < 0.95
    assert f"{100 * eager_result.out_of_range_fraction:.1f} % of valid pixels" in capsys.readouterr().out
    with rasterio.open(eager_kept) as a, rasterio.open(onnx_kept) as b:
        expected_kept, actual_kept = a.read(1), b.read(1)
        assert b.transform == a.transform and b.descriptions == a.descriptions
    assert np.array_equal(np.isnan(expected_kept), np.isnan(actual_kept))
    assert np.nanmax(np.abs(actual_kept - expected_kept)) < TOLERANCE
    with rasterio.open(eager_out) as a, rasterio.open(onnx_out) as b:
        expected, actual = a.read(), b.read()
        assert b.profile["nodata"] == a.profile["nodata"] and b.crs == a.crs and b.transform == a.transform
        assert b.tags()["STAGE2_REFINED"] == "true"
    assert np.array_equal(np.isnan(expected), np.isnan(actual))
    assert (actual[:, :30, :40] == 0).all()  # nodata kept
    assert np.nanmax(np.abs(actual - expected)) < TOLERANCE


def test_a_window_the_graph_does_not_take_is_refused_before_any_output(tmp_path, exported, capsys):
    """Windows below the graph's smallest side failed at the first window with a ValueError traceback (exit 1)."""
    scene = _write_scene(tmp_path / "scene.tif")
    graph = exported["none", "onnx"]
    assert load_model(graph).side_range == (15, 32768)
    code = refine_main(["--model", str(graph), "--input", str(scene), "--output", str(tmp_path / "out.tif"),
                        "--month", "7", "--biome", "4", "--window", "14", "--overlap", "2", "--no_progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == ["stage2-refine: error: window 14: the exported graph model.onnx takes windows of "
                                   "15..32768 px; pass a window in that range, or use the eager model"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scene.tif"]


def test_tiles_on_onnx_runtime_equal_eager(tmp_path, trained, exported):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for path in sorted(SAMPLE_TILES.rglob("*.npz"))[:3]:
        (tiles / path.name).write_bytes(path.read_bytes())
    refine_tiles(load_model(trained["none"]), tiles, tmp_path / "eager", batch_size=2, progress=False)
    code = refine_main([
        "--model", str(exported["none", "onnx"] / "model.onnx"), "--input", str(tiles),
        "--output_dir", str(tmp_path / "onnx"), "--batch_size", "2", "--no_progress",
    ])
    assert code == 0
    for path in sorted(tiles.glob("*.npz")):
        with np.load(tmp_path / "eager" / path.name) as a, np.load(tmp_path / "onnx" / path.name) as b:
            assert np.abs(a["refined"] - b["refined"]).max() < TOLERANCE
            assert int(a["month"]) == int(b["month"])


def test_a_graph_without_the_weight_reports_none_whatever_its_config(tmp_path, exported, capsys):
    """A graph exported before the weight became an output (here: one without it, its config claiming the fallback)
    has `refined` only: the runtime goes by the graph, and asking for the map is a usage error before any output."""
    folder = tmp_path / "old_export"
    shutil.copytree(exported["none", "onnx"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "out_of_range_fallback": True}))
    model = ExportedRefiner(folder, num_threads=1)
    assert model.config.out_of_range_fallback and model.output_names == ("refined",)
    assert not reports_out_of_range_weight(model)
    opt_v1 = torch.rand(1, 4, 120, 120) * 0.3
    output = model(opt_v1, torch.tensor([7]), torch.tensor([4]))
    assert output.out_of_range_weight is None and len(model(opt_v1, [7], [4], return_dict=False)) == 1
    scene = _write_scene(tmp_path / "scene.tif")
    code = refine_main([
        "--model", str(folder), "--input", str(scene), "--output", str(tmp_path / "refined.tif"),
        "--month", "7", "--biome", "4", "--no_progress", "--out_of_range_output", str(tmp_path / "kept.tif"),
    ])
    assert code == 2 and "reports no out_of_range_weight" in capsys.readouterr().err
    assert not (tmp_path / "refined.tif").exists() and not (tmp_path / "kept.tif").exists()


def test_refine_cli_refuses_quantization_and_batches_an_exported_model_cannot_take(tmp_path, exported, capsys):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    path = sorted(SAMPLE_TILES.rglob("*.npz"))[0]
    (tiles / path.name).write_bytes(path.read_bytes())
    code = refine_main([
        "--model", str(exported["none", "onnx"]), "--input", str(tiles), "--output_dir", str(tmp_path / "out"),
        "--quantization", "8bit", "--no_progress",
    ])
    assert code == 2 and "--quantization" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        refine_main(["--model", str(exported["none", "onnx"]), "--input", str(tiles), "--output_dir",
                     str(tmp_path / "out"), "--batch_size", str(MAX_BATCH + 1), "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and f"--batch_size {MAX_BATCH + 1}: the exported graph" in err[-1]
    assert not (tmp_path / "out").exists()


def test_float16_export_of_a_model_object_leaves_it_unchanged(tmp_path, eager, sample_images):
    """A `Stage2RefinerModel` passed in is neither cast, nor frozen, nor left in eval mode; float16 weights give
    float32 outputs within fp16 rounding of the fp32 model."""
    from modeling_stage2 import Stage2RefinerModel

    model = Stage2RefinerModel(tiny_refiner_config(spectral_correction="affine"))
    _wake_everything(model, seed=5)
    model.train()
    result = export_refiner(model, tmp_path / "fp16", format="onnx", dtype="float16")
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert result.max_abs_difference < 1e-2  # fp16 graph vs fp16 eager
    info = json.loads((tmp_path / "fp16" / EXPORT_INFO_FILE).read_text())
    assert info["weights_dtype"] == "float16" and info["inputs"][0]["dtype"] == "float32"
    opt_v1, month, biome = sample_batch(sample_images, 2, (155, 152))
    refined = ExportedRefiner(tmp_path / "fp16", num_threads=1)(opt_v1, month, biome).refined
    with torch.no_grad():
        expected = model.eval()(opt_v1, month, biome).refined
    assert refined.dtype == torch.float32 and float((refined - expected).abs().max()) < 1e-2


def test_the_600m_layout_exports_like_the_eager_model(tmp_path, sample_images):
    """Two things of the 600M default that the tiny demo config lacks: a position table built for 4 frames (the
    refiner feeds one frame, for which the eager encoder recomputes the table; the graph used to refuse such
    backbones) and a 4-stage head (1/8 .. full resolution; its resizes used to depend on the input size)."""
    from _refiner_helpers import tiny_backbone_config

    from modeling_stage2 import Stage2RefinerModel

    model = Stage2RefinerModel(tiny_refiner_config(backbone_config=tiny_backbone_config(num_frames=4),
                                                   num_convnext_blocks=4, spectral_correction="affine",
                                                   nonnegative_output=True))
    assert model.backbone.config.grid_size[0] == 4
    _wake_everything(model, seed=7)
    export_refiner(model, tmp_path / "four", format="onnx")
    opt_v1, month, biome = sample_batch(sample_images, 2, (155, 152))
    refined = ExportedRefiner(tmp_path / "four", num_threads=1)(opt_v1, month, biome).refined
    with torch.no_grad():
        expected = model.eval()(opt_v1, month, biome).refined
    assert float((refined - expected).abs().max()) < TOLERANCE


# ------------------------------------------------------------------- other patches, dtypes, folders, checks


@pytest.fixture(scope="module")
def small_export(workdir) -> tuple[torch.nn.Module, Path]:
    """A tiny refiner (eval mode) and its `.pt2` export folder, written without the check."""
    from modeling_stage2 import Stage2RefinerModel

    torch.manual_seed(11)
    model = Stage2RefinerModel(tiny_refiner_config())
    _wake_everything(model, seed=11)
    folder = workdir / "small_pt2"
    export_refiner(model, folder, format="torch_export", check=False)
    return model.eval(), folder


def _random_batch(batch: int, height: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    opt_v1 = torch.rand(batch, 4, height, width, generator=generator) * 0.4
    return opt_v1, torch.tensor([3, -1, 12][:batch]), torch.tensor([-1, 5, 16][:batch])


def test_a_16_px_patch_exports_with_its_own_smallest_side(tmp_path):
    """The 300M/100M backbones' 16-px patch: the graph was declared from 15 px, a one-patch grid torch cannot trace,
    so exporting such a refiner failed (torch's multi-line UserError)."""
    from _refiner_helpers import tiny_backbone_config

    from modeling_stage2 import Stage2RefinerModel

    torch.manual_seed(3)
    model = Stage2RefinerModel(tiny_refiner_config(backbone_config=tiny_backbone_config(patch_size=(1, 16, 16))))
    _wake_everything(model, seed=3)
    result = export_refiner(model, tmp_path / "p16", format="torch_export")
    assert result.max_abs_difference < TOLERANCE
    info = json.loads((tmp_path / "p16" / EXPORT_INFO_FILE).read_text())
    assert info["shape_limits"]["height"] == [17, 32768] and info["shape_limits"]["width"] == [17, 32768]
    assert "(17..32768 px)" in info["padding"]["rule"] and info["padding"]["multiple_of"] == [16, 16]
    graph = ExportedRefiner(tmp_path / "p16", num_threads=1)
    assert graph.side_range == (17, 32768)
    for index, shape in enumerate(((1, 17, 17), (2, 17, 33), (3, 40, 31))):
        inputs = _random_batch(*shape, seed=index)
        with torch.no_grad():
            expected = model.eval()(*inputs).refined
        assert float((graph(*inputs).refined - expected).abs().max()) < TOLERANCE, shape
    kind, message = _error_of(lambda: graph(torch.rand(1, 4, 16, 40) * 0.3, 1, 1))
    assert kind is ValueError and "height 16 is outside the exported graph's range 17..32768" in message


def test_a_bfloat16_model_object_exported_as_float32_is_not_cast(tmp_path):
    """Only a float16 export copied the caller's model; a float32 export cast a bfloat16 model in place."""
    from modeling_stage2 import Stage2RefinerModel

    model = Stage2RefinerModel(tiny_refiner_config()).to(torch.bfloat16)
    export_refiner(model, tmp_path / "from_bf16", format="torch_export", check=False)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "from_bf16" / EXPORT_INFO_FILE).read_text())["weights_dtype"] == "float32"


def test_an_earlier_export_holding_other_files_is_not_replaced(tmp_path, small_export, capsys):
    """A folder with an export.json was replaced whole, deleting whatever else it held."""
    from modeling_stage2.export import ExportError

    model, earlier = small_export
    folder = tmp_path / "export"
    shutil.copytree(earlier, folder)
    (folder / "notes.txt").write_text("keep me")
    (folder / "results").mkdir()
    with pytest.raises(ExportError, match=r"holds an earlier export and other files \(notes.txt, results\)"):
        export_refiner(model, folder, format="torch_export", check=False)
    assert (folder / "notes.txt").read_text() == "keep me" and (folder / "results").is_dir()
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        ["README.md", "config.json", EXPORT_INFO_FILE, "model.pt2", "notes.txt", "results"])


def test_a_graph_that_differs_from_the_eager_model_is_refused(tmp_path, small_export, trained, monkeypatch, capsys):
    """The check only recorded the difference, and a NaN in the graph's output was recorded as 0.0 (`max(0.0, nan)`
    is 0.0): a wrong graph was written like a right one."""
    from modeling_stage2.export import ExportCheckError
    from modeling_stage2.export import main as export_main

    model, earlier = small_export
    folder = tmp_path / "export"
    shutil.copytree(earlier, folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    run = ExportedRefiner._run

    def with_nan(self, *inputs):
        outputs = run(self, *inputs)
        outputs["refined"][:, :, 0, 0] = torch.nan  # one pixel of each tile
        return outputs

    monkeypatch.setattr(ExportedRefiner, "_run", with_nan)
    refused = r"model.pt2: the exported graph differs from the eager model by inf"
    with pytest.raises(ExportCheckError, match=refused):
        export_refiner(model, folder, format="torch_export")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # the earlier export is kept

    def off_by(self, *inputs):  # a graph off by 1e-3 reflectance: an error a float32 graph never makes
        return {name: value + 1e-3 for name, value in run(self, *inputs).items()}

    monkeypatch.setattr(ExportedRefiner, "_run", off_by)
    assert export_main([str(trained["none"]), str(tmp_path / "new"), "--format", "torch_export"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "differs from the eager model by 1.00e-03" in error[0], error
    assert not (tmp_path / "new").exists()


def test_a_damaged_export_json_is_named_in_one_line(tmp_path, small_export):
    _, earlier = small_export
    info = json.loads((earlier / EXPORT_INFO_FILE).read_text())
    cases = {
        "truncated": (json.dumps(info)[:200], "export.json: not valid JSON"),
        "no format": (json.dumps({k: v for k, v in info.items() if k != "format"}), "key 'format' is None"),
        "graph outside": (json.dumps({**info, "graph_file": "../model.pt2"}), "key 'graph_file' is '../model.pt2'"),
        "a list": ("[1, 2]", "export.json: expected a JSON object, got list"),
    }
    for name, (text, needle) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        shutil.copytree(earlier, folder)
        (folder / EXPORT_INFO_FILE).write_text(text)
        kind, message = _error_of(lambda: ExportedRefiner(folder))
        assert kind is ValueError and needle in message and str(folder) in message, (name, message)
        assert len(message.splitlines()) == 1
