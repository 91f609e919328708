"""Push a trained Stage 2 refiner (and optionally its Arrow dataset) to the Hugging Face Hub.

    stage2-push runs/demo/best me/stage2-refiner [--private] [--include_code] [--dataset data/arrow]

One commit holds the adapter / weights (safetensors), the trainable non-backbone modules, the configs,
the metrics, the preview image and the model card (generated from the folder for this repo, unless the
folder holds a hand-written README.md). `--include_code` adds the modeling code and an `auto_map` so that
`AutoModel.from_pretrained(repo, trust_remote_code=True)` works without the package installed.
`--endpoint` (or `HF_ENDPOINT`) picks another Hub, e.g. a local one.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import modeling_stage2
from data_builders.cache import ARROW_MARKER, DATASET_STATE, saved_dataset_problem
from modeling_stage2._files import restore_set_aside
from modeling_stage2._signals import exit_on_termination
from modeling_stage2.adapters import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, BASE_SOURCE_FILE, BASE_WEIGHTS_FILE,
                                      RECORD_FILES, check_model_folder, read_base_description, read_base_source)
from modeling_stage2.convert_prithvi import HUB_PREFIX
from modeling_stage2.export import EXPORT_FILES, EXPORT_INFO_FILE
from modeling_stage2.hub import is_hub_repo_id
from modeling_stage2.modeling_stage2 import backbone_weights_location
from modeling_stage2.onnx_runtime import resolve_export
from modeling_stage2.vocabulary import OneLineArgumentParser
from training.discriminator import CONFIG_NAME as DISCRIMINATOR_CONFIG
from training.discriminator import WEIGHTS_NAME as DISCRIMINATOR_WEIGHTS
from training.trainer import (BEST_DIR_NAME, CHECKPOINT_COMPLETE_NAME, DISC_OPTIMIZER_META, DISC_OPTIMIZER_TENSORS,
                              PREFIX_CHECKPOINT_DIR, TRAINER_EXTRA_STATE, checkpoint_problem)

from .cards import CardError, build_dataset_card, card_for_folder, read_json, should_regenerate_card

logger = logging.getLogger(__name__)

MODEL_FOLDER_LAYOUTS = (
    ("adapter", (ADAPTER_CONFIG_FILE,), (ADAPTER_WEIGHTS_FILE,)),
    ("full model", ("config.json",), ("model.safetensors", "model.safetensors.index.json")),
)
# What a trained folder may hold that belongs on the Hub; everything else (optimizer and RNG states,
# the discriminator and the trainer's own state in a checkpoint, pickles, checkpoints, logs) stays home.
UPLOAD_PATTERNS = ("*.safetensors", "*.json", "README.md", "*.png", "*.jpg", "*.jpeg")
NEVER_UPLOAD = ("trainer_state.json", "optimizer*", "scheduler*", "rng_state*", "training_args*", "*.bin", "*.pt",
                "*.pth", "*.pkl", "*.pickle", "*.npy", DISCRIMINATOR_CONFIG, DISCRIMINATOR_WEIGHTS, DISC_OPTIMIZER_META,
                DISC_OPTIMIZER_TENSORS, TRAINER_EXTRA_STATE, CHECKPOINT_COMPLETE_NAME)
# "_*": the run's Arrow cache (`_dataset`), which the Trainer's own push leaves out too. Not imported from
# training.train, whose import sets MKL_CBWR for every process started after it.
CHECKPOINT_DIRS = f"{PREFIX_CHECKPOINT_DIR}-*"
SKIPPED_DIRS = (CHECKPOINT_DIRS, "runs", "logs", "__pycache__", ".cache", ".git", "tensorboard", "_*", BEST_DIR_NAME)
# The modules `--include_code` can write (those of the package): other code in a repo (say an endpoint's
# `handler.py`) is the owner's.
CODE_FILES = tuple(sorted(path.name for path in Path(modeling_stage2.__file__).parent.glob("*.py")))
# The files of a model's layout and records: a push removes those of an earlier push that it does not replace, so
# that a repo never serves an old adapter beside a new full model, or an old model's metrics beside a new card.
REPLACED_ON_PUSH = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, BASE_SOURCE_FILE, BASE_WEIGHTS_FILE, "config.json",
                    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", *CODE_FILES,
                    *RECORD_FILES)


# ------------------------------------------------------------------------------------ model folders
def find_model_folder(output_dir: str | Path) -> tuple[Path, str]:
    """The folder holding the trained model (`output_dir`'s `best/`, the model training selected, or else
    `output_dir` itself) and its layout name.

    Raises a `CardError` saying what was looked for when neither holds an adapter or a full model.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise CardError(f"{output_dir}: no such folder; give the output folder of training "
                        "(or the folder written by save_trained_model)")
    restore_set_aside(output_dir / BEST_DIR_NAME)  # a run killed as it replaced best/ left it set aside
    for folder in (output_dir / BEST_DIR_NAME, output_dir):
        for name, required, any_of in MODEL_FOLDER_LAYOUTS:
            if folder.is_dir() and all((folder / f).is_file() for f in required) and any(
                    (folder / f).is_file() for f in any_of):
                _refuse_torn_checkpoint(folder)
                return folder, name
    expected = "; or ".join(f"{' + '.join(required)} + {' or '.join(any_of)}"
                            for _, required, any_of in MODEL_FOLDER_LAYOUTS)
    found = sorted(p.name for p in output_dir.iterdir())[:20]
    hint = " (pickled .bin weights are not pushed: save with safetensors)" if any(
        n.endswith(".bin") for n in found) else ""
    raise CardError(f"{output_dir}: no trained model to push. Expected {expected} (written by "
                    f"modeling_stage2.save_trained_model), in this folder or in its best/; found {found}{hint}")


