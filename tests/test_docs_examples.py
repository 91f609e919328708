"""The docs name what exists. Every flag that a documented command line passes to a console script is one the
script accepts (its `--help`); every Python example parses, imports names that exist and passes keywords that the
called function or class takes; every dotted name and call in the prose's inline code (`training.linear_fit.
LinearColorFit`, `Stage2RefinerConfig.spectral_mlp_hidden_size`, `refine_arrays(model, image, month=7)`) exists and
takes those keywords. The docs' figures are checked against their results files elsewhere
(`test_benchmark_figures.py`, `test_quality_figures.py`)."""
from __future__ import annotations

import ast
import configparser
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import io
import pkgutil
import re
from pathlib import Path

import pytest
from transformers import PretrainedConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
OWN_PACKAGES = ("modeling_stage2", "data_builders", "training", "inference_stage2", "model_cards")
DEMO = "python -m training.demo"
FILE_SUFFIXES = ("py", "md", "json", "jsonl", "yaml", "txt", "png", "safetensors", "npz", "tif", "onnx", "pt2")
"""Last parts of an inline span that make it a file name (`train.py`, `docs/data.md`), not a Python name."""


def console_scripts() -> dict[str, str]:
    """Script name -> `module:function`, as setup.cfg installs them."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    lines = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


SCRIPTS = console_scripts()
COMMAND = re.compile("(" + "|".join(re.escape(name) for name in sorted(SCRIPTS, key=len, reverse=True))
                     + "|" + re.escape(DEMO) + r")(?![\w-])")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
END_OF_COMMAND = re.compile(r"#|`|\||;|&&|\)")


def logical_lines(text: str) -> list[str]:
    """Lines with shell continuations (`\\` + newline) and a usage's indented `[--flag ...]` lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    return re.sub(r"\n\s+(?=\[--)", " ", text).split("\n")


def command_lines(text: str) -> list[tuple[str, str]]:
    """(command, what follows it up to a comment, pipe or the end of a code span) for each command line in `text`:
    in code blocks, and in inline code spans of the prose."""
    found = []
    for line in logical_lines(text):
        spans = re.findall(r"`([^`\n]+)`", line) if "```" not in line else []
        for candidate in [*spans, line] if spans else [line]:
            for match in COMMAND.finditer(candidate):
                rest = END_OF_COMMAND.split(candidate[match.end():])[0]
                found.append((match.group(1), rest))
    return found


def documented_flags(command: str, rest: str) -> set[str]:
    if command == "stage2-train" and " -- " in f" {rest} ":  # accelerate's options come before the `--`
        rest = f" {rest} ".split(" -- ", 1)[1]
    return set(FLAG.findall(rest))


def help_text(command: str) -> str:
    """What the command prints for its help (for stage2-train, `--help-all`: every training flag), in-process."""
    if command == DEMO:
        from training.demo import main as demo_main
        return _printed(demo_main, ["--help"]) + help_text("stage2-train")  # the demo passes on training flags
    module, function = SCRIPTS[command].split(":")
    main = getattr(importlib.import_module(module), function)
    return _printed(main, ["--help-all"] if command == "stage2-train" else ["--help"])


