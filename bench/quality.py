"""Quality of EnECG on real ECGs: subject-level k-fold cross-validation on ../shared/data, through the package.

Tasks and records (built with `enecg_hf.data.build_dataset`):
    rr_interval  LUDB (cardiologist R-peak annotations of lead II)                       regression, ms
    age, sex     LUDB + Challenge 2020/2021 samples + PTB-XL sample                      regression / 2 classes
    arrhythmia   the same records, 3 groups: sinus (normal, brady, tachy) / atrial fibrillation or flutter / other

Every row trains with the package's own core (`enecg_hf.training.fitting`: the code `train.py` runs) on expert
features computed once per record, and is scored with the package's local `evaluate` modules against the same
subject folds, for several seeds (folds and initial weights change with the seed). Rows:

    baseline:*           mean / majority class of the training folds; for RR also neurokit2 R-peaks (no learning)
    enecg                EnECG with the DEFAULT settings of train.py (learned gate, stacked strategy, LoRA heads)
    expert:<name>        that expert alone: its head in the default fit (trained on its own loss, early-stopped)
    uniform_ensemble     the heads of the default fit, averaged with equal weights
    ablation:*           the default with one change (docs/benchmarks.md explains each)
    paper                the research code's recipe: LoRA heads + gate trained jointly on the mixture's loss only,
                         5 epochs at lr 1e-4, batch 16, no head standardisation, no class weights

The experts are the tiny sizes of hub_configs/tiny.json with RANDOM weights (the Hub is unreachable): the foundation
experts are random feature maps; the ECG-features expert (neurokit2 measurements) carries real knowledge. With
`--pretrained` (default on) the experts of hub_configs/offline_pretrained.json are added under a `pretrained/` prefix:
openecg and DeepFADE with their REAL weights from their PyPI wheels, plus the paper-size features and DLinear experts;
rows `expert:pretrained/<name>` and `enecg_offline_pretrained` (EnECG, default settings, over those four experts).
openecg was trained on LUDB: every row also carries `metrics_excluding_ludb`, the same folds scored on their
non-LUDB test records only, which is how openecg must be judged.

Expert features are computed once per record and kept in `--feature-cache` (default ~/.cache/enecg_hf/quality),
keyed by the experts' config and the records; DeepFADE over 12 leads takes ~8 s a record on one thread.

    python bench/quality.py --update-docs        # all records, 5 folds, 3 seeds
    python bench/quality.py --quick              # a few records, 2 folds, few epochs, no pretrained experts (~1 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from docs_sections import replace_section


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_DATA = Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data"))
SOURCES = {"ludb": "ludb", "challenge2021_sample50": "challenge", "challenge2020_awwong1": "challenge",
           "challenge2020_sebgood": "challenge", "ptbxl_sample500": "ptb-xl"}
QUICK_LIMITS = {"ludb": 24, "challenge2021_sample50": 6, "challenge2020_awwong1": 4, "challenge2020_sebgood": 4,
                "ptbxl_sample500": 12}
ARRHYTHMIA_GROUPS = ("sinus", "af_flutter", "other")
# enecg_hf.data.ARRHYTHMIA_CLASSES -> the three groups (few records per rhythm: finer classes cannot be scored).
GROUP_OF_CLASS = {"sinus_rhythm": "sinus", "sinus_bradycardia": "sinus", "sinus_tachycardia": "sinus",
                  "atrial_fibrillation": "af_flutter", "atrial_flutter": "af_flutter", "other": "other"}
# The benchmarked tasks of enecg_hf.data.TASKS and the sources that label them (RR: LUDB's cardiologist annotations).
TASK_SOURCES = {"rr_interval": ("ludb",), "age": tuple(SOURCES), "sex": tuple(SOURCES), "arrhythmia": tuple(SOURCES)}
HEADLINE = {"regression": ("mae", "rmse"), "single_label_classification": ("auroc", "f1", "accuracy")}
# Published figures (../shared/REFERENCE.md): MIMIC-IV-ECG subset for ECG-MoE / ECG-FM; other cohorts for the anchors.
PUBLISHED = {
    "rr_interval": {"ECG-MoE (same authors' follow-up)": {"mae": 76.37}, "ECG-FM, best single baseline there": {"mae": 147.3}},
    "age": {"ECG-MoE": {"mae": 12.83}, "ECG-FM, best single baseline there": {"mae": 13.49},
            "Attia 2019 (Mayo cohort, CNN)": {"mae": 6.9}},
    "sex": {"ECG-MoE": {"f1": 0.69}, "Attia 2019 (Mayo cohort, CNN)": {"accuracy": 0.904, "auroc": 0.97}},
    "arrhythmia": {"ECG-MoE": {"accuracy": 0.73}, "ECG-FM, best single baseline there": {"accuracy": 0.49}},
}
PAPER = {"config": {"adaptation": "lora", "head_standardize": False, "expert_loss_weight": 0.0},
         "fit": {"strategy": "joint", "epochs": 5, "learning_rate": 1e-4, "batch_size": 16, "class_weighting": "none"}}
# name -> (label, config overrides, FitSettings overrides). Each ablation changes one thing of the default.
ABLATIONS = {
    "ablation:gate_in_sample": ("gate fitted on the heads' in-sample predictions instead of out-of-fold ones", {},
                                {"gate_predictions": "in_sample"}),
    "ablation:stacked_gate_only": ("gate without its input-dependent part (stacked weights only)", None, None),
    "ablation:full_heads": ("heads trained fully instead of LoRA", {"adaptation": "full"}, {}),
    "ablation:no_standardization": ("heads read raw embeddings (no standardisation)", {"head_standardize": False}, {}),
    "ablation:no_early_stopping": ("heads trained all epochs (no cross-validated early stopping)", {},
                                   {"early_stopping": False, "patience": 0}),
    "ablation:joint": ("heads and gate trained jointly on mixture + per-expert losses (30 epochs)", {},
                       {"strategy": "joint", "epochs": 30}),
    "ablation:joint_mixture_loss_only": ("joint training on the mixture's loss only (30 epochs)",
                                         {"expert_loss_weight": 0.0}, {"strategy": "joint", "epochs": 30}),
    "ablation:no_class_weights": ("classification without class weights", {}, {"class_weighting": "none"}),
}
ROW_LABELS = {
    "baseline:mean_or_majority": "mean / majority of the training folds",
    "baseline:neurokit_rr": "neurokit2 R-peaks, lead II, no learning",
    "uniform_ensemble": "uniform average of the same heads",
    "enecg": "**EnECG, default settings** (learned gate, LoRA heads)",
    "paper": "research-code recipe (joint LoRA, mixture loss, 5 epochs, lr 1e-4)",
    "enecg_offline_pretrained": "**EnECG over offline_pretrained.json** (openecg, DeepFADE: real weights; features, DLinear)",
    **{name: label for name, (label, _, _) in ABLATIONS.items()},
}


# ---------------------------------------------------------------------------------------------------- data
def load_records(data_dir: Path, limits: dict[str, int] | None) -> tuple[Any, list[dict]]:
    """(signals (n, 12, 5000) float32, one dict of labels per record) from every source, via the package builders."""
    import datasets
    import numpy as np

    from enecg_hf.data import build_dataset

    datasets.disable_progress_bars()
    signals, meta = [], []
    for source, fmt in SOURCES.items():
        folder = data_dir / source
        if not folder.is_dir():
            print(f"[quality] {folder} not found: skipped", flush=True)
            continue
        dataset = build_dataset(fmt, str(folder), limit=limits.get(source) if limits else None)
        rhythm_feature = dataset.features.get("arrhythmia")
        rhythm_name = getattr(rhythm_feature, "int2str", None)  # a ClassLabel column holds class indices
        for row in dataset:
            signal = np.asarray(row["signal"], dtype=np.float32)
            if signal.shape != (12, 5000) or not np.isfinite(signal).all():
                continue
            rhythm = row.get("arrhythmia")
            if rhythm is not None and rhythm_name is not None:
                rhythm = rhythm_name(int(rhythm))
            signals.append(signal)
            meta.append({"source": source, "subject_id": f"{source}/{row['subject_id'] or row['record_id']}",
                         "rr_interval": row.get("rr_interval") if source == "ludb" else None, "age": row.get("age"),
                         "sex": row.get("sex"), "arrhythmia": GROUP_OF_CLASS.get(rhythm) if rhythm else None})
    signals = np.stack(signals)
    # Identical signals (e.g. Challenge E07509/E07510) are one subject: never on both sides of a fold.
    first_subject: dict[str, str] = {}
    for signal, record in zip(signals, meta):
        digest = hashlib.sha1(signal.tobytes()).hexdigest()
        record["subject_id"] = first_subject.setdefault(digest, record["subject_id"])
    return signals, meta


def task_labels(task: str, meta: list[dict]):
    """(rows with a label, TaskSpec, encoded labels) of one task."""
    import numpy as np

    from dataclasses import replace

    from enecg_hf.data import TASKS

    spec = TASKS[task]
    if task == "arrhythmia":
        spec = replace(spec, class_names=ARRHYTHMIA_GROUPS)
    rows, values = [], []
    for i, record in enumerate(meta):
        value = record[task]
        if record["source"] in TASK_SOURCES[task] and value is not None and value == value:
            rows.append(i)
            values.append(spec.encode(value))
    return np.asarray(rows), spec, np.asarray(values, dtype=np.float32 if spec.is_regression else np.int64)


# ---------------------------------------------------------------------------------------------------- models
def base_config(config_path: Path) -> dict:
    raw = json.loads(config_path.read_text())
    raw.pop("model_type", None)
    for expert in raw["experts"]:
        expert["pretrained"] = None  # random weights (no converted checkpoints; the Hub is unreachable)
    return raw


def task_config(raw: dict, spec, experts: list[str] | None = None, **overrides):
    from enecg_hf import EnECGConfig

    config = {k: v for k, v in raw.items() if k not in ("id2label", "label2id", "num_labels", "label_unit")}
    config.update(spec.config_fields())
    if experts is not None:
        config["experts"] = [e for e in raw["experts"] if e["name"] in experts]
    config.update(overrides)
    return EnECGConfig(**config)


def expert_features(raw: dict, signals, cache_dir: Path | None, seed: int) -> dict:
    """Every expert's embedding and the gate inputs of every record, from the cache when it has them."""
    import torch
    from safetensors.torch import load_file, save_file

    from enecg_hf import EnECGModel
    from enecg_hf.training import FeatureTable
    from enecg_hf.data import TASKS

    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode())
    digest.update(signals.tobytes())
    file = cache_dir / f"features-{digest.hexdigest()[:16]}.safetensors" if cache_dir else None
    if file is not None and file.is_file():
        print(f"[quality] expert features from {file}", flush=True)
        return load_file(str(file))
    torch.manual_seed(seed)
    model = EnECGModel.from_expert_sources(task_config(raw, TASKS["rr_interval"]))
    table = FeatureTable.from_model(model, torch.from_numpy(signals), torch.zeros(len(signals)), batch_size=8)
    features = dict(zip(model.expert_names, table.expert_embeddings))
    features["gate_inputs"] = table.gate_inputs
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in features.items()}, str(file.with_suffix(".tmp")))
        file.with_suffix(".tmp").rename(file)
    return features


