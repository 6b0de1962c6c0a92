"""Quality of EnECG on real ECGs: subject-level k-fold CV × seeds on ../shared/data, every piece from the package.

Records: `enecg_hf.data.build_dataset` per source; tasks: `enecg_hf.data.TASKS` (arrhythmia in 3 groups); configs:
`enecg_hf.training.configs.build_config`; folds: `fitting.subject_folds`; training: `fit_enecg`/`predict` (train.py's
core) on expert features computed once (`FeatureTable.from_model`, cached in --feature-cache); scores and the trivial
baseline: `enecg_hf.training.scoring`. Rows and what each measures: docs/benchmarks.md, "Quality on real ECGs".

    python bench/quality.py --update-docs        # all records, 5 folds, 3 seeds (~1 h on 2 cores)
    python bench/quality.py --quick              # a few records, 2 folds, few epochs, no pretrained experts
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from harness import DATA_DIR, REPO, machine_info, parser, save


SOURCES = {"ludb": "ludb", "challenge2021_sample50": "challenge", "challenge2020_awwong1": "challenge",
           "challenge2020_sebgood": "challenge", "ptbxl_sample500": "ptb-xl"}
QUICK_LIMITS = {"ludb": 24, "challenge2021_sample50": 6, "challenge2020_awwong1": 4, "challenge2020_sebgood": 4,
                "ptbxl_sample500": 12}
# enecg_hf.data.ARRHYTHMIA_CLASSES -> three groups (few records per rhythm: finer classes cannot be scored).
GROUP_OF_CLASS = {"sinus_rhythm": "sinus", "sinus_bradycardia": "sinus", "sinus_tachycardia": "sinus",
                  "atrial_fibrillation": "af_flutter", "atrial_flutter": "af_flutter", "other": "other"}
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
# Rows with a fit of their own: name -> (label, config overrides, FitSettings overrides); each ablation changes one
# thing of the default. `None`: the row comes from the default fit's heads.
FITTED_ROWS = {
    "enecg": ("**EnECG, default settings** (learned gate, LoRA heads)", {}, {}),
    "paper": ("research-code recipe (joint LoRA, mixture loss, 5 epochs, lr 1e-4)",
              {"adaptation": "lora", "head_standardize": False, "expert_loss_weight": 0.0},
              {"strategy": "joint", "epochs": 5, "learning_rate": 1e-4, "batch_size": 16, "class_weighting": "none"}),
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
    "enecg_offline_pretrained": (("**EnECG over offline_pretrained.json** (openecg, DeepFADE: real weights; "
                                  "features, DLinear)"), {}, {}),
}
QUICK_FIT = {"epochs": 4, "gate_epochs": 4, "inner_folds": 2}
ROW_LABELS = {"baseline:mean_or_majority": "mean / majority of the training folds",
              "baseline:neurokit_rr": "neurokit2 R-peaks, lead II, no learning",
              "uniform_ensemble": "uniform average of the same heads",
              **{name: label for name, (label, _, _) in FITTED_ROWS.items()}}


def load_records(data_dir: Path, limits: dict[str, int] | None):
    """Every source through the package builders, as one dataset (`signal`, `source`, `record_id`: what the feature
    store keys records by) in record order, and one dict of labels per record."""
    import datasets
    import numpy as np

    from enecg_hf.data import build_dataset

    datasets.disable_progress_bars()
    parts, meta, first_subject = [], [], {}
    for source, fmt in SOURCES.items():
        if not (data_dir / source).is_dir():
            print(f"[quality] {data_dir / source} not found: skipped", flush=True)
            continue
        dataset = build_dataset(fmt, str(data_dir / source), limit=limits.get(source) if limits else None)
        rhythm_name = getattr(dataset.features.get("arrhythmia"), "int2str", None)  # a ClassLabel holds indices
        keep = []
        for i, row in enumerate(dataset):
            signal = np.asarray(row["signal"], dtype=np.float32)
            if signal.shape != (12, 5000) or not np.isfinite(signal).all():
                continue
            rhythm = row.get("arrhythmia")
            rhythm = rhythm_name(int(rhythm)) if rhythm is not None and rhythm_name else rhythm
            subject = f"{source}/{row['subject_id'] or row['record_id']}"
            keep.append(i)  # identical signals (Challenge E07509/E07510) are one subject
            meta.append({"source": source, "subject_id": first_subject.setdefault(signal.tobytes(), subject),
                         "rr_interval": row.get("rr_interval") if source == "ludb" else None, "age": row.get("age"),
                         "sex": row.get("sex"), "arrhythmia": GROUP_OF_CLASS.get(rhythm) if rhythm else None})
        parts.append(dataset.select(keep).select_columns(["record_id", "source", "signal"]))
    return datasets.concatenate_datasets(parts), meta


def config_dict(path: Path, experts_prefix: str = "", gate_from: dict | None = None) -> dict:
    """The experts of a config file with random weights (`pretrained` sources kept only for `experts_prefix`)."""
    raw = json.loads(path.read_text())
    raw.pop("model_type", None)
    if not experts_prefix:
        for expert in raw["experts"]:
            expert["pretrained"] = None  # random weights (no converted checkpoints; the Hub is unreachable)
        return raw
    for key in ("id2label", "label2id", "num_labels", "problem_type", "label_name", "label_unit"):
        raw.pop(key, None)
    raw["problem_type"] = "regression"
    for expert in raw["experts"]:
        expert["name"] = f"{experts_prefix}{expert['name']}"
    # Both feature sets share the gate inputs of the first config (lead II at 500 samples).
    return {**raw, "gate_leads": gate_from["gate_leads"], "gate_input_length": gate_from["gate_input_length"]}


def make_model(raw: dict, spec, load_experts: bool = False, **overrides):
    """A model of config `raw` for task `spec` (train.py's config building), random experts unless `load_experts`."""
    from enecg_hf import EnECGModel
    from enecg_hf.training import TrainScriptArguments
    from enecg_hf.training.configs import build_config

    config = build_config(TrainScriptArguments(), spec, {**raw, **overrides})
    return EnECGModel.from_expert_sources(config) if load_experts else EnECGModel(config)


def expert_features(raw: dict, records, store: str, seed: int) -> dict:
    """Every expert's embedding and the gate inputs of every record, from the package's feature store (computed
    there once per record and expert, shared with train.py and every later run)."""
    import torch

    from enecg_hf.data import TASKS
    from enecg_hf.features import build_features, embedding_column

    torch.manual_seed(seed)
    model = make_model(raw, TASKS["rr_interval"], load_experts=True)
    table = build_features(records, model, store_dir=store, batch_size=8)[0].with_format("torch")[:]
    return {**{n: table[embedding_column(n)].float() for n in model.expert_names},
            "gate_inputs": table["gate_inputs"].float()}


def measured_rr(signals) -> list[float | None]:
    """Mean RR (ms) of lead II by the ECG-features expert's neurokit2 measurement at 500 Hz (None: not measured)."""
    from enecg_hf.configuration_enecg import EnECGExpertConfig
    from enecg_hf.expert_features import EnECGFeaturesExpert
    from enecg_hf.preprocessing_enecg import STANDARD_LEAD_NAMES

    expert = EnECGFeaturesExpert(EnECGExpertConfig("rr", "features", 5000, ["II"]), STANDARD_LEAD_NAMES)
    rr = [expert.measure(signal[1])["rr_mean"] * 1000.0 for signal in signals]
    return [value if math.isfinite(value) else None for value in rr]


def run_task(task: str, records, meta, features: dict, raws: dict, args) -> dict:
    from dataclasses import replace

    import numpy as np
    import torch

    from enecg_hf.data import TASKS
    from enecg_hf.training import (FeatureTable, FitSettings, baseline_predictions, fit_enecg, load_metric, predict,
                                   score, summarize)
    from enecg_hf.training.fitting import subject_folds

    spec = TASKS[task] if task != "arrhythmia" else replace(TASKS[task], class_names=tuple(dict.fromkeys(
        GROUP_OF_CLASS.values())))
    rows_idx = np.asarray([i for i, r in enumerate(meta) if r["source"] in TASK_SOURCES[task]
                           and r[task] is not None and r[task] == r[task]])
    y = np.asarray([spec.encode(meta[i][task]) for i in rows_idx], np.float32 if spec.is_regression else np.int64)
    groups = np.asarray([meta[i]["subject_id"] for i in rows_idx])
    not_ludb = np.asarray([meta[i]["source"] != "ludb" for i in rows_idx])
    metric, expert_names = load_metric(spec.problem_type), [e["name"] for e in raws["tiny"]["experts"]]
    print(f"[quality] {task}: {len(rows_idx)} records, {len(set(groups))} subjects", flush=True)
    per_fold, per_fold_clean, reports, params = {}, {}, {}, {}

    def record(row: str, logits, test) -> None:
        logits = np.asarray(logits, dtype=np.float64).reshape(len(test), -1)
        per_fold.setdefault(row, []).append(score({"logits": logits, "labels": y[test]}, spec, metric))
        keep = not_ludb[test]
        if len(TASK_SOURCES[task]) > 1 and keep.sum() >= 2:  # the same folds scored on their non-LUDB records
            per_fold_clean.setdefault(row, []).append(score({"logits": logits[keep], "labels": y[test][keep]}, spec,
                                                            metric))

    seeds = range(args.seed, args.seed + args.seeds)
    folds = {seed: subject_folds(groups, args.folds, seed) for seed in seeds}
    measured = measured_rr(records.select(rows_idx).with_format("numpy")["signal"]) if task == "rr_interval" else None
    for seed in seeds:
        for train, test in folds[seed]:
            record("baseline:mean_or_majority", baseline_predictions(y[train], y[test], spec)["logits"], test)
            if measured is not None:
                record("baseline:neurokit_rr", [measured[i] if measured[i] is not None else float(y[train].mean())
                                                for i in test], test)
    for row, (_, config, fit) in FITTED_ROWS.items():
        raw = raws["pretrained" if row == "enecg_offline_pretrained" else "tiny"]
        if (config is None or raw is None or (args.rows and row not in args.rows)
                or (spec.is_regression and row == "ablation:no_class_weights")):
            continue
        experts = [e["name"] for e in raw["experts"]]
        table = FeatureTable([features[n][rows_idx] for n in experts], features["gate_inputs"][rows_idx],
                             torch.from_numpy(y), groups)
        for seed in seeds if row in ("enecg", "enecg_offline_pretrained") else seeds[:args.ablation_seeds]:
            torch.manual_seed(seed)
            model = make_model(raw, spec, **config)
            settings = FitSettings(seed=seed, **{**fit, **(QUICK_FIT if args.quick else {})})
            for f, (train, test) in enumerate(folds[seed]):
                report = fit_enecg(model, table, train, settings, name=f"seed{seed}-fold{f}")
                out = predict(model, table, test)
                record(row, out["logits"], test)
                reports.setdefault(row, []).append(report.stacked_weights)
                for i, name in enumerate(experts if row in ("enecg", "enecg_offline_pretrained") else []):
                    record(f"expert:{name}", out["expert_logits"][:, i], test)
                if row == "enecg":  # the same heads averaged, and mixed by the stacked weights only
                    record("uniform_ensemble", out["expert_logits"].mean(1), test)
                    stacked = np.asarray([report.stacked_weights[n] for n in experts])
                    record("ablation:stacked_gate_only", (out["expert_logits"] * stacked[None, :, None]).sum(1), test)
            params[row] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"[quality]   {task} seed {seed} {row}: " + ", ".join(
                f"{k} {v['mean']:.4g}" for k, v in summarize(per_fold[row][-len(folds[seed]):]).items()
                if k in HEADLINE[spec.problem_type]), flush=True)

    rows = {}
    for row, metrics in per_fold.items():
        rows[row] = {"label": ROW_LABELS.get(row) or f"{row.split(':', 1)[1]} expert alone",
                     "trainable_params": params.get(row, 0), "metrics": summarize(metrics),
                     "per_fold": [{k: v for k, v in m.items() if math.isfinite(v)} for m in metrics]}
        if per_fold_clean.get(row):
            rows[row]["metrics_excluding_ludb"] = summarize(per_fold_clean[row])
        weights = [list(w.values()) for w in reports.get(row, []) if w]
        if weights and row in ("enecg", "ablation:gate_in_sample"):
            rows[row]["mean_stacked_weights"] = dict(zip(expert_names, np.round(np.mean(weights, 0), 3).tolist()))
    return {"problem_type": spec.problem_type, "records": len(rows_idx), "subjects": len(set(groups)),
            "sources": list(TASK_SOURCES[task]), "class_counts": {} if spec.is_regression else {
                c: int((y == i).sum()) for i, c in enumerate(spec.class_names)},
            "label_mean": float(y.mean()) if spec.is_regression else None, "rows": rows,
            "verdict": verdict(rows, spec, expert_names)}