def _printed(main, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            assert main(argv) == 0
        except SystemExit as stop:  # argparse's --help
            assert stop.code == 0
    return out.getvalue()


def uses_by_command() -> dict[str, dict[str, set[str]]]:
    """command -> flag -> the docs that pass it."""
    uses: dict[str, dict[str, set[str]]] = {}
    for doc in DOCS:
        for command, rest in command_lines(doc.read_text()):
            for flag in documented_flags(command, rest):
                uses.setdefault(command, {}).setdefault(flag, set()).add(doc.relative_to(ROOT).as_posix())
    return uses


USES = uses_by_command()


def test_command_lines_are_found_as_a_reader_sees_them():
    text = ("```bash\nstage2-refine --model m \\\n    --input x.npz --bogus 1  # --not_a_flag\n```\n"
            "Prose with `stage2-train --num_processes 2 -- --config c.yaml` and `stage2-evaluate --json F`.\n"
            "stage2-build-dataset --data_dir D [--strict]\n                     [--num_proc K]\n"
            "The stage2-refiner repo and `stage2-export` alone.\n")
    found = {(command, frozenset(documented_flags(command, rest))) for command, rest in command_lines(text)}
    assert found == {("stage2-refine", frozenset({"--model", "--input", "--bogus"})),
                     ("stage2-train", frozenset({"--config"})),
                     ("stage2-evaluate", frozenset({"--json"})),
                     ("stage2-build-dataset", frozenset({"--data_dir", "--strict", "--num_proc"})),
                     ("stage2-export", frozenset())}


def test_every_console_script_is_documented_with_its_flags():
    """So the check below has something to check: each script (and the demo) appears with flags in the docs."""
    assert set(USES) == set(SCRIPTS) | {DEMO}
    assert all(len(flags) >= 1 for flags in USES.values())


@pytest.mark.parametrize("command", sorted(USES))
def test_documented_flags_are_accepted(command):
    accepted = set(FLAG.findall(help_text(command)))
    assert "--help" in accepted or "--help-all" in accepted
    unknown = {flag: sorted(docs) for flag, docs in USES[command].items()
               if flag not in accepted and flag != "--help-all"}
    assert not unknown, f"{command} does not take these documented flags: {unknown}"


def python_examples() -> list[tuple[str, str]]:
    """(doc:line, code) of every ```python block."""
    examples = []
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            line = text[:match.start()].count("\n") + 1
            examples.append((f"{doc.relative_to(ROOT).as_posix()}:{line}", match.group(1)))
    return examples


EXAMPLES = python_examples()


def imported_names(tree: ast.AST) -> dict[str, object]:
    """The names an example imports from this project or transformers; each must exist."""
    names = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in (*OWN_PACKAGES, "transformers")):
            continue
        module = importlib.import_module(node.module)
        for alias in node.names:
            if not hasattr(module, alias.name):
                importlib.import_module(f"{node.module}.{alias.name}")  # a submodule, or ImportError
            names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


def unknown_keywords(target, keywords: list[str]) -> list[str]:
    """Keywords the callable does not take. One that takes **kwargs takes any, except a configuration (or its
    preset constructor), whose keywords must be its attributes: an unknown one would be stored and never used."""
    parameters = inspect.signature(target).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return [name for name in keywords if name not in parameters]
    owner = target if inspect.isclass(target) else getattr(target, "__self__", None)
    if inspect.isclass(owner) and issubclass(owner, PretrainedConfig):
        config = owner()
        return [name for name in keywords if name not in parameters and not hasattr(config, name)]
    return []


def test_the_python_example_check_catches_a_renamed_keyword():
    tree = ast.parse("from modeling_stage2 import PrithviConfig, Stage2RefinerConfig\n"
                     "PrithviConfig.from_preset('prithvi_eo_v2_tiny', bands=('B02',), colour=1)\n"
                     "Stage2RefinerConfig(spectral_mlp_hidden_size=8, mlp_width=3)\n")
    names = imported_names(tree)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    unknown = [unknown_keywords(called(node, names), [k.arg for k in node.keywords]) for node in calls]
    assert sorted(map(tuple, unknown)) == [("colour",), ("mlp_width",)]


def test_there_are_python_examples():
    assert len(EXAMPLES) >= 20


