"""A fast, exact reader of the common WFDB records: one parse of the header text, then numpy for the samples.

`wfdb.rdheader` spends ~4 ms per header (its field tables are pandas frames) and `wfdb.rdrecord` parses the header
again, so reading a 10 s 12-lead record costs ~9 ms of which reading the 120 kB of samples is a few hundredths.
This module covers the records every large ECG collection uses, and nothing else:

- [`parse_header`] parses header text whose every line has the common full form (record line `name n_sig fs
  sig_len [time [date]]`; signal lines `file fmt[xspf][:skew][+offset] gain[(baseline)][/units] adc_res adc_zero
  init_value checksum block_size description`) into a [`WFDBHeader`] with the values `wfdb.rdheader` gives (an ADC
  gain of 0, "uncalibrated", as 200 units per mV, [`DEFAULT_ADC_GAIN`]). Any
  other header (fields left out, a counter frequency, multi-segment, more or fewer signal lines than `n_sig`, a
  token of unexpected form) gives `None`: the caller then uses `wfdb`.
- [`fast_read_unsupported`] says why a parsed header is not read here (`None` when it is): formats other than 16
  (little-endian int16) and 212 (two 12-bit samples in three bytes), several samples per frame, skew, null signals,
  channels of one file that disagree on format or byte offset.
- [`read_dat_signal`] reads the samples (all, or a span from any sample on: only its bytes are read) with
  `np.fromfile` and converts them exactly as `wfdb.rdrecord(..., sampfrom, sampto, physical=True, return_res=32 or
  64)` does: the same int16 digital values, invalid-sample codes
  (-32768, -2048) as NaN, `(value - baseline) / gain` evaluated in float64 and rounded once to float32/float64 as
  numpy does inside wfdb's in-place ufunc calls ([`to_physical`]), so the result is bit-identical to
  `rdrecord(...).p_signal`. It returns `None` (use `wfdb`) when
  the files hold fewer bytes than the samples need or when the header's checksums do not match the samples read, so
  an odd file gets exactly the behaviour and errors `wfdb` gives.

This module is copied flat into Hugging Face model folders as remote code (the pipeline reads records through
`io_enecg`), so it imports only numpy and the standard library.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


FAST_FORMATS = ("16", "212")
# The ADC gain of an uncalibrated signal: a header that gives 0 or no gain means "uncalibrated", read at 200 ADC units
# per physical unit (WFDB header format, header(5); `wfdb.rdheader` reads it so).
DEFAULT_ADC_GAIN = 200.0
# Digital value that marks an invalid (missing) sample, read as NaN (wfdb's INVALID_SAMPLE_VALUE).
INVALID_SAMPLE = {"16": -(2**15), "212": -(2**11)}

# Tokens of the common header form. Stricter than wfdb's patterns: whatever they accept, wfdb parses to the same
# values (tests/data/test_wfdb_fast.py compares every field on every real header).
_NAME = re.compile(r"[-\w]+")
_UINT = re.compile(r"\d+")
_INT = re.compile(r"-?\d+")
_FS = re.compile(r"\d+(?:\.\d*)?")
_TIME = re.compile(r"\d{1,2}:\d{1,2}:\d{1,2}(?:\.\d{1,6})?")
_DATE = re.compile(r"\d{1,2}/\d{1,2}/\d{1,4}")
_CHALLENGE_DATE = re.compile(r"\d{1,2}-[A-Za-z]{3}-\d{4}")
_CHALLENGE_TIME = re.compile(r"\d{1,2}:\d{2}:\d{2}")
_FILE = re.compile(r"[-\w]+(?:\.\w*)?")
_FORMAT = re.compile(r"(?P<fmt>\d+)(?:x(?P<spf>\d+))?(?::(?P<skew>\d+))?(?:\+(?P<offset>\d+))?")
_GAIN = re.compile(r"(?P<gain>-?\d+(?:\.\d*)?(?:e[+-]?\d+)?)(?:\((?P<baseline>-?\d+)\))?(?:/(?P<units>[\w^\-?%/]+))?")


@dataclass
class WFDBHeader:
    """The fields of a single-segment WFDB header, named and typed as on `wfdb.Record` (lists hold one value per
    signal; `None` where the header leaves a field out, as `wfdb` reads it)."""

    record_name: str
    n_sig: int
    fs: float
    sig_len: int
    file_name: list[str]
    fmt: list[str]
    samps_per_frame: list[int]
    skew: list[int | None]
    byte_offset: list[int | None]
    adc_gain: list[float]
    baseline: list[int]
    units: list[str]
    adc_res: list[int]
    adc_zero: list[int]
    init_value: list[int]
    checksum: list[int]
    block_size: list[int]
    sig_name: list[str]
    comments: list[str] = field(default_factory=list)


def _valid_time(text: str) -> bool:
    try:
        datetime.datetime.strptime(text, "%H:%M:%S.%f" if "." in text else "%H:%M:%S")
    except ValueError:
        return False
    return True


def _valid_date(text: str) -> bool:
    try:
        datetime.datetime.strptime(text, "%d/%m/%Y")
    except ValueError:
        return False
    return True


def parse_header(text: str) -> WFDBHeader | None:
    """A [`WFDBHeader`] from header text of the common full form, or `None` for any other header (read it with
    `wfdb`). A base time or date that `wfdb` would refuse also gives `None`, so `wfdb` reports it."""
    lines, comments = [], []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            comments.append(line.strip(" \t#"))
        elif line:
            if "#" in line or "\t" in line:
                return None
            lines.append(line)
    if not lines:
        return None
    record = lines[0].split()
    if not 4 <= len(record) <= 6:
        return None
    name, n_sig, fs, sig_len, *when = record
    if not (_NAME.fullmatch(name) and _UINT.fullmatch(n_sig) and _FS.fullmatch(fs) and _UINT.fullmatch(sig_len)):
        return None
    if when and _CHALLENGE_DATE.fullmatch(when[0]):
        # PhysioNet Challenge headers: `05-May-2020 09:49:17`. wfdb reads the day as the base time in seconds and
        # ignores the rest (a day of a month is always a valid second), so the record reads as with any other time.
        if int(when[0].split("-")[0]) > 31 or not (len(when) == 1 or _CHALLENGE_TIME.fullmatch(when[1])):
            return None
    else:
        if when and not (_TIME.fullmatch(when[0]) and _valid_time(when[0])):
            return None
        if len(when) == 2 and not (_DATE.fullmatch(when[1]) and _valid_date(when[1])):
            return None
    n_sig = int(n_sig)
    if n_sig == 0 or len(lines) != 1 + n_sig:
        return None
    rate = float(fs)
    header = WFDBHeader(name, n_sig, int(rate) if round(rate, 8) == float(int(rate)) else rate, int(sig_len),
                        *([] for _ in range(15)))
    for line in lines[1:]:
        tokens = line.split(None, 8)
        if len(tokens) != 9:
            return None
        file_name, layout, gain, adc_res, adc_zero, init_value, checksum, block_size, description = tokens
        layout_match, gain_match = _FORMAT.fullmatch(layout), _GAIN.fullmatch(gain)
        if not (_FILE.fullmatch(file_name) and layout_match and gain_match and _UINT.fullmatch(adc_res)
                and _INT.fullmatch(adc_zero) and _INT.fullmatch(init_value) and _INT.fullmatch(checksum)
                and _UINT.fullmatch(block_size)):
            return None
        adc_gain = float(gain_match["gain"])
        if adc_gain == 0:  # "uncalibrated": 200 ADC units per physical unit, as the WFDB spec and wfdb read it
            adc_gain = DEFAULT_ADC_GAIN
        spf, skew, offset = layout_match["spf"], layout_match["skew"], layout_match["offset"]
        header.file_name.append(file_name)
        header.fmt.append(layout_match["fmt"])
        header.samps_per_frame.append(int(spf) if spf else 1)
        header.skew.append(int(skew) if skew else None)
        header.byte_offset.append(int(offset) if offset else None)
        header.adc_gain.append(adc_gain)
        baseline = gain_match["baseline"]
        header.baseline.append(int(baseline) if baseline is not None else int(adc_zero))
        header.units.append(gain_match["units"] or "mV")
        header.adc_res.append(int(adc_res))
        header.adc_zero.append(int(adc_zero))
        header.init_value.append(int(init_value))
        header.checksum.append(int(checksum))
        header.block_size.append(int(block_size))
        header.sig_name.append(description)
    header.comments = comments
    return header


def _file_groups(header: WFDBHeader) -> dict[str, list[int]]:
    """Channel indices of each signal file, files in order of first appearance (as wfdb groups them)."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(header.file_name):
        groups.setdefault(name, []).append(index)
    return groups