def _refuse_torn_checkpoint(folder: Path) -> None:
    """A Trainer checkpoint is whole only when its completion marker says so: one an interrupted save tore may hold
    half-written weights."""
    if not fnmatch.fnmatchcase(folder.name, CHECKPOINT_DIRS) and not (folder / "trainer_state.json").is_file():
        return
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CardError(f"{folder}: {problem}; push the run's {BEST_DIR_NAME}/ or a complete checkpoint instead")


def files_to_upload(folder: Path) -> dict[str, Path]:
    """`path_in_repo -> local file` for what belongs on the Hub: the model folder's own files (see `UPLOAD_PATTERNS`;
    modeling code only with `--include_code`, from `remote_code`) and every `stage2-export` folder inside it whole (its
    graph, the graph's external data, config, `export.json` and card). Other subfolders are not the model: they stay
    home."""
    chosen: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(_matches(part, SKIPPED_DIRS) for part in relative.parts[:-1]):
            continue
        if any(part.startswith(".") for part in relative.parts):  # the partial files and staging / set-aside
            continue  # folders of an interrupted write (modeling_stage2._files), never part of a model
        if len(relative.parts) > 1:  # an export goes whole (a graph's config and contract without it is half of it)
            if (path.parent / EXPORT_INFO_FILE).is_file() and path.name in EXPORT_FILES:
                chosen[relative.as_posix()] = path
            continue
        if _matches(path.name, NEVER_UPLOAD) or not _matches(path.name, UPLOAD_PATTERNS):
            continue
        chosen[relative.as_posix()] = path
    return chosen


