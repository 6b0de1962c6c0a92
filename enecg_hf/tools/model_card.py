"""Model cards for trained EnECG folders: `README.md` rendered from the `model_card.md` template.

The template is the repository's top-level `model_card.md`; the package ships a copy (`enecg_hf/templates/`) so that
installed users render the same card. A test keeps the two identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..modeling_enecg import EnECGModel


# The repository's model_card.md, through a link in a checkout, shipped in wheels as package data.
TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "model_card.md"

# The Hub has no task for classifying or regressing time series; its time-series task (forecasting) sits under the
# "tabular" modality, next to these two, the nearest tasks it knows (huggingface.js `PIPELINE_DATA`).
HUB_TASKS = {"regression": "tabular-regression", "classification": "tabular-classification"}
# Hub dataset ids of our data sources: none of them is on the Hub under an official id (the `datasets` metadata lists
# Hub ids only); the card links the sources' own pages instead.
HUB_DATASET_IDS: dict[str, str] = {}
SOURCE_PAGES = {
    "ludb": "https://physionet.org/content/ludb/1.0.1/",
    "ptb-xl": "https://physionet.org/content/ptb-xl/1.0.3/",
    "challenge": "https://physionet.org/content/challenge-2021/1.0.3/",
    "mimic-iv-ecg": "https://physionet.org/content/mimic-iv-ecg/1.0/",
}

METRIC_NAMES = {"mae": "MAE", "mse": "MSE", "rmse": "RMSE", "r2": "R²", "accuracy": "Accuracy",
                "precision": "Precision (macro)", "recall": "Recall (macro)", "f1": "F1 (macro)", "auroc": "AUROC"}


def template_path() -> Path:
    """The model card template (`model_card.md`)."""
    return TEMPLATE


def random_weight_experts(model: EnECGModel) -> list[str]:
    """Experts that have weights but no pretrained source: their weights are random."""
    return [
        e.name if e.name == e.type else f"{e.name} ({e.type})"
        for e in model.config.expert_configs
        if not e.pretrained and getattr(model.experts[e.name], "has_weights", True)
    ]


def expert_table(model: EnECGModel) -> list[dict[str, str]]:
    """One row per expert for the card: where its weights came from, their licence and training data."""
    rows = []
    for e in model.config.expert_configs:
        expert = model.experts[e.name]
        if not getattr(expert, "has_weights", True):
            weights, license_, data = "none (measurements)", "–", "–"
        elif e.pretrained:
            weights = f"`{e.pretrained}`"
            license_ = getattr(expert, "WEIGHTS_LICENSE", None) or "see the source"
            data = getattr(expert, "WEIGHTS_TRAINING_DATA", None) or "see the source"
        else:
            weights, license_, data = "RANDOM (no pretrained source)", "–", "–"
        rows.append({"name": e.name, "type": e.type, "weights": weights, "license": license_, "data": data})
    return rows


def render_model_card(model: EnECGModel, metrics: dict[str, Any], training_args: dict[str, Any],
                      dataset_sources: list[str], random_experts: list[str], model_id: str,
                      template: str | Path | None = None) -> str:
    """The README.md of a trained model folder: YAML metadata (license, `pipeline_tag`, tags, Hub datasets, metrics,
    model-index with the cross-validation results under a task the Hub knows) and the sections of the template
    (first a pipeline snippet on a real PhysioNet record, the evaluation, the citation)."""
    import math

    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .. import __version__

    config = model.config
    # A multi-task run's metrics hold one single-task block per task; the card has a section per task.
    tasks = [task_section(m) for m in (metrics["tasks"].values() if "tasks" in metrics else [metrics])]
    multitask = "tasks" in metrics
    regression = tasks[0]["regression"]
    task_type = HUB_TASKS["regression" if regression else "classification"]
    dataset_name = ", ".join(dataset_sources) or "custom"
    hub_datasets = [HUB_DATASET_IDS[s] for s in dataset_sources if s in HUB_DATASET_IDS]
    dataset_type = ("+".join(hub_datasets) if len(hub_datasets) == len(dataset_sources) and hub_datasets
                    else dataset_name.replace(", ", "+"))
    scores = [(task, f"{task['folds']}-fold subject-wise CV", None, name, summary["mean"], "CV mean")
              for task in tasks for name, summary in task["cv"].items()]
    # Under a split of their own: the Hub groups results by dataset and split, and keeps one name per group.
    scores += [(task, "leave-one-source-out CV", "held-out sources", name, value, "held-out sources, pooled")
               for task in tasks if task["cv_source"] for name, value in task["cv_source"]["pooled"].items()]
    eval_results = [
        EvalResult(
            task_type=HUB_TASKS["regression" if task["regression"] else "classification"],
            task_name=f"ECG {task['label']} {'regression' if task['regression'] else 'classification'}",
            # `type` names a Hub dataset where there is one; otherwise the source (the Hub then links nothing).
            dataset_type=dataset_type,
            dataset_name=f"{dataset_name} ({protocol})", dataset_split=split,
            metric_type=name, metric_name=f"{METRIC_NAMES.get(name, name)} ({what})", metric_value=round(value, 6),
        )
        for task, protocol, split, name, value, what in scores
        if not math.isnan(value)
    ]
    kinds = sorted({"regression" if task["regression"] else "classification" for task in tasks})
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag=task_type,
        tags=["ecg", "time-series", *[f"time-series-{kind}" for kind in kinds], "medical",
              "enecg", "mixture-of-experts", "peft", "lora", *(["multi-task"] if multitask else [])],
        datasets=hub_datasets or None,
        metrics=list(dict.fromkeys(name for task in tasks for name in (task["cv"] or task["final_metrics"]))),
        model_name=model_id,
        eval_results=eval_results or None,
    )
    if multitask:
        label = ", ".join(task["label"] for task in tasks)
        output_description = "dict by task: " + "; ".join(f"{t['label']} {t['output_description']}" for t in tasks)
        pipeline_output_description = ('{"tasks": {' + ", ".join(f'"{t["label"]}": {{...}}' for t in tasks)
                                       + '}}, each task\'s prediction with its unit or class scores')
        task_description = f"{len(tasks)} tasks from one pass of the experts"
    else:
        label, output_description = tasks[0]["label"], tasks[0]["output_description"]
        pipeline_output_description, task_description = tasks[0]["pipeline_output"], tasks[0]["task_description"]
    card = ModelCard.from_template(
        card_data,
        template_path=str(template or template_path()),
        model_id=model_id,
        version=__version__,
        label=label,
        multitask=multitask,
        tasks=tasks,
        task_description=task_description,
        experts=config.expert_names,
        expert_sources={e.name: e.pretrained for e in config.expert_configs if e.pretrained},
        expert_table=expert_table(model),
        random_experts=random_experts,
        adaptation_description=(f"LoRA r={config.lora_r}, alpha={config.lora_alpha}" if config.adaptation == "lora"
                                else "trained fully"),
        gate_description=("learned softmax gate reading " + ", ".join(config.gate_leads) if config.gate_type == "learned"
                          else "uniform average (no learned gate)") + (" per task" if multitask else ""),
        leads=len(config.lead_names), lead_names=config.lead_names, input_length=config.input_length,
        sampling_rate=config.sampling_rate, seconds=f"{config.input_length / config.sampling_rate:g}",
        normalization=config.normalization, output_description=output_description,
        pipeline_output_description=pipeline_output_description,
        records=metrics["records"], dataset_sources=dataset_sources, dataset_links=SOURCE_PAGES,
        epochs=training_args["epochs"], batch_size=training_args["batch_size"],
        learning_rate=training_args["learning_rate"], weight_decay=training_args["weight_decay"],
        seed=training_args["seed"], cache_features=training_args["cache_features"],
        strategy=training_args.get("strategy", "joint"), inner_folds=training_args.get("inner_folds"),
        inner_groups=training_args.get("inner_groups", "subject"), head_type=getattr(config, "head_type", "ffn"),
    )
    return str(card).rstrip("\n") + "\n"


def task_section(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the card says about one task, from its block of `metrics.json`."""
    regression = metrics["problem_type"] == "regression"
    unit = metrics.get("unit") or ""
    classes = metrics.get("classes") or []
    return {
        "label": metrics["label"], "regression": regression, "unit": metrics.get("unit"),
        "classes": classes if not regression else None, "records": metrics["records"],
        "task_description": f"regression, {unit or 'label units'}" if regression else "classification",
        "output_description": (f"(batch, 1) {metrics['label']} in {unit or 'the label unit'}" if regression
                               else f"(batch, {len(classes)}) class logits: {', '.join(classes)}"),
        "pipeline_output": (f'{{"label": "{metrics["label"]}", "value": ..., "unit": "{unit}"}}' if regression
                            else f"the predicted {metrics['label']} class and each class's score"),
        "folds": len(metrics["folds"]), "cv": metrics["cv"], "cv_baseline": metrics["cv_baseline"],
        "cv_source": metrics.get("cv_source"),
        "baseline_description": "its mean" if regression else "its majority class",
        "final_fit": metrics.get("final", {}).get("fit") or {},
        "final_metrics": metrics.get("final", {}).get("metrics") or {},
        "gate_weights": metrics.get("final", {}).get("gate_weights") or {},
    }


__all__ = ["render_model_card", "task_section", "random_weight_experts", "expert_table", "template_path"]
