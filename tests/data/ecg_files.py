"""Helpers of the data tests: the shared real recordings, and small records (and PTB-XL folders) written with
`wfdb.wrsamp`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from enecg_hf.preprocessing_enecg import STANDARD_LEAD_NAMES


SHARED_DATA = Path(os.environ.get("ENECG_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
STANDARD = STANDARD_LEAD_NAMES


def rhythm(dataset, value) -> str | None:
    """The arrhythmia class a row holds (a `ClassLabel` index, null when the record names no rhythm)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return dataset.features["arrhythmia"].int2str(int(value))


def shared_folder(name: str) -> Path:
    """A folder of the real recordings in ../shared/data, or skip the test."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real ECG data not found at {folder.resolve()} (see shared/data/README.md)")
    return folder


def lead_pattern(lead: str, fs: float, seconds: float = 10.0) -> np.ndarray:
    """A signal that says which standard lead it is: a 1 Hz sine whose amplitude is 0.1 mV x (lead index + 1)."""
    time = np.arange(int(round(fs * seconds))) / fs
    return (0.1 * (STANDARD.index(lead) + 1) * np.sin(2 * np.pi * time)).astype(np.float64)


def write_record(
    folder: Path,
    name: str,
    lead_names=STANDARD,
    fs: float = 500,
    seconds: float = 10.0,
    fmt: str = "16",
    comments=None,
    signal: np.ndarray | None = None,
) -> Path:
    """Write a WFDB record whose leads carry `lead_pattern` (matched through any spelling); returns its base path.

    The first lead also gets a 2 uV blip at a sample that depends on `name`: records of different names never store
    identical signals (the builder keeps one copy of identical signals)."""
    import zlib

    import wfdb

    from enecg_hf.preprocessing_enecg import normalize_lead_name

    folder.mkdir(parents=True, exist_ok=True)
    if signal is None:
        signal = np.stack([lead_pattern(normalize_lead_name(lead), fs, seconds) for lead in lead_names], axis=1)
        samples = signal.shape[0]
        signal[samples // 4 + zlib.crc32(name.encode()) % (samples // 2), 0] += 0.002
    wfdb.wrsamp(
        name,
        fs=fs,
        units=["mV"] * len(lead_names),
        sig_name=list(lead_names),
        p_signal=signal,
        fmt=[fmt] * len(lead_names),
        adc_gain=[1000.0] * len(lead_names),
        baseline=[0] * len(lead_names),
        comments=comments or [],
        write_dir=str(folder),
    )
    return folder / name


PTBXL_LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
PTBXL_RECORDS = [
    (1, 15709.0, 56, 1, "{'NORM': 100.0, 'LVOLT': 0.0, 'SR': 0.0}", 3),
    (2, 13243.0, 300, 0, "{'NORM': 80.0, 'SBRAD': 0.0}", 2),
    (3, 13243.0, 300, 0, "{'AFLT': 100.0, 'LAFB': 100.0}", 2),
    (4, 17014.0, 37, 1, "{'IMI': 35.0, 'SARRH': 0.0}", 10),
    (5, 17448.0, None, 1, "{'NDT': 100.0}", 9),
]


def write_ptbxl_tree(root: Path, records=PTBXL_RECORDS, rates=lambda ecg_id: (500, 100)) -> Path:
    """A PTB-XL folder as PhysioNet lays it out: `ptbxl_database.csv` naming both files of every record, and
    `records500/` and/or `records100/` files as `rates(ecg_id)` says (e.g. only 100 Hz, as many users download)."""
    rows = []
    for ecg_id, patient, age, sex, scp, fold in records:
        hr = f"records500/{ecg_id // 1000 * 1000:05d}/{ecg_id:05d}_hr"
        lr = f"records100/{ecg_id // 1000 * 1000:05d}/{ecg_id:05d}_lr"
        for rate, name in ((500, hr), (100, lr)):
            if rate in rates(ecg_id):
                folder, stem = name.rsplit("/", 1)
                write_record(root / folder, stem, lead_names=PTBXL_LEADS, fs=rate)
        rows.append({"ecg_id": ecg_id, "patient_id": patient, "age": age, "sex": sex, "height": None, "weight": 70,
                     "scp_codes": scp, "strat_fold": fold, "filename_lr": lr, "filename_hr": hr})
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "ptbxl_database.csv", index=False)
    statements = pd.DataFrame(
        {"description": ["normal ECG", "sinus rhythm", "sinus bradycardia", "atrial flutter", "sinus arrhythmia", "x"],
         "diagnostic": [1, None, None, None, None, 1], "rhythm": [None, 1, 1, 1, 1, None]},
        index=["NORM", "SR", "SBRAD", "AFLT", "SARRH", "IMI"],
    )
    statements.to_csv(root / "scp_statements.csv")
    return root


def assert_standard_order(signal: np.ndarray, fs: float) -> None:
    """Each row of a stored (12, n) signal is the `lead_pattern` of its standard lead (edges aside: resampling)."""
    for row, lead in enumerate(STANDARD):
        expected = lead_pattern(lead, fs, signal.shape[1] / fs)
        np.testing.assert_allclose(signal[row, 10:-10], expected[10:-10], atol=0.01, err_msg=f"row {row} is not {lead}")


# ------------------------------------------------------------------------------------------------ hostile files
def write_mat_zeros(path: Path, rows: int, columns: int, declared: tuple[int, int] | None = None) -> Path:
    """A MATLAB v5 file with one zlib-compressed int16 `val` matrix of zeros, written in chunks (the zeros are never
    held in memory): `rows` x `columns` of data, inside a matrix that declares the shape `declared` (default: the
    true one). A million zeros compress to about 1 kB."""
    import struct
    import zlib

    declared_rows, declared_columns = declared or (rows, columns)
    data_bytes = rows * columns * 2
    padding = -data_bytes % 8
    body = struct.pack("<II", 6, 8) + struct.pack("<II", 10, 0)  # array flags: mxINT16_CLASS
    body += struct.pack("<II", 5, 8) + struct.pack("<ii", declared_rows, declared_columns)  # dimensions
    body += struct.pack("<I", (3 << 16) | 1) + b"val\x00"  # the name, as a small data element
    matrix = struct.pack("<II", 14, len(body) + 8 + data_bytes + padding) + body + struct.pack("<II", 3, data_bytes)
    compressor = zlib.compressobj(6)
    parts = [compressor.compress(matrix)]
    chunk = bytes(1 << 20)
    for start in range(0, data_bytes, len(chunk)):
        parts.append(compressor.compress(chunk[: min(len(chunk), data_bytes - start)]))
    parts += [compressor.compress(bytes(padding)), compressor.flush()]
    payload = b"".join(parts)
    header = b"MATLAB 5.0 MAT-file, written by the EnECG tests".ljust(116, b" ") + bytes(8) + b"\x00\x01IM"
    path.write_bytes(header + struct.pack("<II", 15, len(payload)) + payload)
    return path


def write_header(path: Path, n_sig: int = 12, fs: str = "500", sig_len: int = 5000, file_name: str | None = None,
                 fmt: str = "16", gain: str = "1000") -> Path:
    """A WFDB header for `n_sig` standard leads stored in `file_name` (default: `<stem>.dat`)."""
    file_name = file_name or f"{path.stem}.dat"
    lines = [f"{path.stem} {n_sig} {fs} {sig_len}"]
    lines += [f"{file_name} {fmt} {gain}/mV 16 0 0 0 0 {STANDARD[i % 12]}" for i in range(n_sig)]
    path.write_text("\n".join(lines) + "\n")
    return path


def peak_allocation(function, *args, **kwargs) -> tuple[int, object]:
    """(peak bytes allocated through Python and numpy while `function` ran, its result or the exception it raised)."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = function(*args, **kwargs)
    except Exception as error:  # returned for the caller to check
        result = error
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, result
