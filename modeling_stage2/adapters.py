"""Building, saving and loading the trainable refiner: a (quantized) frozen base, LoRA on the backbone, and the
fusion, metadata embedding and head fully trained.

    model = build_trainable_model(config, quantization="8bit")   # peft.PeftModel, summary printed
    ...train...
    save_trained_model(model, "runs/x/best")                     # adapter + trainable modules + config
    model = load_trained_model("runs/x/best", quantization="8bit")
    export_merged_model(load_trained_model("runs/x/best"), "runs/x/merged")   # one plain refiner folder

The base is loaded through `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`: 8-bit (LLM.int8) or
4-bit NF4 for the backbone's block linears (`qkv`, `proj`, `fc1`, `fc2`), everything else in full precision
(`llm_int8_skip_modules`), because bitsandbytes' int8 matmul takes 2-D/3-D inputs only and the head is 4-D.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from ._files import remove_tree, staged_folder
from .hub import download_model_folder, hub_snapshot_paths_named, is_hub_repo_id, local_revision_problem
from .configuration_stage2 import BLOCK_LINEAR_PATTERNS, LORA_TARGETS, Stage2RefinerConfig, local_source_or_name
from .modeling_stage2 import Stage2RefinerModel, backbone_weights_commit
from .vocabulary import QUANTIZATIONS

logger = logging.getLogger(__name__)


# Trained in full and saved with the adapter (peft `modules_to_save`) when the refiner has them (the spectral
# correction only with `spectral_correction="affine"`, the spectral MLP only with `spectral_mlp_hidden_size > 0`);
# matched by name suffix, so these names must not end any other module's name.
TRAINABLE_MODULES = ("metadata_embedding", "fusion", "head", "spectral_correction", "spectral_mlp")
# Fitted before training (not by the optimiser) and saved with the adapter too (`modules_to_save`): the statistics
# of the training spectra, with `out_of_range_fallback`.
FITTED_MODULES = ("spectral_range",)

BASE_SOURCE_FILE = "stage2_base.json"
BASE_WEIGHTS_FILE = "base_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # what peft's save_pretrained writes (safe_serialization)
METRICS_FILE = "metrics.json"
TRAINING_CONFIG_FILE = "training_config.json"
PREVIEW_FILE = "preview.png"
RECORD_FILES = (METRICS_FILE, TRAINING_CONFIG_FILE, PREVIEW_FILE)
"""What training records beside a model (evaluation metrics, settings, preview): they travel with its exports."""
LORA_MERGED_KEY = "lora_merged"
"""The `config.json` key `export_merged_model` sets (true): the config's LoRA settings (`lora_r`, ...) are those of an
adapter merged into the weights. Every config holds LoRA settings, the defaults an adapter would be built with, so
a refiner saved without one (`save_pretrained`) is told apart from a merged one only by this record."""


# ------------------------------------------------------------------------------------------ quantization config


def quantization_config_for(quantization: str, config: Stage2RefinerConfig):
    """The `BitsAndBytesConfig` of `quantization` ("8bit", "4bit" NF4, or "none" -> None), quantizing only the
    backbone's block linears."""
    _check_quantization(quantization)
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = modules_kept_in_full_precision(config)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip,
    )


def modules_kept_in_full_precision(config: Stage2RefinerConfig) -> list[str]:
    """Every top-level module but the backbone, and any backbone linear outside the blocks' qkv/proj/fc1/fc2."""
    with torch.device("meta"):
        model = Stage2RefinerModel(config)
    block_linear = _block_linear_regex(range(config.backbone_config.depth), LORA_TARGETS)
    skip = [name for name, _ in model.named_children() if name != "backbone"]
    skip += [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("backbone.") and not block_linear.fullmatch(name)
    ]
    return skip


def lora_target_pattern(config: Stage2RefinerConfig) -> str:
    """Regex (peft full-match) of the backbone linears `config` adapts (`lora_target_modules` of `lora_blocks`);
    never the patch embedding."""
    return _block_linear_regex(config.lora_blocks, config.lora_target_modules).pattern


def _block_linear_regex(blocks, targets):
    import re

    block_ids = "|".join(str(block) for block in blocks)
    names = "|".join(BLOCK_LINEAR_PATTERNS[target] for target in targets)
    return re.compile(rf"(?:.*\.)?backbone\.blocks\.(?:{block_ids})\.(?:{names})")


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")


# ------------------------------------------------------------------------------------------------- base models


class _BaseSource:
    """Where the frozen base comes from, so a saved adapter can be put back onto an identical fresh base.

    kind: "model" (a full refiner folder or Hub repo), "backbone_weights" (a fresh refiner whose backbone loads
    `config.backbone_weights`), or "saved" (a random-init backbone, whose full-precision weights are kept in
    `backbone_file` and written next to the adapter). `trained_quantization`: the base's quantization while the
    adapter was trained, kept whatever quantization it is loaded with later. `revision`: the commit of the Hub base
    refiner ("model") or of the backbone's Hub checkpoint ("backbone_weights") the adapter was trained on, so that a
    later commit to that repo cannot change the adapter's outputs.
    """

    def __init__(self, kind: str, model_name_or_path: str | None = None, backbone_file: Path | None = None,
                 trained_quantization: str | None = None, revision: str | None = None):
        self.kind = kind
        self.model_name_or_path = model_name_or_path
        self.backbone_file = backbone_file
        self.trained_quantization = trained_quantization
        self.revision = revision

    def to_json(self) -> dict:
        record = {"kind": self.kind, "model_name_or_path": self.model_name_or_path,
                  "trained_quantization": self.trained_quantization}
        return record | ({"revision": self.revision} if self.revision else {})


