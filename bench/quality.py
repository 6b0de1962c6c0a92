"""Quality of EnECG on real ECGs: subject-level k-fold CV × seeds on ../shared/data, every piece from the package.

Records: `enecg_hf.data.build_dataset` per source; tasks: `enecg_hf.data.TASKS` (arrhythmia in 3 groups); configs:
`enecg_hf.training.configs.build_config`; folds: `fitting.subject_folds`; training: `fit_enecg`/`predict` (train.py's
core) on expert features computed once (`enecg_hf.features.build_features`, kept in the package's feature store);
scores and the trivial baseline: `enecg_hf.training.scoring`. Rows and what each measures: docs/benchmarks.md,
"Quality on real ECGs".

    python bench/quality.py --update-docs        # all records, 5 folds, 3 seeds (~2 h on 2 cores)
    python bench/quality.py --quick              # a few records, 2 folds, few epochs, no pretrained experts
    python bench/quality.py --tasks rr_interval,age --output a.json   # a part of the run (also --rows)...
    python bench/quality.py --combine a.json b.json --update-docs     # ...and the parts merged into one result
    python bench/quality.py --no-cv --tasks sex --output c.json       # leave-one-source-out only (also --no-loso)

Leave-one-source-out (`run_loso`, docs/benchmarks.md "Quality on hospitals the model never saw"): every source group
(`enecg_hf.data.source_groups`: a database, a Challenge database by record prefix, a sampling rate) held out in
turn, the model trained on the records of every other institution (`enecg_hf.data.leave_one_source_out`), tiny
experts. RR labels exist for LUDB only: RR is trained on LUDB and scored on the Challenge records against R-peak
intervals of neurokit2 on lead II (`reference_rr`; never the features expert's own output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch

from enecg_hf import EnECGModel
from enecg_hf.configuration_enecg import EnECGExpertConfig
from enecg_hf.data import TASKS, build_dataset, institution, leave_one_source_out, source_groups
from enecg_hf.expert_features import EnECGFeaturesExpert
from enecg_hf.features import GATE_INPUTS_COLUMN, FeatureTable, build_features, embedding_column
from enecg_hf.preprocessing_enecg import STANDARD_LEAD_NAMES
from enecg_hf.training import (FitSettings, TrainScriptArguments, baseline_predictions, fit_enecg, load_metric, predict,
                               score, summarize)
from enecg_hf.training.configs import build_config
from enecg_hf.training.fitting import subject_folds
from enecg_hf.training.labels import encode_labels
from harness import (DATA_DIR, REPO, machine_info, markdown_table, parser, render_only, replace_section, require_data,
                     save)


SEED = 42  # the first seed; the others follow it
CONFIG = "hub_configs/tiny.json"  # tiny experts (paper sizes take ~100 s a record here), all with random weights
PRETRAINED_CONFIG = "hub_configs/offline_pretrained.json"
SOURCES = {"ludb": "ludb", "challenge2021_sample50": "challenge", "challenge2020_awwong1": "challenge",
           "challenge2020_sebgood": "challenge", "ptbxl_sample500": "ptb-xl"}
# Folders read for leave-one-source-out only: the subject-wise CV keeps the record set of its earlier runs.
# ptbxl_lr1500: PTB-XL's 100 Hz files (resampled to 500 Hz by the builder), some patients shared with ptbxl_sample500
# (one institution: never on both sides of a leave-one-source-out split).
LOSO_ONLY = {"ptbxl_lr1500": "ptb-xl"}
QUICK_LIMITS = {"ludb": 24, "challenge2021_sample50": 6, "challenge2020_awwong1": 4, "challenge2020_sebgood": 4,
                "ptbxl_sample500": 12, "ptbxl_lr1500": 8}
# enecg_hf.data.ARRHYTHMIA_CLASSES -> three groups (few records per rhythm: finer classes cannot be scored).
GROUP_OF_CLASS = {"sinus_rhythm": "sinus", "sinus_bradycardia": "sinus", "sinus_tachycardia": "sinus",
                  "atrial_fibrillation": "af_flutter", "atrial_flutter": "af_flutter", "other": "other"}
TASK_SOURCES = {"rr_interval": ("ludb",), "age": tuple(SOURCES), "sex": tuple(SOURCES), "arrhythmia": tuple(SOURCES)}
HEADLINE = {"regression": ("mae", "rmse"), "single_label_classification": ("auroc", "f1", "accuracy")}
# Published figures (../shared/REFERENCE.md): MIMIC-IV-ECG subset for ECG-MoE / ECG-FM; other cohorts for the anchors.
FM_BASELINE = "ECG-FM, best single baseline there"
PUBLISHED = {
    "rr_interval": {"ECG-MoE (same authors' follow-up)": {"mae": 76.37}, FM_BASELINE: {"mae": 147.3}},
    "age": {"ECG-MoE": {"mae": 12.83}, FM_BASELINE: {"mae": 13.49}, "Attia 2019 (Mayo cohort, CNN)": {"mae": 6.9}},
    "sex": {"ECG-MoE": {"f1": 0.69}, "Attia 2019 (Mayo cohort, CNN)": {"accuracy": 0.904, "auroc": 0.97}},
    "arrhythmia": {"ECG-MoE": {"accuracy": 0.73}, FM_BASELINE: {"accuracy": 0.49}},
}


def without_median_beat(config: dict) -> dict:
    """Config overrides: the same experts but the median-beat expert (what it adds to an ensemble)."""
    return {"experts": [e for e in config["experts"] if e["type"] != "median_beat"]}


# Rows with a fit of their own: name -> (label, config overrides or a function of the config giving them, FitSettings
# overrides); each ablation changes one thing of the default. `None`: the row comes from the default fit's heads. Rows
# named `enecg_offline_pretrained…` use PRETRAINED_CONFIG's experts.
FITTED_ROWS = {
    "enecg": ("**EnECG, default settings** (linear + FFN-LoRA heads, learned gate)", {}, {}),
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
    "ablation:without_median_beat": ("the default EnECG without the median-beat expert", without_median_beat, {}),
    "ablation:ffn_heads": ("the paper's FFN + LoRA heads alone (no linear path)", {"head_type": "ffn"}, {}),
    "ablation:mse": ("regression on MSE instead of the Huber loss", {"regression_loss": "mse"}, {}),
    "ablation:source_inner_folds": ("inner folds by institution, not by subject", {}, {"inner_groups": "source"}),
    "ablation:full_stacking": ("gate stacking over every expert (not sparse)", {}, {"stacking": "full"}),
    "enecg_offline_pretrained": (("**EnECG over offline_pretrained.json** (openecg, DeepFADE: real weights; "
                                  "features, DLinear, median beat)"), {}, {}),
    "enecg_offline_pretrained_without_median_beat": ("EnECG over offline_pretrained.json without the median-beat "
                                                     "expert", without_median_beat, {}),
}
MAIN_ROWS = ("enecg", "enecg_offline_pretrained")  # every seed, and each expert's own head scored too
UNIFORM_ROWS = {"enecg": "uniform_ensemble", "enecg_offline_pretrained": "uniform_ensemble:pretrained"}
QUICK_FIT = {"epochs": 4, "gate_epochs": 4, "inner_folds": 2}
ROW_LABELS = {"baseline:mean_or_majority": "mean / majority of the training folds",
              "baseline:neurokit_rr": "neurokit2 R-peaks, lead II, no learning",
              "uniform_ensemble": "uniform average of the same heads",
              "uniform_ensemble:pretrained": "uniform average of the offline_pretrained EnECG's heads",
              **{name: label for name, (label, _, _) in FITTED_ROWS.items()}}


def load_records(limits: dict[str, int] | None, sources: dict[str, str] | None = None,
                 data_dir: Path | None = None, loso: bool = False) -> tuple[datasets.Dataset, pd.DataFrame]:
    """Every source folder (`sources`, default SOURCES: folder -> format, under `data_dir`, default DATA_DIR; with
    `loso` also the `LOSO_ONLY` folders) through the package's builder (which skips unusable records and keeps each
    signal once): one dataset of what the feature store keys records by (`record_id`, `source`, `signal`), and a table
    with a row per record: its `folder`, `subject` (the source format and the subject id, else the record id: a patient
    id names a patient of its database, so the same PTB-XL patient in two folders is one subject), source `group`
    (`source_groups`), whether the subject-wise CV reads it (`cv`: not a `LOSO_ONLY` folder) and task labels (class
    names; the rhythm in three groups)."""
    datasets.disable_progress_bars()
    parts, labels = [], []
    data_dir = data_dir or DATA_DIR
    for folder, fmt in {**(sources or SOURCES), **(LOSO_ONLY if loso else {})}.items():
        if not (data_dir / folder).is_dir():
            print(f"[quality] {data_dir / folder} not found: skipped", flush=True)
            continue
        dataset = build_dataset(fmt, str(data_dir / folder), limit=limits.get(folder) if limits else None)
        table = dataset.select_columns(["record_id", "subject_id", *TASK_SOURCES]).to_pandas()
        for column in ("sex", "arrhythmia"):  # ClassLabel indices -> class names
            table[column] = table[column].map(dict(enumerate(dataset.features[column].names)))
        table["arrhythmia"] = table["arrhythmia"].map(GROUP_OF_CLASS)
        table["subject"] = fmt + "/" + table["subject_id"].fillna(table["record_id"])
        labels.append(table.assign(folder=folder, group=source_groups(dataset), cv=folder not in LOSO_ONLY))
        parts.append(dataset.select_columns(["record_id", "source", "signal"]))
    return datasets.concatenate_datasets(parts), pd.concat(labels, ignore_index=True)


def expert_features(records, store: str | None, pretrained: bool, pretrained_rows: np.ndarray | None = None
                    ) -> tuple[dict, dict]:
    """The expert sets and their features. Configs: `tiny`, CONFIG's experts (random weights); `pretrained` (None
    unless `pretrained`), PRETRAINED_CONFIG's experts with their real weights, named `pretrained/…`, reading the same
    gate inputs. Features: every expert's embedding and the gate inputs of every record (the pretrained experts' of
    `pretrained_rows` only, default all; NaN elsewhere), from the package's feature store (computed there once per
    record and expert, shared with train.py and every later run)."""
    tiny = json.loads((REPO / CONFIG).read_text())
    configs = {"tiny": tiny, "pretrained": None}
    if pretrained:
        configs["pretrained"] = json.loads((REPO / PRETRAINED_CONFIG).read_text())
        configs["pretrained"].update(gate_leads=tiny["gate_leads"], gate_input_length=tiny["gate_input_length"])
        for expert in configs["pretrained"]["experts"]:
            expert["name"] = f"pretrained/{expert['name']}"
    features = {}
    for key, config in configs.items():
        if config is None:
            continue
        rows = np.arange(len(records)) if key == "tiny" or pretrained_rows is None else pretrained_rows
        torch.manual_seed(SEED)
        model = EnECGModel.from_expert_sources(build_config(TrainScriptArguments(), TASKS["rr_interval"], config))
        table = build_features(records.select(rows), model, store_dir=store, batch_size=8)[0].with_format("torch")[:]
        for name in model.expert_names:
            values = table[embedding_column(name)].float()
            features[name] = torch.full((len(records), values.shape[1]), float("nan"))
            features[name][torch.as_tensor(rows)] = values
        if key == "tiny":
            features[GATE_INPUTS_COLUMN] = table[GATE_INPUTS_COLUMN].float()
    return configs, features


def measured_rr(records) -> np.ndarray:
    """Mean RR (ms) of lead II by the ECG-features expert's neurokit2 measurement at 500 Hz (NaN: not measured)."""
    expert = EnECGFeaturesExpert(EnECGExpertConfig("rr", "features", 5000, ["II"]), STANDARD_LEAD_NAMES)
    signals = records.with_format("numpy")["signal"]
    return np.asarray([expert.measure(signal[1])["rr_mean"] * 1000.0 for signal in signals], dtype=np.float64)


