"""Gaps a mutation audit of modeling_stage2/adapters.py found: the bitsandbytes settings the quantized layers really
get (LLM.int8 outlier threshold, NF4 with double quantization computing in fp32), the parameter summary's counts,
an already quantized base refused, the device a loaded model is put on, a loaded adapter frozen, bf16 adapter
weights accepted, and stage2_base.json's fields read back as written."""
from __future__ import annotations

import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file

from _refiner_helpers import single_thread  # noqa: F401  (fixture)
from _refiner_helpers import assert_refused_before_any_base, save_woken_adapter, tiny_inputs, tiny_refiner_config
from modeling_stage2 import Stage2RefinerModel, adapters
from modeling_stage2.adapters import (build_trainable_model, format_trainable_summary, load_trained_model,
                                      save_trained_model, trainable_parameter_summary)

pytestmark = [pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"), pytest.mark.usefixtures("single_thread")]


def refine(model, seed: int = 3):
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28), seed=seed)
    with torch.no_grad():
        return model(opt_v1=opt_v1, month=month, biome=biome).refined


@pytest.fixture(scope="module")
def adapter_8bit(tmp_path_factory):
    """An adapter trained (as if) on an 8-bit random-init base: stage2_base.json kind "saved"."""
    return save_woken_adapter(tmp_path_factory.mktemp("gaps") / "best", quantization="8bit")


# ------------------------------------------------------------------------------------------ quantization config


