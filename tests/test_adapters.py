"""The trainable refiner: 8-bit / 4-bit / full-precision bases, LoRA placement, training steps, saving and loading."""
from __future__ import annotations

import json
import os
import warnings
import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from _hub_helpers import hub_server  # noqa: F401  (fixture)
from _refiner_helpers import single_thread  # noqa: F401  (fixture)
from _refiner_helpers import tiny_backbone_config, tiny_inputs, tiny_refiner_config, wake_up
from modeling_stage2 import PrithviEncoder, Stage2RefinerModel
from modeling_stage2.adapters import (
    build_trainable_model,
    export_merged_model,
    load_trained_model,
    lora_target_pattern,
    modules_kept_in_full_precision,
    save_trained_model,
    trainable_parameter_summary,
)

QUANTIZATIONS = ["8bit", "4bit", "none"]
QUANTIZED_LINEAR = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit, "none": nn.Linear}
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")

pytestmark = [pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"), pytest.mark.usefixtures("single_thread")]


def build(quantization: str, **kwargs):
    kwargs.setdefault("print_summary", False)
    config = kwargs.pop("config", None) or tiny_refiner_config()
    return build_trainable_model(config, quantization=quantization, **kwargs)


def refine(model, opt_v1, month, biome):
    with torch.no_grad():
        return model(opt_v1=opt_v1, month=month, biome=biome).refined


def train_step(model, optimizer, seed: int = 0) -> float:
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28), seed=seed)
    target = opt_v1.flip(-1)
    loss = (model(opt_v1=opt_v1, month=month, biome=biome).refined - target).abs().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def trained(quantization: str, **kwargs):
    """A model after one optimizer step, with every trainable weight (and nothing else) moved."""
    model = build(quantization, **kwargs)
    wake_up(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train_step(model, optimizer)
    return model.eval()


def lora_layer_names(model) -> set[str]:
    names = [name for name, _ in model.named_parameters() if ".lora_A." in name]
    return {name.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0] for name in names}


# ------------------------------------------------------------------------------------------ quantization plan


def test_only_the_backbone_block_linears_are_quantized():
    config = tiny_refiner_config()
    skip = modules_kept_in_full_precision(config)
    assert {"normalizer", "metadata_embedding", "fusion", "head"} <= set(skip)
    assert not [name for name in skip if name.startswith("backbone.blocks")]

    for quantization in ("8bit", "4bit"):
        model = build(quantization).get_base_model()
        for name, module in model.named_modules():
            is_block_linear = name.startswith("backbone.blocks.") and name.endswith(BLOCK_LINEARS)
            if is_block_linear:
                assert isinstance(module.base_layer, QUANTIZED_LINEAR[quantization]), name
            elif isinstance(module, nn.Linear) and "lora_" not in name and not name.endswith("base_layer"):
                assert type(module) is nn.Linear and module.weight.dtype == torch.float32, name
        assert type(model.backbone.patch_embed.proj) is nn.Conv3d
        assert model.backbone.patch_embed.proj.weight.dtype == torch.float32
    weight = model.backbone.blocks[0].attn.qkv.base_layer.weight
    assert weight.dtype == torch.uint8 and weight.__class__.__name__ == "Params4bit"


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_base_does_not_keep_the_temporary_checkpoint_mapped(quantization):
    """from_pretrained leaves full-precision tensors as views of the safetensors file; the base copies them, so
    the (deleted) temporary checkpoint of the fp32 refiner is unmapped: 2.5 GB of RSS for the 600M backbone."""
    model = build(quantization)
    mapped = [line for line in open("/proc/self/maps") if "stage2-base-" in line]
    assert mapped == []
    assert model.get_base_model().backbone.pos_embed.abs().sum() > 0  # still the loaded table


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_lora_goes_on_every_block_linear_but_never_the_patch_embedding(quantization):
    model = build(quantization)
    expected = {f"backbone.blocks.{block}.{linear}" for block in range(2) for linear in BLOCK_LINEARS}
    assert lora_layer_names(model) == expected
    summary = trainable_parameter_summary(model)
    # r=8 on 64 -> 192 (qkv), 64 -> 64 (proj), 64 -> 256 (fc1), 256 -> 64 (fc2), two blocks.
    assert summary["lora"] == 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert summary["other"] == 0
    for module in ("metadata_embedding", "fusion", "head"):
        active = getattr(model.get_base_model(), module).modules_to_save["default"]
        assert summary[module] == sum(p.numel() for p in active.parameters())
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert any("patch_embed.proj" in name for name in frozen) and any("original_module" in name for name in frozen)


