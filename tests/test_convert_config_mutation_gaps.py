"""Tests closing the gaps a mutation audit of modeling_stage2/convert_prithvi.py (reading official checkpoints, the
architecture and table size read from them, presets, the Hub, the command line) and of the two configuration modules
(configuration_prithvi.py, configuration_stage2.py: defaults, checks, presets, round trips) found: each fails under a
plausible bug that the rest of the suite let pass. A later run of the mutations left over added the saved refiner
config's one transformers version (none in the backbone's part)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers.testing_utils import CaptureLogger

from _prithvi_helpers import official_layout_state_dict, write_official_checkpoint
from _refiner_helpers import tiny_backbone_config, tiny_refiner_config
from modeling_stage2 import PrithviConfig, PrithviEncoder, Stage2RefinerConfig, convert_official_checkpoint
from modeling_stage2 import convert_prithvi
from modeling_stage2.bands import BAND_NAMES
from modeling_stage2.configuration_prithvi import PRITHVI_PRESETS
from modeling_stage2.convert_prithvi import (PrithviCheckpointError, load_official_encoder, load_prithvi_from_hub, main,
                                             official_hub_repo, resolve_checkpoint)
from modeling_stage2.modeling_prithvi import sincos_3d_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S2_BANDS = list(BAND_NAMES)


def one_block(**overrides) -> PrithviConfig:
    """The tiny preset cut to one block: no preset has its shapes, so a conversion needs `num_heads=4`."""
    return PrithviConfig.from_preset("prithvi_eo_v2_tiny", **{"depth": 1, **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, PrithviEncoder]:
    """A one-block checkpoint in the official layout (224 px, one frame, six bands)."""
    path = tmp_path_factory.mktemp("checkpoint") / "Prithvi_EO_V2_one_block.pt"
    return path, write_official_checkpoint(path, one_block())


def assert_same_weights(model: PrithviEncoder, original: PrithviEncoder) -> None:
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def fake_hub(monkeypatch, checkpoint_path: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> list:
    """hf_hub_download replaced by a copy of `checkpoint_path` laid out like the Hub cache; returns its calls."""
    import huggingface_hub

    calls = []

    def download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        calls.append({"repo_id": repo_id, "filename": filename, "revision": revision, "cache_dir": cache_dir})
        root = Path(cache_dir) if cache_dir is not None else checkpoint_path.parent / "hub"
        local = root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit / filename
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(checkpoint_path.read_bytes())
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


# ------------------------------------------------------------------------------------------ reading checkpoints


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda state: state, id="flat"),
    pytest.param(lambda state: {"state_dict": state}, id="state_dict"),
    pytest.param(lambda state: {"model": state}, id="model"),
    pytest.param(lambda state: {"state_dict": {"model": state}}, id="both"),
])
@pytest.mark.parametrize("legacy", [False, True])
def test_wrapped_and_legacy_format_checkpoints_load(checkpoint, tmp_path, wrap, legacy):
    """A state dict under `state_dict` or `model` (as training frameworks save one) is unwrapped, and a file in torch's
    legacy (non-zip) format, which cannot be memory-mapped, is read without mmap."""
    path, original = checkpoint
    state = torch.load(path, weights_only=True)
    torch.save(wrap(state), tmp_path / "wrapped.pt", _use_new_zipfile_serialization=not legacy)
    assert_same_weights(convert_official_checkpoint(tmp_path / "wrapped.pt", num_heads=4), original)


def test_a_file_that_is_not_a_zip_keeps_torchs_reason(tmp_path):
    """Only a zip cut short is named as truncated: any other unreadable file keeps torch's own reason."""
    path = tmp_path / "notes.pt"
    path.write_bytes(b"these are notes, not a checkpoint")
    with pytest.raises(PrithviCheckpointError, match=r"notes\.pt: cannot be read as a weights-only torch checkpoint "
                                                     r"\((?!a zip archive)\w+: ") as error:
        convert_official_checkpoint(path, num_heads=4)
    assert "truncated" not in str(error.value)