def task_spec(task: str):
    """The task of `enecg_hf.data.TASKS`; arrhythmia in the three groups of `GROUP_OF_CLASS`."""
    spec = TASKS[task]
    if task == "arrhythmia":
        spec = replace(spec, class_names=tuple(dict.fromkeys(GROUP_OF_CLASS.values())))
    return spec


def run_task(task: str, records, labels: pd.DataFrame, features: dict, configs: dict, args) -> dict:
    """Every row of one task: the baselines, then each fitted row × seeds × subject folds on the stored features;
    each row's predictions of its test folds are scored at the end (`score_rows`)."""
    spec = task_spec(task)
    candidates = labels[labels["folder"].isin(TASK_SOURCES[task])]
    keep, y = encode_labels(candidates, spec)
    record_rows, groups = candidates.index[keep].to_numpy(), candidates["subject"].to_numpy()[keep]
    sources = candidates["group"].to_numpy()[keep]
    print(f"[quality] {task}: {len(record_rows)} records, {len(set(groups))} subjects", flush=True)
    predictions, params, stacked_weights = {}, {}, {}  # predictions: row -> [(test rows, logits)], fold by fold

    def add(row: str, logits, test: np.ndarray) -> None:
        predictions.setdefault(row, []).append((test, np.asarray(logits, np.float64).reshape(len(test), -1)))

    seeds = range(SEED, SEED + args.seeds)
    folds = {seed: subject_folds(groups, args.folds, seed) for seed in seeds}
    measured = measured_rr(records.select(record_rows)) if task == "rr_interval" else None
    for seed in seeds:
        for train, test in folds[seed]:
            add("baseline:mean_or_majority", baseline_predictions(y[train], y[test], spec)["logits"], test)
            if measured is not None:  # a record neurokit2 cannot measure gets the training mean
                add("baseline:neurokit_rr", np.where(np.isfinite(measured[test]), measured[test], y[train].mean()),
                    test)

    for row, (_, overrides, fit) in FITTED_ROWS.items():
        base = configs["pretrained" if row.startswith("enecg_offline_pretrained") else "tiny"]
        if (overrides is None or base is None or (args.rows and row not in args.rows)
                or (spec.is_regression and row == "ablation:no_class_weights")
                or (not spec.is_regression and row == "ablation:mse")):
            continue
        config = {**base, **(overrides(base) if callable(overrides) else overrides)}
        experts = [e["name"] for e in config["experts"]]
        table = FeatureTable([features[n][record_rows] for n in experts], features[GATE_INPUTS_COLUMN][record_rows],
                             torch.from_numpy(y), groups, sources)
        for seed in seeds if row in MAIN_ROWS else seeds[:args.ablation_seeds]:
            torch.manual_seed(seed)
            model = EnECGModel(build_config(TrainScriptArguments(), spec, config))
            settings = FitSettings(seed=seed, **{**fit, **(QUICK_FIT if args.quick else {})})
            for f, (train, test) in enumerate(folds[seed]):
                report = fit_enecg(model, table, train, settings, name=f"seed{seed}-fold{f}")
                out = predict(model, table, test)
                add(row, out["logits"], test)
                for i, name in enumerate(experts if row in MAIN_ROWS else []):
                    add(f"expert:{name}", out["expert_logits"][:, i], test)
                if row in ("enecg", "ablation:gate_in_sample"):  # the stacked weights of the gate, kept
                    stacked = np.asarray([report.stacked_weights[n] for n in experts])
                    stacked_weights.setdefault(row, []).append(stacked)
                if row in MAIN_ROWS:  # the same heads averaged
                    add(UNIFORM_ROWS[row], out["expert_logits"].mean(1), test)
                if row == "enecg":  # and mixed by the stacked weights only
                    add("ablation:stacked_gate_only", (out["expert_logits"] * stacked[None, :, None]).sum(1), test)
            params[row] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"[quality]   {task} seed {seed} {row}: {len(folds[seed])} folds fitted", flush=True)

    rows = score_rows(predictions, y, spec, candidates["folder"].to_numpy()[keep] != "ludb")
    expert_names = [e["name"] for e in configs["tiny"]["experts"]]
    for row in rows:
        rows[row]["trainable_params"] = params.get(row, 0)
        if row in stacked_weights:
            mean = np.round(np.mean(stacked_weights[row], 0), 3).tolist()
            rows[row]["mean_stacked_weights"] = dict(zip(expert_names, mean))
    return {"problem_type": spec.problem_type, "records": len(record_rows), "subjects": len(set(groups)),
            "sources": list(TASK_SOURCES[task]), "class_counts": {} if spec.is_regression else {
                c: int((y == i).sum()) for i, c in enumerate(spec.class_names)},
            "label_mean": float(y.mean()) if spec.is_regression else None, "rows": rows,
            "verdict": verdict(rows, spec, expert_names),
            "verdict_pretrained": verdict(rows, spec, [e["name"] for e in (configs["pretrained"] or {}).get(
                "experts", [])], "enecg_offline_pretrained")}


