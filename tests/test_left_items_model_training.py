"""Items earlier reviews of the model and the training had left alone, settled: a backbone's folder given where a
refiner's config belongs, the band statistics of a refiner loaded in half precision, a resumed run that no longer
trains the checkpoint's discriminator."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from _refiner_helpers import tiny_backbone_config, tiny_inputs, tiny_refiner_config, wake_up
from modeling_stage2 import PrithviConfig, Stage2RefinerConfig, Stage2RefinerModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------- configs
def test_a_backbone_folder_given_as_a_refiner_config_is_refused_on_one_line(tmp_path):
    """transformers only warned ("You are using a model of type `prithvi_eo_v2` to instantiate a model of type
    `stage2_refiner`"), printed the whole half-built config, and failed with `AttributeError: property 'patch_size'
    of 'Stage2RefinerConfig' object has no setter`, naming neither the folder nor the problem."""
    tiny_backbone_config().save_pretrained(tmp_path)
    message = (rf"^{tmp_path / 'config.json'}: key 'model_type' is '{PrithviConfig.model_type}', not "
               rf"'{Stage2RefinerConfig.model_type}': not a Stage 2 refiner config \(a Prithvi backbone's config")
    for load in (Stage2RefinerConfig.from_pretrained, Stage2RefinerModel.from_pretrained):
        with pytest.raises(ValueError, match=message) as raised:
            load(tmp_path)
        assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'config.json'}: key 'model_type'"):
        Stage2RefinerConfig.from_pretrained(str(tmp_path / "config.json"))
    # A refiner's folder still loads, and a Prithvi config is still found inside it (transformers' sub-config look-up).
    tiny_refiner_config().save_pretrained(tmp_path / "refiner")
    assert Stage2RefinerConfig.from_pretrained(tmp_path / "refiner").head_width == tiny_refiner_config().head_width
    assert PrithviConfig.from_pretrained(tmp_path / "refiner").depth == tiny_backbone_config().depth


# ------------------------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loading_in_half_precision_keeps_the_band_statistics_exact(tmp_path, dtype):
    """The normaliser's statistics are built (not loaded) in float32 whatever the dtype asked of `from_pretrained`:
    in bfloat16 1087 / 1342 / 1433 / 2734 round to 1088 / 1344 / 1432 / 2736 and every normalised band moves."""
    torch.manual_seed(0)
    model = Stage2RefinerModel(tiny_refiner_config()).eval()
    wake_up(model)
    model.save_pretrained(tmp_path)
    loaded = Stage2RefinerModel.from_pretrained(tmp_path, dtype=dtype).eval()
    assert loaded.fusion.weight.dtype == dtype
    backbone = tiny_refiner_config().backbone_config
    for buffer, values in ((loaded.normalizer.mean, backbone.band_mean), (loaded.normalizer.std, backbone.band_std)):
        assert buffer.dtype == torch.float32
        assert buffer.flatten().tolist() == values
    opt_v1, month, biome = tiny_inputs(batch=1, size=(28, 28))
    with torch.no_grad():
        bands = loaded.normalizer(opt_v1)
    torch.testing.assert_close(bands, model.normalizer(opt_v1), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- resuming
def test_resuming_a_checkpoint_with_a_discriminator_without_one_says_so(tmp_path, caplog):
    """A checkpoint trained with a discriminator, resumed with `adversarial_weight` 0: allowed (the run's settings
    say so), but the discriminator and its loss were dropped without a word."""
    from training.discriminator import PatchDiscriminator
    from training.trainer import TRAINER_EXTRA_STATE, Stage2Trainer

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / TRAINER_EXTRA_STATE).write_text("{}")
    trainer = SimpleNamespace(discriminator=None)
    with caplog.at_level("WARNING", logger="training.trainer"):
        Stage2Trainer._check_resumable(trainer, str(folder))
    assert caplog.text == ""  # no discriminator saved: nothing dropped
    discriminator = PatchDiscriminator(base_channels=8, num_layers=2)
    discriminator.save_pretrained(folder)
    with caplog.at_level("WARNING", logger="training.trainer"):
        Stage2Trainer._check_resumable(SimpleNamespace(discriminator=discriminator), str(folder))
        Stage2Trainer._check_resumable(trainer, None)
    assert caplog.text == ""  # resumed with its discriminator, or nothing resumed
    with caplog.at_level("WARNING", logger="training.trainer"):
        Stage2Trainer._check_resumable(trainer, str(folder))
    assert [record.getMessage() for record in caplog.records] == [
        f"{folder} holds a discriminator, but these settings train none (adversarial_weight 0): the run goes on "
        "without it and without its adversarial loss."]


def test_a_refiner_config_nested_in_another_models_or_without_model_type_still_loads(tmp_path):
    """The refusal of another model's config left transformers' own look-up alone: a refiner config nested in a
    composite config was taken from it, and a config.json written without `model_type` loaded; a refused
    `subfolder=` names the config.json inside the subfolder."""
    import json

    from transformers.utils import CONFIG_NAME

    tiny_refiner_config(head_width=24).save_pretrained(tmp_path / "refiner")
    saved = json.loads((tmp_path / "refiner" / CONFIG_NAME).read_text())
    for name, record in (("composite", {"model_type": "wrapper", "refiner_config": saved}),
                         ("untyped", {key: value for key, value in saved.items() if key != "model_type"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / CONFIG_NAME).write_text(json.dumps(record))
        assert Stage2RefinerConfig.from_pretrained(tmp_path / name).head_width == 24
    tiny_backbone_config().save_pretrained(tmp_path / "root" / "backbone")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'root' / 'backbone' / CONFIG_NAME}: key 'model_type' is "):
        Stage2RefinerConfig.from_pretrained(tmp_path / "root", subfolder="backbone")


def test_stage2_train_names_a_backbone_folder_given_as_the_start_model_once(tmp_path, capsys, monkeypatch):
    from _data_helpers import write_tile
    from _training_helpers import refuse_exec
    from transformers.utils import CONFIG_NAME

    from training.train import launch_main

    refuse_exec(monkeypatch)
    for split in ("train", "val"):
        write_tile(tmp_path / "data" / split, f"tile_{split}")
    tiny_backbone_config().save_pretrained(tmp_path / "backbone")
    assert launch_main(["--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                        "--model_name_or_path", str(tmp_path / "backbone")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"stage2-train: error: {tmp_path / 'backbone' / CONFIG_NAME}: key 'model_type' is ")
    assert error.count(CONFIG_NAME) == 1 and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()
