"""Read one ECG record from disk: WFDB records (`.hea` + `.dat`), PhysioNet Challenge records (`.hea` + `.mat`,
including the original Georgia headers), and plain `.npy` / `.csv` arrays.

[`read_record`] returns a [`ECGRecording`]: the signal as (leads, samples) float32 in millivolts, its sampling rate,
the lead names as the source spells them (or as the caller names the rows) and the header comments. Lead order, rate
and length are left as they are; [`prepare_signal`] in `preprocessing_enecg` standardises them. [`open_record`]
returns an [`ECGRecordReader`] instead, whose samples are read a span at a time: with `lazy=True` a WFDB `.dat`
record of any length (a 24-hour Holter) is read window by window from disk, each span's bytes only.

A WFDB ADC gain of 0 (or none) means "uncalibrated" in the header format: the signal is read at 200 ADC units per mV,
as `wfdb` reads it, with a warning ([`check_header_text`]).

Size is decided before any sample is read ([`RecordLimits`]): from the WFDB header (signal length and rate), the
declared shape of the `.mat` matrix (whose zlib-compressed data must also decompress to no more than that shape
holds), the `.npy` header, or the line count of a `.csv` (no line may exceed `MAX_CSV_LINE_BYTES`). A record over
the limits is refused (`too_long`, `too_large`) without reading it, so a small hostile file cannot make a reader
allocate gigabytes.

WFDB headers of the common form are parsed once (`wfdb_enecg.parse_header`) and format-16/212 signals are read with
numpy (`wfdb_enecg.read_dat_signal`), bit-identical to `wfdb.rdrecord(..., return_res=32)` and ~9x faster; any
other header or format, and any file those readers do not take as it is, is read by `wfdb` (`FAST_WFDB = False`
reads everything with `wfdb`).

This module is copied flat into Hugging Face model folders as remote code, so it imports only numpy, scipy, wfdb,
the standard library and its sibling modules (relatively); scipy and wfdb inside a `try`, so that loading a model
folder's code does not require them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np

from .preprocessing_enecg import STANDARD_LEAD_NAMES, ECGInputError, check_sampling_rate
from .wfdb_enecg import DEFAULT_ADC_GAIN, WFDBHeader, fast_read_unsupported, parse_header, read_dat_signal


logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 1 << 20  # WFDB headers are a few kB (signal lines and comments)
MAX_CSV_LINE_BYTES = 1 << 16  # one sample of every lead (or the header row of lead names)
MAT_HEADER_SLACK_BYTES = 1 << 16  # MATLAB element tags, names and padding around the declared matrix
# Read headers of the common form and format-16/212 signals with `wfdb_enecg` (one header parse, numpy), bit-identical
# to wfdb; everything else with wfdb. False reads every WFDB record with wfdb alone (for comparisons and benchmarks).
FAST_WFDB = True
# What a cell of a CSV header row must look like to be taken as a lead name ("II", "V1", "aVR", "lead II", "ECG 1").
_LEAD_NAME = re.compile(r"[\w .+\-()']{1,32}")
# Text a library's error message quotes (Python and numpy quote the offending value: `could not convert string 'x'`).
_QUOTED = re.compile(r"b?'[^']*'|b?\"[^\"]*\"")


@dataclass(frozen=True)
class RecordLimits:
    """How large a record may be. Checked from headers and array shapes before any sample is read.

    Attributes:
        max_seconds: longest record accepted (`too_long`).
        max_values: most values (leads x samples) accepted (`too_large`). Reading holds about two copies of them
            (the stored integers or floats, and float32 millivolts): 2**24 values are 64 MiB as float32.
        max_sampling_rate: highest rate accepted in Hz (`bad_sampling_rate`).
        too_long_advice: what the `too_long` error tells the user to do (the pipeline names its `window_seconds`).
    """

    max_seconds: float = 60.0
    max_values: int = 1 << 24
    max_sampling_rate: float = 10_000.0
    too_long_advice: str = "Cut it into windows first"

    def check(self, leads: int, samples: int, sampling_rate: float, source: str) -> None:
        """Refuse a record of `leads` x `samples` at `sampling_rate` that exceeds the limits."""
        seconds = samples / sampling_rate
        if seconds > self.max_seconds:
            raise ECGInputError("too_long", f"{source} holds {samples} samples per lead at {sampling_rate:g} Hz "
                                f"({seconds:.1f} s); at most {self.max_seconds:g} s are accepted. "
                                f"{self.too_long_advice}")
        if leads * samples > self.max_values:
            raise ECGInputError("too_large", f"{source} holds {leads} x {samples} values; at most {self.max_values} "
                                "are accepted")


def _problem(error: Exception) -> str:
    """A library's error message about a file without the text it quotes from the file, so that a message names the
    problem, not the file's contents (a record may be any file: the quoted line of a CSV can be a secret)."""
    return _QUOTED.sub("(...)", str(error))[:300]