def score_rows(predictions: dict, labels: np.ndarray, spec, not_ludb: np.ndarray) -> dict:
    """Each row's scores over its test folds (`metrics`: mean ± std; `per_fold`) and, from the folds with at least two
    records from other sources than LUDB (which openecg was trained on), on those (`metrics_excluding_ludb`)."""
    metric = load_metric(spec.problem_type)

    def fold_scores(folds):
        return [score({"logits": logits, "labels": labels[test]}, spec, metric) for test, logits in folds]

    rows = {}
    for row, folds in predictions.items():
        scores = fold_scores(folds)
        rows[row] = {"label": ROW_LABELS.get(row) or f"{row.split(':', 1)[1]} expert alone",
                     "metrics": summarize(scores),
                     "per_fold": [{k: v for k, v in m.items() if math.isfinite(v)} for m in scores]}
        without_ludb = [(test[not_ludb[test]], logits[not_ludb[test]]) for test, logits in folds
                        if not_ludb[test].sum() >= 2]
        if without_ludb:
            rows[row]["metrics_excluding_ludb"] = summarize(fold_scores(without_ludb))
    return rows


def verdict(rows: dict, spec, expert_names: list[str], row: str = "enecg") -> dict:
    """The bar for an EnECG row (`enecg`, or `enecg_offline_pretrained` over its own experts): within 5 % (MAE) /
    0.02 (AUROC) of its best single expert and of the uniform average of its heads, and better than the trivial
    baseline."""
    uniform_row = UNIFORM_ROWS.get(row, "uniform_ensemble")
    if row not in rows or uniform_row not in rows or not expert_names:
        return {}
    key, sign = ("mae", -1) if spec.is_regression else ("auroc", 1)
    value = lambda row: rows[row]["metrics"][key]["mean"]
    experts = {f"expert:{n}": value(f"expert:{n}") for n in expert_names if key in rows[f"expert:{n}"]["metrics"]}
    best = max(experts, key=lambda r: sign * experts[r])
    within = (lambda ours, ref: ours <= ref * 1.05) if spec.is_regression else (lambda ours, ref: ours >= ref - 0.02)
    ours, uniform, baseline = value(row), value(uniform_row), value("baseline:mean_or_majority")
    return {"metric": key, "enecg": ours, "best_expert": best, "best_expert_value": experts[best], "uniform": uniform,
            "baseline": baseline, "as_good_as_best_expert": bool(within(ours, experts[best])),
            "as_good_as_uniform": bool(within(ours, uniform)), "beats_baseline": bool(sign * (ours - baseline) > 0)}