def test_an_encoder_only_file_drops_its_decoder_keys(checkpoint, tmp_path):
    """An encoder saved without `encoder.` but with the MAE decoder's `decoder.*` keys: the decoder is dropped as it
    is from a released file, not reported as unexpected encoder keys."""
    path, original = checkpoint
    state = torch.load(path, weights_only=True)
    plain = {key.removeprefix("encoder."): value for key, value in state.items()}
    assert "decoder.mask_token" in plain and "patch_embed.proj.weight" in plain
    torch.save(plain, tmp_path / "plain.pt")
    assert_same_weights(convert_official_checkpoint(tmp_path / "plain.pt", num_heads=4), original)


def test_a_two_dimensional_patch_embedding_is_named(checkpoint, tmp_path):
    path, _ = checkpoint
    state = torch.load(path, weights_only=True)
    state["encoder.patch_embed.proj.weight"] = state["encoder.patch_embed.proj.weight"][:, :, 0]
    torch.save(state, tmp_path / "conv2d.pt")
    with pytest.raises(PrithviCheckpointError, match=r"conv2d\.pt: `encoder\.patch_embed\.proj\.weight` has shape "
                                                     r"\(64, 6, 14, 14\), expected a Conv3d weight"):
        convert_official_checkpoint(tmp_path / "conv2d.pt", num_heads=4)


def test_a_position_table_of_another_width_is_refused_not_recomputed(checkpoint, tmp_path):
    """A 32-wide sin-cos table in a 64-wide encoder is a damaged file: named as a shape mismatch, never replaced by
    a table of the config's width (also when another image size is asked for, where a table of the right width
    would be recomputed)."""
    path, _ = checkpoint
    state = torch.load(path, weights_only=True)
    state["encoder.pos_embed"] = sincos_3d_table(32, (1, 16, 16))
    torch.save(state, tmp_path / "narrow.pt")
    for size, tokens in (({}, 257), ({"img_size": 448, "num_frames": 1}, 1025)):
        with pytest.raises(PrithviCheckpointError, match=rf"shape mismatches: encoder\.pos_embed: checkpoint "
                                                         rf"\(1, 257, 32\) vs model \(1, {tokens}, 64\)"):
            convert_official_checkpoint(tmp_path / "narrow.pt", num_heads=4, **size)


# ------------------------------------------------------------------------------------- architecture and table


def test_a_location_only_checkpoint_keeps_its_location_scale(tmp_path):
    """`location_embed_enc.scale` alone means the location encoding alone (with a learned scale)."""
    original = PrithviEncoder(one_block(coords_encoding=["location"], coords_scale_learn=True))
    with torch.no_grad():
        original.location_embed_enc.scale.fill_(0.25)
    torch.save(official_layout_state_dict(original), tmp_path / "location.pt")
    model = convert_official_checkpoint(tmp_path / "location.pt", num_heads=4)
    assert model.config.coords_encoding == ["location"] and model.config.coords_scale_learn is True
    assert model.location_embed_enc.scale.item() == 0.25 and not hasattr(model, "temporal_embed_enc")


def test_a_two_frame_patch_reads_the_frame_count_in_frames_not_patches(tmp_path):
    """Patches two frames deep: a table of 2 x 16 x 16 patches is 4 frames of 224 px (the patch grid is 2 deep)."""
    config = one_block(patch_size=(2, 14, 14), num_frames=4)
    assert config.grid_size == (2, 16, 16)
    original = write_official_checkpoint(tmp_path / "t2.pt", config)
    model = convert_official_checkpoint(tmp_path / "t2.pt", num_heads=4)
    assert (model.config.num_frames, model.config.patch_size) == (4, [2, 14, 14])
    assert torch.equal(model.pos_embed, original.pos_embed)


