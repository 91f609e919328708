"""Checks found in a review of the model core: configs the refiner cannot run are refused when built, with the fix,
and the encoder's coordinates are checked before the encodings index them."""
from __future__ import annotations

import pytest
import torch

from _refiner_helpers import single_thread  # noqa: F401  (fixture)
from _refiner_helpers import tiny_backbone_config, tiny_refiner_config
from modeling_stage2 import PrithviEncoder, Stage2RefinerConfig, Stage2RefinerModel

pytestmark = pytest.mark.usefixtures("single_thread")


def test_a_backbone_with_a_temporal_patch_is_refused_when_the_config_is_built():
    """The refiner feeds one frame: a backbone with patch_size[0] = 2 used to be accepted and then failed at every
    forward with 'Input (T, H, W) = (1, 28, 28) is smaller than one patch', which blames the input."""
    backbone = tiny_backbone_config(patch_size=(2, 14, 14), num_frames=2)
    with pytest.raises(ValueError, match=r"patch_size\[0\] == 1, got patch_size=\[2, 14, 14\]: .*patch_size=\(1, 14, "
                                         r"14\)"):
        tiny_refiner_config(backbone_config=backbone)
    with pytest.raises(ValueError, match=r"patch_size\[0\] == 1"):
        Stage2RefinerConfig(backbone_config=backbone.to_dict())
    assert tiny_refiner_config(backbone_config=tiny_backbone_config(patch_size=(1, 16, 16))).patch_size == (16, 16)


def test_a_negative_layer_scale_is_refused_not_silently_dropped():
    """A negative `layer_scale_init_value` used to build blocks without layer scale, as 0 does, without a word."""
    with pytest.raises(ValueError, match=r"layer_scale_init_value must be >= 0 \(0 disables layer scale\), got -1e-06"):
        tiny_refiner_config(layer_scale_init_value=-1e-6)
    model = Stage2RefinerModel(tiny_refiner_config(layer_scale_init_value=0.0))
    assert all(block.layer_scale is None for block in model.head.blocks)
    model = Stage2RefinerModel(tiny_refiner_config(layer_scale_init_value=1e-6))
    assert all(torch.equal(block.layer_scale, torch.full_like(block.layer_scale, 1e-6)) for block in model.head.blocks)


@pytest.mark.parametrize(
    ("coords", "message"),
    [
        ({"temporal_coords": torch.tensor([[2020.0, 150.0], [2021.0, 10.0]])},
         r"^temporal_coords must be a tensor of shape \(2, 1, 2\) .*, got shape \(2, 2\)\.$"),
        ({"temporal_coords": torch.zeros(2, 3, 2)}, r"^temporal_coords must be .*, got shape \(2, 3, 2\)\.$"),
        ({"location_coords": torch.zeros(2, 1, 2)},
         r"^location_coords must be a tensor of shape \(2, 2\) .*, got shape \(2, 1, 2\)\.$"),
        ({"location_coords": torch.zeros(3, 2)}, r"^location_coords must be .*, got shape \(3, 2\)\.$"),
        ({"location_coords": [45.0, 7.5]}, r"^location_coords must be .*, got list\.$"),
    ],
)
def test_coordinates_of_the_wrong_shape_give_a_clear_error(coords, message):
    """They used to fail inside the encodings with IndexError / broadcasting errors that name neither argument."""
    model = PrithviEncoder(tiny_backbone_config(coords_encoding=["time", "location"], coords_scale_learn=True)).eval()
    pixel_values = torch.randn(2, 4, 28, 28)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(pixel_values, **coords)


def test_coordinates_of_the_right_shape_still_work_as_integers_too():
    model = PrithviEncoder(tiny_backbone_config(coords_encoding=["time", "location"], coords_scale_learn=True)).eval()
    pixel_values = torch.randn(2, 4, 28, 28)
    temporal, location = torch.tensor([[[2020, 150]], [[2021, 10]]]), torch.tensor([[45, 7], [-3, 120]])
    with torch.no_grad():
        as_ints = model(pixel_values, temporal, location).last_hidden_state
        as_floats = model(pixel_values, temporal.float(), location.float()).last_hidden_state
        multi_frame = model(torch.randn(2, 4, 3, 28, 28), torch.zeros(2, 3, 2), location.float()).last_hidden_state
    assert torch.equal(as_ints, as_floats) and multi_frame.shape == (2, 1 + 3 * 4, 64)
