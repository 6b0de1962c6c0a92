"""Smoke-run of the whole model life cycle, offline: build the tiny EnECG model, save it as a Hub-ready folder,
reload it with `AutoModel.from_pretrained` and predict on a simulated 12-lead ECG.

    python -m enecg_hf.quickstart [--config hub_configs/tiny.json] [--output outputs/quickstart]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

from . import EnECGConfig, EnECGModel


REPO_HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"


def simulated_ecg(heart_rate: float, seed: int, sampling_rate: int = 500, seconds: int = 10) -> np.ndarray:
    """A 12-lead ECG (12, seconds * sampling_rate) in mV from neurokit2's multi-lead simulator."""
    import neurokit2 as nk

    frame = nk.ecg_simulate(
        duration=seconds, sampling_rate=sampling_rate, heart_rate=heart_rate, method="multileads", random_state=seed
    )
    return frame.to_numpy(dtype=np.float32).T


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_HUB_CONFIGS / "tiny.json"))
    parser.add_argument("--output", default="outputs/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("enecg_hf").setLevel(logging.INFO)

    torch.manual_seed(args.seed)
    config = EnECGConfig.from_json_file(args.config)
    model = EnECGModel.from_expert_sources(config).eval()  # logs loudly for experts without pretrained weights
    model.save_pretrained(args.output)

    reloaded = AutoModel.from_pretrained(args.output).eval()
    heart_rate = 72.0
    ecg = torch.from_numpy(simulated_ecg(heart_rate, seed=args.seed))[None]
    with torch.no_grad():
        before, after = model(ecg), reloaded(ecg)
    result = {
        "model_folder": str(Path(args.output).resolve()),
        "files": sorted(p.name for p in Path(args.output).iterdir()),
        "trainable_parameters": reloaded.num_parameters(only_trainable=True),
        "total_parameters": reloaded.num_parameters(),
        "label": config.label_name,
        "true_rr_interval_ms": 60000.0 / heart_rate,
        "prediction": after.logits[0].tolist(),
        "gate_weights": dict(zip(reloaded.expert_names, after.gate_weights[0].tolist())),
        "expert_predictions": dict(zip(reloaded.expert_names, after.expert_logits[0, :, 0].tolist())),
        "reload_bit_identical": bool(torch.equal(before.logits, after.logits)),
        "note": "untrained heads: the prediction is meaningless until `python train.py` fits them",
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
