"""Scores of a run through our local `evaluate` modules, the trivial baselines, and fold summaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.tasks import TaskSpec


METRICS_DIR = Path(__file__).resolve().parents[1] / "metrics"


def load_metric(problem_type: str):
    """Our local `evaluate` module for the task (Hub metrics need the network)."""
    import evaluate

    name = "regression_metrics" if problem_type == "regression" else "classification_metrics"
    return evaluate.load(str(METRICS_DIR / name))


def score(predictions: dict[str, np.ndarray], label: TaskSpec, metric) -> dict[str, float]:
    logits, references = predictions["logits"], predictions["labels"]
    if label.is_regression:
        return metric.compute(predictions=logits[:, 0].astype(np.float64).tolist(),
                              references=references.astype(np.float64).tolist())
    probabilities = torch.softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    return metric.compute(predictions=logits.argmax(-1).tolist(), references=references.astype(np.int64).tolist(),
                          prediction_scores=probabilities.tolist(), labels=list(range(len(label.class_names))))


def baseline_predictions(train_labels: np.ndarray, eval_labels: np.ndarray, label: TaskSpec) -> dict[str, np.ndarray]:
    """The trivial predictor fitted on the training split: its mean (regression) or its majority class."""
    n = len(eval_labels)
    if label.is_regression:
        logits = np.full((n, 1), float(train_labels.mean()), dtype=np.float64)
    else:
        counts = np.bincount(train_labels.astype(np.int64), minlength=len(label.class_names)).astype(np.float64)
        logits = np.tile(np.log((counts + 1e-3) / (counts + 1e-3).sum()), (n, 1))
    return {"logits": logits, "labels": eval_labels}


def summarize(fold_metrics: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1) over folds of every metric. A metric undefined on some folds (NaN:
    AUROC of a test fold with one class) is summarised over the others, and left out when it is undefined on all."""
    summary = {}
    for key in fold_metrics[0]:
        values = np.asarray([m.get(key, np.nan) for m in fold_metrics], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            summary[key] = {"mean": float(np.mean(values)),
                            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return summary


def cross_validate(model, table, folds, label: TaskSpec, settings=None, metric=None) -> list[dict[str, float]]:
    """Each fold's scores: for every `(train, test)` rows of `folds`, `model`'s heads and gate are fitted on the
    `train` rows of `table` (`fit_enecg`: from the same initial weights each time) and scored on the `test` rows.
    `model` is a single-task model or one task of a multi-task model (`model.tasks[name]`)."""
    from .fitting import fit_enecg, predict

    metric = metric or load_metric(label.problem_type)
    scores = []
    for train, test in folds:
        fit_enecg(model, table, train, settings)
        scores.append(score(predict(model, table, test), label, metric))
    return scores


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def best_expert(task_metrics: dict) -> dict | None:
    """The expert whose own head scored best in a task's CV folds on the headline metric (MAE, else AUROC): its name,
    the metric and its CV summary of every metric (`cv_experts` of train.py's metrics); None without per-expert
    scores."""
    name = "mae" if "mae" in task_metrics.get("cv", {}) else "auroc"
    experts = task_metrics.get("cv_experts") or {}
    scored = {expert: summary[name]["mean"] for expert, summary in experts.items() if name in summary}
    if not scored:
        return None
    best = (min if name == "mae" else max)(scored, key=scored.get)
    return {"name": best, "metric": name, "cv": experts[best]}