def _fresh_refiner(config: Stage2RefinerConfig, backbone_file: Path | None = None,
                   revision: str | None = None) -> Stage2RefinerModel:
    """A full-precision refiner with its backbone from `config.backbone_weights` (at `revision` when it is on the
    Hub) or `backbone_file`."""
    model = Stage2RefinerModel(config)
    if backbone_file is not None:
        from safetensors.torch import load_file

        model.backbone.load_state_dict(load_file(str(backbone_file)), strict=True)
    elif config.backbone_weights is not None:
        model.load_backbone_weights(revision=revision)
    return model


def _base_model(build, quantization: str, device_map) -> Stage2RefinerModel:
    """The refiner `build()` returns, kept in full precision or reloaded through `from_pretrained` with the
    bitsandbytes config of `quantization`. The full-precision copy is released before the quantized one loads."""
    model = build()
    if quantization == "none":
        return model
    folder = tempfile.mkdtemp(prefix="stage2-base-")
    try:
        model.save_pretrained(folder)
        config = model.config
        del model
        _release_freed_memory()
        quantized = _from_pretrained(folder, quantization, device_map, config=config)
    finally:  # not TemporaryDirectory: a signal while it deletes the 2.5 GB copy would leave the rest behind
        remove_tree(folder)
    _own_unquantized_tensors(quantized)
    _release_freed_memory()
    return quantized


def _own_unquantized_tensors(model: nn.Module) -> None:
    """Copy the tensors `from_pretrained` left memory-mapped from the (deleted) temporary file.

    The full-precision parts of a quantized model (position table, norms, head...) are views of the safetensors
    file; while one lives, the whole 2.5 GB mapping of the 600M checkpoint stays resident (and its disk space
    allocated). Copying these ~20 MB releases it: the 8-bit 600M refiner then needs ~1 GB of RSS instead of ~3.5.
    """
    import bitsandbytes as bnb

    quantized = (bnb.nn.Int8Params, bnb.nn.Params4bit)
    with torch.no_grad():
        for module in model.modules():
            for parameter in module.parameters(recurse=False):
                if not isinstance(parameter, quantized) and parameter.device.type == "cpu":
                    parameter.data = parameter.data.clone()
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.device.type == "cpu":
                    module._buffers[name] = buffer.clone()


