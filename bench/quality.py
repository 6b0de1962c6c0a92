"""Quality of EnECG on real ECGs: subject-level k-fold cross-validation on ../shared/data.

Tasks and records:
    rr_interval  LUDB (cardiologist R-peak annotations of lead II)                     regression, ms
    age          LUDB + Challenge 2020/2021 samples                                   regression, years
    sex          LUDB + Challenge 2020/2021 samples                                   classification (female/male)
    arrhythmia   LUDB rhythms + Challenge SNOMED codes, 3 classes: sinus (normal, brady, tachy) vs atrial
                 fibrillation/flutter vs other rhythm                                  classification

Rows: the plain baselines (mean / majority class of the training folds; for RR also neurokit2 R-peaks with no
learning), each single expert with its own head (trained fully), the uniform-average ensemble (LoRA heads, no gate),
EnECG with LoRA heads and gate (the paper) and EnECG with fully trained heads and gate.

The frozen experts run ONCE per record (cached features); for every fold each row gets a fresh model (the initial
head/gate weights restored) and a fresh optimiser, trains on the other folds and is scored on this one with the local
`evaluate` modules in enecg_hf/metrics. The experts are the tiny sizes of hub_configs/tiny.json with RANDOM weights (the
Hub is unreachable, and paper sizes take ~100 s per record on 2 CPU cores): the foundation experts here are random
feature maps, not pretrained models. Only the ECG-features expert (neurokit2 measurements) carries real knowledge.

    python bench/quality.py                     # all records, 5 folds (~15 min on 2 shared cores)
    python bench/quality.py --quick             # a few records, 5 folds, few epochs (< 1 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs" / "benchmarks.md"
DEFAULT_DATA = Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data"))
SOURCES = ("ludb", "challenge2021_sample50", "challenge2020_awwong1", "challenge2020_sebgood")
STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
SAMPLES, RATE = 5000, 500
ARRHYTHMIA_GROUPS = ("sinus", "af_flutter", "other")
# ARRHYTHMIA_CLASSES of the data helper -> the three groups of this benchmark.
GROUP_OF_CLASS = {"sinus_rhythm": "sinus", "sinus_bradycardia": "sinus", "sinus_tachycardia": "sinus",
                  "atrial_fibrillation": "af_flutter", "atrial_flutter": "af_flutter", "other": "other"}
TASKS = {
    "rr_interval": {"problem_type": "regression", "unit": "ms", "sources": ("ludb",)},
    "age": {"problem_type": "regression", "unit": "years", "sources": SOURCES},
    "sex": {"problem_type": "single_label_classification", "classes": ("female", "male"), "sources": SOURCES},
    "arrhythmia": {"problem_type": "single_label_classification", "classes": ARRHYTHMIA_GROUPS, "sources": SOURCES},
}
# Published figures (../shared/REFERENCE.md): MIMIC-IV-ECG subset for ECG-MoE / ECG-FM; other cohorts for the anchors.
PUBLISHED = {
    "rr_interval": {"ECG-MoE (same authors' follow-up)": {"mae": 76.37}, "ECG-FM, best single baseline there": {"mae": 147.3},
                    "R-peak measurement (any cohort)": {"note": "within a few ms"}},
    "age": {"ECG-MoE": {"mae": 12.83}, "ECG-FM, best single baseline there": {"mae": 13.49},
            "Attia 2019 (Mayo cohort, CNN)": {"mae": 6.9}},
    "sex": {"ECG-MoE": {"f1": 0.69}, "Attia 2019 (Mayo cohort, CNN)": {"accuracy": 0.904, "auroc": 0.97}},
    "arrhythmia": {"ECG-MoE": {"accuracy": 0.73}, "ECG-FM, best single baseline there": {"accuracy": 0.49}},
}
DOCS_START, DOCS_END = "<!-- quality:start -->", "<!-- quality:end -->"


# ---------------------------------------------------------------------------------------------------- data
def load_records(data_dir: Path, limits: dict[str, int] | None) -> tuple[list[dict], str]:
    """Records as dicts: signal (12, 5000) float32 mV, subject_id, source, rr_interval, age, sex (0/1), arrhythmia
    (group name or None). Through the data helper's `build_dataset` when it is importable, else read here."""
    try:
        return _records_from_data_helper(data_dir, limits), "enecg_hf.data.build_dataset"
    except Exception as err:  # not in yet, or not working yet
        print(f"[quality] enecg_hf.data unavailable ({type(err).__name__}: {err}); reading the records with wfdb",
              flush=True)
    records = []
    for source in SOURCES:
        folder = data_dir / source / ("data" if source == "ludb" else "")
        headers = sorted(folder.glob("*.hea"), key=lambda p: (len(p.stem), p.stem))
        if limits:
            headers = headers[: limits.get(source, 0)]
        records += [r for r in (_read_record(h, source) for h in headers) if r is not None]
    return records, "wfdb reader in bench/quality.py (the data helper's loaders were not in yet)"


