"""A run's labels: which records have one, their encoded values, and whether the folds can learn every class."""

from __future__ import annotations

import logging

import numpy as np

from ..data.tasks import TaskError, TaskSpec
from .errors import TrainingSetupError


logger = logging.getLogger(__name__)


def encode_labels(dataset, label: TaskSpec) -> tuple[list[int], np.ndarray]:
    """(indices of records with a label, their encoded labels)."""
    try:
        encoded = [label.encode(v) for v in dataset[label.name]]
    except TaskError as error:
        raise TrainingSetupError(str(error)) from error
    keep = [i for i, v in enumerate(encoded) if v is not None]
    if not keep:
        raise TrainingSetupError(f"Label {label.name!r} has no values in this dataset ({len(dataset)} records, all missing)")
    dropped = len(encoded) - len(keep)
    if dropped:
        logger.warning("Label %r is missing for %d of %d records: they are left out", label.name, dropped, len(encoded))
    dtype = np.float32 if label.is_regression else np.int64
    return keep, np.asarray([encoded[i] for i in keep], dtype=dtype)



def check_class_coverage(labels: np.ndarray, label: TaskSpec, folds) -> list[str]:
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