def verdict(rows: dict, spec, expert_names: list[str]) -> dict:
    """The bar for the default EnECG: within 5 % (MAE) / 0.02 (AUROC) of its best single expert and of the uniform
    average of its heads, and better than the trivial baseline."""
    if "enecg" not in rows:
        return {}
    key, sign = ("mae", -1) if spec.is_regression else ("auroc", 1)
    value = lambda row: rows[row]["metrics"][key]["mean"]
    experts = {f"expert:{n}": value(f"expert:{n}") for n in expert_names if key in rows[f"expert:{n}"]["metrics"]}
    best = max(experts, key=lambda r: sign * experts[r])
    within = (lambda ours, ref: ours <= ref * 1.05) if spec.is_regression else (lambda ours, ref: ours >= ref - 0.02)
    ours, uniform, baseline = value("enecg"), value("uniform_ensemble"), value("baseline:mean_or_majority")
    return {"metric": key, "enecg": ours, "best_expert": best, "best_expert_value": experts[best], "uniform": uniform,
            "baseline": baseline, "as_good_as_best_expert": bool(within(ours, experts[best])),
            "as_good_as_uniform": bool(within(ours, uniform)), "beats_baseline": bool(sign * (ours - baseline) > 0)}


def main(argv: list[str] | None = None) -> dict:
    options = parser(__doc__, "quality.json")
    add = options.add_argument
    add("--quick", action="store_true", help="a few records per source, 2 folds, few epochs")
    add("--data-dir", default=str(DATA_DIR))
    add("--config", default="hub_configs/tiny.json", help="expert sizes (random weights)")
    add("--tasks", default=",".join(TASK_SOURCES))
    add("--rows", default="", help="comma-separated rows to run (default all)")
    add("--folds", type=int, default=None, help="default 5 (2 with --quick)")
    add("--seeds", type=int, default=None, help="seeds (default 3; 1 with --quick)")
    add("--ablation-seeds", type=int, default=None, help="seeds of the paper and ablation rows (default: --seeds)")
    add("--combine", nargs="+", metavar="JSON", help="merge runs over other --tasks or --rows into --output")
    add("--seed", type=int, default=42)
    add("--threads", type=int, default=1)
    add("--pretrained", action=argparse.BooleanOptionalAction, default=None,
        help="add the experts of --pretrained-config with real weights (default: on, off with --quick)")
    add("--pretrained-config", default="hub_configs/offline_pretrained.json")
    add("--features-only", action="store_true", help="compute (and cache) the expert features, then stop")
    add("--feature-store", default=None, help="the feature store's folder (default: the package's shared store, "
        "enecg_hf.features.feature_store_dir(); '' for a temporary one)")
    args = options.parse_args(argv)
    args.folds, args.seeds = args.folds or (2 if args.quick else 5), args.seeds or (1 if args.quick else 3)
    args.pretrained = (not args.quick) if args.pretrained is None else args.pretrained
    args.ablation_seeds = args.ablation_seeds or args.seeds
    if args.combine:
        return finish(combine([json.loads(Path(path).read_text()) for path in args.combine]), args)
    args.rows = {r for r in args.rows.split(",") if r}
    if args.rows - {"enecg_offline_pretrained"}:  # the other rows are judged against enecg and the uniform average
        args.rows |= {"enecg", "uniform_ensemble"}

    import torch

    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()
    if not (Path(args.data_dir) / "ludb").is_dir():
        raise SystemExit(f"No LUDB folder under {args.data_dir}: set --data-dir or ENECG_DATA_DIR")
    records, meta = load_records(Path(args.data_dir), QUICK_LIMITS if args.quick else None)
    print(f"[quality] {len(meta)} records", flush=True)
    store = args.feature_store
    if store == "":  # a temporary store, removed when the run ends
        store = tempfile.mkdtemp(prefix="enecg-quality-store-")
        atexit.register(shutil.rmtree, store, True)
    raws = {"tiny": config_dict(REPO / args.config), "pretrained": None}
    features = expert_features(raws["tiny"], records, store, args.seed)
    if args.pretrained:
        raws["pretrained"] = config_dict(REPO / args.pretrained_config, "pretrained/", raws["tiny"])
        extra = expert_features(raws["pretrained"], records, store, args.seed)
        features.update({k: v for k, v in extra.items() if k != "gate_inputs"})
    feature_seconds = time.perf_counter() - started
    print(f"[quality] expert features of {len(meta)} records ready after {feature_seconds:.0f} s", flush=True)
    if args.features_only:
        return {"features": sorted(features)}
    results = {
        "benchmark": "quality", "quick": args.quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(torch_threads=args.threads),
        "data": {"source": "enecg_hf.data.build_dataset", "records": len(meta),
                 "records_per_source": {s: sum(r["source"] == s for r in meta) for s in SOURCES}},
        "setup": {
            "config": args.config, "experts": [e["name"] for e in raws["tiny"]["experts"]], "folds": args.folds,
            "seeds": args.seeds, "pretrained_config": args.pretrained_config if args.pretrained else None,
            "pretrained_experts": [e["name"] for e in raws["pretrained"]["experts"]] if args.pretrained else [],
            "seed": args.seed, "ablation_seeds": args.ablation_seeds,
            "training": "enecg_hf.training.fitting (train.py's core); FitSettings defaults unless the row says otherwise",
            "metrics": "enecg_hf/metrics (evaluate)",
            "cv": "subject-level k-fold (no subject in two folds), repeated with each seed; a fresh fit per fold and row",
            "random_weights": "every expert has random weights: the Hub is unreachable; tiny sizes",
            "arrhythmia_groups": "sinus = sinus rhythm/bradycardia/tachycardia; af_flutter = atrial fibrillation or "
                                 "flutter; other = any other rhythm statement (sinus arrhythmia, ...)",
        },
        "published": PUBLISHED,
        "tasks": {task: run_task(task, records, meta, features, raws, args) for task in args.tasks.split(",")},
    }
    results["run"] = {"load_average_start": list(load), "load_average_end": list(os.getloadavg()),
                      "feature_extraction_s": feature_seconds, "elapsed_s": time.perf_counter() - started,
                      "torch_threads": args.threads, "cpu_count": os.cpu_count()}
    return finish(results, args)


