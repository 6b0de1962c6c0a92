"""Cross-validation splits that keep each subject on one side."""

from __future__ import annotations

import numpy as np
import datasets
from sklearn.model_selection import GroupKFold


def _column(dataset: datasets.Dataset, name: str) -> list:
    """One column's values in the dataset's row order. (`dataset.data` is the table under any `select`, `shuffle` or
    `filter`: its row i is not the dataset's row i, so it must not be read directly.)"""
    return dataset.with_format("arrow")[name].to_pylist()


def _subjects(dataset: datasets.Dataset) -> np.ndarray:
    """Subject id of every row; a row without one is its own subject (its record id)."""
    subjects, records = _column(dataset, "subject_id"), _column(dataset, "record_id")
    return np.array([f"subject:{s}" if s is not None else f"record:{r}" for s, r in zip(subjects, records)])


def subject_kfold(dataset: datasets.Dataset, k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-fold split by subject: no subject has records on both sides of any fold.

    Subjects are shuffled with `seed` before being dealt into folds (`GroupKFold(shuffle=True)` keeps the folds'
    sizes balanced), so the folds do not follow the order of the source.

    Args:
        dataset: a dataset with `subject_id` and `record_id` columns.
        k: number of folds (at least 2, at most the number of subjects).
        seed: shuffling seed.

    Returns:
        `k` pairs `(train_indices, test_indices)` of sorted int64 row indices; the test sides partition the rows.
    """
    groups = _subjects(dataset)
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if len(set(groups)) < k:
        raise ValueError(f"cannot make {k} subject folds from {len(set(groups))} subjects")
    splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    rows = np.arange(len(groups))
    return [(np.sort(train), np.sort(test)) for train, test in splitter.split(rows, groups=groups)]


def column_folds(dataset: datasets.Dataset, column: str = "strat_fold") -> list[tuple[np.ndarray, np.ndarray]]:
    """Predefined folds from a column, e.g. PTB-XL's official `strat_fold` (1-10, already split by patient).

    Returns:
        One `(train_indices, test_indices)` pair per distinct value of `column`, in ascending order of the value;
        the test side is the rows with that value. Rows where `column` is null are in no test side.
    """
    values = np.array([np.nan if value is None else value for value in _column(dataset, column)], float)
    folds = sorted(set(values[~np.isnan(values)].tolist()))
    rows = np.arange(len(values))
    return [(rows[(values != fold) & ~np.isnan(values)], rows[values == fold]) for fold in folds]
