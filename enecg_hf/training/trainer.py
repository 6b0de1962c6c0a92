"""Training EnECG with `transformers.Trainer`: the columns the model reads, and what a fit takes from the training
records that gradients cannot learn (target scaling or class weights, each head's input standardisation).

    from transformers import Trainer, TrainingArguments
    from enecg_hf.training import EnECGTrainerCallback, model_inputs

    train = model_inputs(train_records, "rr_interval")           # input_values + labels, torch format
    trainer = Trainer(model=model, args=TrainingArguments("out", ...), train_dataset=train,
                      eval_dataset=model_inputs(test_records, "rr_interval"), callbacks=[EnECGTrainerCallback()])
    trainer.train()

`train.py` does not use `Trainer` (it trains heads and gate on cached expert features; see `fitting`); this module is
for users who bring their own `Trainer` set-up. The recipe, with figures, is in docs/training.md.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from ..configuration_enecg import EnECGConfig, EnECGTaskConfig
from ..features.compute import compute_features
from ..modeling_enecg import EnECGModel
from .fitting import CLASS_WEIGHTINGS, prepare_targets, task_of
from .scoring import load_metric


logger = logging.getLogger(__name__)

MODEL_INPUT_COLUMNS = ("input_values", "labels")


def model_inputs(dataset, label: str | None = None, config=None):
    """The columns `EnECGModel.forward` reads, from a dataset in the EnECG schema (`enecg_hf.data`).

    `transformers.Trainer` keeps only the columns named like `forward`'s arguments, so the built datasets' `signal`
    and label columns must be renamed; this does it, without copying the signals.

    Args:
        dataset: a `datasets.Dataset` with a `signal` column ((12, samples) in mV) and the label column.
        label: the label column (`rr_interval`, `age`, `sex`, `potassium_flag`, `arrhythmia`, or any other); default
            the name of the config's task (of a single-task config).
        config: the model's `EnECGConfig` (optional): checks the signal shape and the class names of the task
            `label`, and maps a string label column to class indices through the task's class names.

    Returns:
        The dataset with `input_values` and `labels` only, in torch format, without the records that have no label.
    """
    import datasets

    task = task_config_of(config, label) if config is not None else None
    label = label or (task.label_name if task is not None else None)
    if not label:
        raise ValueError("model_inputs: name the label column (label=...), or pass the model's config")
    missing = [name for name in ("signal", label) if name not in dataset.column_names]
    if missing:
        raise ValueError(f"model_inputs: the dataset has no column {missing} (columns: {dataset.column_names})")
    if config is not None:
        expected = (len(config.lead_names), config.input_length)
        shape = getattr(dataset.features["signal"], "shape", None)
        if shape is not None and tuple(shape) != expected:
            raise ValueError(f"model_inputs: signals are {tuple(shape)} (leads x samples) but the model reads "
                             f"{expected} ({config.input_length} samples at {config.sampling_rate} Hz)")

    values = dataset[label]
    keep = [i for i, value in enumerate(values) if not _is_missing(value)]
    if not keep:
        raise ValueError(f"model_inputs: label {label!r} has no values in this dataset ({len(dataset)} records)")
    if len(keep) < len(dataset):
        logger.info("model_inputs: %d of %d records have no %r label and are left out", len(dataset) - len(keep),
                    len(dataset), label)
        dataset = dataset.select(keep)

    feature = dataset.features[label]
    classification = task is not None and not task.is_regression
    if classification:
        names = [task.id2label[i] for i in range(task.num_labels)]
        if isinstance(feature, datasets.ClassLabel):
            if feature.names != names:
                raise ValueError(f"model_inputs: the classes of {label!r} are {feature.names}, the model's are {names}")
        elif getattr(feature, "dtype", None) == "string":
            unknown = sorted({values[i] for i in keep} - set(names))
            if unknown:
                raise ValueError(f"model_inputs: {label!r} values {unknown} are not classes of the model ({names})")
            dataset = dataset.cast_column(label, datasets.ClassLabel(names=names))
    elif getattr(feature, "dtype", None) == "string":
        raise ValueError(f"model_inputs: {label!r} holds strings: pass the model's config so that they become class "
                         "indices, or cast the column to datasets.ClassLabel")
    dataset = dataset.select_columns(["signal", label]).rename_columns({"signal": "input_values", label: "labels"})
    return dataset.with_format("torch")


def task_config_of(config: EnECGConfig, label: str | None = None) -> EnECGTaskConfig:
    """The task of `config` named `label`, or (no `label`) its only task."""
    tasks = {task.label_name: task for task in config.task_configs}
    if label is None and len(tasks) == 1:
        return next(iter(tasks.values()))
    if label not in tasks:
        raise ValueError(f"The model's tasks are {list(tasks)}: name one of them (got {label!r})")
    return tasks[label]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fit_label_statistics(model: EnECGModel, labels, class_weighting: str = "balanced") -> None:
    """Set what the training labels determine in a single-task model's task config (as `train.py` does,
    `fitting.prepare_targets`):
    `target_mean`/`target_std` for regression (the heads learn the standardised label), `class_weights` for
    single-label classification (`class_weighting="balanced"`: inverse class frequency; `"none"`: no weights).

    Args:
        labels: the training records' labels (list, numpy array or tensor; floats or class indices).
    """
    if class_weighting not in CLASS_WEIGHTINGS:
        raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {class_weighting!r}")
    labels = torch.as_tensor(np.asarray(labels))
    if labels.numel() == 0:
        raise ValueError("fit_label_statistics: no training labels")
    if labels.is_floating_point() and not torch.isfinite(labels).all():
        raise ValueError("fit_label_statistics: the labels contain NaN or infinite values; leave out the records "
                         "without a label (model_inputs does)")
    prepare_targets(task_of(model), labels, class_weighting)


def label_statistics_are_set(model: EnECGModel) -> bool:
    """Whether `fit_label_statistics` (or `train.py`) has set the target scaling; classification needs nothing."""
    return task_of(model).task_config.target_scaling_is_set


def head_standardization_is_set(model: EnECGModel) -> bool:
    """Whether the heads' input standardisation was fitted (or is switched off)."""
    return all(task.head_standardization_is_set() for task in model.tasks.values())


