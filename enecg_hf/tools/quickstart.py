"""Smoke-run of the model life cycle, offline.

    python -m enecg_hf.tools.quickstart --model outputs/enecg-tiny-rr_interval   # a folder written by `python train.py`
    python -m enecg_hf.tools.quickstart [--config hub_configs/tiny.json] [--output outputs/quickstart]

With `--model`: load a trained folder with `AutoModel.from_pretrained` and predict the RR interval of simulated
12-lead ECGs it never saw (their true RR is known), with each expert's gate weight. Without it: build the tiny
untrained model, save it as a Hub-ready folder, reload it and check that the reload is bit-identical.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

from .. import EnECGConfig, EnECGModel
from ..training.configs import HUB_CONFIGS_DIR
from ..training.serving_export import export_serving_files


def simulated_ecg(heart_rate: float, seed: int, sampling_rate: int = 500, seconds: int = 10) -> np.ndarray:
    """A 12-lead ECG (12, seconds * sampling_rate) in mV from neurokit2's multi-lead simulator."""
    import neurokit2 as nk

    frame = nk.ecg_simulate(
        duration=seconds, sampling_rate=sampling_rate, heart_rate=heart_rate, method="multileads", random_state=seed
    )
    return frame.to_numpy(dtype=np.float32).T


def predict_with_trained_model(folder: str, num_records: int, seed: int) -> dict:
    """Predictions of a trained folder on `num_records` simulated records (`enecg_hf.data.simulate`, seed `seed`)."""
    from ..data.simulate import simulate_record

    model = AutoModel.from_pretrained(folder).eval()
    records = [simulate_record(index, seed=seed) for index in range(num_records)]
    inputs = torch.from_numpy(np.stack([signal for signal, _ in records]))
    with torch.no_grad():
        outputs = model.forward_tasks(inputs)
    results = {}
    for task in model.config.task_configs:
        label = task.label_name
        logits, gate_weights = outputs[label].logits, outputs[label].gate_weights
        rows = []
        for i, (_, labels) in enumerate(records):
            if task.is_regression:
                prediction = round(float(logits[i, 0]), 1)
            else:
                prediction = task.id2label[int(logits[i].argmax())]
            rows.append({
                "true": round(labels[label], 1) if isinstance(labels.get(label), float) else labels.get(label),
                "predicted": prediction,
                "gate_weights": {name: round(w, 3) for name, w in zip(model.expert_names, gate_weights[i].tolist())},
            })
        result = {"label": label, "unit": task.label_unit, "records": rows}
        if task.is_regression:
            errors = [abs(r["predicted"] - r["true"]) for r in rows if r["true"] is not None]
            result["mean_absolute_error"] = round(float(np.mean(errors)), 1)
        results[label] = result
    folder_path = str(Path(folder).resolve())
    if len(results) > 1:
        return {"model_folder": folder_path, "tasks": results}
    return {"model_folder": folder_path, **next(iter(results.values()))}  # a single-task model: its task's result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained model folder (or Hub id) to load and predict with")
    parser.add_argument("--num_records", type=int, default=5, help="simulated records to predict (with --model)")
    parser.add_argument("--config", default=str(HUB_CONFIGS_DIR / "tiny.json"))
    parser.add_argument("--output", default="outputs/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("enecg_hf").setLevel(logging.INFO)
    if args.model:
        # Seed 2024 differs from the training data's seed (42): these records were never seen in training.
        result = predict_with_trained_model(args.model, args.num_records, seed=2024 + args.seed)
        print(json.dumps(result, indent=2))
        return result

    torch.manual_seed(args.seed)
    config = EnECGConfig.from_json_file(args.config)
    model = EnECGModel.from_expert_sources(config).eval()  # logs loudly for experts without pretrained weights
    model.save_pretrained(args.output)
    export_serving_files(model, args.output)  # pipeline, handler.py, requirements.txt

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
        "label": config.task_names[0],
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
