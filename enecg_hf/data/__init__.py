"""ECG datasets for EnECG: every source in one schema, built with `datasets`.

    from enecg_hf.data import build_dataset, subject_kfold
    dataset = build_dataset("ludb", "path/to/ludb")                 # or "simulated" with no input
    folds = subject_kfold(dataset, k=5, seed=0)                     # [(train_indices, test_indices), ...]

From the shell: `python -m enecg_hf.data --format ludb --input path/to/ludb --output data/ludb`. See docs/data.md.
"""

from .builder import FORMATS, DatasetBuild, DatasetBuildError, build, build_dataset
from .labels import (
    ARRHYTHMIA_CLASSES,
    LABEL_COLUMNS,
    POTASSIUM_LABELS,
    SCP_RHYTHMS,
    SEX_LABELS,
    SNOMED_RHYTHMS,
    TEXT_RHYTHMS,
)
from .report import BuildReport
from .schema import ecg_features
from .source import LayoutError
from .splits import column_folds, institution, leave_one_source_out, source_group, source_groups, subject_kfold
from .tasks import TASKS, TaskError, TaskSpec, is_missing


__all__ = [
    "TASKS",
    "TaskSpec",
    "TaskError",
    "is_missing",
    "ARRHYTHMIA_CLASSES",
    "SEX_LABELS",
    "POTASSIUM_LABELS",
    "LABEL_COLUMNS",
    "SNOMED_RHYTHMS",
    "SCP_RHYTHMS",
    "TEXT_RHYTHMS",
    "FORMATS",
    "build_dataset",
    "build",
    "DatasetBuild",
    "DatasetBuildError",
    "BuildReport",
    "LayoutError",
    "ecg_features",
    "subject_kfold",
    "column_folds",
    "source_group",
    "source_groups",
    "institution",
    "leave_one_source_out",
]