# ------------------------------------------------------------------------------------------------ leave-one-source-out
# Rows with a fit of their own in the leave-one-source-out runs: name -> (label, config overrides, FitSettings
# overrides). The default's heads also give each expert's row and the uniform average.
LOSO_ROWS = {
    "enecg": ("**EnECG, default settings**", {}, {}),
    "loso:previous_default": ("previous default: FFN + LoRA heads, MSE, stacking over every expert",
                              {"head_type": "ffn", "regression_loss": "mse"}, {"stacking": "full"}),
    "loso:ffn_heads": ("the paper's FFN + LoRA heads (`head_type=\"ffn\"`), otherwise default", {"head_type": "ffn"}, {}),
    "loso:source_inner_folds": ("inner folds by institution (`--inner_groups source`)", {}, {"inner_groups": "source"}),
}
ROW_LABELS |= {name: label for name, (label, _, _) in LOSO_ROWS.items() if name != "enecg"}
# Held-out groups smaller than this are not scored (a metric on 3 records says nothing).
MIN_LOSO_RECORDS = 5


def reference_rr(signals) -> tuple[np.ndarray, np.ndarray]:
    """RR reference (ms) of records without RR labels: the mean interval between neurokit2's R-peaks on lead II at
    500 Hz (`ecg_clean` + `ecg_peaks`), NaN where fewer than 3 peaks; and whether a second detector of neurokit2
    (kalidas2017) agrees within 5 % (`agree`: the records whose reference two detectors vouch for). Signals are
    (leads, samples) in mV at 500 Hz; the features expert (z-scored record, 250 Hz in tiny.json) is not involved."""
    import warnings

    import neurokit2 as nk

    def mean_rr(lead, method):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _, info = nk.ecg_peaks(nk.ecg_clean(lead, sampling_rate=500), sampling_rate=500, method=method)
            except Exception:  # neurokit2 raises on degenerate signals in many ways: no reference
                return np.nan
        peaks = np.asarray(info["ECG_R_Peaks"])
        return float(np.diff(peaks).mean() / 500 * 1000) if len(peaks) >= 3 else np.nan

    leads = [np.asarray(signal[1], dtype=np.float64) for signal in signals]
    reference = np.array([mean_rr(lead, "neurokit") for lead in leads])
    second = np.array([mean_rr(lead, "kalidas2017") for lead in leads])
    return reference, np.abs(second - reference) <= 0.05 * reference


# MIT-BIH records of ../shared/data/mitdb (channel 0, 360 Hz, 30 min; R-peaks of every beat in NNN_all.csv). Their
# channel 0 is MLII, lead II for the model, except 102 and 104 (V5: the features expert reads lead II): left out.
MITDB_NOT_LEAD_II = {"102", "104"}
MITDB_WINDOWS = 60  # the first 10 minutes of each record, 10 s windows


def mitdb_windows(config: dict, max_windows: int) -> tuple[datasets.Dataset, pd.DataFrame]:
    """MIT-BIH records cut into 10 s windows by the pipeline's windowed prediction (`EnECGPipeline.preprocess` with
    `window_seconds=10`, lead II, the other leads zero-filled: what `enecg predict mitdb/100 --window-seconds 10
    --lead-names II --fill-missing-leads` feeds the model), as records (`record_id` `NNN@<start>s`, `source`
    "mitdb", `signal`); and their reference RR (ms): the mean interval of the annotated beats (`NNN_all.csv`, every
    beat of the `.atr` annotations) inside the window, NaN with fewer than 3 beats or a skipped window."""
    from enecg_hf.pipeline_enecg import EnECGPipeline, window_plan

    folder = DATA_DIR / "mitdb"
    names = sorted(p.stem for p in folder.glob("*.hea") if p.stem not in MITDB_NOT_LEAD_II)
    model = EnECGModel(build_config(TrainScriptArguments(), TASKS["rr_interval"], config))
    pipeline = EnECGPipeline(model=model)
    plan = window_plan(model.config, 10, None, max_windows)
    rows, signals = [], []
    for name in names:
        beats = pd.read_csv(folder / f"{name}_all.csv")["R"].to_numpy() / 360.0  # seconds
        for item in pipeline.preprocess(str(folder / name), lead_names=["II"], fill_missing_leads=True, window=plan):
            start, skipped = item["window"].start_seconds, item["window"].skipped
            inside = beats[(beats >= start) & (beats < start + plan.seconds)]
            reference = float(np.diff(inside).mean() * 1000) if len(inside) >= 3 and skipped is None else np.nan
            rows.append({"record_id": f"{name}@{start:g}s", "subject_id": name, "reference_rr": reference})
            signals.append(item["input_values"][0].numpy())
    table = pd.DataFrame(rows)
    windows = datasets.Dataset.from_dict({"record_id": table["record_id"].tolist(), "source": ["mitdb"] * len(table),
                                          "signal": signals}, features=datasets.Features({
        "record_id": datasets.Value("string"), "source": datasets.Value("string"),
        "signal": datasets.Array2D(shape=signals[0].shape, dtype="float32")}))
    return windows, table