@pytest.mark.parametrize("img_size", [(224, 14), (14, 224)])
def test_a_table_one_patch_wide_or_high_is_read(tmp_path, img_size):
    """The grid (1, 16, 1) has a side of all the tokens: it is a factorisation too."""
    write_official_checkpoint(tmp_path / "strip.pt", one_block(img_size=img_size))
    assert convert_official_checkpoint(tmp_path / "strip.pt", num_heads=4).config.image_size == img_size


def test_one_of_image_size_and_frames_given_the_other_is_still_read_from_the_table(tmp_path):
    """Only both given skip reading the table: `num_frames=1` alone keeps the 448 px the table was built for."""
    original = write_official_checkpoint(tmp_path / "448.pt", one_block(img_size=448))
    model = convert_official_checkpoint(tmp_path / "448.pt", num_heads=4, num_frames=1)
    assert model.config.img_size == 448 and torch.equal(model.pos_embed, original.pos_embed)


def test_a_checkpoint_with_a_presets_width_and_depth_but_another_patch_matches_no_preset(tmp_path):
    """64 wide and 4 deep as the tiny preset, with 16-px patches: not the tiny preset (whose patch is 14 px), so the
    number of heads is asked for instead of a shape mismatch."""
    write_official_checkpoint(tmp_path / "p16.pt", one_block(depth=4, patch_size=(1, 16, 16)))
    with pytest.raises(PrithviCheckpointError, match=r"patch \[1, 16, 16\]\) match no preset .*num_heads="):
        convert_official_checkpoint(tmp_path / "p16.pt")
    assert convert_official_checkpoint(tmp_path / "p16.pt", num_heads=4).config.patch_size == [1, 16, 16]


def test_a_given_preset_without_coordinates_drops_a_tl_checkpoints_scales_and_says_so(tmp_path):
    """A preset given by name fixes the encodings (only a matched one takes the checkpoint's): the -TL scales are
    dropped, with a warning naming them."""
    original = PrithviEncoder(PrithviConfig.from_preset("prithvi_eo_v2_tiny", coords_encoding=["time", "location"],
                                                        coords_scale_learn=True))
    torch.save(official_layout_state_dict(original), tmp_path / "tl.pt")
    with CaptureLogger(convert_prithvi.logger) as captured:
        model = convert_official_checkpoint(tmp_path / "tl.pt", preset="prithvi_eo_v2_tiny")
    assert model.config.coords_encoding == [] and not hasattr(model, "temporal_embed_enc")
    assert "dropping `encoder.temporal_embed_enc.scale`: the config has no 'time' encoding" in captured.out
    assert "dropping `encoder.location_embed_enc.scale`: the config has no 'location' encoding" in captured.out


def test_an_unknown_preset_is_named_with_the_choices(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ValueError, match=r"Unknown Prithvi preset 'prithvi_eo_v3'; choose one of \['prithvi_eo_v2_1"):
        convert_official_checkpoint(path, preset="prithvi_eo_v3")


def test_in_chans_alone_takes_the_first_pretrained_bands(checkpoint):
    path, original = checkpoint
    model = convert_official_checkpoint(path, num_heads=4, in_chans=4)
    assert model.config.bands == ["BLUE", "GREEN", "RED", "NIR_NARROW"]
    assert torch.equal(model.patch_embed.proj.weight, original.patch_embed.proj.weight[:, :4])


# ----------------------------------------------------------------------------------------------- released repos


RELEASED_REPOS = {
    "prithvi_eo_v2_600m": "ibm-nasa-geospatial/Prithvi-EO-2.0-600M",
    "prithvi_eo_v2_600m_tl": "ibm-nasa-geospatial/Prithvi-EO-2.0-600M-TL",
    "prithvi_eo_v2_300m": "ibm-nasa-geospatial/Prithvi-EO-2.0-300M",
    "prithvi_eo_v2_300m_tl": "ibm-nasa-geospatial/Prithvi-EO-2.0-300M-TL",
    "prithvi_eo_v2_100m": "ibm-nasa-geospatial/Prithvi-EO-2.0-100M",
    "prithvi_eo_v2_100m_tl": "ibm-nasa-geospatial/Prithvi-EO-2.0-100M-TL",
    "prithvi_eo_v2_tiny": None,
}


