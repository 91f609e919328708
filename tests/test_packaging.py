"""The package as `pip install .`, `pip install git+...` or a wheel installs it, not as the editable checkout the other
tests import: the wheel ships every module and the files read at run time (the card templates, the `evaluate` metric
folder), its console scripts name modules it holds, and what only the repository holds (the bundled sample,
`configs/`) is a one-line error that says so. The wheel is built offline (`--no-build-isolation --no-index`) from a
copy of the build's inputs, so the checkout gets no `build/` or egg-info."""
from __future__ import annotations

import configparser
import json
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling_stage2", "inference_stage2", "data_builders", "training", "model_cards")
BUILD_FILES = ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE")


def _py_modules() -> list[str]:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg", encoding="utf-8")
    return config.get("options", "py_modules", fallback="").split()


def _shipped_sources() -> list[str]:
    """What the wheel must hold: every module and every Markdown file (templates, the metric card) of the packages."""
    files = [f"{module}.py" for module in _py_modules()]
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".md") and "__pycache__" not in path.parts:
                files.append(path.relative_to(REPO_ROOT).as_posix())
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    pytest.importorskip("pip")
    source = tmp_path_factory.mktemp("source")
    for name in (*BUILD_FILES, *(f"{module}.py" for module in _py_modules())):
        if (REPO_ROOT / name).is_file():
            shutil.copy2(REPO_ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                             "--no-index", "--no-cache-dir", "--disable-pip-version-check", "-q", "-w", str(out)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "bdist_wheel" in result.stderr:
        pytest.skip("setuptools cannot build wheels here without the `wheel` package (offline)")
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = out.glob("*.whl")
    return built


def test_the_wheel_ships_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in _shipped_sources() if name not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    for name in ("model_cards/template.md", "model_cards/dataset_template.md", "training/stage2_metric/README.md",
                 "training/stage2_metric/stage2_metric.py"):
        assert name in names
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {*PACKAGES, *(f"{module}.py" for module in _py_modules())}


def test_the_wheel_ships_the_licence_its_metadata_names(wheel):
    """setup.cfg says Apache-2.0, and there was no licence text to ship: the wheel carries `LICENSE`, the Apache 2.0
    text, under the name its metadata gives."""
    archive = zipfile.ZipFile(wheel)
    (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
    fields = archive.read(metadata).decode()
    assert re.search(r"^License(-Expression)?: Apache-2\.0$", fields, re.M)
    (named,) = re.findall(r"^License-File: (\S+)$", fields, re.M)
    (shipped,) = [name for name in archive.namelist() if name.endswith(f".dist-info/licenses/{named}")
                  or name.endswith(f".dist-info/{named}")]
    text = archive.read(shipped)
    assert text == (REPO_ROOT / "LICENSE").read_bytes()
    assert b"Apache License" in text and b"Version 2.0, January 2004" in text and len(text.splitlines()) == 202


def test_every_console_script_runs_a_module_the_wheel_ships(wheel):
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    config = configparser.ConfigParser()
    config.read_string(archive.read(entry_points).decode())
    scripts = dict(config["console_scripts"])
    assert len(scripts) == 9
    source = archive.read("stage2_scripts.py").decode()
    for script, target in scripts.items():
        module, function = target.split(":")
        assert module == "stage2_scripts" and re.search(rf"^def {function}\(", source, re.M), (script, target)
        (command,) = re.findall(rf"^def {function}\(.*?\n\s+return run_command\(\"([\w.]+):\w+\"", source, re.M | re.S)
        assert command.replace(".", "/") + ".py" in names, (script, command)


def test_the_installed_demo_says_its_sample_is_in_the_repository(wheel, tmp_path):
    """Installed, `python -m training.demo` looked for `data/sample/tiles` and `configs/demo.yaml` beside the package
    (site-packages) and said so, not that they ship with the repository only."""
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)  # a pure wheel installs as it unpacks
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -S: the environment's site-packages without their .pth files (the editable finder that maps to the checkout)
    code = f"""import sys
sys.path[:0] = [{str(installed)!r}]
sys.path += {json.dumps(site.getsitepackages())}
import model_cards.cards as cards, stage2_scripts, training.demo as demo
for module in (cards, stage2_scripts, demo):
    assert module.__file__.startswith({str(installed)!r}), module.__file__
assert cards.TEMPLATE_PATH.is_file() and cards.DATASET_TEMPLATE_PATH.is_file()
sys.exit(demo.main(["--output_dir", "out"]))
"""
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=elsewhere, capture_output=True, text=True,
                            timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("python -m training.demo: error: --data_dir data/sample/tiles not found"), lines
    assert "source repository" in lines[0] and "site-packages" not in lines[0], lines
    assert not (elsewhere / "out").exists()
