"""Helpers shared by the Prithvi encoder and converter tests."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from modeling_stage2 import PrithviConfig, PrithviEncoder

# (case name, input name, encoder bands) of tiny_reference.safetensors
FIXTURE_CASES = [
    ("enc6@x6_224", "x6_224", None),
    ("enc6@x6_120", "x6_120", None),
    ("enc4@x4_120", "x4_120", ("BLUE", "GREEN", "RED", "NIR_NARROW")),
]
# The fixture model: the tiny preset's patch and width, with 2 blocks.
FIXTURE_OVERRIDES = {"preset": "prithvi_eo_v2_tiny", "depth": 2}


def load_reference(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / "tiny_reference.safetensors"))


def official_layout_state_dict(model: PrithviEncoder) -> dict[str, torch.Tensor]:
    """`model`'s weights in the layout of a released checkpoint: `encoder.*` plus a (dummy) MAE decoder."""
    state = {f"encoder.{key}": value.detach().clone() for key, value in model.state_dict().items()}
    state["decoder.mask_token"] = torch.zeros(1, 1, 8)
    state["decoder.decoder_embed.weight"] = torch.zeros(8, model.config.embed_dim)
    return state


def write_official_checkpoint(path: Path, config: PrithviConfig, seed: int = 0) -> PrithviEncoder:
    """A randomly initialised encoder saved as an official flat MAE state dict; returns the encoder."""
    torch.manual_seed(seed)
    model = PrithviEncoder(config).eval()
    with torch.no_grad():  # make biases and norms non-trivial so that a wrong mapping shows
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    torch.save(official_layout_state_dict(model), path)
    return model
