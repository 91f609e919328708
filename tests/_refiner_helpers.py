"""Shared helpers of the refiner tests: tiny configs and inputs, and a way to make every trainable weight matter."""
from __future__ import annotations

import pytest
import torch

from modeling_stage2.configuration_prithvi import PrithviConfig
from modeling_stage2.configuration_stage2 import BAND_NAMES, Stage2RefinerConfig


@pytest.fixture(autouse=False)
def single_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine two OpenMP threads spin-wait for each
    other (measured here: one tiny training step 0.1 s on one thread, 4 s on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_backbone_config(**overrides) -> PrithviConfig:
    """The tiny preset (embed 64, 4 heads, patch 14) cut to 2 blocks, with the product's bands."""
    arguments = {"depth": 2, "bands": BAND_NAMES}
    arguments.update(overrides)
    return PrithviConfig.from_preset("prithvi_eo_v2_tiny", **arguments)


def tiny_refiner_config(**overrides) -> Stage2RefinerConfig:
    arguments = {
        "backbone_config": tiny_backbone_config(),
        "head_width": 16,
        "num_convnext_blocks": 2,
        "metadata_embed_dim": 8,
        "drop_path_rate": 0.0,
        "lora_dropout": 0.0,
    }
    arguments.update(overrides)
    return Stage2RefinerConfig(**arguments)


def tiny_inputs(batch: int = 2, size: tuple[int, int] = (120, 120), seed: int = 0):
    """opt_v1 (B, 4, H, W) reflectance in 0..0.5, months and biomes covering the unknown marker."""
    generator = torch.Generator().manual_seed(seed)
    opt_v1 = torch.rand(batch, len(BAND_NAMES), *size, generator=generator) * 0.5
    month = torch.tensor([1, 12, -1, 6][:batch])
    biome = torch.tensor([0, 16, 7, -1][:batch])
    return opt_v1, month, biome


@torch.no_grad()
def wake_up(model, seed: int = 1) -> None:
    """Give the zero-initialised weights (head output, fusion's metadata columns, LoRA B) small random values, so
    that one backward pass reaches every trainable weight. Works on a refiner or a PeftModel of one."""
    generator = torch.Generator().manual_seed(seed)
    bands = len(BAND_NAMES)
    for name, parameter in model.named_parameters():
        if "output_projection.weight" in name or "lora_B" in name:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        elif name.endswith("fusion.weight") or ".fusion.modules_to_save.default.weight" in name:
            parameter[:, bands:] = torch.randn(parameter[:, bands:].shape, generator=generator) * 0.05


def save_woken_adapter(folder, quantization: str = "none"):
    """A tiny adapter, woken up (every trainable weight nonzero), saved to `folder` on a base of `quantization`."""
    from modeling_stage2.adapters import build_trainable_model, save_trained_model

    torch.manual_seed(0)
    model = build_trainable_model(tiny_refiner_config(), quantization=quantization, print_summary=False)
    wake_up(model)
    return save_trained_model(model, folder)


def assert_refused_before_any_base(folder, monkeypatch, error, message: str) -> None:
    """`load_trained_model(folder)` raises `error` matching `message`, on one line, before any base is built."""
    from modeling_stage2 import adapters, load_trained_model

    def no_base(*args, **kwargs):
        raise AssertionError("a base was built")

    monkeypatch.setattr(adapters, "_rebuild_base", no_base)
    with pytest.raises(error, match=message) as raised:
        load_trained_model(folder)
    assert "\n" not in str(raised.value)



class ScaledRefiner(torch.nn.Module):
    """A stand-in for a loaded refiner, known exactly: `refined = gain * opt_v1` (what `evaluate_model` reads: a
    parameter for the device, and `.refined`)."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(float(gain)))

    def forward(self, opt_v1, month, biome):
        from types import SimpleNamespace

        return SimpleNamespace(refined=opt_v1 * self.gain)
