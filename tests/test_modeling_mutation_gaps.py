"""Tests closing the gaps a mutation audit of modeling_stage2/modeling_stage2.py and modeling_prithvi.py (the forward
passes, initialisation, output fields and input checks) found: each fails under a plausible bug that the rest of the
suite let pass."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from transformers.testing_utils import CaptureLogger

from _refiner_helpers import tiny_backbone_config, tiny_inputs, tiny_refiner_config
from modeling_stage2 import PrithviEncoder, PrithviEncoderOutput, Stage2RefinerModel
from modeling_stage2 import modeling_prithvi
from modeling_stage2.modeling_stage2 import (backbone_weights_location, cyclic_month_encoding, keep_opt_v1_ndvi,
                                             log_spectra, out_of_range_weight, spectral_distance)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------- Prithvi encoder


def test_the_encoder_returns_a_tuple_when_its_config_says_return_dict_false():
    """`return_dict` left out falls back to `config.return_dict`, as every transformers model does."""
    model = PrithviEncoder(tiny_backbone_config(return_dict=False)).eval()
    with torch.no_grad():
        output = model(torch.randn(1, 4, 28, 28))
        assert isinstance(output, tuple) and output[0].shape == (1, 1 + 4, 64)
        assert isinstance(model(torch.randn(1, 4, 28, 28), return_dict=True), PrithviEncoderOutput)


@pytest.mark.parametrize(("size", "warned"), [((28, 30), True), ((30, 28), True), ((28, 28), False)])
def test_a_border_dropped_in_either_direction_is_warned_about(size, warned):
    """Height or width not a multiple of the 14-px patch: the official crop drops pixels, and says so."""
    model = PrithviEncoder(tiny_backbone_config()).eval()
    with CaptureLogger(modeling_prithvi.logger) as captured, torch.no_grad():
        model(torch.randn(1, 4, *size))
    assert ("the border is dropped" in captured.out) == warned
    if warned:
        assert f"(1, {size[0]}, {size[1]})" in captured.out


def test_a_half_precision_encoder_takes_float32_pixels():
    """The input is cast to the weights' dtype: a bfloat16 encoder given float32 pixels computes what it computes on
    the same pixels in bfloat16 (no dtype error from the patch convolution)."""
    model = PrithviEncoder(tiny_backbone_config()).eval().to(torch.bfloat16)
    pixels = torch.randn(1, 4, 28, 28)
    with torch.no_grad():
        from_float32 = model(pixels).last_hidden_state
        from_bfloat16 = model(pixels.to(torch.bfloat16)).last_hidden_state
    assert from_float32.dtype == torch.bfloat16
    assert torch.equal(from_float32, from_bfloat16)


# ---------------------------------------------------------------------------------------------------- refiner


def test_the_month_circle_starts_with_january_at_the_top():
    """The documented points, (sin, cos) of 2 pi (month - 1) / 12: a saved refiner's month embedding was trained on
    these exact values, so a shift of one month (still cyclic) changes its output."""
    points = cyclic_month_encoding(torch.tensor([1, 4, 7, 10, 12]))
    half = 0.5 * 3**0.5
    expected = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [-0.5, half]])
    torch.testing.assert_close(points, expected, atol=1e-6, rtol=0)


def test_a_shared_correction_that_is_not_finite_is_refused_and_leaves_the_old_one():
    model = Stage2RefinerModel(tiny_refiner_config(spectral_correction="shared"))
    branch = model.spectral_correction
    for matrix, bias in ((torch.full((4, 4), float("nan")), torch.zeros(4)), (torch.eye(4), [0, 0, float("inf"), 0])):
        with pytest.raises(ValueError, match="must be finite"):
            branch.set_shared_correction(matrix, bias)
    assert torch.equal(branch.matrix, torch.eye(4)) and torch.equal(branch.bias, torch.zeros(4))


def test_negative_reflectance_enters_the_log_spectrum_as_zero():
    """`log(max(spectra, 0) + offset) - log(0.1)`: a negative value (a generator's undershoot) is clamped, not
    mirrored to the positive reflectance of the same size."""
    spectra = torch.tensor([-0.2, -0.01, 0.0, 0.2])
    expected = torch.log(torch.tensor([0.01, 0.01, 0.01, 0.21])) - math.log(0.1)
    torch.testing.assert_close(log_spectra(spectra, 0.01), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("blocks", "expected"), [
    (3, [(32, 29), (63, 57), (126, 113)]),
    (5, [(9, 9), (16, 15), (32, 29), (63, 57), (126, 113)]),
])
def test_head_stages_round_up_and_are_never_coarser_than_the_patch_grid(blocks, expected):
    """Stage i of n is 1/2^(n-1-i) of the padded size, rounded up; a stride above the 14-px patch is capped at it
    (126 x 113 rows/columns: 9 patches, 8.07 of them)."""
    head = Stage2RefinerModel(tiny_refiner_config(num_convnext_blocks=blocks)).head
    assert head.stage_sizes(126, 113) == expected


def test_the_head_upsamples_bilinearly_without_aligning_corners():
    """The first stage's map, narrowed by the transition, reaches the last stage resized as F.interpolate(bilinear,
    align_corners=False) resizes it (read at the skip merge, where it joins the input stem)."""
    model = Stage2RefinerModel(tiny_refiner_config()).eval()
    seen = {}
    model.head.transitions[0].register_forward_hook(lambda module, args, output: seen.update(narrowed=output))
    model.head.skip_merge.register_forward_pre_hook(lambda module, args: seen.update(merged=args[0]))
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28))
    with torch.no_grad():
        model(opt_v1, month, biome)
        expected = F.interpolate(seen["narrowed"], size=(28, 28), mode="bilinear", align_corners=False)
    width = seen["narrowed"].shape[1]
    assert seen["narrowed"].shape[-2:] == (14, 14)
    torch.testing.assert_close(seen["merged"][:, :width], expected, atol=1e-6, rtol=0)


def test_metadata_embeddings_start_at_the_initializer_range():
    """Normal embeddings of std `initializer_range` (0.02 here; 0.2 below): the cyclic month starts 50x larger."""
    for std in (0.02, 0.2):
        embedding = Stage2RefinerModel(tiny_refiner_config(initializer_range=std)).metadata_embedding
        weights = torch.cat([embedding.month_embedding.weight.flatten(), embedding.biome_embedding.weight.flatten()])
        assert abs(float(weights.detach().std()) / std - 1) < 0.15  # 248 samples: the std's own spread is about 5%


def test_the_head_stem_sees_the_corrected_bands():
    """With a colour correction the head refines what the correction made: its full-resolution stem is given the
    corrected bands, normalised, beside the metadata maps (not `opt_v1`'s)."""
    model = Stage2RefinerModel(tiny_refiner_config(spectral_correction="shared")).eval()
    model.spectral_correction.set_shared_correction(torch.eye(4) * 0.5, [0.01, 0.02, 0.03, 0.04])
    seen = {}
    model.head.input_stem.register_forward_pre_hook(lambda module, args: seen.update(stem=args[0]))
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    with torch.no_grad():
        output = model(opt_v1, month, biome)
        expected = model.normalizer(output.corrected)
    assert not torch.allclose(output.corrected, opt_v1, atol=1e-2)
    torch.testing.assert_close(seen["stem"][:, :4], expected, atol=1e-5, rtol=0)


def test_a_bool_month_or_biome_is_refused_not_read_as_one():
    model = Stage2RefinerModel(tiny_refiner_config()).eval()
    opt_v1, month, biome = tiny_inputs(batch=2, size=(14, 14))
    for arguments in ((True, biome), (month, torch.tensor([True, False]))):
        with pytest.raises(TypeError, match=r"must be an integer tensor \(LongTensor\), got dtype torch\.bool"):
            model(opt_v1, *arguments)


def _blocks_0_and_2_seen_by(module_name: str, argument: int, **config):
    """The output (with hidden states) of a 3-block refiner reading blocks 0 and 2, on 2 tiles of 28 px, and argument
    `argument` of the call to its submodule `module_name`."""
    config = tiny_refiner_config(backbone_config=tiny_backbone_config(depth=3), feature_layers=[0, 2], **config)
    model = Stage2RefinerModel(config).eval()
    seen = {}
    model.get_submodule(module_name).register_forward_pre_hook(lambda module, args: seen.update(value=args[argument]))
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    with torch.no_grad():
        output = model(opt_v1, month, biome, output_hidden_states=True)
    return output, seen["value"]


def test_the_head_is_given_the_configured_blocks_in_order():
    """`feature_layers` are 0-based block indices: the head gets each listed block's output (the last one after the
    final LayerNorm), in the listed order, as `output.hidden_states` holds them."""
    output, features = _blocks_0_and_2_seen_by("head", 0)
    assert len(features) == 2
    for layer, feature in zip([0, 2], features):
        expected = output.hidden_states[layer][:, 1:].reshape(2, 2, 2, 64)
        torch.testing.assert_close(feature, expected, atol=0, rtol=0)


def test_the_per_tile_correction_reads_the_last_selected_block():
    """The per-tile correction's context is the mean over the patch grid of the backbone's last selected features
    (block 2 of 0 and 2 here), not the first."""
    output, features = _blocks_0_and_2_seen_by("spectral_correction", 2, spectral_correction="affine")
    expected = output.hidden_states[2][:, 1:].reshape(2, 2, 2, 64)
    assert not torch.allclose(output.hidden_states[0], output.hidden_states[2], atol=1e-2)
    torch.testing.assert_close(features, expected, atol=0, rtol=0)


def test_backbone_weights_converted_at_another_image_size_load_with_the_refiners_position_table(tmp_path):
    """The fixed sin-cos position table depends on img_size only: weights converted at 42 px load into a 224-px
    refiner, every other weight copied, the refiner keeping its own table (not refused for a shape mismatch)."""
    torch.manual_seed(0)
    source = PrithviEncoder(tiny_backbone_config(img_size=42))
    source.save_pretrained(tmp_path)
    model = Stage2RefinerModel(tiny_refiner_config())
    table = model.backbone.pos_embed.detach().clone()
    assert table.shape != source.pos_embed.shape
    model.load_backbone_weights(tmp_path)
    assert torch.equal(model.backbone.pos_embed, table)
    theirs = source.state_dict()
    mine = {key: value for key, value in model.backbone.state_dict().items() if key != "pos_embed"}
    assert len(mine) == len(theirs) - 1 and all(torch.equal(value, theirs[key]) for key, value in mine.items())


def test_keeping_only_ndvi_follows_a_red_share_above_nine_tenths():
    """Dark water is far redder than it is near-infrared: opt_v1's 95:5 and 100:0 splits are kept as they are, and
    the refined red + NIR sum is kept whole (NIR is the sum less red, whatever the share)."""
    output = torch.tensor([0.1, 0.2, 0.03, 0.01]).view(1, 4, 1, 1).repeat(1, 1, 1, 2)
    opt_v1 = torch.tensor([[0.0, 0.0, 0.0095, 0.0005], [0.0, 0.0, 0.004, 0.0]]).T.reshape(1, 4, 1, 2)
    kept = keep_opt_v1_ndvi(output, opt_v1, torch.ones(1, 1, 1, 2), (2, 3))
    expected = torch.tensor([[0.1, 0.2, 0.038, 0.002], [0.1, 0.2, 0.04, 0.0]]).T.reshape(1, 4, 1, 2)
    torch.testing.assert_close(kept, expected, atol=1e-7, rtol=0)


def test_a_half_precision_model_measures_the_spectral_range_in_float32():
    """`model.to(torch.bfloat16)` rounds the range's buffers, but the distance is still computed in float32 from
    them: the weights are those of the float32 formula on the rounded statistics (bfloat16 arithmetic moves them by
    up to 0.015 here)."""
    model = Stage2RefinerModel(tiny_refiner_config(out_of_range_fallback=True)).eval()
    generator = torch.Generator().manual_seed(0)
    root = torch.randn(4, 4, generator=generator)
    precision, mean = root @ root.T * 20 + torch.eye(4), torch.tensor([0.1, 0.3, -0.2, 1.0])
    spectra = torch.rand(1, 4, 16, 16, generator=generator) * 0.4
    distance = spectral_distance(spectra, mean, precision, model.spectral_range.log_offset)
    model.spectral_range.set_range(mean, precision, float(distance.median()) / 1.2)  # about 70% on the ramp
    spectral_range = model.to(torch.bfloat16).spectral_range
    assert spectral_range.mean.dtype == torch.bfloat16
    with torch.no_grad():
        weight = spectral_range(spectra)
        statistics = (spectral_range.mean.float(), spectral_range.precision.float())
        distance = spectral_distance(spectra, *statistics, spectral_range.log_offset)
    expected = out_of_range_weight(distance, spectral_range.threshold.float(), spectral_range.ramp)[:, None]
    assert 0.4 < float(((expected > 0) & (expected < 1)).float().mean()) < 0.9
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, expected, atol=1e-6, rtol=0)


