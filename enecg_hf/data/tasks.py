"""The tasks EnECG predicts: one table (`TASKS`) that the data builders, training, model cards and benchmarks read.

A `TaskSpec` says what a label column is and how its values become model labels and back:

    from enecg_hf.data import TASKS
    TASKS["sex"].encode("male")        # 1
    TASKS["sex"].decode(1)             # "male"
    TASKS["rr_interval"].unit          # "ms"

Columns outside the table (a user's own label) are described by `TaskSpec.infer` from the dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..configuration_enecg import task_entries


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


class TaskError(ValueError):
    """A label column or value that does not fit its task."""


def is_missing(value: Any) -> bool:
    """True for None, NaN, empty strings and the usual spellings of "unknown"."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null", "unknown", "n/a", "na")


@dataclass
class TaskSpec:
    """What is predicted and how dataset values become model labels.

    Args:
        name: The dataset column (and the task's name in configs, outputs and metrics).
        problem_type: One of `PROBLEM_TYPES`.
        unit: Unit of a regression target (`"ms"`, `"years"`).
        class_names: Class names of a classification task; a label is the index of its class here.
        description: One line for model cards and docs.
        valid_range: `(low, high)`, inclusive: the values a regression target can physically take. A value outside
            is impossible (a wrong unit, a placeholder, a typo): the data builders store it as missing with a note,
            training leaves it out with a count (`training.labels`).
        column_classes: The names of a `datasets.ClassLabel` column's indices in a particular dataset (they may be
            ordered differently from `class_names`); set by `infer`.
    """

    name: str
    problem_type: str
    unit: str | None = None
    class_names: tuple[str, ...] | None = None
    description: str = ""
    valid_range: tuple[float, float] | None = None
    column_classes: tuple[str, ...] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.problem_type not in PROBLEM_TYPES:
            raise TaskError(f"Task {self.name!r}: problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        if self.class_names is not None:
            self.class_names = tuple(self.class_names)
        if not self.is_regression and (not self.class_names or len(self.class_names) < 2):
            raise TaskError(f"Task {self.name!r}: a classification task needs at least 2 class names")
        if self.column_classes is not None:
            self.column_classes = tuple(self.column_classes)
        if self.valid_range is not None:
            low, high = (float(value) for value in self.valid_range)
            if not self.is_regression or not low <= high:
                raise TaskError(f"Task {self.name!r}: valid_range {self.valid_range} needs a regression task and "
                                "low <= high")
            self.valid_range = (low, high)

    @property
    def is_regression(self) -> bool:
        return self.problem_type == "regression"

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.class_names)

    def task_entry(self) -> dict[str, Any]:
        """This task as an entry of `EnECGConfig.tasks` (name, problem type, unit or classes)."""
        return {"name": self.name, "problem_type": self.problem_type, "unit": self.unit,
                "class_names": list(self.class_names) if self.class_names else None}

    def config_fields(self) -> dict[str, Any]:
        """The `EnECGConfig` fields of a single-task model predicting this task: `{"tasks": [its entry]}`."""
        return {"tasks": [self.task_entry()]}

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> "TaskSpec":
        """The task `name` (default: the first) of an `EnECGConfig` or its dict (of either shape)."""
        entries = task_entries(config if isinstance(config, dict) else config.to_dict())
        entry = next((e for e in entries if e["name"] == name), None) if name else entries[0]
        if entry is None:
            raise TaskError(f"The config has no task {name!r}; its tasks are {[e['name'] for e in entries]}")
        known = TASKS.get(entry["name"])
        if entry["problem_type"] == "regression":
            return cls(entry["name"], "regression", unit=entry.get("unit"),
                       description=known.description if known else "",
                       valid_range=known.valid_range if known and known.is_regression else None)
        return cls(entry["name"], entry["problem_type"], class_names=tuple(entry["class_names"]),
                   description=known.description if known else "")

    @classmethod
    def infer(cls, name: str, dataset, config_dict: dict[str, Any] | None = None) -> "TaskSpec":
        """The task of column `name` of `dataset`: from `TASKS` for the five EnECG labels, else from the column
        (a `ClassLabel` or strings: classification; floats: regression). The classes of a config that already
        predicts this column (a task of `config_dict`, of either shape) keep their order."""
        import datasets

        config_dict = config_dict or {}
        if name not in dataset.column_names:
            raise TaskError(f"Unknown label column {name!r}: the dataset has {dataset.column_names}. "
                            f"Known tasks: {sorted(TASKS)}")
        feature = dataset.features[name]
        column_classes = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        config_task = next((task for task in task_entries(config_dict) if task["name"] == name), None)
        same_label = config_task is not None
        config_classes = tuple(config_task["class_names"]) if same_label and config_task.get("class_names") else None
        if name in TASKS:
            known = TASKS[name]
            if known.is_regression:
                return known
            return replace(known, class_names=config_classes or known.class_names, column_classes=column_classes)
        if column_classes is not None:
            return cls(name, "single_label_classification", class_names=config_classes or column_classes,
                       column_classes=column_classes)
        dtype = getattr(feature, "dtype", None)
        if dtype in ("float16", "float32", "float64"):
            return cls(name, "regression", unit=config_task.get("unit") if same_label else None)
        if dtype is None:
            raise TaskError(f"Label column {name!r} is not a scalar column ({feature}); pick a scalar column")
        values = tuple(sorted({str(v) for v in dataset[name] if not is_missing(v)}))
        if len(values) < 2:
            raise TaskError(f"Label column {name!r} has fewer than 2 distinct values {values}: nothing to classify")
        return cls(name, "single_label_classification", class_names=config_classes or values)

    def encode(self, value: Any) -> float | int | None:
        """Dataset value -> model label (float for regression, class index), None if missing."""
        if is_missing(value):
            return None
        if self.is_regression:
            return float(value)
        if isinstance(value, (int, np.integer, bool)) and not isinstance(value, str):
            # A class index: of the dataset's ClassLabel column (matched by name, the orders may differ), or of
            # this task's classes for a known task stored as 0/1.
            classes = self.column_classes or (self.class_names if self.name in TASKS else None)
            if classes is not None:
                if not 0 <= int(value) < len(classes):
                    raise TaskError(f"Label {self.name!r}: value {value} is not a class index of {list(classes)}")
                value = classes[int(value)]
        text = str(value)
        if text not in self.class_names:
            raise TaskError(f"Label {self.name!r}: value {text!r} is not one of the classes {list(self.class_names)}")
        return self.class_names.index(text)

    def decode(self, label: float | int) -> float | str:
        """Model label -> what a person reads: the value (regression, in `unit`) or the class name."""
        return float(label) if self.is_regression else self.class_names[int(label)]


