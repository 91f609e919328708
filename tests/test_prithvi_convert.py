"""Official checkpoints -> PrithviEncoder: band slicing, checks, save_pretrained folders, CLI, Hub cache."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _prithvi_helpers import FIXTURE_OVERRIDES, load_reference, official_layout_state_dict, write_official_checkpoint

import modeling_stage2
from modeling_stage2 import (
    PrithviConfig,
    PrithviEncoder,
    convert_official_checkpoint,
    load_official_encoder,
    load_prithvi_from_hub,
)
from modeling_stage2.convert_prithvi import PrithviCheckpointError, infer_table_size, main
from modeling_stage2.modeling_prithvi import sincos_3d_table

S2_BANDS = ["B02", "B03", "B04", "B08"]


@pytest.fixture(scope="module")
def fixture_checkpoint(prithvi_fixtures_dir) -> Path:
    return prithvi_fixtures_dir / "tiny_checkpoint.pt"


@pytest.fixture()
def tiny_checkpoint(tmp_path) -> tuple[Path, PrithviEncoder]:
    """A checkpoint in the official layout with exactly the tiny preset's shapes."""
    path = tmp_path / "Prithvi_EO_V2_tiny.pt"
    return path, write_official_checkpoint(path, PrithviConfig.from_preset("prithvi_eo_v2_tiny"))


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


# ------------------------------------------------------------------------------------------- bands


def test_band_slicing_by_name_matches_the_official_four_band_encoder(fixture_checkpoint, prithvi_fixtures_dir):
    reference = load_reference(prithvi_fixtures_dir)
    for bands in (S2_BANDS, ["BLUE", "GREEN", "RED", "NIR_NARROW"]):
        model = convert_official_checkpoint(fixture_checkpoint, bands=bands, **FIXTURE_OVERRIDES)
        assert model.config.bands == bands and model.config.in_chans == 4
        state = model.state_dict()
        assert len(state) == sum(key.startswith("encoder4_state_dict.") for key in reference)
        for key, value in state.items():
            assert torch.equal(value, reference[f"encoder4_state_dict.{key}"]), key


def test_band_order_and_subsets_follow_the_names(fixture_checkpoint):
    full = torch.load(fixture_checkpoint, weights_only=True)["encoder.patch_embed.proj.weight"]
    model = convert_official_checkpoint(fixture_checkpoint, bands=["B12", "B04", "B8A"], **FIXTURE_OVERRIDES)
    torch.testing.assert_close(model.patch_embed.proj.weight, full[:, [5, 2, 3]], rtol=0, atol=0)
    assert model.config.band_mean == [1363.0, 1433.0, 2734.0]


def test_unknown_band_is_refused_and_nothing_is_written(fixture_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="Unknown band name 'VV'"):
        convert_official_checkpoint(fixture_checkpoint, tmp_path / "out", bands=["B02", "VV"], **FIXTURE_OVERRIDES)
    assert list(tmp_path.iterdir()) == []


def test_band_missing_from_a_smaller_checkpoint_is_refused(tmp_path):
    path = tmp_path / "four_band.pt"
    write_official_checkpoint(path, PrithviConfig.from_preset("prithvi_eo_v2_tiny", in_chans=4))
    with pytest.raises(PrithviCheckpointError, match=r"band 'B11' \(SWIR_1\) is not among the checkpoint's"):
        convert_official_checkpoint(path, bands=["B02", "B11"])
    assert convert_official_checkpoint(path).config.bands == ["BLUE", "GREEN", "RED", "NIR_NARROW"]


# ------------------------------------------------------------------------------------ architecture


def test_preset_is_inferred_from_shapes(tiny_checkpoint):
    path, original = tiny_checkpoint
    model = convert_official_checkpoint(path)
    assert (model.config.depth, model.config.num_heads, model.config.num_frames) == (4, 4, 1)
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(1, 6, 126, 126)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, original(x).last_hidden_state)