def test_lora_on_the_last_blocks_and_chosen_targets_only():
    config = tiny_refiner_config(backbone_config=tiny_backbone_config(depth=4))
    model = build("none", config=config, unfreeze_last_n_blocks=1, target_modules=("qkv", "fc2"), lora_r=4)
    assert lora_layer_names(model) == {"backbone.blocks.3.attn.qkv", "backbone.blocks.3.mlp.fc2"}
    assert trainable_parameter_summary(model)["lora"] == 4 * ((64 + 192) + (256 + 64))
    lora_config = model.peft_config["default"]
    assert (lora_config.r, lora_config.lora_alpha, lora_config.lora_dropout) == (4, 16, 0.0)

    from_config = build("none", config=tiny_refiner_config(backbone_config=tiny_backbone_config(depth=4),
                                                             unfreeze_last_n_blocks=2, lora_target_modules=["proj"]))
    assert lora_layer_names(from_config) == {"backbone.blocks.2.attn.proj", "backbone.blocks.3.attn.proj"}
    pattern = r"(?:.*\.)?backbone\.blocks\.(?:0|1|2|3)\.(?:attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    assert lora_target_pattern(config) == pattern


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"quantization": "int8"}, ValueError, "quantization must be one of"),
        ({"target_modules": ["qkv", "patch_embed.proj"]}, ValueError, r"^target_modules must be .*never adapted"),
        ({"unfreeze_last_n_blocks": 3}, ValueError, r"^unfreeze_last_n_blocks=3 exceeds the backbone depth 2"),
        ({"model_name_or_path": "somewhere"}, ValueError, "not both"),
    ],
)
def test_bad_build_arguments_are_refused(kwargs, error, message):
    kwargs.setdefault("quantization", "none")
    with pytest.raises(error, match=message):
        build_trainable_model(tiny_refiner_config(), print_summary=False, **kwargs)


def test_summary_is_printed(capsys):
    build("8bit", print_summary=True)
    printed = capsys.readouterr().out
    assert "Stage 2 refiner (backbone 8bit):" in printed and "trainable of" in printed
    for group in ("lora", "metadata_embedding", "fusion", "head"):
        assert group in printed


# ----------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_forward_and_backward_reach_lora_and_trainable_modules(quantization):
    model = build(quantization)
    wake_up(model)
    model.train()
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    refined = model(opt_v1=opt_v1, month=month, biome=biome).refined
    assert refined.shape == opt_v1.shape and refined.dtype == torch.float32
    refined.square().mean().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_one_step_changes_only_lora_fusion_metadata_and_head(quantization):
    model = build(quantization)
    wake_up(model)
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    model.train()
    train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3))  # frozen ones have no gradient
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    groups = dict.fromkeys(("lora_", *(f"{module}.modules_to_save" for module in ("metadata_embedding", "fusion", "head"))), 0)
    for name in changed:
        group = [key for key in groups if key in name]
        assert len(group) == 1, name
        groups[group[0]] += 1
    assert all(groups.values()), groups


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_training_continues_after_an_evaluation_pass(quantization):
    """bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs at the first eval forward, in a layout whose
    forward fails in training; a trainable model must survive evaluate-then-train (what the Trainer does)."""
    model = build(quantization)
    wake_up(model)
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28))
    model.eval()
    before = refine(model, opt_v1, month, biome)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    loss = train_step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    assert loss > 0
    model.eval()
    assert not torch.equal(refine(model, opt_v1, month, biome), before)


def test_gradient_checkpointing_trains_the_same():
    for quantization in ("8bit", "none"):
        torch.manual_seed(0)
        reference = trained(quantization)
        torch.manual_seed(0)
        checkpointed = trained(quantization, gradient_checkpointing=True)
        blocks = checkpointed.get_base_model().backbone.blocks
        assert all(block.gradient_checkpointing for block in blocks)
        checkpointed_state = checkpointed.state_dict()
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(checkpointed_state[name], value, atol=1e-6, rtol=1e-5, msg=name)


