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


# Challenge 2020/2021 records are named by the database they come from; the prefix says which.
CHALLENGE_DATABASES = (("HR", "ptb-xl"), ("JS", "chapman-ningbo"), ("A", "cpsc2018"), ("Q", "cpsc-extra"),
                       ("E", "georgia"), ("S", "ptb"), ("I", "incart"))
# The institution behind each source group (a group not listed is its own): leave-one-source-out evaluation trains
# on no record of the held-out group's institution, so that the same hospital (the same recordings, even: the
# Challenge's PTB-XL records are PTB-XL's, and CPSC-extra is the rest of CPSC 2018) never sits on both sides.
INSTITUTIONS = {"ptb-xl": "ptb", "challenge/ptb-xl": "ptb", "challenge/ptb": "ptb", "challenge/cpsc2018": "cpsc",
                "challenge/cpsc-extra": "cpsc", "challenge/georgia": "georgia", "challenge/chapman-ningbo": "chapman",
                "challenge/incart": "incart"}


def source_group(source: str | None, record_id: str | None = None, source_rate: float | None = None,
                 rate: float | None = None) -> str:
    """The source group of one record: its `source` column, the database of a Challenge record (by the prefix of its
    record id, e.g. `challenge/georgia` for `E00001`), and `@<rate>Hz` when the source file's sampling rate
    (`source_sampling_rate`) differs from the stored one (`ptb-xl@100Hz`: PTB-XL's 100 Hz files, resampled)."""
    group = str(source or "unknown")
    if group == "challenge" and record_id:
        group = next((f"challenge/{name}" for prefix, name in CHALLENGE_DATABASES
                      if str(record_id).startswith(prefix)), "challenge/other")
    if source_rate is not None and rate is not None and not np.isnan(float(source_rate)) \
            and abs(float(source_rate) - float(rate)) > 1e-6:
        group += f"@{float(source_rate):g}Hz"
    return group


def institution(group: str) -> str:
    """The institution of a source group (`INSTITUTIONS`; at any sampling rate)."""
    base = group.split("@", 1)[0]
    return INSTITUTIONS.get(base, base)


def source_groups(dataset: datasets.Dataset) -> np.ndarray:
    """`source_group` of every row of a dataset in the EnECG schema, in row order."""
    n = len(dataset)
    column = lambda name: _column(dataset, name) if name in dataset.column_names else [None] * n  # noqa: E731
    return np.array([source_group(*values) for values in zip(column("source"), column("record_id"),
                                                              column("source_sampling_rate"), column("sampling_rate"))])


def leave_one_source_out(groups, min_records: int = 1) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Leave-one-source-out folds: for every source group (sorted by name) with at least `min_records` rows, the
    rows of that group as the test side and the rows of every other institution (`institution`) as the training side.

    Args:
        groups: the source group of every row (`source_groups`).

    Returns:
        `(group, train_indices, test_indices)` triples of sorted int64 row indices; a group whose institution has
        every row (nothing to train on) is left out.
    """
    groups = np.asarray(groups, dtype=str)
    sites = np.array([institution(g) for g in groups])
    rows = np.arange(len(groups))
    folds = []
    for group in sorted(set(groups.tolist())):
        test = rows[groups == group]
        train = rows[sites != institution(group)]
        if len(test) >= min_records and len(train):
            folds.append((group, train, test))
    return folds