def row_definitions(regression: bool, quick: bool) -> dict[str, dict]:
    """Rows that need a fit of their own (the single-expert, uniform and stacked-only rows come from `enecg`'s)."""
    rows = {"enecg": {"config": {}, "fit": {}},
            "paper": {"config": dict(PAPER["config"]), "fit": dict(PAPER["fit"])}}
    for name, (_, config, fit) in ABLATIONS.items():
        if config is None or (regression and name == "ablation:no_class_weights"):
            continue
        rows[name] = {"config": dict(config), "fit": dict(fit)}
    if quick:  # few epochs everywhere
        for row in rows.values():
            row["fit"]["epochs"] = min(row["fit"].get("epochs", 100), 4)
            row["fit"]["gate_epochs"] = min(row["fit"].get("gate_epochs", 100), 4)
            row["fit"]["inner_folds"] = 2
    return rows


def neurokit_rr(signal) -> float | None:
    """Mean RR (ms) from neurokit2 R peaks on lead II at 500 Hz; None when fewer than two peaks are found."""
    import neurokit2 as nk
    import numpy as np

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            _, info = nk.ecg_peaks(nk.ecg_clean(signal[1], sampling_rate=500), sampling_rate=500)
        except Exception:
            return None
    peaks = np.asarray(info["ECG_R_Peaks"], dtype=float)
    return float(np.diff(peaks).mean() / 500 * 1000.0) if peaks.size >= 2 else None


