"""The quantized + LoRA paths at inference: `load_model`'s `quantization` with adapter folders, merged folders and Hub
repo ids."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from _refiner_helpers import single_thread  # noqa: F401  (fixture)
from _refiner_helpers import tiny_inputs, tiny_refiner_config, wake_up
from inference_stage2 import InferenceInputError, load_model
from modeling_stage2.adapters import build_trainable_model, export_merged_model, load_trained_model, save_trained_model

pytestmark = [pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"), pytest.mark.usefixtures("single_thread")]

QUANTIZED_LINEAR = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An adapter trained (as if) on an 8-bit base, and its merge into the full-precision base."""
    torch.manual_seed(0)
    model = build_trainable_model(tiny_refiner_config(), quantization="8bit", print_summary=False)
    wake_up(model)
    root = tmp_path_factory.mktemp("quantized")
    adapter = save_trained_model(model, root / "best")
    export_merged_model(load_trained_model(adapter), root / "merged")
    return {"adapter": adapter, "merged": root / "merged"}


@pytest.mark.parametrize("quantization", ["int8", "8-bit", "NONE", None])
def test_a_bad_quantization_is_named_before_any_model_is_looked_at(folders, monkeypatch, quantization):
    """It was checked only once the model was found: a Hub repo was downloaded first, and the message blamed the
    model ("model runs/x/best: could not be loaded (ValueError: quantization must be ...)")."""
    import huggingface_hub

    requested = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: requested.append(repo_id))
    expected = rf"^quantization={quantization!r}: expected one of 8bit, 4bit, none$"
    for model in (folders["adapter"], "my-org/stage2-refiner"):
        with pytest.raises(InferenceInputError, match=expected):
            load_model(model, quantization=quantization)
    assert requested == []


@pytest.mark.parametrize("kind", ["adapter", "merged"])
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_adapter_and_merged_folders_refine_full_tiles_in_eval_mode(folders, kind, quantization):
    """Only the backbone's block linears are quantized: the head and the other modules see 4-D tensors, which
    bitsandbytes' eval-mode int8 matmul does not take."""
    model = load_model(folders[kind], quantization=quantization, device="cpu")
    assert not model.training
    quantized = {name for name, module in model.named_modules() if isinstance(module, QUANTIZED_LINEAR[quantization])}
    assert len(quantized) == 8 and all(".backbone.blocks." in f".{name}" for name in quantized)
    full = [name for name, module in model.named_modules() if type(module) is nn.Linear and "lora_" not in name
            and not name.endswith("base_layer")]
    assert full and all(".backbone.blocks." not in f".{name}" for name in full)
    opt_v1, month, biome = tiny_inputs(batch=1, size=(120, 120), seed=3)
    with torch.no_grad():
        refined = model(opt_v1=opt_v1, month=month, biome=biome).refined
        reference = load_model(folders["merged"])(opt_v1=opt_v1, month=month, biome=biome).refined
    assert refined.shape == opt_v1.shape and torch.isfinite(refined).all()
    # The base's quantization error (max 0.01 in 8 bit, 0.07 in 4 bit; mean 0.001, 0.01), not another model: the
    # refiner changes opt_v1 by up to 0.76 (mean 0.29), and the same adapter without its LoRA weights is off by up to
    # 0.48 (mean 0.05).
    error = (refined - reference).abs()
    assert 0 < float(error.max()) < {"8bit": 0.05, "4bit": 0.25}[quantization]
    assert float(error.mean()) < 0.1 * float((reference - opt_v1).abs().mean())