# -------------------------------------------------------------------------------------------- save and load


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_adapter_round_trip_onto_a_fresh_base_is_exact(quantization, tmp_path):
    model = trained(quantization)
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28), seed=3)
    expected = refine(model, opt_v1, month, biome)
    assert not torch.equal(expected, opt_v1)

    folder = save_trained_model(model, tmp_path / "best")
    names = {path.name for path in folder.iterdir()}
    expected_files = {"adapter_model.safetensors", "adapter_config.json", "config.json", "stage2_base.json"}
    assert expected_files | {"base_model.safetensors"} <= names
    config_json = json.loads((folder / "config.json").read_text())
    assert config_json["model_type"] == "stage2_refiner" and "quantization_config" not in config_json
    assert json.loads((folder / "stage2_base.json").read_text())["kind"] == "saved"  # random backbone: stored
    adapter = load_file(folder / "adapter_model.safetensors")
    assert any("lora_A" in key for key in adapter) and any(".head." in key for key in adapter)
    assert not any(key.endswith(("patch_embed.proj.weight", "attn.qkv.weight", "cls_token")) for key in adapter)
    base = load_file(folder / "base_model.safetensors")
    assert base["blocks.0.attn.qkv.weight"].dtype == torch.float32  # full precision, re-quantized at load

    loaded = load_trained_model(folder, quantization=quantization)
    assert not loaded.training
    assert torch.equal(refine(loaded, opt_v1, month, biome), expected)


def test_adapter_trained_in_8bit_loads_onto_other_bases(tmp_path):
    model = trained("8bit")
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28), seed=3)
    expected = refine(model, opt_v1, month, biome)
    folder = save_trained_model(model, tmp_path / "best")
    full = refine(load_trained_model(folder, quantization="none"), opt_v1, month, biome)
    nf4 = refine(load_trained_model(folder, quantization="4bit"), opt_v1, month, biome)
    assert (full - expected).abs().max() < 0.05 and not torch.equal(full, expected)
    assert torch.isfinite(nf4).all() and nf4.shape == expected.shape


def test_pretrained_backbone_is_rebuilt_from_its_source(tmp_path):
    encoder = PrithviEncoder(tiny_backbone_config())
    encoder.save_pretrained(tmp_path / "converted")
    config = tiny_refiner_config(backbone_weights=str(tmp_path / "converted"))
    model = trained("8bit", config=config)
    base_qkv = model.get_base_model().backbone.blocks[0].attn.qkv.base_layer.weight
    assert base_qkv.dtype == torch.int8
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28), seed=3)
    expected = refine(model, opt_v1, month, biome)

    folder = save_trained_model(model, tmp_path / "best")
    assert not (folder / "base_model.safetensors").exists()  # the converted folder is the source
    assert json.loads((folder / "stage2_base.json").read_text())["kind"] == "backbone_weights"
    loaded = load_trained_model(folder, quantization="8bit")
    assert torch.equal(refine(loaded, opt_v1, month, biome), expected)
    full = load_trained_model(folder).get_base_model()
    expected_backbone = encoder.state_dict()
    state = {
        key.replace(".base_layer", ""): value for key, value in full.backbone.state_dict().items() if "lora_" not in key
    }
    assert all(torch.equal(value, expected_backbone[key]) for key, value in state.items())


def test_base_from_a_saved_refiner_folder(tmp_path):
    base = Stage2RefinerModel(tiny_refiner_config())
    base.save_pretrained(tmp_path / "base")
    model = build_trainable_model(model_name_or_path=tmp_path / "base", quantization="4bit", print_summary=False)
    wake_up(model)
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28), seed=3)
    expected = refine(model, opt_v1, month, biome)
    folder = save_trained_model(model, tmp_path / "best")
    info = json.loads((folder / "stage2_base.json").read_text())
    assert info == {"kind": "model", "model_name_or_path": str(tmp_path / "base"), "trained_quantization": "4bit"}
    assert torch.equal(refine(load_trained_model(folder, quantization="4bit"), opt_v1, month, biome), expected)


def test_a_base_named_by_a_relative_path_loads_from_anywhere(tmp_path, monkeypatch):
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "work" / "base")
    monkeypatch.chdir(tmp_path / "work")
    model = build_trainable_model(model_name_or_path="base", quantization="none", print_summary=False)
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28), seed=3)
    expected = refine(model, opt_v1, month, biome)
    folder = save_trained_model(model, tmp_path / "best")
    assert json.loads((folder / "stage2_base.json").read_text())["model_name_or_path"] == str(
        (tmp_path / "work" / "base").resolve())
    monkeypatch.chdir(tmp_path)  # "base" names nothing here
    assert torch.equal(refine(load_trained_model(folder), opt_v1, month, biome), expected)