def run_loso(task: str, records, labels: pd.DataFrame, features: dict, configs: dict, args) -> dict:
    """Leave-one-source-out of one task with the tiny experts: each `LOSO_ROWS` row fitted on every institution but
    the held-out group's and scored there; the default's heads give each expert's row and the uniform average, and
    the mean / majority of the training records the baseline. RR: one fit per row on LUDB (the only RR labels),
    scored on every Challenge group against `reference_rr`."""
    spec, experts = task_spec(task), [e["name"] for e in configs["tiny"]["experts"]]
    metric = load_metric(spec.problem_type)
    labelled = labels[labels["folder"] == "ludb"] if task == "rr_interval" else labels
    keep, y = encode_labels(labelled, spec)
    rows, groups = labelled.index[keep].to_numpy(), labelled["group"].to_numpy()[keep]
    table = FeatureTable([features[n] for n in experts], features[GATE_INPUTS_COLUMN],
                         torch.zeros(len(labels)), labels["subject"].to_numpy(), labels["group"].to_numpy())
    if task == "rr_interval":  # train on LUDB; score the Challenge records against their R-peak reference and
        # the MIT-BIH windows against their beat annotations
        folds, agreeing, extra = rr_reference_folds(records, labels, table, len(rows))
    else:
        folds = [(group, train, rows[test]) for group, train, test in leave_one_source_out(groups)]
        agreeing, extra = None, {}
    table.labels[torch.as_tensor(rows)] = torch.from_numpy(y).float()
    if not spec.is_regression:
        table.labels = table.labels.long()
    folds = [(group, rows[train], test) for group, train, test in folds if len(test) >= args.min_loso_records]
    print(f"[quality] {task}: leave-one-source-out over {[(g, len(t)) for g, _, t in folds]}", flush=True)
    predictions = loso_predictions(task, spec, table, folds, experts, configs, args)
    every = np.concatenate([test for _, _, test in folds])
    result_rows = loso_scores(predictions, folds, every, table, spec, metric, labels, agreeing)
    block = {"problem_type": spec.problem_type, "metric": HEADLINE[spec.problem_type][0],
             "groups": {group: {"records": int(len(test)), "train_records": int(len(train)),
                                "institution": institution(group)} for group, train, test in folds},
             "records": int(len(every)), "rows": result_rows, **extra}
    block["verdict"] = verdict({r: {"metrics": {k: {"mean": v} for k, v in values["pooled"].items()}}
                                for r, values in result_rows.items()}, spec, experts)
    return block


def rr_reference_folds(records, labels: pd.DataFrame, table: FeatureTable,
                       train_records: int) -> tuple[list[tuple], np.ndarray, dict]:
    """RR's leave-one-source-out folds: trained on LUDB's `train_records` labelled records, and scored on each group of
    records with a reference RR, written into `table.labels`: the Challenge records (`reference_rr`) and the MIT-BIH
    windows (their annotated beats, `labels["reference_rr"]`, when `labels` has them).

    Returns:
        The folds (group, positions among the training records, rows of the held-out records), whether each row's
        reference is confirmed (two detectors agree, or annotated beats), and what the result block says of them.
    """
    challenge = labels.index[labels["folder"].str.startswith("challenge")].to_numpy()
    reference = np.full(len(labels), np.nan)
    reference[challenge], agree = reference_rr(records.select(challenge).with_format("numpy")["signal"])
    agreeing = np.zeros(len(labels), dtype=bool)
    agreeing[challenge] = agree
    if "reference_rr" in labels:  # annotated beats: a reference no detector has to vouch for
        annotated = labels.index[labels["folder"] == "mitdb"].to_numpy()
        reference[annotated] = labels["reference_rr"].to_numpy()[annotated]
        agreeing[annotated] = True
    test_rows = np.flatnonzero(np.isfinite(reference))
    table.labels[torch.as_tensor(test_rows)] = torch.as_tensor(reference[test_rows], dtype=torch.float32)
    folds = [(group, np.arange(train_records), test_rows[labels["group"].to_numpy()[test_rows] == group])
             for group in sorted(set(labels["group"].to_numpy()[test_rows]))]
    extra = {"reference": "neurokit2 R-peaks on lead II at 500 Hz (Challenge), the annotated beats (MIT-BIH "
                          "windows)", "reference_agreeing_records": int(agreeing[test_rows].sum()),
             "challenge_records": int(labels["group"].str.startswith("challenge/").to_numpy()[test_rows].sum())}
    return folds, agreeing, extra


