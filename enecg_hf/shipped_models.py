"""Trained EnECG models that ship inside the package, loadable offline by name.

A shipped model is a saved EnECG folder under `enecg_hf/pretrained/<name>/` holding what training produced (config,
heads, gates, model card, metrics); its experts' weights come from their own wheels (`openecg`, `ecgdatakit`), as
for any folder whose experts have a `package:` source. `make model` rebuilds it from the ECGs in `../shared/data`
(`enecg_hf/tools/build_shipped_model.py`).

    import enecg_hf
    from transformers import AutoModel, pipeline
    model = AutoModel.from_pretrained(enecg_hf.model_path("enecg-base"))
    ecg = pipeline("ecg-analysis", model=enecg_hf.model_path("enecg-base"))
    EnECGModel.from_pretrained("enecg-base")          # our class resolves shipped names itself
    enecg predict REC --model enecg-base              # so do the CLI, the handler export and the Space
"""

from __future__ import annotations

import os
from pathlib import Path


SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_MODEL = "enecg-base"
# The files a shipped folder carries (train.py's output without its checkpoints, dataset cache and code copies: the
# installed package is the code).
SHIPPED_FILES = ("config.json", "model.safetensors", "README.md", "metrics.json", "training_args.json")


def shipped_model_names() -> list[str]:
    """Names of the models inside this installation of the package."""
    if not SHIPPED_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_MODELS_DIR.iterdir() if (p / "config.json").is_file())


def model_path(name: str = DEFAULT_MODEL) -> str:
    """The folder of the shipped model `name`, for `from_pretrained` or `pipeline(model=...)`.

    Raises:
        ValueError: `name` is not a shipped model (the message lists the ones there are).
    """
    folder = SHIPPED_MODELS_DIR / name
    if not (folder / "config.json").is_file():
        names = shipped_model_names()
        raise ValueError(f"{name!r} is not a model shipped with enecg_hf (shipped: {names or 'none'}); pass a saved "
                         "folder or a Hub id instead")
    return str(folder)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A folder that exists or a Hub id as given; else a shipped model's name as its folder; else as given (a Hub id,
    for `from_pretrained` to fetch). A local folder of the same name wins over the shipped model."""
    text = str(name_or_path)
    if Path(text).exists() or "/" in text or text not in shipped_model_names():
        return text
    return model_path(text)


__all__ = ["SHIPPED_MODELS_DIR", "DEFAULT_MODEL", "SHIPPED_FILES", "shipped_model_names", "model_path",
           "resolve_model"]