def _release_freed_memory() -> None:
    """Collect garbage and, on glibc, hand freed heap pages back to the OS (the fp32 copy is gigabytes)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _from_pretrained(model_name_or_path, quantization: str, device_map, config=None,
                     revision: str | None = None) -> Stage2RefinerModel:
    if config is None:
        config = Stage2RefinerConfig.from_pretrained(model_name_or_path, revision=revision)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            f"{model_name_or_path} holds an already quantized refiner; LoRA bases are quantized at load time, so save "
            "and pass a full-precision refiner (e.g. one written by export_merged_model)."
        )
    kwargs = {}
    quantization_config = quantization_config_for(quantization, config)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    if revision is not None:
        kwargs["revision"] = revision
    model = Stage2RefinerModel.from_pretrained(model_name_or_path, config=config, **kwargs)
    if quantization == "4bit":
        disable_cpu_4bit_repacking(model)
    return model


def _hub_commit(model_name_or_path, revision: str | None = None) -> str | None:
    """The commit a Hub repo's `revision` (default its main branch) resolves to now (its snapshot folder is named by
    it; offline, the cached one); None for a local folder."""
    if Path(model_name_or_path).expanduser().is_dir() or not is_hub_repo_id(str(model_name_or_path)):
        return None
    return download_model_folder(str(model_name_or_path), revision=revision).name


def _device_map(device) -> dict | None:
    return None if device is None else {"": str(torch.device(device))}


# ---------------------------------------------------------------------------------------------- public API


def build_trainable_model(
    config: Stage2RefinerConfig | None = None,
    *,
    model_name_or_path: str | Path | None = None,
    quantization: str = "8bit",
    lora_r: int | None = None,
    lora_alpha: int | None = None,
    lora_dropout: float | None = None,
    target_modules=None,
    unfreeze_last_n_blocks: int | None = None,
    gradient_checkpointing: bool = False,
    print_summary: bool = True,
    revision: str | None = None,
):
    """The refiner ready for LoRA training, as a `peft.PeftModel`.

    The base comes from `model_name_or_path` (a saved full refiner: folder or Hub repo) or is built from `config`
    (default `Stage2RefinerConfig()`, the 600M backbone) with its backbone loaded from `config.backbone_weights`
    (random when None). Quantized bases go through `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`:
    "8bit" (LLM.int8) or "4bit" (NF4, double quantization, fp32 compute) on the backbone's block linears only;
    "none" keeps everything in full precision. The base is frozen; LoRA adapters go on the backbone's `qkv`, `proj`,
    `fc1`, `fc2` (never `patch_embed.proj`), on every block or only the last `unfreeze_last_n_blocks`; the
    metadata embedding, fusion, head and spectral correction (when the config has one) are trained in full and
    saved with the adapter (`modules_to_save`).

    LoRA arguments left as None take the config's defaults (`lora_r` 8, `lora_alpha` 16, `lora_dropout` 0.1,
    `lora_target_modules`, `unfreeze_last_n_blocks`). With `gradient_checkpointing`, the backbone blocks recompute
    their activations in the backward pass (`use_reentrant=False`, needed with a frozen input and LoRA).
    `revision` (branch, tag or commit; default the main branch) applies to a Hub base: the `model_name_or_path` repo,
    or the Hub checkpoint of `config.backbone_weights`. The commit it resolves to is kept with the adapter
    (`save_trained_model`), so that the adapter is always put back onto the base it was trained on.
    On a machine with a GPU, bitsandbytes places quantized bases on it; full-precision ones stay on the CPU until
    moved. Prints the trainable-parameter summary unless `print_summary=False`.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    _check_quantization(quantization)
    if model_name_or_path is not None:
        if config is not None:
            raise ValueError("Pass either `config` (a fresh refiner) or `model_name_or_path` (a saved one), not both.")
        revision = _commit_of_hub_base(revision, _hub_commit(model_name_or_path, revision), model_name_or_path)
        config = Stage2RefinerConfig.from_pretrained(model_name_or_path, revision=revision)
    else:
        config = copy.deepcopy(config) if config is not None else Stage2RefinerConfig()
    config.record_lora(lora_r, lora_alpha, lora_dropout, target_modules, unfreeze_last_n_blocks)  # before any load
    if model_name_or_path is not None:
        base = _from_pretrained(model_name_or_path, quantization, None, config=config, revision=revision)
        source = _BaseSource("model", model_name_or_path=local_source_or_name(model_name_or_path), revision=revision)
    else:
        base, source = _build_fresh_base(config, quantization, revision)

    config = base.config
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_pattern(config),
        modules_to_save=[name for name in TRAINABLE_MODULES + FITTED_MODULES if getattr(base, name, None) is not None],
        bias="none",
    )
    checkpointing_kwargs = {"use_reentrant": False}
    if quantization == "none":
        base.requires_grad_(False)
        if gradient_checkpointing:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
    else:
        with _peft_wrapping():
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing,
                                                   gradient_checkpointing_kwargs=checkpointing_kwargs)
    base.name_or_path = source.model_name_or_path or config.backbone_weights or ""
    with _peft_wrapping():
        model = get_peft_model(base, lora_config)
    source.trained_quantization = quantization
    model.stage2_base_source = source
    model.stage2_quantization = quantization
    if print_summary:
        print(format_trainable_summary(model))
    return model


@contextlib.contextmanager
def _peft_wrapping():
    """peft wrapping a model reads transformers' deprecated `is_gradient_checkpointing`, and its
    `prepare_model_for_kbit_training` calls the deprecated `gradient_checkpointing_enable` (peft 0.21, transformers
    5.x): FutureWarnings for peft's maintainers that every `stage2-refine` and `stage2-train` printed to users, who can
    do nothing about them. Silenced here, and only these two."""
    with warnings.catch_warnings():
        for deprecated in ("is_gradient_checkpointing", "gradient_checkpointing_enable"):
            warnings.filterwarnings("ignore", message=f"`{deprecated}` is deprecated", category=FutureWarning)
        yield


def _commit_of_hub_base(revision: str | None, commit: str | None, base) -> str | None:
    """`commit`, the one a Hub base resolved to; a `revision` asked for a base that is not on the Hub is refused."""
    if revision is not None and commit is None:
        raise ValueError(f"revision={revision!r} applies to a base on the Hub; the base {base} is not: leave "
                         "revision out.")
    return commit


def _build_fresh_base(config: Stage2RefinerConfig, quantization: str, revision: str | None):
    if config.backbone_weights is None:
        _commit_of_hub_base(revision, None, "(a randomly initialised backbone, config.backbone_weights None)")
    else:
        commit = backbone_weights_commit(config.backbone_weights, revision)
        source = _BaseSource("backbone_weights", revision=_commit_of_hub_base(revision, commit,
                                                                             config.backbone_weights))
        return _base_model(lambda: _fresh_refiner(config, revision=source.revision), quantization, None), source
    logger.warning(
        "config.backbone_weights is None: the backbone is randomly initialised (fine for tests and demos). For "
        "real training set backbone_weights to the Prithvi checkpoint, e.g. 'ibm-nasa-geospatial/Prithvi-EO-2.0-600M'."
    )
    # Random backbone: keep its full-precision weights, the only way to rebuild this exact base later.
    folder = Path(tempfile.mkdtemp(prefix="stage2-random-backbone-"))
    source = _BaseSource("saved", backbone_file=folder / BASE_WEIGHTS_FILE)
    weakref.finalize(source, shutil.rmtree, folder, True)

    def build() -> Stage2RefinerModel:
        from safetensors.torch import save_file

        model = _fresh_refiner(config)
        state = {key: value.contiguous() for key, value in model.backbone.state_dict().items()}
        save_file(state, str(source.backbone_file))
        return model

    return _base_model(build, quantization, None), source