def test_unmatched_shapes_need_the_number_of_heads(fixture_checkpoint):
    with pytest.raises(PrithviCheckpointError, match="num_heads"):
        convert_official_checkpoint(fixture_checkpoint)
    model = load_official_encoder(fixture_checkpoint, num_heads=4)
    assert (model.config.embed_dim, model.config.depth, model.config.patch_size) == (64, 2, [1, 14, 14])
    assert not model.training


def test_official_config_dict_loads_the_checkpoint(fixture_checkpoint, prithvi_fixtures_dir):
    official = json.loads((prithvi_fixtures_dir / "tiny_reference.json").read_text())["config"]
    model = load_official_encoder(fixture_checkpoint, **official)
    assert model.config.in_chans == 6 and model.config.depth == 2
    assert not model.training


def test_tl_checkpoint_keeps_its_learned_scales(tmp_path):
    config = PrithviConfig.from_preset(
        "prithvi_eo_v2_tiny", coords_encoding=["time", "location"], coords_scale_learn=True
    )
    path = tmp_path / "tl.pt"
    original = PrithviEncoder(config)
    with torch.no_grad():
        original.temporal_embed_enc.scale.fill_(0.37)
        original.location_embed_enc.scale.fill_(-0.05)
    torch.save(official_layout_state_dict(original), path)
    model = convert_official_checkpoint(path)
    assert model.config.coords_encoding == ["time", "location"] and model.config.coords_scale_learn
    assert model.temporal_embed_enc.scale.item() == pytest.approx(0.37)
    assert model.location_embed_enc.scale.item() == pytest.approx(-0.05)
    plain = convert_official_checkpoint(path, coords_encoding=[])  # a TL checkpoint used without coordinates
    assert not hasattr(plain, "temporal_embed_enc")


def test_bfloat16_checkpoint_with_another_mlp_ratio_loads_as_float32(tmp_path):
    """The MLP width is read from `fc1`'s shape (no preset has 2.0) and every weight comes out float32."""
    original = PrithviEncoder(PrithviConfig.from_preset("prithvi_eo_v2_tiny", depth=1, mlp_ratio=2.0)).eval()
    state = {key: value if key.endswith("pos_embed") else value.to(torch.bfloat16)
             for key, value in official_layout_state_dict(original).items()}
    torch.save(state, tmp_path / "bf16.pt")
    model = convert_official_checkpoint(tmp_path / "bf16.pt", num_heads=4)
    assert model.config.mlp_ratio == 2.0 and model.blocks[0].mlp.fc1.out_features == 128
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, state[f"encoder.{key}"].float()), key
    with torch.no_grad():
        assert model(torch.randn(1, 6, 56, 56)).last_hidden_state.dtype == torch.float32


def test_other_frame_count_recomputes_the_fixed_table(fixture_checkpoint):
    one = load_official_encoder(fixture_checkpoint, num_heads=4)
    four = load_official_encoder(fixture_checkpoint, num_heads=4, num_frames=4)
    assert four.pos_embed.shape == (1, 1 + 4 * 256, 64)
    torch.testing.assert_close(four.pos_embed[:, : 1 + 256], one.pos_embed, rtol=0, atol=1e-7)
    x = torch.randn(1, 6, 126, 126)
    with torch.no_grad():
        torch.testing.assert_close(four(x).last_hidden_state, one(x).last_hidden_state, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "img_size, num_frames", [(448, 1), ((224, 112), 1), ((224, 112), 4), ((112, 224), 2)]
)
def test_image_size_and_frames_are_read_from_the_position_table(tmp_path, img_size, num_frames):
    """A 448-px one-frame table has as many tokens as a 224-px four-frame one: only its values tell them apart."""
    config = PrithviConfig.from_preset("prithvi_eo_v2_tiny", depth=1, img_size=img_size, num_frames=num_frames)
    original = write_official_checkpoint(tmp_path / "ck.pt", config)
    x = torch.randn(1, 6, num_frames, *config.image_size)
    for preset in (None, "prithvi_eo_v2_tiny"):  # a given preset fixes the architecture, not the table's size
        model = convert_official_checkpoint(tmp_path / "ck.pt", preset=preset, depth=1, num_heads=4)
        assert (model.config.img_size, model.config.num_frames) == (config.img_size, num_frames)
        assert torch.equal(model.pos_embed, original.pos_embed)
        with torch.no_grad():
            assert torch.equal(model(x).last_hidden_state, original(x).last_hidden_state)