@pytest.mark.parametrize(("preset", "repo"), RELEASED_REPOS.items())
def test_every_presets_saved_config_names_its_released_repo(preset, repo):
    """The model card's base model: a -TL backbone is the -TL release, not the plain one of the same size."""
    saved = json.loads(PrithviConfig.from_preset(preset, bands=S2_BANDS).to_json_string())
    assert official_hub_repo(saved) == repo
    assert official_hub_repo({**saved, "coords_encoding": ["location", "time"]}) == (repo and repo.removesuffix("-TL")
                                                                                      + "-TL")


# ---------------------------------------------------------------------------------------- API, Hub and folders


def test_a_foreign_output_folder_is_refused_before_the_checkpoint_is_read(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds other files \(\['notes\.txt'\]\)"):
        convert_official_checkpoint(tmp_path / "not_downloaded_yet.pt", foreign)


def test_a_conversion_is_returned_in_eval_mode(checkpoint):
    path, _ = checkpoint
    assert convert_official_checkpoint(path, num_heads=4).training is False


def test_the_revision_reaches_the_download(checkpoint, monkeypatch):
    path, original = checkpoint
    calls = fake_hub(monkeypatch, path)
    assert_same_weights(load_official_encoder("hf://org/Prithvi/Prithvi.pt", revision="v1", num_heads=4), original)
    assert [(call["repo_id"], call["filename"], call["revision"]) for call in calls] == [("org/Prithvi", "Prithvi.pt",
                                                                                          "v1")]


def test_hub_conversions_are_cached_per_preset_and_override(checkpoint, tmp_path, monkeypatch):
    """The preset reaches the conversion, and every override is part of the cache key: another frame count is
    another folder, never the first conversion's."""
    path, _ = checkpoint
    fake_hub(monkeypatch, path)
    cache = tmp_path / "cache"
    one = load_prithvi_from_hub("org/Prithvi", "Prithvi.pt", cache_dir=cache, preset="prithvi_eo_v2_tiny", depth=1)
    four = load_prithvi_from_hub("org/Prithvi", "Prithvi.pt", cache_dir=cache, preset="prithvi_eo_v2_tiny", depth=1,
                                 num_frames=4)
    assert (one.name, four.name) == ("prithvi_eo_v2_tiny__all-bands__depth-1",
                                     "prithvi_eo_v2_tiny__all-bands__depth-1__num_frames-4")
    assert [PrithviConfig.from_pretrained(folder).num_frames for folder in (one, four)] == [1, 4]


@pytest.mark.parametrize("text", ["hf://org/Prithvi", "hf://org//Prithvi.pt", "hf:///Prithvi/Prithvi.pt"])
def test_a_hub_path_without_owner_repo_and_file_is_refused_before_any_download(text, monkeypatch, tmp_path):
    calls = fake_hub(monkeypatch, tmp_path / "never.pt")
    with pytest.raises(ValueError, match=r"expected hf://OWNER/REPO/FILENAME"):
        resolve_checkpoint(text)
    assert calls == []


# ---------------------------------------------------------------------------------------------- command line


def test_cli_passes_revision_and_cache_dir_to_the_download(checkpoint, tmp_path, monkeypatch, capsys):
    path, original = checkpoint
    calls = fake_hub(monkeypatch, path)
    out = tmp_path / "out"
    status = main(["hf://org/Prithvi/Prithvi.pt", str(out), "--num-heads", "4", "--revision", "v2",
                   "--cache-dir", str(tmp_path / "cache")])
    assert status == 0, capsys.readouterr().err
    assert calls == [{"repo_id": "org/Prithvi", "filename": "Prithvi.pt", "revision": "v2",
                      "cache_dir": str(tmp_path / "cache")}]
    assert capsys.readouterr().out.startswith(f"Wrote {out}: Prithvi encoder embed_dim 64, depth 1, patch (1, 14, 14), "
                                              "bands BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2, ")
    assert_same_weights(PrithviEncoder.from_pretrained(out), original)


def test_cli_refuses_an_unknown_band_before_downloading(tmp_path, monkeypatch, capsys):
    calls = fake_hub(monkeypatch, tmp_path / "never.pt")
    assert main(["hf://org/Prithvi/Prithvi.pt", str(tmp_path / "out"), "--bands", "B02", "B99"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("stage2-convert-prithvi: error: Unknown band name 'B99'") and calls == []


def test_cli_refuses_an_output_that_is_a_file(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    (tmp_path / "out").write_text("a file")
    assert main([str(path), str(tmp_path / "out"), "--num-heads", "4"]) == 2
    assert capsys.readouterr().err == f"stage2-convert-prithvi: error: {tmp_path / 'out'} exists and is not a folder.\n"


def test_cli_takes_a_height_and_a_width(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "out"
    assert main([str(path), str(out), "--num-heads", "4", "--img-size", "224", "112", "--num-frames", "1"]) == 0
    config = PrithviConfig.from_pretrained(out)
    assert (config.img_size, config.grid_size) == ([224, 112], (1, 16, 8))


# ------------------------------------------------------------------------------------------- PrithviConfig


@pytest.mark.parametrize(("overrides", "message"), [
    ({"bands": "B02"}, r"^bands must be a sequence of band names, got the string 'B02'$"),
    ({"bands": []}, r"^bands is empty"),
    ({"coords_encoding": "time"}, r"got 'time'; for one encoding write \['time'\]\.$"),
    ({"band_std": [0.0] * 6}, r"^band_std must be a finite positive number, got 0\.0\."),
    ({"band_mean": [float("nan")] + [1.0] * 5}, r"^band_mean must hold finite numbers"),
    ({"coords_encoding": ["time"], "patch_size": (2, 14, 14)}, r"^The temporal encoding needs patch_size\[0\] == 1"),
    ({"img_size": 10}, r"^img_size 10 / num_frames 1 is smaller than one patch \[1, 14, 14\]\.$"),
    ({"depth": 2.5}, r"^depth must be a positive integer, got 2\.5\.$"),
    ({"depth": True}, r"^depth must be a positive integer, got True\.$"),
    ({"coords_scale_learn": "false"}, r"^coords_scale_learn must be True or False, got 'false'\.$"),
    ({"initializer_range": -0.1}, r"^initializer_range must be a finite non-negative number, got -0\.1\.$"),
    ({"drop_path": 0.1}, r"^drop_path \(stochastic depth\) is not supported"),
])
def test_prithvi_config_refuses_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        one_block(**overrides)


def test_prithvi_config_normalises_sizes_and_accepts_what_it_documents():
    assert one_block(img_size=(224, 224)).img_size == 224 and one_block(img_size=(224, 112)).img_size == [224, 112]
    assert one_block(patch_size=16).patch_size == [1, 16, 16]
    assert one_block(initializer_range=0).initializer_range == 0.0 and one_block(drop_path=0).depth == 1
    assert one_block(bands=["b02", "nir_narrow"]).pretrained_band_names == ("BLUE", "NIR_NARROW")
    config = one_block()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 1, 4)


def test_the_official_mae_arguments_are_dropped_not_kept(tmp_path):
    official = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16, "mask_ratio": 0.75,
                "norm_pix_loss": True}
    saved = one_block(**official).to_dict()
    assert not set(official) & set(saved)


def test_from_preset_leaves_the_presets_as_they_were():
    before = json.dumps(PRITHVI_PRESETS, sort_keys=True, default=list)
    PrithviConfig.from_preset("prithvi_eo_v2_tiny", depth=1, bands=S2_BANDS, num_frames=2)
    PrithviConfig.from_preset("prithvi_eo_v2_tiny", in_chans=2)
    assert json.dumps(PRITHVI_PRESETS, sort_keys=True, default=list) == before
    assert PrithviConfig.from_preset("prithvi_eo_v2_tiny").depth == 4


@pytest.mark.parametrize(("preset", "expected"), [
    ("prithvi_eo_v2_600m", (1280, 32, 16, [1, 14, 14])), ("prithvi_eo_v2_300m", (1024, 24, 16, [1, 16, 16])),
    ("prithvi_eo_v2_100m", (768, 12, 12, [1, 16, 16])), ("prithvi_eo_v2_tiny", (64, 4, 4, [1, 14, 14])),
])
def test_presets_are_the_released_architectures(preset, expected):
    """The released sizes (the fixtures' README); their -TL variants add learned time and location scales."""
    for name in (preset, f"{preset}_tl") if preset != "prithvi_eo_v2_tiny" else (preset,):
        config = PrithviConfig.from_preset(name)
        assert (config.embed_dim, config.depth, config.num_heads, config.patch_size) == expected
        assert (config.img_size, config.num_frames, config.mlp_ratio) == (224, 1 if "tiny" in name else 4, 4.0)
        assert (config.coords_encoding, config.coords_scale_learn) == ((["time", "location"], True) if "_tl" in name
                                                                       else ([], False))


def test_a_saved_false_output_hidden_states_loads_back_false(tmp_path):
    """This config's default is True: without the key written, a saved False came back True."""
    one_block(output_hidden_states=False).save_pretrained(tmp_path)
    assert PrithviConfig.from_pretrained(tmp_path).output_hidden_states is False
    assert one_block().output_hidden_states is True


@pytest.mark.parametrize(("field", "value", "message"), [
    ("depth", 0, "depth must be a positive integer, got 0"),
    ("band_mean", [1.0], "band_mean has 1 values for the 6 bands"),
])
def test_a_prithvi_field_set_after_construction_is_checked_before_it_is_saved(tmp_path, field, value, message):
    config = one_block()
    setattr(config, field, value)
    with pytest.raises(Exception, match=message):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


# ------------------------------------------------------------------------------------------ Stage2RefinerConfig


def test_a_config_saved_before_the_options_existed_loads_with_the_old_behaviour(tmp_path):
    """A config.json without the later options (the spectral parts, the clamp, the fallbacks): each takes the default
    that computes as models saved before it did; the other defaults are those documented."""
    config = tiny_refiner_config()
    saved = config.to_dict()
    later = ("spectral_correction", "spectral_correction_hidden_size", "spectral_mlp_hidden_size",
             "spectral_mlp_num_layers", "spectral_mlp_log_offset", "nonnegative_output", "out_of_range_fallback",
             "out_of_range_ramp", "near_black_fallback", "near_black_threshold", "near_black_ramp", "near_black_keep",
             "padding_mode", "metadata_channels", "layer_scale_init_value", "drop_path_rate", "lora_dropout")
    for name in later:
        saved.pop(name)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = Stage2RefinerConfig.from_pretrained(tmp_path)
    assert {name: getattr(loaded, name) for name in later} == {
        "spectral_correction": "none", "spectral_correction_hidden_size": 64, "spectral_mlp_hidden_size": 0,
        "spectral_mlp_num_layers": 2, "spectral_mlp_log_offset": 0.05, "nonnegative_output": False,
        "out_of_range_fallback": False, "out_of_range_ramp": 2.0, "near_black_fallback": False,
        "near_black_threshold": 0.02, "near_black_ramp": 2.0, "near_black_keep": "pixel", "padding_mode": "reflect",
        "metadata_channels": 4, "layer_scale_init_value": 1e-6, "drop_path_rate": 0.1, "lora_dropout": 0.1}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"feature_layers": 1}, r"^feature_layers must be a non-empty list of block indices, got 1\.$"),
    ({"layer_scale_init_value": -1e-6}, r"^layer_scale_init_value must be >= 0"),
    ({"layer_scale_init_value": True}, r"^layer_scale_init_value must be a number, got True\.$"),
    ({"lora_target_modules": []}, r"^lora_target_modules must be a non-empty subset"),
    ({"lora_r": "8"}, r"^lora_r must be a positive integer, got '8'\.$"),
    ({"lora_dropout": -0.1}, r"^lora_dropout must be in \[0, 1\), got -0\.1\.$"),
    ({"lora_dropout": 1.5}, r"^lora_dropout must be in \[0, 1\), got 1\.5\.$"),
    ({"spectral_correction_hidden_size": 0}, r"^spectral_correction_hidden_size must be a positive integer"),
    ({"spectral_mlp_num_layers": 0}, r"^spectral_mlp_num_layers must be a positive integer"),
    ({"spectral_mlp_log_offset": 0.0}, r"^spectral_mlp_log_offset must be > 0"),
    ({"out_of_range_fallback": "yes"}, r"^out_of_range_fallback must be True or False, got 'yes'\.$"),
    ({"out_of_range_ramp": 1.0}, r"^out_of_range_ramp must be > 1"),
    ({"near_black_fallback": 1}, r"^near_black_fallback must be True or False, got 1\.$"),
    ({"near_black_threshold": 0.0}, r"^near_black_threshold must be > 0"),
    ({"near_black_ramp": 1.0}, r"^near_black_ramp must be > 1"),
    ({"near_black_keep": "NDVI"}, r"^near_black_keep must be one of \('pixel', 'ndvi'\), got 'NDVI'"),
    ({"backbone_config": one_block(patch_size=(2, 14, 14), num_frames=2, bands=S2_BANDS)},
     r"^The refiner works on single-frame input, so its backbone needs patch_size\[0\] == 1"),
])
def test_refiner_config_refuses_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_refiner_config(**overrides)


