"""Read one ECG record from disk: WFDB records (`.hea` + `.dat`), PhysioNet Challenge records (`.hea` + `.mat`,
including the original Georgia headers), and plain `.npy` / `.csv` arrays.

[`read_record`] returns a [`ECGRecording`]: the signal as (leads, samples) float32 in millivolts, its sampling rate,
the lead names as the source spells them and the header comments. Lead order, rate and length are left as they
are; [`prepare_signal`] in `preprocessing_enecg` standardises them.

This module is copied flat into Hugging Face model folders as remote code, so it imports only numpy, scipy, wfdb,
the standard library and its sibling modules (relatively).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .preprocessing_enecg import STANDARD_LEADS, ECGInputError


@dataclass
class ECGRecording:
    """One record as read from disk.

    Attributes:
        signal: (leads, samples) float32 array in millivolts, rows in the source's order.
        sampling_rate: samples per second.
        lead_names: name of each row of `signal`, spelled as in the source.
        comments: header comment lines without the leading `#` (WFDB/Challenge), empty for arrays.
    """

    signal: np.ndarray
    sampling_rate: float
    lead_names: list[str]
    comments: list[str] = field(default_factory=list)


def _record_base(path: Path) -> Path:
    """`dir/name` of a WFDB record given as `dir/name`, `dir/name.hea`, `dir/name.dat` or `dir/name.mat`."""
    return path.with_suffix("") if path.suffix.lower() in (".hea", ".dat", ".mat") else path


def fix_header_text(text: str) -> str:
    """Make a Challenge header readable by `wfdb` 4: drop the file extension of the record name on the first line.

    The original Georgia headers of the PhysioNet/CinC Challenge 2020/2021 start `E00001.mat 12 500 5000 ...`, which
    `wfdb` rejects as a record-line syntax error; the record name is `E00001`. Other headers are returned unchanged.
    """
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, _, rest = stripped.partition(" ")
        stem, dot, extension = name.partition(".")
        if dot and extension.lower() in ("mat", "hea", "dat"):
            lines[index] = f"{stem} {rest}\n"
        break
    return "".join(lines)


def _read_header(base: Path):
    """`wfdb.Record` with the header fields of `base.hea`, fixing Challenge record lines in a temporary copy."""
    import wfdb

    header_path = base.with_name(base.name + ".hea")
    if not header_path.is_file():
        raise ECGInputError("missing_file", f"no header file {header_path}")
    text = header_path.read_text(encoding="ascii", errors="ignore")
    fixed = fix_header_text(text)
    try:
        if fixed == text:
            return wfdb.rdheader(str(base))
        # wfdb parses headers only from files: hand it the fixed text under the same record name.
        stem = fixed.split(None, 1)[0] if fixed.strip() else base.name
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, f"{stem}.hea").write_text(fixed, encoding="ascii")
            return wfdb.rdheader(os.path.join(directory, stem))
    except Exception as error:  # wfdb raises HeaderSyntaxError, ValueError, IndexError... on malformed headers
        raise ECGInputError("unreadable_header", f"{header_path}: {error}") from error


def _digital_to_physical(digital: np.ndarray, header) -> np.ndarray:
    """(leads, samples) physical values from ADC counts with the header's per-lead gain and baseline."""
    gain = np.asarray(header.adc_gain, dtype=np.float64)[:, None]
    baseline = np.asarray(header.baseline, dtype=np.float64)[:, None]
    if np.any(gain == 0):
        raise ECGInputError("unreadable_header", f"record {header.record_name} has a zero ADC gain")
    return ((digital - baseline) / gain).astype(np.float32)


def _to_millivolts(signal: np.ndarray, units: Sequence[str] | None) -> np.ndarray:
    """Scale rows recorded in uV or V to mV (units as in the WFDB header, e.g. `mV`, `uV`)."""
    if not units:
        return signal
    scale = {"uv": 1e-3, "µv": 1e-3, "mv": 1.0, "v": 1e3}
    factors = np.array([scale.get(str(unit).strip().lower(), 1.0) for unit in units], dtype=np.float32)
    return signal * factors[:, None] if np.any(factors != 1.0) else signal


def _read_mat_signal(base: Path, header) -> np.ndarray:
    """(leads, samples) digital values of a Challenge `.mat` signal file (MATLAB v4 file with a `val` matrix)."""
    from scipy.io import loadmat

    mat_path = base.parent / header.file_name[0]
    if not mat_path.is_file():
        raise ECGInputError("missing_signal_file", f"no signal file {mat_path}")
    try:
        values = loadmat(str(mat_path))["val"]
    except Exception as error:
        raise ECGInputError("unreadable_signal", f"{mat_path}: {error}") from error
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] != header.n_sig:
        raise ECGInputError(
            "unreadable_signal", f"{mat_path} holds {values.shape[0]} rows, the header lists {header.n_sig} leads"
        )
    if header.sig_len and values.shape[1] < header.sig_len:
        raise ECGInputError(
            "truncated_signal", f"{mat_path} holds {values.shape[1]} samples, the header says {header.sig_len}"
        )
    return values


