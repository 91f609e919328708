"""What a peft user meets loading our adapter folders and Hub repos with peft's own API (`AutoPeftModel`,
`PeftModel.from_pretrained` onto a base they load themselves), for each base kind `save_trained_model` writes
(`stage2_base.json`): a saved refiner ("model") works with plain peft, at the base commit the adapter was trained on;
a fresh refiner on Prithvi weights ("backbone_weights") or a random backbone ("saved") is no model peft can load, and
`load_trained_model` (docs/sharing.md, "With peft alone") loads those."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from _hub_helpers import DEFAULT_USER, WITHOUT_PROJECT_PACKAGES, hub_server  # noqa: F401  (fixture)
from _hub_helpers import publish_tiny_prithvi
from _refiner_helpers import single_thread  # noqa: F401  (fixture)
from _refiner_helpers import tiny_inputs, tiny_refiner_config, wake_up
from modeling_stage2 import Stage2RefinerModel
from modeling_stage2.adapters import PEFT_CARD_FILE, build_trainable_model, load_trained_model, save_trained_model

pytestmark = [pytest.mark.usefixtures("single_thread"),  # peft's own wrapping, as a peft user meets it
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

ALLOW = ["modeling_stage2"]  # peft imports only allow-listed libraries named by adapter_config.json's auto_mapping
INPUTS = tiny_inputs(batch=1, size=(28, 28), seed=3)


def refine(model):
    opt_v1, month, biome = INPUTS
    with torch.no_grad():
        return model.eval()(opt_v1=opt_v1, month=month, biome=biome).refined


def trained_on(seed: int = 1, **build_kwargs):
    build_kwargs.setdefault("quantization", "none")
    model = build_trainable_model(print_summary=False, **build_kwargs)
    wake_up(model, seed=seed)
    return model


def push_base_refiner(repo: str, folder, seed: int, include_code: bool = False) -> str:
    """A full refiner (random weights from `seed`) pushed as `repo`'s new main commit, which is returned."""
    from huggingface_hub import HfApi

    from model_cards.push import push_trained_model

    torch.manual_seed(seed)
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(folder)
    push_trained_model(folder, repo, include_code=include_code)
    return HfApi().model_info(repo).sha


def push_adapter(folder, repo: str) -> str:
    from huggingface_hub import HfApi

    from model_cards.push import push_trained_model

    push_trained_model(folder, repo)
    return HfApi().model_info(repo).sha


def adapter_config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def peft_card_base(folder):
    """The base peft's card beside an adapter names: its `base_model` and its `base_model:adapter:` tags."""
    from huggingface_hub import ModelCard

    data = ModelCard.load(folder / PEFT_CARD_FILE).data
    return data.base_model, [tag for tag in data.tags or [] if tag.startswith("base_model:")]


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_peft_card_names_no_base_that_is_not_on_the_hub(tmp_path, quantization):
    """peft's card took `base_model` from the loaded config: an 8/4-bit base's temporary folder (`/tmp/stage2-base-*`,
    deleted), else ""; the Hub refuses both as `base_model`. An adapter on a random-init base (saved beside it) or a
    local refiner names none; peft's other metadata stays."""
    torch.manual_seed(0)
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "base")
    bases = {"fresh": {"config": tiny_refiner_config()}, "local": {"model_name_or_path": tmp_path / "base"}}
    for name, build in bases.items():
        folder = save_trained_model(trained_on(quantization=quantization, **build), tmp_path / name)
        assert peft_card_base(folder) == (None, []), name
        text = (folder / PEFT_CARD_FILE).read_text()
        assert "library_name: peft" in text and "- lora" in text and str(tmp_path) not in text and "/tmp/" not in text


def test_auto_peft_model_loads_an_adapter_on_a_local_base_refiner(tmp_path):
    from peft import AutoPeftModel

    torch.manual_seed(0)
    Stage2RefinerModel(tiny_refiner_config()).save_pretrained(tmp_path / "base")
    model = trained_on(model_name_or_path=tmp_path / "base")
    expected = refine(model)
    folder = save_trained_model(model, tmp_path / "best")
    assert (adapter_config(folder)["base_model_name_or_path"], adapter_config(folder)["revision"]) == (
        str(tmp_path / "base"), None)
    with pytest.raises(ValueError, match="wants to import 'modeling_stage2.modeling_stage2' which is not in the "
                                         "import allowlist"):
        AutoPeftModel.from_pretrained(str(folder))
    assert torch.equal(refine(AutoPeftModel.from_pretrained(str(folder), import_allowlist=ALLOW)), expected)
    assert torch.equal(refine(load_trained_model(folder)), expected)