@pytest.mark.parametrize("embed_dim, patch, grid", [(1280, 14, (4, 16, 16)), (1024, 16, (4, 14, 14))])
def test_released_tables_read_as_224_px_and_4_frames(embed_dim, patch, grid):
    """The 600M / 300M position tables; also when computed in float32 (off by up to 2e-6 from float64's)."""
    table = sincos_3d_table(embed_dim, grid)
    for stored in (table, table + 2e-6 * torch.sign(torch.randn_like(table))):
        assert infer_table_size({"pos_embed": stored}, [1, patch, patch]) == {"img_size": [224, 224], "num_frames": 4}


def test_a_table_that_fits_no_grid_needs_the_size_explicitly(fixture_checkpoint, tmp_path, capsys):
    path = _save_modified(
        fixture_checkpoint, tmp_path / "learned.pt", lambda state: state["encoder.pos_embed"].add_(0.01)
    )
    with pytest.raises(PrithviCheckpointError, match=r"learned.pt: the position table `encoder.pos_embed` "
                       r"\(1, 257, 64\) is not the sin-cos table of any grid.*img_size= and num_frames="):
        convert_official_checkpoint(path, num_heads=4)
    model = convert_official_checkpoint(path, num_heads=4, img_size=224, num_frames=1)  # the table is recomputed
    assert torch.equal(model.pos_embed, sincos_3d_table(64, (1, 16, 16)))
    status = main([str(path), str(tmp_path / "out"), "--num-heads", "4"])
    assert status == 2 and "--img-size, --num-frames" in capsys.readouterr().err
    assert main([str(path), str(tmp_path / "out"), "--num-heads", "4", "--img-size", "224", "--num-frames", "1"]) == 0
    assert PrithviConfig.from_pretrained(tmp_path / "out").grid_size == (1, 16, 16)


def test_a_table_that_fits_several_grids_is_refused(fixture_checkpoint, monkeypatch):
    monkeypatch.setattr(modeling_stage2.convert_prithvi, "_TABLE_ATOL", 10.0)  # every grid of 256 tokens fits
    with pytest.raises(PrithviCheckpointError, match=r"fits several .* \(\(224, 224\), 1\).*img_size="):
        convert_official_checkpoint(fixture_checkpoint, num_heads=4)


# ---------------------------------------------------------------------------------- bad checkpoints


def _save_modified(source: Path, target: Path, edit) -> Path:
    state = torch.load(source, weights_only=True)
    edit(state)
    torch.save(state, target)
    return target