def test_the_saved_config_records_the_lora_the_adapter_was_built_with(tmp_path):
    """config.json (and the cards made from it, merged or not) describes the adaptation the weights went through."""
    from model_cards.cards import card_for_folder

    config = tiny_refiner_config(backbone_config=tiny_backbone_config(depth=4))
    model = build("none", config=config, lora_r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["qkv"],
                  unfreeze_last_n_blocks=1)
    folder = save_trained_model(model, tmp_path / "best")
    saved = json.loads((folder / "config.json").read_text())
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert (saved["lora_r"], saved["lora_alpha"], saved["lora_dropout"]) == (4, 8, 0.05) == (
        adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"])
    assert (saved["lora_target_modules"], saved["unfreeze_last_n_blocks"]) == (["qkv"], 1)
    assert (config.lora_r, config.unfreeze_last_n_blocks) == (8, None)  # the caller's config is left as it was
    assert "LoRA r=4, alpha=8, dropout=0.05 on qkv of the last backbone block" in card_for_folder(folder).text
    export_merged_model(load_trained_model(folder), tmp_path / "merged")
    assert "LoRA r=4, alpha=8 on qkv of the last backbone block, merged" in card_for_folder(tmp_path / "merged").text
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        build("none", config=config, lora_dropout=1.5)


def test_the_trained_quantization_is_kept_whatever_the_adapter_is_loaded_with(tmp_path):
    from modeling_stage2.export import merged_refiner

    folder = save_trained_model(build("8bit"), tmp_path / "best")
    loaded = load_trained_model(folder, quantization="none")
    assert merged_refiner(loaded)[1]["trained_quantization"] == "8bit"
    again = save_trained_model(loaded, tmp_path / "again")
    assert json.loads((again / "stage2_base.json").read_text())["trained_quantization"] == "8bit"
    (again / "stage2_base.json").write_text(json.dumps({"kind": "saved", "trained_quantization": "fp8"}))
    with pytest.raises(ValueError, match="'trained_quantization' is 'fp8'"):
        load_trained_model(again)


@pytest.mark.parametrize("writer", ["save_trained_model", "export_merged_model"])
def test_an_adapter_is_never_written_over_the_base_it_needs(tmp_path, writer):
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "base")
    before = {path.name: path.read_bytes() for path in (tmp_path / "base").iterdir()}
    model = build_trainable_model(model_name_or_path=tmp_path / "base", quantization="none", print_summary=False)
    if writer == "export_merged_model":
        model = load_trained_model(save_trained_model(model, tmp_path / "best"))
    with pytest.raises(FileExistsError, match=f"^{writer}: .*base.* holds the base refiner this adapter was built on"):
        globals()[writer](model, tmp_path / "sub" / ".." / "base")
    assert {path.name: path.read_bytes() for path in (tmp_path / "base").iterdir()} == before


def test_a_moved_base_folder_is_named_before_anything_loads(tmp_path):
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "base")
    model = build_trainable_model(model_name_or_path=tmp_path / "base", quantization="none", print_summary=False)
    folder = save_trained_model(model, tmp_path / "best")
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=r"stage2_base.json: key 'model_name_or_path' names the base folder "
                                                r".*/base, which no longer exists"):
        load_trained_model(folder)


def test_adapter_folder_loads_from_the_hub(hub_server, tmp_path):
    from huggingface_hub import HfApi

    model = trained("none")
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28), seed=3)
    expected = refine(model, opt_v1, month, biome)
    folder = save_trained_model(model, tmp_path / "best")
    repo_id = f"{hub_server.user}/stage2-refiner-adapter"
    HfApi().create_repo(repo_id)
    HfApi().upload_folder(folder_path=str(folder), repo_id=repo_id)
    loaded = load_trained_model(repo_id, quantization="none")
    assert torch.equal(refine(loaded, opt_v1, month, biome), expected)


def test_full_model_folders_load_too(tmp_path):
    model = Stage2RefinerModel(tiny_refiner_config())
    wake_up(model)
    model.save_pretrained(tmp_path / "full")
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28))
    loaded = load_trained_model(tmp_path / "full")
    assert type(loaded) is Stage2RefinerModel and not loaded.training
    expected = refine(model.eval(), opt_v1, month, biome)
    torch.testing.assert_close(refine(loaded, opt_v1, month, biome), expected, atol=1e-6, rtol=0)
    quantized = load_trained_model(tmp_path / "full", quantization="8bit")
    assert isinstance(quantized.backbone.blocks[0].mlp.fc1, bnb.nn.Linear8bitLt)