def combine(parts: list[dict]) -> dict:
    """One result from runs over different tasks or rows (e.g. two processes, one per core)."""
    results = parts[0]
    for part in parts[1:]:
        for task, block in part["tasks"].items():
            mine = results["tasks"].setdefault(task, block)  # the same task, other rows (--rows ...): merged
            mine["rows"].update({row: r for row, r in block["rows"].items() if row not in mine["rows"]})
            mine["verdict"] = mine.get("verdict") or block.get("verdict")
        for key in ("pretrained_config", "pretrained_experts"):
            results["setup"][key] = results["setup"].get(key) or part["setup"].get(key)
        results["run"]["elapsed_s"] = max(results["run"]["elapsed_s"], part["run"]["elapsed_s"])
        results["run"]["processes"] = results["run"].get("processes", 1) + 1
    results["tasks"] = {task: results["tasks"][task] for task in TASK_SOURCES if task in results["tasks"]}
    return results


def finish(results: dict, args) -> dict:
    save(results, args.output, docs_table(results), "quality" if args.update_docs else None)
    return results


def docs_table(results: dict) -> str:
    s, data = results["setup"], results["data"]
    lines = [f"Setup: {s['folds']}-fold subject-level CV × {s['seeds']} seeds; experts {', '.join(s['experts'])} from "
             f"`{s['config']}` with random weights; every row trained by the package's core (`train.py` defaults "
             f"unless the row says otherwise); metrics from {s['metrics']}; data: {data['records']} records ("
             + ", ".join(f"{k} {v}" for k, v in data["records_per_source"].items()) + "). Mean ± std over folds and "
             "seeds." + (f" Rows named `pretrained/…` and the offline_pretrained EnECG use the experts of "
                         f"`{s['pretrained_config']}`: openecg and DeepFADE with their real weights from the installed "
                         f"wheels, the ECG-features expert, DLinear with random weights." if s.get("pretrained_experts")
                         else "") + "\n"]
    cell = lambda m: f"{m['mean']:.3g} ± {m['std']:.2g}"
    for task, block in results["tasks"].items():
        metrics = HEADLINE[block["problem_type"]]
        clean = any("metrics_excluding_ludb" in r for r in block["rows"].values())
        extra = f"classes {block['class_counts']}" if block["class_counts"] else f"label mean {block['label_mean']:.1f}"
        lines += [f"**{task}** ({block['records']} records, {block['subjects']} subjects; {extra})\n",
                  "| row | " + " | ".join(metrics) + (f" | {metrics[0]} without LUDB |" if clean else " |")
                  + " trainable params |", "|---|" + "---:|" * (len(metrics) + clean) + "---:|"]
        for r in block["rows"].values():
            cells = [cell(r["metrics"][m]) if m in r["metrics"] else "n/a" for m in metrics]
            if clean:
                c = r.get("metrics_excluding_ludb", {}).get(metrics[0])
                cells.append(cell(c) if c else "")
            seeds = len(r["per_fold"]) // s["folds"]
            label = r["label"] + (f" ({seeds} seed{'s' if seeds > 1 else ''})" if seeds != s["seeds"] else "")
            params = f"{r['trainable_params']:,}" if r["trainable_params"] else ""
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {params} |")
        for source, values in PUBLISHED.get(task, {}).items():
            cells = [f"*{values[m]}*" if m in values else "" for m in metrics] + ([""] if clean else [])
            lines.append(f"| *published: {source}* | " + " | ".join(cells) + " | |")
        if v := block.get("verdict"):
            yes = lambda key: "yes" if v[key] else "no"
            lines.append(f"\nDefault EnECG {v['metric']} {v['enecg']:.4g}: best single expert "
                         f"({v['best_expert'].split(':', 1)[1]}) {v['best_expert_value']:.4g}, uniform average "
                         f"{v['uniform']:.4g}, trivial baseline {v['baseline']:.4g} — as good as the best expert: "
                         f"{yes('as_good_as_best_expert')}; as the uniform average: {yes('as_good_as_uniform')}; "
                         f"beats the baseline: {yes('beats_baseline')}.")
        lines.append("")
    run = results["run"]
    lines.append(f"Run {results['created']}: {run['elapsed_s'] / 60:.0f} min on {run['cpu_count']} shared cores "
                 f"({run['torch_threads']} torch thread), load average {run['load_average_start'][0]:.2f} at start.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