def test_missing_key_is_named(fixture_checkpoint, tmp_path):
    path = _save_modified(
        fixture_checkpoint, tmp_path / "missing.pt", lambda state: state.pop("encoder.blocks.1.mlp.fc2.weight")
    )
    with pytest.raises(PrithviCheckpointError, match=r"missing keys \['encoder.blocks.1.mlp.fc2.weight'\]") as error:
        convert_official_checkpoint(path, tmp_path / "out", **FIXTURE_OVERRIDES)
    assert "missing.pt" in str(error.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_wrong_shape_is_named(fixture_checkpoint, tmp_path):
    def edit(state):
        state["encoder.blocks.0.attn.qkv.weight"] = torch.zeros(96, 64)

    path = _save_modified(fixture_checkpoint, tmp_path / "shape.pt", edit)
    expected = r"encoder.blocks.0.attn.qkv.weight: checkpoint \(96, 64\) vs model \(192, 64\)"
    with pytest.raises(PrithviCheckpointError, match=expected):
        convert_official_checkpoint(path, **FIXTURE_OVERRIDES)


def test_wrong_preset_is_refused(fixture_checkpoint):
    with pytest.raises(PrithviCheckpointError, match="shape mismatches"):
        convert_official_checkpoint(fixture_checkpoint, preset="prithvi_eo_v2_100m")


def test_unexpected_encoder_key_is_named(fixture_checkpoint, tmp_path):
    path = _save_modified(
        fixture_checkpoint, tmp_path / "extra.pt", lambda state: state.update({"encoder.head.weight": torch.zeros(2)})
    )
    with pytest.raises(PrithviCheckpointError, match=r"unexpected keys \['encoder.head.weight'\]"):
        convert_official_checkpoint(path, **FIXTURE_OVERRIDES)


class _Payload:  # not a tensor: weights_only loading must refuse to unpickle it
    pass


@pytest.mark.parametrize(
    "content, message",
    [
        ({"encoder.cls_token": _Payload()}, "weights-only"),
        (b"not a checkpoint at all", "weights-only"),
        ({"decoder.mask_token": torch.zeros(1)}, "no `encoder.*` keys"),
        ([torch.zeros(1)], "flat dict of tensors"),
    ],
)
def test_unreadable_checkpoints_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(PrithviCheckpointError, match=re.escape(message)) as error:
        convert_official_checkpoint(path, **FIXTURE_OVERRIDES)
    assert "bad.pt" in str(error.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda state: state.update({"encoder.blocks.0.attn.qkv.weight": torch.ones(192, 64, dtype=torch.int64)}),
         "bad.pt: `encoder.blocks.0.attn.qkv.weight` is a torch.int64 tensor; the encoder's weights are floating"),
        (lambda state: state.update({0: torch.zeros(1)}), "bad.pt: key 0 (int) is not a parameter name"),
        (lambda state: state.update({"meta": {"epoch": 3}}), "bad.pt: entry `meta` is a dict, not a tensor"),
        (lambda state: state.update({"head.weight": torch.zeros(2)}), "bad.pt: key `head.weight` is neither an"),
        (lambda state: state.update({"encoder_ema.cls_token": torch.zeros(1, 1, 64)}),
         "bad.pt: key `encoder_ema.cls_token` is neither an encoder (`encoder.*`) nor a decoder (`decoder.*`)"),
    ],
)
def test_malformed_entries_are_named_in_one_line(fixture_checkpoint, tmp_path, capsys, edit, message):
    path = _save_modified(fixture_checkpoint, tmp_path / "bad.pt", edit)
    with pytest.raises(PrithviCheckpointError, match=re.escape(message)):
        convert_official_checkpoint(path, num_heads=4)
    status = main([str(path), str(tmp_path / "out"), "--num-heads", "4"])
    error = capsys.readouterr().err
    assert status == 2 and message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_encoder_only_files_name_their_keys_as_stored(fixture_checkpoint, tmp_path):
    """A state dict of the encoder alone, without `encoder.`: its keys are named without the prefix."""
    state = torch.load(fixture_checkpoint, weights_only=True)
    encoder = {key.removeprefix("encoder."): value for key, value in state.items() if key.startswith("encoder.")}
    torch.save(encoder, tmp_path / "plain.pt")
    model = convert_official_checkpoint(tmp_path / "plain.pt", num_heads=4)
    assert all(torch.equal(value, encoder[key]) for key, value in model.state_dict().items())
    for stray in ("head.weight", "decoder_pred.weight"):  # `decoder.*` only is the MAE decoder
        torch.save({**encoder, stray: torch.zeros(2)}, tmp_path / "stray.pt")
        with pytest.raises(PrithviCheckpointError, match=rf"unexpected keys \['{stray}'\]"):
            convert_official_checkpoint(tmp_path / "stray.pt", num_heads=4)
    torch.save({key: value for key, value in encoder.items() if key != "norm.bias"}, tmp_path / "short.pt")
    with pytest.raises(PrithviCheckpointError, match=r"missing keys \['norm.bias'\]"):
        convert_official_checkpoint(tmp_path / "short.pt", num_heads=4)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_official_encoder(tmp_path / "nowhere.pt")


# --------------------------------------------------------------------------------------- folders