def test_the_head_is_moved_to_the_cpu_before_its_fallback_run_and_back_after(monkeypatch):
    """On an accelerator the CPU retry must move the head's weights first (its inputs are moved to the CPU; weights
    left on the GPU fail with a device mismatch), then back to the input's device. Here the CPU plays the
    accelerator, so the moves are recorded where they happen."""
    model = Stage2RefinerModel(tiny_refiner_config()).eval()
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28))
    with torch.no_grad():
        expected = model(opt_v1, month, biome).refined
    model.oom_fallback_device_types = ("cpu",)
    events, forward, move = [], model.head.forward, model.head.to

    def failing_first(*args, **kwargs):
        events.append("forward")
        if len(events) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    def recorded_move(*args, **kwargs):
        events.append(f"to {torch.device(*args)}")
        return move(*args, **kwargs)

    monkeypatch.setattr(model.head, "forward", failing_first)
    monkeypatch.setattr(model.head, "to", recorded_move)
    with pytest.warns(RuntimeWarning, match="ran out of memory"), torch.no_grad():
        output = model(opt_v1, month, biome).refined
    assert events == ["forward", "to cpu", "forward", "to cpu"]
    assert torch.equal(output, expected)


@pytest.mark.parametrize(("source", "expected"), [
    ("ibm-nasa-geospatial/Prithvi-EO-2.0-600M-TL", ("ibm-nasa-geospatial/Prithvi-EO-2.0-600M-TL",
                                                     "Prithvi_EO_V2_600M_TL.pt")),
    ("ibm-nasa-geospatial/Prithvi-EO-2.0-300M", ("ibm-nasa-geospatial/Prithvi-EO-2.0-300M", "Prithvi_EO_V2_300M.pt")),
    ("me/prithvi/weights.pt", ("me/prithvi", "weights.pt")),
])
def test_a_hub_repo_id_names_its_official_checkpoint_file(source, expected):
    """OWNER/Prithvi-EO-2.0-600M-TL holds Prithvi_EO_V2_600M_TL.pt: every hyphen after the prefix becomes an
    underscore (a hyphen left in asks the Hub for a file that is not there)."""
    assert backbone_weights_location(source) == ("hub", expected)