def test_auto_peft_model_puts_a_hub_adapter_on_the_base_commit_it_was_trained_on(hub_server, tmp_path):
    """Before, adapter_config.json's `revision` was null: once the base repo moved on, AutoPeftModel put the adapter
    onto the base's new main commit (outputs 0.7 off) while load_trained_model used the recorded commit."""
    from peft import AutoPeftModel

    base_repo, repo = f"{DEFAULT_USER}/stage2-base", f"{DEFAULT_USER}/stage2-adapter"
    base_commit = push_base_refiner(base_repo, tmp_path / "base_v1", seed=0)
    model = trained_on(model_name_or_path=base_repo)
    expected = refine(model)
    folder = save_trained_model(model, tmp_path / "best")
    first = push_adapter(folder, repo)
    push_base_refiner(base_repo, tmp_path / "base_v2", seed=1)  # other base weights on main
    push_adapter(save_trained_model(trained_on(seed=2, model_name_or_path=base_repo, revision=base_commit),
                                    tmp_path / "retrained"), repo)  # another adapter on the adapter repo's main

    assert torch.equal(refine(AutoPeftModel.from_pretrained(str(folder), import_allowlist=ALLOW)), expected)
    pinned = AutoPeftModel.from_pretrained(repo, revision=first, import_allowlist=ALLOW)
    assert torch.equal(refine(pinned), expected)
    assert torch.equal(refine(load_trained_model(repo, revision=first)), expected)
    assert (adapter_config(folder)["base_model_name_or_path"], adapter_config(folder)["revision"]) == (
        base_repo, base_commit)
    assert peft_card_base(folder) == (base_repo, [f"base_model:adapter:{base_repo}"])  # what the Hub reads

    # a folder saved before adapter_config.json recorded the base commit loads as before; re-saved, it records it
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / "adapter_config.json").write_text(json.dumps(adapter_config(folder) | {"revision": None}))
    assert torch.equal(refine(load_trained_model(old)), expected)
    # (what peft does with it, the base repo's main as it is now, rests on peft's and the Hub cache's state: not checked)
    resaved = save_trained_model(load_trained_model(old), tmp_path / "resaved")
    assert adapter_config(resaved)["revision"] == base_commit
    assert torch.equal(refine(AutoPeftModel.from_pretrained(str(resaved), import_allowlist=ALLOW)), expected)


NO_PACKAGE_SCRIPT = WITHOUT_PROJECT_PACKAGES + textwrap.dedent("""
    import torch
    from peft import AutoPeftModel, PeftConfig, PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    repo, inputs, output = sys.argv[1:4]
    for allowlist in (None, ["modeling_stage2"]):
        try:
            AutoPeftModel.from_pretrained(repo, trust_remote_code=True, import_allowlist=allowlist)
            sys.exit("AutoPeftModel loaded the adapter without the package")
        except (ValueError, ImportError) as error:
            print("AutoPeftModel:", type(error).__name__, " ".join(str(error).split()))

    config = PeftConfig.from_pretrained(repo)  # the documented way (docs/sharing.md)
    base = AutoModel.from_pretrained(config.base_model_name_or_path, revision=config.revision, trust_remote_code=True)
    model = PeftModel.from_pretrained(base, repo).eval()
    with torch.no_grad():
        refined = model(**load_file(inputs)).refined
    save_file({"refined": refined.contiguous()}, output)
""")


def test_without_the_package_an_adapter_loads_onto_a_base_repo_pushed_with_its_code(hub_server, tmp_path,
                                                                                     repo_root):
    """`stage2-push --include_code` of the base refiner: a peft user without the package loads the base with
    `trust_remote_code` at the adapter config's `revision`, then the adapter with `PeftModel.from_pretrained`."""
    base_repo, repo = f"{DEFAULT_USER}/stage2-base-code", f"{DEFAULT_USER}/stage2-adapter-on-code"
    push_base_refiner(base_repo, tmp_path / "base_v1", seed=0, include_code=True)
    model = trained_on(model_name_or_path=base_repo)
    expected = refine(model)
    push_adapter(save_trained_model(model, tmp_path / "best"), repo)
    push_base_refiner(base_repo, tmp_path / "base_v2", seed=1, include_code=True)  # other base weights on main

    opt_v1, month, biome = INPUTS
    save_file({"opt_v1": opt_v1, "month": month, "biome": biome}, tmp_path / "inputs.safetensors")
    result = subprocess.run([sys.executable, "-c", NO_PACKAGE_SCRIPT, repo, str(tmp_path / "inputs.safetensors"),
                             str(tmp_path / "refined.safetensors"), str(repo_root)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    refusals = [line for line in result.stdout.splitlines() if line.startswith("AutoPeftModel:")]
    assert len(refusals) == 2 and "not in the import allowlist" in refusals[0], result.stdout
    assert "ModuleNotFoundError" in refusals[1] and "modeling_stage2" in refusals[1], result.stdout
    assert torch.equal(load_file(tmp_path / "refined.safetensors")["refined"], expected)
    assert torch.equal(refine(load_trained_model(repo)), expected)


def test_adapters_on_bases_that_are_no_saved_refiner_load_with_load_trained_model(hub_server, tmp_path):
    """A fresh refiner on a Prithvi checkpoint, or on a random backbone kept in base_model.safetensors, is no
    `from_pretrained` model: AutoPeftModel cannot build it (what it says is peft's and transformers' own). The
    adapter config names the Prithvi repo at the commit trained on (the base's origin, for the Hub and model cards);
    `load_trained_model`, the documented way, gives the trained outputs exactly."""
    from peft import AutoPeftModel

    prithvi = f"{DEFAULT_USER}/Prithvi-EO-2.0-tiny"
    prithvi_commit = publish_tiny_prithvi(prithvi, tmp_path, seed=0)
    cases = {
        "backbone_weights": tiny_refiner_config(backbone_config="prithvi_eo_v2_tiny", backbone_weights=prithvi),
        "saved": tiny_refiner_config(),
    }
    for kind, config in cases.items():
        model = trained_on(config=config)
        expected = refine(model)
        folder = save_trained_model(model, tmp_path / kind)
        assert json.loads((folder / "stage2_base.json").read_text())["kind"] == kind
        recorded = adapter_config(folder)
        if kind == "backbone_weights":
            assert (recorded["base_model_name_or_path"], recorded["revision"]) == (prithvi, prithvi_commit)
        else:
            assert (recorded["base_model_name_or_path"], recorded["revision"]) == (None, None)
        repo = f"{DEFAULT_USER}/adapter-{kind.replace('_', '-')}"
        push_adapter(folder, repo)
        with pytest.raises(OSError):
            AutoPeftModel.from_pretrained(repo, import_allowlist=ALLOW)
        assert torch.equal(refine(load_trained_model(repo)), expected)