def refuse_what_loaders_refuse(folder: Path, files: dict[str, Path]) -> None:
    """The checks the loaders (`load_trained_model`, so `stage2-refine`, `stage2-export`, `stage2-evaluate`) make
    before loading, made on `folder` before anything reaches the Hub: a Stage 2 refiner config, weights whose
    safetensors headers read and fit the file and the config (headers only: a 600M refiner costs no load), an
    adapter's `stage2_base.json` and the base weights it says are there; and the graph of each export uploaded with
    it (`files`). Raises `CardError` naming the file and its problem."""
    try:
        if check_model_folder(folder) == "adapter":
            read_base_source(folder)
    except (OSError, ValueError) as error:  # FileNotFoundError (missing) or ValueError (damaged, foreign), named
        raise CardError(str(error)) from None
    for export in sorted({path.parent for path in files.values() if path.name == EXPORT_INFO_FILE} - {folder}):
        try:
            resolve_export(export, None)
        except (OSError, ValueError) as error:
            raise CardError(f"{error}; the export in {export.relative_to(folder)}/ would be pushed without its graph: "
                            f"export again with stage2-export, or move that folder out of {folder}") from None


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def remote_code(config_path: Path) -> tuple[dict[str, bytes], bytes]:
    """What `trust_remote_code` needs for the model of `config_path`, as transformers itself writes it: the modeling
    and configuration modules with everything they import relatively (`custom_object_save`, what `save_pretrained`
    does for a class registered with `register_for_auto_class`) and `config.json` with the matching `auto_map`.
    Returns (`file name -> module source`, the new `config.json` bytes)."""
    import tempfile

    import torch
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import custom_object_save
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    import modeling_stage2  # noqa: F401  (registers both model types with the Auto classes)

    config = read_json(config_path, "model config")
    if config is None:
        raise CardError(f"{config_path}: missing; the folder needs the model config to include its code")
    try:
        config_class = type(AutoConfig.for_model(config.get("model_type")))
        model_class = MODEL_MAPPING[config_class]
    except (KeyError, ValueError):
        config_class = model_class = None
    if model_class is None or not model_class.__module__.startswith(f"{modeling_stage2.__name__}."):
        raise CardError(f"{config_path}: model_type {config.get('model_type')!r} has no modeling code in "
                        "modeling_stage2 to include")
    try:
        instance_config = config_class.from_dict({k: v for k, v in config.items() if k != "auto_map"})
    except (ValueError, TypeError, KeyError) as error:  # a value the config class refuses: nobody could load it
        raise CardError(f"{config_path}: {_one_line(error)}") from None
    with torch.device("meta"):  # an instance only to name its class and module: no weights are allocated
        model = model_class(instance_config)
    with tempfile.TemporaryDirectory(prefix="stage2-push-code-") as folder:
        for obj, auto_class in ((instance_config, "AutoConfig"), (model, "AutoModel")):
            obj._auto_class = auto_class  # on the instance: the class's registration (or absence) is left alone
            custom_object_save(obj, folder, config=config)
        files = {path.name: path.read_bytes() for path in sorted(Path(folder).glob("*.py"))}
    return files, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def config_without_package_code(config_path: Path) -> bytes | None:
    """`config.json` without the `auto_map` entries that name the package's modules (`save_pretrained` writes them
    for the classes registered with `register_for_auto_class`), for a push without `--include_code`: the repo then
    holds none of those modules (an earlier push's are deleted), and an `auto_map` naming them makes transformers
    ask for `trust_remote_code` and then fail on the missing file, where the package is what loads the model.
    None when there is nothing to remove (the file is uploaded as it is)."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # the card names what is wrong with it
        return None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict):
        return None
    modules = {Path(name).stem for name in CODE_FILES}
    kept = {key: reference for key, reference in auto_map.items()
            if not (isinstance(reference, str) and "--" not in reference and reference.split(".")[0] in modules)}
    if kept == auto_map:
        return None
    if kept:
        config["auto_map"] = kept
    else:
        del config["auto_map"]
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


# ------------------------------------------------------------------------------------ pushing
def _make_private(api, repo_id: str, repo_type: str = "model") -> None:
    """`create_repo(private=True, exist_ok=True)` keeps an existing public repo public: switch it before uploading."""
    if api.repo_info(repo_id, repo_type=repo_type).private:
        return
    api.update_repo_settings(repo_id, private=True, repo_type=repo_type)
    logger.warning(f"{repo_id} existed and was public; made it private as asked (--private) before uploading.")


def push_trained_model(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    include_code: bool = False,
    datasets: list[str] | str | None = None,
    revision: str | None = None,
) -> str:
    """Upload a trained model folder to the Hub repo `repo_id` (created if needed) in one commit.

    Uploads the adapter / weights and trainable modules (safetensors), configs, `metrics.json`, the preview
    and the model card (`README.md`), generated with `model_cards.cards.card_for_folder` for this repo unless the
    folder holds a hand-written one (a card that is neither peft's unfilled template nor a generated one).
    `include_code=True` adds the modeling code and an `auto_map` in `config.json` (without it, `config.json` goes
    without the `auto_map` naming the package's modules: `config_without_package_code`). The same commit deletes the
    files of an earlier push's model and records that this one does not replace (`REPLACED_ON_PUSH`: the other
    layout's weights and configs, code, metrics, preview); other files stay. A `revision` branch is created from
    the main branch when missing. `private=True` on an existing public repo makes it
    private before anything is uploaded (and logs it); `private=False` leaves an existing repo's visibility alone.
    Returns the commit URL.

    Raises `CardError` (a `ValueError`) when the folder holds no adapter or full model, when its card or code cannot
    be made (e.g. a malformed `metrics.json`), or when it is an adapter whose base only this machine has: before
    anything reaches the Hub.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder, layout = find_model_folder(output_dir)
    contents = model_repo_contents(folder, repo_id, include_code=include_code, datasets=datasets)
    api = HfApi(endpoint=endpoint, token=token)
    # None, not False: without --private a new repo gets its namespace's default visibility (an organisation's may
    # be private), as `create_repo` and the Trainer's push give it
    repo_url = api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
    if repo_url.repo_id != repo_id:  # NAME became OWNER/NAME: the card names the repo
        repo_id = repo_url.repo_id
        contents = model_repo_contents(folder, repo_id, include_code=include_code, datasets=datasets)
    if private:
        _make_private(api, repo_id)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=content)
                  for path_in_repo, content in contents.items()]
    exports = {path.rpartition("/")[0] for path in contents if path.endswith(f"/{EXPORT_INFO_FILE}")}
    operations += [CommitOperationDelete(path_in_repo=path)
                   for path in api.list_repo_files(repo_id, repo_type="model", revision=revision)
                   if path not in contents and (path.rpartition("/")[0] in exports  # an earlier export's graph
                                                or "/" not in path and _matches(path, REPLACED_ON_PUSH))]
    commit = api.create_commit(
        repo_id, operations, repo_type="model", revision=revision,
        commit_message=commit_message or f"Upload Stage 2 refiner ({layout}) from {folder.name}",
    )
    return commit.commit_url