def disable_cpu_4bit_repacking(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for the CPU at the first eval-mode forward.

    On CPUs with AVX512-BF16, `Linear4bit` converts its weight to an inference-only layout the first time it runs
    in eval mode without gradients (e.g. an evaluation pass): its forward then fails in training (in-place bias
    add on a tensor autograd tracks), and it computes in bf16, so results differ from the training-time layout.
    Every model built here keeps the ordinary layout: training survives evaluation, and a reloaded adapter gives
    the trained model's outputs exactly.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def trainable_parameter_summary(model) -> dict[str, int]:
    """Trainable parameters by group ("lora", each of `TRAINABLE_MODULES`, "other"), plus "trainable"
    and "total" (4-bit weights counted as the parameters they hold)."""
    groups = dict.fromkeys(("lora", *TRAINABLE_MODULES, "other"), 0)
    total = 0
    for name, parameter in model.named_parameters():
        count = parameter.numel() * (2 if parameter.__class__.__name__ == "Params4bit" else 1)
        total += count
        if not parameter.requires_grad:
            continue
        if "lora_" in name:
            groups["lora"] += count
        else:
            group = next((module for module in TRAINABLE_MODULES if f".{module}." in f".{name}"), "other")
            groups[group] += count
    groups["trainable"] = sum(groups[key] for key in ("lora", *TRAINABLE_MODULES, "other"))
    groups["total"] = total
    return groups


def format_trainable_summary(model) -> str:
    summary = trainable_parameter_summary(model)
    quantization = getattr(model, "stage2_quantization", "?")
    precision = "full precision" if quantization == "none" else quantization  # "none" is no quantization
    lines = [
        f"Stage 2 refiner (backbone {precision}): {summary['trainable']:,} trainable of {summary['total']:,} "
        f"parameters ({100.0 * summary['trainable'] / max(summary['total'], 1):.2f}%)"
    ]
    for group in ("lora", *TRAINABLE_MODULES, "other"):
        if summary[group] or group not in ("other", "spectral_correction", "spectral_mlp"):
            lines.append(f"  {group:<20} {summary[group]:>14,}")
    return "\n".join(lines)


def save_trained_model(model, output_dir: str | Path) -> Path:
    """Write a model from `build_trainable_model` to `output_dir`, atomically.

    The folder holds `adapter_model.safetensors` + `adapter_config.json` (LoRA weights and the trained metadata
    embedding, fusion and head), the refiner's `config.json` (without quantization settings), `stage2_base.json`
    (where the frozen base comes from) and, when the backbone has no pretrained source (random init),
    `base_model.safetensors` with its full-precision weights. `load_trained_model` reads it back.
    `adapter_config.json`'s `revision` is the Hub commit `stage2_base.json` records for the base its
    `base_model_name_or_path` names (null for a local or saved base), so that peft's own loaders
    (`AutoPeftModel.from_pretrained`) put the adapter onto a Hub base refiner at the commit it was trained on, not
    onto whatever that repo's main branch holds later (docs/sharing.md, "With peft alone").
    """
    source = _base_source_of(model)
    output_dir = Path(output_dir)
    _refuse_foreign_folder(output_dir)
    _refuse_own_base(source, model.get_base_model().config, output_dir, "save_trained_model")
    for adapter_config in model.peft_config.values():  # before peft writes adapter_config.json
        adapter_config.revision = source.revision
    with staged_folder(output_dir) as staging:
        model.save_pretrained(staging)
        _name_the_hub_base_in_peft_card(staging / PEFT_CARD_FILE, model)
        config = _clean_config(model.get_base_model().config)
        config.save_pretrained(staging)
        (staging / BASE_SOURCE_FILE).write_text(json.dumps(source.to_json(), indent=2) + "\n")
        if source.kind == "saved":
            shutil.copyfile(source.backbone_file, staging / BASE_WEIGHTS_FILE)
    return output_dir


PEFT_CARD_FILE = "README.md"
"""The card peft's `save_pretrained` writes beside an adapter (a template; `stage2-push` replaces it)."""
_PEFT_BASE_TAG = "base_model:adapter:"


def _name_the_hub_base_in_peft_card(card_path: Path, model) -> None:
    """peft's card names the base by the loaded config's `_name_or_path`: for a quantized base, the temporary folder
    it was loaded from (deleted since), else "" or a local path, none of which the Hub takes as `base_model`. It
    names the Hub repo the adapter's config names (`base_model_name_or_path`), or no base."""
    from huggingface_hub import ModelCard

    if not card_path.is_file():
        return
    base = next(iter(model.peft_config.values())).base_model_name_or_path
    card = ModelCard.load(card_path)
    tags = [tag for tag in card.data.tags or [] if not tag.startswith(_PEFT_BASE_TAG)]
    hub_base = base if base and is_hub_repo_id(base) else None
    card.data.base_model = hub_base
    card.data.tags = tags + ([f"{_PEFT_BASE_TAG}{hub_base}"] if hub_base else [])
    card.save(card_path)


def load_trained_model(path: str | Path, quantization: str = "none", device=None, revision: str | None = None):
    """A trained refiner in eval mode, from a `save_trained_model` folder (a fresh base, quantized as asked, with the
    adapter applied: a `peft.PeftModel`) or from a full refiner folder (`save_pretrained` / `export_merged_model`:
    a `Stage2RefinerModel`). `path` may be a Hub repo id (`revision`: its branch, tag or commit;
    `modeling_stage2.hub.download_model_folder`: the repo's top-level files; an error about them names them
    `OWNER/NAME[@REVISION]/FILE`, not by their path in the Hub cache). `device` defaults to the CPU for full precision
    and to bitsandbytes' choice (the GPU when there is one) for quantized bases."""
    _check_quantization(quantization)
    check_device(device)
    folder = _local_folder(path, revision)
    if folder != Path(path).expanduser():  # downloaded: named as it was given, not by its path in the Hub cache
        with _hub_snapshot_named(str(path), revision):
            return _load_trained_folder(folder, quantization, device)
    return _load_trained_folder(folder, quantization, device)


@contextlib.contextmanager
def _hub_snapshot_named(repo_id: str, revision: str | None):
    """An `OSError` / `ValueError` about a downloaded model's files (missing, damaged, another model's) raised again
    with the Hub cache's snapshot paths written as the model was named (`hub_snapshot_paths_named`: `OWNER/NAME/FILE`,
    `OWNER/NAME@REVISION/FILE`); the Hub's own errors, and any other type, pass as they are."""
    try:
        yield
    except (OSError, ValueError) as error:
        message, renamed = hub_snapshot_paths_named(str(error), repo_id, revision), None
        if message != str(error) and type(error).__module__ == "builtins":  # the Hub's own errors are left alone
            try:
                renamed = type(error)(message)
            except TypeError:  # a constructor that takes more than a message (UnicodeDecodeError): left as it is
                pass
        if renamed is None:
            raise
        raise renamed.with_traceback(error.__traceback__) from error.__cause__


def _load_trained_folder(folder: Path, quantization: str, device):
    device_map = _device_map(device)
    if check_model_folder(folder) == "adapter":
        from peft import PeftModel

        config = Stage2RefinerConfig.from_pretrained(folder)
        source = read_base_source(folder)
        if source.kind == "model":  # a base folder replaced by another refiner: named, not transformers' table
            _check_full_model_files(_local_folder(source.model_name_or_path, source.revision), folder / "config.json",
                                    f"the base refiner is not the one this adapter was trained on ({BASE_SOURCE_FILE} "
                                    "names it); put that one back")
        base = _rebuild_base(config, source, quantization, device_map)
        with _peft_wrapping():
            model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
        model.stage2_base_source = source
        model.stage2_folder = folder  # where its records (RECORD_FILES) are, for export_merged_model
        model.stage2_quantization = quantization
    else:
        model = _from_pretrained(folder, quantization, device_map)
    if quantization == "none" and device is not None:
        model.to(device)
    return model.eval()


def export_merged_model(model, output_dir: str | Path) -> Stage2RefinerModel:
    """Merge the LoRA weights into a full-precision base (`merge_and_unload`) and `save_pretrained` the result, a
    plain `Stage2RefinerModel` loadable with `AutoModel.from_pretrained`. Like `merge_and_unload`, this consumes
    `model`; the merged refiner is returned in eval mode. The records of the folder `model` was loaded from
    (`RECORD_FILES`: metrics, training settings, preview) are copied along, so the export's model card still
    shows its evaluation; `config.json` records the merge (`LORA_MERGED_KEY`). Quantized bases cannot be merged
    exactly: load the
    adapter onto a full-precision base first (`load_trained_model(path, quantization="none")`)."""
    base = model.get_base_model()
    if getattr(base, "is_quantized", False) or getattr(base, "is_loaded_in_8bit", False) or getattr(
        base, "is_loaded_in_4bit", False
    ):
        raise ValueError(
            "export_merged_model needs a full-precision base, this one is quantized; reload the adapter with "
            "load_trained_model(path, quantization='none') and export that."
        )
    output_dir = Path(output_dir)
    _refuse_foreign_folder(output_dir)
    _refuse_own_base(getattr(model, "stage2_base_source", None), base.config, output_dir, "export_merged_model")
    merged = model.merge_and_unload()
    merged.config = _clean_config(merged.config)
    setattr(merged.config, LORA_MERGED_KEY, True)  # its LoRA settings describe weights merged in, not mere defaults
    merged.requires_grad_(False)
    records = getattr(model, "stage2_folder", None)
    with staged_folder(output_dir) as staging:
        merged.save_pretrained(staging)
        for name in RECORD_FILES if records is not None else ():
            if (records / name).is_file():
                shutil.copyfile(records / name, staging / name)
    return merged.eval()


# -------------------------------------------------------------------------------------------------- helpers


def _base_source_of(model) -> _BaseSource:
    source = getattr(model, "stage2_base_source", None)
    if source is not None:
        return source
    base = model.get_base_model()
    if base.config.backbone_weights is not None:
        quantization = ("8bit" if getattr(base, "is_loaded_in_8bit", False)
                        else "4bit" if getattr(base, "is_loaded_in_4bit", False) else "none")
        return _BaseSource("backbone_weights", trained_quantization=quantization)
    raise ValueError(
        "This model was not built by build_trainable_model/load_trained_model and its backbone has no pretrained "
        "source (config.backbone_weights is None), so its frozen base could not be rebuilt; build it with "
        "build_trainable_model."
    )


def trained_base_revision(folder: str | Path) -> str | None:
    """The Hub commit of the frozen base an adapter folder (`save_trained_model`, a training checkpoint) was trained
    on, as `stage2_base.json` records it; None for a local or saved base, or a folder without that record."""
    folder = Path(folder)
    return read_base_source(folder).revision if (folder / BASE_SOURCE_FILE).is_file() else None


def _rebuild_base(config: Stage2RefinerConfig, source: _BaseSource, quantization: str, device_map):
    if source.kind == "model":  # the adapter folder's config: the base's, plus the LoRA the adapter was trained with
        return _from_pretrained(source.model_name_or_path, quantization, device_map, config=config,
                                revision=source.revision)
    backbone_file = source.backbone_file if source.kind == "saved" else None
    return _base_model(lambda: _fresh_refiner(config, backbone_file=backbone_file, revision=source.revision),
                       quantization, device_map)


def read_base_source(folder: Path) -> _BaseSource:
    """Where the adapter folder `folder` (a `save_trained_model` one) gets its base, read from its `stage2_base.json`
    without loading anything: the base refiner (`kind` "model": its folder or Hub repo id), the backbone checkpoint of
    its config (`kind` "backbone_weights"), each at its recorded Hub revision, or the base weights saved beside it
    (`kind` "saved"); with the quantization it was trained with. `FileNotFoundError` for a missing description, saved
    weights or local base refiner, `ValueError` for a damaged description (unreadable, or a key of a wrong value);
    each naming the file."""
    path = folder / BASE_SOURCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this adapter folder was not written by save_trained_model.")
    info = read_base_description(path)
    kind = info["kind"]
    trained_quantization = info.get("trained_quantization")
    if trained_quantization is not None and trained_quantization not in QUANTIZATIONS:
        raise ValueError(f"{path}: key 'trained_quantization' is {trained_quantization!r}; expected one of "
                         f"{QUANTIZATIONS}; re-save the model with save_trained_model.")
    if kind == "saved":
        weights = folder / BASE_WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: {path} says the base backbone weights are stored there.")
        return _BaseSource("saved", backbone_file=weights, trained_quantization=trained_quantization)
    if kind == "model":
        base = info.get("model_name_or_path")
        if not isinstance(base, str) or not base:
            raise ValueError(f"{path}: key 'model_name_or_path' is {base!r}; with kind 'model' it names the base "
                             "refiner (its folder or Hub repo id); re-save the model with save_trained_model.")
        if Path(base).is_absolute() and not Path(base).is_dir():  # local_source_or_name stores local bases absolute
            raise FileNotFoundError(f"{path}: key 'model_name_or_path' names the base folder {base}, which no longer "
                                    "exists; put the base refiner back there, or edit the path to where it is now.")
        if Path(base).is_dir() and not (Path(base) / "config.json").is_file():  # else a bare "No such file" of it
            raise FileNotFoundError(f"{path}: key 'model_name_or_path' names the folder {base}, which holds no "
                                    "refiner (no config.json); put the base refiner there, or edit the path to "
                                    "where it is.")
        return _BaseSource("model", model_name_or_path=base, trained_quantization=trained_quantization,
                           revision=_recorded_revision(path, info))
    return _BaseSource("backbone_weights", trained_quantization=trained_quantization,
                       revision=_recorded_revision(path, info))


BASE_KINDS = ("model", "backbone_weights", "saved")


def read_base_description(path: Path) -> dict:
    """`stage2_base.json` (at `path`) as a JSON object with a `kind` of `BASE_KINDS`; a `ValueError` naming that file
    and what is wrong with it otherwise."""
    fix = "re-save the model with save_trained_model"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable base description (not valid JSON: {error}); {fix}.") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: unreadable base description (a JSON {type(info).__name__}, expected an object "
                         f"with a 'kind'); {fix}.")
    if info.get("kind") not in BASE_KINDS:
        found = "missing" if "kind" not in info else f"{info['kind']!r}"
        raise ValueError(f"{path}: key 'kind' is {found}; expected one of {BASE_KINDS}; {fix}.")
    return info