def _import_wfdb():
    """The `wfdb` package, imported in a `try` (see the module docstring)."""
    try:
        import wfdb
    except ImportError as error:
        raise ECGInputError("missing_dependency", "reading WFDB records needs the wfdb package: pip install wfdb") from error
    return wfdb


def _import_scipy_io():
    """`scipy.io`, imported in a `try` (see the module docstring)."""
    try:
        import scipy.io
    except ImportError as error:
        raise ECGInputError("missing_dependency", "reading .mat files needs scipy: pip install scipy") from error
    return scipy.io


@dataclass
class ECGRecording:
    """One record as read from disk.

    Attributes:
        signal: (leads, samples) float32 array in millivolts, rows in the source's order.
        sampling_rate: samples per second.
        lead_names: name of each row of `signal`, spelled as in the source.
        comments: header comment lines without the leading `#` (WFDB/Challenge), empty for arrays.
        warnings: what the caller should know about the record as read (e.g. an uncalibrated WFDB header).
    """

    signal: np.ndarray
    sampling_rate: float
    lead_names: list[str]
    comments: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ECGRecordReader:
    """A record opened by [`open_record`]: what its header says, and its samples, read a span at a time.

    Attributes:
        sampling_rate: samples per second.
        lead_names: name of each row, spelled as in the source (or as the caller named them).
        num_samples: samples per lead in the record.
        read_span: `(start, stop) -> (leads, stop - start)` float32 array in millivolts ([`read`] checks the span).
        comments: header comment lines without the leading `#` (WFDB/Challenge), empty for arrays.
        warnings: what the caller should know about the record as read (e.g. an uncalibrated WFDB header).
    """

    sampling_rate: float
    lead_names: list[str]
    num_samples: int
    read_span: Callable[[int, int], np.ndarray] = field(repr=False)
    comments: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_signal(cls, signal: np.ndarray, sampling_rate: float, lead_names: Sequence[str],
                    comments: Sequence[str] = (), warnings: Sequence[str] = ()) -> "ECGRecordReader":
        """A reader of a (leads, samples) array held in memory (spans are views of it)."""
        return cls(sampling_rate, list(lead_names), signal.shape[1], lambda start, stop: signal[:, start:stop],
                   list(comments), list(warnings))

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(leads, stop - start) float32 array in millivolts of samples `start` to `stop` (default: to the end)."""
        stop = self.num_samples if stop is None else stop
        if not 0 <= start <= stop <= self.num_samples:
            raise ValueError(f"span {start}:{stop} is outside the record's {self.num_samples} samples")
        return self.read_span(start, stop)


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


def _number(text: str) -> float:
    """The leading number of a header field such as `500`, `360/1(0)` or `1000.0(0)/mV`; NaN if there is none."""
    try:
        return float(re.split(r"[/(]", text, maxsplit=1)[0])
    except ValueError:
        return math.nan


def check_header_text(text: str, header_path: Path | str) -> list[str]:
    """Refuse header values that `wfdb` would silently replace by its defaults or misread, and say which signals are
    uncalibrated.

    `wfdb` reads an unparsable sampling frequency (`-1`, `nan`) as 250 Hz: refused as `unreadable_header`, as are an
    ADC gain that is no number, NaN, infinite or negative (the scale of the signal is unknown or inverted) and
    multi-segment records. A header that leaves the rate out is valid WFDB and keeps the default. Messages show what a
    field was read as (a number, NaN), never its text: a record may be any file.

    An ADC gain of 0, or none, means "uncalibrated" in the WFDB header format (header(5): "a value of 200 ADC units
    per physical unit may be assumed"; `wfdb` reads it so). Whole PhysioNet databases write it (e.g. `rec.dat 212 0
    12 0 -16 12292 0 ECG`): such signals are read at 200 units/mV, and their names are returned for a warning.

    Returns:
        The descriptions (or `signal N`) of the signals whose gain is 0 or missing.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise ECGInputError("unreadable_header", f"{header_path} has no record line")
    record = lines[0].split()
    if len(record) < 2 or not record[1].isdigit():
        raise ECGInputError("unreadable_header", f"{header_path}: the record line gives no signal count")
    if "/" in record[0]:
        raise ECGInputError("unreadable_header", f"{header_path} is a multi-segment record, which is not supported")
    if len(lines) - 1 != int(record[1]):
        raise ECGInputError("unreadable_header", f"{header_path}: the record line gives {record[1]} signals, the header "
                            f"has {len(lines) - 1} signal lines")
    if len(record) >= 3:
        rate = _number(record[2])
        if not math.isfinite(rate) or rate <= 0:
            raise ECGInputError("unreadable_header", f"{header_path}: sampling frequency {rate:g} is not a positive "
                                "number")
    uncalibrated = []
    for index, line in enumerate(lines[1 : 1 + int(record[1])]):
        fields = line.split()
        name = " ".join(fields[8:]) or f"signal {index + 1}"
        gain = _number(fields[2]) if len(fields) >= 3 else 0.0
        if not math.isfinite(gain) or gain < 0:
            raise ECGInputError("unreadable_header", f"{header_path}: ADC gain {gain:g} of {name} is not a positive "
                                "number (the scale of the signal is unknown)")
        if gain == 0:
            uncalibrated.append(name)
    return uncalibrated


def uncalibrated_warning(names: Sequence[str]) -> str:
    """The warning for a record whose signals `names` have an ADC gain of 0 or none (see [`check_header_text`])."""
    return (f"uncalibrated record: the header gives no ADC gain (0 or none) for {list(names)}; read at the WFDB "
            f"default of {DEFAULT_ADC_GAIN:g} ADC units per mV, so amplitudes in mV are nominal")


def _read_header(base: Path) -> tuple[Any, list[str]]:
    """The header fields of `base.hea`, parsed once: a `wfdb_enecg.WFDBHeader` for headers of the common form, else a
    `wfdb.Record` (fixing Challenge record lines in a temporary copy); and the names of its uncalibrated signals."""
    header_path = base.with_name(base.name + ".hea")
    if not header_path.is_file():
        raise ECGInputError("missing_file", f"no header file {header_path}")
    size = header_path.stat().st_size
    if size > MAX_HEADER_BYTES:
        raise ECGInputError("unreadable_header", f"{header_path} is {size} bytes; a WFDB header is a few kB (at most "
                            f"{MAX_HEADER_BYTES} accepted)")
    text = header_path.read_text(encoding="ascii", errors="ignore")
    fixed = fix_header_text(text)
    uncalibrated = check_header_text(fixed, header_path)
    if FAST_WFDB:
        parsed = parse_header(fixed)
        if parsed is not None:
            return parsed, uncalibrated
    wfdb = _import_wfdb()
    try:
        if fixed == text:
            return wfdb.rdheader(str(base)), uncalibrated
        # wfdb parses headers only from files: hand it the fixed text under the same record name.
        stem = fixed.split(None, 1)[0] if fixed.strip() else base.name
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, f"{stem}.hea").write_text(fixed, encoding="ascii")
            return wfdb.rdheader(os.path.join(directory, stem)), uncalibrated
    except Exception as error:  # wfdb raises HeaderSyntaxError, ValueError, IndexError... on malformed headers
        raise ECGInputError("unreadable_header", f"{header_path}: {_problem(error)}") from error


def _digital_to_physical(digital: np.ndarray, header) -> np.ndarray:
    """(leads, samples) float32 physical values from ADC counts with the header's per-lead gain and baseline."""
    gain = np.asarray(header.adc_gain, dtype=np.float64)[:, None]
    baseline = np.asarray(header.baseline, dtype=np.float64)[:, None]
    if np.any(gain == 0) or not np.isfinite(gain).all():
        raise ECGInputError("unreadable_header", f"record {header.record_name} has an ADC gain of zero or no number")
    physical = digital.astype(np.float32)  # one float32 copy, scaled in place (ADC counts are exact in float32)
    physical -= baseline.astype(np.float32)
    physical /= gain.astype(np.float32)
    return physical


def _to_millivolts(signal: np.ndarray, units: Sequence[str] | None) -> np.ndarray:
    """Scale rows recorded in uV or V to mV (units as in the WFDB header, e.g. `mV`, `uV`)."""
    if not units:
        return signal
    scale = {"uv": 1e-3, "µv": 1e-3, "mv": 1.0, "v": 1e3}
    factors = np.array([scale.get(str(unit).strip().lower(), 1.0) for unit in units], dtype=np.float32)
    return signal * factors[:, None] if np.any(factors != 1.0) else signal


# MATLAB classes scipy reports (`whosmat`) with the bytes per value of their data.
_MAT_ITEMSIZE = {"int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "int64": 8, "uint64": 8,
                 "single": 4, "double": 8}
_MAT_COMPRESSED = 15  # miCOMPRESSED: a zlib stream holding one variable


def _check_mat_decompressed_size(mat_path: Path, limit: int) -> None:
    """Refuse a MATLAB v5 file whose compressed variables inflate to more than `limit` bytes.

    The declared shape of a variable says nothing about how much its zlib stream inflates to: scipy allocates what
    the data element inside claims. The streams are inflated here 1 MiB at a time and only counted, never kept.
    """
    chunk = 1 << 20
    total = 0
    with open(mat_path, "rb") as handle:
        header = handle.read(128)
        endian = "<" if header[126:128] == b"IM" else ">"
        while True:
            tag = handle.read(8)
            if len(tag) < 8:
                return
            data_type, size = struct.unpack(endian + "II", tag)
            if data_type >> 16:  # small data element: its (at most 4) bytes are inside the tag
                continue
            if data_type != _MAT_COMPRESSED:
                total += size
                handle.seek(size + (-size % 8), os.SEEK_CUR)
            else:
                inflater = zlib.decompressobj()
                remaining = size
                while remaining > 0:
                    data = handle.read(min(chunk, remaining))
                    if not data:
                        break
                    remaining -= len(data)
                    while data:
                        try:
                            total += len(inflater.decompress(data, chunk))
                        except zlib.error as error:
                            raise ECGInputError("unreadable_signal", f"{mat_path}: corrupt compressed data "
                                                f"({_problem(error)})")
                        if total > limit:
                            raise ECGInputError("too_large", f"{mat_path} inflates to more than {limit} bytes, more "
                                                "than its declared matrix holds (a decompression bomb?)")
                        data = inflater.unconsumed_tail
            if total > limit:
                raise ECGInputError("too_large", f"{mat_path} holds more than {limit} bytes of data, more than its "
                                    "declared matrix")


class _SmallReads:
    """A binary file whose `read` returns at most 4 kB. scipy inflates each block it reads from a compressed variable
    at once: a 128 kB block of zeros is 130 MB. Reading headers through this wrapper keeps that to a few MB."""

    def __init__(self, handle: BinaryIO, size: int = 4096):
        self.handle, self.size = handle, size

    def read(self, size: int | None = -1) -> bytes:
        return self.handle.read(self.size if size is None or size < 0 else min(size, self.size))

    def seek(self, *args) -> int:
        return self.handle.seek(*args)

    def tell(self) -> int:
        return self.handle.tell()


def _read_mat_signal(base: Path, header, limits: RecordLimits) -> np.ndarray:
    """(leads, samples) digital values of a Challenge `.mat` signal file (a MATLAB v4 or v5 file with a `val`
    matrix), after checking the matrix's declared shape against the header and the limits."""
    scipy_io = _import_scipy_io()
    mat_path = base.parent / header.file_name[0]
    if not mat_path.is_file():
        raise ECGInputError("missing_signal_file", f"no signal file {mat_path}")
    try:
        version = scipy_io.matlab.matfile_version(str(mat_path))[0]
        if version == 2:
            raise ECGInputError("unreadable_signal", f"{mat_path} is a MATLAB 7.3 (HDF5) file; Challenge records are "
                                "MATLAB v4/v5 files")
        with open(mat_path, "rb") as handle:
            declared = {name: (shape, kind) for name, shape, kind in scipy_io.whosmat(_SmallReads(handle))}
    except ECGInputError:
        raise
    except Exception as error:
        raise ECGInputError("unreadable_signal", f"{mat_path} is not a readable MATLAB file: {_problem(error)}") from error
    if "val" not in declared:
        raise ECGInputError("unreadable_signal", f"{mat_path} has no `val` matrix (it holds {len(declared)} other "
                            "variable(s))")
    shape, kind = declared["val"]
    if len(shape) != 2 or kind not in _MAT_ITEMSIZE:
        raise ECGInputError("unreadable_signal", f"{mat_path}: `val` is a {kind} array of shape {shape}, not a "
                            "(leads, samples) matrix of numbers")
    rows, columns = shape
    if rows != header.n_sig:
        raise ECGInputError("unreadable_signal", f"{mat_path} holds {rows} rows, the header lists {header.n_sig} leads")
    if header.sig_len and columns < header.sig_len:
        raise ECGInputError("truncated_signal", f"{mat_path} holds {columns} samples, the header says {header.sig_len}")
    limits.check(rows, max(columns, header.sig_len or 0), float(header.fs), str(mat_path))
    if version == 1:
        _check_mat_decompressed_size(mat_path, rows * columns * _MAT_ITEMSIZE[kind] + MAT_HEADER_SLACK_BYTES)
    try:
        values = scipy_io.loadmat(str(mat_path), variable_names=["val"])["val"]
    except Exception as error:
        raise ECGInputError("unreadable_signal", f"{mat_path}: {_problem(error)}") from error
    if values.shape != (rows, columns):
        raise ECGInputError("unreadable_signal", f"{mat_path}: `val` has shape {values.shape}, declared {shape}")
    return values


# Bytes per sample of the WFDB storage formats (https://wfdb.io/spec/signal-files.html).
_BYTES_PER_SAMPLE = {"8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2, "212": 1.5, "310": 4 / 3, "311": 4 / 3}


def _dat_layout(header, base: Path) -> tuple[int, int | None]:
    """(samples per signal, bytes the `.dat` files need) from the header, before reading any sample.

    A header without a signal length leaves it to the file size (as `wfdb` does). The byte count is `None` for formats
    of unknown size per sample (FLAC formats 508-532), which then need a signal length in the header.
    """
    frames = [(header.samps_per_frame[i] if header.samps_per_frame else 1) or 1 for i in range(header.n_sig)]
    per_sample = [_BYTES_PER_SAMPLE.get(str(header.fmt[i])) if header.fmt else None for i in range(header.n_sig)]
    offsets = [(header.byte_offset[i] if header.byte_offset else 0) or 0 for i in range(header.n_sig)]
    files = list(dict.fromkeys(header.file_name))
    frame_bytes = {name: 0.0 for name in files}
    for index, name in enumerate(header.file_name):
        frame_bytes[name] += (per_sample[index] or 0) * frames[index]
    known = all(size is not None for size in per_sample)
    samples = header.sig_len
    if not samples:
        if not known:
            raise ECGInputError("unreadable_header", f"{base}.hea gives no signal length for a compressed signal format")
        samples = max(
            int(max(0, (base.parent / name).stat().st_size - offsets[header.file_name.index(name)]) // frame_bytes[name])
            for name in files
        )
    if not known:
        return samples, None
    needed = sum(int(offsets[header.file_name.index(name)] + frame_bytes[name] * samples) for name in files)
    return samples, needed


def _row_names(lead_names: Sequence[str] | None, found: Sequence[str], source: str) -> list[str]:
    """The names of a record's rows: the caller's `lead_names` (one per row) where given, else the source's own."""
    if lead_names is None:
        return list(found)
    if len(lead_names) != len(found):
        raise ECGInputError("bad_shape", f"{len(lead_names)} lead names {list(lead_names)} for the {len(found)} signals "
                            f"of {source} (named {list(found)} there)")
    return list(lead_names)


def _open_wfdb(base: Path, lead_names: Sequence[str] | None, limits: RecordLimits, lazy: bool) -> ECGRecordReader:
    """A WFDB record with `.dat` (any WFDB format) or Challenge `.mat` signal files."""
    header, uncalibrated = _read_header(base)
    if not header.n_sig or not header.file_name:
        raise ECGInputError("unreadable_header", f"{base}.hea lists no signals")
    signal_files = [base.parent / name for name in dict.fromkeys(header.file_name)]
    for signal_file in signal_files:
        if not signal_file.is_file():
            raise ECGInputError("missing_signal_file", f"no signal file {signal_file}")
    rate = check_sampling_rate(header.fs, limits.max_sampling_rate)
    names = _row_names(lead_names, header.sig_name, f"{base}.hea")
    comments, warnings = list(header.comments or []), []
    if uncalibrated:
        warnings.append(uncalibrated_warning(uncalibrated))
        logger.warning("%s.hea: %s", base, warnings[-1])
    if all(name.lower().endswith(".mat") for name in header.file_name):
        signal = _to_millivolts(_digital_to_physical(_read_mat_signal(base, header, limits), header), header.units)
        return ECGRecordReader.from_signal(signal, rate, names, comments, warnings)
    samples, needed = _dat_layout(header, base)
    actual = sum(path.stat().st_size for path in signal_files)
    if samples == 0:  # a length of 0 (or none) in the header and nothing in the files
        raise ECGInputError("empty_signal", f"{base} holds no samples (the header gives a signal length of "
                            f"{header.sig_len}, the signal files hold {actual} bytes)")
    values_per_sample = sum((header.samps_per_frame[i] if header.samps_per_frame else 1) or 1
                            for i in range(header.n_sig))
    if not lazy:
        limits.check(values_per_sample, samples, rate, f"{base}.hea")
    if needed is not None and actual < needed:
        raise ECGInputError("truncated_signal", f"{base}: signal files hold {actual} bytes, the header needs {needed}")

    def read_span(start: int, stop: int) -> np.ndarray:
        if lazy:
            limits.check(values_per_sample, stop - start, rate, f"a span of {base}")
        physical, units = None, header.units
        if isinstance(header, WFDBHeader) and fast_read_unsupported(header) is None:
            # None when the files are shorter than the samples need or the checksums differ: wfdb then decides.
            physical = read_dat_signal(base.parent, header, stop - start, np.float32, start=start)
        if physical is None:
            try:
                record = _import_wfdb().rdrecord(str(base), sampfrom=start, sampto=stop, physical=True, return_res=32)
            except ECGInputError:
                raise
            except Exception as error:
                raise ECGInputError("unreadable_signal", f"{base}: {_problem(error)}") from error
            physical, units = record.p_signal, record.units
        return _to_millivolts(np.asarray(physical, dtype=np.float32).T, units)

    return ECGRecordReader(rate, names, samples, read_span, comments, warnings)


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def read_npy(handle: BinaryIO, limits: RecordLimits = RecordLimits(), source: str = ".npy data") -> np.ndarray:
    """A numeric array from an open `.npy` file (or `io.BytesIO`), its header checked before the data is read.

    Never unpickles: object arrays are refused, like zip archives (`numpy.savez` output), other files and arrays of
    more than `limits.max_values` values.

    Returns:
        The array as stored (any numeric dtype, any shape).
    """
    start = handle.read(len(_NPY_MAGIC))
    if start[:4] == _ZIP_MAGIC:
        raise ECGInputError("unreadable_signal", f"{source} is a zip archive (an .npz written by numpy.savez?), not a "
                            ".npy array: save one array with numpy.save")
    if start != _NPY_MAGIC:
        raise ECGInputError("unreadable_signal", f"{source} is not a .npy file (it does not start with numpy's "
                            "magic bytes)")
    handle.seek(0)
    try:
        version = np.lib.format.read_magic(handle)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, _, dtype = reader(handle)
    except ValueError as error:
        raise ECGInputError("unreadable_signal", f"{source}: unreadable .npy header ({_problem(error)})") from error
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ECGInputError("unreadable_signal", f"{source} holds {dtype} values, not numbers"
                            + (" (object arrays would need unpickling)" if dtype.hasobject else ""))
    values = math.prod(shape)
    if values > limits.max_values:
        raise ECGInputError("too_large", f"{source} holds an array of shape {shape}, {values} values; at most "
                            f"{limits.max_values} are accepted")
    data_start = handle.tell()
    available = handle.seek(0, os.SEEK_END) - data_start
    if available < values * dtype.itemsize:
        raise ECGInputError("truncated_signal", f"{source} holds {available} bytes of data; shape {shape} of {dtype} "
                            f"needs {values * dtype.itemsize}")
    handle.seek(0)
    try:
        return np.lib.format.read_array(handle, allow_pickle=False)
    except ValueError as error:
        raise ECGInputError("unreadable_signal", f"{source}: {_problem(error)}") from error


def _csv_lines(path: Path) -> int:
    """Number of lines of a text file, refusing any line longer than `MAX_CSV_LINE_BYTES` (read 1 MiB at a time)."""
    lines = current = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            start = 0
            while (end := chunk.find(b"\n", start)) != -1:
                current += end - start
                if current > MAX_CSV_LINE_BYTES:
                    break
                lines, current, start = lines + 1, 0, end + 1
            else:
                current += len(chunk) - start
            if current > MAX_CSV_LINE_BYTES:
                raise ECGInputError("bad_shape", f"line {lines + 1} of {path} is longer than {MAX_CSV_LINE_BYTES} "
                                    "bytes: a CSV record has one line per sample and one column per lead")
    return lines + (current > 0)


def _read_csv(path: Path, rate: float, limits: RecordLimits) -> tuple[np.ndarray, list[str] | None]:
    """((samples, columns) float32 values, column names of the header row or `None`)."""
    lines = _csv_lines(path)
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline().strip().split(",")
    has_header = any(cell and not _is_number(cell) for cell in first)
    if has_header and not all(_LEAD_NAME.fullmatch(cell.strip()) for cell in first):
        raise ECGInputError("unreadable_signal", f"{path}: the first row is neither numbers nor lead names; a CSV record "
                            "has one column per lead, numbers in every row but an optional first row of lead names")
    limits.check(len(first), max(0, lines - has_header), rate, str(path))
    try:
        signal = np.loadtxt(path, delimiter=",", skiprows=1 if has_header else 0, dtype=np.float32, ndmin=2)
    except Exception as error:
        raise ECGInputError("unreadable_signal", f"{path} is not a CSV of numbers: {_problem(error)}") from error
    return signal, ([cell.strip() for cell in first] if has_header else None)


def _read_array(path: Path, sampling_rate: float | None, lead_names: Sequence[str] | None,
                limits: RecordLimits) -> ECGRecordReader:
    """A `.npy` or `.csv` array in millivolts; (samples, leads) arrays are transposed to (leads, samples)."""
    if sampling_rate is None:
        raise ECGInputError("bad_sampling_rate", f"{path}: arrays carry no sampling rate, pass `sampling_rate`")
    rate = check_sampling_rate(sampling_rate, limits.max_sampling_rate)
    names = list(lead_names) if lead_names is not None else None
    if path.suffix.lower() == ".npy":
        with open(path, "rb") as handle:
            signal = read_npy(handle, limits, str(path))
        if signal.ndim == 2:  # the longer axis is time, whichever way round the array is stored
            limits.check(min(signal.shape), max(signal.shape), rate, str(path))
    else:
        signal, header_names = _read_csv(path, rate, limits)
        signal = signal.T  # CSV rows are time steps, columns are leads
        names = names if names is not None else header_names
    if signal.ndim != 2:
        raise ECGInputError("bad_shape", f"{path}: expected a 2-D array, got shape {signal.shape}")
    signal = signal.astype(np.float32, copy=False)
    if names is None:
        names = list(STANDARD_LEAD_NAMES)
    if signal.shape[0] != len(names) and signal.shape[1] == len(names):
        signal = signal.T
    return ECGRecordReader.from_signal(np.ascontiguousarray(signal), rate, names)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def open_record(
    path: str | os.PathLike,
    sampling_rate: float | None = None,
    lead_names: Sequence[str] | None = None,
    limits: RecordLimits | None = None,
    lazy: bool = False,
) -> ECGRecordReader:
    """Open one ECG record: read and check its header (and load what cannot be read in parts), read samples later.

    Args:
        path: a WFDB/Challenge record (`dir/name`, `dir/name.hea`, `.dat` or `.mat` with a `.hea` beside it), or a
            `.npy` / `.csv` array in millivolts. CSV files have one column per lead, optionally with a header row of
            lead names; `.npy` files hold (leads, samples) or (samples, leads).
        sampling_rate: rate in Hz of `.npy` / `.csv` arrays (ignored for WFDB records, whose header gives it).
        lead_names: names of the rows, in order: they replace a WFDB header's own names (one per signal; e.g. for
            headers that name leads `ECG1` or `record 14046, signal 0`). Arrays default to the CSV header or
            `STANDARD_LEAD_NAMES`.
        limits: size limits checked before samples are read (default: `RecordLimits()`, 60 s).
        lazy: read the samples of WFDB `.dat` records only when a span is asked for (`ECGRecordReader.read`, from
            disk, only that span's bytes): `limits` then apply to each span read, not to the whole record, so a
            record of any length is read in bounded memory. `.mat`, `.npy` and `.csv` files are loaded when opened,
            under `limits` for the whole file, either way.

    Returns:
        An [`ECGRecordReader`].

    Raises:
        ECGInputError: as [`read_record`].
    """
    limits = limits or RecordLimits()
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".csv"):
        if not path.is_file():
            raise ECGInputError("missing_file", f"no file {path}")
        return _read_array(path, sampling_rate, lead_names, limits)
    return _open_wfdb(_record_base(path), lead_names, limits, lazy)


def read_record(
    path: str | os.PathLike,
    sampling_rate: float | None = None,
    lead_names: Sequence[str] | None = None,
    limits: RecordLimits | None = None,
) -> ECGRecording:
    """Read one ECG record whole ([`open_record`], then all its samples).

    Args:
        path: a WFDB/Challenge record (`dir/name`, `dir/name.hea`, `.dat` or `.mat` with a `.hea` beside it), or a
            `.npy` / `.csv` array in millivolts (see [`open_record`]).
        sampling_rate: rate in Hz of `.npy` / `.csv` arrays (ignored for WFDB records, whose header gives it).
        lead_names: names of the rows, in order (they replace a WFDB header's names); arrays default to the CSV header
            or `STANDARD_LEAD_NAMES`.
        limits: size limits checked before samples are read (default: `RecordLimits()`, 60 s).

    Returns:
        An [`ECGRecording`] with a (leads, samples) float32 signal in millivolts.

    Raises:
        ECGInputError: with `reason` one of `missing_file`, `missing_signal_file`, `unreadable_header`,
            `unreadable_signal`, `truncated_signal`, `empty_signal`, `bad_sampling_rate`, `bad_shape`, `too_long`,
            `too_large`.
    """
    reader = open_record(path, sampling_rate, lead_names, limits)
    return ECGRecording(reader.read(), reader.sampling_rate, reader.lead_names, reader.comments, reader.warnings)


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


__all__ = ["ECGRecording", "ECGRecordReader", "RecordLimits", "open_record", "read_record", "read_npy",
           "fix_header_text", "check_header_text", "uncalibrated_warning", "parse_header_comments"]