def fast_read_unsupported(header: WFDBHeader) -> str | None:
    """Why [`read_dat_signal`] does not read this header's signals (`None` if it does)."""
    for index in range(header.n_sig):
        if header.fmt[index] not in FAST_FORMATS:
            return f"format {header.fmt[index]}"
        if header.samps_per_frame[index] != 1:
            return f"{header.samps_per_frame[index]} samples per frame"
        if header.skew[index]:
            return f"skew {header.skew[index]}"
        if header.file_name[index].startswith("~") or header.file_name[index].lower().endswith(".mat"):
            return f"signal file {header.file_name[index]}"
    for name, channels in _file_groups(header).items():
        if len({header.fmt[c] for c in channels}) > 1:
            return f"{name} mixes formats"
        if len({header.byte_offset[c] or 0 for c in channels}) > 1:
            return f"{name} gives several byte offsets"
    return None


def _decode_212(data: np.ndarray, count: int) -> np.ndarray:
    """`count` int16 samples from format-212 bytes (sample 2k: byte 3k + low nibble of byte 3k+1 as bits 8-11;
    sample 2k+1: byte 3k+2 + high nibble of byte 3k+1; 12-bit two's complement)."""
    blocks = np.zeros(3 * ((count + 1) // 2), dtype=np.uint8)
    blocks[: len(data)] = data
    blocks = blocks.reshape(-1, 3).astype(np.int16)
    samples = np.empty((len(blocks), 2), dtype=np.int16)
    samples[:, 0] = blocks[:, 0] | ((blocks[:, 1] & 0x0F) << 8)
    samples[:, 1] = blocks[:, 2] | ((blocks[:, 1] & 0xF0) << 4)
    samples = samples.reshape(-1)[:count]
    samples[samples > 2047] -= 4096
    return samples


def read_digital(folder: str | os.PathLike, header: WFDBHeader, samples: int, start: int = 0) -> np.ndarray | None:
    """(samples, n_sig) int16 ADC values of the `samples` samples from sample `start` on, or `None` when a file holds
    fewer bytes than they need (or cannot be read). Only those bytes are read (`np.fromfile` at an offset)."""
    groups = _file_groups(header)
    digital = None if len(groups) == 1 else np.empty((samples, header.n_sig), dtype=np.int16)
    for name, channels in groups.items():
        fmt, offset = header.fmt[channels[0]], header.byte_offset[channels[0]] or 0
        first, count = start * len(channels), samples * len(channels)  # values of this file, channels interleaved
        if fmt == "16":
            skip, position, needed = 0, offset + 2 * first, 2 * count
        else:  # 212: two values in three bytes; an odd first value is the second half of its block
            skip, position = first % 2, offset + 3 * (first // 2)
            needed = math.ceil(1.5 * (count + skip))
        path = Path(folder) / name
        try:
            if path.stat().st_size < position + needed:
                return None
            if fmt == "16":
                values = np.fromfile(path, dtype="<i2", count=count, offset=position)
            else:
                data = np.fromfile(path, dtype=np.uint8, count=needed, offset=position)
                values = _decode_212(data, count + skip)[skip:]
        except (OSError, ValueError):
            return None
        if len(values) != count:
            return None
        if digital is None:  # one file holds every signal, in order
            return values.reshape(samples, len(channels))
        digital[:, channels] = values.reshape(samples, len(channels))
    return digital


def checksums_match(values: np.ndarray, header: WFDBHeader) -> bool:
    """Whether the 16-bit sums of the samples (`values`: (n_sig, samples) ADC values as float64, whose sums are exact
    below 2**53) equal the header's checksums, for a read of the whole record."""
    sums = values.sum(axis=1)
    return all(int(total) % 65536 == checksum % 65536 for total, checksum in zip(sums, header.checksum))


def to_physical(digital: np.ndarray, header: WFDBHeader, dtype=np.float32, values: np.ndarray | None = None) -> np.ndarray:
    """(samples, n_sig) physical values, exactly as `wfdb.Record.dac` computes them (`return_res` 32 for float32, 64
    for float64), invalid-sample codes as NaN.

    wfdb casts the ADC values to `dtype`, then subtracts the baseline list and divides by the gain list in place:
    numpy evaluates both in float64 and rounds each result to `dtype`. With |ADC value - baseline| < 2**24 the
    difference is an integer that float32 holds exactly, so one float64 evaluation rounded once gives the same bits
    (computed lead by lead on a (n_sig, samples) array: numpy's loops are slow along a last axis of 12); larger
    baselines take wfdb's own sequence of operations. `values`: `digital.T` as a C-ordered float64 array, if made
    already (it is used up). The result is the transpose of a C-ordered (n_sig, samples) array."""
    baseline = np.array(header.baseline, dtype=np.int64)
    if np.abs(baseline).max() < 2**23:  # |int16 - baseline| < 2**24
        values = np.ascontiguousarray(digital.T, dtype=np.float64) if values is None else values
        values -= baseline.astype(np.float64)[:, None]
        values /= np.array(header.adc_gain, dtype=np.float64)[:, None]
        physical = values.astype(dtype, copy=False).T
    else:
        physical = digital.astype(dtype)
        np.subtract(physical, list(header.baseline), physical)
        np.divide(physical, list(header.adc_gain), physical)
    codes = np.array([INVALID_SAMPLE[fmt] for fmt in header.fmt])
    if digital.size and digital.min() <= codes.max():  # an invalid-sample code may be present
        invalid = digital == codes
        if invalid.any():
            physical[invalid] = np.nan
    return physical


def read_dat_signal(folder: str | os.PathLike, header: WFDBHeader, samples: int | None = None,
                    dtype=np.float32, start: int = 0) -> np.ndarray | None:
    """(samples, n_sig) physical values of a header [`fast_read_unsupported`] accepts, from sample `start` on
    (`samples` defaults to the rest of the record), bit-identical to `wfdb.rdrecord(record, sampfrom=start,
    sampto=start + samples, return_res=32 if dtype is float32 else 64).p_signal`; `None` when wfdb must read it (files
    too short for the samples, or checksums that do not match a read of the whole record: a part of a record has no
    checksum to compare, as with wfdb)."""
    samples = header.sig_len - start if samples is None else samples
    digital = read_digital(folder, header, samples, start)
    if digital is None:
        return None
    values = np.ascontiguousarray(digital.T, dtype=np.float64)
    if start == 0 and samples == header.sig_len and not checksums_match(values, header):
        return None
    return to_physical(digital, header, dtype, values)


__all__ = ["WFDBHeader", "DEFAULT_ADC_GAIN", "parse_header", "fast_read_unsupported", "read_digital",
           "read_dat_signal", "to_physical", "checksums_match", "FAST_FORMATS"]
