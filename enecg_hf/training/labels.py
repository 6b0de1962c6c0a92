"""What a run predicts: the label column, its task and classes, and the config of every model of the run."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..configuration_enecg import EnECGConfig
from .arguments import TrainScriptArguments
from .errors import TrainingSetupError


logger = logging.getLogger(__name__)

# The repository's hub_configs/, reached through the package's `hub_configs` link and shipped in wheels as package data.
HUB_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "hub_configs"

# Labels the data module produces, with their task. Other numeric/string columns work too (inferred, see
# `LabelSpec.infer`).
REGRESSION_LABELS = {"rr_interval": "ms", "age": "years"}
CLASS_NAMES = {"sex": ["female", "male"], "potassium_flag": ["normal", "abnormal"]}  # index = stored 0/1 value
CLASSIFICATION_LABELS = ("sex", "potassium_flag", "arrhythmia")


def resolve_config_path(config: str) -> Path:
    """A config path, or the name of a file in `hub_configs/` (found in a checkout and in an installed wheel)."""
    for candidate in (Path(config), HUB_CONFIGS_DIR / config, HUB_CONFIGS_DIR / f"{config}.json"):
        if candidate.is_file():
            return candidate
    raise TrainingSetupError(f"Config {config!r} not found (a JSON path, or a name in {HUB_CONFIGS_DIR})")


@dataclass
class LabelSpec:
    """What is predicted and how dataset values become model labels."""

    name: str
    problem_type: str
    class_names: list[str] | None = None
    unit: str | None = None
    # The names of a `datasets.ClassLabel` column's indices (the built datasets' class labels), else None.
    column_classes: list[str] | None = None

    @property
    def is_regression(self) -> bool:
        return self.problem_type == "regression"

    @classmethod
    def infer(cls, name: str, dataset, config_dict: dict[str, Any]) -> "LabelSpec":
        if name not in dataset.column_names:
            raise TrainingSetupError(
                f"Unknown label column {name!r}: the dataset has {dataset.column_names}. Known labels: "
                f"{sorted([*REGRESSION_LABELS, *CLASSIFICATION_LABELS])}"
            )
        if name in REGRESSION_LABELS:
            return cls(name, "regression", unit=REGRESSION_LABELS[name])
        import datasets

        config_classes = None
        if config_dict.get("label_name") == name and config_dict.get("id2label"):
            id2label = config_dict["id2label"]
            config_classes = [id2label[k] for k in sorted(id2label, key=int)]
        feature = dataset.features[name]
        column_classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        if name in CLASS_NAMES:
            return cls(name, "single_label_classification", config_classes or list(CLASS_NAMES[name]),
                       column_classes=column_classes)
        if name == "arrhythmia":
            from ..data import ARRHYTHMIA_CLASSES

            return cls(name, "single_label_classification", config_classes or list(ARRHYTHMIA_CLASSES),
                       column_classes=column_classes)
        if column_classes is not None:
            return cls(name, "single_label_classification", config_classes or column_classes,
                       column_classes=column_classes)
        dtype = getattr(feature, "dtype", None)
        if dtype in ("float16", "float32", "float64"):
            return cls(name, "regression", unit=config_dict.get("label_unit") if config_dict.get("label_name") == name else None)
        if dtype is None:
            raise TrainingSetupError(f"Label column {name!r} is not a scalar column ({feature}); pick a scalar column")
        values = sorted({str(v) for v in dataset[name] if not _is_missing(v)})
        return cls(name, "single_label_classification", config_classes or values)

    def encode(self, value: Any) -> float | int | None:
        """Dataset value -> model label (float for regression, class index), None if missing."""
        if _is_missing(value):
            return None
        if self.is_regression:
            return float(value)
        if self.column_classes is not None and isinstance(value, (int, np.integer)):
            if not 0 <= int(value) < len(self.column_classes):
                raise TrainingSetupError(f"Label {self.name!r}: value {value} is not a class index of {self.column_classes}")
            value = self.column_classes[int(value)]  # by name: the config's classes may be ordered differently
        elif self.name in CLASS_NAMES and isinstance(value, (int, np.integer, bool)):
            if not 0 <= int(value) < len(self.class_names):
                raise TrainingSetupError(f"Label {self.name!r}: value {value} is not a class index of {self.class_names}")
            return int(value)
        text = str(value)
        if text not in self.class_names:
            raise TrainingSetupError(f"Label {self.name!r}: value {text!r} is not one of the classes {self.class_names}")
        return self.class_names.index(text)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def build_config(args: TrainScriptArguments, label: LabelSpec, config_dict: dict[str, Any]) -> EnECGConfig:
    """The config of every model of the run: the file's, with the label and the command-line overrides."""
    data = {k: v for k, v in config_dict.items() if k not in ("id2label", "label2id", "num_labels", "problem_type")}
    data.update(label_name=label.name, problem_type=label.problem_type)
    if label.is_regression:
        data.update(num_labels=1, label_unit=label.unit)
    else:
        data.update(id2label=dict(enumerate(label.class_names)), label_unit=None)
        data["label2id"] = {name: i for i, name in enumerate(label.class_names)}
    if args.experts:
        known = [e["name"] for e in data["experts"]]
        unknown = [name for name in args.experts if name not in known]
        if unknown:
            raise TrainingSetupError(f"--experts: unknown expert(s) {unknown}; the config has {known}")
        data["experts"] = [e for e in data["experts"] if e["name"] in args.experts]
    if args.gate:
        data["gate_type"] = args.gate
    if args.adaptation:
        data["adaptation"] = args.adaptation
    try:
        return EnECGConfig(**data)
    except ValueError as err:
        raise TrainingSetupError(f"Invalid config: {err}") from err


def encode_labels(dataset, label: LabelSpec) -> tuple[list[int], np.ndarray]:
    """(indices of records with a label, their encoded labels)."""
    encoded = [label.encode(v) for v in dataset[label.name]]
    keep = [i for i, v in enumerate(encoded) if v is not None]
    if not keep:
        raise TrainingSetupError(f"Label {label.name!r} has no values in this dataset ({len(dataset)} records, all missing)")
    dropped = len(encoded) - len(keep)
    if dropped:
        logger.warning("Label %r is missing for %d of %d records: they are left out", label.name, dropped, len(encoded))
    dtype = np.float32 if label.is_regression else np.int64
    return keep, np.asarray([encoded[i] for i in keep], dtype=dtype)



def check_class_coverage(labels: np.ndarray, label: LabelSpec, folds) -> list[str]:
    """Warnings for classes that cannot be learned or scored fairly (returned, and logged)."""
    messages = []
    present = sorted(set(labels.tolist()))
    if len(present) < 2:
        raise TrainingSetupError(
            f"Label {label.name!r} has a single class in this dataset ({label.class_names[present[0]]!r}): "
            "nothing to classify"
        )
    absent = [label.class_names[i] for i in range(len(label.class_names)) if i not in present]
    if absent:
        messages.append(f"classes never seen in the data (the model will not predict them): {absent}")
    for i, (train_idx, test_idx) in enumerate(folds):
        only_test = sorted(set(labels[test_idx].tolist()) - set(labels[train_idx].tolist()))
        if only_test:
            names = [label.class_names[c] for c in only_test]
            messages.append(f"fold {i + 1}: classes {names} appear only in the test fold (never trained on)")
    for message in messages:
        logger.warning("Label %r: %s", label.name, message)
    return messages


