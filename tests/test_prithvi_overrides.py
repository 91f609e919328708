"""`from_pretrained` overrides of a saved Prithvi encoder: transformers' names of its fields (`attribute_map`) go
through the same checks as the fields' own names, and other bands than the saved ones are refused (their statistics
and patch-embedding weights are per channel)."""
from __future__ import annotations

import pytest
import torch

from modeling_stage2 import PrithviConfig, PrithviEncoder

BANDS = ("B02", "B03", "B04", "B08")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("prithvi")
    PrithviEncoder(PrithviConfig.from_preset("prithvi_eo_v2_tiny", bands=BANDS, depth=2)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("alias, field, value, message", [
    ("hidden_size", "embed_dim", 30, r"^embed_dim \(30\) must be a multiple of num_heads \(4\)"),
    ("num_attention_heads", "num_heads", 3, r"^embed_dim \(64\) must be a multiple of num_heads \(3\)"),
    ("num_hidden_layers", "depth", 0, r"^depth must be a positive integer, got 0\."),
])
def test_an_override_by_transformers_name_is_checked_as_the_field(saved, alias, field, value, message):
    """They were set with `setattr` past every check: `hidden_size=30` loaded a config the encoder then failed on
    (`shape '[-1, 30]' is invalid`), `num_hidden_layers=0` an encoder whose forward raised an IndexError."""
    for load in (PrithviConfig.from_pretrained, PrithviEncoder.from_pretrained):
        with pytest.raises(ValueError, match=message):
            load(saved, **{alias: value})
        with pytest.raises(ValueError, match=message):
            load(saved, **{field: value})
    trimmed = PrithviEncoder.from_pretrained(saved, num_hidden_layers=1)  # a valid one still applies
    assert trimmed.config.depth == len(trimmed.blocks) == 1


@pytest.mark.parametrize("bands", [("B04", "B03", "B02", "B08"), ("B02", "B03", "B04", "B11")])
def test_other_bands_than_the_saved_ones_are_refused(saved, bands):
    """Reordered, the encoder loaded with B02's statistics and weights on its B04 channel (features 3.9 apart from
    the same image's in the saved order); B11 took B08's."""
    message = (rf"^bands={bands!r}".replace("(", r"\(").replace(")", r"\)")
               + r" differs from the bands this config was saved with \(B02, B03, B04, B08\)")
    for load in (PrithviConfig.from_pretrained, PrithviEncoder.from_pretrained):
        with pytest.raises(ValueError, match=message):
            load(saved, bands=bands)


def test_the_saved_bands_by_another_name_load_as_saved(saved):
    same = PrithviEncoder.from_pretrained(saved, bands=("BLUE", "GREEN", "RED", "NIR_NARROW"))
    assert same.config.band_mean == PrithviConfig.from_pretrained(saved).band_mean
    assert PrithviConfig.from_pretrained(saved, bands=list(BANDS)).bands == list(BANDS)
    with pytest.raises(ValueError, match="B99"):  # an unknown name: `__init__`'s own message
        PrithviConfig.from_pretrained(saved, bands=("B02", "B03", "B04", "B99"))


def test_the_apply_idiom_initialises_the_refiner_whole():
    """`model.apply(model._init_weights)` (the pre-v5 idiom) left the backbone's CLS token, patch embedding and
    position table as they were, and gave its linears the head's truncated normal (std 0.02) instead of the encoder's
    xavier: the encoder is now initialised by its own `_init_weights` there too. transformers' own path
    (`initialize_weights`, used by every constructor) is unchanged: the seeded model below is what it built."""
    from _refiner_helpers import tiny_refiner_config

    from modeling_stage2 import Stage2RefinerModel

    torch.manual_seed(0)
    model = Stage2RefinerModel(tiny_refiner_config())
    built = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    model.apply(model._init_weights)
    state = model.state_dict()
    assert [name for name, tensor in state.items() if tensor.is_floating_point() and tensor.isnan().any()] == []
    qkv = state["backbone.blocks.0.attn.qkv.weight"]
    xavier = (2.0 / sum(qkv.shape)) ** 0.5
    assert abs(qkv.std().item() / xavier - 1) < 0.1 and abs(built["backbone.blocks.0.attn.qkv.weight"].std().item()
                                                           / xavier - 1) < 0.1
    assert torch.equal(state["backbone.pos_embed"], built["backbone.pos_embed"])
    constants = [name for name, tensor in built.items() if tensor.numel() and (tensor == tensor.flatten()[0]).all()]
    assert constants and all(torch.equal(state[name], built[name]) for name in constants)  # zeros, ones, scales