def test_merged_export_matches_the_adapted_model(tmp_path):
    model = trained("none")
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28), seed=3)
    expected = refine(model, opt_v1, month, biome)
    merged = export_merged_model(model, tmp_path / "merged")
    assert type(merged) is Stage2RefinerModel
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    from transformers import AutoModel

    reloaded = AutoModel.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded) is Stage2RefinerModel
    torch.testing.assert_close(refine(reloaded, opt_v1, month, biome), expected, atol=1e-5, rtol=0)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_merged_export_keeps_the_metrics_settings_and_preview_of_its_folder(tmp_path):
    from model_cards.cards import card_for_folder

    folder = save_trained_model(trained("none"), tmp_path / "best")
    metrics = {"refined": {name: 0.05 for name in ("ndvi_rmse", "evi_rmse", "sam", "identity_l1", "edge_l1")},
               "n_tiles": 3, "split": "val"}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "training_config.json").write_text(json.dumps({"learning_rate": 0.001}))
    (folder / "preview.png").write_bytes(b"\x89PNG\r\n")
    export_merged_model(load_trained_model(folder), tmp_path / "merged")
    for name in ("metrics.json", "training_config.json", "preview.png"):
        assert (tmp_path / "merged" / name).read_bytes() == (folder / name).read_bytes(), name
    card = card_for_folder(tmp_path / "merged")  # what stage2-push would publish
    assert len(card.data.eval_results) == 5 and "3 tiles of the `val` split" in card.text


def test_the_documented_filter_silences_the_bitsandbytes_cast_message(repo_root, caplog, monkeypatch):
    import logging
    import re

    from modeling_stage2 import _quiet

    monkeypatch.setattr(_quiet, "_said", set())  # said once a process: an earlier test may have said it already

    documented = re.search(r"`(logging\.getLogger\([^`]+\)\.setLevel\(logging\.ERROR\))`",
                           (repo_root / "docs" / "refiner.md").read_text())
    assert documented, "docs/refiner.md no longer shows how to silence the bitsandbytes message"
    model = build("8bit").eval()
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28))
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    level = logger.level
    try:
        with caplog.at_level(logging.WARNING):
            refine(model, opt_v1, month, biome)
        assert "MatMul8bitLt: inputs will be cast" in caplog.text  # the message the docs talk about
        caplog.clear()
        eval(documented.group(1), {"logging": logging})
        with caplog.at_level(logging.WARNING):
            refine(model, opt_v1, month, biome)
        assert "MatMul8bitLt" not in caplog.text
    finally:
        logger.setLevel(level)


@pytest.mark.parametrize("quantization", ["none", "8bit"])
def test_wrapping_and_loading_print_no_peft_deprecation_warning(tmp_path, quantization):
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model, and its
    `prepare_model_for_kbit_training` (8/4 bit) calls the deprecated `gradient_checkpointing_enable`; users saw those
    FutureWarnings on every stage2-refine and stage2-train (the documented `gradient_checkpointing=True` too). Other
    warnings still come through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = save_trained_model(build(quantization, gradient_checkpointing=True), tmp_path / "best")
        load_trained_model(folder, quantization=quantization)
        warnings.warn("a later warning", FutureWarning)
    messages = [str(warning.message) for warning in caught]
    assert not [m for m in messages if "gradient_checkpointing" in m and "deprecated" in m], messages
    assert "a later warning" in messages