def model_repo_contents(folder: Path, repo_id: str, *, include_code: bool = False,
                        datasets: list[str] | str | None = None) -> dict[str, str | bytes]:
    """`path_in_repo -> local file path or bytes`: what one push of the model folder `folder` commits, with its
    model card made for `repo_id` (unless the folder holds a hand-written one) and, with `include_code`, the
    modeling code and the `config.json` naming it. Raises `CardError` when either cannot be made."""
    files = files_to_upload(folder)
    contents: dict[str, str | bytes] = {path_in_repo: str(path) for path_in_repo, path in files.items()}
    if (folder / ADAPTER_CONFIG_FILE).is_file():
        if include_code:
            raise CardError(f"{folder}: --include_code needs a full model; an adapter's base is rebuilt by this "
                            "package (load_trained_model). Merge it (export_merged_model) and push that folder.")
        _refuse_local_base(folder)
    if include_code:
        code, contents["config.json"] = remote_code(folder / "config.json")
        contents.update(code)
    elif "config.json" in files:
        contents["config.json"] = config_without_package_code(files["config.json"]) or contents["config.json"]
    readme = files.get("README.md")
    if readme is None or should_regenerate_card(readme.read_text(encoding="utf-8", errors="replace")):
        # no card, peft's unfilled template or an earlier generated card: generate it for this repo
        card = card_for_folder(folder, repo_id=repo_id, has_code=include_code, datasets=datasets)
        contents["README.md"] = str(card).encode()
    refuse_what_loaders_refuse(folder, files)
    return contents


def _refuse_local_base(folder: Path) -> None:
    """An adapter whose base (a refiner folder, or backbone weights) is a path on this machine cannot be loaded by
    anyone who pulls it: say so before pushing."""
    try:
        source = read_base_description(folder / BASE_SOURCE_FILE) if (folder / BASE_SOURCE_FILE).is_file() else {}
    except (OSError, ValueError) as error:
        raise CardError(str(error)) from None  # names the file and its problem
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise CardError(f"{folder / 'config.json'}: unreadable ({error})") from None
    kind = source.get("kind")
    if kind == "model":
        file, key, base = BASE_SOURCE_FILE, "model_name_or_path", source.get("model_name_or_path")
    elif kind == "backbone_weights":
        file, key, base = "config.json", "backbone_weights", config.get("backbone_weights")
    else:  # "saved": the base travels in the folder (base_model.safetensors)
        return
    if isinstance(base, str) and not _names_a_hub_source(kind, base):
        raise CardError(f"{folder / file}: {key} {base} is a path on this machine, which nobody who pulls the adapter "
                        "has; push that base to the Hub and build on its repo id, or merge the adapter "
                        "(export_merged_model) and push the merged folder.")


def _names_a_hub_source(kind: str, base: str) -> bool:
    """Whether a base refiner (`kind` "model") or backbone weights name something on the Hub, by the rules that load
    them (local sources are stored absolute by `local_source_or_name`; `backbone_weights_location`)."""
    if kind == "model":
        return is_hub_repo_id(base) and not Path(base).is_absolute()
    try:
        where, location = backbone_weights_location(base)
    except FileNotFoundError:  # neither a Hub name nor anything here
        return False
    except ValueError:  # a Hub repo whose checkpoint file it cannot infer: the loader's message, not a local path
        return True
    return where == "hub" or str(location).startswith(HUB_PREFIX)


