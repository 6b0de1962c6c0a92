"""The `datasets.Features` every source is stored with."""

from __future__ import annotations

import datasets

from ..preprocessing_enecg import STANDARD_LEAD_NAMES
from .labels import ARRHYTHMIA_CLASSES, POTASSIUM_LABELS, SEX_LABELS


def ecg_features(num_samples: int, extra: dict | None = None) -> datasets.Features:
    """Columns of an EnECG dataset.

    Args:
        num_samples: samples per lead (sampling rate x seconds).
        extra: features of the source's extra columns (e.g. PTB-XL's `strat_fold`).

    Returns:
        `record_id`, `subject_id`, `source`, `signal` ((12, num_samples) float32, mV, `STANDARD_LEAD_NAMES` order),
        `sampling_rate` (of `signal`), `source_sampling_rate` (of the source file, before resampling), the labels
        `rr_interval`, `age`, `sex`, `potassium_flag`, `arrhythmia`, `diagnoses`, the quality flags `missing_leads`
        (zero-filled leads), `flat_leads` and `original_seconds`, then `extra`.
        The class labels are `datasets.ClassLabel`s (rows hold class indices; `features["arrhythmia"].int2str(i)`
        names them), so `train_test_split(stratify_by_column=...)` and the Hub's dataset viewer know the classes.
    """
    strings = datasets.List(datasets.Value("string"))
    return datasets.Features(
        {
            "record_id": datasets.Value("string"),
            "subject_id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "signal": datasets.Array2D(shape=(len(STANDARD_LEAD_NAMES), num_samples), dtype="float32"),
            "sampling_rate": datasets.Value("int32"),
            "source_sampling_rate": datasets.Value("float32"),
            "rr_interval": datasets.Value("float32"),
            "age": datasets.Value("float32"),
            "sex": datasets.ClassLabel(names=list(SEX_LABELS)),
            "potassium_flag": datasets.ClassLabel(names=list(POTASSIUM_LABELS)),
            "arrhythmia": datasets.ClassLabel(names=list(ARRHYTHMIA_CLASSES)),
            "diagnoses": strings,
            "missing_leads": strings,
            "flat_leads": strings,
            "original_seconds": datasets.Value("float32"),
            **(extra or {}),
        }
    )