def loso_predictions(task: str, spec, table: FeatureTable, folds: list[tuple], experts: list[str], configs: dict,
                     args) -> dict[str, dict[str, np.ndarray]]:
    """Each `LOSO_ROWS` row (those of `--loso-rows`) fitted on each fold's training rows (once when every fold trains
    on the same rows) and its logits on the held-out rows; the default's fit also gives each expert's row, the
    uniform average and the training records' mean / majority (`baseline:mean_or_majority`).

    Returns:
        Row -> held-out group -> logits (records, outputs).
    """
    predictions: dict[str, dict[str, np.ndarray]] = {}
    for row, (_, overrides, fit) in LOSO_ROWS.items():
        if args.loso_rows and row not in args.loso_rows:
            continue
        settings = FitSettings(seed=SEED, **{**fit, **(QUICK_FIT if args.quick else {})})
        model, fitted_on = None, None
        for group, train, test in folds:
            if fitted_on is None or not np.array_equal(train, fitted_on):  # RR: one fit serves every group
                torch.manual_seed(SEED)
                model = EnECGModel(build_config(TrainScriptArguments(), spec, {**configs["tiny"], **overrides}))
                fit_enecg(model, table, train, settings, name=f"loso-{group}")
                fitted_on = train
            out = predict(model, table, test)
            predictions.setdefault(row, {})[group] = out["logits"]
            if row == "enecg":
                for i, name in enumerate(experts):
                    predictions.setdefault(f"expert:{name}", {})[group] = out["expert_logits"][:, i]
                predictions.setdefault("uniform_ensemble", {})[group] = out["expert_logits"].mean(1)
                base = baseline_predictions(table.labels[train].numpy(), table.labels[test].numpy(), spec)
                predictions.setdefault("baseline:mean_or_majority", {})[group] = base["logits"]
        print(f"[quality]   {task} leave-one-source-out {row}: {len(folds)} groups fitted", flush=True)
    return predictions


def loso_scores(predictions: dict[str, dict[str, np.ndarray]], folds: list[tuple], every: np.ndarray,
                table: FeatureTable, spec, metric, labels: pd.DataFrame, agreeing: np.ndarray | None) -> dict:
    """Each row's scores on every held-out group (`groups`), over all held-out records at once (`pooled`; `every`:
    their rows in fold order) and as a mean ± std over groups; undefined scores (NaN) left out. With `agreeing` (RR),
    also pooled over the Challenge records alone and over the records whose reference is confirmed."""

    def scores(logits: np.ndarray, test: np.ndarray) -> dict[str, float]:  # NaN where undefined (one class)
        return score({"logits": np.asarray(logits, np.float64), "labels": table.labels[test].numpy()}, spec, metric)

    finite = lambda values: {k: v for k, v in values.items() if math.isfinite(v)}  # noqa: E731
    result_rows = {}
    for row, by_group in predictions.items():
        per_group = {group: scores(by_group[group], test) for group, _, test in folds}
        pooled = np.concatenate([by_group[group] for group, _, _ in folds])
        result_rows[row] = {"label": ROW_LABELS.get(row) or f"{row.split(':', 1)[1]} expert alone",
                            "groups": {g: finite(v) for g, v in per_group.items()},
                            "pooled": finite(scores(pooled, every)),
                            "mean_over_groups": summarize(list(per_group.values()))}
        if agreeing is not None:  # RR: the Challenge records alone, and the records whose reference is confirmed
            confirmed, challenge = agreeing[every], labels["group"].str.startswith("challenge/").to_numpy()[every]
            result_rows[row]["pooled_reference_agreeing"] = finite(scores(pooled[confirmed], every[confirmed]))
            result_rows[row]["pooled_challenge"] = finite(scores(pooled[challenge], every[challenge]))
    return result_rows


def measure(args, store: str | None) -> dict:
    torch.set_num_threads(1)
    started, load = time.perf_counter(), os.getloadavg()
    require_data("ludb")  # the other sources are skipped, saying so, when absent
    records, labels = load_records(QUICK_LIMITS if args.quick else None, loso=args.loso)
    if args.loso and "rr_interval" in args.tasks.split(",") and (DATA_DIR / "mitdb").is_dir():
        windows, table = mitdb_windows(json.loads((REPO / CONFIG).read_text()), 3 if args.quick else MITDB_WINDOWS)
        records = datasets.concatenate_datasets([records, windows.cast(records.features)])
        labels = pd.concat([labels, table.assign(folder="mitdb", group="mitdb", cv=False,
                                                 subject="mitdb/" + table["subject_id"])], ignore_index=True)
    cv_rows = labels.index[labels["cv"]].to_numpy()
    configs, features = expert_features(records, store, args.pretrained and args.cv, cv_rows)
    feature_seconds = time.perf_counter() - started
    print(f"[quality] expert features of {len(labels)} records ready after {feature_seconds:.0f} s", flush=True)
    tasks = args.tasks.split(",")
    cv_labels = labels[labels["cv"]]
    results = {
        "benchmark": "quality", "quick": args.quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(torch_threads=1),
        "data": {"source": "enecg_hf.data.build_dataset", "records": len(cv_labels),
                 "records_per_source": {s: int((cv_labels["folder"] == s).sum()) for s in SOURCES},
                 "loso_records_per_group": labels["group"].value_counts().sort_index().to_dict()},
        "setup": {
            "config": CONFIG, "experts": [e["name"] for e in configs["tiny"]["experts"]], "folds": args.folds,
            "seeds": args.seeds, "pretrained_config": PRETRAINED_CONFIG if configs["pretrained"] else None,
            "pretrained_experts": [e["name"] for e in configs["pretrained"]["experts"]] if configs["pretrained"] else [],
            "seed": SEED, "ablation_seeds": args.ablation_seeds, "metrics": "enecg_hf/metrics (evaluate)",
            "min_loso_records": args.min_loso_records,
        },
        "published": PUBLISHED,
        "tasks": {task: run_task(task, records.select(cv_rows), cv_labels.reset_index(drop=True),
                                 {k: v[torch.as_tensor(cv_rows)] for k, v in features.items()}, configs, args)
                  for task in tasks if args.cv},
        "loso": {task: run_loso(task, records, labels, features, configs, args) for task in tasks if args.loso},
    }
    results["run"] = {"load_average_start": list(load), "load_average_end": list(os.getloadavg()),
                      "feature_extraction_s": feature_seconds, "elapsed_s": time.perf_counter() - started,
                      "torch_threads": 1, "cpu_count": os.cpu_count()}
    return results