def push_dataset(
    dataset_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    license: str = "cdla-permissive-1.0",
    max_shard_size: str | int | None = None,
) -> str:
    """Push an Arrow dataset saved by `data_builders.build_dataset` (a `DatasetDict` folder) to the dataset
    repo `repo_id` with `DatasetDict.push_to_hub` (Parquet shards + the `configs`/`dataset_info` metadata),
    then replace its README with a dataset card that keeps that metadata. Returns the card's commit URL."""
    return _push_dataset(dataset_dir, repo_id, private=private, token=token, endpoint=endpoint,
                         commit_message=commit_message, license=license, max_shard_size=max_shard_size)[1]


def _check_saved_dataset(folder: Path) -> None:
    if not ((folder / ARROW_MARKER).is_file() or (folder / DATASET_STATE).is_file()):
        raise CardError(f"{folder}: not a dataset saved with save_to_disk (no {ARROW_MARKER} or "
                        f"{DATASET_STATE}); {_dataset_hint(folder)}")
    problem = saved_dataset_problem(folder)  # a file cut at a record batch's end loads, rows missing: not pushed
    if problem:
        raise CardError(problem)


def _dataset_hint(folder: Path) -> str:
    """Where the dataset probably is: a training run keeps its Arrow cache two levels down (`_dataset/<key>`)."""
    for parent in (folder, folder.parent):
        found = sorted(p.parent for p in parent.glob(f"*/*/{ARROW_MARKER}")) if parent.is_dir() else []
        found = found or (sorted(p.parent for p in parent.glob(f"*/{ARROW_MARKER}")) if parent.is_dir() else [])
        if found:
            return f"pass {found[0]} (the Arrow dataset found there)"
    return "build one with stage2-build-dataset, or pass a run's OUTPUT_DIR/_dataset/<key>"


def _push_dataset(dataset_dir, repo_id, *, private, token, endpoint, commit_message, license,
                  max_shard_size) -> tuple[str, str]:
    """`push_dataset`, returning (the full dataset repo id, the card's commit URL)."""
    import datasets
    from huggingface_hub import DatasetCard, HfApi

    dataset_dir = Path(dataset_dir)
    _check_saved_dataset(dataset_dir)
    dataset = datasets.load_from_disk(str(dataset_dir))
    if isinstance(dataset, datasets.Dataset):
        dataset = datasets.DatasetDict({"train": dataset})
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    api = HfApi(endpoint=endpoint, token=token)
    if private:  # push_to_hub(private=True) keeps an existing public repo public
        repo_id = api.create_repo(repo_id, private=True, exist_ok=True, repo_type="dataset").repo_id
        _make_private(api, repo_id, repo_type="dataset")
    with _datasets_endpoint(endpoint):
        commit = dataset.push_to_hub(repo_id, private=private or None, token=token,  # None: as the model's
                                     commit_message=commit_message or "Upload Stage 2 dataset", **kwargs)
    repo_id = commit.repo_url.repo_id if getattr(commit, "repo_url", None) else repo_id
    readme = api.hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=commit.oid)
    pushed = DatasetCard.load(readme).data.to_dict()
    keep = {key: pushed[key] for key in ("configs", "dataset_info") if key in pushed}
    card = build_dataset_card(dataset, repo_id=repo_id, license=license, extra_metadata=keep)
    card_commit = api.upload_file(path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=repo_id,
                                  repo_type="dataset", commit_message="Add dataset card")
    return repo_id, card_commit.commit_url


@contextlib.contextmanager
def _datasets_endpoint(endpoint: str | None) -> Iterator[None]:
    """`datasets` reads its Hub endpoint from `datasets.config` (set at import): point it at `endpoint`."""
    if endpoint is None:
        yield
        return
    from datasets import config

    saved = config.HF_ENDPOINT, config.HUB_DATASETS_URL
    config.HF_ENDPOINT = endpoint.rstrip("/")
    config.HUB_DATASETS_URL = config.HF_ENDPOINT + "/datasets/{repo_id}/resolve/{revision}/{path}"
    try:
        yield
    finally:
        config.HF_ENDPOINT, config.HUB_DATASETS_URL = saved


