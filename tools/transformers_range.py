"""`make transformers-range`: run the trainer tests against the lowest and the highest transformers release that
setup.cfg allows (Stage2Trainer overrides private `Trainer` methods, so the pin is what these tests ran against).

For each of the two versions (one run when they are the same release): a scratch venv under `--scratch`, torch
2.13.0 (CPU) and `pip install -e '.[test]' transformers==VERSION` with constraints.txt minus its transformers line
(every other package stays pinned), then pytest on the trainer tests. Needs PyPI. Prints one markdown table row per
version (for docs/transformers_compat.md) and exits 1 when a run failed.

    python tools/transformers_range.py [--scratch DIR] [--tests tests/test_training.py ...] [--versions 5.24.0 ...]
"""
from __future__ import annotations

import argparse
import configparser
import datetime
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"
# The tests of training/trainer.py's Trainer overrides (checkpoints, resume, best model, accumulation, NaN guard).
DEFAULT_TESTS = ["tests/test_training.py", "tests/test_atomic_files.py", "tests/test_spectral_correction.py"]


def transformers_requirement() -> Requirement:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    for line in parser["options"]["install_requires"].splitlines():
        line = line.strip()
        if line and Requirement(line).name == "transformers":
            return Requirement(line)
    raise SystemExit("setup.cfg has no transformers requirement")


def released_versions() -> list[Version]:
    output = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers",
                             "--disable-pip-version-check"], check=True, capture_output=True, text=True).stdout
    match = re.search(r"Available versions:(.*)", output)
    if not match:
        raise SystemExit(f"cannot read `pip index versions transformers`:\n{output}")
    return [Version(v.strip()) for v in match.group(1).split(",") if v.strip()]


def allowed_extremes(requirement: Requirement) -> list[str]:
    allowed = sorted(v for v in released_versions() if not v.is_prerelease and v in requirement.specifier)
    if not allowed:
        raise SystemExit(f"no released transformers matches {requirement}")
    return sorted({str(allowed[0]), str(allowed[-1])}, key=Version)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, **kwargs)


def test_version(version: str, scratch: Path, tests: list[str]) -> dict:
    home = scratch / version
    venv = home / "venv"
    if venv.exists():
        shutil.rmtree(venv)
    home.mkdir(parents=True, exist_ok=True)
    constraints = home / "constraints.txt"
    lines = (REPO / "constraints.txt").read_text().splitlines()
    constraints.write_text("\n".join(line for line in lines if not line.lower().startswith("transformers")) + "\n")
    started = time.monotonic()
    run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", str(constraints)]
    run(pip + [TORCH], check=True)
    run(pip + ["-e", ".[test]", f"transformers=={version}"], check=True, cwd=REPO)
    installed = subprocess.run([python, "-c", "import transformers, torch; print(transformers.__version__, "
                                "torch.__version__)"], check=True, capture_output=True, text=True).stdout.split()
    install_s = time.monotonic() - started
    started = time.monotonic()
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    print("+", " ".join(command), flush=True)
    lines = []
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:  # streamed, and kept for the summary line
            print(line, end="", flush=True)
            lines.append(line.rstrip())
    test_s = time.monotonic() - started
    summary = next((line.strip("= ") for line in reversed(lines)
                    if " in " in line and any(word in line for word in ("passed", "failed", "error"))), "?")
    return {"version": version, "installed": installed, "returncode": process.returncode, "summary": summary,
            "install_s": install_s, "test_s": test_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/stage2-transformers-range"))
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS)
    parser.add_argument("--versions", nargs="+", help="test these instead of the pin's lowest and highest release")
    args = parser.parse_args(argv)
    requirement = transformers_requirement()
    versions = args.versions or allowed_extremes(requirement)
    print(f"setup.cfg: {requirement}; testing {', '.join(versions)} on {' '.join(args.tests)}", flush=True)
    results = [test_version(version, args.scratch, args.tests) for version in versions]
    today = datetime.date.today().isoformat()
    print("\n| date | transformers | torch | tests | result | install | tests run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {today} | {r['installed'][0]} | {r['installed'][1]} | {' '.join(args.tests)} | {r['summary']} | "
              f"{r['install_s']:.0f} s | {r['test_s']:.0f} s |")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
