"""Load transformers' own common model tests from an unpacked transformers sdist (`make transformers-common-tests`).

The sdist ships `tests/test_modeling_common.py` and `tests/test_configuration_common.py` but not the folders they
import from (`tests/exporters`, `tests/generation`, `tests/utils`), and `tests/` has no `__init__.py`. So the sdist's
`tests/` folder is loaded as a package under another name (`transformers_sdist_tests`, so that it cannot clash with
this repository's `tests/`), and the three missing modules are put into `sys.modules` first, each with the one name
the common tests take from it:

* `exporters.test_export.ExportTesterMixin` - the base class of `ModelTesterMixin`; it holds the `torch.export`
  tests. An empty mixin here: those tests are not in the sdist, so they cannot run (the project's own ONNX export is
  tested by tests/test_export.py).
* `generation.test_utils.GenerationTesterMixin` - only used in an `issubclass` check that a tester of a model that
  can `generate` inherits it. Neither model generates (`can_generate()` is False), so an empty class gives the same
  answer as the real one.
* `tests/__init__.py` - empty upstream and missing from the sdist, but test_configuration_common.py executes it
  (`direct_transformers_import`); `load_common_tests` creates the empty file in the scratch copy.
* `utils.test_configuration_utils.config_common_kwargs` - data, not a test: a non-default value for each attribute
  that every `PreTrainedConfig` has (used by `ConfigTester.check_config_arguments_init`, which composite configs
  such as the refiner's skip). Built below from a table; `_config_common_kwargs` fails if the installed release's
  `PreTrainedConfig` gained a public attribute that the table lacks, instead of silently testing less.

`parameterized` (a test-only dependency of the common tests) is not stubbed: the make target installs it into a
scratch folder on `PYTHONPATH`.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from pathlib import Path

PACKAGE = "transformers_sdist_tests"

# A non-default value for each public attribute of `PreTrainedConfig()` (transformers 5.x).
_NON_DEFAULT_VALUES = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",  # `check_config_arguments_init` compares it with torch.float16
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
# Attributes that are bookkeeping, not arguments (the upstream list leaves them out as well).
_NOT_ARGUMENTS = {"transformers_version", "is_encoder_decoder", "_name_or_path", "_commit_hash"}


def _config_common_kwargs() -> dict:
    from transformers import PreTrainedConfig

    public = {key.lstrip("_") for key in vars(PreTrainedConfig()) if not key.endswith("_internal")}
    public -= {"post_init_done"} | {key.lstrip("_") for key in _NOT_ARGUMENTS}
    missing = sorted(public - set(_NON_DEFAULT_VALUES))
    if missing:
        raise RuntimeError(
            f"PreTrainedConfig has attributes {missing} that tests/transformers_common/_sdist_shims.py has no "
            "non-default value for; add them to _NON_DEFAULT_VALUES."
        )
    return {key: value for key, value in _NON_DEFAULT_VALUES.items() if key in public}


def _stub(name: str, doc: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def load_common_tests(sdist_dir: str | Path):
    """`(test_modeling_common, test_configuration_common)` modules of the unpacked sdist at `sdist_dir`."""
    tests_dir = Path(sdist_dir) / "tests"
    if not (tests_dir / "test_modeling_common.py").is_file():
        raise FileNotFoundError(f"{tests_dir} has no test_modeling_common.py; is {sdist_dir} an unpacked sdist?")
    try:
        import parameterized  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "The common tests need `parameterized`; `make transformers-common-tests` installs it on PYTHONPATH."
        ) from error

    # Upstream tests/ has an empty __init__.py that the sdist leaves out; test_configuration_common.py needs the file
    # (`direct_transformers_import(Path(__file__).parent)` executes it, then returns the installed transformers).
    (tests_dir / "__init__.py").touch()
    if PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [str(tests_dir)]
        package = types.ModuleType(PACKAGE, "transformers' sdist tests/ folder")
        package.__path__ = [str(tests_dir)]
        package.__spec__ = spec
        sys.modules[PACKAGE] = package

        class ExportTesterMixin:
            """Stand-in: the sdist lacks tests/exporters (the torch.export tests); see the module docstring."""

        class GenerationTesterMixin:
            """Stand-in: the sdist lacks tests/generation; only an `issubclass` check uses it."""

        for sub, doc, attributes in (
            ("exporters", "stub package", {}),
            ("exporters.test_export", "stub: ExportTesterMixin", {"ExportTesterMixin": ExportTesterMixin}),
            ("generation", "stub package", {}),
            ("generation.test_utils", "stub: GenerationTesterMixin",
             {"GenerationTesterMixin": GenerationTesterMixin}),
            ("utils", "stub package", {}),
            ("utils.test_configuration_utils", "stub: config_common_kwargs",
             {"config_common_kwargs": _config_common_kwargs()}),
        ):
            module = _stub(f"{PACKAGE}.{sub}", doc, **attributes)
            if "." not in sub:
                module.__path__ = []
    return (importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_configuration_common"))
