"""Model cards and `stage2-evaluate`: the precision metrics were measured at, values that differ shown different,
the table's labels, "merged" only for a merged model, a malformed `stage2_base.json` named alone, and a truncated
Prithvi checkpoint named as truncated whatever its length."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from _data_helpers import make_tile_dir
from _refiner_helpers import single_thread  # noqa: F401  (fixture)
from _refiner_helpers import ScaledRefiner, tiny_refiner_config
from model_cards.cards import CardError, build_model_card, card_for_folder, validate_metrics
from test_model_cards import METRICS, table_row

def evaluation_sentence(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("12 tiles of the `test` split"))


# ----------------------------------------------------------------------------- the precision of the metrics
@pytest.mark.parametrize("quantization", ["8bit", "none"])
def test_stage2_evaluate_records_the_quantization_it_measured_with(tmp_path, monkeypatch, quantization):
    """`--quantization 8bit` metrics were written without it: a card made from them could not say they are not the
    full-precision model's."""
    import modeling_stage2
    from training.evaluate import main

    asked = []

    def load_trained_model(path, quantization="none", device=None, revision=None):
        asked.append(quantization)
        return ScaledRefiner(0.5)

    monkeypatch.setattr(modeling_stage2, "load_trained_model", load_trained_model)
    tiles = make_tile_dir(tmp_path / "tiles", per_split=1, s1=False)
    out = tmp_path / "metrics.json"
    argv = ["--model", "me/refiner", "--data", str(tiles), "--split", "test", "--quantization", quantization,
            "--bootstrap", "0", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0 and asked == [quantization]
    written = json.loads(out.read_text())
    assert written["quantization"] == quantization and written["split"] == "test"
    assert validate_metrics(written)["quantization"] == quantization  # what the card reads back


@pytest.mark.parametrize("quantization, words", [
    ("8bit", "measured with the backbone loaded in 8-bit (LLM.int8, bitsandbytes)."),
    ("4bit", "measured with the backbone loaded in 4-bit NF4 (bitsandbytes)."),
    ("none", "measured with the backbone loaded in full precision (not quantized)."),
])
def test_the_card_states_the_precision_beside_the_data_the_metrics_were_measured_on(quantization, words):
    text = build_model_card({**METRICS, "quantization": quantization}).text
    assert evaluation_sentence(text).endswith(f"{words} Lower is better except PSNR and SSIM;")


@pytest.mark.parametrize("recorded", [{}, {"quantization": None}])
def test_metrics_without_a_recorded_precision_still_make_a_card_that_states_none(recorded):
    """metrics.json written before the key (or by training's validation): readable, and no precision claimed."""
    metrics = {**METRICS, **recorded}
    assert "quantization" not in validate_metrics(metrics)
    sentence = evaluation_sentence(build_model_card(metrics).text)
    assert "measured with" not in sentence and "quantiz" not in sentence


def test_an_unknown_recorded_precision_is_refused_naming_the_file_and_key():
    with pytest.raises(CardError, match=r"^m\.json: 'quantization' must be one of \['8bit', '4bit', 'none'\] .*"
                                        r"got '16bit'$"):
        validate_metrics({**METRICS, "quantization": "16bit"}, source="m.json")


# ----------------------------------------------------------------------------- numbers and labels
def test_values_of_a_row_that_differ_are_shown_different():
    """0.09871 and 0.09874 were both "0.0987": the colour fit looked no better than `opt_v1`."""
    metrics = {**METRICS, "opt_v1": {**METRICS["opt_v1"], "ndvi_rmse": 0.09874, "evi_rmse": 0.12344},
               "linear_fit": {**METRICS["opt_v1"], "ndvi_rmse": 0.09871, "evi_rmse": 0.12341},
               "refined": {**METRICS["refined"], "ndvi_rmse": 0.0987102}}
    text = build_model_card(metrics).text
    # refined and the colour fit differ at the 7th digit: the whole row gets 7, opt_v1 prints as itself
    assert table_row(text, "NDVI RMSE")[1:4] == ["0.0987102", "0.09874", "0.09871"]
    assert table_row(text, "EVI RMSE")[1:4] == ["0.0612", "0.12344", "0.12341"]  # 5 tell the baselines apart
    assert table_row(text, "SAM (rad)")[1:4] == ["0.07", "0.15", "0.15"]  # equal values: nothing added


def test_the_target_rule_still_adds_digits_to_the_refined_value():
    metrics = {**METRICS, "refined": {**METRICS["refined"], "ndvi_rmse": 0.049996}}
    assert table_row(build_model_card(metrics).text, "NDVI RMSE")[1] == "0.049996"


def test_unit_and_direction_share_one_parenthesis():
    text = build_model_card(METRICS).text
    assert table_row(text, "PSNR (dB, higher is better)")[:3] == ["PSNR (dB, higher is better)", "27.5", "21"]
    assert table_row(text, "SSIM (higher is better)")[:3] == ["SSIM (higher is better)", "0.8", "0.6"]
    assert "(dB) (higher" not in text


# ----------------------------------------------------------------------------- "merged"
def _adaptation(text: str) -> str:
    return table_row(text, "Adaptation")[1]


def test_a_full_model_saved_without_an_adapter_is_not_called_merged(tmp_path, single_thread):  # noqa: F811
    from modeling_stage2 import Stage2RefinerModel

    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "plain")
    adaptation = _adaptation(card_for_folder(tmp_path / "plain").text)
    assert not adaptation.endswith(", merged") and "LoRA r=" not in adaptation  # the config's defaults, not trained
    assert adaptation == ("full refiner weights, with no LoRA merge recorded in `config.json` (`export_merged_model` "
                          "records one as `lora_merged`)")