def test_quantized_models_cannot_be_merged(tmp_path):
    with pytest.raises(ValueError, match="needs a full-precision base"):
        export_merged_model(build("8bit"), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_saving_refuses_foreign_folders_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    model = build("none")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds other files"):
        save_trained_model(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"

    from modeling_stage2.configuration_stage2 import Stage2RefinerConfig

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Stage2RefinerConfig, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_trained_model(model, tmp_path / "best")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes"]


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither adapter_config.json"):
        load_trained_model(tmp_path)
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_trained_model(tmp_path, quantization="fp8")
    folder = save_trained_model(build("none"), tmp_path / "best")
    (folder / "base_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="base_model.safetensors is missing"):
        load_trained_model(folder)
    (folder / "stage2_base.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable base description"):
        load_trained_model(folder)


def test_staged_folder_replaces_only_on_success(tmp_path):
    from modeling_stage2._files import staged_folder

    target = tmp_path / "best"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with staged_folder(target) as staging:
            (staging / "weights").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and (target / "weights").read_text() == "old"
    with staged_folder(target) as staging:
        (staging / "weights").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and (target / "weights").read_text() == "new"


def test_an_adapter_on_a_hub_base_keeps_the_base_commit_it_was_trained_on(hub_server, tmp_path):
    """A later commit to the base refiner's repo does not change the adapter's outputs: the base is loaded at the
    commit recorded in stage2_base.json."""
    from huggingface_hub import HfApi

    repo = f"{hub_server.user}/stage2-base"
    HfApi().create_repo(repo)
    torch.manual_seed(0)
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "base_v1")
    HfApi().upload_folder(folder_path=str(tmp_path / "base_v1"), repo_id=repo)
    commit = HfApi().model_info(repo).sha
    model = build_trainable_model(model_name_or_path=repo, quantization="none", print_summary=False)
    wake_up(model)
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28), seed=3)
    expected = refine(model, opt_v1, month, biome)
    folder = save_trained_model(model, tmp_path / "best")
    assert json.loads((folder / "stage2_base.json").read_text())["revision"] == commit

    torch.manual_seed(1)
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "base_v2")  # other weights
    HfApi().upload_folder(folder_path=str(tmp_path / "base_v2"), repo_id=repo)
    assert HfApi().model_info(repo).sha != commit
    assert torch.equal(refine(load_trained_model(folder), opt_v1, month, biome), expected)
    pinned = build_trainable_model(model_name_or_path=repo, quantization="none", print_summary=False, revision=commit)
    assert pinned.stage2_base_source.revision == commit
    assert torch.equal(pinned.get_base_model().backbone.blocks[0].attn.qkv.weight,
                       model.get_base_model().backbone.blocks[0].attn.qkv.weight)


def test_an_adapter_on_hub_backbone_weights_keeps_the_checkpoint_commit_it_was_trained_on(hub_server, tmp_path):
    """The backbone's Hub checkpoint is pinned like a Hub base refiner: a later commit to the backbone's repo does not
    change the adapter's outputs, which are rebuilt from the commit recorded in stage2_base.json."""
    from _hub_helpers import publish_tiny_prithvi

    repo = f"{hub_server.user}/Prithvi-EO-2.0-tiny"
    commit = publish_tiny_prithvi(repo, tmp_path, seed=0)
    config = tiny_refiner_config(backbone_config="prithvi_eo_v2_tiny", backbone_weights=repo)
    model = build_trainable_model(config, quantization="none", print_summary=False)
    wake_up(model)
    opt_v1, month, biome = tiny_inputs(batch=1, size=(32, 32), seed=3)
    expected = refine(model, opt_v1, month, biome)
    folder = save_trained_model(model, tmp_path / "best")
    assert json.loads((folder / "stage2_base.json").read_text())["revision"] == commit

    assert publish_tiny_prithvi(repo, tmp_path, seed=1) != commit  # other backbone weights on main
    assert torch.equal(refine(load_trained_model(folder), opt_v1, month, biome), expected)
    def qkv(built):
        return built.get_base_model().backbone.blocks[0].attn.qkv.weight

    fresh = build_trainable_model(config, quantization="none", print_summary=False)  # a new run takes the new weights
    assert not torch.equal(qkv(fresh), qkv(model))
    pinned = build_trainable_model(config, quantization="none", print_summary=False, revision=commit)
    assert torch.equal(qkv(pinned), qkv(model)) and pinned.stage2_base_source.revision == commit
    with pytest.raises(ValueError, match="revision='main' applies to a base on the Hub; the base .* is not"):
        build_trainable_model(tiny_refiner_config(), quantization="none", print_summary=False, revision="main")


def test_a_full_refiner_whose_config_does_not_describe_its_weights_is_named_before_transformers_loads_it(
        tmp_path, capfd):
    """transformers printed a table of every mismatched tensor, then raised a RuntimeError; now one ValueError names
    the file, the first tensor and both shapes, and nothing else is printed."""
    folder = tmp_path / "full"
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"head_width": 32}))
    capfd.readouterr()
    with pytest.raises(ValueError, match=rf"^{folder / 'model.safetensors'}: tensor 'head\.\S+' has shape \[16(, \d+)*\]"
                                         rf" where {folder / 'config.json'} describes \[32(, \d+)*\]: the config does "
                                         "not describe these weights"):
        load_trained_model(folder)
    assert "LOAD REPORT" not in "".join(capfd.readouterr())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
    with pytest.raises(ValueError, match="key 'model_type' is 'bert', not 'stage2_refiner': not a Stage 2 refiner"):
        load_trained_model(folder)
    (folder / "config.json").write_text(json.dumps(config))
    assert isinstance(load_trained_model(folder), Stage2RefinerModel)