def test_refiner_config_normalises_what_it_documents():
    """Default feature layers of a shallow backbone are its blocks, each once; LoRA targets are put in their order,
    one name alone is a list of one; without the fallback, bands need not hold red and NIR."""
    for depth, layers in ((1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (6, [0, 2, 3, 5])):
        assert tiny_refiner_config(backbone_config=tiny_backbone_config(depth=depth)).feature_layers == layers
    assert tiny_refiner_config(lora_target_modules=["fc2", "qkv"]).lora_target_modules == ["qkv", "fc2"]
    assert tiny_refiner_config(lora_target_modules="proj").lora_target_modules == ["proj"]
    no_nir = tiny_refiner_config(bands=["B02", "B03", "B04"], backbone_config=tiny_backbone_config(bands=["B02", "B03",
                                                                                                          "B04"]))
    assert no_nir.near_black_fallback is False


def test_record_lora_sets_each_setting_checked():
    config = tiny_refiner_config()
    config.record_lora(r=4, alpha=32, dropout=0.05, target_modules=["fc1", "qkv"], last_n_blocks=1)
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
            config.unfreeze_last_n_blocks, config.lora_blocks) == (4, 32, 0.05, ["qkv", "fc1"], 1, [1])
    with pytest.raises(ValueError, match="unfreeze_last_n_blocks=3 exceeds the backbone depth 2"):
        config.record_lora(last_n_blocks=3)


def test_the_refiners_attention_implementation_reaches_its_backbone():
    config = tiny_refiner_config(attn_implementation="eager")
    assert config.backbone_config._attn_implementation == "eager"


def test_a_saved_refiner_config_names_the_transformers_version_once(tmp_path):
    """As transformers' composite configs: the version at the top of config.json, not again in the backbone's."""
    tiny_refiner_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "transformers_version" in saved and "transformers_version" not in saved["backbone_config"]
