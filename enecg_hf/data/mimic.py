"""MIMIC-IV-ECG: `record_list.csv` + `files/p<xxxx>/p<subject>/s<study>/<study>.hea|.dat`, `machine_measurements.csv`.

Labels: `rr_interval` from `machine_measurements.csv` (the placeholder 29999 and values outside the task's
`valid_range`, 100-10000 ms, are missing); `diagnoses` are the machine report lines `report_0` ... `report_17`, and
`arrhythmia` comes from them (`labels.TEXT_RHYTHMS`). Age, sex and potassium are not in MIMIC-IV-ECG (they live in the
credentialed MIMIC-IV hosp tables): pass `labels_csv`, a CSV with `subject_id`, optionally `study_id` (joined on both
when present), and any of `age`/`anchor_age`, `sex`/`gender`, `potassium_flag`/`flag`. `record_id` is the study id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..io_enecg import read_record
from .labels import arrhythmia_from_text, is_missing, parse_age, parse_float, parse_potassium_flag, parse_sex
from .source import BuildOptions, LayoutError, SourceRecord, find_file


SOURCE = "mimic-iv-ecg"
EXTRA_FEATURES: dict = {}
REPORT_COLUMNS = tuple(f"report_{index}" for index in range(18))
# The machine's rr_interval for "not measured" (missing, without a note); other values outside the task's valid_range
# are missing with an `out_of_range` note.
RR_PLACEHOLDERS_MS = (29999.0,)


def _read_labels_csv(path: str) -> pd.DataFrame:
    table = pd.read_csv(path)
    if "subject_id" not in table.columns:
        raise LayoutError(f"labels CSV {path} needs a `subject_id` column (and optionally `study_id`)")
    renames = {"anchor_age": "age", "gender": "sex", "flag": "potassium_flag"}
    table = table.rename(columns={old: new for old, new in renames.items() if old in table and new not in table})
    keys = [key for key in ("subject_id", "study_id") if key in table.columns]
    keep = keys + [column for column in ("age", "sex", "potassium_flag") if column in table.columns]
    table = table[keep].drop_duplicates(subset=keys, keep="last")
    return table.rename(columns={column: f"user_{column}" for column in keep if column not in keys})


def list_records(input_path: Path, options: BuildOptions) -> pd.DataFrame:
    record_list = find_file(input_path, "record_list.csv")
    if record_list is None:
        raise LayoutError(f"{input_path} is not a MIMIC-IV-ECG folder: no `record_list.csv`")
    base = record_list.parent
    table = pd.read_csv(record_list, usecols=lambda name: name in ("subject_id", "study_id", "path"))
    if not {"subject_id", "study_id", "path"} <= set(table.columns):
        raise LayoutError(f"{record_list} needs the columns subject_id, study_id and path")
    measurements = find_file(base, "machine_measurements.csv")
    if measurements is not None:
        wanted = {"study_id", "rr_interval", *REPORT_COLUMNS}
        extra = pd.read_csv(measurements, usecols=lambda name: name in wanted, dtype={c: str for c in REPORT_COLUMNS})
        table = table.merge(extra.drop_duplicates("study_id"), on="study_id", how="left")
    if options.labels_csv:
        user = _read_labels_csv(options.labels_csv)
        keys = [key for key in ("subject_id", "study_id") if key in user.columns]
        table = table.merge(user, on=keys, how="left")
    table["record_id"] = table["study_id"].astype(str)
    table["subject_id"] = table["subject_id"].astype(str)
    table["path"] = [str(base / name) for name in table["path"].astype(str)]
    return table


def load_record(row: dict[str, Any], options: BuildOptions) -> SourceRecord:
    recording = read_record(row["path"], limits=options.record_limits)
    reports = [str(row[column]).strip() for column in REPORT_COLUMNS if not is_missing(row.get(column))]
    notes = []
    labels = {
        "rr_interval": parse_float(row.get("rr_interval"), RR_PLACEHOLDERS_MS, "rr_interval", notes),
        "age": parse_age(row.get("user_age"), notes),
        "sex": parse_sex(row.get("user_sex"), notes=notes),
        "potassium_flag": parse_potassium_flag(row.get("user_potassium_flag"), notes),
        "arrhythmia": arrhythmia_from_text(reports),
        "diagnoses": reports,
    }
    return SourceRecord(recording, labels, notes)
