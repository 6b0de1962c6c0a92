"""The research code's JSONL format: one JSON object per line.

Keys: `ecg_path` (a WFDB record, `.npy` or `.csv`; relative paths are relative to the JSONL file), `subject_id`, and
the labels `rr_interval` (ms), `age`, `gender` (`"M"`/`"F"`/`"male"`/`"female"`, or 0 = female, 1 = male), `flag`
(potassium: 0/1 or `"normal"`/`"abnormal"`) and `report_label` (an `ARRHYTHMIA_CLASSES` name or index, or a rhythm
statement). Optional: `record_id` (defaults to the line number), `sampling_rate` for arrays (defaults to the build's
rate) and `lead_names` for arrays (defaults to the CSV header or the standard order).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..io_enecg import read_record
from ..preprocessing_enecg import ECGInputError
from .labels import (
    ARRHYTHMIA_CLASSES,
    arrhythmia_from_text,
    is_missing,
    parse_age,
    parse_float,
    parse_potassium_flag,
    parse_sex,
)
from .source import BuildOptions, LayoutError, SourceRecord


SOURCE = "jsonl"
EXTRA_FEATURES: dict = {}


def list_records(input_path: Path, options: BuildOptions) -> pd.DataFrame:
    if input_path.is_dir():
        files = sorted(input_path.glob("*.jsonl"))
        if len(files) != 1:
            raise LayoutError(f"{input_path} holds {len(files)} `.jsonl` files; pass the file itself")
        input_path = files[0]
    if not input_path.is_file():
        raise LayoutError(f"no JSONL file {input_path}")
    rows = []
    with open(input_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = {"record_id": f"line{number}", "line": line, "base": str(input_path.parent)}
            try:
                item = json.loads(line)
                row["record_id"] = str(item.get("record_id", row["record_id"]))
                row["subject_id"] = None if is_missing(item.get("subject_id")) else str(item["subject_id"])
            except (json.JSONDecodeError, AttributeError):
                row["subject_id"] = None  # load_record reports the bad line as a skip
            rows.append(row)
    if not rows:
        raise LayoutError(f"{input_path} has no records")
    return pd.DataFrame(rows)


def _arrhythmia(value: Any) -> str | None:
    if is_missing(value):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        index = int(value)
        return ARRHYTHMIA_CLASSES[index] if 0 <= index < len(ARRHYTHMIA_CLASSES) else None
    return arrhythmia_from_text([str(value)])


def load_record(row: dict[str, Any], options: BuildOptions) -> SourceRecord:
    try:
        item = json.loads(row["line"])
    except json.JSONDecodeError as error:
        raise ECGInputError("bad_jsonl_line", f"{row['record_id']}: {error}") from error
    if not isinstance(item, dict) or is_missing(item.get("ecg_path")):
        raise ECGInputError("bad_jsonl_line", f"{row['record_id']}: no `ecg_path`")
    path = Path(item["ecg_path"])
    if not path.is_absolute():
        path = Path(row["base"]) / path
    recording = read_record(path, item.get("sampling_rate", options.sampling_rate), item.get("lead_names"),
                            limits=options.record_limits)
    notes = []
    labels = {
        "rr_interval": parse_float(item.get("rr_interval"), label="rr_interval", notes=notes),
        "age": parse_age(item.get("age"), notes),
        "sex": parse_sex(item.get("gender", item.get("sex")), notes=notes),
        "potassium_flag": parse_potassium_flag(item.get("flag", item.get("potassium_flag")), notes),
        "arrhythmia": _arrhythmia(item.get("report_label")),
        "diagnoses": [str(item["report_label"])] if not is_missing(item.get("report_label")) else [],
    }
    return SourceRecord(recording, labels, notes)
