"""A run's labels: which records have a usable one, their encoded values, and whether the folds can learn every
class."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from ..data.tasks import TaskError, TaskSpec
from .errors import TrainingSetupError


logger = logging.getLogger(__name__)


def encode_labels(dataset, label: TaskSpec, warnings: list[str] | None = None) -> tuple[list[int], np.ndarray]:
    """(indices of records with a usable label, their encoded labels).

    Records without the label are left out (logged). So are, with a count and examples in a warning (logged and
    appended to `warnings`, which `train.py` keeps in metrics.json), regression labels that are not finite or lie
    outside the task's `valid_range` (`enecg_hf.data.TASKS`: impossible values, such as an age of 1e9 years); when
    none is left the run is refused."""
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
    if label.is_regression:
        keep = _possible_values(dataset, keep, encoded, label, warnings)
    dtype = np.float32 if label.is_regression else np.int64
    return keep, np.asarray([encoded[i] for i in keep], dtype=dtype)


def _possible_values(dataset, keep: list[int], encoded: list, label: TaskSpec, warnings: list[str] | None) -> list[int]:
    """`keep` without the rows whose regression label is not finite or outside `label.valid_range` (see
    `encode_labels`)."""
    values = np.asarray([encoded[i] for i in keep], dtype=np.float64)
    finite = np.isfinite(values)
    low, high = label.valid_range or (-np.inf, np.inf)
    possible = finite & (values >= low) & (values <= high)
    if possible.all():
        return keep
    impossible = [keep[i] for i in np.flatnonzero(~possible)]
    ids = dataset.select(impossible[:5])["record_id"] if "record_id" in dataset.column_names else impossible[:5]
    examples = ", ".join(f"{record_id}={encoded[row]:g}" for record_id, row in zip(ids, impossible))
    reasons = [f"{int((~finite).sum())} not finite"] if not finite.all() else []
    if (finite & ~possible).any():
        unit = f" {label.unit}" if label.unit else ""
        reasons.append(f"{int((finite & ~possible).sum())} outside the possible {low:g}-{high:g}{unit}")
    detail = f"{' and '.join(reasons)} (e.g. {examples}{', ...' if len(impossible) > 5 else ''})"
    if not possible.any():
        raise TrainingSetupError(f"Label {label.name!r}: none of its {len(keep)} values is possible: {detail}. Is the "
                                 f"column in another unit than {label.unit!r}?")
    message = (f"{len(impossible)} of {len(encoded)} records are left out for impossible values: {detail}")
    logger.warning("Label %r: %s", label.name, message)
    if warnings is not None:
        warnings.append(message)
    return [row for row, ok in zip(keep, possible) if ok]


def check_repeated_records(records) -> list[str]:
    """A warning (returned, and logged) when record ids repeat (within a source): a record listed twice weighs double
    in training and, under two subject ids, can sit on both sides of a fold split."""
    if "record_id" not in records.column_names:
        return []
    columns = [name for name in ("source", "record_id") if name in records.column_names]
    table = records.select_columns(columns).with_format("arrow")[:]
    counts = Counter(zip(*(table[name].to_pylist() for name in columns)))
    repeated = [key[-1] for key, count in counts.items() if count > 1]
    if not repeated:
        return []
    extra = sum(count - 1 for count in counts.values())
    message = (f"{extra} record{'s' if extra > 1 else ''} repeat{'' if extra > 1 else 's'} the record id of another "
               f"({len(repeated)} id{'s' if len(repeated) > 1 else ''}, e.g. {repeated[:5]}): a record listed twice "
               "weighs double in training and, under two subject ids, can sit on both sides of a fold split; "
               "deduplicate the dataset (the data builder keeps each id once)")
    logger.warning(message)
    return [message]


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
