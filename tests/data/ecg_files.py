"""Helpers of the data tests: the shared real recordings, and small records written with `wfdb.wrsamp`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


SHARED_DATA = Path(os.environ.get("ENECG_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
STANDARD = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


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
    """Write a WFDB record whose leads carry `lead_pattern` (matched through any spelling); returns its base path."""
    import wfdb

    from enecg_hf.preprocessing_enecg import normalize_lead_name

    folder.mkdir(parents=True, exist_ok=True)
    if signal is None:
        signal = np.stack([lead_pattern(normalize_lead_name(lead), fs, seconds) for lead in lead_names], axis=1)
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


def assert_standard_order(signal: np.ndarray, fs: float) -> None:
    """Each row of a stored (12, n) signal is the `lead_pattern` of its standard lead (edges aside: resampling)."""
    for row, lead in enumerate(STANDARD):
        expected = lead_pattern(lead, fs, signal.shape[1] / fs)
        np.testing.assert_allclose(signal[row, 10:-10], expected[10:-10], atol=0.01, err_msg=f"row {row} is not {lead}")