# ------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="stage2-push",
        description="Push a trained Stage 2 refiner (adapter or full model, configs, model card, preview) to the "
                    "Hugging Face Hub, and optionally its Arrow dataset.",
    )
    parser.add_argument("output_dir", help="folder written by training / save_trained_model (or holding best/)")
    parser.add_argument("repo_id", help="Hub model repo, OWNER/NAME (or NAME for your own namespace)")
    parser.add_argument("--private", action="store_true", help="create the repo(s) private")
    parser.add_argument("--include_code", action="store_true",
                        help="also push the modeling code so AutoModel.from_pretrained(repo, trust_remote_code=True) "
                             "works without this package")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--revision", default=None, metavar="BRANCH",
                        help="push the model to this branch (made from main when missing; default: main); "
                             "--dataset still goes to its repo's main branch")
    parser.add_argument("--commit_message", default=None,
                        help="message of the Hub commit (default: one naming what is pushed)")
    parser.add_argument("--dataset", default=None, metavar="DIR",
                        help="also push this Arrow dataset (built by stage2-build-dataset) with a dataset card")
    parser.add_argument("--dataset_repo_id", default=None,
                        help="dataset repo for --dataset (default: the same name as the model repo)")
    return parser


def _check_before_pushing(args: argparse.Namespace) -> None:
    """The repo ids, the model folder and the dataset folder, checked before anything reaches the Hub: a bad
    model folder must not be found only after the dataset was pushed."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    for name, repo_id in (("repo_id", args.repo_id), ("--dataset_repo_id", args.dataset_repo_id)):
        try:
            if repo_id is not None:
                validate_repo_id(repo_id)
        except HFValidationError:
            raise CardError(f"{name} {repo_id!r} is not a Hub repo id: use OWNER/NAME or NAME (letters, digits, "
                            "'-', '_', '.'; at most 96 characters)") from None
    folder, _ = find_model_folder(args.output_dir)
    if args.dataset is not None:
        _check_saved_dataset(Path(args.dataset))
    # the card (from metrics.json) and the code as they will be pushed: a dataset pushed first must not be left
    # beside a model that cannot be
    datasets = [args.dataset_repo_id or args.repo_id] if args.dataset is not None else None
    model_repo_contents(folder, args.repo_id, include_code=args.include_code, datasets=datasets)
    if _no_token(args.token):  # the Hub's 401 would come only after the dataset, or as a server's refusal
        raise CardError("no Hub token to push with: pass --token, set HF_TOKEN, or log in (hf auth login)")


def _no_token(token: str | None) -> bool:
    from huggingface_hub import get_token

    try:
        return not (token or get_token())
    except Exception:  # a token exchange that fails (HF_OIDC_RESOURCE): the push names the Hub's own error
        return False


def _one_line(err: BaseException) -> str:
    """`err` on one line: the Hub's errors put the server's reason (bad token, refused file) on lines of their own."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


@exit_on_termination
def main(argv: list[str] | None = None) -> int:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    args = build_parser().parse_args(argv)
    try:
        _check_before_pushing(args)
        datasets = None
        if args.dataset is not None:
            dataset_repo, url = _push_dataset(
                args.dataset, args.dataset_repo_id or args.repo_id, private=args.private, token=args.token,
                endpoint=args.endpoint, commit_message=None, license="cdla-permissive-1.0", max_shard_size=None)
            print(f"dataset pushed: {url}")
            datasets = [dataset_repo]
        url = push_trained_model(args.output_dir, args.repo_id, private=args.private, token=args.token,
                                 endpoint=args.endpoint, commit_message=args.commit_message,
                                 include_code=args.include_code, datasets=datasets, revision=args.revision)
    except (CardError, FileNotFoundError) as err:  # the folder or the dataset is not what was asked for
        print(f"stage2-push: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except HfHubHTTPError as err:  # the Hub refused or failed (auth, server): nothing or not everything landed
        print(f"stage2-push: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except HTTPError as err:  # no answer at all (connection refused, DNS, timeout)
        endpoint = args.endpoint or constants.ENDPOINT
        print(f"stage2-push: error: the Hub at {endpoint} could not be reached ({_one_line(err)})", file=sys.stderr)
        return 1
    except OSError as err:  # the system failed (a file unreadable mid-push)
        print(f"stage2-push: error: {_one_line(err)}", file=sys.stderr)
        return 1
    print(f"model pushed: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