def _recorded_revision(path: Path, info: dict) -> str | None:
    revision = info.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise ValueError(f"{path}: key 'revision' is {revision!r}; expected the base repo's commit (text).")
    return revision


def _clean_config(config: Stage2RefinerConfig) -> Stage2RefinerConfig:
    """A copy without the quantization settings of the loaded base (quantization is chosen at load time)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    return config


def check_device(device) -> None:
    """A CUDA device asked for where torch has none is a user error, said before anything loads."""
    if device is None:
        return
    try:
        device_type = torch.device(device).type
    except RuntimeError as error:  # a typo such as "gpu": torch's own message lists the device types
        raise ValueError(f"device {str(device)!r} is not a torch device ({error}); e.g. 'cpu', 'cuda', "
                         "'cuda:1'.") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but torch sees no CUDA GPU (a CPU build of torch, or "
                         "no GPU here); pass device='cpu'.")


def _check_json_object(path: Path) -> None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}); the folder is damaged, save or download it "
                         "again.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, expected an object.")


def _check_safetensors(path: Path, needed_by: str = f"a trained adapter folder needs it beside {ADAPTER_CONFIG_FILE} "
                                                  "(written by save_trained_model)") -> None:
    """The file exists and its header parses, its tensors within the file (a truncated or overwritten file fails
    here, named)."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {needed_by}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # SafetensorError (not an OSError/ValueError) for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({error}); save or download it again.") from None