def _records_from_data_helper(data_dir: Path, limits: dict[str, int] | None) -> list[dict]:
    import numpy as np

    import datasets

    from enecg_hf.data import build_dataset

    datasets.disable_progress_bars()
    records = []
    for source in SOURCES:
        fmt = "ludb" if source == "ludb" else "challenge"
        dataset = build_dataset(fmt, str(data_dir / source), limit=limits.get(source) if limits else None)
        for row in dataset:
            signal = np.asarray(row["signal"], dtype=np.float32)[:, :SAMPLES]
            if signal.shape != (12, SAMPLES):
                continue
            arrhythmia = row.get("arrhythmia")
            records.append({
                "signal": np.nan_to_num(signal), "source": source, "subject_id": f"{source}/{row['subject_id']}",
                "rr_interval": row.get("rr_interval") if source == "ludb" else None, "age": row.get("age"),
                "sex": row.get("sex"), "arrhythmia": GROUP_OF_CLASS.get(arrhythmia) if arrhythmia else None,
            })
    return _merge_duplicate_subjects(records)


def _read_record(header_path: Path, source: str) -> dict | None:
    import numpy as np
    import wfdb

    path = str(header_path.with_suffix(""))
    record = wfdb.rdrecord(path)
    if record.fs != RATE or record.sig_len < SAMPLES:
        return None
    names = [n.lower() for n in record.sig_name]
    try:
        order = [names.index(lead.lower()) for lead in STANDARD_LEADS]
    except ValueError:
        return None
    signal = np.nan_to_num(record.p_signal[:SAMPLES, order].T.astype(np.float32))  # first 10 s
    comments = {}
    for line in record.comments:
        key, _, value = line.partition(":")
        comments[key.strip().strip("<>").lower()] = value.strip()
    age = _number(comments.get("age"))
    if age is not None and age > 120:
        age = 90.0  # PTB-XL stores "over 89" as 300
    sex_text = comments.get("sex", "").lower()
    sex = 0 if sex_text.startswith("f") else 1 if sex_text.startswith("m") else None
    rr = None
    if source == "ludb":
        ann = wfdb.rdann(path, "ii")
        beats = np.asarray(ann.sample)[np.asarray(ann.symbol) == "N"]
        rr = float(np.diff(beats).mean() / RATE * 1000.0) if beats.size >= 2 else None
        arrhythmia = _ludb_rhythm(comments.get("rhythm", ""))
    else:
        arrhythmia = _snomed_rhythm(comments.get("dx", ""))
    return {"signal": signal, "source": source, "subject_id": f"{source}/{header_path.stem}", "rr_interval": rr,
            "age": age, "sex": sex, "arrhythmia": arrhythmia}


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _ludb_rhythm(text: str) -> str | None:
    text = text.lower().strip(" .")
    if not text:
        return None
    if "fibrillation" in text or "flutter" in text:
        return "af_flutter"
    if text in ("sinus rhythm", "sinus bradycardia", "sinus tachycardia"):
        return "sinus"
    return "other"  # sinus arrhythmia, irregular sinus rhythm, ...


def _snomed_rhythm(dx: str) -> str | None:
    try:
        from enecg_hf.data.labels import SNOMED_RHYTHMS
    except ImportError:
        SNOMED_RHYTHMS = {"426783006": "sinus_rhythm", "426177001": "sinus_bradycardia",
                          "427084000": "sinus_tachycardia", "164889003": "atrial_fibrillation",
                          "164890007": "atrial_flutter", "427393009": "other", "426627000": "other",
                          "713422000": "other", "426761007": "other", "164895002": "other", "10370003": "other"}
    groups = {GROUP_OF_CLASS[SNOMED_RHYTHMS[c.strip()]] for c in dx.split(",") if c.strip() in SNOMED_RHYTHMS}
    for group in ("af_flutter", "sinus", "other"):  # AF/flutter wins over sinus codes on the same record
        if group in groups:
            return group
    return None


