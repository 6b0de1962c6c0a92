"""Make a saved model folder endpoint-ready: an Inference-Endpoint `handler.py` and the endpoint's `requirements.txt`
(and, for folders saved before `EnECGModel.save_pretrained` did it, the pipeline with `custom_pipelines` in
`config.json`).

    from enecg_hf.training.serving_export import export_serving_files
    model.save_pretrained("my-enecg")             # already serves `pipeline(model="my-enecg", trust_remote_code=True)`
    export_serving_files(model, "my-enecg")       # or: enecg export my-enecg

`train.py` and the quickstart call it on every folder they write.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..pipeline_enecg import pipeline_entry


TEMPLATES = Path(__file__).resolve().parents[1] / "templates"

# What an Inference Endpoint installs next to its default image (torch and transformers come with it; listed so that
# a plain container gets them too).
ENDPOINT_REQUIREMENTS = """\
torch>=2.5
transformers>=5.18,<6
peft>=0.20
safetensors>=0.8
scipy>=1.11.4
numpy>=1.26.4
wfdb>=4.1.2
einops
# only for models with the `features` or `median_beat` expert (or beat pooling):
neurokit2>=0.2.10
# only for models with the `moment` expert (installed without its transformers 4.33 pin):
# pip install --no-deps momentfm==0.1.4
"""
# Packages that carry an expert's network and weights (tens of MB each): listed only for models that use the expert.
EXPERT_PACKAGE_REQUIREMENTS = {"openecg": "openecg==0.11.0", "deepfade": "ecgdatakit==2.0.3"}


def endpoint_requirements(expert_types) -> str:
    """The endpoint's `requirements.txt` for a model with these expert types."""
    needed = sorted({EXPERT_PACKAGE_REQUIREMENTS[t] for t in expert_types if t in EXPERT_PACKAGE_REQUIREMENTS})
    if not needed:
        return ENDPOINT_REQUIREMENTS
    return ENDPOINT_REQUIREMENTS + "# the pretrained networks of this model's experts (weights inside the wheels):\n" + \
        "".join(f"{line}\n" for line in needed)


def export_serving_files(model, output_dir: str | os.PathLike) -> list[str]:
    """Add the serving files to a folder written by `model.save_pretrained(output_dir)`. Returns the files written."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from .. import pipeline_enecg

    folder = Path(output_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: call model.save_pretrained({str(folder)!r}) first")
    written = []
    # The pipeline module and the flat modules it imports, so `trust_remote_code` finds them next to the model code.
    pipeline_file = Path(pipeline_enecg.__file__)
    for source in [pipeline_file, *map(Path, get_relative_import_files(pipeline_file))]:
        shutil.copy(source, folder / source.name)
        written.append(source.name)

    config = json.loads(config_file.read_text())
    config["custom_pipelines"] = pipeline_entry()
    tmp = folder / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_file)
    model.config.custom_pipelines = pipeline_entry()
    written.append("config.json")

    shutil.copy(TEMPLATES / "handler.py", folder / "handler.py")
    (folder / "requirements.txt").write_text(endpoint_requirements(e.type for e in model.config.expert_configs))
    written += ["handler.py", "requirements.txt"]
    return written


__all__ = ["export_serving_files", "pipeline_entry", "endpoint_requirements", "ENDPOINT_REQUIREMENTS"]
