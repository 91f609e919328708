"""The front door: what `make clean` removes, the README's install lines keeping the pins, the demo's `--help`."""
from __future__ import annotations

import configparser
import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_clean_removes_what_make_made_and_keeps_other_runs(tmp_path):
    """`make clean` removed all of runs/: the trainings of one's own that the docs write there (runs/lowvr) too."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    made = [".venv/bin", "runs/demo/best", "build/lib", "stage2_refiner.egg-info"]
    kept = ["runs/lowvr/best", "data/sample/tiles", "configs"]
    for folder in made + kept:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "file").write_text("x")
    result = subprocess.run(["make", "-s", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [folder for folder in made if (tmp_path / folder).exists()] == []
    assert [folder for folder in kept if not (tmp_path / folder / "file").is_file()] == []


def _pip_installs(text: str) -> list[str]:
    """The `pip install ...` commands of a text (inline code spans and code-block lines), up to a comment."""
    return [match.split("#")[0].strip() for match in re.findall(r"pip install[^`\n]*", text)]


def test_the_readmes_installs_of_the_checkout_keep_the_pins():
    """Every README and docs line that installs this checkout passes constraints.txt, as `make venv` does: without it
    an extra resolves its own versions (and, in a fresh environment, torch). An install by the package's name
    (`'stage2-refiner[geo]'`) counts as one: it leaves torch unpinned too."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    installs = [command for doc in docs for command in _pip_installs(doc.read_text())]
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    commands = [command for command in installs
                if re.search(rf"\s-e\s|\s\.|{re.escape(setup['metadata']['name'])}", command)]
    assert commands
    assert [command for command in commands if "-c constraints.txt" not in command] == []


def test_the_extras_the_readme_and_docs_name_exist():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extras = set(setup["options.extras_require"])
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {extra for doc in docs for extra in re.findall(r"(?:\.|stage2-refiner)\[(\w+)\]", doc.read_text())}
    assert named and named <= extras, named - extras


def test_the_demos_help_says_it_takes_every_training_flag():
    """The README passes `--dataset_seed` to the demo; its `--help` listed only its own three flags."""
    from training.demo import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = " ".join(out.getvalue().split())
    assert "stage2-train --help-all" in text and "--dataset_seed" in text and "--epochs" in text