@torch.no_grad()
def expert_embeddings_of(model: EnECGModel, batches) -> list[torch.Tensor]:
    """Every expert's embeddings of the records of `batches` (dicts with `input_values`), one tensor per expert."""
    parts = []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            embeddings, _ = compute_features(model, batch["input_values"].to(model.device))
            parts.append([e.cpu() for e in embeddings])
    finally:
        model.train(was_training)
    return [torch.cat([batch[i] for batch in parts]) for i in range(len(model.experts))]


class EnECGTrainerCallback(TrainerCallback):
    """When `transformers.Trainer` starts training, fit what the training records determine and gradients cannot
    learn, as `train.py` does: the target scaling (regression) or class weights (`fit_label_statistics`), each
    head's input standardisation (`EnECGModel.fit_head_standardization`, from one pass of the frozen experts over the
    training records) and, for heads with a linear path (`config.head_type="linear_ffn"`), the linear paths
    (`linear_heads.fit_linear_paths`: each expert's L2 penalty by 5-fold cross-validation over the training
    records; gradients then train the FFNs on top). What is already set is kept unless `overwrite=True`, so a resumed
    or continued run keeps the statistics its heads were trained with.

    Args:
        class_weighting: `"balanced"` or `"none"` (single-label classification).
        head_standardization: fit the heads' input standardisation (one forward pass of the experts) and their
            linear paths.
        overwrite: refit statistics that are already set.
    """

    def __init__(self, class_weighting: str = "balanced", head_standardization: bool = True, overwrite: bool = False):
        if class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {class_weighting!r}")
        self.class_weighting = class_weighting
        self.head_standardization = head_standardization
        self.overwrite = overwrite

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        model = _enecg_model(model)
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise ValueError("EnECGTrainerCallback needs a map-style train_dataset (e.g. from model_inputs); with an "
                             "iterable one, call fit_label_statistics and model.fit_head_standardization yourself")
        if self.overwrite or not label_statistics_are_set(model):
            fit_label_statistics(model, _labels_of(dataset), self.class_weighting)
            logger.info("EnECGTrainerCallback: %s from %d training records",
                        _describe_statistics(task_of(model).task_config), len(dataset))
        if self.head_standardization and (self.overwrite or not head_standardization_is_set(model)):
            from torch.utils.data import DataLoader

            loader = DataLoader(dataset, batch_size=args.per_device_train_batch_size,
                                collate_fn=getattr(train_dataloader, "collate_fn", None))
            embeddings = expert_embeddings_of(model, loader)
            if task_of(model).has_linear_paths:
                fit_linear_paths_in_place(model, embeddings, _labels_of(dataset))
                logger.info("EnECGTrainerCallback: the heads' linear paths fitted on %d training records", len(dataset))
            model.fit_head_standardization(embeddings)
            logger.info("EnECGTrainerCallback: head input standardisation fitted on %d training records", len(dataset))