ARRHYTHMIA_CLASSES = (
    "sinus_rhythm",
    "sinus_bradycardia",
    "sinus_tachycardia",
    "atrial_fibrillation",
    "atrial_flutter",
    "other",
)

TASKS: dict[str, TaskSpec] = {
    task.name: task
    for task in (
        # Impossible values: RR intervals of heart rates over 600 or under 6 beats per minute; ages under 0 or
        # over 125 years (the oldest documented person lived to 122).
        TaskSpec("rr_interval", "regression", unit="ms",
                 description="mean interval between successive R peaks", valid_range=(100.0, 10000.0)),
        TaskSpec("age", "regression", unit="years", description="age of the patient", valid_range=(0.0, 125.0)),
        TaskSpec("sex", "single_label_classification", class_names=("female", "male"),
                 description="sex of the patient"),
        TaskSpec("potassium_flag", "single_label_classification", class_names=("normal", "abnormal"),
                 description="abnormal serum potassium (MIMIC-IV labs joined to the ECG)"),
        TaskSpec("arrhythmia", "single_label_classification", class_names=ARRHYTHMIA_CLASSES,
                 description="rhythm of the record"),
    )
}


__all__ = ["TaskSpec", "TaskError", "TASKS", "PROBLEM_TYPES", "ARRHYTHMIA_CLASSES", "is_missing"]