def _merge_duplicate_subjects(records: list[dict]) -> list[dict]:
    """Identical signals (e.g. Challenge E07509/E07510) are one subject: never split across folds."""
    seen: dict[str, str] = {}
    for record in records:
        digest = hashlib.sha1(record["signal"].tobytes()).hexdigest()
        record["subject_id"] = seen.setdefault(digest, record["subject_id"])
    return records


def subject_folds(subjects: list[str], k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """k folds with no subject in two folds: the data helper's `subject_kfold` when importable, else shuffled subjects
    dealt round-robin into k groups."""
    import numpy as np

    try:
        import datasets

        from enecg_hf.data import subject_kfold

        table = datasets.Dataset.from_dict({"subject_id": subjects, "record_id": [str(i) for i in range(len(subjects))]})
        return [(train.tolist(), test.tolist()) for train, test in subject_kfold(table, k, seed)]
    except ImportError:
        pass
    unique = sorted(set(subjects))
    rng = np.random.default_rng(seed)
    order = [unique[i] for i in rng.permutation(len(unique))]
    fold_of = {s: i % k for i, s in enumerate(order)}
    folds = []
    for f in range(k):
        test = [i for i, s in enumerate(subjects) if fold_of[s] == f]
        train = [i for i, s in enumerate(subjects) if fold_of[s] != f]
        folds.append((train, test))
    return folds


# ---------------------------------------------------------------------------------------------------- models
def base_config_dict(config_path: Path) -> dict:
    raw = json.loads(config_path.read_text())
    for expert in raw["experts"]:
        expert["pretrained"] = None  # random weights (no converted checkpoints; the Hub is unreachable)
    return raw


def task_config(raw: dict, task: str, experts: list[dict] | None = None, **overrides):
    from enecg_hf import EnECGConfig

    spec = TASKS[task]
    cfg = {k: v for k, v in raw.items() if k not in ("id2label", "label2id", "num_labels", "label_unit")}
    cfg.update(label_name=task, problem_type=spec["problem_type"])
    if spec["problem_type"] == "regression":
        cfg.update(num_labels=1, label_unit=spec["unit"])
    else:
        cfg.update(id2label=dict(enumerate(spec["classes"])), label2id={c: i for i, c in enumerate(spec["classes"])})
    if experts is not None:
        cfg["experts"] = experts
    cfg.update(overrides)
    return EnECGConfig(**cfg)


def compute_all_features(raw: dict, signals, batch_size: int, seed: int):
    """Every expert's embedding and the gate inputs for every record, computed once (no grad)."""
    import torch

    from enecg_hf import EnECGModel

    torch.manual_seed(seed)
    model = EnECGModel(task_config(raw, "rr_interval")).eval()
    embeddings, gates = [], []
    with torch.no_grad():
        for start in range(0, len(signals), batch_size):
            features = model.compute_features(torch.from_numpy(signals[start : start + batch_size]))
            embeddings.append(features.expert_embeddings)
            gates.append(features.gate_inputs)
    names = model.expert_names
    return {name: torch.cat([e[i] for e in embeddings]) for i, name in enumerate(names)}, torch.cat(gates), names


def row_definitions(raw: dict, expert_names: list[str]) -> dict[str, dict]:
    rows = {}
    for expert in raw["experts"]:
        rows[f"expert:{expert['name']}"] = {"experts": [expert], "gate_type": "uniform", "adaptation": "full"}
    rows["uniform_ensemble"] = {"experts": None, "gate_type": "uniform", "adaptation": "lora"}
    rows["enecg_lora"] = {"experts": None, "gate_type": "learned", "adaptation": "lora"}
    rows["enecg_full"] = {"experts": None, "gate_type": "learned", "adaptation": "full"}
    return rows


ROW_LABELS = {
    "baseline:mean_or_majority": "mean / majority of the training folds",
    "baseline:neurokit_rr": "neurokit2 R-peaks, lead II, no learning",
    "uniform_ensemble": "uniform-average ensemble (LoRA heads, no gate)",
    "enecg_lora": "EnECG, LoRA heads + gate (paper)",
    "enecg_full": "EnECG, fully trained heads + gate",
}


class Scorer:
    """The training helper's local `evaluate` modules (enecg_hf/metrics), or scikit-learn if they fail to load."""

    def __init__(self):
        self.modules = {}
        try:
            import evaluate

            for name in ("regression_metrics", "classification_metrics"):
                self.modules[name] = evaluate.load(str(REPO / "enecg_hf" / "metrics" / name))
            self.source = "enecg_hf/metrics (evaluate)"
        except Exception as err:
            print(f"[quality] local evaluate metrics unavailable ({type(err).__name__}); using scikit-learn", flush=True)
            self.source = "scikit-learn"

    def __call__(self, task: str, logits, labels) -> dict[str, float]:
        import numpy as np

        if TASKS[task]["problem_type"] == "regression":
            pred, ref = np.asarray(logits, dtype=np.float64).reshape(-1), np.asarray(labels, dtype=np.float64)
            if "regression_metrics" in self.modules:
                out = self.modules["regression_metrics"].compute(predictions=pred.tolist(), references=ref.tolist())
                return {k: out[k] for k in ("mae", "mse", "rmse")}
            mse = float(np.mean((pred - ref) ** 2))
            return {"mae": float(np.mean(np.abs(pred - ref))), "mse": mse, "rmse": math.sqrt(mse)}
        logits = np.asarray(logits, dtype=np.float64)
        ref = np.asarray(labels, dtype=np.int64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        classes = list(range(len(TASKS[task]["classes"])))
        if "classification_metrics" in self.modules:
            out = self.modules["classification_metrics"].compute(
                predictions=logits.argmax(1).tolist(), references=ref.tolist(), prediction_scores=probs.tolist(),
                labels=classes)
            return {k: out[k] for k in ("accuracy", "precision", "recall", "f1", "auroc")}
        from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

        p, r, f, _ = precision_recall_fscore_support(ref, logits.argmax(1), labels=classes, average="macro",
                                                     zero_division=0)
        present = sorted(set(ref.tolist()))
        auroc = float("nan") if len(present) < 2 else float(np.mean(
            [roc_auc_score(ref == c, probs[:, c]) for c in present]))
        return {"accuracy": float(accuracy_score(ref, logits.argmax(1))), "precision": float(p), "recall": float(r),
                "f1": float(f), "auroc": auroc}


def train_and_predict(model, init_state, embeddings, gate, y, train_idx, test_idx, task, args, fold_seed):
    """Restore the initial head/gate weights (a fresh model), train with a fresh AdamW, predict the test fold."""
    import torch

    model.load_state_dict(init_state, strict=False)
    regression = TASKS[task]["problem_type"] == "regression"
    if regression:
        train_y = y[train_idx]
        model.config.target_mean = float(train_y.mean())
        model.config.target_std = float(train_y.std()) or 1.0
    model.freeze_experts()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=0.01)
    generator = torch.Generator().manual_seed(fold_seed)
    train_idx_t = torch.as_tensor(train_idx)
    model.train()
    for _ in range(args.epochs):
        order = train_idx_t[torch.randperm(len(train_idx_t), generator=generator)]
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            loss = model(expert_embeddings=[e[idx] for e in embeddings], gate_inputs=gate[idx], labels=y[idx]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    test = torch.as_tensor(test_idx)
    with torch.no_grad():
        out = model(expert_embeddings=[e[test] for e in embeddings], gate_inputs=gate[test])
    return out.logits.numpy()


def neurokit_rr(signal) -> float | None:
    """Mean RR (ms) from neurokit2 R peaks on lead II at 500 Hz; None when fewer than two peaks are found."""
    import neurokit2 as nk
    import numpy as np

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            _, info = nk.ecg_peaks(nk.ecg_clean(signal[1], sampling_rate=RATE), sampling_rate=RATE)
        except Exception:
            return None
    peaks = np.asarray(info["ECG_R_Peaks"], dtype=float)
    return float(np.diff(peaks).mean() / RATE * 1000.0) if peaks.size >= 2 else None


def summarize(folds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean ± sample std over folds; a metric undefined on some folds (AUROC with one class) uses the others."""
    import numpy as np

    summary = {}
    for key in folds[0]:
        values = np.asarray([f[key] for f in folds], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        summary[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                        "folds": int(values.size)}
    return summary


# ---------------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few records per source and few epochs (< 1 min)")
    parser.add_argument("--output", default=str(RESULTS / "quality.json"))
    parser.add_argument("--update-docs", action="store_true", help=f"rewrite the quality table in {DOCS.name}")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--config", default="hub_configs/tiny.json", help="expert sizes (random weights)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (3 if args.quick else 30)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()
    data_dir = Path(args.data_dir)
    if not (data_dir / "ludb").is_dir():
        raise SystemExit(f"No LUDB folder under {data_dir}: set --data-dir or ENECG_DATA_DIR")
    limits = {"ludb": 20, "challenge2021_sample50": 8, "challenge2020_awwong1": 4, "challenge2020_sebgood": 4} \
        if args.quick else None
    records, data_source = load_records(data_dir, limits)
    print(f"[quality] {len(records)} records from {data_source}", flush=True)
    signals = np.stack([r["signal"] for r in records])
    config_path = REPO / args.config if not Path(args.config).is_absolute() else Path(args.config)
    raw = base_config_dict(config_path)

    t0 = time.perf_counter()
    embeddings, gate, expert_names = compute_all_features(raw, signals, 16, args.seed)
    feature_seconds = time.perf_counter() - t0
    print(f"[quality] expert features for {len(records)} records in {feature_seconds:.0f} s", flush=True)
    scorer = Scorer()
    rows_def = row_definitions(raw, expert_names)
    results: dict[str, Any] = {
        "benchmark": "quality",
        "quick": args.quick,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {"source": data_source, "records": len(records),
                 "records_per_source": {s: sum(r["source"] == s for r in records) for s in SOURCES}},
        "setup": {
            "config": args.config, "experts": expert_names, "folds": args.folds, "epochs": args.epochs,
            "batch_size": args.batch_size, "learning_rate": args.learning_rate, "optimizer": "AdamW, weight decay 0.01",
            "seed": args.seed, "metrics": scorer.source,
            "cv": "subject-level k-fold (no subject in two folds); a fresh model and optimiser per fold and row",
            "random_weights": "every expert has random weights: the Hub is unreachable and no converted checkpoints "
                              "exist; tiny sizes (paper sizes take ~100 s per record on 2 CPU cores)",
            "single_expert_rows": "that expert alone with its own head, head trained fully",
            "arrhythmia_groups": "sinus = sinus rhythm/bradycardia/tachycardia; af_flutter = atrial fibrillation or "
                                 "flutter; other = any other rhythm statement (sinus arrhythmia, ...)",
        },
        "published": PUBLISHED,
        "tasks": {},
    }
    for task in args.tasks.split(","):
        results["tasks"][task] = run_task(task, records, embeddings, gate, raw, rows_def, scorer, args)
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


def run_task(task, records, embeddings, gate, raw, rows_def, scorer, args) -> dict:
    import numpy as np
    import torch

    from enecg_hf import EnECGModel

    spec = TASKS[task]
    regression = spec["problem_type"] == "regression"
    keep, values = [], []
    for i, r in enumerate(records):
        value = r[task] if task != "arrhythmia" or r[task] is None else spec["classes"].index(r[task])
        if r["source"] in spec["sources"] and value is not None:
            keep.append(i)
            values.append(value)
    y_all = np.asarray(values, dtype=np.float32 if regression else np.int64)
    subjects = [records[i]["subject_id"] for i in keep]
    folds = subject_folds(subjects, args.folds, args.seed)
    emb = {name: e[keep] for name, e in embeddings.items()}
    gate_t, y_t = gate[keep], torch.from_numpy(y_all)
    print(f"[quality] {task}: {len(keep)} records, {len(set(subjects))} subjects", flush=True)
    fold_metrics: dict[str, list[dict]] = {}

    # Baselines.
    for train_idx, test_idx in folds:
        train_y = y_all[train_idx]
        if regression:
            logits = np.full((len(test_idx), 1), train_y.mean())
        else:
            counts = np.bincount(train_y, minlength=len(spec["classes"])).astype(float) + 1e-3
            logits = np.tile(np.log(counts / counts.sum()), (len(test_idx), 1))
        fold_metrics.setdefault("baseline:mean_or_majority", []).append(scorer(task, logits, y_all[test_idx]))
    if task == "rr_interval":
        measured = [neurokit_rr(records[i]["signal"]) for i in keep]
        for train_idx, test_idx in folds:
            fallback = float(y_all[train_idx].mean())
            pred = np.asarray([measured[i] if measured[i] is not None else fallback for i in test_idx])
            fold_metrics.setdefault("baseline:neurokit_rr", []).append(scorer(task, pred, y_all[test_idx]))

    for row, definition in rows_def.items():
        torch.manual_seed(args.seed)
        overrides = {"gate_type": definition["gate_type"], "adaptation": definition["adaptation"]}
        model = EnECGModel(task_config(raw, task, definition["experts"], **overrides))
        names = model.expert_names
        init_state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("experts.")}
        row_emb = [emb[n] for n in names]
        for f, (train_idx, test_idx) in enumerate(folds):
            logits = train_and_predict(model, init_state, row_emb, gate_t, y_t, train_idx, test_idx, task, args,
                                       args.seed + f)
            fold_metrics.setdefault(row, []).append(scorer(task, logits, y_all[test_idx]))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        fold_metrics[row][0]["_trainable"] = trainable  # carried to the summary below
        print(f"[quality]   {row}: " + _short(summarize([{k: v for k, v in m.items() if k != '_trainable'}
                                                         for m in fold_metrics[row]])), flush=True)

    rows = {}
    for row, metrics in fold_metrics.items():
        trainable = metrics[0].pop("_trainable", 0)
        label = ROW_LABELS[row] if row in ROW_LABELS else f"{row.split(':', 1)[1]} expert alone, head trained fully"
        rows[row] = {"label": label,
                     "trainable_params": trainable, "metrics": summarize(metrics),
                     # A metric undefined on a fold (AUROC when the fold has one class) is left out of that fold.
                     "per_fold": [{k: v for k, v in m.items() if math.isfinite(v)} for m in metrics]}
    counts = {}
    if not regression:
        counts = {c: int((y_all == i).sum()) for i, c in enumerate(spec["classes"])}
    return {"problem_type": spec["problem_type"], "records": len(keep), "subjects": len(set(subjects)),
            "sources": list(spec["sources"]), "class_counts": counts,
            "label_mean": float(y_all.mean()) if regression else None, "rows": rows}


def _short(summary: dict) -> str:
    return ", ".join(f"{k} {v['mean']:.3g}±{v['std']:.2g}" for k, v in summary.items())


HEADLINE = {"rr_interval": ("mae", "rmse"), "age": ("mae", "rmse"), "sex": ("accuracy", "f1", "auroc"),
            "arrhythmia": ("accuracy", "f1", "auroc")}


def print_table(results: dict) -> None:
    for task, block in results["tasks"].items():
        print(f"\n== {task} ({block['records']} records, {block['subjects']} subjects) ==")
        for row, r in block["rows"].items():
            print(f"  {row:28s} " + "  ".join(
                f"{m} {r['metrics'][m]['mean']:.3g}±{r['metrics'][m]['std']:.2g}" for m in HEADLINE[task]
                if m in r["metrics"]))


def docs_table(results: dict) -> str:
    s = results["setup"]
    lines = [f"Setup: {s['folds']}-fold subject-level CV; experts {', '.join(s['experts'])} from `{s['config']}` with "
             f"random weights; heads/gate trained {s['epochs']} epochs, batch {s['batch_size']}, lr "
             f"{s['learning_rate']}, AdamW; metrics from {s['metrics']}; data: {results['data']['source']} "
             f"({results['data']['records']} records: "
             + ", ".join(f"{k} {v}" for k, v in results["data"]["records_per_source"].items()) + ").\n"]
    for task, block in results["tasks"].items():
        metrics = [m for m in HEADLINE[task]]
        extra = f"; classes {block['class_counts']}" if block["class_counts"] else \
            f"; label mean {block['label_mean']:.1f}"
        lines.append(f"**{task}** ({block['records']} records, {block['subjects']} subjects{extra})\n")
        lines.append("| row | " + " | ".join(metrics) + " | trainable params |")
        lines.append("|---|" + "---:|" * len(metrics) + "---:|")
        for row, r in block["rows"].items():
            cells = [f"{r['metrics'][m]['mean']:.3g} ± {r['metrics'][m]['std']:.2g}" if m in r["metrics"] else "n/a"
                     for m in metrics]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['trainable_params']:,} |")
        for source, values in PUBLISHED.get(task, {}).items():
            cells = [f"*{values[m]}*" if m in values else "" for m in metrics]
            note = f" ({values['note']})" if "note" in values else ""
            lines.append(f"| *published: {source}{note}* | " + " | ".join(cells) + " | |")
        lines.append("")
    run = results["run"]
    lines.append(f"Run {results['created']}: {run['elapsed_s']:.0f} s on {run['cpu_count']} shared cores "
                 f"({run['torch_threads']} torch threads), load average {run['load_average_start'][0]:.2f} at start.")
    return "\n".join(lines)


def update_docs(results: dict) -> None:
    text = DOCS.read_text() if DOCS.is_file() else f"# Benchmarks\n\n{DOCS_START}\n{DOCS_END}\n"
    if DOCS_START not in text:
        text += f"\n{DOCS_START}\n{DOCS_END}\n"
    head, rest = text.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    DOCS.write_text(f"{head}{DOCS_START}\n{docs_table(results)}\n{DOCS_END}{tail}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
