"""PhysioNet/CinC Challenge 2020/2021: `<name>.hea` + `<name>.mat` pairs anywhere under the input folder.

Labels come from the header comments `Age:`, `Sex:` and `Dx:` (comma-separated SNOMED-CT codes, kept in `diagnoses`;
`arrhythmia` via `labels.SNOMED_RHYTHMS`). The original Georgia headers, whose first line names `E00001.mat`, are read
as they are (see `io_enecg.fix_header_text`). The Challenge gives no subject ids: `subject_id` is the record name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..io_enecg import parse_header_comments, read_record
from .labels import arrhythmia_from_snomed, parse_age, parse_sex
from .source import BuildOptions, LayoutError, SourceRecord


SOURCE = "challenge"
EXTRA_FEATURES: dict = {}


def list_records(input_path: Path, options: BuildOptions) -> pd.DataFrame:
    if input_path.is_file() and input_path.suffix == ".hea":
        headers = [input_path]
    else:
        headers = sorted(input_path.rglob("*.hea"))
    if not headers:
        raise LayoutError(f"{input_path} is not a PhysioNet Challenge folder: no `.hea` header files under it")
    rows = [{"record_id": path.stem, "subject_id": path.stem, "path": str(path)} for path in headers]
    return pd.DataFrame(rows, columns=["record_id", "subject_id", "path"])


def load_record(row: dict[str, Any], options: BuildOptions) -> SourceRecord:
    recording = read_record(row["path"], limits=options.record_limits)
    fields = parse_header_comments(recording.comments)
    codes = [code.strip() for code in fields.get("dx", "").split(",") if code.strip()]
    notes = []
    labels = {
        "age": parse_age(fields.get("age"), notes),
        "sex": parse_sex(fields.get("sex"), notes=notes),
        "arrhythmia": arrhythmia_from_snomed(codes),
        "diagnoses": codes,
    }
    return SourceRecord(recording, labels, notes)