@pytest.mark.parametrize("where, code", EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_python_example_names_what_exists(where, code):
    tree = ast.parse(code, filename=where)
    names = imported_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = called(node, names)
        assert target is not MISSING, f"{where}: {ast.unparse(node.func)} does not exist"
        if not callable(target):
            continue
        keywords = [keyword.arg for keyword in node.keywords if keyword.arg is not None]
        assert not unknown_keywords(target, keywords), (
            f"{where}: {ast.unparse(node.func)} takes no {unknown_keywords(target, keywords)}")


@functools.cache
def public_objects() -> dict[str, list[object]]:
    """Name -> the public functions and classes of that name defined in this project's packages."""
    index: dict[str, list[object]] = {}
    for package_name in OWN_PACKAGES:
        package = importlib.import_module(package_name)
        modules = [package] + [importlib.import_module(f"{package_name}.{info.name}")
                               for info in pkgutil.iter_modules(package.__path__) if info.name != "__main__"]
        for module in modules:
            for name, obj in vars(module).items():
                own = callable(obj) and getattr(obj, "__module__", "").split(".")[0] in OWN_PACKAGES
                if not name.startswith("_") and own and all(obj is not seen for seen in index.get(name, [])):
                    index.setdefault(name, []).append(obj)
    return index


MISSING = object()


def attribute_path(obj, attributes: list[str]):
    """`obj.a.b...`, or MISSING where a name does not exist. A class's instance attributes count: a configuration's
    (read from a default instance), a dataclass's fields, and the `self.<name> = ...` of its code."""
    for name in attributes:
        if hasattr(obj, name):
            obj = getattr(obj, name)
        elif inspect.isclass(obj) and issubclass(obj, PretrainedConfig) and hasattr(obj(), name):
            obj = getattr(obj(), name)
        elif inspect.isclass(obj) and (name in {field.name for field in dataclasses.fields(obj)}
                                       if dataclasses.is_dataclass(obj) else
                                       re.search(rf"\bself\.{name}\b[^=\n]*=", inspect.getsource(obj))):
            return None  # an instance attribute: it exists; what it holds is not known here
        else:
            return MISSING
    return obj


def dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def called(node: ast.Call, names: dict[str, object]):
    """What an example calls where it is an imported name or an attribute of one (`attribute_path`: MISSING where
    that attribute does not exist); None for anything else (a local variable's method)."""
    path = dotted(node.func)
    if not path or path[0] not in names:
        return None
    return attribute_path(names[path[0]], path[1:])


def inline_code(doc: Path) -> list[str]:
    """The inline code spans of a doc's prose and tables (code blocks left out)."""
    prose = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return re.findall(r"`([^`]+)`", prose.replace("\n", " "))


def reference_problems(span: str, index: dict[str, list[object]]) -> list[str]:
    """What an inline span names that does not exist: a dotted name starting with a package or a public name of this
    project (`training.linear_fit.LinearColorFit`, `Stage2RefinerConfig.spectral_mlp_hidden_size`), or a keyword
    a call of a public function does not take (`refine_arrays(model, image, month=7)`). Spans that are not Python
    expressions (commands, file names, prose) are left alone."""
    try:
        tree = ast.parse(span.strip(), mode="eval")
    except SyntaxError:
        return []
    problems = []
    for node in ast.walk(tree):
        path = dotted(node) if isinstance(node, (ast.Attribute, ast.Name)) else None
        if path and path[-1] in FILE_SUFFIXES:  # a file name: `train.py`, `docs/data.md`
            continue
        if path and path[0] in OWN_PACKAGES and len(path) > 1:
            module, rest = path[0], path[1:]
            while rest and is_package(module) and importlib.util.find_spec(f"{module}.{rest[0]}") is not None:
                module, rest = f"{module}.{rest[0]}", rest[1:]
            if attribute_path(importlib.import_module(module), rest) is MISSING:
                problems.append(".".join(path))
        elif path and path[0] in index and len(path) > 1:
            if all(attribute_path(obj, path[1:]) is MISSING for obj in index[path[0]]):
                problems.append(".".join(path))
        elif isinstance(node, ast.Call) and (path := dotted(node.func)) and path[0] in index:
            keywords = [keyword.arg for keyword in node.keywords if keyword.arg is not None]
            targets = [attribute_path(obj, path[1:]) for obj in index[path[0]]]
            if not any(callable(t) and not _unknown_or_unreadable(t, keywords) for t in targets):
                problems.append(f"{ast.unparse(node.func)}(... {', '.join(keywords)} ...)")
    return problems


def is_package(module: str) -> bool:
    return hasattr(importlib.import_module(module), "__path__")


def _unknown_or_unreadable(target, keywords: list[str]) -> list[str]:
    try:
        return unknown_keywords(target, keywords)
    except (TypeError, ValueError):  # no signature to read (a builtin): nothing to say
        return []


def test_the_inline_reference_check_catches_what_does_not_exist():
    index = public_objects()
    assert reference_problems("training.linear_fit.LinearColorFit", index) == []
    assert reference_problems("Stage2RefinerConfig.spectral_mlp_hidden_size", index) == []
    assert reference_problems("refine_arrays(model, image, month=7, biome=4)", index) == []
    assert reference_problems("docs/training.md", index) == []
    assert reference_problems("stage2-refine --model runs/demo/best", index) == []
    assert reference_problems("training.linear_fit.LinearColourFit", index) == ["training.linear_fit.LinearColourFit"]
    assert reference_problems("Stage2RefinerConfig.spectral_mlp_width", index) == [
        "Stage2RefinerConfig.spectral_mlp_width"]
    assert reference_problems("refine_arrays(model, image, months=7)", index) == ["refine_arrays(... months ...)"]


@pytest.mark.parametrize("doc", DOCS, ids=[doc.relative_to(ROOT).as_posix() for doc in DOCS])
def test_inline_references_name_what_exists(doc):
    index = public_objects()
    problems = {span: found for span in inline_code(doc) if (found := reference_problems(span, index))}
    assert not problems, f"{doc.relative_to(ROOT)} names what does not exist: {problems}"