def fit_linear_paths_in_place(model: EnECGModel, embeddings: list[torch.Tensor], labels: torch.Tensor,
                              folds: int = 5, seed: int = 0) -> None:
    """Fit every head's linear path on these records (each expert's L2 penalty by `folds`-fold cross-validation over
    them, records shuffled with `seed`) and load it into the heads."""
    from sklearn.model_selection import KFold

    from .linear_heads import fit_linear_paths

    splits = list(KFold(min(folds, len(labels)), shuffle=True, random_state=seed).split(np.arange(len(labels))))
    task = task_of(model)
    result = fit_linear_paths(task, embeddings, torch.as_tensor(labels), splits)
    task.set_linear_paths(result["weight"], result["bias"])


def _enecg_model(model) -> EnECGModel:
    """The EnECG model inside what `Trainer` holds (the model itself, or a `peft.PeftModel` around it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, EnECGModel) and type(base).__name__ != "EnECGModel":
        raise TypeError(f"EnECGTrainerCallback trains EnECG models, got {type(base).__name__}")
    if len(base.tasks) != 1:
        raise ValueError("EnECGTrainerCallback trains single-task models. Train a model with several tasks with "
                         "`train.py --labels ...`, or fit each task on expert features with "
                         "enecg_hf.training.fit_enecg(model.tasks[name], table, rows)")
    return base


def _labels_of(dataset) -> torch.Tensor:
    """The `labels` column of a `datasets.Dataset` (read alone, without the signals), or of any map-style dataset."""
    if hasattr(dataset, "column_names") and "labels" in dataset.column_names:
        return torch.as_tensor(np.asarray(dataset.with_format("numpy")["labels"]))
    return torch.as_tensor(np.asarray([np.asarray(dataset[i]["labels"]) for i in range(len(dataset))]))


def _describe_statistics(config) -> str:
    if config.is_regression:
        return f"target scaling mean {config.target_mean:.4g}, std {config.target_std:.4g}"
    return f"class weights {config.class_weights}"


def regression_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for `Trainer` on a regression model: the scores `train.py` reports (MAE, MSE, RMSE, R², from
    our local `evaluate` module) of the mixture's prediction (the first of the model's outputs after the loss:
    `logits`, in the label's unit)."""
    predictions = eval_prediction.predictions
    logits = predictions[0] if isinstance(predictions, (tuple, list)) else predictions
    return _regression_metric().compute(
        predictions=np.asarray(logits, dtype=np.float64).reshape(-1).tolist(),
        references=np.asarray(eval_prediction.label_ids, dtype=np.float64).reshape(-1).tolist())


@functools.cache
def _regression_metric():
    return load_metric("regression")


__all__ = ["EnECGTrainerCallback", "model_inputs", "fit_label_statistics", "regression_metrics",
           "expert_embeddings_of", "MODEL_INPUT_COLUMNS"]