def _read_wfdb(base: Path) -> ECGRecording:
    """A WFDB record with `.dat` (any WFDB format) or Challenge `.mat` signal files."""
    import wfdb

    header = _read_header(base)
    if not header.n_sig or not header.file_name:
        raise ECGInputError("unreadable_header", f"{base}.hea lists no signals")
    signal_files = [base.parent / name for name in dict.fromkeys(header.file_name)]
    for signal_file in signal_files:
        if not signal_file.is_file():
            raise ECGInputError("missing_signal_file", f"no signal file {signal_file}")
    if header.fs is None or header.fs <= 0:
        raise ECGInputError("bad_sampling_rate", f"{base}.hea gives sampling rate {header.fs!r}")
    if all(name.lower().endswith(".mat") for name in header.file_name):
        signal = _digital_to_physical(_read_mat_signal(base, header), header)
    else:
        expected = _expected_bytes(header)
        actual = sum(path.stat().st_size for path in signal_files)
        if expected is not None and actual < expected:
            raise ECGInputError(
                "truncated_signal", f"{base}: signal files hold {actual} bytes, the header needs {expected}"
            )
        try:
            record = wfdb.rdrecord(str(base), physical=True, return_res=32)
        except Exception as error:
            raise ECGInputError("unreadable_signal", f"{base}: {error}") from error
        signal = np.asarray(record.p_signal, dtype=np.float32).T
        header = record
    signal = _to_millivolts(signal, header.units)
    return ECGRecording(signal, float(header.fs), list(header.sig_name), list(header.comments or []))


# Bytes per sample of the WFDB storage formats (https://wfdb.io/spec/signal-files.html).
_BYTES_PER_SAMPLE = {"8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2, "212": 1.5, "310": 4 / 3, "311": 4 / 3}


def _expected_bytes(header) -> int | None:
    """Total size the header implies for its `.dat` files, or `None` when unknown (e.g. FLAC formats 508-532)."""
    if not header.sig_len or header.fmt is None:
        return None
    total = 0.0
    per_file: dict[str, float] = {}
    for index, name in enumerate(header.file_name):
        bytes_per_sample = _BYTES_PER_SAMPLE.get(str(header.fmt[index]))
        if bytes_per_sample is None:
            return None
        frames = (header.samps_per_frame[index] if header.samps_per_frame else 1) or 1
        offset = (header.byte_offset[index] if header.byte_offset else 0) or 0
        per_file[name] = per_file.get(name, float(offset)) + bytes_per_sample * frames * header.sig_len
    for size in per_file.values():
        total += int(size)
    return int(total)


def _read_array(path: Path, sampling_rate: float | None, lead_names: Sequence[str] | None) -> ECGRecording:
    """A `.npy` or `.csv` array in millivolts; (samples, leads) arrays are transposed to (leads, samples)."""
    if sampling_rate is None:
        raise ECGInputError("bad_sampling_rate", f"{path}: arrays carry no sampling rate, pass `sampling_rate`")
    if path.suffix.lower() == ".npy":
        try:
            signal = np.load(path, allow_pickle=False)
        except Exception as error:
            raise ECGInputError("unreadable_signal", f"{path}: {error}") from error
        names = list(lead_names) if lead_names is not None else None
    else:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline().strip().split(",")
        has_header = any(cell and not _is_number(cell) for cell in first)
        try:
            signal = np.loadtxt(path, delimiter=",", skiprows=1 if has_header else 0, dtype=np.float32, ndmin=2)
        except Exception as error:
            raise ECGInputError("unreadable_signal", f"{path}: {error}") from error
        signal = signal.T  # CSV rows are time steps, columns are leads
        names = list(lead_names) if lead_names is not None else ([cell.strip() for cell in first] if has_header else None)
    signal = np.asarray(signal, dtype=np.float32)
    if signal.ndim != 2:
        raise ECGInputError("bad_shape", f"{path}: expected a 2-D array, got shape {signal.shape}")
    if names is None:
        names = list(STANDARD_LEADS)
    if signal.shape[0] != len(names) and signal.shape[1] == len(names):
        signal = signal.T
    return ECGRecording(np.ascontiguousarray(signal), float(sampling_rate), names, [])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_record(
    path: str | os.PathLike,
    sampling_rate: float | None = None,
    lead_names: Sequence[str] | None = None,
) -> ECGRecording:
    """Read one ECG record.

    Args:
        path: a WFDB/Challenge record (`dir/name`, `dir/name.hea`, `.dat` or `.mat` with a `.hea` beside it), or a
            `.npy` / `.csv` array in millivolts. CSV files have one column per lead, optionally with a header row of
            lead names; `.npy` files hold (leads, samples) or (samples, leads).
        sampling_rate: rate in Hz of `.npy` / `.csv` arrays (ignored for WFDB records, whose header gives it).
        lead_names: lead names of `.npy` / `.csv` arrays; defaults to the CSV header or `STANDARD_LEADS`.

    Returns:
        An [`ECGRecording`] with a (leads, samples) float32 signal in millivolts.

    Raises:
        ECGInputError: with `reason` one of `missing_file`, `missing_signal_file`, `unreadable_header`,
            `unreadable_signal`, `truncated_signal`, `bad_sampling_rate`, `bad_shape`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".csv"):
        if not path.is_file():
            raise ECGInputError("missing_file", f"no file {path}")
        return _read_array(path, sampling_rate, lead_names)
    return _read_wfdb(_record_base(path))


def parse_header_comments(comments: Sequence[str]) -> dict[str, str]:
    """`key: value` header comments as a dict with lower-case keys, e.g. `{"age": "78", "sex": "Male", "dx": "..."}`.

    Angle brackets are dropped (LUDB writes `<age>: 51`); lines without a colon are ignored.
    """
    fields = {}
    for line in comments:
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip().strip("<>").strip().lower(), value.strip())
    return fields


__all__ = ["ECGRecording", "read_record", "fix_header_text", "parse_header_comments"]