def combine(parts: list[dict]) -> dict:
    """One result from runs over different tasks or rows (e.g. two processes, one per core)."""
    results = parts[0]
    results.setdefault("loso", {})
    for part in parts[1:]:
        for key in ("tasks", "loso"):
            for task, block in part.get(key, {}).items():
                mine = results[key].setdefault(task, block)  # the same task, other rows (--rows ...): merged
                for row, values in block["rows"].items():
                    mine["rows"].setdefault(row, values)
                if key == "loso" and mine is not block:
                    mine["verdict"] = verdict({r: {"metrics": {k: {"mean": v} for k, v in values["pooled"].items()}}
                                               for r, values in mine["rows"].items()}, task_spec(task),
                                              results["setup"]["experts"])
                else:
                    for verdict_key in ("verdict", "verdict_pretrained"):
                        mine[verdict_key] = mine.get(verdict_key) or block.get(verdict_key)
        for key in ("pretrained_config", "pretrained_experts"):
            results["setup"][key] = results["setup"][key] or part["setup"][key]
        results["run"]["elapsed_s"] = max(results["run"]["elapsed_s"], part["run"]["elapsed_s"])
    for key in ("tasks", "loso"):
        results[key] = {task: results[key][task] for task in TASK_SOURCES if task in results[key]}
    return results


def verdict_sentence(who: str, colon: str, v: dict) -> str:
    """One `verdict` as the docs' sentence: `who` and the metric, then the best expert, the uniform average and the
    baseline, and the three answers."""
    yes = lambda key: "yes" if v[key] else "no"  # noqa: E731
    return (f"{who}{v['metric']} {v['enecg']:.4g}{colon} best single expert ({v['best_expert'].split(':', 1)[1]}) "
            f"{v['best_expert_value']:.4g}, uniform average {v['uniform']:.4g}, trivial baseline {v['baseline']:.4g} "
            f"— as good as the best expert: {yes('as_good_as_best_expert')}; as the uniform average: "
            f"{yes('as_good_as_uniform')}; beats the baseline: {yes('beats_baseline')}.")


def docs_table(results: dict) -> str:
    s, data, run = results["setup"], results["data"], results["run"]
    per_source = ", ".join(f"{k} {v}" for k, v in data["records_per_source"].items())
    setup = (f"Setup: {s['folds']}-fold subject-level CV × {s['seeds']} seeds; experts {', '.join(s['experts'])} from "
             f"`{s['config']}` with random weights; every row trained by the package's core (`train.py` defaults "
             f"unless the row says otherwise); metrics from {s['metrics']}; data: {data['records']} records "
             f"({per_source}). Mean ± std over folds and seeds.")
    if s["pretrained_experts"]:
        setup += (f" Rows named `pretrained/…` and the offline_pretrained EnECG use the experts of "
                  f"`{s['pretrained_config']}`: openecg and DeepFADE with their real weights from the installed "
                  "wheels, the ECG-features expert, DLinear with random weights.")
    lines = [setup, ""]
    cell = lambda m: f"{m['mean']:.3g} ± {m['std']:.2g}" if m else ""
    for task, block in results["tasks"].items():
        metrics = HEADLINE[block["problem_type"]]
        without_ludb = any("metrics_excluding_ludb" in r for r in block["rows"].values())
        header = ["row", *metrics, *([f"{metrics[0]} without LUDB"] if without_ludb else []), "trainable params"]
        table = []
        for r in block["rows"].values():
            seeds = len(r["per_fold"]) // s["folds"]
            label = r["label"] + (f" ({seeds} seed{'s' if seeds > 1 else ''})" if seeds != s["seeds"] else "")
            cells = [cell(r["metrics"][m]) if m in r["metrics"] else "n/a" for m in metrics]
            if without_ludb:
                cells.append(cell(r.get("metrics_excluding_ludb", {}).get(metrics[0])))
            table.append([label, *cells, f"{r['trainable_params']:,}" if r["trainable_params"] else ""])
        for source, values in PUBLISHED.get(task, {}).items():
            cells = [f"*{values[m]}*" if m in values else "" for m in metrics] + [""] * without_ludb
            table.append([f"*published: {source}*", *cells, ""])
        extra = f"classes {block['class_counts']}" if block["class_counts"] else f"label mean {block['label_mean']:.1f}"
        lines += [f"**{task}** ({block['records']} records, {block['subjects']} subjects; {extra})", "",
                  markdown_table(header, table, "l" + "r" * (len(header) - 1))]
        for key, who in (("verdict", "Default EnECG (tiny experts)"),
                         ("verdict_pretrained", "EnECG over offline_pretrained.json")):
            if v := block.get(key):
                lines += ["", verdict_sentence(f"{who} ", ":", v)]
        lines.append("")
    lines.append(f"Run {results['created']}: {run['elapsed_s'] / 60:.0f} min on {run['cpu_count']} shared cores "
                 f"({run['torch_threads']} torch thread), load average {run['load_average_start'][0]:.2f} at start.")
    return "\n".join(lines)