def _check_adapter_files(folder: Path) -> None:
    """Before peft sees the folder: a missing weight file would make peft take the path for a Hub repo id, a missing
    config.json gave the default 600M refiner, and a config of another refiner a table of mismatches from peft
    once the base was built."""
    _check_json_object(folder / ADAPTER_CONFIG_FILE)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'}: missing; a trained adapter folder holds the refiner's "
                                f"config beside {ADAPTER_CONFIG_FILE} (written by save_trained_model; peft's own "
                                "save_pretrained / push_to_hub leave it out): save the adapter with "
                                "modeling_stage2.save_trained_model and push that folder with stage2-push or "
                                "model_cards.push.push_trained_model.")
    _check_json_object(folder / "config.json")
    _check_safetensors(folder / ADAPTER_WEIGHTS_FILE)
    weights = {folder / ADAPTER_WEIGHTS_FILE: ("base_model.model.", "")}  # peft's names of the refiner's tensors
    if (folder / BASE_WEIGHTS_FILE).is_file():
        _check_safetensors(folder / BASE_WEIGHTS_FILE)
        weights[folder / BASE_WEIGHTS_FILE] = ("", "backbone.")  # the whole backbone: loaded strictly
    _check_weights_fit_config(folder, list(weights), renamed=weights, complete=folder / BASE_WEIGHTS_FILE)
    _check_weights_fit_adapter_config(folder)