BNB_CONFIGS = {"8bit": dict(load_in_8bit=True),
               "4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)}


def quantized_names(model) -> list[str]:
    quantized = tuple(QUANTIZED_LINEAR.values())
    return sorted(name for name, module in model.named_modules() if isinstance(module, quantized))


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_a_plain_bits_and_bytes_config_quantizes_the_backbone_blocks_only(tmp_path, quantization):
    """`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_8bit=True))`, as transformers users write
    it (README: "8-bit or 4-bit through BitsAndBytesConfig"), quantized the head and the metadata embedding too, and
    the forward failed (8-bit: a shape error; NF4 likewise); peft's `PeftModel.from_pretrained` onto that base failed
    with a KeyError. It now quantizes what `quantization_config_for` does, to the bit, through `AutoModel` too; a
    config naming its own `llm_int8_skip_modules` is taken as it is, and the caller's config is not changed."""
    from peft import PeftModel
    from transformers import AutoModel, BitsAndBytesConfig

    from modeling_stage2 import Stage2RefinerModel
    from modeling_stage2.adapters import modules_kept_in_full_precision, quantization_config_for

    torch.manual_seed(0)
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "base")
    plain = BitsAndBytesConfig(**BNB_CONFIGS[quantization])
    ours = Stage2RefinerModel.from_pretrained(tmp_path / "base", quantization_config=quantization_config_for(
        quantization, tiny_refiner_config())).eval()
    expected_names, (opt_v1, month, biome) = quantized_names(ours), tiny_inputs(batch=1, size=(28, 28), seed=5)
    assert expected_names and all(".blocks." in name for name in expected_names)
    with torch.no_grad():
        expected = ours(opt_v1, month, biome).refined
        for loader in (Stage2RefinerModel, AutoModel):
            model = loader.from_pretrained(tmp_path / "base", quantization_config=plain).eval()
            assert quantized_names(model) == expected_names, loader
            assert torch.equal(model(opt_v1, month, biome).refined, expected), loader
    assert plain.llm_int8_skip_modules is None
    own = BitsAndBytesConfig(**BNB_CONFIGS[quantization], llm_int8_skip_modules=[
        *modules_kept_in_full_precision(tiny_refiner_config()), "backbone.blocks.0"])
    assert quantized_names(Stage2RefinerModel.from_pretrained(tmp_path / "base", quantization_config=own)) == [
        name for name in expected_names if not name.startswith("backbone.blocks.0.")]
    head_too = BitsAndBytesConfig(**BNB_CONFIGS[quantization], llm_int8_skip_modules=["patch_embed"])
    for loader in (Stage2RefinerModel, AutoModel):  # the head quantized: a tensor-size error at the first forward
        with pytest.raises(ValueError, match=r"^quantization_config\.llm_int8_skip_modules \['patch_embed'\] leaves "
                                             r"metadata_embedding\.\S+, \S+, head\.\S+ \.\.\. quantized, which "
                                             r"cannot run so .*modules_kept_in_full_precision\(config\)"):
            loader.from_pretrained(tmp_path / "base", quantization_config=head_too)
    if quantization == "8bit":  # peft's own way onto such a base: the adapter's outputs, to the bit
        trained = build_trainable_model(model_name_or_path=tmp_path / "base", quantization="8bit", print_summary=False)
        wake_up(trained)
        adapter = save_trained_model(trained, tmp_path / "adapter")
        peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tmp_path / "base", quantization_config=plain),
                                               str(adapter)).eval()
        with torch.no_grad():
            refined = peft_model(opt_v1, month, biome).refined
            assert torch.equal(refined, load_trained_model(adapter, quantization="8bit")(opt_v1, month, biome).refined)
            assert not torch.allclose(refined, expected, atol=1e-3)  # the adapter acts


def test_loading_info_is_returned_with_a_quantized_refiner_and_a_bad_skip_list_still_refused(tmp_path):
    """`output_loading_info=True` makes from_pretrained return (model, info): the check of what bitsandbytes replaced
    looks at the model in it (it failed with `AttributeError: 'tuple' ... named_modules`), and the pair comes back as
    transformers returns it."""
    from transformers import BitsAndBytesConfig

    from modeling_stage2 import Stage2RefinerModel

    torch.manual_seed(0)
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "base")
    plain = BitsAndBytesConfig(**BNB_CONFIGS["8bit"])
    model, info = Stage2RefinerModel.from_pretrained(tmp_path / "base", output_loading_info=True,
                                                     quantization_config=plain)
    assert quantized_names(model) and not info["missing_keys"] and not info["unexpected_keys"]
    head_too = BitsAndBytesConfig(**BNB_CONFIGS["8bit"], llm_int8_skip_modules=["patch_embed"])
    with pytest.raises(ValueError, match=r"^quantization_config\.llm_int8_skip_modules \['patch_embed'\] leaves "):
        Stage2RefinerModel.from_pretrained(tmp_path / "base", output_loading_info=True, quantization_config=head_too)


def test_a_quantization_config_given_as_a_dict_is_read_as_its_bits_and_bytes_config(tmp_path):
    """transformers takes a dict too (`AutoQuantizationConfig.from_dict`): it bypassed the default skip list (the
    head quantized: a tensor-size error at the first forward) and the check of a list of the caller's own."""
    from modeling_stage2 import Stage2RefinerModel
    from modeling_stage2.adapters import quantization_config_for

    torch.manual_seed(0)
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "base")
    expected = quantized_names(Stage2RefinerModel.from_pretrained(
        tmp_path / "base", quantization_config=quantization_config_for("8bit", tiny_refiner_config())))
    given = {"load_in_8bit": True}
    model = Stage2RefinerModel.from_pretrained(tmp_path / "base", quantization_config=given).eval()
    assert quantized_names(model) == expected and given == {"load_in_8bit": True}  # the caller's dict left as it was
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28), seed=5)
    with torch.no_grad():
        assert model(opt_v1, month, biome).refined.isfinite().all()
    with pytest.raises(ValueError, match=r"^quantization_config\.llm_int8_skip_modules \['patch_embed'\] leaves "):
        Stage2RefinerModel.from_pretrained(tmp_path / "base", quantization_config={
            "quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_skip_modules": ["patch_embed"]})