def test_an_exported_merge_is_recorded_and_called_merged(tmp_path, single_thread):  # noqa: F811
    from modeling_stage2.adapters import (build_trainable_model, export_merged_model, load_trained_model,
                                          save_trained_model)

    model = build_trainable_model(tiny_refiner_config(), quantization="none", print_summary=False, lora_r=4)
    export_merged_model(load_trained_model(save_trained_model(model, tmp_path / "best")), tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["lora_merged"] is True
    assert _adaptation(card_for_folder(tmp_path / "merged").text).startswith("LoRA r=4, alpha=16 on ")
    assert _adaptation(card_for_folder(tmp_path / "merged").text).endswith(", merged")


# ----------------------------------------------------------------------------- stage2_base.json
@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    from modeling_stage2.adapters import build_trainable_model, save_trained_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_trainable_model(tiny_refiner_config(), quantization="none", print_summary=False)
        return save_trained_model(model, tmp_path_factory.mktemp("adapter") / "best")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("text, problem", [
    ("[1]", r"unreadable base description \(a JSON list, expected an object with a 'kind'\)"),
    ('{"trained_quantization": null}', r"key 'kind' is missing; expected one of \('model', 'backbone_weights', "
                                        r"'saved'\)"),
    ('{"kind": "model"}', r"key 'model_name_or_path' is None; with kind 'model' it names the base refiner"),
    ('{"kind": "model", "model_name_or_path": 5}', r"key 'model_name_or_path' is 5; with kind 'model'"),
    ("{kind", r"unreadable base description \(not valid JSON: "),
    ('{"kind": "model", "model_name_or_path": "FOLDER"}', r"key 'model_name_or_path' names the folder \S+, which "
                                                          r"holds no refiner \(no config.json\)"),
])
def test_a_malformed_base_description_is_named_alone_with_its_problem(adapter_folder, tmp_path, text, problem):
    from modeling_stage2.adapters import load_trained_model

    folder = shutil.copytree(adapter_folder, tmp_path / "best")
    (tmp_path / "not_a_refiner").mkdir()
    (folder / "stage2_base.json").write_text(text.replace("FOLDER", str(tmp_path / "not_a_refiner")))
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        load_trained_model(folder)
    message = str(raised.value)
    assert message.startswith(f"{folder / 'stage2_base.json'}: ") and len(message.splitlines()) == 1
    assert re.search(problem, message), message
    assert "config.json" not in message.replace("(no config.json)", "")  # the one malformed file, not another


def test_stage2_push_names_the_malformed_base_description_alone(adapter_folder, tmp_path):
    """`stage2-push` said "unreadable stage2_base.json or config.json" for a malformed base description: which one?"""
    from model_cards.cards import CardError
    from model_cards.push import model_repo_contents

    folder = shutil.copytree(adapter_folder, tmp_path / "best")
    (folder / "stage2_base.json").write_text("[1]")
    with pytest.raises(CardError) as raised:
        model_repo_contents(folder, "me/refiner")
    assert str(raised.value) == (f"{folder / 'stage2_base.json'}: unreadable base description (a JSON list, expected "
                                 "an object with a 'kind'); re-save the model with save_trained_model.")
    (folder / "stage2_base.json").write_text((adapter_folder / "stage2_base.json").read_text())
    (folder / "config.json").write_text("{")
    with pytest.raises(CardError, match=rf"^{re.escape(str(folder / 'config.json'))}: unreadable \("):
        model_repo_contents(folder, "me/refiner")


# ----------------------------------------------------------------------------- truncated Prithvi checkpoints
@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    """A fake official checkpoint of about 80 KB (torch.save's zip format), so that its truncations span the lengths
    torch's zip reader fails on with "[Errno 22] Invalid argument" (4097 to 69583 bytes)."""
    generator = torch.Generator().manual_seed(0)
    state = {"encoder.cls_token": torch.randn(1, 1, 8, generator=generator),
             "encoder.pos_embed": torch.randn(20000, generator=generator), "decoder.x": torch.randn(3)}
    path = tmp_path_factory.mktemp("checkpoint") / "full.pt"
    torch.save(state, path)
    return path.read_bytes()


def test_every_truncation_of_a_checkpoint_is_named_as_one(checkpoint_bytes, tmp_path, monkeypatch, capsys):
    from modeling_stage2.convert_prithvi import main

    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    size = len(checkpoint_bytes)
    lengths = [1, 3, 21, 100, 4096, 4097, 5000, 30000, 65557, 69583, 69584, size - 22, size - 10, size - 1]
    path = tmp_path / "Prithvi_EO_V2_tiny.pt"
    for length in lengths:
        path.write_bytes(checkpoint_bytes[:length])
        assert main([str(path), str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert error.splitlines() == [
            f"stage2-convert-prithvi: error: {path}: cannot be read as a weights-only torch checkpoint (a zip archive "
            f"of {length} bytes without a whole end-of-archive record: the file is truncated (an interrupted download "
            "or copy); download or copy it again). Official Prithvi-EO-2.0 files (Prithvi_EO_V2_*.pt) are flat state "
            "dicts of tensors."], (length, error)
    path.write_bytes(b"")
    assert main([str(path), str(tmp_path / "out")]) == 2
    assert "checkpoint (the file is empty: download or copy it again)." in capsys.readouterr().err
    assert loads and all(weights_only is True for weights_only in loads)  # never a pickle load
    assert not (tmp_path / "out").exists()


def test_a_whole_checkpoint_is_not_taken_for_a_truncated_one(checkpoint_bytes, tmp_path):
    from modeling_stage2.convert_prithvi import _truncation, read_official_state_dict

    path = tmp_path / "whole.pt"
    path.write_bytes(checkpoint_bytes)
    assert _truncation(path) is None
    assert sorted(read_official_state_dict(path)) == ["decoder.x", "encoder.cls_token", "encoder.pos_embed"]