def _check_weights_fit_adapter_config(folder: Path) -> None:
    """The adapter weights are the ones `adapter_config.json` describes (its `r`, `target_modules`, `modules_to_save`
    applied to the refiner of `config.json`, on the meta device), floating point: peft only warned about a missing
    LoRA tensor, dropped one its targets do not name, raised a bare KeyError for a missing trained module, a table of
    mismatches for another rank, and cast integers to floats: an edited or damaged adapter gave other outputs."""
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    config_file, weights = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    fix = (f"the {ADAPTER_CONFIG_FILE} does not describe these weights; put back the one saved with them, or save or "
           "download the folder again")
    try:
        adapter_config = PeftConfig.from_pretrained(str(folder))
    except Exception as error:  # an unknown peft_type or field, a field of the wrong type
        raise ValueError(f"{config_file}: not a peft adapter config ({type(error).__name__}: "
                         f"{' '.join(str(error).split())}); save or download it again.") from None
    with torch.device("meta"), _peft_wrapping():
        base = Stage2RefinerModel(Stage2RefinerConfig.from_pretrained(folder))
        base.name_or_path = adapter_config.base_model_name_or_path  # else peft warns that it "renamed" it
        model = get_peft_model(base, adapter_config)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)  # no look at the base's Hub config
    expected = {name: list(tensor.shape) for name, tensor in state.items()}
    loaded_as_is = set(model.state_dict())  # peft loads a base tensor it finds as it is (strict=False)
    with safe_open(str(weights), "pt") as saved:
        for name in saved.keys():
            tensor = saved.get_slice(name)
            if tensor.get_dtype() not in _FLOAT_DTYPES:
                raise ValueError(f"{weights}: tensor {name!r} is {tensor.get_dtype()}, not floating point; the file is "
                                 "damaged, save or download it again.")
            if name in expected and list(tensor.get_shape()) != expected[name]:
                raise ValueError(f"{weights}: tensor {name!r} has shape {list(tensor.get_shape())} where {config_file} "
                                 f"describes {expected[name]}: {fix}.")
            if name not in expected and name not in loaded_as_is:
                raise ValueError(f"{weights}: tensor {name!r} is not one {config_file} describes (its target_modules "
                                 f"or modules_to_save), so it would be dropped: {fix}.")
        missing = [name for name in expected if name not in saved.keys()]
    if missing:
        raise ValueError(f"{weights}: no tensor {missing[0]!r}, which {config_file} describes: {fix}.")


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the dtypes an adapter is saved (or cast) in


