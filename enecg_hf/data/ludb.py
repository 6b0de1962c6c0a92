"""LUDB (Lobachevsky University Electrocardiography Database): `data/<n>.hea` + `.dat`, header comments, `ludb.csv`.

Labels: `age` and `sex` from the header comments `<age>: 51`, `<sex>: F` (`ludb.csv` fills gaps); `arrhythmia` from the
`Rhythm:` line; `diagnoses` are the diagnosis comment lines; `rr_interval` is the mean interval between successive
QRS peaks (`N`) of the cardiologists' lead-II annotation (`<n>.ii`), in ms. The first and last second of each record
are not annotated, so this mean covers the annotated beats only. A missing or corrupted annotation leaves
`rr_interval` empty and the record in, with the reason in the build report's `label_notes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io_enecg import parse_header_comments, read_record
from ..preprocessing_enecg import ECGInputError
from .labels import arrhythmia_from_text, parse_age, parse_sex
from .source import BuildOptions, LayoutError, SourceRecord, find_file


SOURCE = "ludb"
EXTRA_FEATURES: dict = {}


def _data_folder(input_path: Path) -> Path:
    for folder in (input_path / "data", input_path):
        if folder.is_dir() and any(folder.glob("*.hea")):
            return folder
    raise LayoutError(f"{input_path} is not a LUDB folder: no `data/*.hea` or `*.hea` records")


def _record_sort_key(path: Path):
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def list_records(input_path: Path, options: BuildOptions) -> pd.DataFrame:
    folder = _data_folder(input_path)
    headers = sorted(folder.glob("*.hea"), key=_record_sort_key)
    rows = [{"record_id": path.stem, "subject_id": path.stem, "path": str(path.with_suffix(""))} for path in headers]
    table = pd.DataFrame(rows, columns=["record_id", "subject_id", "path"])
    csv_path = find_file(input_path, "ludb.csv")
    if csv_path is not None:
        # ludb.csv has multi-line cells ("F\n"); it only fills age/sex a header lacks.
        extra = pd.read_csv(csv_path, dtype=str)[["ID", "Sex", "Age"]]
        extra = extra.rename(columns={"ID": "record_id", "Sex": "csv_sex", "Age": "csv_age"})
        extra["record_id"] = extra["record_id"].str.strip()
        table = table.merge(extra, on="record_id", how="left")
    return table


RR_RANGE_MS = (200.0, 3000.0)  # 300 to 20 beats per minute


def mean_rr_from_annotations(record_path: str | Path, extension: str = "ii", num_samples: int | None = None) -> float:
    """Mean interval (ms) between successive `N` (QRS peak) annotations of `record_path.<extension>`.

    Args:
        num_samples: length of the record: annotations beyond it mean a corrupted file.

    Raises:
        ECGInputError: `missing_annotation` (no such file), `unreadable_annotation` (wfdb cannot decode it, or it
            decodes to positions outside the record), `too_few_beats` (fewer than two QRS peaks) or `implausible_rr`
            (a mean outside 200-3000 ms).
    """
    import wfdb

    path = Path(f"{record_path}.{extension}")
    if not path.is_file():
        raise ECGInputError("missing_annotation", f"no annotation file {path}")
    try:
        annotation = wfdb.rdann(str(record_path), extension)
    except Exception as error:  # corrupted files raise IndexError, ValueError, struct errors...
        raise ECGInputError("unreadable_annotation", f"{path}: {type(error).__name__}: {error}") from error
    samples = np.asarray(annotation.sample)
    if num_samples is not None and len(samples) and (samples.min() < 0 or samples.max() >= num_samples):
        raise ECGInputError("unreadable_annotation", f"{path} marks samples {samples.min()}..{samples.max()}, outside "
                            f"the {num_samples}-sample record (a corrupted file?)")
    peaks = samples[np.asarray(annotation.symbol) == "N"]
    if len(peaks) < 2 or not annotation.fs:
        raise ECGInputError("too_few_beats", f"{path} marks {len(peaks)} QRS peak(s); the mean RR needs two")
    rr_interval = float(np.diff(peaks).mean() / annotation.fs * 1000.0)
    if not RR_RANGE_MS[0] <= rr_interval <= RR_RANGE_MS[1]:
        raise ECGInputError("implausible_rr", f"{path} gives a mean RR of {rr_interval:.0f} ms, outside "
                            f"{RR_RANGE_MS[0]:g}-{RR_RANGE_MS[1]:g} ms")
    return rr_interval


# LUDB's wave marks: `(` onset, then the wave's peak (`p` P, `N` QRS, `t` T), then `)` offset.
WAVE_SYMBOLS = {"p": "p", "N": "qrs", "t": "t"}
# Where a wave's peak lies from the R peak of its own beat (seconds): P before it, QRS at it, T after it.
WAVE_REACH_S = {"p": (-0.45, 0.0), "qrs": (-0.1, 0.1), "t": (0.0, 0.75)}


def wave_boundaries(record_path: str | Path, extension: str, r_peaks: np.ndarray, sampling_rate: float
                    ) -> dict[str, float]:
    """The median over the annotated beats of each wave boundary of one lead (`record_path.<extension>`, e.g. `v1`),
    in seconds from the beat's R peak among `r_peaks` (samples, e.g. a detector's): `p_on`, `p_off`, `qrs_on`,
    `qrs_off`, `t_on`, `t_off` (NaN where no wave of that kind was annotated with both ends near an R peak).

    A wave belongs to the R peak that its peak lies in reach of (`WAVE_REACH_S`): the next R peak for a P wave, the
    nearest for a QRS, the previous for a T wave. Measured from the same R peaks as a median beat, the difference
    between the two is that of the boundaries alone, not of R-peak placement."""
    import wfdb

    annotation = wfdb.rdann(str(record_path), extension)
    symbols, samples = annotation.symbol, np.asarray(annotation.sample)
    r_peaks = np.asarray(r_peaks)
    found: dict[str, list[float]] = {f"{w}_{end}": [] for w in WAVE_REACH_S for end in ("on", "off")}
    for k in range(1, len(symbols) - 1):
        wave = WAVE_SYMBOLS.get(symbols[k])
        if wave is None or symbols[k - 1] != "(" or symbols[k + 1] != ")" or not len(r_peaks):
            continue
        offsets = (samples[k] - r_peaks) / sampling_rate  # the wave's peak from every R peak
        low, high = WAVE_REACH_S[wave]
        near = np.flatnonzero((offsets >= low) & (offsets <= high))
        if not len(near):
            continue
        r = r_peaks[near[np.argmin(np.abs(offsets[near]))]]
        found[f"{wave}_on"].append((samples[k - 1] - r) / sampling_rate)
        found[f"{wave}_off"].append((samples[k + 1] - r) / sampling_rate)
    return {name: float(np.median(values)) if values else float("nan") for name, values in found.items()}


def _header_or_csv(parse, header_value, csv_value, notes: list) -> Any:
    """The label from the header comment, else from `ludb.csv`; the notes of an unusable value are kept only when
    neither gives the label."""
    found = []
    value = parse(header_value, notes=found)
    if value is None:
        value = parse(csv_value, notes=found)
    if value is None:
        notes.extend(found)
    return value


def load_record(row: dict[str, Any], options: BuildOptions) -> SourceRecord:
    recording = read_record(row["path"], limits=options.record_limits)
    fields = parse_header_comments(recording.comments)
    rhythm = fields.get("rhythm")
    diagnoses = []
    after_marker = False
    for line in recording.comments:
        if line.strip().lower().startswith("<diagnoses>"):
            after_marker = True
            continue
        if after_marker and line.strip():
            diagnoses.append(line.strip().rstrip(".").strip())
    notes = []
    age = _header_or_csv(parse_age, fields.get("age"), row.get("csv_age"), notes)
    sex = _header_or_csv(parse_sex, fields.get("sex"), row.get("csv_sex"), notes)
    try:
        rr_interval = mean_rr_from_annotations(row["path"], num_samples=recording.signal.shape[1])
    except ECGInputError as error:  # the signal is still good: keep it, without this label, and say why
        rr_interval = None
        notes.append({"label": "rr_interval", "reason": error.reason, "detail": error.detail})
    labels = {
        "rr_interval": rr_interval,
        "age": age,
        "sex": sex,
        "arrhythmia": arrhythmia_from_text([rhythm]) if rhythm else None,
        "diagnoses": diagnoses,
    }
    return SourceRecord(recording, labels, notes)
