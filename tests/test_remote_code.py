"""What a Hub user who pulls a pushed refiner without the package gets: the repo's `config.json` promises remote
code (`auto_map`) only when the push uploaded it (`--include_code`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from _hub_helpers import DEFAULT_USER, WITHOUT_PROJECT_PACKAGES, hub_server  # noqa: F401  (fixture)

NO_PACKAGE_SCRIPT = WITHOUT_PROJECT_PACKAGES + textwrap.dedent("""
    try:
        import modeling_stage2
        sys.exit("modeling_stage2 is importable")
    except ImportError:
        pass
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
    except (OSError, ValueError) as error:
        print(type(error).__name__, " ".join(str(error).split()))
""")


def test_a_push_without_code_does_not_promise_remote_code(hub_server, tmp_path, repo_root):
    from huggingface_hub import hf_hub_download
    from transformers import AutoModel

    from model_cards.push import push_trained_model
    from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel

    folder = tmp_path / "merged"
    config = Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", head_width=8, num_convnext_blocks=1)
    Stage2RefinerModel(config).save_pretrained(folder)  # a registered class: its config.json has an auto_map
    assert "auto_map" in json.loads((folder / "config.json").read_text())

    repo = f"{DEFAULT_USER}/no-code"
    push_trained_model(folder, repo, include_code=True)
    pushed = json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
    assert pushed["auto_map"]["AutoModel"] == "modeling_stage2.Stage2RefinerModel"
    push_trained_model(folder, repo)  # the code of the first push is deleted: so is the auto_map naming it
    pushed = json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
    assert "auto_map" not in pushed
    assert pushed == {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "auto_map"}
    assert type(AutoModel.from_pretrained(repo)) is Stage2RefinerModel  # the package loads it as before

    # without the package, transformers says it does not know the model type: not that the repo's code is missing
    result = subprocess.run([sys.executable, "-c", NO_PACKAGE_SCRIPT, repo, str(repo_root)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage2_refiner" in result.stdout and "configuration_stage2.py" not in result.stdout, result.stdout