def loso_table(results: dict) -> str:
    """The leave-one-source-out section of docs/benchmarks.md: per task, each row's headline metric on every
    held-out source group, pooled over all of them, and as a mean ± std over groups."""
    if not results.get("loso"):
        return "(no leave-one-source-out run in these results)"
    s = results["setup"]
    lines = [f"Setup: every source group held out in turn (at least {s['min_loso_records']} labelled records), the "
             "model trained afresh on the records of every *other* institution and scored on the held-out group; "
             f"experts {', '.join(s['experts'])} from `{s['config']}` with random weights; seed {s['seed']}. Cells: "
             "the task's headline metric; *pooled*: over every held-out record at once; *per source*: mean ± std "
             "over the groups. Records per group: " + ", ".join(
                 f"{g} {n}" for g, n in results["data"]["loso_records_per_group"].items()) + ".", ""]
    cell = lambda value: f"{value:.3g}" if value is not None else "n/a"  # noqa: E731
    for task, block in results["loso"].items():
        metric, groups = block["metric"], list(block["groups"])
        rr = "pooled_reference_agreeing" in block["rows"]["enecg"]
        sign = -1 if block["problem_type"] == "regression" else 1
        experts = {r: v for r, v in block["rows"].items() if r.startswith("expert:") and metric in v["pooled"]}
        best = max(experts, key=lambda r: sign * experts[r]["pooled"][metric]) if experts else None
        shown = [r for r in block["rows"] if not r.startswith(("expert:", "baseline:", "uniform"))]
        shown += ["uniform_ensemble", *([best] if best else []), "baseline:mean_or_majority"]
        header = ["row", *[f"{g} ({block['groups'][g]['records']})" for g in groups],
                  *([f"Challenge, pooled ({block['challenge_records']})"] if rr else []),
                  f"**pooled** ({block['records']})",
                  *([f"pooled, reference confirmed ({block['reference_agreeing_records']})"] if rr else []),
                  "per source"]
        table = []
        for row in shown:
            values = block["rows"][row]
            label = values["label"] + (" (best expert)" if row == best else "")
            summary = values["mean_over_groups"].get(metric)
            table.append([label, *[cell(values["groups"][g].get(metric)) for g in groups],
                          *([cell(values["pooled_challenge"].get(metric))] if rr else []),
                          f"**{cell(values['pooled'].get(metric))}**",
                          *([cell(values["pooled_reference_agreeing"].get(metric))] if rr else []),
                          f"{summary['mean']:.3g} ± {summary['std']:.2g}" if summary else "n/a"])
        about = (f"trained on LUDB's {next(iter(block['groups'].values()))['train_records']} records, scored against "
                 f"{block['reference']}" if rr else "trained on every other institution")
        lines += [f"**{task}** ({metric}; {about})", "", markdown_table(header, table, "l" + "r" * (len(header) - 1))]
        if v := block.get("verdict"):
            lines += ["", verdict_sentence("Pooled: default EnECG ", ",", v)]
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def main() -> None:
    options = parser(__doc__, "quality.json")
    add = options.add_argument
    add("--quick", action="store_true", help="a few records per source, 2 folds, few epochs")
    add("--tasks", default=",".join(TASK_SOURCES), help="comma-separated tasks to run (default all)")
    add("--rows", default="", help="comma-separated rows to run (default all)")
    add("--folds", type=int, default=None, help="default 5 (2 with --quick)")
    add("--seeds", type=int, default=None, help="seeds (default 3; 1 with --quick)")
    add("--ablation-seeds", type=int, default=None, help="seeds of the paper and ablation rows (default: --seeds)")
    add("--pretrained", action=argparse.BooleanOptionalAction, default=None,
        help=f"add the experts of {PRETRAINED_CONFIG} with real weights (default: on, off with --quick)")
    add("--feature-store", default=None, help="the feature store's folder (default: the package's shared store, "
        "enecg_hf.features.feature_store_dir(); '' for a temporary one)")
    add("--combine", nargs="+", type=Path, metavar="JSON", help="merge runs over other --tasks or --rows into --output")
    add("--cv", action=argparse.BooleanOptionalAction, default=True, help="the subject-wise CV rows (default on)")
    add("--loso", action=argparse.BooleanOptionalAction, default=True,
        help="the leave-one-source-out rows (default on)")
    add("--loso-rows", default="", help=f"comma-separated leave-one-source-out rows (default all: {', '.join(LOSO_ROWS)})")
    add("--min-loso-records", type=int, default=None,
        help=f"smallest held-out group scored (default {MIN_LOSO_RECORDS}; 2 with --quick)")
    args = options.parse_args()
    if args.render_only:  # a results file without subject-wise CV rows (--no-cv) renders only its LOSO section
        results = json.loads(args.output.read_text())
        if results.get("tasks"):
            render_only(args, docs_table, "quality")
        if args.update_docs and results.get("loso"):  # (a CV-only run leaves the leave-one-source-out section)
            replace_section("quality_loso", loso_table(results))
        return
    args.folds, args.seeds = args.folds or (2 if args.quick else 5), args.seeds or (1 if args.quick else 3)
    args.ablation_seeds = args.ablation_seeds or args.seeds
    args.pretrained = (not args.quick) if args.pretrained is None else args.pretrained
    args.rows = {r for r in args.rows.split(",") if r}
    args.loso_rows = {r for r in args.loso_rows.split(",") if r}
    if args.loso_rows:
        args.loso_rows.add("enecg")  # its heads give the experts' and the uniform average's rows
    args.min_loso_records = args.min_loso_records or (2 if args.quick else MIN_LOSO_RECORDS)
    if {r for r in args.rows if not r.startswith("enecg_offline_pretrained")}:  # judged against the default EnECG
        args.rows.add("enecg")
    if args.combine:
        results = combine([json.loads(path.read_text()) for path in args.combine])
    else:  # --feature-store '': a temporary store, removed at the end
        store = (tempfile.TemporaryDirectory(prefix="enecg-quality-store-") if args.feature_store == ""
                 else nullcontext(args.feature_store))
        with store as folder:
            results = measure(args, folder)
    # A run without the subject-wise CV rows (--no-cv) leaves the docs' CV section as it is.
    save(results, args.output, docs_table(results), "quality" if args.update_docs and results.get("tasks") else None)
    if results.get("loso"):
        print(loso_table(results))
        if args.update_docs:
            replace_section("quality_loso", loso_table(results))


if __name__ == "__main__":
    main()