def test_converted_folder_round_trip_is_exact(fixture_checkpoint, tmp_path):
    out = tmp_path / "converted"
    model = convert_official_checkpoint(fixture_checkpoint, out, bands=S2_BANDS, **FIXTURE_OVERRIDES)
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "prithvi_eo_v2"
    loaded = PrithviEncoder.from_pretrained(out)
    assert loaded.config.bands == S2_BANDS
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 4, 126, 126)
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)
    assert leftovers(tmp_path) == []


def test_earlier_conversion_is_replaced_but_other_folders_are_refused(fixture_checkpoint, tmp_path):
    out = tmp_path / "converted"
    convert_official_checkpoint(fixture_checkpoint, out, **FIXTURE_OVERRIDES)
    convert_official_checkpoint(fixture_checkpoint, out, bands=S2_BANDS, **FIXTURE_OVERRIDES)
    assert PrithviConfig.from_pretrained(out).bands == S2_BANDS
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        convert_official_checkpoint(fixture_checkpoint, out, **FIXTURE_OVERRIDES)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- CLI


def test_cli_round_trip(tiny_checkpoint, tmp_path, capsys):
    path, original = tiny_checkpoint
    out = tmp_path / "cli_out"
    assert main([str(path), str(out), "--preset", "prithvi_eo_v2_tiny", "--bands", *S2_BANDS]) == 0
    assert "B02, B03, B04, B08" in capsys.readouterr().out
    loaded = PrithviEncoder.from_pretrained(out)
    expected_weight = original.patch_embed.proj.weight[:, :4]
    assert torch.equal(loaded.patch_embed.proj.weight, expected_weight)
    assert loaded.config.bands == S2_BANDS and loaded.config.depth == 4


def test_cli_reads_the_fixture_with_its_number_of_heads(fixture_checkpoint, prithvi_fixtures_dir, tmp_path, capsys):
    out = tmp_path / "fixture_out"
    assert main([str(fixture_checkpoint), str(out)]) == 2
    assert "--num-heads" in capsys.readouterr().err
    assert main([str(fixture_checkpoint), str(out), "--num-heads", "4", "--bands", *S2_BANDS]) == 0
    reference = load_reference(prithvi_fixtures_dir)
    loaded = PrithviEncoder.from_pretrained(out)
    with torch.no_grad():
        features = loaded(reference["inputs.x4_120"]).hidden_states
    for index, hidden in enumerate(features):
        torch.testing.assert_close(hidden, reference[f"outputs.enc4@x4_120.features.{index}"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bands", "B02", "B99"], "Unknown band name 'B99'"),
        (["--preset", "prithvi_eo_v2_600m"], "shape mismatches"),
    ],
)
def test_cli_errors_exit_with_a_message(tiny_checkpoint, tmp_path, capsys, extra, message):
    path, _ = tiny_checkpoint
    status = main([str(path), str(tmp_path / "out"), *extra])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_malformed_hub_paths(tmp_path, capsys):
    assert main(["hf://only-a-repo", str(tmp_path / "out")]) == 2
    assert "hf://OWNER/REPO/FILENAME" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- Hub cache