def _check_full_model_files(folder: Path, config_file: Path | None = None, fix: str | None = None) -> None:
    """A `save_pretrained` refiner folder: its config a JSON object, its weights (one file, or the shards an index
    names) readable safetensors of the shapes its config (or `config_file`, an adapter's of this base) describes; a
    damaged file is named before transformers reads it."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    _check_json_object(folder / "config.json")
    needed_by = f"a full refiner folder holds config.json + {SAFE_WEIGHTS_NAME} (written by save_pretrained)"
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if (folder / SAFE_WEIGHTS_NAME).is_file() or not index.is_file():
        _check_safetensors(folder / SAFE_WEIGHTS_NAME, needed_by)
        _check_weights_fit_config(folder, [folder / SAFE_WEIGHTS_NAME], config_file=config_file, fix=fix)
        return
    _check_json_object(index)
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no 'weight_map' of tensor names to shard files; save or download it again.")
    shards = [folder / shard for shard in sorted(set(map(str, weight_map.values())))]
    for shard in shards:
        _check_safetensors(shard, f"{index.name} names it")
    _check_weights_fit_config(folder, shards, config_file=config_file, fix=fix)


def _check_weights_fit_config(folder: Path, weight_files: list[Path], renamed: dict | None = None,
                              complete: Path | None = None, config_file: Path | None = None,
                              fix: str | None = None) -> None:
    """The saved tensors have the shapes of the refiner `config.json` describes (the safetensors headers against the
    refiner built on the meta device, nothing read or allocated): transformers would print a table of every mismatch
    and raise. Tensors the config does not have are left to transformers (a refiner saved before a part was added).
    `renamed` maps a file to (its names' prefix, the refiner's): a saved tensor `prefix + rest` is the refiner's
    `refiner_prefix + rest`. The file `complete` must hold every tensor of the refiner under its prefix. `config_file`
    (default the folder's config.json) describes the refiner; `fix` says what to do about a mismatch."""
    from safetensors import safe_open

    config_file = config_file or folder / "config.json"
    fix = fix or "put back the config.json saved with them"
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type != Stage2RefinerConfig.model_type:
        raise ValueError(f"{config_file}: key 'model_type' is {model_type!r}, not {Stage2RefinerConfig.model_type!r}: "
                         "not a Stage 2 refiner folder.")
    with torch.device("meta"):
        expected = {name: list(tensor.shape) for name, tensor in
                    Stage2RefinerModel(Stage2RefinerConfig.from_pretrained(config_file)).state_dict().items()}
    for weights in weight_files:
        saved_prefix, prefix = (renamed or {}).get(weights, ("", ""))
        with safe_open(str(weights), "pt") as saved:
            names = {}
            for name in saved.keys():
                shape = list(saved.get_slice(name).get_shape())
                model_name = prefix + name.removeprefix(saved_prefix)
                names[model_name] = name
                if name.startswith(saved_prefix) and model_name in expected and shape != expected[model_name]:
                    raise ValueError(f"{weights}: tensor {name!r} has shape {shape} where {config_file} describes "
                                     f"{expected[model_name]}: the config does not describe these weights; {fix}.")
        missing = [name for name in expected if name.startswith(prefix) and name not in names]
        if weights == complete and missing:
            raise ValueError(f"{weights}: no tensor {missing[0].removeprefix(prefix)!r}, which {config_file} "
                             f"describes: the config does not describe these weights; {fix}.")
        extra = [saved_name for name, saved_name in names.items() if name not in expected]
        if weights == complete and extra:  # loaded strictly: torch's multi-line "Unexpected key(s)"
            raise ValueError(f"{weights}: tensor {extra[0]!r}, which {config_file} does not describe: the config does "
                             f"not describe these weights; {fix}.")


def check_model_folder(folder: str | Path) -> str:
    """`"adapter"` for a `save_trained_model` folder, `"full"` for a `save_pretrained` refiner, after checking that
    the files it loads from are there and readable: `ValueError` (damaged) or `FileNotFoundError` (missing),
    naming the file, before any of them is loaded."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG_FILE).is_file():
        _check_adapter_files(folder)
        return "adapter"
    if (folder / "config.json").is_file():
        _check_full_model_files(folder)
        return "full"
    raise FileNotFoundError(
        f"{folder} holds neither {ADAPTER_CONFIG_FILE} (a save_trained_model folder) nor config.json (a full "
        "refiner folder)."
    )


def _local_folder(path: str | Path, revision: str | None = None) -> Path:
    problem = local_revision_problem(path, revision)
    if problem is not None:
        raise ValueError(f"revision={revision!r}: {problem}.")
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if is_hub_repo_id(str(path)):
        return download_model_folder(str(path), revision=revision)
    raise FileNotFoundError(f"{path} is not a folder (nor a Hub repo id OWNER/NAME).")


def _refuse_own_base(source: _BaseSource | None, config: Stage2RefinerConfig, output_dir: Path, writer: str) -> None:
    """The folder of the refiner an adapter was built on, or of the backbone checkpoint its base loads
    (`config.backbone_weights`), or a folder holding either: replacing it would leave the adapter nothing to load
    onto (its `stage2_base.json` would point at itself)."""
    needed = []
    if source is not None and source.kind == "model" and source.model_name_or_path is not None:
        needed.append((source.model_name_or_path, "the base refiner"))
    if (source is None or source.kind == "backbone_weights") and config.backbone_weights is not None:
        needed.append((config.backbone_weights, "the backbone weights (config.backbone_weights)"))
    target = output_dir.resolve()
    for base, what in needed:
        base = Path(base).expanduser()
        if base.exists() and (target == base.resolve() or target in base.resolve().parents):
            raise FileExistsError(f"{writer}: {output_dir} holds {what} this adapter was built on, which the adapter "
                                  f"needs to load; choose another folder.")


def _refuse_foreign_folder(output_dir: Path) -> None:
    """Replacing a folder is fine when it holds an earlier save; anything else is refused."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder.")
    if any(output_dir.iterdir()) and not (output_dir / "config.json").is_file():
        raise FileExistsError(f"{output_dir} holds other files; choose a new or empty folder for the model.")


__all__ = [
    "QUANTIZATIONS",
    "FITTED_MODULES",
    "TRAINABLE_MODULES",
    "build_trainable_model",
    "check_model_folder",
    "export_merged_model",
    "format_trainable_summary",
    "disable_cpu_4bit_repacking",
    "load_trained_model",
    "lora_target_pattern",
    "modules_kept_in_full_precision",
    "quantization_config_for",
    "read_base_source",
    "save_trained_model",
    "trainable_parameter_summary",
]