def test_quantized_layers_get_llm_int8_outliers_and_nf4_double_quantization_in_fp32(adapter_8bit):
    """The documented settings, read off the loaded layers: int8 with the LLM.int8 outlier threshold 6 (0 would be
    plain int8, no fp16 outlier columns), NF4 (not FP4) with double quantization and fp32 compute (bf16 compute
    changes every 4-bit output). The output tolerances of the quantized tests are too wide to see any of these."""
    int8 = load_trained_model(adapter_8bit, quantization="8bit")
    layers = [module for module in int8.modules() if isinstance(module, bnb.nn.Linear8bitLt)]
    assert len(layers) == 8 and {layer.state.threshold for layer in layers} == {6.0}
    nf4 = load_trained_model(adapter_8bit, quantization="4bit")
    layers = [module for module in nf4.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(layers) == 8
    for layer in layers:
        assert layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.quant_state.nested  # double quantization: the absmax constants quantized too
        assert layer.compute_dtype == torch.float32


def test_an_already_quantized_base_refiner_is_refused(tmp_path):
    """A refiner folder whose config.json holds quantization settings (saved from a quantized model) is not a LoRA
    base: bases are quantized at load time from full-precision weights."""
    from transformers import BitsAndBytesConfig

    folder = tmp_path / "quantized"
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    message = f"^{folder} holds an already quantized refiner; LoRA bases are quantized at load time"
    with pytest.raises(ValueError, match=message):
        build_trainable_model(model_name_or_path=folder, quantization="none", print_summary=False)
    with pytest.raises(ValueError, match=message):
        load_trained_model(folder, quantization="8bit")


# ------------------------------------------------------------------------------------------------ summary


def test_the_summary_counts_4bit_weights_as_the_parameters_they_hold_and_other_trainable_ones():
    """A Params4bit tensor packs two weights per byte: counted once, the 4-bit total fell short of the 8-bit and
    full-precision ones. A parameter outside the known groups that the user unfroze is "other", and trainable."""
    totals = {}
    for quantization in ("none", "8bit", "4bit"):
        totals[quantization] = trainable_parameter_summary(
            build_trainable_model(tiny_refiner_config(), quantization=quantization, print_summary=False))["total"]
    refiner = sum(p.numel() for p in Stage2RefinerModel(tiny_refiner_config()).parameters())
    lora = 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    trained_copies = sum(p.numel() for name in ("metadata_embedding", "fusion", "head")
                         for p in getattr(Stage2RefinerModel(tiny_refiner_config()), name).parameters())
    assert totals == dict.fromkeys(("none", "8bit", "4bit"), refiner + lora + trained_copies)

    model = build_trainable_model(tiny_refiner_config(), quantization="none", print_summary=False)
    norm = model.get_base_model().backbone.norm.requires_grad_(True)
    summary = trainable_parameter_summary(model)
    assert summary["other"] == sum(p.numel() for p in norm.parameters()) == 2 * 64
    assert summary["trainable"] == lora + trained_copies + 2 * 64
    first, *groups = format_trainable_summary(model).splitlines()
    percent = 100 * summary["trainable"] / summary["total"]
    assert first == (f"Stage 2 refiner (backbone full precision): {summary['trainable']:,} trainable of "
                     f"{summary['total']:,} parameters ({percent:.2f}%)")
    assert groups[-1].split() == ["other", "128"]


# ----------------------------------------------------------------------------------------- loading and device


def test_a_loaded_adapter_is_frozen_and_reports_the_quantization_it_was_loaded_with(adapter_8bit):
    """Loaded for inference: no parameter requires a gradient (else every forward outside no_grad keeps an autograd
    graph of the LoRA and trained modules). The summary names the base as loaded, not as trained."""
    loaded = load_trained_model(adapter_8bit, quantization="none")
    assert not [name for name, p in loaded.named_parameters() if p.requires_grad]
    assert format_trainable_summary(loaded).startswith("Stage 2 refiner (backbone full precision): 0 trainable")
    assert loaded.stage2_base_source.trained_quantization == "8bit"


def test_a_full_precision_model_is_moved_to_the_device_asked_for(adapter_8bit):
    """The meta device stands in for a GPU: `device` must reach every parameter of an adapter on a full-precision
    base (no device_map there)."""
    loaded = load_trained_model(adapter_8bit, quantization="none", device="meta")
    assert {p.device.type for p in loaded.parameters()} == {"meta"}


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_a_quantized_base_is_loaded_onto_the_device_asked_for(adapter_8bit, monkeypatch, quantization):
    """A quantized base cannot be moved after loading: `device` must reach from_pretrained as its device_map (the
    one that is called with a quantization_config)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []

    def record(cls, *args, **kwargs):
        seen.append(kwargs)
        raise RuntimeError("recorded")

    monkeypatch.setattr(Stage2RefinerModel, "from_pretrained", classmethod(record))
    with pytest.raises(RuntimeError, match="recorded"):
        load_trained_model(adapter_8bit, quantization=quantization, device="cuda:1")
    assert seen[-1]["device_map"] == {"": "cuda:1"} and "quantization_config" in seen[-1]


# ------------------------------------------------------------------------------------------------ weight checks


def test_bf16_adapter_weights_still_load(adapter_8bit, tmp_path):
    """bf16 is a floating-point dtype an adapter is saved or cast in, like fp16: the weight check lets it through."""
    folder = tmp_path / "bf16"
    shutil.copytree(adapter_8bit, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    bf16 = {name: value.to(torch.bfloat16) for name, value in weights.items()}
    save_file(bf16, str(folder / "adapter_model.safetensors"))
    assert adapters.check_model_folder(folder) == "adapter"
    expected = refine(load_trained_model(adapter_8bit))
    torch.testing.assert_close(refine(load_trained_model(folder)), expected, atol=2e-2, rtol=0)


# ------------------------------------------------------------------------------------------- stage2_base.json


@pytest.fixture(scope="module")
def adapter_on_local_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_base")
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(root / "base")
    model = build_trainable_model(model_name_or_path=root / "base", quantization="none", print_summary=False)
    return save_trained_model(model, root / "best")


@pytest.mark.parametrize("fields, message", [
    ({"model_name_or_path": ""}, r"key 'model_name_or_path' is ''; with kind 'model' it names the base refiner"),
    ({"revision": 5}, r"key 'revision' is 5; expected the base repo's commit \(text\)"),
], ids=["empty_base", "revision_not_text"])
def test_a_base_description_with_a_bad_field_is_named_before_any_base_is_built(
        adapter_on_local_base, tmp_path, monkeypatch, fields, message):
    """An empty base name read as the working folder, and a revision of another type reached the Hub client (or, for
    a local base, a message about revisions of local paths the user never asked for)."""
    folder = shutil.copytree(adapter_on_local_base, tmp_path / "best")
    info = json.loads((folder / "stage2_base.json").read_text())
    (folder / "stage2_base.json").write_text(json.dumps(info | fields))
    assert_refused_before_any_base(folder, monkeypatch, ValueError, rf"^{folder / 'stage2_base.json'}: {message}")


def test_a_model_saved_without_its_base_record_keeps_the_quantization_it_was_trained_with(tmp_path):
    """A PeftModel that lost its `stage2_base_source` (copied, or wrapped by other code) on a backbone_weights base:
    the trained quantization is read off the base (8-bit here), not guessed."""
    from modeling_stage2 import PrithviEncoder
    from _refiner_helpers import tiny_backbone_config

    PrithviEncoder(tiny_backbone_config()).save_pretrained(tmp_path / "converted")
    config = tiny_refiner_config(backbone_weights=str(tmp_path / "converted"))
    for quantization in ("8bit", "none"):
        model = build_trainable_model(config, quantization=quantization, print_summary=False)
        del model.stage2_base_source
        folder = save_trained_model(model, tmp_path / quantization)
        info = json.loads((folder / "stage2_base.json").read_text())
        assert info == {"kind": "backbone_weights", "model_name_or_path": None, "trained_quantization": quantization}


def test_a_damaged_later_shard_of_a_full_refiner_is_named(tmp_path):
    """Every shard the index names is checked, not only the first."""
    folder = tmp_path / "sharded"
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(folder, max_shard_size="200KB")
    shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) >= 2 and adapters.check_model_folder(folder) == "full"
    last = folder / shards[-1]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"^{last}: not a readable safetensors file"):
        load_trained_model(folder)
