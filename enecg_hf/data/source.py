"""What every source-format module provides, and the options a build passes to it.

A format module (`ludb`, `challenge`, `ptbxl`, `mimic`, `jsonl`, `simulate`) defines:

- `SOURCE`: the value of the `source` column;
- `EXTRA_FEATURES`: `datasets` features of its extra columns (e.g. PTB-XL's `strat_fold`);
- `list_records(input_path, options) -> pandas.DataFrame`: one row per record with at least `record_id`, cheap to
  build (paths and table metadata; no signal is read). It raises [`LayoutError`] when the folder is not of its format.
- `load_record(row, options) -> SourceRecord`: reads one record; raises `ECGInputError` for an unusable one.

`load_record` runs in the worker processes, so rows and options are plain picklable data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io_enecg import ECGRecording, RecordLimits


class LayoutError(ValueError):
    """The input folder or file is not laid out as the requested format expects."""


@dataclass
class BuildOptions:
    """Settings of one dataset build (see `build_dataset` for their meaning)."""

    sampling_rate: int = 500
    seconds: float = 10.0
    fill_missing_leads: bool = False
    max_gap_seconds: float = 0.1
    min_sampling_rate: float = 100.0
    flat_threshold_mv: float = 0.05
    limit: int | None = None
    seed: int = 0
    labels_csv: str | None = None
    max_record_seconds: float = 3600.0
    ptbxl_rate: str = "auto"

    @property
    def num_samples(self) -> int:
        return int(round(self.sampling_rate * self.seconds))

    @property
    def record_limits(self) -> RecordLimits:
        """Size limits checked from each record's header before its samples are read (as in serving)."""
        return RecordLimits(max_seconds=self.max_record_seconds)


@dataclass
class SourceRecord:
    """One record as a format module reads it: the raw recording and its labels (any of which may be `None`).

    `labels` holds `rr_interval`, `age`, `sex`, `potassium_flag`, `arrhythmia`, `diagnoses` and the format's extra
    columns; missing keys are stored as null. `notes` says why a label the source should have is missing, as
    `{"label", "reason", "detail"}` dicts (the build report lists them).
    """

    recording: ECGRecording
    labels: dict[str, Any] = field(default_factory=dict)
    notes: list[dict[str, str]] = field(default_factory=list)


def find_file(folder: Path, name: str) -> Path | None:
    """`folder/name`, or the only file called `name` one level below (archives often unpack into a subfolder)."""
    direct = folder / name
    if direct.is_file():
        return direct
    nested = sorted(folder.glob(f"*/{name}"))
    return nested[0] if len(nested) == 1 else None