def test_hub_loading_converts_once_and_reuses_the_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """hf_hub_download is replaced by a local file laid out like the Hub cache; the rest is the real path."""
    import huggingface_hub

    path, original = tiny_checkpoint
    cache = tmp_path / "hub_cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    calls = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        calls.append((repo_id, filename, revision, cache_dir))
        local = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit / filename
        local.parent.mkdir(parents=True, exist_ok=True)
        if not local.exists():
            local.write_bytes(path.read_bytes())
        return str(local)

    conversions = []
    real_convert = modeling_stage2.convert_prithvi.convert_official_checkpoint

    def counting_convert(*args, **kwargs):
        conversions.append(args)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(modeling_stage2.convert_prithvi, "convert_official_checkpoint", counting_convert)

    folder = load_prithvi_from_hub("org/Prithvi-tiny", "Prithvi_EO_V2_tiny.pt", cache_dir=cache, bands=S2_BANDS)
    assert calls == [("org/Prithvi-tiny", "Prithvi_EO_V2_tiny.pt", None, cache)]
    assert folder.is_relative_to(cache) and commit in folder.parts
    # the layout docs/prithvi.md gives: <cache>/stage2-converted/<OWNER>--<NAME>/<commit>/<file>/<preset>__<bands>
    assert folder == (Path(cache) / "stage2-converted" / "org--Prithvi-tiny" / commit / "Prithvi_EO_V2_tiny"
                      / f"auto__{'-'.join(S2_BANDS)}")
    loaded = PrithviEncoder.from_pretrained(folder)
    assert torch.equal(loaded.patch_embed.proj.weight, original.patch_embed.proj.weight[:, :4])

    again = load_prithvi_from_hub("org/Prithvi-tiny", "Prithvi_EO_V2_tiny.pt", cache_dir=cache, bands=S2_BANDS)
    assert again == folder and len(conversions) == 1
    all_bands = load_prithvi_from_hub("org/Prithvi-tiny", "Prithvi_EO_V2_tiny.pt", cache_dir=cache)
    assert all_bands == folder.with_name("auto__all-bands") and len(conversions) == 2
    assert PrithviConfig.from_pretrained(all_bands).in_chans == 6


def test_load_official_encoder_accepts_hub_paths(tiny_checkpoint, monkeypatch):
    import huggingface_hub

    path, original = tiny_checkpoint
    requested = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        requested.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = load_official_encoder("hf://org/Prithvi-tiny/sub/Prithvi_EO_V2_tiny.pt", bands=S2_BANDS)
    assert requested == [("org/Prithvi-tiny", "sub/Prithvi_EO_V2_tiny.pt")]
    assert torch.equal(model.patch_embed.proj.weight, original.patch_embed.proj.weight[:, :4])


# ---------------------------------------------------------------------------- command line: checks first


def test_cli_refuses_a_foreign_output_folder_before_downloading(tmp_path, capsys, monkeypatch):
    """The output folder was checked only when the converted encoder was saved: after the download (2.5 GB for the
    600M) and the whole conversion."""
    import huggingface_hub

    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: downloads.append(args) or "x.pt")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    status = main(["hf://org/Prithvi-tiny/Prithvi_EO_V2_tiny.pt", str(foreign)])
    error = capsys.readouterr().err
    assert status == 2 and "holds other files (['notes.txt'])" in error
    assert len(error.strip().splitlines()) == 1 and downloads == []
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_num_heads_zero_is_refused_not_ignored(tiny_checkpoint, tmp_path, capsys):
    """`--num-heads 0` was dropped (`if args.num_heads`), and the preset's 4 heads written without a word."""
    path, _ = tiny_checkpoint
    status = main([str(path), str(tmp_path / "out"), "--num-heads", "0"])
    assert status == 2 and "num_heads must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_pickled_object_is_named_in_one_line(tmp_path, capsys):
    """torch's refusal spans paragraphs (and advises `weights_only=False`); the message keeps its reason, one line."""
    path = tmp_path / "bad.pt"
    torch.save({"encoder.cls_token": _Payload()}, path)
    status = main([str(path), str(tmp_path / "out"), "--num-heads", "4"])
    error = capsys.readouterr().err
    assert status == 2 and len(error.strip().splitlines()) == 1, error
    assert "bad.pt: cannot be read as a weights-only torch checkpoint (UnpicklingError: Unsupported global" in error
    assert "_Payload" in error and "weights_only` set to `False`" not in error


def test_cli_a_full_disk_is_exit_1_in_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """A full disk while the encoder was written exited 2, the status of a mistake in the input."""
    import errno

    from modeling_stage2 import convert_prithvi

    def disk_full(model, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert_prithvi, "save_atomically", disk_full)
    path, _ = tiny_checkpoint
    status = main([str(path), str(tmp_path / "out"), "--preset", "prithvi_eo_v2_tiny", "--bands", *S2_BANDS])
    assert status == 1
    assert capsys.readouterr().err.splitlines() == [
        "stage2-convert-prithvi: error: [Errno 28] No space left on device"]
    assert not (tmp_path / "out").exists()
