"""PTB-XL: `ptbxl_database.csv` + `records500/` (500 Hz) and `records100/` (100 Hz) WFDB records.

Labels: `age` (300, PTB-XL's code for "over 89", becomes 90), `sex` (PTB-XL stores 0 = male, 1 = female; converted to
our 0 = female, 1 = male), `diagnoses` = the SCP-ECG statement codes of `scp_codes`, `arrhythmia` from its rhythm
statements (`labels.SCP_RHYTHMS`, extended by the `rhythm` column of `scp_statements.csv` when present).
`strat_fold` (1-10, the official stratified folds; folds 9 and 10 are the recommended validation and test folds)
is kept as an extra column: `splits.column_folds(dataset, "strat_fold")` gives the official folds.

Records: `filename_hr` (`records500/`, 500 Hz) or `filename_lr` (`records100/`, 100 Hz), chosen per record by
`BuildOptions.ptbxl_rate`: `"auto"` reads the 500 Hz file when it exists and the 100 Hz one otherwise (the other way
round for builds at 100 Hz or less), so a download of `records100/` alone is read too; `"500"` or `"100"` reads only
that rate (a record without the file is skipped as `missing_file`). The builder resamples to the stored rate and
keeps the file's rate in `source_sampling_rate`. `subject_id` is `patient_id` as an integer string, so the same
patient in two PTB-XL folders is one subject.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from ..io_enecg import read_record
from ..preprocessing_enecg import ECGInputError
from .labels import SCP_RHYTHMS, arrhythmia_from_scp, parse_age, parse_sex
from .source import BuildOptions, LayoutError, SourceRecord, find_file


SOURCE = "ptb-xl"
EXTRA_FEATURES = {"strat_fold": datasets.Value("int8")}
OVER_89_AGE = 300  # PTB-XL's age of every patient older than 89 (stored as 90)
RATES = ("auto", "500", "100")  # values of `BuildOptions.ptbxl_rate`


def _rhythm_statements(input_path: Path) -> dict[str, str]:
    """Rhythm statements listed in `scp_statements.csv` (those not in `SCP_RHYTHMS` count as `other`)."""
    path = find_file(input_path, "scp_statements.csv")
    if path is None:
        return {}
    table = pd.read_csv(path, index_col=0)
    if "rhythm" not in table.columns:
        return {}
    codes = table.index[table["rhythm"].fillna(0).astype(float) == 1.0]
    return {str(code): SCP_RHYTHMS.get(str(code), "other") for code in codes}


def list_records(input_path: Path, options: BuildOptions) -> pd.DataFrame:
    database = find_file(input_path, "ptbxl_database.csv")
    if database is None:
        raise LayoutError(f"{input_path} is not a PTB-XL folder: no `ptbxl_database.csv`")
    table = pd.read_csv(database, dtype={"ecg_id": str})
    missing = {"ecg_id", "patient_id", "age", "sex", "scp_codes", "filename_hr", "filename_lr"} - set(table.columns)
    if missing:
        raise LayoutError(f"{database} lacks the PTB-XL columns {sorted(missing)}")
    base = database.parent
    rhythms = _rhythm_statements(base)
    subject = pd.to_numeric(table["patient_id"], errors="coerce")
    return pd.DataFrame(
        {
            "record_id": table["ecg_id"].astype(str),
            "subject_id": subject.map(lambda value: None if pd.isna(value) else str(int(value))),
            "path_hr": [str(base / name) for name in table["filename_hr"].astype(str)],
            "path_lr": [str(base / name) for name in table["filename_lr"].astype(str)],
            "age": table["age"],
            "sex": table["sex"],
            "scp_codes": table["scp_codes"],
            "strat_fold": table["strat_fold"] if "strat_fold" in table.columns else None,
            "rhythm_statements": [rhythms] * len(table),
        }
    )


def record_path(row: dict[str, Any], options: BuildOptions) -> str:
    """The WFDB record to read (base path, no extension): see the module docstring for the choice."""
    if options.ptbxl_rate != "auto":
        return row["path_hr"] if options.ptbxl_rate == "500" else row["path_lr"]
    order = (row["path_lr"], row["path_hr"]) if options.sampling_rate <= 100 else (row["path_hr"], row["path_lr"])
    for path in order:
        if Path(path + ".hea").is_file():
            return path
    raise ECGInputError("missing_file", f"neither {order[0]}.hea nor {order[1]}.hea exists")


def load_record(row: dict[str, Any], options: BuildOptions) -> SourceRecord:
    recording = read_record(record_path(row, options), limits=options.record_limits)
    try:
        scp_codes = ast.literal_eval(row["scp_codes"]) if isinstance(row["scp_codes"], str) else {}
    except (ValueError, SyntaxError):
        scp_codes = {}
    codes = list(scp_codes)
    fold = row.get("strat_fold")
    notes = []
    labels = {
        "age": parse_age(row.get("age"), notes, over_89_code=OVER_89_AGE),
        "sex": parse_sex(row.get("sex"), numeric=("male", "female"), notes=notes),
        "arrhythmia": arrhythmia_from_scp(codes, row.get("rhythm_statements")),
        "diagnoses": codes,
        "strat_fold": None if fold is None or pd.isna(fold) else int(fold),
    }
    return SourceRecord(recording, labels, notes)