def summarize(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample std over folds and seeds; a metric undefined on some folds (AUROC with one class) uses the rest."""
    import numpy as np

    summary = {}
    for key in per_fold[0]:
        values = np.asarray([f[key] for f in per_fold], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            summary[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                            "folds": int(values.size)}
    return summary


# ---------------------------------------------------------------------------------------------------- driver
def run_task(task, signals_meta, features, raw, args, metric_for, pretrained_raw=None) -> dict:
    import numpy as np
    import torch

    from enecg_hf import EnECGModel
    from enecg_hf.training import FeatureTable, FitSettings, baseline_predictions, fit_enecg, predict, score
    from enecg_hf.training.fitting import subject_folds

    signals, meta = signals_meta
    rows_idx, spec, y = task_labels(task, meta)
    groups = np.asarray([meta[i]["subject_id"] for i in rows_idx])
    metric = metric_for(spec.problem_type)
    expert_names = [e["name"] for e in raw["experts"]]
    pretrained_names = [e["name"] for e in pretrained_raw["experts"]] if pretrained_raw else []
    print(f"[quality] {task}: {len(rows_idx)} records, {len(set(groups))} subjects", flush=True)
    per_fold: dict[str, list[dict]] = {}
    per_fold_clean: dict[str, list[dict]] = {}  # the same folds, scored on their non-LUDB test records
    fit_reports: dict[str, list[dict]] = {}
    not_ludb = np.asarray([meta[i]["source"] != "ludb" for i in rows_idx])
    score_clean = len(TASK_SOURCES[task]) > 1

    def record(row: str, logits, test, seed: int, fold: int) -> None:
        logits = np.asarray(logits, dtype=np.float64).reshape(len(test), -1)
        per_fold.setdefault(row, []).append(score({"logits": logits, "labels": y[test]}, spec, metric))
        keep = not_ludb[test]
        if score_clean and keep.sum() >= 2:
            per_fold_clean.setdefault(row, []).append(score({"logits": logits[keep], "labels": y[test][keep]}, spec,
                                                            metric))
    measured = [neurokit_rr(signals[i]) for i in rows_idx] if task == "rr_interval" else None
    definitions = row_definitions(spec.is_regression, args.quick)
    for seed in range(args.seed, args.seed + args.seeds):
        folds = subject_folds(groups, args.folds, seed)
        for f, (train, test) in enumerate(folds):
            record("baseline:mean_or_majority", baseline_predictions(y[train], y[test], spec)["logits"], test, seed, f)
            if measured is not None:
                fallback = float(y[train].mean())
                record("baseline:neurokit_rr", [measured[i] if measured[i] is not None else fallback for i in test],
                       test, seed, f)
        table = FeatureTable([features[n][rows_idx] for n in expert_names], features["gate_inputs"][rows_idx],
                             torch.from_numpy(y), groups)
        for row, definition in definitions.items():
            if (args.rows and row not in args.rows) or (row != "enecg" and seed >= args.seed + args.ablation_seeds):
                continue
            torch.manual_seed(seed)
            model = EnECGModel(task_config(raw, spec, **definition["config"]))
            settings = FitSettings(seed=seed, **definition["fit"])
            for f, (train, test) in enumerate(folds):
                report = fit_enecg(model, table, train, settings, name=f"seed{seed}-fold{f}")
                out = predict(model, table, test)
                record(row, out["logits"], test, seed, f)
                fit_reports.setdefault(row, []).append(report.to_dict())
                if row == "enecg":  # the same heads alone, averaged, and mixed by the stacked weights only
                    experts = out["expert_logits"]
                    for i, name in enumerate(expert_names):
                        record(f"expert:{name}", experts[:, i], test, seed, f)
                    record("uniform_ensemble", experts.mean(1), test, seed, f)
                    stacked = np.asarray([report.stacked_weights[n] for n in expert_names])
                    record("ablation:stacked_gate_only", (experts * stacked[None, :, None]).sum(1), test, seed, f)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            definition["trainable_params"] = trainable
            print(f"[quality]   {task} seed {seed} {row}: " + ", ".join(
                f"{k} {v['mean']:.4g}" for k, v in summarize(per_fold[row][-len(folds):]).items()
                if k in HEADLINE[spec.problem_type]), flush=True)
    if pretrained_names and (not args.rows or "enecg_offline_pretrained" in args.rows):
        for seed in range(args.seed, args.seed + args.seeds):
            folds = subject_folds(groups, args.folds, seed)
            table = FeatureTable([features[n][rows_idx] for n in pretrained_names], features["gate_inputs"][rows_idx],
                                 torch.from_numpy(y), groups)
            torch.manual_seed(seed)
            model = EnECGModel(task_config(pretrained_raw, spec))
            settings = FitSettings(seed=seed, **({"epochs": 4, "gate_epochs": 4, "inner_folds": 2} if args.quick else {}))
            for f, (train, test) in enumerate(folds):
                fit_enecg(model, table, train, settings, name=f"seed{seed}-fold{f}")
                out = predict(model, table, test)
                record("enecg_offline_pretrained", out["logits"], test, seed, f)
                for i, name in enumerate(pretrained_names):
                    record(f"expert:{name}", out["expert_logits"][:, i], test, seed, f)
            definitions["enecg_offline_pretrained"] = {"trainable_params": sum(
                p.numel() for p in model.parameters() if p.requires_grad)}
            print(f"[quality]   {task} seed {seed} enecg_offline_pretrained: " + ", ".join(
                f"{k} {v['mean']:.4g}" for k, v in summarize(per_fold["enecg_offline_pretrained"][-len(folds):]).items()
                if k in HEADLINE[spec.problem_type]), flush=True)

    rows = {}
    for row, metrics in per_fold.items():
        label = ROW_LABELS.get(row) or f"{row.split(':', 1)[1]} expert alone"
        entry = {"label": label, "trainable_params": definitions.get(row, {}).get("trainable_params", 0),
                 "metrics": summarize(metrics), "per_fold": [{k: v for k, v in m.items() if math.isfinite(v)}
                                                             for m in metrics]}
        if per_fold_clean.get(row):
            entry["metrics_excluding_ludb"] = summarize(per_fold_clean[row])
        if row in fit_reports and row in ("enecg", "ablation:gate_in_sample"):
            weights = np.asarray([list(r["stacked_weights"].values()) for r in fit_reports[row] if r["stacked_weights"]])
            if len(weights):
                entry["mean_stacked_weights"] = dict(zip(expert_names, np.round(weights.mean(0), 3).tolist()))
        rows[row] = entry
    counts = {} if spec.is_regression else {c: int((y == i).sum()) for i, c in enumerate(spec.class_names)}
    return {"problem_type": spec.problem_type, "records": int(len(rows_idx)), "subjects": int(len(set(groups))),
            "sources": list(TASK_SOURCES[task]), "class_counts": counts,
            "label_mean": float(y.mean()) if spec.is_regression else None, "rows": rows,
            "verdict": verdict(rows, spec, expert_names)}


def verdict(rows: dict, spec, expert_names: list[str]) -> dict:
    """The bar for the default EnECG: within 5 % (MAE) / 0.02 (AUROC) of its best single expert and of the uniform
    average of its heads, and better than the trivial baseline."""
    if "enecg" not in rows:
        return {}
    key, sign = ("mae", -1) if spec.is_regression else ("auroc", 1)
    value = lambda row: rows[row]["metrics"][key]["mean"]  # noqa: E731
    experts = {f"expert:{n}": value(f"expert:{n}") for n in expert_names if key in rows[f"expert:{n}"]["metrics"]}
    best = max(experts, key=lambda r: sign * experts[r])
    within = (lambda ours, ref: ours <= ref * 1.05) if spec.is_regression else (lambda ours, ref: ours >= ref - 0.02)
    ours = value("enecg")
    return {"metric": key, "enecg": ours, "best_expert": best, "best_expert_value": experts[best],
            "uniform": value("uniform_ensemble"), "baseline": value("baseline:mean_or_majority"),
            "as_good_as_best_expert": bool(within(ours, experts[best])),
            "as_good_as_uniform": bool(within(ours, value("uniform_ensemble"))),
            "beats_baseline": bool(sign * (ours - value("baseline:mean_or_majority")) > 0)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few records per source, 2 folds, few epochs")
    parser.add_argument("--output", default=str(RESULTS / "quality.json"))
    parser.add_argument("--update-docs", action="store_true", help="rewrite the quality table in docs/benchmarks.md")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--config", default="hub_configs/tiny.json", help="expert sizes (random weights)")
    parser.add_argument("--tasks", default=",".join(TASK_SOURCES))
    parser.add_argument("--rows", default="", help="comma-separated rows to run (default all)")
    parser.add_argument("--folds", type=int, default=None, help="default 5 (2 with --quick)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3; 1 with --quick)")
    parser.add_argument("--ablation-seeds", type=int, default=None,
                        help="seeds of the ablation rows (default: --seeds); the main rows always use --seeds")
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="merge runs made with different --tasks or --rows into --output (and the docs)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                        help="add the experts of --pretrained-config with real weights (default: on, off with --quick)")
    parser.add_argument("--pretrained-config", default="hub_configs/offline_pretrained.json")
    parser.add_argument("--features-only", action="store_true", help="compute (and cache) the expert features, then stop")
    parser.add_argument("--feature-cache", default=str(Path.home() / ".cache" / "enecg_hf" / "quality"),
                        help="folder for computed expert features ('' for none)")
    args = parser.parse_args(argv)
    args.folds = args.folds or (2 if args.quick else 5)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.pretrained = (not args.quick) if args.pretrained is None else args.pretrained
    args.ablation_seeds = args.ablation_seeds or args.seeds
    if args.combine:
        return combine(args)
    args.rows = {r for r in args.rows.split(",") if r}
    if args.rows - {"enecg_offline_pretrained"}:  # the other rows are judged against enecg and the uniform average
        args.rows |= {"enecg", "uniform_ensemble"}

    import torch

    from enecg_hf.training import load_metric

    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()
    data_dir = Path(args.data_dir)
    if not (data_dir / "ludb").is_dir():
        raise SystemExit(f"No LUDB folder under {data_dir}: set --data-dir or ENECG_DATA_DIR")
    signals, meta = load_records(data_dir, QUICK_LIMITS if args.quick else None)
    print(f"[quality] {len(meta)} records", flush=True)
    config_path = REPO / args.config if not Path(args.config).is_absolute() else Path(args.config)
    raw = base_config(config_path)

    t0 = time.perf_counter()
    cache_dir = Path(args.feature_cache) if args.feature_cache else None
    features = expert_features(raw, signals, cache_dir, args.seed)
    pretrained_raw = None
    if args.pretrained:
        pretrained_raw = json.loads((REPO / args.pretrained_config).read_text())
        pretrained_raw.pop("model_type", None)
        for key in ("id2label", "label2id", "num_labels", "problem_type", "label_name", "label_unit"):
            pretrained_raw.pop(key, None)
        pretrained_raw["problem_type"] = "regression"
        for expert in pretrained_raw["experts"]:
            expert["name"] = f"pretrained/{expert['name']}"
        # The gate inputs are the tiny config's (lead II at 500 samples) in both feature sets: use those.
        pretrained_raw.update(gate_leads=raw["gate_leads"], gate_input_length=raw["gate_input_length"])
        extra = expert_features(pretrained_raw, signals, cache_dir, args.seed)
        features.update({k: v for k, v in extra.items() if k != "gate_inputs"})
    feature_seconds = time.perf_counter() - t0
    expert_names = [e["name"] for e in raw["experts"]]
    print(f"[quality] expert features of {len(meta)} records in {feature_seconds:.0f} s", flush=True)
    if args.features_only:
        return {"features": sorted(features)}
    metrics: dict[str, Any] = {}

    def metric_for(problem_type: str):
        return metrics.setdefault(problem_type, load_metric(problem_type))

    results: dict[str, Any] = {
        "benchmark": "quality",
        "quick": args.quick,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {"source": "enecg_hf.data.build_dataset", "records": len(meta),
                 "records_per_source": {s: sum(r["source"] == s for r in meta) for s in SOURCES}},
        "setup": {
            "config": args.config, "experts": expert_names, "folds": args.folds, "seeds": args.seeds,
            "pretrained_config": args.pretrained_config if args.pretrained else None,
            "pretrained_experts": [e["name"] for e in pretrained_raw["experts"]] if pretrained_raw else [],
            "seed": args.seed, "ablation_seeds": args.ablation_seeds, "training": "enecg_hf.training.fitting (train.py's core); FitSettings defaults unless "
            "the row says otherwise", "metrics": "enecg_hf/metrics (evaluate)",
            "cv": "subject-level k-fold (no subject in two folds), repeated with each seed; a fresh fit per fold and row",
            "random_weights": "every expert has random weights: the Hub is unreachable; tiny sizes",
            "arrhythmia_groups": "sinus = sinus rhythm/bradycardia/tachycardia; af_flutter = atrial fibrillation or "
                                 "flutter; other = any other rhythm statement (sinus arrhythmia, ...)",
        },
        "published": PUBLISHED,
        "tasks": {},
    }
    for task in args.tasks.split(","):
        results["tasks"][task] = run_task(task, (signals, meta), features, raw, args, metric_for, pretrained_raw)
    results["run"] = {"load_average_start": list(load), "load_average_end": list(os.getloadavg()),
                      "feature_extraction_s": feature_seconds, "elapsed_s": time.perf_counter() - started,
                      "torch_threads": args.threads, "cpu_count": os.cpu_count()}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    print_table(results)
    print(f"[quality] wrote {output} in {results['run']['elapsed_s']:.0f} s")
    if args.update_docs:
        update_docs(results)
    return results


def combine(args) -> dict:
    """One result from runs over different tasks or rows (e.g. two processes, one per core)."""
    parts = [json.loads(Path(path).read_text()) for path in args.combine]
    results = parts[0]
    for part in parts[1:]:
        for task, block in part["tasks"].items():
            if task not in results["tasks"]:
                results["tasks"][task] = block
                continue
            mine = results["tasks"][task]  # the same task, other rows (e.g. --rows enecg_offline_pretrained)
            mine["rows"].update({row: r for row, r in block["rows"].items() if row not in mine["rows"]})
            mine["verdict"] = mine.get("verdict") or block.get("verdict")
        for key in ("pretrained_config", "pretrained_experts"):
            results["setup"][key] = results["setup"].get(key) or part["setup"].get(key)
        results["run"]["elapsed_s"] = max(results["run"]["elapsed_s"], part["run"]["elapsed_s"])
        results["run"]["processes"] = results["run"].get("processes", 1) + 1
    results["tasks"] = {task: results["tasks"][task] for task in TASK_SOURCES if task in results["tasks"]}
    Path(args.output).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    print_table(results)
    if args.update_docs:
        update_docs(results)
    return results


def print_table(results: dict) -> None:
    for task, block in results["tasks"].items():
        print(f"\n== {task} ({block['records']} records, {block['subjects']} subjects) ==")
        for row, r in block["rows"].items():
            print(f"  {row:34s} " + "  ".join(f"{m} {r['metrics'][m]['mean']:.3g}±{r['metrics'][m]['std']:.2g}"
                                             for m in HEADLINE[block["problem_type"]] if m in r["metrics"]))
        if block.get("verdict"):
            print(f"  verdict: {block['verdict']}")


def docs_table(results: dict) -> str:
    s = results["setup"]
    lines = [f"Setup: {s['folds']}-fold subject-level CV × {s['seeds']} seeds; experts {', '.join(s['experts'])} from "
             f"`{s['config']}` with random weights; every row trained by the package's core (`train.py` defaults "
             f"unless the row says otherwise); metrics from {s['metrics']}; data: "
             f"{results['data']['records']} records (" + ", ".join(
                 f"{k} {v}" for k, v in results["data"]["records_per_source"].items()) + "). Mean ± std over "
             "folds and seeds."
             + (f" Rows named `pretrained/…` and the offline_pretrained EnECG use the experts of "
                f"`{s['pretrained_config']}`: openecg and DeepFADE with their real weights from the installed wheels, "
                f"the ECG-features expert, DLinear with random weights." if s.get("pretrained_experts") else "")
             + "\n"]
    for task, block in results["tasks"].items():
        metrics = HEADLINE[block["problem_type"]]
        key = metrics[0]
        clean = any("metrics_excluding_ludb" in r for r in block["rows"].values())
        extra = f"; classes {block['class_counts']}" if block["class_counts"] else f"; label mean {block['label_mean']:.1f}"
        lines.append(f"**{task}** ({block['records']} records, {block['subjects']} subjects{extra})\n")
        lines.append("| row | " + " | ".join(metrics) + (f" | {key} without LUDB |" if clean else " |")
                     + " trainable params |")
        lines.append("|---|" + "---:|" * (len(metrics) + clean) + "---:|")
        for row, r in block["rows"].items():
            cells = [f"{r['metrics'][m]['mean']:.3g} ± {r['metrics'][m]['std']:.2g}" if m in r["metrics"] else "n/a"
                     for m in metrics]
            if clean:
                c = r.get("metrics_excluding_ludb", {}).get(key)
                cells.append(f"{c['mean']:.3g} ± {c['std']:.2g}" if c else "")
            params = f"{r['trainable_params']:,}" if r["trainable_params"] else ""
            seeds = len(r["per_fold"]) // s["folds"]
            label = r["label"] + (f" ({seeds} seed{'s' if seeds > 1 else ''})" if seeds != s["seeds"] else "")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {params} |")
        for source, values in PUBLISHED.get(task, {}).items():
            cells = [f"*{values[m]}*" if m in values else "" for m in metrics] + ([""] if clean else [])
            lines.append(f"| *published: {source}* | " + " | ".join(cells) + " | |")
        v = block.get("verdict")
        if v:
            lines.append(f"\nDefault EnECG {v['metric']} {v['enecg']:.4g}: best single expert "
                         f"({v['best_expert'].split(':', 1)[1]}) {v['best_expert_value']:.4g}, uniform average "
                         f"{v['uniform']:.4g}, trivial baseline {v['baseline']:.4g} — as good as the best expert: "
                         f"{'yes' if v['as_good_as_best_expert'] else 'no'}; as the uniform average: "
                         f"{'yes' if v['as_good_as_uniform'] else 'no'}; beats the baseline: "
                         f"{'yes' if v['beats_baseline'] else 'no'}.")
        lines.append("")
    run = results["run"]
    lines.append(f"Run {results['created']}: {run['elapsed_s'] / 60:.0f} min on {run['cpu_count']} shared cores "
                 f"({run['torch_threads']} torch thread), load average {run['load_average_start'][0]:.2f} at start.")
    return "\n".join(lines)


def update_docs(results: dict) -> None:
    replace_section("quality", docs_table(results))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
